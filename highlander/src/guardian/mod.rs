//! One guardian per singleton id: claim, run the instance under its
//! supervisor, watch the lease, release, and take over when the holder goes.
//!
//! This file holds the states and the claim loop; `slot.rs` what the runtime
//! and the handles share with a guardian; `supervise.rs` runs the
//! instances of one tenure.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::task::AtomicWaker;
use tokio::sync::watch;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::ShutdownReason;
use crate::backend::{Claim, ClaimRequest, Holder, Lease, Session};
use crate::context::{StateMap, panic_text};
use crate::service::BoxFuture;
use crate::spec::ChildSpec;

/// Retry delays when the backend cannot be asked, in milliseconds.
const RETRY_MIN_MS: u32 = 50;
const RETRY_MAX_MS: u32 = 5_000;

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
    /// Where ids belong, and where those handed over go.
    pub(crate) placement: crate::runtime::Placement,
}

impl Shared {
    pub(crate) fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// The tenure a guardian holds, for [`Guardian::run`] to release should
/// the guardian panic. Two atomics: smaller than a mutex. In the slot, not
/// the task: sixteen bytes more there keep the task in tokio's 256 B cell.
#[derive(Default)]
pub(crate) struct Held {
    is: AtomicBool,
    token: AtomicU64,
}

impl Held {
    fn set(&self, token: Option<u64>) {
        self.token.store(token.unwrap_or(0), Ordering::SeqCst);
        self.is.store(token.is_some(), Ordering::SeqCst);
    }

    fn take(&self) -> Option<u64> {
        self.is
            .swap(false, Ordering::SeqCst)
            .then(|| self.token.load(Ordering::SeqCst))
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
}

/// A running guardian: when its task ends or is dropped, the node's
/// counts and the id's metrics no longer count what it ran.
struct Exiting(Guardian);

impl Drop for Exiting {
    fn drop(&mut self) {
        drop(crate::ops::ExitGuard::new(&self.0.slot, &self.0.shared.ops));
    }
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
    ///
    /// `after` is the guardian of the same id removed before this one was
    /// added: it may still be stopping its instance, so this one waits for
    /// its end first. (A parameter, not a field: every guardian task would
    /// carry the empty field, and eight bytes more put the task in tokio's
    /// next size of task cell, 128 bytes larger.)
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps a second copy of its arguments, in every guardian task"
    )]
    pub(crate) fn run(self, after: Option<Arc<Slot>>) -> impl Future<Output = ()> + Send {
        // The guardian itself does the exit accounting when the task ends
        // or is dropped: no guard of its own beside it in every task.
        let this = Exiting(self);
        async move {
            let span =
                info_span!("singleton", id = %this.0.slot.spec.id, node = %this.0.shared.node);
            this.0.watch(after).instrument(span).await;
        }
    }

