//! [`RuntimeHandle`]: what a started runtime offers.

use super::{HANDOFF_TICK, Registry, SingletonStatus, Status, lock};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::{HeldId, Holder, Member, Session};
use crate::guardian::{Ask, Shared, SingletonState, Slot};
use crate::ops::NodeOps;
use crate::spec::ChildSpec;
use crate::{Error, Result};

/// A handle on a started runtime: status, step-down, shutdown. Cloneable;
/// dropping it does not stop the runtime.
#[derive(Clone)]
pub struct RuntimeHandle {
    pub(super) inner: Arc<HandleInner>,
}

pub(super) struct HandleInner {
    pub(super) ops: Arc<NodeOps>,
    pub(super) node: Arc<str>,
    pub(super) backend: String,
    /// Weak, so that an aborted runtime drops its session (a crash, as the
    /// backend sees it) even while handles live on.
    pub(super) shared: Weak<Shared>,
    pub(super) version: watch::Receiver<u64>,
    /// Shared with the main task, which keeps the guardians running when
    /// every handle is gone.
    pub(super) registry: Arc<Mutex<Registry>>,
    /// Where guardians of ids added at run time are spawned.
    pub(super) rt: tokio::runtime::Handle,
    pub(super) weight: u32,
    pub(super) labels: Arc<[String]>,
    pub(super) shutdown: CancellationToken,
    pub(super) done: CancellationToken,
    pub(super) main: AbortHandle,
    /// [`Builder::drain_on_shutdown`](crate::Builder::drain_on_shutdown).
    pub(super) drain_on_shutdown: bool,
}

impl fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("node", &self.inner.node)
            .field("backend", &self.inner.backend)
            .field("singletons", &lock(&self.inner.registry).slots.len())
            .finish()
    }
}

impl RuntimeHandle {
    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    #[cfg(feature = "http")]
    pub(crate) fn ops(&self) -> &NodeOps {
        &self.inner.ops
    }

    /// True once shutdown has begun (or the runtime has stopped).
    #[cfg(feature = "http")]
    pub(crate) fn is_stopping(&self) -> bool {
        self.inner.shutdown.is_cancelled() || self.inner.done.is_cancelled()
    }

    /// Stops every instance with `NodeShutdown` (each within its shutdown
    /// budget, all at once), releases every id so standbys take over at
    /// once, closes the backend session, and returns when all that is done.
    pub async fn shutdown(&self) {
        {
            // Under the registry's lock: a singleton added meanwhile is
            // either here or sees the shutdown when it is added.
            let registry = lock(&self.inner.registry);
            self.inner.shutdown.cancel();
            registry.shut_down();
        }
        self.inner.done.cancelled().await;
    }

    /// What a stop signal does in [`Builder::run`](crate::Builder::run), for
    /// applications that handle signals themselves: with
    /// [`Builder::drain_on_shutdown`](crate::Builder::drain_on_shutdown) on,
    /// every id is handed over first ([`drain`](Self::drain): each instance
    /// stopped with [`ShutdownReason::Moved`](crate::ShutdownReason::Moved),
    /// another node takes it over), then the runtime
    /// [shuts down](Self::shutdown); with it off (the default), the same as
    /// `shutdown`. A drain that cannot finish (no other node runs an id,
    /// [`resume`](Self::resume) called it off) is logged and the shutdown
    /// goes ahead. To cut a drain short, say at a second signal, call
    /// `shutdown` meanwhile, or drop this future and call it.
    ///
    /// ```no_run
    /// # async fn example(handle: highlander::RuntimeHandle) {
    /// use tokio::signal::unix::{SignalKind, signal};
    ///
    /// let mut term = signal(SignalKind::terminate()).expect("listen for SIGTERM");
    /// term.recv().await;
    /// tokio::select! {
    ///     () = handle.graceful_shutdown() => {}
    ///     _ = term.recv() => handle.shutdown().await,
    /// }
    /// # }
    /// ```
    pub async fn graceful_shutdown(&self) {
        if self.inner.drain_on_shutdown && !self.inner.done.is_cancelled() {
            info!(
                node = %self.inner.node,
                "draining first: handing every id over (shutting down meanwhile cuts it short)"
            );
            tokio::select! {
                drained = self.drain() => match drained {
                    Ok(()) => info!(node = %self.inner.node, "drained: every id handed over"),
                    Err(e) => warn!(node = %self.inner.node, error = %e, "the drain did not finish"),
                },
                () = self.stopped() => return,
            }
        }
        self.shutdown().await;
    }

