//! One node of the embedded cluster: its connections to the other members,
//! its view of who holds what, and the [`Session`] the runtime drives.
//!
//! Everything a node knows lives in one [`State`] behind a mutex. Frames
//! from peers and calls from guardians change it synchronously and queue
//! frames for peers on per-connection channels; a writer task per
//! connection drains its channel in batches (so 10,000 claims become a few
//! large writes) and sends a heartbeat when it has been idle, and a reader
//! task per connection decodes frames and declares the peer unreachable
//! when nothing arrived for the failure timeout.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::seal;
use super::transcript::{Role, Transcript};
use super::wire::{
    Handshake, Hold, MAX_FRAME, MAX_HANDSHAKE_FRAME, MemberInfo, Msg, NONCE_LEN, PROTOCOL_VERSION,
    RejectReason, SYNC_CHUNK, valid_addr, valid_name,
};
use super::{MIN_PUBLIC_COOKIE, Settings};
use crate::backend::{
    Claim, ClaimRequest, HeldId, Holder, Lease, LeaseEnd, LeaseSignal, Member, Session,
};
use crate::service::BoxFuture;
use crate::{Error, Result};

/// Unreachable members that are not seeds are forgotten after this long.
const FORGET_AFTER: Duration = Duration::from_secs(300);
/// Seed names are resolved again this often (and after a failed dial), so
/// addresses that join a name (a new pod behind a headless Service) are
/// dialed and vanished ones stop being seeds.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// After a failed dial to a seed, its names are resolved again this soon.
const RESOLVE_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// A peer that refused our cookie is redialed this rarely; so is an address
/// that sent any other refusal before authenticating (a hint, never final).
const REFUSED_REDIAL: Duration = Duration::from_secs(2);
/// Handshakes not yet authenticated, at most, per node and per source
/// address: beyond them a new connection is closed at once, so strangers
/// cannot use up the process's file descriptors or lock members out.
const MAX_HANDSHAKES: usize = 128;
const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// A warning about a stranger is written at most this often per kind and
/// source address.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// At most this many (kind, source) pairs are remembered for rate limiting;
/// beyond them, one warning per kind per [`WARN_EVERY`] covers all others.
const WARN_KEYS: usize = 1024;
/// Writes are batched up to about this many bytes.
const BATCH_BYTES: usize = 256 << 10;

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    if getrandom::fill(&mut nonce).is_err() {
        // No OS randomness: fall back to time and address entropy, which
        // still never repeats within one process.
        let seed = unix_nanos() ^ (&nonce as *const _ as u64);
        for (i, b) in nonce.iter_mut().enumerate() {
            *b = (seed.rotate_left(i as u32 * 7) >> (i % 8)) as u8;
        }
    }
    nonce
}

/// FNV-1a: a stable hash of the node name for the low bits of tokens.
fn name_slot(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & TOKEN_SLOT_MASK
}

/// Fencing tokens are `counter << 10 | slot`: the low 10 bits come from the
/// node name so two sides of a split never hand out equal tokens (barring a
/// hash collision), the counter is one more than the highest seen for the
/// id and at least the wall clock in milliseconds.
const TOKEN_SLOT_BITS: u32 = 10;
const TOKEN_SLOT_MASK: u64 = (1 << TOKEN_SLOT_BITS) - 1;

/// A running node.
pub(super) struct Node {
    weak: std::sync::Weak<Node>,
    name: Arc<str>,
    me: MemberInfo,
    key: Vec<u8>,
    settings: Arc<Settings>,
    listen_port: u16,
    local_ip: Option<IpAddr>,
    slot: u64,
    state: Mutex<State>,
    /// Bumped on every membership change; every waiting guardian watches it.
    epoch: watch::Sender<u64>,
    /// Wakes the dialer at once (a member was learned).
    kick: Notify,
    /// Wakes the seed resolver at once (a dial to a seed failed).
    resolve_now: Notify,
    cancel: CancellationToken,
    writers: TaskTracker,
    next_conn: AtomicU64,
}

