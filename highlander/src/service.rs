//! The trait a singleton implements, and its type-erased form.

use std::future::Future;
use std::pin::Pin;

use crate::{Context, Result, ShutdownReason};

/// A boxed future, as used across the crate's object-safe seams.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A service that runs as a cluster-wide singleton.
///
/// Implement it with `async fn`s; mark the type with
/// [`#[highlander(id = "...")]`](crate::highlander) to register it.
///
/// ```
/// use highlander::{Context, Service, ShutdownReason};
///
/// #[derive(Default)]
/// struct Ticker { ticks: u64 }
///
/// impl Service for Ticker {
///     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
///         let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
///         loop {
///             tokio::select! {
///                 _ = ctx.cancelled() => return Ok(()),
///                 _ = tick.tick() => self.ticks += 1,
///             }
///         }
///     }
///
///     async fn terminate(&mut self, reason: ShutdownReason) {
///         println!("stopping after {} ticks: {reason}", self.ticks);
///     }
/// }
/// ```
pub trait Service: Send + 'static {
    /// Runs the instance. Return when [`Context::cancelled`] fires (the
    /// reason is in [`Context::reason`]), or earlier with `Ok(())` (a normal
    /// exit) or an error (restarted according to the restart policy).
    fn run(&mut self, ctx: &Context) -> impl Future<Output = Result<()>> + Send;

    /// Called exactly once after every instance stops, however it stopped:
    /// conflict after a healed split, lost lease, node shutdown, its own error
    /// or panic, step-down, or a normal return. Children spawned with
    /// [`Context::spawn`] have all finished by then, or were aborted: `run`
    /// and the children get the first three quarters of the service's
    /// `shutdown` budget (default 5 s), and `terminate` runs even when they
    /// overran it, with the rest of the budget (at least a quarter). Past the
    /// end of the budget `terminate` is dropped and the overrun logged.
    /// A panic in `terminate` (or in the service's `Drop`) turns a normal
    /// stop into [`ShutdownReason::Error`], restarted by the policy.
    fn terminate(&mut self, reason: ShutdownReason) -> impl Future<Output = ()> + Send {
        let _ = reason;
        async {}
    }
}

/// The object-safe form of [`Service`] the runtime drives.
#[doc(hidden)]
pub trait DynService: Send {
    fn run_dyn<'a>(&'a mut self, ctx: &'a Context) -> BoxFuture<'a, Result<()>>;
    fn terminate_dyn(&mut self, reason: ShutdownReason) -> BoxFuture<'_, ()>;
}

impl<S: Service> DynService for S {
    fn run_dyn<'a>(&'a mut self, ctx: &'a Context) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.run(ctx))
    }

    fn terminate_dyn(&mut self, reason: ShutdownReason) -> BoxFuture<'_, ()> {
        Box::pin(self.terminate(reason))
    }
}
