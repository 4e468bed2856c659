//! One running node: the pure [`State`] behind a mutex, together with what
//! carrying out its effects takes (each connection's queue, the guardians
//! waiting on an arbiter or on an id, timers), and the calls the session
//! makes.
//!
//! Frames from peers and calls from guardians change the state
//! synchronously; its effects are carried out under the same lock, in
//! order, so every connection sees frames in the order the state produced
//! them. Writer tasks drain the queues, reader tasks feed frames back in
//! (`transport.rs`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Settings;
use super::discovery::Seeds;
use super::gate::Gate;
use super::state::{ConnId, Effect, Effects, Reply, State, Step, Timer};
use super::tokens::unix_nanos;
use super::wire::{MemberInfo, Msg, RejectReason, SYNC_CHUNK};
use crate::backend::kit::wake::Wakes;
use crate::backend::{Claim, HeldId, Holder, Member, Profile};
use crate::service::BoxFuture;
use crate::{Error, Result};

/// A running node.
pub(super) struct Node {
    weak: Weak<Node>,
    pub(super) name: Arc<str>,
    pub(super) me: MemberInfo,
    /// The key of this node's MACs: the cookie, checked.
    pub(super) key: Vec<u8>,
    pub(super) settings: Arc<Settings>,
    pub(super) listen_port: u16,
    /// The address connections leave from, when the listener has one.
    pub(super) local_ip: Option<IpAddr>,
    shared: Mutex<Shared>,
    /// Bumped on every membership change; every waiting guardian watches it.
    epoch: watch::Sender<u64>,
    /// Bumped on every change of the member list: membership, and profiles.
    members: watch::Sender<u64>,
    /// Per id: bumped when something about it changed.
    wakes: Wakes<Arc<str>>,
    /// Bumped when a dial ends (a starting node waits on it).
    dials: watch::Sender<u64>,
    /// Wakes the dialer at once (a member was learned).
    pub(super) kick: Notify,
    /// Wakes the seed resolver at once (a dial to a seed failed).
    pub(super) resolve_now: Notify,
    pub(super) cancel: CancellationToken,
    pub(super) writers: TaskTracker,
}

/// Everything behind the node's one lock.
pub(super) struct Shared {
    pub(super) state: State,
    pub(super) seeds: Seeds,
    pub(super) gate: Gate,
    /// The queue and stop switch of every connection the state counts.
    links: HashMap<ConnId, LinkIo>,
    /// Guardians whose claim waits on an arbiter.
    waiting: HashMap<Arc<str>, oneshot::Sender<WaitedClaim>>,
}

/// A connection's side in the node: frames queued for its writer, and the
/// switch that stops its reader and writer.
struct LinkIo {
    tx: mpsc::UnboundedSender<Bytes>,
    stop: CancellationToken,
}