#[derive(Default)]
struct State {
    members: HashMap<Arc<str>, Peer>,
    seeds: Vec<Seed>,
    dialing: HashSet<String>,
    retry_after: HashMap<String, Instant>,
    own: HashMap<Arc<str>, Own>,
    ids: HashMap<Arc<str>, IdView>,
    pending: HashMap<Arc<str>, Pending>,
    /// Incarnations that said goodbye: never taken back as members.
    left: HashSet<(Arc<str>, u64)>,
    /// Claim requests received while this node was still joining.
    deferred: Vec<(Arc<str>, Arc<str>)>,
    ready: bool,
    closed: bool,
    /// When a warning of a kind about a source was last written.
    warned: HashMap<(&'static str, String), Instant>,
    /// Nonces of this node's dials in flight, with the address dialed: a
    /// `Hello` carrying one reached this node itself (known here, never
    /// taken from the wire).
    dial_nonces: HashMap<[u8; NONCE_LEN], SocketAddr>,
    /// Addresses found to reach this node itself.
    self_addrs: HashSet<SocketAddr>,
    /// Handshakes in progress, per source address and in all.
    handshakes: HashMap<IpAddr, usize>,
    handshakes_total: usize,
}

struct Seed {
    addr: String,
    name: Option<Arc<str>>,
    is_self: bool,
}

struct Peer {
    incarnation: u64,
    addr: Option<String>,
    link: Link,
    ready: bool,
    holdings: HashSet<Arc<str>>,
    down_since: Instant,
}

enum Link {
    Down,
    Up(Conn),
    /// The peer closed our connection because a better one exists; the
    /// replacement is expected within the failure timeout.
    Switching {
        conn: u64,
    },
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Bytes>,
    lower_dialed: bool,
    synced: bool,
    stop: CancellationToken,
    /// Holdings from `SyncPart` frames, completed by the next `Sync`.
    partial: Vec<Hold>,
}

impl Peer {
    fn synced(&self) -> bool {
        matches!(&self.link, Link::Up(c) if c.synced)
    }
    fn reachable(&self) -> bool {
        self.synced() || matches!(self.link, Link::Switching { .. })
    }
    fn is_down(&self) -> bool {
        matches!(self.link, Link::Down)
    }
}

struct Own {
    token: u64,
    since: u64,
    signal: LeaseSignal,
}

#[derive(Default)]
struct IdView {
    holders: Vec<RemoteHold>,
    /// As arbiter: granted to this node, not yet announced by it.
    reservation: Option<Arc<str>>,
    /// As arbiter: nodes denied the id, told with `Free` when it frees.
    waiters: HashSet<Arc<str>>,
    max_token: u64,
    wake: Option<watch::Sender<u64>>,
}

struct RemoteHold {
    node: Arc<str>,
    token: u64,
    since: u64,
    /// Learned from a conflict's loser (`Ceded`), not from the holder: it
    /// counts until the holder's own word replaces it, or for at most the
    /// failure timeout.
    relayed: bool,
}

struct Pending {
    arbiter: Arc<str>,
    tx: oneshot::Sender<Reply>,
}

enum Reply {
    Granted(Lease),
    Denied {
        holder: Option<Holder>,
        wake: BoxFuture<'static, ()>,
    },
    Retry,
}

/// The outcome of one dial.
enum Dialed {
    Connected(Arc<str>),
    Rejected(RejectReason),
    /// Every address the target resolves to reaches this node itself.
    OnlySelf,
    Failed,
}

/// The key of this node's MACs: the cookie, checked.
fn cluster_key(settings: &Settings, listen: SocketAddr) -> Result<Vec<u8>> {
    let (cookie, source) = match &settings.cookie {
        Some(cookie) => (Some(cookie.0.clone()), "Cluster::cookie"),
        None => (std::env::var("HIGHLANDER_COOKIE").ok(), "HIGHLANDER_COOKIE"),
    };
    let good = "Use a long random secret, the same on every node, e.g. \
                `head -c 32 /dev/urandom | base64`";
    match cookie {
        Some(c) if c.is_empty() => Err(Error::Config(format!(
            "the cluster cookie ({source}) is empty: anyone could compute its proofs. {good}"
        ))),
        Some(c) if c.len() < MIN_PUBLIC_COOKIE && !listen.ip().is_loopback() => {
            Err(Error::Config(format!(
                "the cluster cookie ({source}) is too short to listen on {listen}, which other \
                 hosts can reach: use at least {MIN_PUBLIC_COOKIE} bytes. {good}"
            )))
        }
        Some(c) => Ok(c.into_bytes()),
        None if !listen.ip().is_loopback() => Err(Error::Config(format!(
            "refusing to listen on {listen} without a cluster cookie: anyone who can reach \
             that address could join the cluster and stop or start your singletons. Set \
             HIGHLANDER_COOKIE (or Cluster::cookie) to the same long random secret on every \
             node (e.g. `head -c 32 /dev/urandom | base64`), or listen on a loopback address \
             such as 127.0.0.1"
        ))),
        None => {
            info!(%listen, "no HIGHLANDER_COOKIE set: the cluster listens on loopback only, with a built-in key");
            Ok(b"highlander-loopback-default-cookie".to_vec())
        }
    }
}

/// How long a handshake may take, on either side.
fn handshake_timeout(settings: &Settings) -> Duration {
    settings
        .failure_timeout
        .clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// Starts a node: binds the listener, dials the seeds, and returns once it
/// has joined (every seed and every member learned from them connected and
/// synced) or the join timeout has passed.
pub(super) async fn start(settings: Arc<Settings>, name: &str) -> Result<Arc<Node>> {
    let listen = resolve(&settings.listen).await?;
    let key = cluster_key(&settings, listen)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Config(format!("cluster backend cannot listen on {listen}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Backend(format!("cluster listener: {e}")))?;
    *settings.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
    let advertise = match &settings.advertise {
        Some(a) => Some(a.clone()),
        None if !bound.ip().is_unspecified() => Some(bound.to_string()),
        None => None,
    };
    let local_ip = (!bound.ip().is_unspecified()).then(|| bound.ip());
    let name: Arc<str> = Arc::from(name);
    let me = MemberInfo {
        name: name.clone(),
        incarnation: unix_nanos(),
        addr: advertise,
    };
    let seeds = seed_addresses(&settings.seeds)
        .await
        .into_iter()
        .map(|addr| Seed {
            addr,
            name: None,
            is_self: false,
        })
        .collect();
    let node = Arc::new_cyclic(|weak| Node {
        weak: weak.clone(),
        slot: name_slot(&name),
        name,
        me,
        key,
        listen_port: bound.port(),
        local_ip,
        state: Mutex::new(State {
            seeds,
            ..State::default()
        }),
        epoch: watch::Sender::new(0),
        kick: Notify::new(),
        resolve_now: Notify::new(),
        cancel: CancellationToken::new(),
        writers: TaskTracker::new(),
        next_conn: AtomicU64::new(1),
        settings,
    });
    info!(node = %node.name, %bound, advertise = node.me.addr.as_deref().unwrap_or("(peer-seen address)"), "cluster node listening");
    tokio::spawn(node.clone().accept_loop(listener));
    tokio::spawn(node.clone().dial_loop());
    if settings_have_names(&node.settings.seeds) {
        tokio::spawn(node.clone().resolve_loop());
    }

    let deadline = Instant::now() + node.settings.join_timeout;
    let mut epoch = node.epoch.subscribe();
    loop {
        if node.lock().joined() {
            break;
        }
        tokio::select! {
            _ = epoch.changed() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    {
        let mut st = node.lock();
        st.ready = true;
        let up = st.members.iter().filter(|(_, p)| p.synced()).count();
        if up == 0 && st.seeds.iter().all(|s| s.is_self) {
            info!(
                node = %node.name,
                "no other member in view (every seed address is this node's own): running alone"
            );
        } else {
            info!(node = %node.name, members_up = up, "joined the cluster");
        }
        node.broadcast(&st, Msg::Ready.encode());
        for (peer, id) in std::mem::take(&mut st.deferred) {
            if st.members.get(&peer).is_some_and(Peer::synced) {
                node.on_claim_req(&mut st, &peer, id);
            }
        }
    }
    node.bump_epoch();
    Ok(node)
}

/// Every address the configured seeds stand for: an `ip:port` as it is, a
/// `name:port` as every address the name resolves to now (a Kubernetes
/// headless Service, a Compose service name, Consul DNS), or the name
/// itself when it resolves to nothing yet (dialing it resolves it again).
async fn seed_addresses(configured: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for seed in configured.iter().filter(|s| !s.is_empty()) {
        let resolved: Vec<String> = if seed.parse::<SocketAddr>().is_ok() {
            vec![seed.clone()]
        } else {
            match tokio::net::lookup_host(seed.as_str()).await {
                Ok(addrs) => addrs.map(|a| a.to_string()).collect(),
                Err(e) => {
                    debug!(seed = %seed, error = %e, "seed name does not resolve now");
                    Vec::new()
                }
            }
        };
        let resolved = if resolved.is_empty() {
            vec![seed.clone()]
        } else {
            resolved
        };
        for addr in resolved {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

/// Whether any seed is a name (so worth resolving again).
fn settings_have_names(configured: &[String]) -> bool {
    configured
        .iter()
        .any(|s| !s.is_empty() && s.parse::<SocketAddr>().is_err())
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(addr).await.map_err(|e| {
        Error::Config(format!(
            "cluster listen address `{addr}` cannot be resolved: {e}; use host:port"
        ))
    })?;
    addrs.next().ok_or_else(|| {
        Error::Config(format!(
            "cluster listen address `{addr}` resolves to nothing"
        ))
    })
}

impl State {
    fn joined(&self) -> bool {
        let member_synced = |n: &Arc<str>| self.members.get(n).is_some_and(Peer::synced);
        let addr_synced = |a: &str| {
            self.members
                .values()
                .any(|p| p.synced() && p.addr.as_deref() == Some(a))
        };
        self.seeds.iter().all(|s| {
            s.is_self || s.name.as_ref().is_some_and(member_synced) || addr_synced(&s.addr)
        }) && self.members.values().all(Peer::synced)
    }

    fn tx(&self, peer: &str) -> Option<&mpsc::UnboundedSender<Bytes>> {
        match &self.members.get(peer)?.link {
            Link::Up(c) => Some(&c.tx),
            _ => None,
        }
    }

    fn reachable(&self, peer: &str) -> bool {
        self.members.get(peer).is_some_and(Peer::reachable)
    }
}

impl Node {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump_epoch(&self) {
        self.epoch.send_modify(|e| *e = e.wrapping_add(1));
    }

    fn cut(&self, peer: &str) -> bool {
        self.settings
            .faults
            .as_ref()
            .is_some_and(|f| f.is_cut(&self.name, peer))
    }

    fn send(&self, st: &State, peer: &str, frame: Bytes) {
        if let Some(tx) = st.tx(peer) {
            let _ = tx.send(frame);
        }
    }

    fn broadcast(&self, st: &State, frame: Bytes) {
        for peer in st.members.values() {
            if let Link::Up(c) = &peer.link {
                let _ = c.tx.send(frame.clone());
            }
        }
    }

    // ---- the registry -------------------------------------------------

    /// The node that settles claims: the lowest-named member this node is
    /// connected to, itself included. A member still joining holds the
    /// requests it gets until it has joined (and so sees every holder).
    fn arbiter(&self, st: &State) -> Arc<str> {
        let mut best = self.name.clone();
        for (name, peer) in &st.members {
            if peer.reachable() && **name < *best {
                best = name.clone();
            }
        }
        best
    }

    /// The holder of `id` among the members this node can see, by the heal
    /// rule: the earliest tenure, ties to the lower node name.
    fn visible_holder(&self, st: &State, id: &str) -> Option<Holder> {
        self.visible(st, id)
            .map(|(_, node, token)| Holder::new(node.to_string(), Some(token)))
    }

    /// The holder this node names for `id` (the earliest tenure it knows,
    /// ties to the lower name): `(since, node, token)`.
    fn visible(&self, st: &State, id: &str) -> Option<(u64, Arc<str>, u64)> {
        let own = st
            .own
            .get(id)
            .map(|o| (o.since, self.name.clone(), o.token));
        let remote = st
            .ids
            .get(id)
            .into_iter()
            .flat_map(|v| v.holders.iter())
            .map(|h| (h.since, h.node.clone(), h.token));
        own.into_iter()
            .chain(remote)
            .min_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
    }

    fn waker(&self, st: &mut State, id: &Arc<str>) -> BoxFuture<'static, ()> {
        let view = st.ids.entry(id.clone()).or_default();
        let mut id_rx = view
            .wake
            .get_or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        let mut epoch_rx = self.epoch.subscribe();
        Box::pin(async move {
            tokio::select! {
                _ = id_rx.changed() => {}
                _ = epoch_rx.changed() => {}
            }
        })
    }

    /// Something about `id` changed: wake this node's waiter, and if the id
    /// is now free, tell the nodes this node denied it to as arbiter.
    fn touch(&self, st: &mut State, id: &Arc<str>) {
        let free = !st.own.contains_key(id);
        let Some(view) = st.ids.get_mut(id) else {
            return;
        };
        if let Some(wake) = &view.wake {
            wake.send_modify(|v| *v = v.wrapping_add(1));
        }
        if free && view.holders.is_empty() && view.reservation.is_none() && !view.waiters.is_empty()
        {
            let waiters: Vec<Arc<str>> = view.waiters.drain().collect();
            let frame = Msg::Free { id: id.clone() }.encode();
            for w in waiters {
                self.send(st, &w, frame.clone());
            }
        }
    }

    fn next_token(&self, st: &mut State, id: &Arc<str>, floor: u64) -> u64 {
        let view = st.ids.entry(id.clone()).or_default();
        let seen = view.max_token.max(floor);
        let now_ms = unix_nanos() / 1_000_000;
        let counter = ((seen >> TOKEN_SLOT_BITS) + 1).max(now_ms);
        let token = (counter << TOKEN_SLOT_BITS) | self.slot;
        view.max_token = token;
        token
    }

    /// Starts a tenure here and tells every member.
    fn take(&self, st: &mut State, id: &Arc<str>, floor: u64) -> Lease {
        let token = self.next_token(st, id, floor);
        let since = unix_nanos();
        let (lease, signal) = Lease::new(token);
        st.own.insert(
            id.clone(),
            Own {
                token,
                since,
                signal,
            },
        );
        self.broadcast(
            st,
            Msg::Held(Hold {
                id: id.clone(),
                token,
                since,
            })
            .encode(),
        );
        self.touch(st, id);
        lease
    }

    /// Ends this node's tenure of `id` and tells every member.
    fn drop_own(&self, st: &mut State, id: &Arc<str>, end: Option<LeaseEnd>) {
        if let Some(own) = st.own.remove(id) {
            if let Some(end) = end {
                own.signal.end(end);
            }
            self.broadcast(
                st,
                Msg::Released {
                    id: id.clone(),
                    token: own.token,
                }
                .encode(),
            );
            self.touch(st, id);
        }
    }

    /// Ends this node's tenure of `id` because `winner`'s older tenure
    /// keeps it, and tells every member who holds it now.
    fn cede(&self, st: &mut State, id: &Arc<str>, winner: &Arc<str>, token: u64, since: u64) {
        if let Some(own) = st.own.remove(id) {
            own.signal.end(LeaseEnd::Conflict {
                winner: Some(winner.to_string()),
            });
            self.broadcast(
                st,
                Msg::Ceded {
                    id: id.clone(),
                    token: own.token,
                    winner: winner.clone(),
                    winner_token: token,
                    winner_since: since,
                }
                .encode(),
            );
            self.touch(st, id);
        }
    }

    fn try_claim_now(
        self: &Arc<Self>,
        id: &Arc<str>,
    ) -> Result<std::result::Result<Claim, oneshot::Receiver<Reply>>> {
        let mut st = self.lock();
        if st.closed {
            return Err(Error::Backend(format!(
                "cluster node `{}` has left the cluster",
                self.name
            )));
        }
        if let Some(own) = st.own.get(id) {
            return Ok(Ok(Claim::Granted(Lease {
                token: own.token,
                signal: own.signal.clone(),
            })));
        }
        if let Some(holder) = self.visible_holder(&st, id) {
            let wake = self.waker(&mut st, id);
            return Ok(Ok(Claim::Busy {
                holder: Some(holder),
                wake,
            }));
        }
        let reserved = st.ids.get(id).and_then(|v| v.reservation.clone());
        if let Some(r) = reserved.filter(|r| st.reachable(r)) {
            let wake = self.waker(&mut st, id);
            return Ok(Ok(Claim::Busy {
                holder: Some(Holder {
                    node: r.to_string(),
                    token: None,
                }),
                wake,
            }));
        }
        let arbiter = self.arbiter(&st);
        if arbiter == self.name {
            return Ok(Ok(Claim::Granted(self.take(&mut st, id, 0))));
        }
        let (tx, rx) = oneshot::channel();
        self.send(&st, &arbiter, Msg::ClaimReq { id: id.clone() }.encode());
        st.pending.insert(id.clone(), Pending { arbiter, tx });
        Ok(Err(rx))
    }

    async fn claim(self: Arc<Self>, id: Arc<str>) -> Result<Claim> {
        loop {
            let rx = match self.try_claim_now(&id)? {
                Ok(claim) => return Ok(claim),
                Err(rx) => rx,
            };
            match rx.await {
                Ok(Reply::Granted(lease)) => return Ok(Claim::Granted(lease)),
                Ok(Reply::Denied { holder, wake }) => return Ok(Claim::Busy { holder, wake }),
                // The arbiter went away, or a newer request replaced this
                // one: ask again (the state has changed, so this is no loop).
                Ok(Reply::Retry) | Err(_) => continue,
            }
        }
    }

    fn release(&self, id: &str, token: u64) {
        let mut st = self.lock();
        let Some((id, _)) = st.own.get_key_value(id).filter(|(_, o)| o.token == token) else {
            return;
        };
        let id = id.clone();
        self.drop_own(&mut st, &id, None);
    }

    /// A frame from `peer` on connection `conn`.
    fn on_frame(&self, peer: &Arc<str>, conn: u64, msg: Msg) {
        let mut st = self.lock();
        let current = st
            .members
            .get(peer)
            .is_some_and(|p| matches!(&p.link, Link::Up(c) if c.id == conn));
        if !current {
            return;
        }
        match msg {
            Msg::Ping => {}
            Msg::SyncPart { holdings } => {
                if let Some(Link::Up(c)) = st.members.get_mut(peer).map(|p| &mut p.link) {
                    c.partial.extend(holdings);
                }
            }
            Msg::Sync {
                ready,
                members,
                mut holdings,
            } => {
                if let Some(Link::Up(c)) = st.members.get_mut(peer).map(|p| &mut p.link)
                    && !c.partial.is_empty()
                {
                    let mut all = std::mem::take(&mut c.partial);
                    all.append(&mut holdings);
                    holdings = all;
                }
                self.on_sync(&mut st, peer, ready, members, holdings)
            }
            Msg::Ready => {
                if let Some(p) = st.members.get_mut(peer) {
                    p.ready = true;
                }
                self.bump_epoch();
            }
            Msg::MemberUp(m) => self.learn(&mut st, m),
            Msg::Held(hold) => self.on_held(&mut st, peer, hold),
            Msg::Released { id, token } => self.on_released(&mut st, peer, &id, token),
            Msg::Ceded {
                id,
                token,
                winner,
                winner_token,
                winner_since,
            } => {
                self.on_relayed_hold(&mut st, &id, winner, winner_token, winner_since);
                self.on_released(&mut st, peer, &id, token);
            }
            Msg::ClaimReq { id } => self.on_claim_req(&mut st, peer, id),
            Msg::Grant { id, floor } => self.on_grant(&mut st, peer, id, floor),
            Msg::Deny { id, holder } => {
                if st.pending.get(&id).is_some_and(|p| p.arbiter == *peer) {
                    let pending = st.pending.remove(&id).expect("checked above");
                    let wake = self.waker(&mut st, &id);
                    let holder = holder.map(|(node, token)| Holder {
                        node: node.to_string(),
                        token: (token != 0).then_some(token),
                    });
                    let _ = pending.tx.send(Reply::Denied { holder, wake });
                }
            }
            Msg::Abandon { id } => {
                if let Some(view) = st.ids.get_mut(&id)
                    && view.reservation.as_ref() == Some(peer)
                {
                    view.reservation = None;
                    self.touch(&mut st, &id);
                }
            }
            Msg::Free { id } => {
                if let Some(wake) = st.ids.get(&id).and_then(|v| v.wake.as_ref()) {
                    wake.send_modify(|v| *v = v.wrapping_add(1));
                }
            }
            Msg::Leave => {
                info!(node = %self.name, peer = %peer, "member left the cluster");
                self.member_down(&mut st, peer);
                if let Some(p) = st.members.remove(peer) {
                    st.left.insert((peer.clone(), p.incarnation));
                }
            }
            Msg::Superseded => {
                if let Some(p) = st.members.get_mut(peer) {
                    p.link = Link::Switching { conn };
                    let node_name = self.name.clone();
                    debug!(node = %node_name, peer = %peer, "connection superseded: expecting its replacement");
                }
                self.spawn_switch_timer(peer.clone(), conn);
            }
        }
    }

    fn on_released(&self, st: &mut State, peer: &Arc<str>, id: &Arc<str>, token: u64) {
        let mut changed = false;
        if let Some(view) = st.ids.get_mut(id) {
            let before = view.holders.len();
            view.holders
                .retain(|h| !(h.node == *peer && h.token == token));
            changed = view.holders.len() != before;
            if view.reservation.as_ref() == Some(peer) {
                view.reservation = None;
                changed = true;
            }
        }
        if let Some(p) = st.members.get_mut(peer) {
            p.holdings.remove(id);
        }
        if changed {
            self.touch(st, id);
        }
    }

    /// A conflict's loser says `winner` keeps `id`. The loser is connected
    /// to the winner; this node may not be yet (a heal reaches the nodes
    /// of a side one connection at a time). Without this, the loser's
    /// release would show the id free here, and this node would start a
    /// second tenure that the winner ends with another conflict a moment
    /// later. The relayed hold counts until the winner's own `Sync` or
    /// `Held` replaces it, or for the failure timeout: a winner this node
    /// still cannot reach by then is on the other side of a split.
    fn on_relayed_hold(
        &self,
        st: &mut State,
        id: &Arc<str>,
        winner: Arc<str>,
        token: u64,
        since: u64,
    ) {
        if winner == self.name {
            return;
        }
        let view = st.ids.entry(id.clone()).or_default();
        view.max_token = view.max_token.max(token);
        if view.holders.iter().any(|h| h.node == winner) {
            return;
        }
        view.holders.push(RemoteHold {
            node: winner.clone(),
            token,
            since,
            relayed: true,
        });
        if let Some(p) = st.members.get_mut(&winner) {
            p.holdings.insert(id.clone());
        }
        debug!(node = %self.name, id = %id, holder = %winner, "holder relayed by a conflict's loser");
        self.touch(st, id);
        let after = self.settings.failure_timeout;
        let Some(node) = self.weak.upgrade() else {
            return;
        };
        let id = id.clone();
        tokio::spawn(async move {
            sleep(after).await;
            let mut st = node.lock();
            let Some(view) = st.ids.get_mut(&id) else {
                return;
            };
            let before = view.holders.len();
            view.holders
                .retain(|h| !(h.relayed && h.node == winner && h.token == token));
            if view.holders.len() != before {
                if let Some(p) = st.members.get_mut(&winner) {
                    p.holdings.remove(&id);
                }
                node.touch(&mut st, &id);
            }
        });
    }

    fn spawn_switch_timer(&self, peer: Arc<str>, conn: u64) {
        let after = self.settings.failure_timeout;
        if let Some(node) = self.weak.upgrade() {
            tokio::spawn(async move {
                sleep(after).await;
                let mut st = node.lock();
                if st
                    .members
                    .get(&peer)
                    .is_some_and(|p| matches!(p.link, Link::Switching { conn: c } if c == conn))
                {
                    node.member_down(&mut st, &peer);
                }
            });
        }
    }

    fn on_sync(
        &self,
        st: &mut State,
        peer: &Arc<str>,
        ready: bool,
        members: Vec<MemberInfo>,
        holdings: Vec<Hold>,
    ) {
        let Some(p) = st.members.get_mut(peer) else {
            return;
        };
        let mut first = false;
        if let Link::Up(c) = &mut p.link {
            first = !c.synced;
            c.synced = true;
        }
        p.ready = ready;
        let incoming: HashSet<Arc<str>> = holdings.iter().map(|h| h.id.clone()).collect();
        let gone: Vec<Arc<str>> = p
            .holdings
            .iter()
            .filter(|id| !incoming.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.forget_hold(st, peer, &id);
        }
        for hold in holdings {
            self.on_held(st, peer, hold);
        }
        for m in members {
            self.learn(st, m);
        }
        if first {
            let info = st.members.get(peer).map(|p| MemberInfo {
                name: peer.clone(),
                incarnation: p.incarnation,
                addr: p.addr.clone(),
            });
            if let Some(info) = info {
                let frame = Msg::MemberUp(info).encode();
                for (name, other) in &st.members {
                    if name != peer
                        && let Link::Up(c) = &other.link
                    {
                        let _ = c.tx.send(frame.clone());
                    }
                }
            }
            info!(node = %self.name, peer = %peer, "member up");
        }
        self.bump_epoch();
    }

    fn forget_hold(&self, st: &mut State, peer: &Arc<str>, id: &Arc<str>) {
        if let Some(p) = st.members.get_mut(peer) {
            p.holdings.remove(id);
        }
        if let Some(view) = st.ids.get_mut(id) {
            view.holders.retain(|h| h.node != *peer);
        }
        self.touch(st, id);
    }

    fn on_held(&self, st: &mut State, peer: &Arc<str>, hold: Hold) {
        let Some(p) = st.members.get_mut(peer) else {
            return;
        };
        p.holdings.insert(hold.id.clone());
        let view = st.ids.entry(hold.id.clone()).or_default();
        match view.holders.iter_mut().find(|h| h.node == *peer) {
            Some(h) => {
                h.token = hold.token;
                h.since = hold.since;
                h.relayed = false;
            }
            None => view.holders.push(RemoteHold {
                node: peer.clone(),
                token: hold.token,
                since: hold.since,
                relayed: false,
            }),
        }
        view.max_token = view.max_token.max(hold.token);
        if view.reservation.as_ref() == Some(peer) {
            view.reservation = None;
        }
        if let Some(own) = st.own.get(&hold.id) {
            // Two tenures of one id can see each other: a healed split, or
            // two arbiters during a membership change. The earliest tenure
            // keeps the id, ties to the lower node name.
            if (hold.since, &**peer) < (own.since, &*self.name) {
                info!(
                    node = %self.name, id = %hold.id, winner = %peer,
                    "conflict: {peer} has held this id longer; stopping the instance here"
                );
                self.cede(st, &hold.id, peer, hold.token, hold.since);
            } else {
                debug!(node = %self.name, id = %hold.id, loser = %peer, "conflict: this node keeps the id");
            }
        }
        self.touch(st, &hold.id);
    }

    fn on_claim_req(&self, st: &mut State, peer: &Arc<str>, id: Arc<str>) {
        if !st.ready {
            st.deferred.push((peer.clone(), id));
            return;
        }
        let deny = if let Some(own) = st.own.get(&id) {
            Some(Some((self.name.clone(), own.token)))
        } else {
            let view = st.ids.entry(id.clone()).or_default();
            let holder = view
                .holders
                .iter()
                .filter(|h| h.node != *peer)
                .min_by(|a, b| (a.since, &a.node).cmp(&(b.since, &b.node)))
                .map(|h| (h.node.clone(), h.token));
            match holder {
                Some(h) => Some(Some(h)),
                None => match view.reservation.clone() {
                    Some(r) if r != *peer && st.members.get(&r).is_some_and(Peer::reachable) => {
                        Some(Some((r, 0)))
                    }
                    _ => None,
                },
            }
        };
        let view = st.ids.entry(id.clone()).or_default();
        let reply = match deny {
            Some(holder) => {
                view.waiters.insert(peer.clone());
                Msg::Deny { id, holder }
            }
            None => {
                view.reservation = Some(peer.clone());
                Msg::Grant {
                    floor: view.max_token,
                    id,
                }
            }
        };
        self.send(st, peer, reply.encode());
    }

    fn on_grant(&self, st: &mut State, peer: &Arc<str>, id: Arc<str>, floor: u64) {
        let mine = st.pending.get(&id).is_some_and(|p| p.arbiter == *peer);
        if !mine {
            if !st.own.contains_key(&id) {
                self.send(st, peer, Msg::Abandon { id }.encode());
            }
            return;
        }
        let pending = st.pending.remove(&id).expect("checked above");
        if let Some(holder) = self.visible_holder(st, &id) {
            // A holder announced itself while the request was in flight.
            self.send(st, peer, Msg::Abandon { id: id.clone() }.encode());
            let wake = self.waker(st, &id);
            let _ = pending.tx.send(Reply::Denied {
                holder: Some(holder),
                wake,
            });
            return;
        }
        let lease = self.take(st, &id, floor);
        let token = lease.token;
        if pending.tx.send(Reply::Granted(lease)).is_err() {
            // Nobody waits for it any more (the guardian stopped).
            if st.own.get(&id).is_some_and(|o| o.token == token) {
                self.drop_own(st, &id, None);
            }
        }
    }

    fn learn(&self, st: &mut State, m: MemberInfo) {
        if m.name == self.name
            || !valid_name(&m.name)
            || m.addr.as_deref().is_some_and(|a| !valid_addr(a))
            || st.left.contains(&(m.name.clone(), m.incarnation))
        {
            return;
        }
        match st.members.get_mut(&m.name) {
            Some(p) => {
                if m.incarnation > p.incarnation && p.is_down() {
                    p.incarnation = m.incarnation;
                    if m.addr.is_some() {
                        p.addr = m.addr;
                    }
                }
            }
            None => {
                debug!(node = %self.name, member = %m.name, "learned a member");
                st.members.insert(
                    m.name.clone(),
                    Peer {
                        incarnation: m.incarnation,
                        addr: m.addr,
                        link: Link::Down,
                        ready: false,
                        holdings: HashSet::new(),
                        down_since: Instant::now(),
                    },
                );
                self.kick.notify_one();
                self.bump_epoch();
            }
        }
    }

    /// `peer` can no longer be reached: its holds no longer count, its
    /// reservations lapse, requests to it are asked again elsewhere.
    fn member_down(&self, st: &mut State, peer: &Arc<str>) {
        let Some(p) = st.members.get_mut(peer) else {
            return;
        };
        if let Link::Up(c) = std::mem::replace(&mut p.link, Link::Down) {
            c.stop.cancel();
        }
        p.ready = false;
        p.down_since = Instant::now();
        let held: Vec<Arc<str>> = p.holdings.drain().collect();
        for id in &held {
            if let Some(view) = st.ids.get_mut(id) {
                view.holders.retain(|h| h.node != *peer);
            }
        }
        let reserved: Vec<Arc<str>> = st
            .ids
            .iter_mut()
            .filter(|(_, v)| v.reservation.as_ref() == Some(peer))
            .map(|(id, v)| {
                v.reservation = None;
                id.clone()
            })
            .collect();
        for id in held.iter().chain(reserved.iter()) {
            self.touch(st, id);
        }
        let asked: Vec<Arc<str>> = st
            .pending
            .iter()
            .filter(|(_, p)| p.arbiter == *peer)
            .map(|(id, _)| id.clone())
            .collect();
        for id in asked {
            if let Some(p) = st.pending.remove(&id) {
                let _ = p.tx.send(Reply::Retry);
            }
        }
        info!(node = %self.name, peer = %peer, released = held.len(), "member down");
        self.kick.notify_one();
        self.bump_epoch();
    }

    fn conn_closed(&self, peer: &Arc<str>, conn: u64) {
        let mut st = self.lock();
        let current = st
            .members
            .get(peer)
            .is_some_and(|p| matches!(&p.link, Link::Up(c) if c.id == conn));
        if current {
            self.member_down(&mut st, peer);
        }
    }

    /// Decides whether a freshly authenticated connection becomes the one
    /// to `info.name`. Between two nodes the connection dialed by the lower
    /// name is preferred, so two simultaneous dials end with one on both
    /// sides; any other new connection replaces the old one (its dialer saw
    /// the old one die).
    fn adopt(
        &self,
        info: &MemberInfo,
        dialed_by_me: bool,
        tx: mpsc::UnboundedSender<Bytes>,
        stop: CancellationToken,
    ) -> std::result::Result<u64, RejectReason> {
        let mut st = self.lock();
        if st.closed || st.left.contains(&(info.name.clone(), info.incarnation)) {
            return Err(RejectReason::Duplicate);
        }
        let lower_dialed = if dialed_by_me {
            self.name < info.name
        } else {
            info.name < self.name
        };
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            id,
            tx,
            lower_dialed,
            synced: false,
            stop,
            partial: Vec::new(),
        };
        let mut was_synced = false;
        match st.members.get(&info.name) {
            None => {}
            Some(p) if info.incarnation != p.incarnation => {
                if info.incarnation < p.incarnation && !p.is_down() {
                    return Err(RejectReason::NameTaken);
                }
                if !p.is_down() {
                    info!(node = %self.name, peer = %info.name, "member restarted: a new incarnation replaces the old one");
                }
                self.member_down(&mut st, &info.name);
            }
            Some(p) => match &p.link {
                Link::Down => {}
                Link::Switching { .. } => was_synced = true,
                Link::Up(old) => {
                    if old.lower_dialed && !lower_dialed {
                        return Err(RejectReason::Duplicate);
                    }
                    was_synced = old.synced;
                }
            },
        }
        let p = st.members.entry(info.name.clone()).or_insert_with(|| Peer {
            incarnation: info.incarnation,
            addr: None,
            link: Link::Down,
            ready: false,
            holdings: HashSet::new(),
            down_since: Instant::now(),
        });
        p.incarnation = info.incarnation;
        if info.addr.is_some() {
            p.addr = info.addr.clone();
        }
        let mut conn = conn;
        conn.synced = was_synced;
        if let Link::Up(old) = std::mem::replace(&mut p.link, Link::Up(conn)) {
            // The old writer sends this, then closes its half.
            let _ = old.tx.send(Msg::Superseded.encode());
        }
        // Our whole state first, then whatever follows. Holdings beyond one
        // chunk go ahead in `SyncPart` frames: a frame stays far below the
        // frame limit however many ids this node holds.
        let mut holdings: Vec<Hold> = st
            .own
            .iter()
            .map(|(id, o)| Hold {
                id: id.clone(),
                token: o.token,
                since: o.since,
            })
            .collect();
        let mut size = 0;
        let mut part = Vec::new();
        for hold in holdings.drain(..) {
            size += hold.encoded_len();
            part.push(hold);
            if size >= SYNC_CHUNK {
                let frame = Msg::SyncPart {
                    holdings: std::mem::take(&mut part),
                }
                .encode();
                self.send(&st, &info.name, frame);
                size = 0;
            }
        }
        let sync = Msg::Sync {
            ready: st.ready,
            members: st
                .members
                .iter()
                .filter(|(n, p)| **n != info.name && p.synced())
                .map(|(n, p)| MemberInfo {
                    name: n.clone(),
                    incarnation: p.incarnation,
                    addr: p.addr.clone(),
                })
                .collect(),
            holdings: part,
        };
        self.send(&st, &info.name, sync.encode());
        let resend: Vec<Arc<str>> = st
            .pending
            .iter()
            .filter(|(_, p)| p.arbiter == info.name)
            .map(|(id, _)| id.clone())
            .collect();
        for id in resend {
            self.send(&st, &info.name, Msg::ClaimReq { id }.encode());
        }
        drop(st);
        self.bump_epoch();
        Ok(id)
    }
}

// ---- transport ------------------------------------------------------------

fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(max)
        .new_codec()
}

type Reader = FramedRead<OwnedReadHalf, LengthDelimitedCodec>;

/// An authenticated connection: its two halves and its frame seals.
struct Wire {
    rd: Reader,
    wr: OwnedWriteHalf,
    sealed: (seal::Sealer, seal::Opener),
}

/// A handshake the acceptor has verified.
struct Accepted {
    rd: Reader,
    wr: OwnedWriteHalf,
    version: u8,
    dialer: MemberInfo,
    dialer_port: u16,
    dialer_nonce: [u8; NONCE_LEN],
    nonce: [u8; NONCE_LEN],
}

/// A handshake slot of [`Node::handshake_slot`], given back on drop.
struct HandshakeSlot {
    node: Arc<Node>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut st = self.node.lock();
        st.handshakes_total = st.handshakes_total.saturating_sub(1);
        if let Some(n) = st.handshakes.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.handshakes.remove(&self.ip);
            }
        }
    }
}

/// The nonce of a dial in flight, registered so that this node's acceptor
/// can tell a dial of itself; unregistered on drop.
struct DialNonce<'a> {
    node: &'a Node,
    nonce: [u8; NONCE_LEN],
}

impl<'a> DialNonce<'a> {
    fn register(node: &'a Node, nonce: [u8; NONCE_LEN], target: SocketAddr) -> Self {
        node.lock().dial_nonces.insert(nonce, target);
        DialNonce { node, nonce }
    }
}

impl Drop for DialNonce<'_> {
    fn drop(&mut self) {
        self.node.lock().dial_nonces.remove(&self.nonce);
    }
}

async fn read_handshake(rd: &mut Reader) -> Option<Handshake> {
    match rd.next().await {
        Some(Ok(frame)) => Handshake::decode(&frame).ok(),
        _ => None,
    }
}

impl Node {
    /// Whether a warning of `kind` about `source` may be written now: at
    /// most one per kind and source per [`WARN_EVERY`]. Sources are
    /// addresses (never ports or names a peer chose), and the table is
    /// bounded: past [`WARN_KEYS`] live entries, one warning per kind per
    /// interval stands for every other source.
    fn may_warn(&self, kind: &'static str, source: &str) -> bool {
        let mut st = self.lock();
        let now = Instant::now();
        if st.warned.len() >= WARN_KEYS {
            st.warned
                .retain(|_, at| now.duration_since(*at) < WARN_EVERY);
        }
        let key = if st.warned.len() >= WARN_KEYS {
            (kind, String::from("*"))
        } else {
            (kind, source.to_string())
        };
        match st.warned.get(&key) {
            Some(at) if now.duration_since(*at) < WARN_EVERY => false,
            _ => {
                st.warned.insert(key, now);
                true
            }
        }
    }

