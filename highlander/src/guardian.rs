//! One guardian per singleton id: claim, run the instance under its
//! supervisor, watch the lease, release, and take over when the holder goes.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backend::{Claim, ClaimRequest, Holder, Lease, Session};
use crate::context::{Children, StateMap, catch, describe_error, panic_text};
use crate::service::BoxFuture;
use crate::spec::{ChildSpec, Restart, terminate_reserve};
use crate::{Context, ShutdownReason};

/// The first restart waits this long; each further one twice as long.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(10);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Retry delays when the backend cannot be asked.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where one singleton stands on this node.
///
/// With the `serde` feature it is an object tagged by `"state"` in
/// snake case: `{"state": "running", "token": 7, "restarts": 0}`,
/// `{"state": "waiting", "holder": {"node": "b", "token": 3}}`,
/// `{"state": "claiming"}`, `{"state": "draining"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(tag = "state", rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum SingletonState {
    /// Asking the backend for the id.
    Claiming,
    /// Another node holds the id; this node waits to take over.
    Waiting {
        /// The holder, when the backend said.
        holder: Option<Holder>,
    },
    /// This node holds the id and runs the instance.
    Running {
        /// The fencing token of this tenure.
        token: u64,
        /// Restarts within this tenure.
        restarts: u32,
    },
    /// This node holds the id but the instance has ended for good
    /// (`temporary`, or `transient` after a normal return).
    Finished {
        /// The fencing token of this tenure.
        token: u64,
        /// Why the last instance stopped.
        reason: ShutdownReason,
    },
    /// This node gave the id up and waits before claiming it again.
    SteppedDown,
    /// This node is draining
    /// ([`RuntimeHandle::drain`](crate::RuntimeHandle::drain)): it neither
    /// holds nor claims the id until
    /// [`RuntimeHandle::resume`](crate::RuntimeHandle::resume); another
    /// node may hold it.
    Draining,
    /// The backend could not be asked; retrying.
    Retrying {
        /// The backend's error.
        error: String,
    },
    /// The runtime has stopped; nothing runs here.
    Stopped,
}

/// Why a handle asks a running instance to stop and give its id up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Ask {
    /// [`RuntimeHandle::step_down`](crate::RuntimeHandle::step_down).
    Stepdown = 1,
    /// A handoff: the id moves to another node (a drain).
    Moved = 2,
}

/// The state of one guardian, shared with the runtime handle.
pub(crate) struct Slot {
    pub(crate) spec: ChildSpec,
    pub(crate) state: Mutex<SingletonState>,
    /// A permit to stop the instance and give the id up; `asked` says why.
    step_down: Notify,
    /// The strongest [`Ask`] since the permit was last taken (0: none).
    asked: AtomicU8,
    /// Cancelled when the node shuts down (a child of the runtime's token)
    /// or the id is removed from this node.
    pub(crate) cancel: CancellationToken,
    /// Set before `cancel` when the id is removed.
    removed: AtomicBool,
    /// The tenure a drain last asked to move, so each tenure is asked once.
    pub(crate) moving: AtomicU64,
    pub(crate) ops: crate::ops::SlotOps,
}

