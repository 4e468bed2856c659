//! [`Builder`]: what a runtime runs and how it starts.

use super::{
    DEFAULT_GRACE, DEFAULT_HANDOFF_RATE, HandleInner, Placement, Registry, RuntimeHandle,
    ShutdownSignals, lock, report_panic,
};
use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::backend::{self, Backend};
use crate::context::StateMap;
use crate::guardian::Shared;
use crate::ops::{NodeOps, OpsConfig};
use crate::placement::{self, DEFAULT_WEIGHT};
use crate::spec::{self, ChildSpec, Singleton};
use crate::{Context, Error, Result, Service, redact_url};

/// Configures and starts a runtime. The node name and backend come from the
/// environment unless set, as in [`run`](crate::run); the singletons are exactly those
/// added (see [`Runtime::builder`](crate::Runtime::builder)).
#[derive(Default)]
#[must_use = "a builder does nothing until `start` or `run` is called"]
pub struct Builder {
    node: Option<String>,
    backend: Option<Box<dyn Backend>>,
    backend_url: Option<String>,
    state: StateMap,
    specs: Vec<ChildSpec>,
    registered: bool,
    stepdown_delay: Option<Duration>,
    weight: Option<u32>,
    labels: Option<Vec<String>>,
    drain_on_shutdown: bool,
    handoff_rate: Option<u32>,
    placement_grace: Option<Duration>,
    rebalance: Option<bool>,
    start_timeout: Option<Duration>,
    pub(crate) ops: OpsConfig,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("node", &self.node)
            .field("backend", &self.backend.as_ref().map(|b| b.describe()))
            .field("backend_url", &self.backend_url.as_deref().map(redact_url))
            .field("specs", &self.specs)
            .field("weight", &self.weight)
            .field("labels", &self.labels)
            .field("drain_on_shutdown", &self.drain_on_shutdown)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Sets this node's name (default: `HIGHLANDER_NODE`, else host and pid).
    pub fn node(mut self, name: impl Into<String>) -> Self {
        self.node = Some(name.into());
        self
    }