    /// Takes a handshake slot for a connection from `ip`, or `None` when
    /// this node or that source already has its fill of handshakes.
    fn handshake_slot(self: &Arc<Self>, ip: IpAddr) -> Option<HandshakeSlot> {
        let mut st = self.lock();
        let from_ip = st.handshakes.get(&ip).copied().unwrap_or(0);
        if st.handshakes_total >= MAX_HANDSHAKES || from_ip >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        st.handshakes_total += 1;
        *st.handshakes.entry(ip).or_default() += 1;
        Some(HandshakeSlot {
            node: self.clone(),
            ip,
        })
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, remote)) => {
                    let Some(slot) = self.handshake_slot(remote.ip()) else {
                        // Closed at once: its file descriptor is free again.
                        drop(stream);
                        if self.may_warn("handshakes", &remote.ip().to_string()) {
                            warn!(
                                node = %self.name, remote = %remote.ip(),
                                "too many connections still in their handshake (at most \
                                 {MAX_HANDSHAKES_PER_SOURCE} per address, {MAX_HANDSHAKES} in all): \
                                 closing new ones (logged at most once a minute per address)"
                            );
                        }
                        continue;
                    };
                    tokio::spawn(self.clone().accept(stream, remote, slot));
                }
                Err(e) => {
                    if self.may_warn("accept", "") {
                        warn!(node = %self.name, error = %e, "cannot accept connections (logged at most once a minute)");
                    }
                    sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Serves one incoming connection: the handshake within the handshake
    /// timeout and `slot`, then (authenticated) the connection itself.
    async fn accept(self: Arc<Self>, stream: TcpStream, remote: SocketAddr, slot: HandshakeSlot) {
        let limit = handshake_timeout(&self.settings);
        let Ok(Some(hs)) = timeout(limit, self.handshake(stream, remote)).await else {
            return;
        };
        drop(slot);
        let Accepted {
            rd,
            mut wr,
            version,
            dialer,
            dialer_port,
            dialer_nonce,
            nonce,
        } = hs;
        let transcript = Transcript {
            version,
            dialer: &dialer,
            dialer_port,
            dialer_nonce: &dialer_nonce,
            acceptor: &self.me,
            acceptor_port: self.listen_port,
            acceptor_nonce: &nonce,
        };
        let addr = dialer
            .addr
            .clone()
            .or_else(|| Some(SocketAddr::new(remote.ip(), dialer_port).to_string()));
        let info = MemberInfo {
            addr,
            ..dialer.clone()
        };
        let sealed = seal::channel(&self.key, Role::Acceptor, &transcript);
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        // Not under the handshake timeout: a node holding many ids takes a
        // while to queue its first `Sync`, and cutting that short would
        // leave the connection adopted but never served.
        let conn = match self.adopt(&info, false, tx, stop.clone()) {
            Ok(conn) => conn,
            Err(reason) => {
                let reject = Handshake::Reject { reason }.encode();
                let _ = timeout(limit, wr.write_all(&reject)).await;
                return;
            }
        };
        let mac = transcript.proof(&self.key, Role::Acceptor);
        let welcome = Handshake::Welcome { mac }.encode();
        if !matches!(timeout(limit, wr.write_all(&welcome)).await, Ok(Ok(()))) {
            self.conn_closed(&info.name, conn);
            return;
        }
        let wire = Wire { rd, wr, sealed };
        self.spawn_conn(info.name, conn, wire, rx, stop);
    }

    /// The acceptor's side of a handshake, up to the dialer's verified
    /// proof; `None` when it was refused or broke off.
    async fn handshake(&self, stream: TcpStream, remote: SocketAddr) -> Option<Accepted> {
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let mut rd = FramedRead::new(rd, codec(MAX_HANDSHAKE_FRAME));
        let Some(Handshake::Hello {
            version,
            me: dialer,
            listen_port,
            nonce: dialer_nonce,
        }) = read_handshake(&mut rd).await
        else {
            return None;
        };
        let source = remote.ip().to_string();
        let reject = |reason| Handshake::Reject { reason }.encode();
        if version != PROTOCOL_VERSION {
            if self.may_warn("version", &source) {
                warn!(node = %self.name, remote = %remote.ip(), version, "refused a peer speaking another protocol version (logged at most once a minute per address)");
            }
            let _ = wr.write_all(&reject(RejectReason::Version)).await;
            return None;
        }
        if !valid_name(&dialer.name) || dialer.addr.as_deref().is_some_and(|a| !valid_addr(a)) {
            // Its name is not shown: it could forge log lines.
            if self.may_warn("invalid", &source) {
                warn!(node = %self.name, remote = %remote.ip(), "refused a connection whose node name or address is not visible ASCII (logged at most once a minute per address)");
            }
            return None;
        }
        if dialer.name == self.name {
            let reason = if dialer.incarnation == self.me.incarnation {
                // A dial of this very node: when the nonce is one of its own
                // dials, the address it dialed is its own (known here, not
                // taken from the wire).
                let mut st = self.lock();
                if let Some(target) = st.dial_nonces.get(&dialer_nonce).copied() {
                    st.self_addrs.insert(target);
                }
                RejectReason::SelfDial
            } else {
                if self.may_warn("name", &source) {
                    warn!(node = %self.name, remote = %remote.ip(), "refused a peer that uses this node's own name: give every node its own name (logged at most once a minute per address)");
                }
                RejectReason::NameTaken
            };
            let _ = wr.write_all(&reject(reason)).await;
            return None;
        }
        if self.cut(&dialer.name) {
            return None;
        }
        let nonce = random_nonce();
        let challenge = Handshake::Challenge {
            me: self.me.clone(),
            listen_port: self.listen_port,
            nonce,
        };
        if wr.write_all(&challenge.encode()).await.is_err() {
            return None;
        }
        let Some(Handshake::Response { mac }) = read_handshake(&mut rd).await else {
            return None;
        };
        let transcript = Transcript {
            version,
            dialer: &dialer,
            dialer_port: listen_port,
            dialer_nonce: &dialer_nonce,
            acceptor: &self.me,
            acceptor_port: self.listen_port,
            acceptor_nonce: &nonce,
        };
        if !transcript.verify(&self.key, Role::Dialer, &mac) {
            if self.may_warn("cookie", &source) {
                warn!(
                    node = %self.name, peer = %dialer.name, remote = %remote.ip(),
                    "refused a connection: the peer's cluster cookie differs from ours, or the handshake \
                     was altered on the way (logged at most once a minute per address)"
                );
            }
            let _ = wr.write_all(&reject(RejectReason::BadCookie)).await;
            return None;
        }
        Some(Accepted {
            rd,
            wr,
            version,
            dialer,
            dialer_port: listen_port,
            dialer_nonce,
            nonce,
        })
    }

    async fn dial_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = sleep(self.settings.redial) => {}
                _ = self.kick.notified() => {}
            }
            let targets = self.dial_targets();
            for addr in targets {
                let node = self.clone();
                tokio::spawn(async move {
                    let limit = handshake_timeout(&node.settings);
                    let outcome = timeout(limit, node.clone().dial(addr.clone()))
                        .await
                        .unwrap_or(Dialed::Failed);
                    node.dialed(&addr, outcome);
                });
            }
        }
    }

    /// Resolves the seed names again every [`RESOLVE_EVERY`] and after a
    /// failed dial: a new address becomes a seed and is dialed at once; a
    /// vanished one stops being a seed (its member, if any, is forgotten
    /// once its connection is gone, as any member that is not a seed).
    async fn resolve_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = sleep(RESOLVE_EVERY) => {}
                _ = self.resolve_now.notified() => {
                    // Many failed dials resolve once, and a dead seed
                    // redialed every 100 ms asks DNS at most once a second.
                    sleep(self.settings.redial.max(RESOLVE_AFTER_FAILURE)).await;
                }
            }
            let now = seed_addresses(&self.settings.seeds).await;
            let mut st = self.lock();
            let before = st.seeds.len();
            st.seeds.retain(|s| now.contains(&s.addr));
            let vanished = before - st.seeds.len();
            let mut added = 0;
            for addr in now {
                if !st.seeds.iter().any(|s| s.addr == addr) {
                    st.seeds.push(Seed {
                        addr,
                        name: None,
                        is_self: false,
                    });
                    added += 1;
                }
            }
            drop(st);
            if added + vanished > 0 {
                info!(node = %self.name, added, vanished, "seed names resolved to other addresses");
                self.kick.notify_one();
            }
        }
    }

    fn dial_targets(&self) -> Vec<String> {
        let mut st = self.lock();
        if st.closed {
            return Vec::new();
        }
        let now = Instant::now();
        let seeds: HashSet<String> = st.seeds.iter().map(|s| s.addr.clone()).collect();
        st.members.retain(|_, p| {
            !(p.is_down()
                && p.down_since + FORGET_AFTER < now
                && p.addr.as_ref().is_none_or(|a| !seeds.contains(a)))
        });
        let mut targets = Vec::new();
        let busy_addr = |st: &State, addr: &str| {
            st.dialing.contains(addr)
                || st.retry_after.get(addr).is_some_and(|t| *t > now)
                || st
                    .members
                    .values()
                    .any(|p| !p.is_down() && p.addr.as_deref() == Some(addr))
        };
        for p in st.members.values() {
            if let (true, Some(addr)) = (p.is_down(), &p.addr)
                && !busy_addr(&st, addr)
                && !targets.contains(addr)
            {
                targets.push(addr.clone());
            }
        }
        for s in &st.seeds {
            let known = s.name.as_ref().is_some_and(|n| st.members.contains_key(n));
            if !s.is_self && !known && !busy_addr(&st, &s.addr) && !targets.contains(&s.addr) {
                targets.push(s.addr.clone());
            }
        }
        for t in &targets {
            st.dialing.insert(t.clone());
        }
        targets
    }

    fn dialed(&self, addr: &str, outcome: Dialed) {
        let mut st = self.lock();
        st.dialing.remove(addr);
        match outcome {
            Dialed::Connected(name) => {
                st.retry_after.remove(addr);
                for s in st.seeds.iter_mut().filter(|s| s.addr == addr) {
                    s.name = Some(name.clone());
                }
            }
            Dialed::OnlySelf => {
                // Known from this node's own nonces, not from the wire.
                for s in st.seeds.iter_mut().filter(|s| s.addr == addr) {
                    s.is_self = true;
                }
                drop(st);
                self.bump_epoch();
            }
            Dialed::Rejected(RejectReason::SelfDial) => {
                // When this node's own acceptor saw the dial, the address
                // reached is one of its own: dial the name's other addresses
                // (or find it all self) at once. Otherwise whoever answered
                // said so without proof: only a hint, redialed later.
                drop(st);
                self.kick.notify_one();
            }
            Dialed::Rejected(
                RejectReason::BadCookie | RejectReason::NameTaken | RejectReason::Version,
            ) => {
                st.retry_after
                    .insert(addr.to_string(), Instant::now() + REFUSED_REDIAL);
            }
            Dialed::Rejected(RejectReason::Duplicate) => {}
            Dialed::Failed => {
                if st.seeds.iter().any(|s| s.addr == addr) {
                    self.resolve_now.notify_one();
                }
            }
        }
    }

    /// Connects to the first address `addr` resolves to that is not this
    /// node itself; `Ok(None)` when every one is.
    async fn connect_to(&self, addr: &str) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
        let targets: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
        if targets.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "address resolves to nothing",
            ));
        }
        let targets: Vec<SocketAddr> = {
            let st = self.lock();
            targets
                .into_iter()
                .filter(|t| !st.self_addrs.contains(t))
                .collect()
        };
        let mut last = None;
        for target in targets {
            match self.connect_one(target).await {
                Ok(stream) => return Ok(Some((stream, target))),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    async fn connect_one(&self, target: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self.local_ip.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
            // Connections leave from the listen address, so that peers and
            // firewalls see one address per node.
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn dial(self: Arc<Self>, addr: String) -> Dialed {
        let (stream, target) = match self.connect_to(&addr).await {
            Ok(Some(connected)) => connected,
            Ok(None) => return Dialed::OnlySelf,
            Err(_) => return Dialed::Failed,
        };
        let (rd, mut wr) = stream.into_split();
        let mut rd = FramedRead::new(rd, codec(MAX_HANDSHAKE_FRAME));
        let nonce = random_nonce();
        // Lets this node's acceptor recognise the dial as its own.
        let _nonce = DialNonce::register(&self, nonce, target);
        let hello = Handshake::Hello {
            version: PROTOCOL_VERSION,
            me: self.me.clone(),
            listen_port: self.listen_port,
            nonce,
        };
        if wr.write_all(&hello.encode()).await.is_err() {
            return Dialed::Failed;
        }
        let (acceptor, acceptor_port, acceptor_nonce) = match read_handshake(&mut rd).await {
            Some(Handshake::Challenge {
                me,
                listen_port,
                nonce,
            }) => (me, listen_port, nonce),
            Some(Handshake::Reject { reason }) => {
                if reason == RejectReason::SelfDial && self.lock().self_addrs.contains(&target) {
                    return Dialed::Rejected(reason);
                }
                // Nothing proves who sent it: a hint, redialed later.
                return self.rejected(&addr, None, reason);
            }
            _ => return Dialed::Failed,
        };
        if !valid_name(&acceptor.name) || acceptor.addr.as_deref().is_some_and(|a| !valid_addr(a)) {
            if self.may_warn("invalid-dial", &addr) {
                warn!(node = %self.name, %addr, "the node at this address sent a name or address that is not visible ASCII (logged at most once a minute per address)");
            }
            return self.rejected(&addr, None, RejectReason::Version);
        }
        if self.cut(&acceptor.name) {
            return Dialed::Failed;
        }
        let transcript = Transcript {
            version: PROTOCOL_VERSION,
            dialer: &self.me,
            dialer_port: self.listen_port,
            dialer_nonce: &nonce,
            acceptor: &acceptor,
            acceptor_port,
            acceptor_nonce: &acceptor_nonce,
        };
        let mac = transcript.proof(&self.key, Role::Dialer);
        if wr
            .write_all(&Handshake::Response { mac }.encode())
            .await
            .is_err()
        {
            return Dialed::Failed;
        }
        match read_handshake(&mut rd).await {
            Some(Handshake::Welcome { mac }) => {
                if !transcript.verify(&self.key, Role::Acceptor, &mac) {
                    return self.rejected(&addr, Some(&acceptor.name), RejectReason::BadCookie);
                }
            }
            Some(Handshake::Reject { reason }) => {
                let reason = match reason {
                    // After our proof, a self-dial claim is nonsense.
                    RejectReason::SelfDial => RejectReason::Version,
                    other => other,
                };
                return self.rejected(&addr, Some(&acceptor.name), reason);
            }
            _ => return Dialed::Failed,
        }
        let mut sealed = seal::channel(&self.key, Role::Dialer, &transcript);
        let info = MemberInfo {
            addr: acceptor.addr.clone().or(Some(addr)),
            ..acceptor
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        match self.adopt(&info, true, tx, stop.clone()) {
            Ok(conn) => {
                let name = info.name.clone();
                let wire = Wire { rd, wr, sealed };
                self.spawn_conn(info.name, conn, wire, rx, stop);
                Dialed::Connected(name)
            }
            Err(_) => {
                // The acceptor took this connection; tell it a better one
                // exists so it does not count the close as a failure.
                let _ = wr
                    .write_all(&sealed.0.seal(&Msg::Superseded.encode()))
                    .await;
                Dialed::Rejected(RejectReason::Duplicate)
            }
        }
    }

    /// A refusal, before or after the peer proved itself: logged (at most
    /// once a minute per address) and answered with a redial later, never
    /// with giving the address up.
    fn rejected(&self, addr: &str, peer: Option<&str>, reason: RejectReason) -> Dialed {
        let peer = peer.unwrap_or("?");
        match reason {
            RejectReason::BadCookie => {
                if self.may_warn("cookie-dial", addr) {
                    warn!(node = %self.name, %addr, %peer, "refused by a peer: its cluster cookie differs from ours (logged at most once a minute per address)");
                }
            }
            RejectReason::NameTaken => {
                if self.may_warn("name-dial", addr) {
                    warn!(node = %self.name, %addr, "refused by a peer: another live node uses this node's name (logged at most once a minute per address)");
                }
            }
            RejectReason::Version => {
                if self.may_warn("version-dial", addr) {
                    warn!(node = %self.name, %addr, "refused by a peer speaking another protocol version (logged at most once a minute per address)");
                }
            }
            RejectReason::SelfDial => {
                if self.may_warn("self-dial", addr) {
                    info!(node = %self.name, %addr, "the node at this address says it is this node, without proof; dialing it again later");
                }
                // Unproven: handled as any refusal, a redial after
                // REFUSED_REDIAL (only this node's own acceptor can show a
                // dial reached itself).
                return Dialed::Rejected(RejectReason::Version);
            }
            RejectReason::Duplicate => {}
        }
        Dialed::Rejected(reason)
    }

    fn spawn_conn(
        self: &Arc<Self>,
        peer: Arc<str>,
        conn: u64,
        wire: Wire,
        mut rx: mpsc::UnboundedReceiver<Bytes>,
        stop: CancellationToken,
    ) {
        let Wire {
            mut rd,
            mut wr,
            sealed: (mut sealer, mut opener),
        } = wire;
        // Authenticated: full-size frames from now on.
        rd.decoder_mut()
            .set_max_frame_length(MAX_FRAME + seal::TAG_LEN);
        // Writer: batches queued frames, sends a heartbeat when idle, and
        // on a closed channel flushes and closes its half.
        let node = self.clone();
        let writer_peer = peer.clone();
        let writer_stop = stop.clone();
        self.writers.spawn(async move {
            let heartbeat = node.settings.heartbeat;
            let mut buf = BytesMut::new();
            loop {
                tokio::select! {
                    biased;
                    _ = writer_stop.cancelled() => break,
                    _ = node.cancel.cancelled() => break,
                    frame = rx.recv() => match frame {
                        None => {
                            let _ = wr.shutdown().await;
                            break;
                        }
                        Some(frame) => {
                            // A cut link (fault injection) drops frames before
                            // they are sealed, so the sequence stays whole.
                            let cut = node.cut(&writer_peer);
                            if !cut {
                                sealer.seal_into(&frame, &mut buf);
                            }
                            while buf.len() < BATCH_BYTES {
                                match rx.try_recv() {
                                    Ok(frame) if !cut => sealer.seal_into(&frame, &mut buf),
                                    Ok(_) => {}
                                    Err(_) => break,
                                }
                            }
                            if !buf.is_empty() && wr.write_all(&buf).await.is_err() {
                                break;
                            }
                            buf.clear();
                        }
                    },
                    _ = sleep(heartbeat) => {
                        if !node.cut(&writer_peer)
                            && wr.write_all(&sealer.seal(&Msg::Ping.encode())).await.is_err()
                        {
                            break;
                        }
                    }
                }
            }
            writer_stop.cancel();
        });
        // Reader: applies frames; silence for the failure timeout, EOF or a
        // reset mark the peer unreachable.
        let node = self.clone();
        tokio::spawn(async move {
            let limit = node.settings.failure_timeout;
            let mut last = Instant::now();
            loop {
                let next = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = node.cancel.cancelled() => break,
                    next = timeout_at(last + limit, rd.next()) => next,
                };
                match next {
                    Err(_) => {
                        info!(node = %node.name, peer = %peer, timeout = ?limit, "no heartbeat from member: unreachable");
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        debug!(node = %node.name, peer = %peer, error = %e, "connection lost");
                        break;
                    }
                    Ok(Some(Ok(sealed))) => {
                        let frame = match opener.open(sealed) {
                            Ok(frame) => frame,
                            Err(e) => {
                                warn!(node = %node.name, peer = %peer, error = %e, "closing the connection");
                                break;
                            }
                        };
                        if node.cut(&peer) {
                            continue;
                        }
                        match Msg::decode(&frame) {
                            Ok(msg) => {
                                node.on_frame(&peer, conn, msg);
                                // Time spent applying a frame (a large
                                // `Sync`) is not the peer's silence.
                                last = Instant::now();
                            }
                            Err(e) => {
                                warn!(node = %node.name, peer = %peer, error = %e, "closing the connection");
                                break;
                            }
                        }
                    }
                }
            }
            stop.cancel();
            node.conn_closed(&peer, conn);
        });
    }

    /// Graceful leave: release everything, tell every member, flush, stop.
    async fn leave(&self) {
        {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            let own: Vec<Arc<str>> = st.own.keys().cloned().collect();
            for id in own {
                self.drop_own(&mut st, &id, Some(LeaseEnd::Lost));
            }
            for (_, p) in st.pending.drain() {
                let _ = p.tx.send(Reply::Retry);
            }
            let leave = Msg::Leave.encode();
            for p in st.members.values_mut() {
                if let Link::Up(c) = std::mem::replace(&mut p.link, Link::Down) {
                    // Dropping the sender lets the writer flush and close.
                    let _ = c.tx.send(leave.clone());
                }
            }
        }
        self.writers.close();
        let _ = timeout(Duration::from_secs(2), self.writers.wait()).await;
        self.cancel.cancel();
        self.bump_epoch();
        info!(node = %self.name, "left the cluster");
    }

    fn members(&self) -> Vec<Member> {
        let st = self.lock();
        let mut members: Vec<Member> = st
            .members
            .iter()
            .map(|(name, p)| Member {
                node: name.to_string(),
                reachable: p.reachable(),
                address: p.addr.clone(),
            })
            .collect();
        members.push(Member {
            node: self.name.to_string(),
            reachable: !st.closed,
            address: self.me.addr.clone(),
        });
        members.sort_by(|a, b| a.node.cmp(&b.node));
        members
    }

    fn holder(&self, id: &str) -> Option<Holder> {
        let st = self.lock();
        self.visible_holder(&st, id)
    }

    /// Every id with a visible holder, the one `holder` would name, with
    /// the wall-clock start of its tenure.
    fn holders(&self) -> Vec<HeldId> {
        let st = self.lock();
        let ids: HashSet<&Arc<str>> = st.own.keys().chain(st.ids.keys()).collect();
        let mut held: Vec<HeldId> = ids
            .into_iter()
            .filter_map(|id| {
                let (since, node, token) = self.visible(&st, id)?;
                let since = UNIX_EPOCH.checked_add(Duration::from_nanos(since));
                Some(HeldId::new(
                    id.to_string(),
                    Holder::new(node.to_string(), Some(token)),
                    since,
                ))
            })
            .collect();
        held.sort_by(|a, b| a.id.cmp(&b.id));
        held
    }
}

/// The [`Session`] of one cluster node. Dropping it without `close` is a
/// crash: connections are reset, peers see the node gone at once.
pub(super) struct ClusterSession {
    pub(super) node: Arc<Node>,
}

impl Session for ClusterSession {
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>> {
        Box::pin(self.node.clone().claim(request.id))
    }

    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, Result<()>> {
        self.node.release(id, token);
        Box::pin(async { Ok(()) })
    }

    fn holder(&self, id: &str) -> BoxFuture<'_, Result<Option<Holder>>> {
        let holder = self.node.holder(id);
        Box::pin(async move { Ok(holder) })
    }

    fn members(&self) -> BoxFuture<'_, Result<Vec<Member>>> {
        let members = self.node.members();
        Box::pin(async move { Ok(members) })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.node.leave())
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<HeldId>>> {
        let held = self.node.holders();
        Box::pin(async move { Ok(held) })
    }
}

impl Drop for ClusterSession {
    fn drop(&mut self) {
        self.node.cancel.cancel();
    }
}