impl Slot {
    pub(crate) fn new(spec: ChildSpec, shared: &Shared) -> Slot {
        Slot {
            ops: shared.ops.slot(&spec.id),
            spec,
            state: Mutex::new(SingletonState::Claiming),
            step_down: Notify::new(),
            asked: AtomicU8::new(0),
            cancel: shared.shutdown.child_token(),
            removed: AtomicBool::new(false),
            moving: AtomicU64::new(0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SingletonState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the current tenure's instance to stop and give the id up.
    ///
    /// A permit, not a wake-up of current waiters: the instance may not yet
    /// be listening (its first poll may come after `run` has begun), and
    /// the request must not be lost then. A permit left when the tenure
    /// ends otherwise is dropped when the next tenure begins.
    pub(crate) fn ask(&self, ask: Ask) {
        self.asked.fetch_max(ask as u8, Ordering::SeqCst);
        self.step_down.notify_one();
    }

    /// Why the instance was asked to stop, once the permit is taken.
    fn asked_reason(&self) -> ShutdownReason {
        match self.asked.swap(0, Ordering::SeqCst) {
            x if x == Ask::Moved as u8 => ShutdownReason::Moved,
            _ => ShutdownReason::Stepdown,
        }
    }

    /// Drops a permit left from an earlier tenure.
    fn clear_asks(&self) {
        let _ = self.step_down.notified().now_or_never();
        self.asked.store(0, Ordering::SeqCst);
    }

    /// Withdraws the id from this node: its instance stops with
    /// [`ShutdownReason::Removed`], the id is released and the guardian ends.
    pub(crate) fn remove(&self) {
        self.removed.store(true, Ordering::SeqCst);
        self.cancel.cancel();
    }

    /// Why the instance stops once `cancel` is cancelled.
    fn cancel_reason(&self) -> ShutdownReason {
        if self.removed.load(Ordering::SeqCst) {
            ShutdownReason::Removed
        } else {
            ShutdownReason::NodeShutdown
        }
    }

    /// The token of the tenure this node holds, if it holds the id.
    pub(crate) fn held_token(&self) -> Option<u64> {
        match *self.lock() {
            SingletonState::Running { token, .. } | SingletonState::Finished { token, .. } => {
                Some(token)
            }
            _ => None,
        }
    }
}

/// Runtime-wide things every guardian uses.
pub(crate) struct Shared {
    pub(crate) node: Arc<str>,
    pub(crate) session: Arc<dyn Session>,
    pub(crate) state: Arc<StateMap>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) stepdown_delay: Duration,
    /// Bumped on every state change, for `RuntimeHandle::changed`.
    pub(crate) version: watch::Sender<u64>,
    pub(crate) ops: Arc<crate::ops::NodeOps>,
    /// True while the node drains: guardians do not claim.
    pub(crate) draining: watch::Sender<bool>,
    /// How many ids a drain hands over per second.
    pub(crate) handoff_rate: u32,
}

impl Shared {
    pub(crate) fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// How a tenure's supervision ended.
enum Outcome {
    /// The node shuts down or the id was removed: release and end.
    Shutdown,
    Lost(ShutdownReason),
    Stepdown,
    /// Handed over: release and compete again (not while draining).
    Moved,
    Finished(ShutdownReason),
}

pub(crate) struct Guardian {
    pub(crate) slot: Arc<Slot>,
    pub(crate) shared: Arc<Shared>,
    /// The guardian of the same id removed before this one was added: it
    /// may still be stopping its instance, so this one waits for its end.
    pub(crate) after: Option<Arc<Slot>>,
}

impl Guardian {
    fn set(&self, state: SingletonState) {
        self.set_locked(self.slot.lock(), state);
    }

    fn set_locked(&self, mut current: MutexGuard<'_, SingletonState>, state: SingletonState) {
        if *current != state {
            self.slot.ops.transition(&self.shared.ops, &current, &state);
            *current = state;
            drop(current);
            self.shared.bump();
        }
    }

    /// Shows `Claiming` and returns true, or, while the node drains, shows
    /// `Draining` and returns false. Under the state lock, so a drain that
    /// has begun sees either this guardian claiming or one that will not.
    fn may_claim(&self) -> bool {
        let state = self.slot.lock();
        let draining = *self.shared.draining.borrow();
        let next = if draining {
            SingletonState::Draining
        } else {
            SingletonState::Claiming
        };
        self.set_locked(state, next);
        !draining
    }

    /// Waits until the guardian this one replaces has ended; false if this
    /// one is cancelled first.
    async fn wait_for(&self, previous: &Slot) -> bool {
        let mut version = self.shared.version.subscribe();
        loop {
            version.borrow_and_update();
            if matches!(*previous.lock(), SingletonState::Stopped) {
                return true;
            }
            tokio::select! {
                _ = self.slot.cancel.cancelled() => return false,
                changed = version.changed() => if changed.is_err() { return false },
            }
        }
    }

    /// Runs until the node shuts down.
    ///
    /// User code never unwinds into the guardian (see [`Guarded`]); this is
    /// the last resort should the guardian itself panic: the tenure it holds
    /// is released, the status says it stepped down, and after the step-down
    /// delay it claims again. A guardian never ends with a lease held.
    pub(crate) async fn run(mut self) {
        let span = info_span!("singleton", id = %self.slot.spec.id, node = %self.shared.node);
        let _exit = crate::ops::ExitGuard::new(&self.slot, &self.shared.ops);
        let after = self.after.take();
        async {
            if let Some(previous) = after
                && !Box::pin(self.wait_for(&previous)).await
            {
                self.set(SingletonState::Stopped);
                return;
            }
            let held = Mutex::new(None);
            loop {
                match AssertUnwindSafe(self.guard(&held)).catch_unwind().await {
                    Ok(()) => break,
                    Err(panic) => {
                        let panic = panic_text(panic);
                        error!(%panic, "the guardian panicked (a bug in highlander): releasing the id and claiming again");
                        let token = held.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some(token) = token {
                            self.release(token).await;
                        }
                        self.set(SingletonState::SteppedDown);
                        if Box::pin(self.pause(self.shared.stepdown_delay)).await {
                            break;
                        }
                    }
                }
            }
            self.set(SingletonState::Stopped);
        }
        .instrument(span)
        .await;
    }

    /// Claims, supervises and releases until the node shuts down or the id
    /// is removed. `held` names the tenure this node holds, for
    /// [`Guardian::run`].
    async fn guard(&self, held: &Mutex<Option<u64>>) {
        let mut retry = RETRY_MIN;
        // Which holder was last logged, as a hash of its name (0: none):
        // eight bytes instead of a copy of the name in every guardian.
        let mut last_holder = 0u64;
        loop {
            // The rare and the short-lived waits are boxed: what every
            // guardian task carries is only the wait on a holder.
            if !self.may_claim() {
                if Box::pin(self.wait_resumed()).await {
                    break;
                }
                continue;
            }
            let Some(claim) = Box::pin(self.claim()).await else {
                break;
            };
            match claim {
                Err(e) => {
                    debug!(error = %e, retry_in = ?retry, "cannot claim now");
                    self.set(SingletonState::Retrying {
                        error: e.to_string(),
                    });
                    if Box::pin(self.pause(retry)).await {
                        break;
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
                Ok(Claim::Busy { holder, wake }) => {
                    retry = RETRY_MIN;
                    last_holder = self.wait_on(holder, last_holder);
                    if self.wait_holder(wake).await {
                        break;
                    }
                }
                Ok(Claim::Granted(lease)) => {
                    retry = RETRY_MIN;
                    last_holder = 0;
                    // Boxed: only the ids held here pay for a running
                    // instance's state; a waiting guardian stays small.
                    if Box::pin(self.tenure(lease, held)).await {
                        break;
                    }
                }
            }
        }
        self.set(SingletonState::Stopped);
    }

    /// Waits for the holder to change; true when the guardian is cancelled
    /// first.
    async fn wait_holder(&self, wake: BoxFuture<'static, ()>) -> bool {
        tokio::select! {
            _ = self.slot.cancel.cancelled() => true,
            _ = wake => false,
        }
    }

    /// One tenure: supervise the instance while the lease holds, then
    /// release by the outcome. True when the guardian ends.
    async fn tenure(&self, lease: Lease, held: &Mutex<Option<u64>>) -> bool {
        *held.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease.token);
        let tenure = info_span!("tenure", token = lease.token);
        tenure.in_scope(|| info!("claimed: running here"));
        let outcome = self.supervise(&lease).instrument(tenure).await;
        let end = match outcome {
            Outcome::Shutdown => {
                self.release(lease.token).await;
                true
            }
            Outcome::Lost(reason) => {
                info!(token = lease.token, %reason, "tenure ended");
                false
            }
            Outcome::Stepdown => {
                self.release(lease.token).await;
                self.set(SingletonState::SteppedDown);
                self.pause(self.shared.stepdown_delay).await
            }
            Outcome::Moved => {
                self.release(lease.token).await;
                info!(token = lease.token, "handed over");
                false
            }
            Outcome::Finished(reason) => {
                self.set(SingletonState::Finished {
                    token: lease.token,
                    reason,
                });
                self.hold_finished(&lease).await
            }
        };
        if !end {
            *held.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        end
    }

    /// Shows `Waiting` on `holder`, logging when it is not the holder last
    /// logged (`last`, a hash of its name); returns the new hash.
    fn wait_on(&self, holder: Option<Holder>, last: u64) -> u64 {
        use std::hash::{Hash, Hasher};
        let node = holder.as_ref().map(|h| h.node.as_str());
        let seen = node.map_or(0, |n| {
            let mut h = std::hash::DefaultHasher::new();
            n.hash(&mut h);
            h.finish() | 1
        });
        if seen != last {
            debug!(
                holder = node.unwrap_or("unknown"),
                "waiting: held elsewhere"
            );
        }
        self.set(SingletonState::Waiting { holder });
        seen
    }

    /// Waits `delay`; true when the guardian is cancelled first.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.slot.cancel.cancelled() => true,
            _ = sleep(delay) => false,
        }
    }

    /// Waits until the node no longer drains; true when the guardian is
    /// cancelled first.
    async fn wait_resumed(&self) -> bool {
        let mut draining = self.shared.draining.subscribe();
        tokio::select! {
            biased;
            _ = self.slot.cancel.cancelled() => true,
            _ = draining.wait_for(|d| !*d) => false,
        }
    }

    /// Asks the backend for the id; `None` when the guardian is cancelled
    /// first.
    async fn claim(&self) -> Option<crate::Result<Claim>> {
        let request = ClaimRequest {
            id: self.slot.spec.id.clone(),
            stop_budget: self.slot.spec.shutdown,
        };
        tokio::select! {
            biased;
            _ = self.slot.cancel.cancelled() => None,
            claim = self.shared.session.try_claim(request) => Some(claim),
        }
    }

    /// Keeps a finished tenure until the lease ends, the id is handed
    /// over, or the guardian is cancelled (then the id is released and true
    /// returned: the guardian ends).
    async fn hold_finished(&self, lease: &Lease) -> bool {
        loop {
            tokio::select! {
                _ = self.slot.cancel.cancelled() => {
                    self.release(lease.token).await;
                    return true;
                }
                end = lease.ended() => {
                    info!(token = lease.token, reason = %ShutdownReason::from(end), "tenure ended");
                    return false;
                }
                _ = self.slot.step_down.notified() => {
                    // Only a handoff releases a finished id; a step-down
                    // permit is for a running one.
                    if self.slot.asked_reason() == ShutdownReason::Moved {
                        self.release(lease.token).await;
                        info!(token = lease.token, "handed over");
                        return false;
                    }
                }
            }
        }
    }

    async fn release(&self, token: u64) {
        match self.shared.session.release(&self.slot.spec.id, token).await {
            Ok(()) => debug!(token, "released"),
            Err(e) => {
                warn!(token, error = %e, "release failed; the backend frees the id when this node's session ends")
            }
        }
    }

    /// Runs instances while the lease holds, restarting them by policy.
    async fn supervise(&self, lease: &Lease) -> Outcome {
        let spec = &self.slot.spec;
        let mut restarts: VecDeque<Instant> = VecDeque::new();
        let mut total_restarts = 0u32;
        let mut backoff = RESTART_BACKOFF_MIN;
        // A step-down asked for during an earlier tenure is not for this one.
        self.slot.clear_asks();
        loop {
            self.set(SingletonState::Running {
                token: lease.token,
                restarts: total_restarts,
            });
            let started = Instant::now();
            let reason = self.run_instance(lease).await;
            self.slot.ops.stopped(&reason);
            let restart = match &reason {
                ShutdownReason::NodeShutdown | ShutdownReason::Removed => return Outcome::Shutdown,
                ShutdownReason::Moved => return Outcome::Moved,
                ShutdownReason::LeaseLost | ShutdownReason::Conflict => {
                    return Outcome::Lost(reason);
                }
                ShutdownReason::Stepdown => return Outcome::Stepdown,
                ShutdownReason::Normal => spec.restart == Restart::Permanent,
                ShutdownReason::Error(_) => spec.restart != Restart::Temporary,
            };
            if !restart {
                info!(%reason, "instance ended; not restarted ({:?})", spec.restart);
                return Outcome::Finished(reason);
            }
            let now = Instant::now();
            if now.duration_since(started) > spec.intensity.period {
                backoff = RESTART_BACKOFF_MIN;
            }
            restarts.push_back(now);
            while restarts
                .front()
                .is_some_and(|t| now.duration_since(*t) > spec.intensity.period)
            {
                restarts.pop_front();
            }
            if restarts.len() > spec.intensity.max_restarts as usize {
                warn!(
                    %reason,
                    max_restarts = spec.intensity.max_restarts,
                    period = ?spec.intensity.period,
                    "restart intensity exceeded: stepping down so another node can try"
                );
                return Outcome::Stepdown;
            }
            total_restarts += 1;
            info!(%reason, restart_in = ?backoff, "instance stopped; restarting");
            // Boxed: only an instance between restarts pays for it.
            if let Some(outcome) = Box::pin(self.backoff(lease, backoff)).await {
                return outcome;
            }
            backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
        }
    }

    /// Waits `backoff` before a restart, unless the tenure ends first.
    async fn backoff(&self, lease: &Lease, backoff: Duration) -> Option<Outcome> {
        tokio::select! {
            _ = self.slot.cancel.cancelled() => Some(Outcome::Shutdown),
            end = lease.ended() => Some(Outcome::Lost(end.into())),
            _ = self.slot.step_down.notified() => Some(match self.slot.asked_reason() {
                ShutdownReason::Moved => Outcome::Moved,
                _ => Outcome::Stepdown,
            }),
            _ = sleep(backoff) => None,
        }
    }

    /// Builds and runs one instance, and always ends it the same way:
    /// cancel, await `run` and every child until the terminate reserve is all
    /// that is left of the shutdown budget (abandoning what still runs), then
    /// `terminate(reason)` with the rest. Returns why it stopped.
    ///
    /// Every call into user code (the factory, `run`, `terminate`, dropping
    /// their futures and the service, an error's `Display`) goes through
    /// [`Guarded`] or [`catch`], so a panic anywhere in it becomes
    /// [`ShutdownReason::Error`] and never unwinds into the guardian.
    async fn run_instance(&self, lease: &Lease) -> ShutdownReason {
        let spec = &self.slot.spec;
        let ctx = Context::new(
            spec.id.clone(),
            self.shared.node.clone(),
            lease.token,
            self.shared.state.clone(),
            // Not a child of the slot's token: the reason must be known
            // before the instance sees the cancellation.
            CancellationToken::new(),
        );
        let children = ctx.children().clone();
        let _abort_children = AbortOnDrop(children.clone());
        let late = LatePanic::default();

        let stop_trigger = async {
            tokio::select! {
                _ = self.slot.cancel.cancelled() => self.slot.cancel_reason(),
                // A child failed: it stopped the context with its error.
                _ = ctx.cancelled() => ctx.reason().unwrap_or(ShutdownReason::Normal),
                end = lease.ended() => end.into(),
                _ = self.slot.step_down.notified() => self.slot.asked_reason(),
            }
        };
        tokio::pin!(stop_trigger);

        // Build the instance: the factory is called inside the guarded poll,
        // so a panic in its synchronous part is caught too.
        let mut build = Guarded::new("the factory", || (spec.build)(&ctx), &late);
        let built = tokio::select! {
            built = &mut build => built,
            reason = &mut stop_trigger => {
                ctx.stop(reason.clone());
                drop(build);
                let deadline = Instant::now() + spec.shutdown;
                Box::pin(stop_children(&children, deadline, deadline)).await;
                return late.after(reason);
            }
        };
        drop(build);
        let mut service = match built {
            Ok(Ok(service)) => service,
            failed => {
                let reason = ShutdownReason::Error(match failed {
                    Ok(Err(e)) => format!("init failed: {}", describe_error(e)),
                    Err(panic) => format!("init panicked: {panic}"),
                    Ok(Ok(_)) => unreachable!("matched above"),
                });
                warn!(%reason, "instance could not be built");
                ctx.stop(reason.clone());
                let deadline = Instant::now() + spec.shutdown;
                Box::pin(stop_children(&children, deadline, deadline)).await;
                return reason;
            }
        };

        // Run it until it returns or something stops it. `run` and the
        // children may use the budget up to the terminate reserve.
        let (reason, deadline) = {
            let mut run = Guarded::new("run", || service.run_dyn(&ctx), &late);
            let (reason, returned) = tokio::select! {
                result = &mut run => {
                    let reason = match result {
                        Ok(Ok(())) => ctx.reason().unwrap_or(ShutdownReason::Normal),
                        Ok(Err(e)) => ShutdownReason::Error(describe_error(e)),
                        Err(panic) => ShutdownReason::Error(format!("panicked: {panic}")),
                    };
                    (reason, true)
                }
                reason = &mut stop_trigger => (reason, false),
            };
            ctx.stop(reason.clone());
            let reason = ctx.reason().unwrap_or(reason);
            let deadline = Instant::now() + spec.shutdown;
            // Boxed, as is `terminate` below: only an instance that is
            // stopping pays for the timers of its stop.
            Box::pin(stop_run(
                run,
                returned,
                &reason,
                &children,
                deadline,
                spec.shutdown,
            ))
            .await;
            (reason, deadline)
        };

        Box::pin(terminate(
            &mut *service,
            &reason,
            deadline,
            spec.shutdown,
            &late,
        ))
        .await;
        if let Err(panic) = catch(move || drop(service)) {
            warn!(%panic, "dropping the service panicked");
            late.record(format!("dropping the service panicked: {panic}"));
        }
        late.after(reason)
    }
}

/// Stops `run` once the instance is cancelled: awaits it until only the
/// terminate reserve is left of the budget (unless it has returned), drops
/// it (guarded), then awaits the children likewise.
async fn stop_run<'a, F>(
    mut run: Guarded<'a, F, crate::Result<()>>,
    returned: bool,
    reason: &ShutdownReason,
    children: &Children,
    deadline: Instant,
    budget: Duration,
) where
    F: FnOnce() -> BoxFuture<'a, crate::Result<()>> + Unpin,
{
    let abandon_at = deadline - terminate_reserve(budget);
    if !returned {
        debug!(%reason, "stopping instance");
        match timeout_at(abandon_at, &mut run).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                debug!(error = %describe_error(e), "run returned an error while stopping")
            }
            Ok(Err(panic)) => warn!(%panic, "run panicked while stopping"),
            Err(_) => {
                warn!(
                    ?budget,
                    %reason,
                    "run did not return within its share of the shutdown budget: dropped; terminate runs now"
                );
            }
        }
    }
    // An unfinished `run` is dropped here (guarded), before `terminate`
    // borrows the service.
    drop(run);
    if !stop_children(children, abandon_at, deadline).await {
        debug!("terminate runs with the budget's reserve");
    }
}