    /// Stops the runtime at once, as if the process had crashed: no
    /// `terminate` runs, nothing is released explicitly; the backend sees
    /// the node disappear. For tests and demos of failover.
    pub fn abort(&self) {
        // Dropping the guardians' JoinSet aborts every guardian mid-flight;
        // the shutdown token stays untouched so no instance is stopped
        // gracefully.
        self.inner.main.abort();
        let tasks = lock(&self.inner.registry).tasks.take();
        drop(tasks);
        self.inner.done.cancel();
    }

    /// Completes when the runtime has stopped.
    pub async fn stopped(&self) {
        self.inner.done.cancelled().await;
    }

    /// Asks this node to give up `id`: the instance is stopped with
    /// [`ShutdownReason::Stepdown`](crate::ShutdownReason::Stepdown), the id
    /// released for another node, and this node waits its step-down delay
    /// before it claims the id again. Does nothing if the id does not run
    /// here.
    pub fn step_down(&self, id: &str) -> Result<()> {
        self.hand_over(id, Ask::Stepdown)
    }

    /// Asks the instance of `id`, if it runs here, to stop and give the id
    /// up, for the reason `ask` names.
    pub(crate) fn hand_over(&self, id: &str, ask: Ask) -> Result<()> {
        let slot = self.slot(id)?;
        if matches!(*slot.lock(), SingletonState::Running { .. }) {
            slot.ask(ask);
        }
        Ok(())
    }

    /// Hands `id`, held here, over to the member `node`: the instance stops
    /// with [`ShutdownReason::Moved`](crate::ShutdownReason::Moved)
    /// (`terminate` runs) and the id is released to `node`, which the
    /// backend lets claim it first for a short while. Returns once asked;
    /// [`RuntimeHandle::status`] shows the id `Waiting` on `node` once it
    /// moved.
    ///
    /// The members and the ids they run are the ones the backend showed at
    /// the last change of members ([`RuntimeHandle::members`]). With
    /// rebalancing on ([`Builder::rebalance`](crate::Builder::rebalance)),
    /// the next change of members may move the id back to where it belongs.
    ///
    /// Fails, moving nothing, when `id` is not held here, `node` is this
    /// node or no reachable member that announced itself (on a backend
    /// without placement: none), or `node` does not run `id`.
    pub fn transfer(&self, id: &str, node: &str) -> Result<()> {
        let slot = self.slot(id)?;
        let shared = self.inner.shared.upgrade().ok_or(Error::Stopped)?;
        let Some(token) = slot.held_token() else {
            return Err(Error::config(format!(
                "cannot transfer `{id}`: this node does not hold it (status() shows who does)"
            )));
        };
        if node == &*self.inner.node {
            return Err(Error::config(format!(
                "cannot transfer `{id}` to `{node}`: that is this node, which holds it already"
            )));
        }
        let view = shared.placement.view();
        let Some(catalog) = view.member(node) else {
            return Err(Error::config(format!(
                "cannot transfer `{id}` to `{node}`: no reachable member of that name has announced \
                 itself (check the name against the members the status or `highlander members` lists)"
            )));
        };
        if !catalog.contains(id) {
            return Err(Error::config(format!(
                "cannot transfer `{id}` to `{node}`: that node does not run it (add it there first)"
            )));
        }
        shared
            .placement
            .move_to(&slot, token, Some(Arc::from(node)));
        Ok(())
    }