    /// Uses this backend (default: `HIGHLANDER_BACKEND`, else memory). Takes
    /// a backend type, or the `Box<dyn Backend>` that
    /// [`backend::from_url`](crate::backend::from_url) returns.
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Box::new(backend));
        self
    }

    /// Uses the backend named by a URL, as `HIGHLANDER_BACKEND` would.
    /// A bad URL is reported by [`Builder::start`].
    pub fn backend_url(mut self, url: impl Into<String>) -> Self {
        self.backend_url = Some(url.into());
        self
    }

    /// Registers shared state that services read with
    /// [`Context::state`]. One value per type; a second value of the same
    /// type replaces the first.
    pub fn state<T: Any + Send + Sync>(mut self, value: T) -> Self {
        self.state.insert(TypeId::of::<T>(), Arc::new(value));
        self
    }

    /// Adds a singleton whose id is known only at run time (one per tenant,
    /// say). `factory` builds an instance at the start of every tenure and
    /// restart. See [`ChildSpec::new`] for restart and shutdown settings.
    pub fn singleton<S, F, Fut>(self, id: impl Into<String>, factory: F) -> Self
    where
        S: Service,
        F: Fn(&Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S>> + Send + 'static,
    {
        self.child(ChildSpec::new(id, factory))
    }

    /// Adds a singleton described by a [`ChildSpec`].
    pub fn child(mut self, spec: ChildSpec) -> Self {
        self.specs.push(spec);
        self
    }

    /// Runs the `#[highlander]` service `S` (one of the registered ones).
    pub fn service<S: Singleton>(mut self) -> Self {
        self.specs.push(S::child_spec());
        self
    }

    /// Runs every `#[highlander]` service in the binary, as [`run`](crate::run) does.
    /// Two of them with the same id make [`Builder::start`] fail with
    /// [`Error::DuplicateId`] naming both types. A service also added with
    /// [`Builder::service`] runs once.
    pub fn registered(mut self) -> Self {
        self.registered = true;
        self
    }

    /// How long a node that stepped down waits before it claims the id
    /// again (default 5 s).
    pub fn stepdown_delay(mut self, delay: Duration) -> Self {
        self.stepdown_delay = Some(delay);
        self
    }

    /// This node's weight for placement (default: `HIGHLANDER_NODE_WEIGHT`,
    /// else 1). A node of weight 2 is the place for twice as many ids as a
    /// node of weight 1; a node of weight 0 hosts an id only when no node of
    /// positive weight can. See [`placement`](crate::placement).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }

    /// This node's labels (default: `HIGHLANDER_NODE_LABELS`, else none):
    /// `key=value` or a bare word (`["zone=eu", "ssd"]`), which services name
    /// in their `prefer` and `avoid` lists. Each is 1 to 200 visible ASCII
    /// characters without a comma, given once; checked by
    /// [`Builder::start`].
    pub fn labels<I, S>(mut self, labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.labels = Some(labels.into_iter().map(Into::into).collect());
        self
    }

    /// Whether [`Builder::run`] (and so [`run`](crate::run)) drains the node at SIGTERM
    /// or Ctrl-C before it shuts down: every id is handed over
    /// ([`RuntimeHandle::drain`], its instance stopped with
    /// [`ShutdownReason::Moved`](crate::ShutdownReason::Moved)) and only then
    /// is the runtime stopped. A second signal cuts the drain short.
    ///
    /// Off by default: a shutdown then stops every instance at once with
    /// [`ShutdownReason::NodeShutdown`](crate::ShutdownReason::NodeShutdown)
    /// and releases every id, which is the fastest way out and what
    /// services written against earlier versions expect in `terminate`. A
    /// drain hands ids over at the handoff rate
    /// ([`Builder::handoff_rate`]), so it takes longer with many ids: turn it
    /// on when the orchestrator's grace period leaves room for it (some
    /// `ids / rate` seconds plus the longest shutdown budget).
    pub fn drain_on_shutdown(mut self, drain: bool) -> Self {
        self.drain_on_shutdown = drain;
        self
    }

    /// How many ids per second a drain hands over (default 1,000, at least
    /// 1): each handoff stops an instance and frees its id for other nodes
    /// to claim, so 10,000 ids do not all move in the same instant.
    pub fn handoff_rate(mut self, ids_per_second: u32) -> Self {
        self.handoff_rate = Some(ids_per_second.max(1));
        self
    }

    /// How long a node lets the members better placed for an id claim it
    /// first, per place ahead of it (default 50 ms; zero turns the deferral
    /// off). When an id comes free, the member it belongs to
    /// ([`placement`](crate::placement)) claims at once, the next one after
    /// `grace`, the one after that after `2 × grace`, and so on: liveness
    /// first, whoever is left claims after its wait. After a holder fails,
    /// it does not count: the best of the others claims at once, so
    /// failover is not slower. Without placement on the backend, nobody
    /// waits.
    pub fn placement_grace(mut self, grace: Duration) -> Self {
        self.placement_grace = Some(grace);
        self
    }

    /// Whether a change of members hands ids over to where they now belong
    /// (default off): each id held here whose best candidate is another
    /// reachable member that runs it is released to that member (its
    /// instance stopped with
    /// [`ShutdownReason::Moved`](crate::ShutdownReason::Moved), `terminate`
    /// runs), at most [`Builder::handoff_rate`] per second, once the
    /// members have been unchanged for 300 ms. This is what balances nodes
    /// started apart (the first one up claims everything) and gives a node
    /// that joins its share; off, ids stay where they are until they come
    /// free.
    ///
    /// A tenure the backend calls
    /// [contested](crate::backend::Session::contested) is not handed over
    /// (on the AP backends: while the cluster may be split, or a healed
    /// conflict is not settled), so an instance that overlapped another is
    /// always stopped by the heal rule with
    /// [`ShutdownReason::Conflict`](crate::ShutdownReason::Conflict), never
    /// with `Moved`; an earlier version could do the latter, and no longer
    /// does. It stays off by default because moving running work costs a
    /// restart of each instance moved, which users should opt into (see
    /// `docs/fleets.md`).
    pub fn rebalance(mut self, rebalance: bool) -> Self {
        self.rebalance = Some(rebalance);
        self
    }

    /// How long [`Builder::start`] tries to reach the backend before it
    /// fails with [`Error::Unreachable`] (default: the backend URL's
    /// `start_timeout=` option, else
    /// [`DEFAULT_START_TIMEOUT`](crate::backend::DEFAULT_START_TIMEOUT), 30 s).
    /// Set here, it wins over the URL. Errors that retrying cannot fix (bad
    /// credentials, a missing database, bad TLS files) fail at once
    /// whatever the timeout. See the [`backend`](crate::backend) module docs
    /// for the start-up policy.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = Some(timeout);
        self
    }

    /// Starts the runtime and returns with a handle once the backend is
    /// reached; the runtime runs until [`RuntimeHandle::shutdown`]. Fails on
    /// a duplicate id, an invalid id or affinity entry, a bad weight or
    /// label, a backend URL that cannot be used, a backend that refuses this
    /// node (bad credentials, say) or one that cannot be reached within the
    /// start timeout ([`Builder::start_timeout`]).
    pub async fn start(self) -> Result<RuntimeHandle> {
        let mut specs = Vec::new();
        if self.registered {
            specs.extend(spec::registered()?);
        }
        for spec in self.specs {
            // `.registered().service::<S>()` names S twice: run it once.
            let again = self.registered
                && spec.registered
                && specs
                    .iter()
                    .any(|s| s.id == spec.id && s.type_name == spec.type_name);
            if !again {
                specs.push(spec);
            }
        }
        check_specs(&specs)?;

        let node = match self.node {
            Some(node) => node,
            None => node_from_env(),
        };
        validate_node(&node)?;
        let (weight, labels) = node_placement(self.weight, self.labels)?;
        #[cfg(feature = "http")]
        let listener = crate::ops::http::bind(&self.ops).await?;
        let backend: Box<dyn Backend> = match (self.backend, self.backend_url) {
            (Some(backend), _) => backend,
            (None, Some(url)) => backend::from_url(&url)?,
            (None, None) => backend_from_env()?,
        };
        let description = backend.describe();
        let start_timeout = self
            .start_timeout
            .or_else(|| backend.start_timeout())
            .unwrap_or(backend::DEFAULT_START_TIMEOUT);
        let session =
            crate::backend::kit::startup::retry_until(&description, start_timeout, || {
                backend.connect(&node)
            })
            .await?;
        // A budget the backend cannot honour would only ever be retried.
        if let Some(refused) = specs
            .iter()
            .find_map(|s| session.check_stop_budget(&s.id, s.shutdown).err())
        {
            session.close().await;
            return Err(refused);
        }
        info!(node = %node, backend = %description, singletons = specs.len(), "highlander started");

        let node: Arc<str> = Arc::from(node);
        let ops = NodeOps::new(node.clone(), &self.ops);
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            node: node.clone(),
            session: session.clone(),
            state: Arc::new(self.state),
            shutdown: shutdown.clone(),
            stepdown_delay: self.stepdown_delay.unwrap_or(Duration::from_secs(5)),
            version: watch::Sender::new(0),
            ops: ops.clone(),
            draining: watch::Sender::new(false),
            handoff_rate: self.handoff_rate.unwrap_or(DEFAULT_HANDOFF_RATE),
            placement: Placement::new(
                self.placement_grace.unwrap_or(DEFAULT_GRACE),
                self.rebalance.unwrap_or(false),
            ),
        });
        // Before the first claim: tell the others which ids this node runs,
        // and learn where each stands.
        let ids = specs.iter().map(|s| s.id.clone()).collect();
        super::placer::start(&shared, ids, weight, &labels).await;

        let done = CancellationToken::new();
        crate::ops::spawn_probe(&ops, &shared, done.clone()).await;
        let registry = Arc::new(Mutex::new(Registry {
            slots: BTreeMap::new(),
            by_id: HashMap::new(),
            next: 0,
            tasks: Some(JoinSet::new()),
            leaving: HashMap::new(),
            drain: None,
        }));
        let rt = tokio::runtime::Handle::current();
        {
            let mut reg = lock(&registry);
            for spec in specs {
                reg.insert(spec, &shared, &rt);
            }
            if let Some(tasks) = reg.tasks.as_mut() {
                tasks.spawn_on(
                    super::placer::run(
                        registry.clone(),
                        shared.clone(),
                        weight,
                        labels.clone(),
                        done.clone(),
                    ),
                    &rt,
                );
            }
        }
        let main = {
            let done = done.clone();
            let session = session.clone();
            let shutdown = shutdown.clone();
            let node = node.clone();
            let registry = registry.clone();
            // The main task keeps the shared state (and so the session) alive
            // for as long as the runtime runs, with or without singletons;
            // aborting it (and dropping the guardians) is what drops them.
            let shared = shared.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                let tasks = lock(&registry).tasks.take();
                if let Some(mut tasks) = tasks {
                    while let Some(result) = tasks.join_next().await {
                        report_panic(&node, result);
                    }
                }
                session.close().await;
                drop(shared);
                info!(node = %node, "highlander stopped: every id released");
                done.cancel();
            })
        };
        let handle = RuntimeHandle {
            inner: Arc::new(HandleInner {
                ops,
                node,
                backend: description,
                version: shared.version.subscribe(),
                shared: Arc::downgrade(&shared),
                registry,
                rt,
                weight,
                labels,
                shutdown,
                done,
                main: main.abort_handle(),
                drain_on_shutdown: self.drain_on_shutdown,
            }),
        };
        #[cfg(feature = "http")]
        crate::ops::http::serve(listener, &handle);
        Ok(handle)
    }

    /// Starts the runtime, runs until SIGTERM or Ctrl-C, then shuts it down
    /// gracefully (every instance stopped with
    /// [`ShutdownReason::NodeShutdown`](crate::ShutdownReason::NodeShutdown),
    /// every id released) and returns. With
    /// [`Builder::drain_on_shutdown`] on, every id is handed over first and a
    /// second signal cuts that short: see
    /// [`RuntimeHandle::graceful_shutdown`], which does the same for
    /// applications that handle signals themselves.
    ///
    /// The signal handlers are installed before anything else, so a SIGTERM
    /// that arrives while the runtime is still connecting stops it cleanly
    /// too (the start is abandoned and nothing was claimed), instead of
    /// killing the process by the signal's default action.
    pub async fn run(self) -> Result<()> {
        let mut signals = ShutdownSignals::install()?;
        let handle = tokio::select! {
            handle = self.start() => handle?,
            name = signals.recv() => {
                info!(signal = name, "stopped while starting");
                return Ok(());
            }
        };
        tokio::select! {
            name = signals.recv() => {
                info!(node = handle.node(), signal = name, "shutting down");
            }
            _ = handle.stopped() => return Ok(()),
        }
        tokio::select! {
            () = handle.graceful_shutdown() => {}
            name = signals.recv() => {
                info!(node = handle.node(), signal = name, "shutting down without finishing the drain");
                handle.shutdown().await;
            }
        }
        Ok(())
    }
}

