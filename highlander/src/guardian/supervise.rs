//! One tenure's instances: build, run, restart by policy, and stop each
//! the same way, with every call into user code guarded.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout_at};
use tracing::{debug, info, warn};

use crate::backend::Lease;
use crate::context::{Children, catch, describe_error};
use crate::service::BoxFuture;
use crate::spec::{Restart, terminate_reserve};
use crate::{Context, ShutdownReason};

use super::{Guardian, Outcome, SingletonState};

/// The first restart waits this long; each further one twice as long.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(10);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Guardian {
    /// Runs instances while the lease holds, restarting them by policy.
    ///
    /// An `async` block, not an `async fn`, for the reason given at
    /// [`Guardian::run_instance`].
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps a second copy of its arguments, in every held id"
    )]
    pub(super) fn supervise<'a>(
        &'a self,
        lease: &'a Lease,
    ) -> impl Future<Output = Outcome> + Send + 'a {
        async move {
            // Boxed, and made at the first restart: most tenures never restart.
            let mut history: Option<Box<Restarts>> = None;
            // A step-down asked for during an earlier tenure is not for this one.
            self.slot.clear_asks();
            loop {
                self.set(SingletonState::Running {
                    token: lease.token,
                    restarts: history.as_ref().map_or(0, |h| h.total),
                });
                let started = Instant::now();
                let reason = self.run_instance(lease).await;
                let backoff = match self.restart(reason, started, &mut history) {
                    Ok(backoff) => backoff,
                    Err(outcome) => return outcome,
                };
                // Boxed: only an instance between restarts pays for it.
                if let Some(outcome) = Box::pin(self.backoff(lease, backoff)).await {
                    return outcome;
                }
                if let Some(restarts) = &mut history {
                    restarts.backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
                }
            }
        }
    }

    /// After an instance started at `started` stopped for `reason`: the
    /// wait before it is restarted, or how the tenure ends (by the reason,
    /// the restart policy, or the restart intensity; `history` keeps the
    /// tenure's restarts).
    fn restart(
        &self,
        reason: ShutdownReason,
        started: Instant,
        history: &mut Option<Box<Restarts>>,
    ) -> Result<Duration, Outcome> {
        let spec = &self.slot.spec;
        self.slot
            .ops
            .stopped(&self.shared.node, &self.slot.spec.id, &reason);
        let restart = match &reason {
            ShutdownReason::NodeShutdown | ShutdownReason::Removed => {
                return Err(Outcome::Shutdown);
            }
            ShutdownReason::Moved => return Err(Outcome::Moved),
            ShutdownReason::LeaseLost | ShutdownReason::Conflict => {
                return Err(Outcome::Lost(reason));
            }
            ShutdownReason::Stepdown => return Err(Outcome::Stepdown),
            ShutdownReason::Normal => spec.restart == Restart::Permanent,
            ShutdownReason::Error(_) => spec.restart != Restart::Temporary,
        };
        if !restart {
            info!(%reason, "instance ended; not restarted ({:?})", spec.restart);
            return Err(Outcome::Finished(reason));
        }
        let now = Instant::now();
        let restarts = history.get_or_insert_with(|| {
            Box::new(Restarts {
                at: VecDeque::new(),
                backoff: RESTART_BACKOFF_MIN,
                total: 0,
            })
        });
        if now.duration_since(started) > spec.intensity.period {
            restarts.backoff = RESTART_BACKOFF_MIN;
        }
        restarts.at.push_back(now);
        while restarts
            .at
            .front()
            .is_some_and(|t| now.duration_since(*t) > spec.intensity.period)
        {
            restarts.at.pop_front();
        }
        if restarts.at.len() > spec.intensity.max_restarts as usize {
            warn!(
                %reason,
                max_restarts = spec.intensity.max_restarts,
                period = ?spec.intensity.period,
                "restart intensity exceeded: stepping down so another node can try"
            );
            return Err(Outcome::Stepdown);
        }
        restarts.total += 1;
        let backoff = restarts.backoff;
        info!(%reason, restart_in = ?backoff, "instance stopped; restarting");
        Ok(backoff)
    }

    /// Waits `backoff` before a restart, unless the tenure ends first.
    async fn backoff(&self, lease: &Lease, backoff: Duration) -> Option<Outcome> {
        tokio::select! {
            reason = self.slot.stop_or_ask() => Some(match reason {
                ShutdownReason::Moved => Outcome::Moved,
                ShutdownReason::Stepdown => Outcome::Stepdown,
                _ => Outcome::Shutdown,
            }),
            end = lease.holder_ended() => Some(Outcome::Lost(end.into())),
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
    ///
    /// An `async` block, not an `async fn`: an `async fn` keeps a second
    /// copy of its arguments in every running instance. What the instance
    /// keeps while it runs is what the block holds at its one long wait
    /// (`Running`): the context, the service, `run`'s future and the late
    /// panic; every other phase is boxed, and the stop trigger is polled in
    /// place and keeps nothing.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps a second copy of its arguments, in every held id"
    )]
    pub(super) fn run_instance<'a>(
        &'a self,
        lease: &'a Lease,
    ) -> impl Future<Output = ShutdownReason> + Send + 'a {
        async move {
            let ctx = Context::new(
                self.slot.spec.id.clone(),
                self.shared.node.clone(),
                lease.token,
                self.shared.state.clone(),
            );
            let instance = Instance {
                ctx,
                late: LatePanic::default(),
            };
            // (`instance.ctx` and `instance.late` are named in full below:
            // a reference kept in a local would take room of its own.)

            // Boxed: only an instance being built pays for the factory's state.
            let mut service =
                match Box::pin(build(self, &instance.ctx, lease, &instance.late)).await {
                    Ok(service) => service,
                    Err(reason) => return reason,
                };

            // Run it until it returns or something stops it. `run` and the
            // children may use the budget up to the terminate reserve. The
            // stop is boxed (as is `terminate` below: only an instance that
            // is stopping pays for the timers of its stop), and `run` moves
            // into it before it is awaited, so no room is kept for either
            // beside the other.
            let stopping = {
                // Thin references, moved in: the closure would otherwise
                // keep the service's wide one.
                let service = &mut service;
                let ctx = &instance.ctx;
                let run = Guarded::new(What::Run, move || service.run_dyn(ctx), &instance.late);
                let (reason, returned, run) = Running {
                    guardian: self,
                    run: Some(run),
                    ctx: &instance.ctx,
                    lease,
                }
                .await;
                instance.ctx.stop(reason.clone());
                let reason = instance.ctx.reason().unwrap_or(reason);
                Box::pin(stop_run(
                    run,
                    returned,
                    reason,
                    instance.ctx.children(),
                    self.slot.spec.shutdown,
                ))
            };
            let (reason, deadline) = stopping.await;

            let budget = self.slot.spec.shutdown;
            let late = &instance.late;
            Box::pin(terminate(&mut *service, &reason, deadline, budget, late)).await;
            if let Err(panic) = catch(move || drop(service)) {
                warn!(%panic, "dropping the service panicked");
                instance
                    .late
                    .record(format!("dropping the service panicked: {panic}"));
            }
            instance.late.after(reason)
        }
    }

    /// Ready with the reason when something outside the instance stops
    /// it: the node shuts down or the id is removed, a child failed, the
    /// lease ended, or a handle asked it to give the id up. A poll, so the
    /// running instance keeps no state for it: each source keeps its one
    /// waker itself.
    pub(super) fn poll_stop(
        &self,
        ctx: &Context,
        lease: &Lease,
        cx: &mut TaskContext<'_>,
    ) -> Poll<ShutdownReason> {
        // The node shuts down, the id was removed, or a handle asked.
        if let Poll::Ready(reason) = self.slot.poll_stop_or_ask(cx) {
            return Poll::Ready(reason);
        }
        // A child failed: it stopped the context with its error.
        if ctx.poll_stopped(cx).is_ready() {
            return Poll::Ready(ctx.reason().unwrap_or(ShutdownReason::Normal));
        }
        lease.poll_holder_ended(cx).map(ShutdownReason::from)
    }

    /// [`Guardian::poll_stop`] as a future.
    pub(super) fn stop_trigger<'a>(
        &'a self,
        ctx: &'a Context,
        lease: &'a Lease,
    ) -> impl Future<Output = ShutdownReason> + Send + 'a {
        std::future::poll_fn(move |cx| self.poll_stop(ctx, lease, cx))
    }
}