    fn slot(&self, id: &str) -> Result<Arc<Slot>> {
        lock(&self.inner.registry)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::config(format!("no singleton `{id}` is configured on this node")))
    }

    /// Adds a singleton while the runtime runs: its guardian starts at once
    /// and competes for the id as the others do, and [`RuntimeHandle::status`]
    /// shows it. Fails, starting nothing, on an invalid id or affinity
    /// entry, an id this node already runs ([`Error::DuplicateId`]), a
    /// shutdown budget the backend refuses, or a stopped runtime.
    ///
    /// An id removed with [`RuntimeHandle::remove`] may be added again at
    /// once: the new guardian waits until the old one has stopped its
    /// instance and released the id.
    ///
    /// ```
    /// # use highlander::{ChildSpec, Context, MemoryCluster, Runtime, Service};
    /// # struct Sync;
    /// # impl Service for Sync {
    /// #     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> { ctx.cancelled().await; Ok(()) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> highlander::Result<()> {
    /// let handle = Runtime::builder().node("a").backend(MemoryCluster::new()).start().await?;
    /// handle.add(ChildSpec::new("tenant-sync/acme", |_ctx| async { Ok(Sync) }))?;
    /// handle.wait_until(|s| s.is_running("tenant-sync/acme")).await;
    /// handle.remove("tenant-sync/acme").await?;
    /// assert!(handle.status().get("tenant-sync/acme").is_none());
    /// handle.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn add(&self, spec: ChildSpec) -> Result<()> {
        spec.check()?;
        let shared = self.inner.shared.upgrade().ok_or(Error::Stopped)?;
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::Stopped);
        }
        shared.session.check_stop_budget(&spec.id, spec.shutdown)?;
        let mut reg = lock(&self.inner.registry);
        if reg.tasks.is_none() {
            return Err(Error::Stopped);
        }
        if let Some(existing) = reg.get(&spec.id) {
            return Err(Error::DuplicateId {
                id: spec.id.to_string(),
                first: existing.spec.type_name.to_string(),
                second: spec.type_name.to_string(),
            });
        }
        debug!(node = %self.inner.node, id = %spec.id, "singleton added");
        reg.insert(spec, &shared, &self.inner.rt);
        drop(reg);
        shared.placement.dirty.notify_one();
        shared.bump();
        Ok(())
    }

    /// Removes a singleton from this node: its instance, if it runs here,
    /// is stopped with [`ShutdownReason::Removed`](crate::ShutdownReason::Removed)
    /// (`terminate` runs), the id is released, and this node no longer
    /// competes for it; another node configured with the id may take it.
    /// The id leaves [`RuntimeHandle::status`] at once.
    ///
    /// The removal happens when this is called; the future completes once
    /// the instance has stopped and the id is released (dropping it does not
    /// undo anything). An id this node does not run is an error.
    pub fn remove(&self, id: &str) -> impl Future<Output = Result<()>> + Send + 'static {
        let removed = {
            let mut reg = lock(&self.inner.registry);
            match reg.by_id.remove(id) {
                Some(seq) => {
                    let slot = reg.slots.remove(&seq);
                    if let Some(slot) = &slot {
                        reg.leaving.insert(slot.spec.id.clone(), slot.clone());
                    }
                    slot
                }
                None => None,
            }
        };
        let found = match removed {
            Some(slot) => {
                debug!(node = %self.inner.node, id = %slot.spec.id, "singleton removed");
                slot.remove();
                if let Some(shared) = self.inner.shared.upgrade() {
                    shared.placement.dirty.notify_one();
                    shared.bump();
                }
                Ok(slot)
            }
            None => Err(Error::config(format!(
                "cannot remove `{id}`: no singleton of that id is configured on this node"
            ))),
        };
        let mut version = self.inner.version.clone();
        let done = self.inner.done.clone();
        async move {
            let slot = found?;
            loop {
                version.borrow_and_update();
                if matches!(*slot.lock(), SingletonState::Stopped) {
                    return Ok(());
                }
                tokio::select! {
                    changed = version.changed() => if changed.is_err() { break },
                    _ = done.cancelled() => break,
                }
            }
            // The runtime stopped: a shutdown stopped the instance too, an
            // abort dropped it.
            match *slot.lock() {
                SingletonState::Stopped => Ok(()),
                _ => Err(Error::Stopped),
            }
        }
    }

    /// Drains this node: it stops claiming ids (its guardians keep watching
    /// but do not claim), hands every id it holds over to the other nodes
    /// (each instance stopped with
    /// [`ShutdownReason::Moved`](crate::ShutdownReason::Moved), its id
    /// released, at most [`Builder::handoff_rate`](crate::Builder::handoff_rate) per second), and stays
    /// up, holding nothing, until [`RuntimeHandle::resume`] or shutdown.
    /// [`Status::draining`] says so meanwhile, and each id shows
    /// [`SingletonState::Draining`] once it is handed over.
    ///
    /// The drain begins when this is called; the future completes when this
    /// node holds no id (dropping it does not call the drain off). It fails
    /// if `resume` calls the drain off first, or the runtime stops first.
    /// Calling it during a drain joins that drain.
    pub fn drain(&self) -> impl Future<Output = Result<()>> + Send + 'static {
        let started = self.start_drain();
        let this = self.clone();
        async move {
            started?;
            let mut version = this.inner.version.clone();
            loop {
                version.borrow_and_update();
                if this.inner.done.is_cancelled() || this.inner.shutdown.is_cancelled() {
                    return Err(Error::Stopped);
                }
                if !this.is_draining() {
                    return Err(Error::config(
                        "the drain was called off by resume() before every id was handed over",
                    ));
                }
                if this.inner.ops.busy() == 0 {
                    return Ok(());
                }
                tokio::select! {
                    changed = version.changed() => if changed.is_err() { return Err(Error::Stopped) },
                    _ = this.inner.done.cancelled() => return Err(Error::Stopped),
                }
            }
        }
    }

    fn start_drain(&self) -> Result<()> {
        let shared = self.inner.shared.upgrade().ok_or(Error::Stopped)?;
        let mut reg = lock(&self.inner.registry);
        if reg.drain.is_some() {
            return Ok(());
        }
        let Some(tasks) = reg.tasks.as_mut() else {
            return Err(Error::Stopped);
        };
        let stop = CancellationToken::new();
        shared.draining.send_replace(true);
        info!(node = %self.inner.node, rate = shared.handoff_rate, "draining: handing every id over");
        tasks.spawn_on(
            hand_over_all(self.inner.registry.clone(), shared.clone(), stop.clone()),
            &self.inner.rt,
        );
        reg.drain = Some(stop);
        drop(reg);
        shared.bump();
        Ok(())
    }

    /// Calls a drain off: this node competes for its ids again (an id handed
    /// over meanwhile stays where it went until it is free again). Does
    /// nothing when the node is not draining.
    pub fn resume(&self) {
        let Some(shared) = self.inner.shared.upgrade() else {
            return;
        };
        let mut reg = lock(&self.inner.registry);
        if let Some(stop) = reg.drain.take() {
            stop.cancel();
            shared.draining.send_replace(false);
            info!(node = %self.inner.node, "drain called off: competing for ids again");
            drop(reg);
            shared.bump();
        }
    }

    /// True while the node drains (from [`RuntimeHandle::drain`] until
    /// [`RuntimeHandle::resume`]).
    pub fn is_draining(&self) -> bool {
        lock(&self.inner.registry).drain.is_some()
    }

    /// What every singleton on this node is doing now, with the members
    /// and session state as of the last probe (at most a second old).
    pub fn status(&self) -> Status {
        let (singletons, draining) = {
            let reg = lock(&self.inner.registry);
            let singletons = reg
                .slots
                .values()
                .map(|slot| {
                    let state = slot.lock().clone();
                    let affinity = slot.spec.affinity();
                    SingletonStatus {
                        id: slot.spec.id.to_string(),
                        state,
                        since: slot.ops.since(),
                        restarts: slot.ops.restarts(),
                        prefer: affinity.preferred().to_vec(),
                        avoid: affinity.avoided().to_vec(),
                    }
                })
                .collect();
            (singletons, reg.drain.is_some())
        };
        let ops = &self.inner.ops;
        Status {
            node: self.inner.node.to_string(),
            backend: self.inner.backend.clone(),
            at: crate::ops::wall_ms(),
            session_up: !self.inner.done.is_cancelled() && ops.session_up(),
            members: ops.members(),
            weight: self.inner.weight,
            labels: self.inner.labels.to_vec(),
            draining,
            singletons,
        }
    }

    /// Who holds `id` now, as the backend sees it from this node.
    pub async fn holder(&self, id: &str) -> Result<Option<Holder>> {
        self.live_session()?.holder(id).await
    }

    /// Every id held now, as the backend sees it from this node, sorted by
    /// id (not only this node's singletons: what the `highlander` CLI's
    /// `status` shows). An error for a backend that cannot list holders.
    pub async fn holders(&self) -> Result<Vec<HeldId>> {
        self.live_session()?.holders().await
    }

    /// The cluster members as this node sees them (for backends that have
    /// members).
    pub async fn members(&self) -> Result<Vec<Member>> {
        self.live_session()?.members().await
    }

    /// A future that completes at the first change of any singleton's state
    /// on this node *after this call* (not after the future is first
    /// polled), or when the runtime has stopped. So calling it before
    /// checking a condition never misses a change that happens between the
    /// check and the await, also across several runtimes:
    ///
    /// ```
    /// # use highlander::{MemoryCluster, Runtime};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> highlander::Result<()> {
    /// # let cluster = MemoryCluster::new();
    /// # let a = Runtime::builder().node("a").backend(cluster.clone()).start().await?;
    /// # let b = Runtime::builder().node("b").backend(cluster.clone()).start().await?;
    /// loop {
    ///     let (ca, cb) = (a.changed(), b.changed()); // armed first
    ///     if a.status().running().count() + b.status().running().count() == 0 {
    ///         break;
    ///     }
    ///     tokio::select! { _ = ca => {}, _ = cb => {} }
    /// }
    /// # a.shutdown().await; b.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn changed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.version.clone();
        rx.borrow_and_update();
        async move {
            let _ = rx.changed().await;
        }
    }

    /// Waits until `condition` holds for this node's [`Status`], checking at
    /// every state change (no polling).
    pub async fn wait_until(&self, mut condition: impl FnMut(&Status) -> bool) -> Status {
        let mut rx = self.inner.version.clone();
        loop {
            rx.borrow_and_update();
            let status = self.status();
            if condition(&status) {
                return status;
            }
            if rx.changed().await.is_err() {
                return self.status();
            }
        }
    }

    /// The session the runtime uses, for backend-specific tests; an error
    /// once the runtime has stopped. Needs the `test-util` feature.
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn session(&self) -> Result<Arc<dyn Session>> {
        self.live_session()
    }

    fn live_session(&self) -> Result<Arc<dyn Session>> {
        self.inner
            .shared
            .upgrade()
            .map(|s| s.session.clone())
            .ok_or(Error::Stopped)
    }
}

