//! What a running instance can see: cancellation, its reason, identity,
//! fencing token, shared state, and its child tasks.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::FutureExt;
use futures_util::task::AtomicWaker;
use tokio::task::AbortHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

use crate::{Error, Result, ShutdownReason};

/// Shared application state, keyed by type.
pub(crate) type StateMap = HashMap<TypeId, Arc<dyn Any + Send + Sync>>;

/// The handle a running instance gets: passed to `run`, to an `init`
/// function, and cloneable into child tasks.
///
/// ```
/// use highlander::{Context, Service};
///
/// struct Worker;
/// impl Service for Worker {
///     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
///         tracing::info!(id = ctx.id(), node = ctx.node(), token = ctx.fencing_token(), "started");
///         ctx.cancelled().await;
///         tracing::info!(reason = ?ctx.reason(), "stopping");
///         Ok(())
///     }
/// }
/// ```
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    id: Arc<str>,
    node: Arc<str>,
    token: u64,
    cancel: CancellationToken,
    /// The guardian's task, woken by [`Context::stop`] (see
    /// [`Context::stopped`]).
    stopper: AtomicWaker,
    reason: OnceLock<ShutdownReason>,
    state: Arc<StateMap>,
    /// Inline, not an `Arc` of its own: one allocation per instance.
    children: Children,
    /// The instance's spans (`singleton` with `id` and `node`, `tenure`
    /// with `token`), so child tasks log with them too.
    span: tracing::Span,
}

/// The instance's child tasks.
pub(crate) struct Children {
    /// The tracker, the abort handles of the children, and whether new ones
    /// are still taken. One lock for all, so no child can start after
    /// `close` or slip past `abort_all` (and one lock is eight bytes less
    /// than a lock and a `OnceLock` in every instance's context).
    handles: Mutex<Handles>,
}

struct Handles {
    /// Made at the first child: most services spawn none.
    tracker: Option<TaskTracker>,
    aborts: Vec<AbortHandle>,
    open: bool,
}

impl Children {
    fn lock(&self) -> std::sync::MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every child task has finished.
    pub(crate) async fn wait(&self) {
        let tracker = self.lock().tracker.clone();
        if let Some(tracker) = tracker {
            tracker.close();
            tracker.wait().await;
        }
    }

    /// Refuses every child spawned from now on.
    fn close(&self) {
        self.lock().open = false;
    }

    /// Aborts every child task still running, and refuses new ones.
    pub(crate) fn abort_all(&self) {
        let mut handles = self.lock();
        handles.open = false;
        for handle in handles.aborts.drain(..) {
            handle.abort();
        }
    }

    pub(crate) fn running(&self) -> usize {
        self.lock().tracker.as_ref().map_or(0, TaskTracker::len)
    }
}