/// Runs `terminate(reason)` until the end of the budget.
async fn terminate(
    service: &mut dyn crate::service::DynService,
    reason: &ShutdownReason,
    deadline: Instant,
    budget: Duration,
    late: &LatePanic,
) {
    let mut terminate = Guarded::new("terminate", || service.terminate_dyn(reason.clone()), late);
    match timeout_at(deadline, &mut terminate).await {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => {
            warn!(%panic, "terminate panicked");
            late.record(format!("terminate panicked: {panic}"));
        }
        Err(_) => {
            warn!(?budget, %reason, "terminate overran the shutdown budget: dropped")
        }
    }
}

/// The first panic that happened after the instance's reason was known: in
/// `terminate`, or while dropping the service or an unfinished future.
#[derive(Default)]
struct LatePanic(Mutex<Option<String>>);

impl LatePanic {
    fn record(&self, why: String) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }

    /// The instance's final reason: a late panic turns a normal stop into an
    /// error (so `transient` restarts it). Any other reason stands: the
    /// instance was stopping for it anyway, and an error already says so.
    fn after(&self, reason: ShutdownReason) -> ShutdownReason {
        let late = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match (reason, late) {
            (ShutdownReason::Normal, Some(why)) => ShutdownReason::Error(why),
            (reason, Some(why)) => {
                debug!(%reason, panic = %why, "panic while stopping; the reason stands");
                reason
            }
            (reason, None) => reason,
        }
    }
}