/// A drain's handoff task: asks every instance running here to move, in
/// batches of a tenth of the handoff rate per tick, until the drain is
/// called off or the runtime stops. It keeps watching after the first pass:
/// a claim that was in flight when the drain began may still be granted.
pub(super) async fn hand_over_all(
    registry: Arc<Mutex<Registry>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let batch = (shared.handoff_rate / 10).max(1) as usize;
    let mut version = shared.version.subscribe();
    let mut reported = false;
    loop {
        if stop.is_cancelled() || shared.shutdown.is_cancelled() {
            return;
        }
        version.borrow_and_update();
        let todo: Vec<(Arc<Slot>, u64)> = lock(&registry)
            .slots
            .values()
            .filter_map(|slot| {
                let token = slot.held_token()?;
                (slot.moving.load(std::sync::atomic::Ordering::SeqCst) != token)
                    .then(|| (slot.clone(), token))
            })
            .take(batch)
            .collect();
        let view = shared.placement.view();
        for (slot, token) in &todo {
            // To the best other member that runs the id, when placement
            // knows one; else a plain release.
            shared
                .placement
                .move_to(slot, *token, view.best_other(slot));
        }
        if !todo.is_empty() {
            debug!(node = %shared.node, ids = todo.len(), "handing over");
            reported = false;
        } else if shared.ops.busy() == 0 && !reported {
            info!(node = %shared.node, "drained: this node holds no id");
            reported = true;
        }
        if todo.len() < batch {
            // Nothing more to ask now: wait for a change.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.shutdown.cancelled() => return,
                changed = version.changed() => if changed.is_err() { return },
            }
        }
        // At most one batch per tick, and a scan at most once per tick.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(HANDOFF_TICK) => {}
        }
    }
}