impl Node {
    /// A node named `me.name` that has not joined anything yet.
    pub(super) fn new(
        settings: Arc<Settings>,
        me: MemberInfo,
        key: Vec<u8>,
        listen_port: u16,
        local_ip: Option<IpAddr>,
        seeds: Seeds,
    ) -> Arc<Node> {
        Arc::new_cyclic(|weak| Node {
            weak: weak.clone(),
            name: me.name.clone(),
            shared: Mutex::new(Shared {
                state: State::new(me.name.clone()),
                seeds,
                gate: Gate::default(),
                links: HashMap::new(),
                waiting: HashMap::new(),
            }),
            wakes: Wakes::new(),
            me,
            key,
            settings,
            listen_port,
            local_ip,
            epoch: watch::Sender::new(0),
            members: watch::Sender::new(0),
            dials: watch::Sender::new(0),
            kick: Notify::new(),
            resolve_now: Notify::new(),
            cancel: CancellationToken::new(),
            writers: TaskTracker::new(),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn bump_epoch(&self) {
        self.epoch.send_modify(|e| *e = e.wrapping_add(1));
        self.bump_members();
    }

    fn bump_members(&self) {
        self.members.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// Completes at the next change of the member list after this call
    /// (never, once the node is gone).
    pub(super) fn members_changed(&self) -> BoxFuture<'static, ()> {
        let mut rx = self.members.subscribe();
        Box::pin(async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }

    /// Changes with every membership change.
    pub(super) fn epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    pub(super) fn bump_dials(&self) {
        self.dials.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// Changes whenever a dial ends.
    pub(super) fn dials(&self) -> watch::Receiver<u64> {
        self.dials.subscribe()
    }

    /// Whether fault injection cut the link to `peer`.
    pub(super) fn cut(&self, peer: &str) -> bool {
        self.settings
            .faults
            .as_ref()
            .is_some_and(|f| f.is_cut(&self.name, peer))
    }

    /// Carries out `fx`, in order, under the lock the state was changed in.
    pub(super) fn apply(&self, sh: &mut Shared, fx: Effects) {
        for effect in fx {
            match effect {
                Effect::Send { to, msg } => {
                    let frame = msg.encode();
                    for (_, conn) in to {
                        if let Some(link) = sh.links.get(&conn) {
                            let _ = link.tx.send(frame.clone());
                        }
                    }
                }
                Effect::Hangup(conn) => {
                    sh.links.remove(&conn);
                }
                Effect::Stop(conn) => {
                    if let Some(link) = sh.links.remove(&conn) {
                        link.stop.cancel();
                    }
                }
                Effect::EndLease { signal, end, .. } => {
                    signal.end(end);
                }
                Effect::Reply { id, reply } => self.reply(sh, id, reply),
                Effect::Wake(id) => self.wakes.bump(&id),
                Effect::Epoch => self.bump_epoch(),
                Effect::Members => self.bump_members(),
                Effect::Dial => self.kick.notify_one(),
                Effect::Timer(timer) => self.spawn_timer(timer),
            }
        }
    }

    /// Hands `reply` to the guardian whose claim of `id` waits on it.
    fn reply(&self, sh: &mut Shared, id: Arc<str>, reply: Reply) {
        let Some(tx) = sh.waiting.remove(&id) else {
            return;
        };
        let reply = match reply {
            Reply::Denied(holder) => {
                let wake = self.waker(&id);
                Ok(Claim::Busy { holder, wake })
            }
            Reply::Granted(lease) => Ok(Claim::Granted(lease)),
            Reply::Retry => Err(()),
        };
        let token = match &reply {
            Ok(Claim::Granted(lease)) => Some(lease.token),
            _ => None,
        };
        if tx.send(reply).is_err()
            && let Some(token) = token
        {
            // Nobody waits for the lease any more (the guardian stopped).
            let fx = sh.state.release(&id, token);
            self.apply(sh, fx);
        }
    }

    /// After the timer's delay, hands `timer` back to the state.
    fn spawn_timer(&self, timer: Timer) {
        let after = timer.delay(self.settings.failure_timeout);
        if let Some(node) = self.weak.upgrade() {
            tokio::spawn(async move {
                sleep(after).await;
                let mut sh = node.lock();
                let fx = sh.state.expired(timer);
                node.apply(&mut sh, fx);
            });
        }
    }

    /// Completes when something about `id` changes, or membership does.
    fn waker(&self, id: &Arc<str>) -> BoxFuture<'static, ()> {
        let id_changed = self.wakes.waiter(id);
        let mut epoch_rx = self.epoch.subscribe();
        Box::pin(async move {
            tokio::select! {
                _ = id_changed => {}
                _ = epoch_rx.changed() => {}
            }
        })
    }

    /// Decides the claim of `id` (its instance given `budget` to stop) at
    /// once, or returns the answer to wait for.
    fn try_claim_now(
        &self,
        id: &Arc<str>,
        budget: Duration,
    ) -> Result<std::result::Result<Claim, oneshot::Receiver<WaitedClaim>>> {
        let mut sh = self.lock();
        let (step, fx) = sh.state.claim(id, budget, unix_nanos());
        self.apply(&mut sh, fx);
        match step {
            Step::Closed => Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!("cluster node `{}` has left the cluster", self.name),
            )),
            Step::Granted(lease) => Ok(Ok(Claim::Granted(lease))),
            Step::Busy(holder) => {
                let wake = self.waker(id);
                Ok(Ok(Claim::Busy {
                    holder: Some(holder),
                    wake,
                }))
            }
            Step::Asked => {
                let (tx, rx) = oneshot::channel();
                sh.waiting.insert(id.clone(), tx);
                Ok(Err(rx))
            }
        }
    }

    pub(super) async fn claim(self: Arc<Self>, id: Arc<str>, budget: Duration) -> Result<Claim> {
        loop {
            let rx = match self.try_claim_now(&id, budget)? {
                Ok(claim) => return Ok(claim),
                Err(rx) => rx,
            };
            match rx.await {
                Ok(Ok(claim)) => return Ok(claim),
                // The arbiter went away, or a newer request replaced this
                // one: ask again (the state has changed, so this is no loop).
                Ok(Err(())) | Err(_) => continue,
            }
        }
    }

    pub(super) fn release(&self, id: &str, token: u64) {
        let mut sh = self.lock();
        let fx = sh.state.release(id, token);
        self.apply(&mut sh, fx);
    }

    pub(super) fn release_to(&self, id: &str, token: u64, to: &str) {
        let mut sh = self.lock();
        let fx = sh.state.release_to(id, token, to);
        self.apply(&mut sh, fx);
    }

    pub(super) fn announce(&self, profile: Profile) {
        let mut sh = self.lock();
        let fx = sh.state.announce(profile);
        self.apply(&mut sh, fx);
    }

    /// A frame from `peer` on connection `conn`.
    pub(super) fn on_frame(&self, peer: &Arc<str>, conn: ConnId, msg: Msg) {
        let mut sh = self.lock();
        let fx = sh.state.on_frame(peer, conn, msg, unix_nanos());
        self.apply(&mut sh, fx);
    }

    /// Connection `conn` to `peer` is closed.
    pub(super) fn conn_closed(&self, peer: &Arc<str>, conn: ConnId) {
        let mut sh = self.lock();
        let fx = sh.state.conn_closed(peer, conn);
        self.apply(&mut sh, fx);
    }

    /// Offers a freshly authenticated connection to `info.name`, with its
    /// queue and stop switch; on success it is the peer's connection and
    /// has this node's state queued.
    pub(super) fn adopt(
        &self,
        info: &MemberInfo,
        dialed_by_me: bool,
        tx: mpsc::UnboundedSender<Bytes>,
        stop: CancellationToken,
    ) -> std::result::Result<ConnId, RejectReason> {
        let mut sh = self.lock();
        let (conn, fx) = sh.state.adopt(info, dialed_by_me, SYNC_CHUNK)?;
        sh.links.insert(conn, LinkIo { tx, stop });
        self.apply(&mut sh, fx);
        Ok(conn)
    }

    /// The node has joined (or stopped waiting to).
    pub(super) fn become_ready(&self) {
        let mut sh = self.lock();
        let fx = sh.state.become_ready();
        self.apply(&mut sh, fx);
    }

    /// Graceful leave: release everything, tell every member, flush, stop.
    pub(super) async fn leave(&self) {
        {
            let mut sh = self.lock();
            let Some(fx) = sh.state.close() else {
                return;
            };
            self.apply(&mut sh, fx);
        }
        self.writers.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writers.wait()).await;
        self.cancel.cancel();
        self.bump_epoch();
        tracing::info!(node = %self.name, "left the cluster");
    }

    pub(super) fn members(&self) -> Vec<Member> {
        self.lock().state.members(self.me.addr.clone())
    }

    pub(super) fn contested(&self, id: &str, token: u64) -> bool {
        let failure_timeout = self.settings.failure_timeout;
        self.lock()
            .state
            .contested(id, token, tokio::time::Instant::now(), failure_timeout)
    }

    pub(super) fn holder(&self, id: &str) -> Option<Holder> {
        self.lock().state.holder(id)
    }

    pub(super) fn holders(&self) -> Vec<HeldId> {
        self.lock().state.holders()
    }
}

/// What a claim that waited on the arbiter gets: the claim, or `Err` to ask
/// again.
type WaitedClaim = std::result::Result<Claim, ()>;
