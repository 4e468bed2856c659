//! What a running instance can see: cancellation, its reason, identity,
//! fencing token, shared state, and its child tasks.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll, Waker};

use futures_util::FutureExt;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
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
    /// Set by [`Context::stop`]: the instance is cancelled once it is.
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
    /// Made at the first child, boxed: most services spawn none, and every
    /// running instance would keep room for both.
    spawned: Option<Box<Spawned>>,
    open: bool,
    /// Who waits for the instance to be cancelled: the tasks awaiting a
    /// [`Cancelled`] (each at the index it holds) and, once a user asked
    /// for one, the token behind [`Context::cancellation_token`]. Under the
    /// children's lock: a waiter list of its own would be eight bytes more
    /// in every instance's context, and a `tokio_util` token per instance
    /// (a tree node of its own, 112 bytes) was more still.
    waiters: Vec<Waiter>,
    /// The guardian's task, woken by [`Context::stop`] (see
    /// [`Context::poll_stopped`]): its one waker, not a waiter's entry.
    stopper: Option<Waker>,
}

/// The instance's children: the tracker to await them, and their abort
/// handles.
struct Spawned {
    tracker: TaskTracker,
    aborts: Vec<AbortHandle>,
}

/// One entry of [`Handles::waiters`].
enum Waiter {
    /// A free entry, to be reused.
    Free,
    /// The task awaiting the [`Cancelled`] that holds this index.
    Task(Waker),
    /// The token [`Context::cancellation_token`] hands out children of.
    Token(CancellationToken),
}

impl Children {
    fn lock(&self) -> std::sync::MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every child task has finished.
    pub(crate) async fn wait(&self) {
        let tracker = self.lock().spawned.as_ref().map(|s| s.tracker.clone());
        if let Some(tracker) = tracker {
            tracker.close();
            tracker.wait().await;
        }
    }

    /// Aborts every child task still running, and refuses new ones.
    pub(crate) fn abort_all(&self) {
        let mut handles = self.lock();
        handles.open = false;
        if let Some(spawned) = &mut handles.spawned {
            for handle in spawned.aborts.drain(..) {
                handle.abort();
            }
        }
    }

    pub(crate) fn running(&self) -> usize {
        self.lock().spawned.as_ref().map_or(0, |s| s.tracker.len())
    }
}

impl Context {
    /// A context that only [`Context::stop`] cancels.
    pub(crate) fn new(id: Arc<str>, node: Arc<str>, token: u64, state: Arc<StateMap>) -> Context {
        let children = Children {
            handles: Mutex::new(Handles {
                spawned: None,
                open: true,
                waiters: Vec::new(),
                stopper: None,
            }),
        };
        let inner = Inner {
            id,
            node,
            token,
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
        // Taken under the lock, after the reason is set: a waiter that
        // registered before is woken here, one that registers after sees
        // the reason (see `Cancelled::poll`).
        let (waiters, stopper) = {
            let mut handles = self.inner.children.lock();
            handles.open = false;
            (std::mem::take(&mut handles.waiters), handles.stopper.take())
        };
        for waiter in waiters {
            match waiter {
                Waiter::Free => {}
                Waiter::Task(waker) => waker.wake(),
                Waiter::Token(token) => token.cancel(),
            }
        }
        if let Some(stopper) = stopper {
            stopper.wake();
        }
    }

    /// Ready once [`Context::stop`] has run (a child task failed), for the
    /// one task that runs the instance: a poll with the task's waker kept
    /// in the context, not a place among the waiters, so the running part
    /// of every held id keeps nothing for it. User code waits with
    /// [`Context::cancelled`].
    pub(crate) fn poll_stopped(&self, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.is_cancelled() {
            return Poll::Ready(());
        }
        let mut handles = self.inner.children.lock();
        // Looked at again under the lock, as in `Cancelled::poll`.
        if self.is_cancelled() {
            return Poll::Ready(());
        }
        match &mut handles.stopper {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            stopper => *stopper = Some(cx.waker().clone()),
        }
        Poll::Pending
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
    ///
    /// Cancel safe: dropping the future before it completes loses nothing,
    /// and a new one completes at once once the instance is cancelled.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            ctx: self,
            index: None,
        }
    }

