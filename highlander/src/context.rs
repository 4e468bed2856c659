//! What a running instance can see: cancellation, its reason, identity,
//! fencing token, shared state, and its child tasks.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::FutureExt;
use tokio::sync::mpsc;
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
    reason: OnceLock<ShutdownReason>,
    state: Arc<StateMap>,
    children: Arc<Children>,
    /// The instance's spans (`singleton` with `id` and `node`, `tenure`
    /// with `token`), so child tasks log with them too.
    span: tracing::Span,
}

/// A child task that failed, reported to the instance runner.
pub(crate) struct ChildFailure {
    pub(crate) name: String,
    pub(crate) why: String,
}

/// The instance's child tasks.
pub(crate) struct Children {
    tracker: TaskTracker,
    aborts: Mutex<Vec<AbortHandle>>,
    failures: mpsc::UnboundedSender<ChildFailure>,
}

impl Children {
    /// Waits until every child task has finished.
    pub(crate) async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Aborts every child task still running.
    pub(crate) fn abort_all(&self) {
        for handle in self
            .aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            handle.abort();
        }
    }

    pub(crate) fn running(&self) -> usize {
        self.tracker.len()
    }
}

impl Context {
    pub(crate) fn new(
        id: Arc<str>,
        node: Arc<str>,
        token: u64,
        state: Arc<StateMap>,
    ) -> (Context, mpsc::UnboundedReceiver<ChildFailure>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let children = Arc::new(Children {
            tracker: TaskTracker::new(),
            aborts: Mutex::new(Vec::new()),
            failures: tx,
        });
        let inner = Inner {
            id,
            node,
            token,
            cancel: CancellationToken::new(),
            reason: OnceLock::new(),
            state,
            children,
            span: tracing::Span::current(),
        };
        (
            Context {
                inner: Arc::new(inner),
            },
            rx,
        )
    }

    pub(crate) fn children(&self) -> &Arc<Children> {
        &self.inner.children
    }

    /// Records why the instance stops (the first reason wins) and cancels it.
    pub(crate) fn stop(&self, reason: ShutdownReason) {
        let _ = self.inner.reason.set(reason);
        self.inner.cancel.cancel();
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
    /// (within the shutdown budget) before `terminate` runs. A child that
    /// returns `Ok(())` simply ends.
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
    pub fn spawn<F>(&self, name: impl Into<String>, future: F)
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let name = name.into();
        let children = &self.inner.children;
        let failures = children.failures.clone();
        let cancel = self.inner.cancel.clone();
        let future = tracing::Instrument::instrument(future, self.inner.span.clone());
        let task = children.tracker.spawn(async move {
            let why = match AssertUnwindSafe(future).catch_unwind().await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(panic) => format!("panicked: {}", panic_message(&*panic)),
            };
            if !cancel.is_cancelled() {
                let _ = failures.send(ChildFailure { name, why });
            }
        });
        let mut aborts = children.aborts.lock().unwrap_or_else(|e| e.into_inner());
        aborts.retain(|h| !h.is_finished());
        aborts.push(task.abort_handle());
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