/// A running instance: `run` until it returns (`true`) or something stops
/// the instance (`false`), with the reason, and `run` handed back for its
/// stop. Polled by hand: the one wait every running instance sits in, and
/// it keeps `run` and three references.
struct Running<'r, 'a, F> {
    guardian: &'r Guardian,
    run: Option<Guarded<'a, F, crate::Result<()>>>,
    ctx: &'r Context,
    lease: &'r Lease,
}

impl<'a, F> Future for Running<'_, 'a, F>
where
    F: FnOnce() -> BoxFuture<'a, crate::Result<()>> + Unpin,
{
    type Output = (ShutdownReason, bool, Guarded<'a, F, crate::Result<()>>);

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(run) = &mut this.run else {
            return Poll::Pending;
        };
        let (reason, returned) = match Pin::new(&mut *run).poll(cx) {
            Poll::Ready(result) => {
                let reason = match result {
                    Ok(Ok(())) => this.ctx.reason().unwrap_or(ShutdownReason::Normal),
                    Ok(Err(e)) => ShutdownReason::Error(describe_error(e)),
                    Err(panic) => ShutdownReason::Error(format!("panicked: {panic}")),
                };
                (reason, true)
            }
            Poll::Pending => match this.guardian.poll_stop(this.ctx, this.lease, cx) {
                Poll::Ready(reason) => (reason, false),
                Poll::Pending => return Poll::Pending,
            },
        };
        match this.run.take() {
            Some(run) => Poll::Ready((reason, returned, run)),
            None => Poll::Pending,
        }
    }
}