    /// True once the instance has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.inner.reason.get().is_some()
    }

    /// A token cancelled together with this instance, for libraries that take
    /// a `tokio_util` `CancellationToken`. Each call returns a new child of
    /// the instance's token (made at the first call): cancelling it cancels
    /// neither the instance nor the other tokens.
    pub fn cancellation_token(&self) -> CancellationToken {
        let mut handles = self.inner.children.lock();
        if self.is_cancelled() {
            // `stop` has taken (or is taking) the waiters: a token made now
            // would never be cancelled by it.
            drop(handles);
            let token = CancellationToken::new();
            token.cancel();
            return token;
        }
        let existing = handles.waiters.iter().find_map(|w| match w {
            Waiter::Token(token) => Some(token.child_token()),
            _ => None,
        });
        existing.unwrap_or_else(|| {
            let token = CancellationToken::new();
            let child = token.child_token();
            handles.waiters.push(Waiter::Token(token));
            child
        })
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
        let spawned = handles.spawned.get_or_insert_with(|| {
            Box::new(Spawned {
                tracker: TaskTracker::new(),
                aborts: Vec::new(),
            })
        });
        let task = spawned.tracker.spawn(async move {
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
        spawned.aborts.retain(|h| !h.is_finished());
        spawned.aborts.push(task.abort_handle());
        true
    }
}

/// The future of [`Context::cancelled`]: completes when the instance must
/// stop. It holds its place among the context's waiters (an index, freed
/// when it completes or is dropped), so awaiting it again and again in a
/// loop keeps no stale entry.
#[must_use = "futures do nothing unless awaited"]
pub struct Cancelled<'a> {
    ctx: &'a Context,
    /// Its entry in [`Handles::waiters`], once it has waited.
    index: Option<usize>,
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.ctx.is_cancelled() {
            this.index = None;
            return Poll::Ready(());
        }
        let mut handles = this.ctx.inner.children.lock();
        // Looked at again under the lock: `stop` sets the reason before it
        // takes the waiters under this lock, so either the reason is seen
        // here or the waker registered here is woken.
        if this.ctx.is_cancelled() {
            this.index = None;
            return Poll::Ready(());
        }
        let waiters = &mut handles.waiters;
        match this.index {
            Some(i) => match &mut waiters[i] {
                Waiter::Task(waker) if waker.will_wake(cx.waker()) => {}
                entry => *entry = Waiter::Task(cx.waker().clone()),
            },
            None => {
                let waker = Waiter::Task(cx.waker().clone());
                match waiters.iter().position(|w| matches!(w, Waiter::Free)) {
                    Some(i) => {
                        waiters[i] = waker;
                        this.index = Some(i);
                    }
                    None => {
                        waiters.push(waker);
                        this.index = Some(waiters.len() - 1);
                    }
                }
            }
        }
        Poll::Pending
    }
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.index.take() {
            let mut handles = self.ctx.inner.children.lock();
            // Gone when `stop` took the list meanwhile.
            if let Some(entry) = handles.waiters.get_mut(i) {
                *entry = Waiter::Free;
            }
            while matches!(handles.waiters.last(), Some(Waiter::Free)) {
                handles.waiters.pop();
            }
        }
    }
}

impl fmt::Debug for Cancelled<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cancelled")
            .field("cancelled", &self.ctx.is_cancelled())
            .finish_non_exhaustive()
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
    use super::*;
    use crate::test_util::soon;

    fn context() -> Context {
        Context::new("id".into(), "a".into(), 1, Arc::new(StateMap::new()))
    }

    /// Every waiter learns of the stop: futures awaited before it (also
    /// from other tasks, and one dropped and made again), futures made
    /// after it, and the tokens handed out before and after; a dropped
    /// waiter leaves no entry behind.
    #[tokio::test(start_paused = true)]
    async fn every_waiter_learns_of_the_stop() {
        let ctx = context();
        let early = ctx.cancellation_token();
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let ctx = ctx.clone();
                tokio::spawn(async move { ctx.cancelled().await })
            })
            .collect();
        assert!(soon(ctx.cancelled()).await.is_none(), "not stopped yet");
        // Waiting again and again (a `select!` in a loop) keeps no stale
        // entries: only the three tasks and the token wait.
        for _ in 0..10 {
            assert!(soon(ctx.cancelled()).await.is_none());
        }
        {
            let handles = ctx.children().lock();
            let waiters = &handles.waiters;
            let used = waiters
                .iter()
                .filter(|w| !matches!(w, Waiter::Free))
                .count();
            assert_eq!(used, 4, "three tasks and a token");
            assert!(waiters.len() <= 5, "a freed entry is reused");
        }
        let second = ctx.cancellation_token();
        second.cancel();
        assert!(
            !ctx.is_cancelled(),
            "a user's token does not stop the instance"
        );
        assert!(!early.is_cancelled(), "nor the other tokens");

        fn send_unpin<T: Send + Unpin>(_: &T) {}
        send_unpin(&ctx.cancelled());
        let mut pending = Box::pin(ctx.cancelled());
        assert!(soon(pending.as_mut()).await.is_none());
        ctx.stop(ShutdownReason::Removed);
        ctx.stop(ShutdownReason::NodeShutdown);
        assert_eq!(
            ctx.reason(),
            Some(ShutdownReason::Removed),
            "the first reason wins"
        );
        assert!(ctx.is_cancelled());
        assert!(soon(pending).await.is_some());
        for task in tasks {
            assert!(soon(task).await.is_some(), "a waiting task was woken");
        }
        assert!(early.is_cancelled());
        assert!(
            ctx.cancellation_token().is_cancelled(),
            "a token asked for late"
        );
        assert!(soon(ctx.cancelled()).await.is_some(), "a wait begun late");
    }

    /// Every running instance has one context: with the `Arc`'s counts and
    /// malloc's header, 184 B is a 208 B chunk (it was 200 B and a
    /// `tokio_util` token of 112 B behind `cancelled`, and before that two
    /// allocations, the child tasks' of their own).
    #[test]
    fn a_context_stays_small() {
        let inner = std::mem::size_of::<super::Inner>();
        println!("context {inner} B");
        assert!(inner <= 184, "the context grew to {inner} B");
    }
}