/// A future of user code that cannot unwind into the guardian: the call that
/// creates it (the synchronous part of a factory, `run` or `terminate`), every
/// poll, and dropping it, finished or not, all run under `catch_unwind`. A
/// panic while polling or finishing is its output, `Err(message)`; a panic
/// while dropping it unfinished is recorded in the instance's [`LatePanic`].
struct Guarded<'a, F, T> {
    what: &'static str,
    make: Option<F>,
    future: Option<BoxFuture<'a, T>>,
    late: &'a LatePanic,
}

impl<'a, F, T> Guarded<'a, F, T>
where
    F: FnOnce() -> BoxFuture<'a, T> + Unpin,
{
    fn new(what: &'static str, make: F, late: &'a LatePanic) -> Self {
        Guarded {
            what,
            make: Some(make),
            future: None,
            late,
        }
    }
}

impl<'a, F, T> Future for Guarded<'a, F, T>
where
    F: FnOnce() -> BoxFuture<'a, T> + Unpin,
{
    type Output = Result<T, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let polled = catch(|| {
            if this.future.is_none() {
                let make = this.make.take()?;
                this.future = Some(make());
            }
            this.future.as_mut().map(|f| f.as_mut().poll(cx))
        });
        match polled {
            Ok(Some(Poll::Pending)) => Poll::Pending,
            Ok(Some(Poll::Ready(value))) => {
                let future = this.future.take();
                match catch(move || drop(future)) {
                    Ok(()) => Poll::Ready(Ok(value)),
                    Err(panic) => {
                        let _ = catch(move || drop(value));
                        Poll::Ready(Err(format!("dropping {} panicked: {panic}", this.what)))
                    }
                }
            }
            Ok(None) => Poll::Ready(Err(format!("{} was polled after it finished", this.what))),
            Err(panic) => {
                let future = this.future.take();
                let _ = catch(move || drop(future));
                Poll::Ready(Err(panic))
            }
        }
    }
}