fn check_specs(specs: &[ChildSpec]) -> Result<()> {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for spec in specs {
        spec.check()?;
        if let Some(first) = seen.insert(&spec.id, spec.type_name) {
            return Err(Error::DuplicateId {
                id: spec.id.to_string(),
                first: first.to_string(),
                second: spec.type_name.to_string(),
            });
        }
    }
    Ok(())
}

fn validate_node(node: &str) -> Result<()> {
    if node.is_empty() || node.len() > 200 || !node.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::config(format!(
            "invalid node name `{}`: use 1 to 200 visible ASCII characters (HIGHLANDER_NODE or Builder::node)",
            node.chars().take(60).collect::<String>()
        )));
    }
    Ok(())
}

/// This node's weight and labels: the builder's, else the environment's.
fn node_placement(
    weight: Option<u32>,
    labels: Option<Vec<String>>,
) -> Result<(u32, Arc<[String]>)> {
    let weight = match weight {
        Some(weight) => weight,
        None => match std::env::var("HIGHLANDER_NODE_WEIGHT") {
            Ok(text) if !text.trim().is_empty() => {
                placement::parse_weight(&text).map_err(Error::config)?
            }
            _ => DEFAULT_WEIGHT,
        },
    };
    let labels = match labels {
        Some(labels) => {
            placement::check_labels(&labels)
                .map_err(|why| Error::config(format!("Builder::labels: {why}")))?;
            labels
        }
        None => match std::env::var("HIGHLANDER_NODE_LABELS") {
            Ok(text) => placement::parse_labels(&text).map_err(Error::config)?,
            Err(_) => Vec::new(),
        },
    };
    Ok((weight, labels.into()))
}

fn node_from_env() -> String {
    if let Ok(node) = std::env::var("HIGHLANDER_NODE")
        && !node.is_empty()
    {
        return node;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    format!("{host}-{}", std::process::id())
}

fn backend_from_env() -> Result<Box<dyn Backend>> {
    match std::env::var("HIGHLANDER_BACKEND") {
        Ok(url) if !url.trim().is_empty() => backend::from_url(&url).map_err(|e| match e {
            Error::Config { message, source } => Error::Config {
                message: format!("HIGHLANDER_BACKEND: {message}"),
                source,
            },
            other => other,
        }),
        _ => {
            info!(
                "HIGHLANDER_BACKEND is not set: using the in-process memory backend, which coordinates \
                 only within this process; set it to postgres://, etcd:// or cluster:// to span processes"
            );
            Ok(Box::new(backend::MemoryCluster::global()))
        }
    }
}
