//! One guardian per singleton id: claim, run the instance under its
//! supervisor, watch the lease, release, and take over when the holder goes.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::backend::{Claim, ClaimRequest, Holder, Lease, Session};
use crate::context::{Children, StateMap, panic_message};
use crate::spec::{ChildSpec, Restart};
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
/// `{"state": "claiming"}`.
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
    /// The backend could not be asked; retrying.
    Retrying {
        /// The backend's error.
        error: String,
    },
    /// The runtime has stopped; nothing runs here.
    Stopped,
}

/// The state of one guardian, shared with the runtime handle.
pub(crate) struct Slot {
    pub(crate) spec: ChildSpec,
    pub(crate) state: Mutex<SingletonState>,
    pub(crate) step_down: Notify,
    pub(crate) ops: crate::ops::SlotOps,
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
}

/// How a tenure's supervision ended.
enum Outcome {
    Shutdown,
    Lost(ShutdownReason),
    Stepdown,
    Finished(ShutdownReason),
}

pub(crate) struct Guardian {
    pub(crate) slot: Arc<Slot>,
    pub(crate) shared: Arc<Shared>,
}

impl Guardian {
    fn set(&self, state: SingletonState) {
        let mut current = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if *current != state {
            self.slot.ops.transition(&self.shared.ops, &current, &state);
            *current = state;
            drop(current);
            self.shared.version.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Runs until the node shuts down.
    pub(crate) async fn run(self) {
        let span = info_span!("singleton", id = %self.slot.spec.id, node = %self.shared.node);
        let _exit = crate::ops::ExitGuard::new(&self.slot, &self.shared.ops);
        self.guard().instrument(span).await;
    }

    async fn guard(&self) {
        let shutdown = self.shared.shutdown.clone();
        let session = self.shared.session.clone();
        let request = ClaimRequest {
            id: self.slot.spec.id.clone(),
            stop_budget: self.slot.spec.shutdown,
        };
        let mut retry = RETRY_MIN;
        let mut last_holder: Option<String> = None;
        loop {
            self.set(SingletonState::Claiming);
            let claim = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                claim = session.try_claim(request.clone()) => claim,
            };
            match claim {
                Err(e) => {
                    debug!(error = %e, retry_in = ?retry, "cannot claim now");
                    self.set(SingletonState::Retrying {
                        error: e.to_string(),
                    });
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
                Ok(Claim::Busy { holder, wake }) => {
                    retry = RETRY_MIN;
                    let holder_node = holder.as_ref().map(|h| h.node.clone());
                    if holder_node != last_holder {
                        debug!(
                            holder = holder_node.as_deref().unwrap_or("unknown"),
                            "waiting: held elsewhere"
                        );
                        last_holder = holder_node;
                    }
                    self.set(SingletonState::Waiting { holder });
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = wake => {}
                    }
                }
                Ok(Claim::Granted(lease)) => {
                    retry = RETRY_MIN;
                    last_holder = None;
                    let tenure = info_span!("tenure", token = lease.token);
                    tenure.in_scope(|| info!("claimed: running here"));
                    let outcome = self.supervise(&lease).instrument(tenure).await;
                    match outcome {
                        Outcome::Shutdown => {
                            self.release(&lease).await;
                            break;
                        }
                        Outcome::Lost(reason) => {
                            info!(token = lease.token, %reason, "tenure ended");
                        }
                        Outcome::Stepdown => {
                            self.release(&lease).await;
                            self.set(SingletonState::SteppedDown);
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = sleep(self.shared.stepdown_delay) => {}
                            }
                        }
                        Outcome::Finished(reason) => {
                            self.set(SingletonState::Finished {
                                token: lease.token,
                                reason,
                            });
                            tokio::select! {
                                _ = shutdown.cancelled() => {
                                    self.release(&lease).await;
                                    break;
                                }
                                end = lease.ended() => {
                                    info!(token = lease.token, reason = %ShutdownReason::from(end), "tenure ended");
                                }
                            }
                        }
                    }
                }
            }
        }
        self.set(SingletonState::Stopped);
    }

    async fn release(&self, lease: &Lease) {
        match self
            .shared
            .session
            .release(&self.slot.spec.id, lease.token)
            .await
        {
            Ok(()) => debug!(token = lease.token, "released"),
            Err(e) => {
                warn!(token = lease.token, error = %e, "release failed; the backend frees the id when this node's session ends")
            }
        }
    }