impl Context {
    /// A context that [`Context::stop`] cancels with `cancel`.
    pub(crate) fn new(
        id: Arc<str>,
        node: Arc<str>,
        token: u64,
        state: Arc<StateMap>,
        cancel: CancellationToken,
    ) -> Context {
        let children = Children {
            handles: Mutex::new(Handles {
                tracker: None,
                aborts: Vec::new(),
                open: true,
            }),
        };
        let inner = Inner {
            id,
            node,
            token,
            cancel,
            stopper: AtomicWaker::new(),
            reason: OnceLock::new(),
            state,
            children,
            span: tracing::Span::current(),
        };
        Context {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn children(&self) -> &Children {
        &self.inner.children
    }

    /// Records why the instance stops (the first reason wins), refuses new
    /// children and cancels it.
    pub(crate) fn stop(&self, reason: ShutdownReason) {
        let _ = self.inner.reason.set(reason);
        self.inner.children.close();
        self.inner.cancel.cancel();
        self.inner.stopper.wake();
    }

    /// Completes once [`Context::stop`] has run (a child task failed), for
    /// the one task that runs the instance: a reference instead of a
    /// registration in the token's wait list, so the running part of every
    /// held id stays small. User code waits with [`Context::cancelled`].
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(move |cx| {
            if self.is_cancelled() {
                return std::task::Poll::Ready(());
            }
            self.inner.stopper.register(cx.waker());
            // Looked at again after registering: a stop in between has
            // either been seen here or wakes the waker just registered.
            if self.is_cancelled() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// The singleton id this instance runs for.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The name of this node (`HIGHLANDER_NODE`, or host and pid).
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The fencing token of the current tenure: strictly greater than every
    /// token handed out before for this id. Pass it to downstream systems so
    /// they can refuse writes from a stale holder.
    pub fn fencing_token(&self) -> u64 {
        self.inner.token
    }

    /// Completes when the instance must stop; [`Context::reason`] then says why.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.inner.cancel.cancelled()
    }

    /// True once the instance has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// A token cancelled together with this instance, for libraries that take
    /// a `tokio_util` `CancellationToken`.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner.cancel.child_token()
    }

    /// Why the instance is stopping, once known.
    pub fn reason(&self) -> Option<ShutdownReason> {
        self.inner.reason.get().cloned()
    }

    /// Shared state registered with
    /// [`Builder::state`](crate::Builder::state).
    ///
    /// ```
    /// # use highlander::{Context, Service};
    /// struct Config { greeting: String }
    /// struct Greeter;
    /// impl Service for Greeter {
    ///     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
    ///         let config = ctx.state::<Config>()?;
    ///         println!("{}", config.greeting);
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn state<T: Any + Send + Sync>(&self) -> Result<&T> {
        self.inner
            .state
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
            .ok_or(Error::MissingState {
                type_name: std::any::type_name::<T>(),
            })
    }

    /// Starts a child task that lives and dies with this instance: the
    /// singleton's supervision tree, one-for-all. If the child returns an
    /// error or panics, the whole instance is stopped with
    /// [`ShutdownReason::Error`] and restarted by its policy. When the
    /// instance stops, the context is cancelled and every child is awaited
    /// before `terminate` runs: until three quarters of the shutdown budget
    /// are spent, then the rest are aborted (see
    /// [`ChildSpec::shutdown`](crate::ChildSpec::shutdown)). A child that
    /// returns `Ok(())` simply ends.
    ///
    /// Returns whether the child was started. Once the instance is stopping
    /// (its context is cancelled, so also from `terminate` or from a child
    /// that outlives `run`), a new child is refused: `spawn` returns `false`
    /// and drops `future` without ever polling it, so nothing outlives its
    /// instance.
    ///
    /// ```
    /// use highlander::{Context, Service};
    ///
    /// struct Pipeline;
    /// impl Service for Pipeline {
    ///     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
    ///         for stage in ["fetch", "transform", "store"] {
    ///             let child = ctx.clone();
    ///             ctx.spawn(stage, async move {
    ///                 child.cancelled().await;
    ///                 Ok(())
    ///             });
    ///         }
    ///         ctx.cancelled().await;
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn spawn<F>(&self, name: impl Into<String>, future: F) -> bool
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let name = name.into();
        let children = &self.inner.children;
        let mut handles = children.lock();
        if !handles.open || self.is_cancelled() {
            drop(handles);
            tracing::debug!(child = %name, "the instance is stopping: child task refused");
            return false;
        }
        // The child stops its instance itself when it fails: no channel
        // to the instance runner, which sees the context cancelled.
        let instance = self.clone();
        let future = tracing::Instrument::instrument(future, self.inner.span.clone());
        let task = handles
            .tracker
            .get_or_insert_with(TaskTracker::new)
            .spawn(async move {
                // The future is awaited inside the guarded block, so it is also
                // dropped there; the error's text (its `Display`, user code) is
                // taken under `catch_unwind` as well.
                let outcome = AssertUnwindSafe(async move { future.await.map_err(describe_error) })
                    .catch_unwind()
                    .await;
                let why = match outcome {
                    Ok(Ok(())) => return,
                    Ok(Err(why)) => why,
                    Err(panic) => format!("panicked: {}", panic_text(panic)),
                };
                if !instance.is_cancelled() {
                    instance.stop(ShutdownReason::Error(format!(
                        "child task `{name}` failed: {why}"
                    )));
                }
            });
        handles.aborts.retain(|h| !h.is_finished());
        handles.aborts.push(task.abort_handle());
        true
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.inner.id)
            .field("node", &self.inner.node)
            .field("token", &self.inner.token)
            .field("cancelled", &self.is_cancelled())
            .field("reason", &self.inner.reason.get())
            .finish_non_exhaustive()
    }
}

/// Runs `f`, turning a panic into its message.
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(panic_text)
}

/// The text of a caught panic. The payload is dropped under `catch_unwind`
/// too (a payload is user code); one whose drop panics again is leaked.
pub(crate) fn panic_text(payload: Box<dyn Any + Send>) -> String {
    let text = panic_message(&*payload);
    if let Err(again) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
    text
}

/// The text of an error from user code: its `Display` and its `Drop` are user
/// code, so both run under `catch_unwind`.
pub(crate) fn describe_error(error: Error) -> String {
    catch(move || error.to_string())
        .unwrap_or_else(|panic| format!("(the error's Display panicked: {panic})"))
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

#[cfg(test)]
mod tests {
    /// Every running instance has one context: with the `Arc`'s counts and
    /// malloc's header, 200 B is a 224 B chunk (it was two allocations, the
    /// child tasks' of their own).
    #[test]
    fn a_context_stays_small() {
        let inner = std::mem::size_of::<super::Inner>();
        println!("context {inner} B");
        assert!(inner <= 200, "the context grew to {inner} B");
    }
}
