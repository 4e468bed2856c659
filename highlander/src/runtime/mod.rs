//! The runtime: builder, start-up, status, and shutdown.
//!
//! - `builder.rs`: [`Builder`], start-up, and the node's settings from the
//!   environment;
//! - `handle.rs`: [`RuntimeHandle`]: status, add, remove, drain, shutdown;
//! - `status.rs`: [`Status`] and [`SingletonStatus`];
//! - `signals.rs`: SIGTERM and Ctrl-C.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::Result;
use crate::guardian::{Guardian, Shared, SingletonState, Slot};
use crate::spec::ChildSpec;

mod builder;
mod handle;
mod placer;
mod signals;
mod status;

pub use builder::Builder;
use handle::HandleInner;
pub use handle::RuntimeHandle;
pub(crate) use placer::{DEFAULT_GRACE, MAX_DEFER_RANKS, Placement};
use signals::ShutdownSignals;
pub use status::{SingletonStatus, Status};

/// How many ids a drain hands over per second unless set.
pub(crate) const DEFAULT_HANDOFF_RATE: u32 = 1_000;
/// A drain hands ids over in batches, one batch per tick.
pub(super) const HANDOFF_TICK: Duration = Duration::from_millis(100);

/// Runs every `#[highlander]` service in the binary until SIGTERM or Ctrl-C,
/// then stops them all and releases their ids.
///
/// Configuration comes from the environment:
/// - `HIGHLANDER_BACKEND`: `memory` (the default, with one info line saying
///   so), `postgres://…`, `etcd://…` or `cluster://…`;
/// - `HIGHLANDER_NODE`: this node's name (default: host name and pid);
/// - `HIGHLANDER_NODE_WEIGHT`: this node's weight for placement (default 1;
///   0: host an id only when no other node can);
/// - `HIGHLANDER_NODE_LABELS`: this node's labels, comma-separated
///   (`zone=eu,ssd`), which services name in `prefer` and `avoid`.
///
/// Equivalent to `Runtime::builder().registered().run()`; use
/// [`Runtime::builder`] for shared state, runtime ids, or a backend chosen in
/// code.
///
/// ```no_run
/// #[tokio::main]
/// async fn main() -> Result<(), highlander::Error> {
///     highlander::run().await
/// }
/// ```
pub async fn run() -> Result<()> {
    Runtime::builder().registered().run().await
}

/// Entry point for configuring a runtime: see [`Runtime::builder`].
#[derive(Debug)]
pub struct Runtime {
    _private: (),
}

impl Runtime {
    /// A builder that runs exactly the singletons added to it: call
    /// [`Builder::registered`] for every `#[highlander]` service in the binary
    /// (what [`run`] does), [`Builder::service`] for one of them, and
    /// [`Builder::singleton`] or [`Builder::child`] for ids known at run time.
    /// The backend and node name come from the environment unless set.
    ///
    /// ```
    /// use highlander::{Context, MemoryCluster, Runtime, Service};
    ///
    /// struct Db { url: String }
    ///
    /// struct TenantSync { tenant: String }
    /// impl Service for TenantSync {
    ///     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
    ///         let _db = ctx.state::<Db>()?;
    ///         ctx.cancelled().await;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> highlander::Result<()> {
    /// let mut builder = Runtime::builder()
    ///     .node("node-a")
    ///     .backend(MemoryCluster::new())
    ///     .state(Db { url: "postgres://db/app".into() });
    /// for tenant in ["acme", "globex"] {
    ///     let name = tenant.to_string();
    ///     builder = builder.singleton(format!("tenant-sync/{tenant}"), move |_ctx| {
    ///         let tenant = name.clone();
    ///         async move { Ok(TenantSync { tenant }) }
    ///     });
    /// }
    /// let handle = builder.start().await?;
    /// handle.wait_until(|s| s.running().count() == 2).await;
    /// handle.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> Builder {
        Builder::default()
    }
}

/// Logs a guardian task that panicked.
pub(super) fn report_panic(node: &str, result: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = result
        && e.is_panic()
    {
        error!(node = %node, "a guardian panicked: this is a bug in highlander");
    }
}

pub(super) fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

/// The singletons of a runtime, in the order they were added, and the
/// tasks that guard them.
pub(super) struct Registry {
    /// By the order of adding.
    pub(super) slots: BTreeMap<u64, Arc<Slot>>,
    pub(super) by_id: HashMap<Arc<str>, u64>,
    pub(super) next: u64,
    /// The guardians (and a drain's handoff task); `None` once the runtime
    /// stops, so nothing more is spawned.
    pub(super) tasks: Option<JoinSet<()>>,
    /// Removed ids whose guardian may still be stopping the instance: one
    /// added again waits for it.
    pub(super) leaving: HashMap<Arc<str>, Arc<Slot>>,
    /// The running drain's handoff task, to call off.
    pub(super) drain: Option<CancellationToken>,
}

impl Registry {
    /// Adds a checked spec and starts its guardian at once.
    pub(super) fn insert(
        &mut self,
        spec: ChildSpec,
        shared: &Arc<Shared>,
        rt: &tokio::runtime::Handle,
    ) {
        let Some(tasks) = self.tasks.as_mut() else {
            return;
        };
        // Finished guardians (removed ids) are reaped here, so a runtime
        // that adds and removes ids for ever does not collect them.
        while let Some(result) = tasks.try_join_next() {
            report_panic(&shared.node, result);
        }
        self.leaving
            .retain(|_, s| !matches!(*s.lock(), SingletonState::Stopped));
        let after = self.leaving.remove(&spec.id);
        let id = spec.id.clone();
        let slot = Arc::new(Slot::new(spec, shared));
        if shared.shutdown.is_cancelled() {
            slot.shut_down();
        }
        shared.placement.view().place(&slot);
        let guardian = Guardian {
            slot: slot.clone(),
            shared: shared.clone(),
        };
        tasks.spawn_on(guardian.run(after), rt);
        self.by_id.insert(id, self.next);
        self.slots.insert(self.next, slot);
        self.next += 1;
    }

    /// Tells every guardian, those of removed ids still stopping too, that
    /// the node shuts down.
    pub(super) fn shut_down(&self) {
        for slot in self.slots.values().chain(self.leaving.values()) {
            slot.shut_down();
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<&Arc<Slot>> {
        self.by_id.get(id).and_then(|seq| self.slots.get(seq))
    }
}