impl<F, T> Drop for Guarded<'_, F, T> {
    fn drop(&mut self) {
        let future = self.future.take();
        if let Err(panic) = catch(move || drop(future)) {
            warn!(%panic, "dropping unfinished {} panicked", self.what);
            self.late.record(format!(
                "dropping unfinished {} panicked: {panic}",
                self.what
            ));
        }
    }
}

/// Awaits every child until `abandon_at`, then aborts the rest and awaits
/// their end (an aborted task ends at its next turn; bounded by `deadline`).
/// Returns false when the children overran their share of the budget.
async fn stop_children(children: &Children, abandon_at: Instant, deadline: Instant) -> bool {
    if timeout_at(abandon_at, children.wait()).await.is_ok() {
        return true;
    }
    warn!(
        running = children.running(),
        "child tasks overran their share of the shutdown budget: aborted"
    );
    children.abort_all();
    let _ = timeout_at(deadline, children.wait()).await;
    false
}

/// Aborts the instance's children if the instance's future is dropped (the
/// runtime was aborted), so no child outlives its instance.
struct AbortOnDrop(Arc<Children>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, MemoryCluster};
    use crate::spec::ChildSpec;

    struct Idle;
    impl crate::Service for Idle {
        async fn run(&mut self, ctx: &Context) -> crate::Result<()> {
            ctx.cancelled().await;
            Ok(())
        }
    }

    /// The futures every id keeps in memory: the guardian's (one task per
    /// id, waiting or running) and the boxed running part of a held id.
    /// Printed with `--nocapture`; bounded so that growth is a deliberate
    /// choice.
    #[tokio::test]
    async fn future_sizes() {
        let session = MemoryCluster::new().connect("a").await.unwrap();
        let node: Arc<str> = Arc::from("a");
        let ops = crate::ops::NodeOps::new(node.clone(), &crate::ops::OpsConfig::default());
        let spec = ChildSpec::new("sizes", |_ctx| async { Ok(Idle) });
        let shared = Arc::new(Shared {
            node,
            session,
            state: Arc::new(StateMap::new()),
            shutdown: CancellationToken::new(),
            stepdown_delay: Duration::from_secs(5),
            version: watch::Sender::new(0),
            ops,
            draining: watch::Sender::new(false),
            handoff_rate: 1_000,
        });
        let slot = Arc::new(Slot::new(spec, &shared));
        let guardian = Guardian {
            slot,
            shared,
            after: None,
        };
        let (lease, _signal) = Lease::new(1);
        let instance = std::mem::size_of_val(&guardian.run_instance(&lease));
        let supervise = std::mem::size_of_val(&guardian.supervise(&lease));
        let held = Mutex::new(None);
        let guard = std::mem::size_of_val(&guardian.guard(&held));
        let slot = std::mem::size_of::<Slot>();
        let task = std::mem::size_of_val(&guardian.run());
        println!(
            "guardian task future {task} B (guard {guard} B), running part (boxed) {supervise} B \
             (instance {instance} B), slot {slot} B"
        );
        // Every id carries the task; a held one the running part too. They
        // were 1824 and 1288 B before the rarely used states were boxed.
        assert!(task <= 600, "the guardian task grew to {task} B");
        assert!(supervise <= 1_100, "the running part grew to {supervise} B");
    }
}