    /// [`Guardian::run`] in its span: waits for `after`, then guards the
    /// id, recovering from a panic of the guardian itself.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps a second copy of its arguments, in every guardian task"
    )]
    fn watch(&self, after: Option<Arc<Slot>>) -> impl Future<Output = ()> + Send + '_ {
        async move {
            if let Some(previous) = after
                && !Box::pin(self.wait_for(&previous)).await
            {
                self.set(SingletonState::Stopped);
                return;
            }
            loop {
                let Err(panic) = AssertUnwindSafe(self.guard()).catch_unwind().await else {
                    break;
                };
                // Boxed: only a guardian that panicked pays for what follows.
                if Box::pin(self.recover(panic)).await {
                    break;
                }
            }
            self.set(SingletonState::Stopped);
        }
    }

    /// After the guardian panicked: releases the tenure it held, shows
    /// `SteppedDown` and waits the step-down delay. True when the guardian
    /// is cancelled meanwhile (it ends).
    async fn recover(&self, panic: Box<dyn std::any::Any + Send>) -> bool {
        let panic = panic_text(panic);
        error!(%panic, "the guardian panicked (a bug in highlander): releasing the id and claiming again");
        let token = self.slot.held.take();
        if let Some(token) = token {
            self.release(token).await;
        }
        self.set(SingletonState::SteppedDown);
        self.pause(self.shared.stepdown_delay).await
    }

    /// Claims, supervises and releases until the node shuts down or the id
    /// is removed. The slot's `held` names the tenure this node holds, for
    /// [`Guardian::run`].
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps a second copy of its arguments, in every guardian task"
    )]
    fn guard(&self) -> impl Future<Output = ()> + Send + '_ {
        async move {
            // In milliseconds: four bytes, not a `Duration`'s sixteen.
            let mut retry = RETRY_MIN_MS;
            // Which holder was last logged, as a hash of its name (0: none):
            // eight bytes instead of a copy of the name in every guardian.
            let mut last_holder = 0u64;
            loop {
                // Every wait is boxed: the task carries only what each state
                // needs (a waiting id the wait on its holder, a held one its
                // running tenure), and the task itself stays small.
                if !self.may_claim() {
                    if Box::pin(self.wait_resumed()).await {
                        break;
                    }
                    continue;
                }
                // Placement: a node further down the ranking for this id lets
                // the better-placed ones claim it first (boxed: only a
                // deferring guardian pays for the timer).
                let ranks = self.slot.defer_ranks(last_holder);
                if ranks > 0 && Box::pin(self.defer(last_holder)).await {
                    break;
                }
                // The answer is taken apart in a block of its own, and what
                // follows is one boxed future made inside it, so the task keeps
                // room for neither while it waits or runs. Boxed: only the ids
                // held here pay for a running instance's state; a waiting
                // guardian stays small.
                let (step, holding): (BoxFuture<'_, bool>, bool) = {
                    let Some(claim) = Box::pin(self.claim()).await else {
                        break;
                    };
                    match claim {
                        Err(e) => {
                            let delay = Duration::from_millis(retry.into());
                            debug!(error = %e, retry_in = ?delay, "cannot claim now");
                            self.set(SingletonState::Retrying {
                                error: e.to_string(),
                            });
                            retry = (retry * 2).min(RETRY_MAX_MS);
                            (Box::pin(self.pause(delay)), false)
                        }
                        Ok(Claim::Busy { holder, wake }) => {
                            retry = RETRY_MIN_MS;
                            last_holder = self.wait_on(holder, last_holder);
                            (Box::pin(self.wait_holder(wake)), false)
                        }
                        Ok(Claim::Granted(lease)) => {
                            retry = RETRY_MIN_MS;
                            last_holder = 0;
                            self.slot.held.set(Some(lease.token));
                            (Box::pin(self.tenure(lease)), true)
                        }
                    }
                };
                let end = step.await;
                if holding && !end {
                    self.slot.held.set(None);
                }
                if end {
                    break;
                }
            }
            self.set(SingletonState::Stopped);
        }
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
    ///
    /// An `async` block, not an `async fn`: an `async fn` keeps a second
    /// copy of its arguments, in every held id. (The caller records the
    /// tenure in [`Held`]: one reference less here.)
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps a second copy of its arguments, in every held id"
    )]
    fn tenure(&self, lease: Lease) -> impl Future<Output = bool> + '_ {
        async move {
            let running = {
                let tenure = info_span!("tenure", token = lease.token);
                tenure.in_scope(|| info!("claimed: running here"));
                // The span moves into the future: no second copy is kept.
                self.supervise(&lease).instrument(tenure)
            };
            let outcome = running.await;
            // Boxed: what follows a tenure is rare next to a running one.
            Box::pin(self.end_tenure(outcome, &lease)).await
        }
    }

    /// Releases the id by how its tenure ended (see [`Outcome`]); true
    /// when the guardian ends.
    async fn end_tenure(&self, outcome: Outcome, lease: &Lease) -> bool {
        match outcome {
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
                // While stepped down this node does not run the id: its
                // profile says so, so nobody hands the id back meanwhile.
                self.shared.placement.dirty.notify_one();
                let end = self.pause(self.shared.stepdown_delay).await;
                // Announced after the claim loop has moved on (the batch
                // waits 20 ms): the id is in the profile again.
                self.shared.placement.dirty.notify_one();
                end
            }
            Outcome::Moved => {
                self.hand_over(lease.token).await;
                false
            }
            Outcome::Finished(reason) => {
                self.set(SingletonState::Finished {
                    token: lease.token,
                    reason,
                });
                self.hold_finished(lease).await
            }
        }
    }

    /// Shows `Waiting` on `holder`, logging when it is not the holder last
    /// logged (`last`, a hash of its name); returns the new hash.
    fn wait_on(&self, holder: Option<Holder>, last: u64) -> u64 {
        let node = holder.as_ref().map(|h| h.node.as_str());
        let seen = node.map_or(0, name_hash);
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
                end = lease.holder_ended() => {
                    info!(token = lease.token, reason = %ShutdownReason::from(end), "tenure ended");
                    return false;
                }
                _ = self.slot.asked() => {
                    // Only a handoff releases a finished id; a step-down
                    // permit is for a running one.
                    if self.slot.asked_reason() == ShutdownReason::Moved {
                        self.hand_over(lease.token).await;
                        return false;
                    }
                }
            }
        }
    }

    /// Releases a tenure that was asked to move, to the member it moves to
    /// when there is one.
    async fn hand_over(&self, token: u64) {
        let id = &*self.slot.spec.id;
        let Some(target) = self.shared.placement.take_target(id) else {
            self.release(token).await;
            info!(token, "handed over");
            return;
        };
        match self.shared.session.release_to(id, token, &target).await {
            Ok(()) => info!(token, to = %target, "handed over"),
            Err(e) => {
                warn!(token, to = %target, error = %e, "release failed; the backend frees the id when this node's session ends")
            }
        }
    }

    /// Waits while better-placed members may claim the id: `grace` per rank
    /// ahead of this node, measured from now and looked at again whenever
    /// the ranks are recomputed. True when the guardian is cancelled first.
    async fn defer(&self, holder: u64) -> bool {
        let grace = self.shared.placement.grace;
        let start = tokio::time::Instant::now();
        let mut epoch = self.shared.placement.epoch.subscribe();
        loop {
            epoch.borrow_and_update();
            let ranks = self.slot.defer_ranks(holder);
            if ranks == 0 || grace.is_zero() {
                return false;
            }
            tokio::select! {
                biased;
                _ = self.slot.cancel.cancelled() => return true,
                _ = tokio::time::sleep_until(start + grace * ranks) => return false,
                changed = epoch.changed() => if changed.is_err() { return false },
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
}

mod slot;
mod supervise;

pub(crate) use slot::{Ask, Slot, name_hash};
#[cfg(test)]
pub(crate) mod tests;