    /// Runs instances while the lease holds, restarting them by policy.
    async fn supervise(&self, lease: &Lease) -> Outcome {
        let spec = &self.slot.spec;
        let shutdown = &self.shared.shutdown;
        let mut restarts: VecDeque<Instant> = VecDeque::new();
        let mut total_restarts = 0u32;
        let mut backoff = RESTART_BACKOFF_MIN;
        loop {
            self.set(SingletonState::Running {
                token: lease.token,
                restarts: total_restarts,
            });
            let started = Instant::now();
            let reason = self.run_instance(lease).await;
            self.slot.ops.stopped(&reason);
            let restart = match &reason {
                ShutdownReason::NodeShutdown => return Outcome::Shutdown,
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
            tokio::select! {
                _ = shutdown.cancelled() => return Outcome::Shutdown,
                end = lease.ended() => return Outcome::Lost(end.into()),
                _ = self.slot.step_down.notified() => return Outcome::Stepdown,
                _ = sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
        }
    }

    /// Builds and runs one instance, and always ends it the same way:
    /// cancel, await `run`, await every child, `terminate(reason)`, all within
    /// the shutdown budget. Returns why it stopped.
    async fn run_instance(&self, lease: &Lease) -> ShutdownReason {
        let spec = &self.slot.spec;
        let (ctx, mut failures) = Context::new(
            spec.id.clone(),
            self.shared.node.clone(),
            lease.token,
            self.shared.state.clone(),
        );
        let children = ctx.children().clone();
        let _abort_children = AbortOnDrop(children.clone());

        let stop_trigger = async {
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => ShutdownReason::NodeShutdown,
                end = lease.ended() => end.into(),
                _ = self.slot.step_down.notified() => ShutdownReason::Stepdown,
                Some(f) = failures.recv() => {
                    ShutdownReason::Error(format!("child task `{}` failed: {}", f.name, f.why))
                }
            }
        };
        tokio::pin!(stop_trigger);

        // Build the instance.
        let built = tokio::select! {
            built = AssertUnwindSafe((spec.build)(&ctx)).catch_unwind() => built,
            reason = &mut stop_trigger => {
                ctx.stop(reason.clone());
                let deadline = Instant::now() + spec.shutdown;
                stop_children(&children, deadline).await;
                return reason;
            }
        };
        let mut service = match built {
            Ok(Ok(service)) => service,
            Ok(Err(e)) => {
                let reason = ShutdownReason::Error(format!("init failed: {e}"));
                warn!(%reason, "instance could not be built");
                ctx.stop(reason.clone());
                stop_children(&children, Instant::now() + spec.shutdown).await;
                return reason;
            }
            Err(panic) => {
                let reason =
                    ShutdownReason::Error(format!("init panicked: {}", panic_message(&*panic)));
                warn!(%reason, "instance could not be built");
                ctx.stop(reason.clone());
                stop_children(&children, Instant::now() + spec.shutdown).await;
                return reason;
            }
        };

        // Run it until it returns or something stops it.
        let (reason, deadline) = {
            let run = AssertUnwindSafe(service.run_dyn(&ctx)).catch_unwind();
            tokio::pin!(run);
            let (reason, returned) = tokio::select! {
                result = &mut run => {
                    let reason = match result {
                        Ok(Ok(())) => ctx.reason().unwrap_or(ShutdownReason::Normal),
                        Ok(Err(e)) => ShutdownReason::Error(e.to_string()),
                        Err(panic) => ShutdownReason::Error(format!("panicked: {}", panic_message(&*panic))),
                    };
                    (reason, true)
                }
                reason = &mut stop_trigger => (reason, false),
            };
            ctx.stop(reason.clone());
            let reason = ctx.reason().unwrap_or(reason);
            let deadline = Instant::now() + spec.shutdown;
            if !returned {
                debug!(%reason, "stopping instance");
                match timeout_at(deadline, &mut run).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => debug!(error = %e, "run returned an error while stopping"),
                    Ok(Err(panic)) => {
                        warn!(panic = %panic_message(&*panic), "run panicked while stopping")
                    }
                    Err(_) => {
                        warn!(
                            budget = ?spec.shutdown,
                            %reason,
                            "run did not return within the shutdown budget: dropped without terminate"
                        );
                        children.abort_all();
                        return reason;
                    }
                }
            }
            (reason, deadline)
        };
        if !stop_children(&children, deadline).await {
            return reason;
        }
        match timeout_at(
            deadline,
            AssertUnwindSafe(service.terminate_dyn(reason.clone())).catch_unwind(),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(panic)) => warn!(panic = %panic_message(&*panic), "terminate panicked"),
            Err(_) => {
                warn!(budget = ?spec.shutdown, %reason, "terminate overran the shutdown budget: dropped")
            }
        }
        reason
    }
}

/// Awaits every child until `deadline`, then aborts the rest. Returns false
/// when the budget ran out.
async fn stop_children(children: &Children, deadline: Instant) -> bool {
    if timeout_at(deadline, children.wait()).await.is_ok() {
        return true;
    }
    warn!(
        running = children.running(),
        "child tasks overran the shutdown budget: aborted"
    );
    children.abort_all();
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