/// A running instance's context and late panic. Dropping it (the
/// runtime was aborted) aborts the instance's children, so no child
/// outlives its instance.
struct Instance {
    ctx: Context,
    late: LatePanic,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.ctx.children().abort_all();
    }
}

/// A tenure's restarts: when each happened (within the intensity period)
/// and the wait before the next one.
struct Restarts {
    at: VecDeque<Instant>,
    backoff: Duration,
    /// Restarts within the tenure so far (shown in its state).
    total: u32,
}

/// Builds the instance, unless the instance is stopped first (see
/// [`Guardian::poll_stop`]); then, or when the factory fails, stops what it
/// started and returns the reason. The factory is called inside the guarded
/// poll, so a panic in its synchronous part is caught too.
async fn build(
    guardian: &Guardian,
    ctx: &Context,
    lease: &Lease,
    late: &LatePanic,
) -> Result<Box<dyn crate::service::DynService>, ShutdownReason> {
    let spec = &guardian.slot.spec;
    let children = ctx.children();
    let mut build = Guarded::new(What::Factory, || (spec.build)(ctx), late);
    let built = tokio::select! {
        built = &mut build => built,
        reason = guardian.stop_trigger(ctx, lease) => {
            ctx.stop(reason.clone());
            drop(build);
            let deadline = Instant::now() + spec.shutdown;
            stop_children(children, deadline, deadline).await;
            return Err(late.after(reason));
        }
    };
    drop(build);
    match built {
        Ok(Ok(service)) => Ok(service),
        failed => {
            let reason = ShutdownReason::Error(match failed {
                Ok(Err(e)) => format!("init failed: {}", describe_error(e)),
                Err(panic) => format!("init panicked: {panic}"),
                Ok(Ok(_)) => unreachable!("matched above"),
            });
            warn!(%reason, "instance could not be built");
            ctx.stop(reason.clone());
            let deadline = Instant::now() + spec.shutdown;
            stop_children(children, deadline, deadline).await;
            Err(reason)
        }
    }
}

