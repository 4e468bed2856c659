//! # highlander
//!
//! Run exactly one instance of a service across a cluster of processes, move
//! it to a survivor when its holder dies, and settle the conflict when a split
//! cluster heals. The Rust take on Elixir's
//! [Highlander](https://hex.pm/packages/highlander) (`:global`) and its sister
//! HighlanderPG (Postgres advisory locks).
//!
//! ```
//! use highlander::{highlander, Context, Service, ShutdownReason};
//!
//! #[highlander(id = "invoice-sweeper", shutdown = "2s")]
//! #[derive(Default)]
//! struct InvoiceSweeper { swept: u64 }
//!
//! impl Service for InvoiceSweeper {
//!     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
//!         let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
//!         loop {
//!             tokio::select! {
//!                 _ = ctx.cancelled() => return Ok(()),
//!                 _ = tick.tick() => self.swept += 1,
//!             }
//!         }
//!     }
//!     async fn terminate(&mut self, reason: ShutdownReason) {
//!         tracing::info!(%reason, swept = self.swept, "sweeper stopping");
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> highlander::Result<()> {
//! // In `main`: `highlander::run().await` runs every #[highlander] service
//! // until SIGTERM or Ctrl-C. Here, a started runtime stopped by hand:
//! let handle = highlander::Runtime::builder()
//!     .service::<InvoiceSweeper>() // just this one; `run()` takes every registered service
//!     .start()
//!     .await?;
//! handle.wait_until(|s| s.is_running("invoice-sweeper")).await;
//! handle.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The pieces:
//! - [`#[highlander]`](highlander) turns a type into a registered child spec;
//! - [`Service`] is what the type implements (`run`, `terminate`);
//! - [`Context`] is what a running instance sees (cancellation, reason,
//!   fencing token, shared state, child tasks);
//! - [`run`] and [`Runtime::builder`] start a node;
//! - [`backend`] holds the coordination seam and the backends.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod context;
mod error;
mod guardian;
pub mod ops;
pub mod placement;
mod reason;
mod runtime;
mod service;
mod spec;
#[cfg(test)]
mod test_util;

pub mod backend;

pub use backend::MemoryCluster;
pub use context::{Cancelled, Context};
pub use error::{BackendErrorKind, Error, Result, redact_url};
pub use guardian::SingletonState;
pub use reason::ShutdownReason;
pub use runtime::{Builder, Runtime, RuntimeHandle, SingletonStatus, Status, run};
pub use service::{BoxFuture, Service};
pub use spec::{
    ChildSpec, DEFAULT_SHUTDOWN, Intensity, MAX_ID_LEN, Restart, Singleton, validate_id,
};

/// Marks a type as a cluster-wide singleton and registers it.
///
/// ```
/// use highlander::{highlander, Context, Service};
///
/// #[highlander(id = "nightly-report", restart = "transient", shutdown = "10s")]
/// #[derive(Default)]
/// struct NightlyReport;
///
/// impl Service for NightlyReport {
///     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
///         ctx.cancelled().await;
///         Ok(())
///     }
/// }
/// ```
///
/// Keys, all checked at compile time:
///
/// | key | value | default |
/// |---|---|---|
/// | `id` | the uniqueness key: 1–200 bytes of `[A-Za-z0-9._:/-]` | required |
/// | `restart` | `"permanent"`, `"transient"` or `"temporary"` (OTP meanings) | `"permanent"` |
/// | `shutdown` | how long cancellation plus `terminate` may take: a duration with its unit, such as `"500ms"`, `"5s"`, `"2m"` or `"1h 30m"` (the grammar of backend URL options; a bare number is refused); `run` and the children get the first three quarters, then `terminate` always runs with the rest | `"5s"` |
/// | `intensity` | restarts allowed within `period` before the node steps down | `3` |
/// | `period` | the window for `intensity` (a duration, as `shutdown`) | `"5s"` |
/// | `prefer` | node names or labels (`["node-a", "zone=eu"]`) where the service would rather run; see [`placement`] | none |
/// | `avoid` | node names or labels where it runs only when no other node can | none |
/// | `init` | path to `async fn(&Context) -> highlander::Result<Self>`, used instead of `Default` | `Default::default()` |
/// | `crate` | path to the `highlander` crate, for re-exporters | `::highlander` |
pub use highlander_macros::highlander;

/// Not public API: what the generated code uses.
#[doc(hidden)]
pub mod __private {
    pub use crate::service::{BoxFuture, DynService};
    pub use crate::spec::{__affinity, __spec, Registration};
    pub use ::core;
    pub use ::inventory;
    pub use ::std;
    pub use ::tracing;

    /// Boxes a built service for the runtime.
    pub fn boxed<S: crate::Service>(service: S) -> Box<dyn DynService> {
        Box::new(service)
    }
}