/// Stops `run` once the instance is cancelled with `reason`: awaits it
/// until only the terminate reserve is left of the budget (unless it has
/// returned), drops it (guarded), then awaits the children likewise.
/// Returns the reason and the end of the budget, which starts now.
async fn stop_run<'a, F>(
    mut run: Guarded<'a, F, crate::Result<()>>,
    returned: bool,
    reason: ShutdownReason,
    children: &Children,
    budget: Duration,
) -> (ShutdownReason, Instant)
where
    F: FnOnce() -> BoxFuture<'a, crate::Result<()>> + Unpin,
{
    let deadline = Instant::now() + budget;
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
    (reason, deadline)
}

/// Runs `terminate(reason)` until the end of the budget.
async fn terminate(
    service: &mut dyn crate::service::DynService,
    reason: &ShutdownReason,
    deadline: Instant,
    budget: Duration,
    late: &LatePanic,
) {
    let mut terminate = Guarded::new(
        What::Terminate,
        || service.terminate_dyn(reason.clone()),
        late,
    );
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
///
/// A boxed `str`, not a `String`: every running instance keeps one.
#[derive(Default)]
struct LatePanic(Mutex<Option<Box<str>>>);

impl LatePanic {
    fn record(&self, why: String) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why.into_boxed_str());
    }

    /// The instance's final reason: a late panic turns a normal stop into an
    /// error (so `transient` restarts it). Any other reason stands: the
    /// instance was stopping for it anyway, and an error already says so.
    fn after(&self, reason: ShutdownReason) -> ShutdownReason {
        let late = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match (reason, late) {
            (ShutdownReason::Normal, Some(why)) => ShutdownReason::Error(why.into()),
            (reason, Some(why)) => {
                debug!(%reason, panic = %why, "panic while stopping; the reason stands");
                reason
            }
            (reason, None) => reason,
        }
    }
}

/// Which user code a [`Guarded`] runs, for its messages: one byte, not a
/// `&str` (the `run` of every running instance keeps one).
#[derive(Clone, Copy)]
enum What {
    Factory,
    Run,
    Terminate,
}

impl std::fmt::Display for What {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            What::Factory => "the factory",
            What::Run => "run",
            What::Terminate => "terminate",
        })
    }
}

/// A future of user code that cannot unwind into the guardian: the call that
/// creates it (the synchronous part of a factory, `run` or `terminate`), every
/// poll, and dropping it, finished or not, all run under `catch_unwind`. A
/// panic while polling or finishing is its output, `Err(message)`; a panic
/// while dropping it unfinished is recorded in the instance's [`LatePanic`].
struct Guarded<'a, F, T> {
    what: What,
    stage: Stage<F, BoxFuture<'a, T>>,
    late: &'a LatePanic,
}

/// Where a [`Guarded`] is: not yet called, running, or finished. One enum,
/// not two options: eight bytes less in every running instance.
enum Stage<F, Fut> {
    Make(F),
    Running(Fut),
    Done,
}

impl<'a, F, T> Guarded<'a, F, T>
where
    F: FnOnce() -> BoxFuture<'a, T> + Unpin,
{
    fn new(what: What, make: F, late: &'a LatePanic) -> Self {
        Guarded {
            what,
            stage: Stage::Make(make),
            late,
        }
    }
}

impl<'a, F, T> Guarded<'a, F, T> {
    /// The future, taken out (to be dropped under `catch_unwind`).
    fn take_future(&mut self) -> Option<BoxFuture<'a, T>> {
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Running(future) => Some(future),
            _ => None,
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
            if matches!(this.stage, Stage::Make(_)) {
                let Stage::Make(make) = std::mem::replace(&mut this.stage, Stage::Done) else {
                    unreachable!("matched above");
                };
                this.stage = Stage::Running(make());
            }
            match &mut this.stage {
                Stage::Running(future) => Some(future.as_mut().poll(cx)),
                _ => None,
            }
        });
        match polled {
            Ok(Some(Poll::Pending)) => Poll::Pending,
            Ok(Some(Poll::Ready(value))) => {
                let future = this.take_future();
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
                let future = this.take_future();
                let _ = catch(move || drop(future));
                Poll::Ready(Err(panic))
            }
        }
    }
}

impl<F, T> Drop for Guarded<'_, F, T> {
    fn drop(&mut self) {
        let future = self.take_future();
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
