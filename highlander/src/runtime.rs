//! The runtime: builder, start-up, status, and shutdown.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backend::{self, Backend, HeldId, Holder, Member, Session};
use crate::context::StateMap;
use crate::guardian::{Ask, Guardian, Shared, SingletonState, Slot};
use crate::ops::{NodeOps, OpsConfig};
use crate::placement::{self, DEFAULT_WEIGHT};
use crate::spec::{self, ChildSpec, Singleton};
use crate::{Context, Error, Result, Service, redact_url};

/// How many ids a drain hands over per second unless set.
pub(crate) const DEFAULT_HANDOFF_RATE: u32 = 1_000;
/// A drain hands ids over in batches, one batch per tick.
const HANDOFF_TICK: Duration = Duration::from_millis(100);

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

/// Configures and starts a runtime. The node name and backend come from the
/// environment unless set, as in [`run`]; the singletons are exactly those
/// added (see [`Runtime::builder`]).
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

    /// Runs every `#[highlander]` service in the binary, as [`run`] does.
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

    /// Whether [`Builder::run`] (and so [`run`]) drains the node at SIGTERM
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
        });

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
            }),
        };
        #[cfg(feature = "http")]
        crate::ops::http::serve(listener, &handle);
        Ok(handle)
    }

    /// Starts the runtime, runs until SIGTERM or Ctrl-C, then shuts it down
    /// gracefully (every instance stopped with
    /// [`ShutdownReason::NodeShutdown`](crate::ShutdownReason::NodeShutdown),
    /// every id released) and returns.
    ///
    /// The signal handlers are installed before anything else, so a SIGTERM
    /// that arrives while the runtime is still connecting stops it cleanly
    /// too (the start is abandoned and nothing was claimed), instead of
    /// killing the process by the signal's default action.
    pub async fn run(self) -> Result<()> {
        let drain = self.drain_on_shutdown;
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
        if drain {
            info!(
                node = handle.node(),
                "draining first: handing every id over (a second signal shuts down at once)"
            );
            tokio::select! {
                drained = handle.drain() => match drained {
                    Ok(()) => info!(node = handle.node(), "drained: every id handed over"),
                    Err(e) => warn!(node = handle.node(), error = %e, "the drain did not finish"),
                },
                name = signals.recv() => {
                    info!(node = handle.node(), signal = name, "shutting down without finishing the drain");
                }
                _ = handle.stopped() => return Ok(()),
            }
        }
        handle.shutdown().await;
        Ok(())
    }
}

/// Logs a guardian task that panicked.
fn report_panic(node: &str, result: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = result
        && e.is_panic()
    {
        error!(node = %node, "a guardian panicked: this is a bug in highlander");
    }
}

fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

/// The singletons of a runtime, in the order they were added, and the
/// tasks that guard them.
struct Registry {
    /// By the order of adding.
    slots: BTreeMap<u64, Arc<Slot>>,
    by_id: HashMap<Arc<str>, u64>,
    next: u64,
    /// The guardians (and a drain's handoff task); `None` once the runtime
    /// stops, so nothing more is spawned.
    tasks: Option<JoinSet<()>>,
    /// Removed ids whose guardian may still be stopping the instance: one
    /// added again waits for it.
    leaving: HashMap<Arc<str>, Arc<Slot>>,
    /// The running drain's handoff task, to call off.
    drain: Option<CancellationToken>,
}

impl Registry {
    /// Adds a checked spec and starts its guardian at once.
    fn insert(&mut self, spec: ChildSpec, shared: &Arc<Shared>, rt: &tokio::runtime::Handle) {
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
        let guardian = Guardian {
            slot: slot.clone(),
            shared: shared.clone(),
            after,
        };
        tasks.spawn_on(guardian.run(), rt);
        self.by_id.insert(id, self.next);
        self.slots.insert(self.next, slot);
        self.next += 1;
    }

    fn get(&self, id: &str) -> Option<&Arc<Slot>> {
        self.by_id.get(id).and_then(|seq| self.slots.get(seq))
    }
}

/// A drain's handoff task: asks every instance running here to move, in
/// batches of a tenth of the handoff rate per tick, until the drain is
/// called off or the runtime stops. It keeps watching after the first pass:
/// a claim that was in flight when the drain began may still be granted.
async fn hand_over_all(
    registry: Arc<Mutex<Registry>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let batch = (shared.handoff_rate / 10).max(1) as usize;
    let mut version = shared.version.subscribe();
    let mut reported = false;
    loop {
        if stop.is_cancelled() || shared.shutdown.is_cancelled() {
            return;
        }
        version.borrow_and_update();
        let todo: Vec<(Arc<Slot>, u64)> = lock(&registry)
            .slots
            .values()
            .filter_map(|slot| {
                let token = slot.held_token()?;
                (slot.moving.load(std::sync::atomic::Ordering::SeqCst) != token)
                    .then(|| (slot.clone(), token))
            })
            .take(batch)
            .collect();
        for (slot, token) in &todo {
            slot.moving
                .store(*token, std::sync::atomic::Ordering::SeqCst);
            slot.ask(Ask::Moved);
        }
        if !todo.is_empty() {
            debug!(node = %shared.node, ids = todo.len(), "handing over");
            reported = false;
        } else if shared.ops.busy() == 0 && !reported {
            info!(node = %shared.node, "drained: this node holds no id");
            reported = true;
        }
        if todo.len() < batch {
            // Nothing more to ask now: wait for a change.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.shutdown.cancelled() => return,
                changed = version.changed() => if changed.is_err() { return },
            }
        }
        // At most one batch per tick, and a scan at most once per tick.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(HANDOFF_TICK) => {}
        }
    }
}

/// SIGTERM and Ctrl-C (SIGINT), listened for from the moment they are
/// installed.
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| {
                signal(kind)
                    .map_err(|e| Error::config_with(format!("cannot listen for {name}: {e}"), e))
            };
            Ok(ShutdownSignals {
                term: listen(SignalKind::terminate(), "SIGTERM")?,
                int: listen(SignalKind::interrupt(), "Ctrl-C (SIGINT)")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(ShutdownSignals {})
        }
    }

    /// Completes at the next signal, with its name.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "Ctrl-C",
            }
        }
        #[cfg(not(unix))]
        {
            match tokio::signal::ctrl_c().await {
                Ok(()) => "Ctrl-C",
                // Without a way to hear Ctrl-C, run until stopped otherwise.
                Err(_) => std::future::pending().await,
            }
        }
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

/// A handle on a started runtime: status, step-down, shutdown. Cloneable;
/// dropping it does not stop the runtime.
#[derive(Clone)]
pub struct RuntimeHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    ops: Arc<NodeOps>,
    node: Arc<str>,
    backend: String,
    /// Weak, so that an aborted runtime drops its session (a crash, as the
    /// backend sees it) even while handles live on.
    shared: Weak<Shared>,
    version: watch::Receiver<u64>,
    /// Shared with the main task, which keeps the guardians running when
    /// every handle is gone.
    registry: Arc<Mutex<Registry>>,
    /// Where guardians of ids added at run time are spawned.
    rt: tokio::runtime::Handle,
    weight: u32,
    labels: Arc<[String]>,
    shutdown: CancellationToken,
    done: CancellationToken,
    main: AbortHandle,
}

impl fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("node", &self.inner.node)
            .field("backend", &self.inner.backend)
            .field("singletons", &lock(&self.inner.registry).slots.len())
            .finish()
    }
}

impl RuntimeHandle {
    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    #[cfg(feature = "http")]
    pub(crate) fn ops(&self) -> &NodeOps {
        &self.inner.ops
    }

    /// True once shutdown has begun (or the runtime has stopped).
    #[cfg(feature = "http")]
    pub(crate) fn is_stopping(&self) -> bool {
        self.inner.shutdown.is_cancelled() || self.inner.done.is_cancelled()
    }

    /// Stops every instance with `NodeShutdown` (each within its shutdown
    /// budget, all at once), releases every id so standbys take over at
    /// once, closes the backend session, and returns when all that is done.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.done.cancelled().await;
    }

    /// Stops the runtime at once, as if the process had crashed: no
    /// `terminate` runs, nothing is released explicitly; the backend sees
    /// the node disappear. For tests and demos of failover.
    pub fn abort(&self) {
        // Dropping the guardians' JoinSet aborts every guardian mid-flight;
        // the shutdown token stays untouched so no instance is stopped
        // gracefully.
        self.inner.main.abort();
        let tasks = lock(&self.inner.registry).tasks.take();
        drop(tasks);
        self.inner.done.cancel();
    }

    /// Completes when the runtime has stopped.
    pub async fn stopped(&self) {
        self.inner.done.cancelled().await;
    }

    /// Asks this node to give up `id`: the instance is stopped with
    /// [`ShutdownReason::Stepdown`](crate::ShutdownReason::Stepdown), the id
    /// released for another node, and this node waits its step-down delay
    /// before it claims the id again. Does nothing if the id does not run
    /// here.
    pub fn step_down(&self, id: &str) -> Result<()> {
        self.hand_over(id, Ask::Stepdown)
    }

    /// Asks the instance of `id`, if it runs here, to stop and give the id
    /// up, for the reason `ask` names.
    pub(crate) fn hand_over(&self, id: &str, ask: Ask) -> Result<()> {
        let slot = self.slot(id)?;
        if matches!(*slot.lock(), SingletonState::Running { .. }) {
            slot.ask(ask);
        }
        Ok(())
    }

    fn slot(&self, id: &str) -> Result<Arc<Slot>> {
        lock(&self.inner.registry)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::config(format!("no singleton `{id}` is configured on this node")))
    }

    /// Adds a singleton while the runtime runs: its guardian starts at once
    /// and competes for the id as the others do, and [`RuntimeHandle::status`]
    /// shows it. Fails, starting nothing, on an invalid id or affinity
    /// entry, an id this node already runs ([`Error::DuplicateId`]), a
    /// shutdown budget the backend refuses, or a stopped runtime.
    ///
    /// An id removed with [`RuntimeHandle::remove`] may be added again at
    /// once: the new guardian waits until the old one has stopped its
    /// instance and released the id.
    ///
    /// ```
    /// # use highlander::{ChildSpec, Context, MemoryCluster, Runtime, Service};
    /// # struct Sync;
    /// # impl Service for Sync {
    /// #     async fn run(&mut self, ctx: &Context) -> highlander::Result<()> { ctx.cancelled().await; Ok(()) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> highlander::Result<()> {
    /// let handle = Runtime::builder().node("a").backend(MemoryCluster::new()).start().await?;
    /// handle.add(ChildSpec::new("tenant-sync/acme", |_ctx| async { Ok(Sync) }))?;
    /// handle.wait_until(|s| s.is_running("tenant-sync/acme")).await;
    /// handle.remove("tenant-sync/acme").await?;
    /// assert!(handle.status().get("tenant-sync/acme").is_none());
    /// handle.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn add(&self, spec: ChildSpec) -> Result<()> {
        spec.check()?;
        let shared = self.inner.shared.upgrade().ok_or(Error::Stopped)?;
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::Stopped);
        }
        shared.session.check_stop_budget(&spec.id, spec.shutdown)?;
        let mut reg = lock(&self.inner.registry);
        if reg.tasks.is_none() {
            return Err(Error::Stopped);
        }
        if let Some(existing) = reg.get(&spec.id) {
            return Err(Error::DuplicateId {
                id: spec.id.to_string(),
                first: existing.spec.type_name.to_string(),
                second: spec.type_name.to_string(),
            });
        }
        debug!(node = %self.inner.node, id = %spec.id, "singleton added");
        reg.insert(spec, &shared, &self.inner.rt);
        drop(reg);
        shared.bump();
        Ok(())
    }

    /// Removes a singleton from this node: its instance, if it runs here,
    /// is stopped with [`ShutdownReason::Removed`](crate::ShutdownReason::Removed)
    /// (`terminate` runs), the id is released, and this node no longer
    /// competes for it; another node configured with the id may take it.
    /// The id leaves [`RuntimeHandle::status`] at once.
    ///
    /// The removal happens when this is called; the future completes once
    /// the instance has stopped and the id is released (dropping it does not
    /// undo anything). An id this node does not run is an error.
    pub fn remove(&self, id: &str) -> impl Future<Output = Result<()>> + Send + 'static {
        let removed = {
            let mut reg = lock(&self.inner.registry);
            match reg.by_id.remove(id) {
                Some(seq) => {
                    let slot = reg.slots.remove(&seq);
                    if let Some(slot) = &slot {
                        reg.leaving.insert(slot.spec.id.clone(), slot.clone());
                    }
                    slot
                }
                None => None,
            }
        };
        let found = match removed {
            Some(slot) => {
                debug!(node = %self.inner.node, id = %slot.spec.id, "singleton removed");
                slot.remove();
                if let Some(shared) = self.inner.shared.upgrade() {
                    shared.bump();
                }
                Ok(slot)
            }
            None => Err(Error::config(format!(
                "cannot remove `{id}`: no singleton of that id is configured on this node"
            ))),
        };
        let mut version = self.inner.version.clone();
        let done = self.inner.done.clone();
        async move {
            let slot = found?;
            loop {
                version.borrow_and_update();
                if matches!(*slot.lock(), SingletonState::Stopped) {
                    return Ok(());
                }
                tokio::select! {
                    changed = version.changed() => if changed.is_err() { break },
                    _ = done.cancelled() => break,
                }
            }
            // The runtime stopped: a shutdown stopped the instance too, an
            // abort dropped it.
            match *slot.lock() {
                SingletonState::Stopped => Ok(()),
                _ => Err(Error::Stopped),
            }
        }
    }

    /// Drains this node: it stops claiming ids (its guardians keep watching
    /// but do not claim), hands every id it holds over to the other nodes
    /// (each instance stopped with
    /// [`ShutdownReason::Moved`](crate::ShutdownReason::Moved), its id
    /// released, at most [`Builder::handoff_rate`] per second), and stays
    /// up, holding nothing, until [`RuntimeHandle::resume`] or shutdown.
    /// [`Status::draining`] says so meanwhile, and each id shows
    /// [`SingletonState::Draining`] once it is handed over.
    ///
    /// The drain begins when this is called; the future completes when this
    /// node holds no id (dropping it does not call the drain off). It fails
    /// if `resume` calls the drain off first, or the runtime stops first.
    /// Calling it during a drain joins that drain.
    pub fn drain(&self) -> impl Future<Output = Result<()>> + Send + 'static {
        let started = self.start_drain();
        let this = self.clone();
        async move {
            started?;
            let mut version = this.inner.version.clone();
            loop {
                version.borrow_and_update();
                if this.inner.done.is_cancelled() || this.inner.shutdown.is_cancelled() {
                    return Err(Error::Stopped);
                }
                if !this.is_draining() {
                    return Err(Error::config(
                        "the drain was called off by resume() before every id was handed over",
                    ));
                }
                if this.inner.ops.busy() == 0 {
                    return Ok(());
                }
                tokio::select! {
                    changed = version.changed() => if changed.is_err() { return Err(Error::Stopped) },
                    _ = this.inner.done.cancelled() => return Err(Error::Stopped),
                }
            }
        }
    }

    fn start_drain(&self) -> Result<()> {
        let shared = self.inner.shared.upgrade().ok_or(Error::Stopped)?;
        let mut reg = lock(&self.inner.registry);
        if reg.drain.is_some() {
            return Ok(());
        }
        let Some(tasks) = reg.tasks.as_mut() else {
            return Err(Error::Stopped);
        };
        let stop = CancellationToken::new();
        shared.draining.send_replace(true);
        info!(node = %self.inner.node, rate = shared.handoff_rate, "draining: handing every id over");
        tasks.spawn_on(
            hand_over_all(self.inner.registry.clone(), shared.clone(), stop.clone()),
            &self.inner.rt,
        );
        reg.drain = Some(stop);
        drop(reg);
        shared.bump();
        Ok(())
    }

    /// Calls a drain off: this node competes for its ids again (an id handed
    /// over meanwhile stays where it went until it is free again). Does
    /// nothing when the node is not draining.
    pub fn resume(&self) {
        let Some(shared) = self.inner.shared.upgrade() else {
            return;
        };
        let mut reg = lock(&self.inner.registry);
        if let Some(stop) = reg.drain.take() {
            stop.cancel();
            shared.draining.send_replace(false);
            info!(node = %self.inner.node, "drain called off: competing for ids again");
            drop(reg);
            shared.bump();
        }
    }

    /// True while the node drains (from [`RuntimeHandle::drain`] until
    /// [`RuntimeHandle::resume`]).
    pub fn is_draining(&self) -> bool {
        lock(&self.inner.registry).drain.is_some()
    }

    /// What every singleton on this node is doing now, with the members
    /// and session state as of the last probe (at most a second old).
    pub fn status(&self) -> Status {
        let (singletons, draining) = {
            let reg = lock(&self.inner.registry);
            let singletons = reg
                .slots
                .values()
                .map(|slot| {
                    let state = slot.lock().clone();
                    let affinity = slot.spec.affinity();
                    SingletonStatus {
                        id: slot.spec.id.to_string(),
                        state,
                        since: slot.ops.since(),
                        restarts: slot.ops.restarts(),
                        prefer: affinity.preferred().to_vec(),
                        avoid: affinity.avoided().to_vec(),
                    }
                })
                .collect();
            (singletons, reg.drain.is_some())
        };
        let ops = &self.inner.ops;
        Status {
            node: self.inner.node.to_string(),
            backend: self.inner.backend.clone(),
            at: crate::ops::wall_ms(),
            session_up: !self.inner.done.is_cancelled() && ops.session_up(),
            members: ops.members(),
            weight: self.inner.weight,
            labels: self.inner.labels.to_vec(),
            draining,
            singletons,
        }
    }

    /// Who holds `id` now, as the backend sees it from this node.
    pub async fn holder(&self, id: &str) -> Result<Option<Holder>> {
        self.live_session()?.holder(id).await
    }

    /// Every id held now, as the backend sees it from this node, sorted by
    /// id (not only this node's singletons: what the `highlander` CLI's
    /// `status` shows). An error for a backend that cannot list holders.
    pub async fn holders(&self) -> Result<Vec<HeldId>> {
        self.live_session()?.holders().await
    }

    /// The cluster members as this node sees them (for backends that have
    /// members).
    pub async fn members(&self) -> Result<Vec<Member>> {
        self.live_session()?.members().await
    }

    /// A future that completes at the first change of any singleton's state
    /// on this node *after this call* (not after the future is first
    /// polled), or when the runtime has stopped. So calling it before
    /// checking a condition never misses a change that happens between the
    /// check and the await, also across several runtimes:
    ///
    /// ```
    /// # use highlander::{MemoryCluster, Runtime};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> highlander::Result<()> {
    /// # let cluster = MemoryCluster::new();
    /// # let a = Runtime::builder().node("a").backend(cluster.clone()).start().await?;
    /// # let b = Runtime::builder().node("b").backend(cluster.clone()).start().await?;
    /// loop {
    ///     let (ca, cb) = (a.changed(), b.changed()); // armed first
    ///     if a.status().running().count() + b.status().running().count() == 0 {
    ///         break;
    ///     }
    ///     tokio::select! { _ = ca => {}, _ = cb => {} }
    /// }
    /// # a.shutdown().await; b.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn changed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.version.clone();
        rx.borrow_and_update();
        async move {
            let _ = rx.changed().await;
        }
    }

    /// Waits until `condition` holds for this node's [`Status`], checking at
    /// every state change (no polling).
    pub async fn wait_until(&self, mut condition: impl FnMut(&Status) -> bool) -> Status {
        let mut rx = self.inner.version.clone();
        loop {
            rx.borrow_and_update();
            let status = self.status();
            if condition(&status) {
                return status;
            }
            if rx.changed().await.is_err() {
                return self.status();
            }
        }
    }

    /// The session the runtime uses, for backend-specific tests; an error
    /// once the runtime has stopped. Needs the `test-util` feature.
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn session(&self) -> Result<Arc<dyn Session>> {
        self.live_session()
    }

    fn live_session(&self) -> Result<Arc<dyn Session>> {
        self.inner
            .shared
            .upgrade()
            .map(|s| s.session.clone())
            .ok_or(Error::Stopped)
    }
}

/// A snapshot of one node: its singletons, the members it sees, and
/// whether its backend session is up.
///
/// With the `serde` feature (which `http` turns on) it is `Serialize` and
/// `Deserialize`; `GET /status` serves it as JSON. Times are milliseconds
/// since the Unix epoch (`at_unix_ms`, `since_unix_ms`), the state is an
/// object tagged by `"state"`:
///
/// ```json
/// { "node": "a", "backend": "memory", "at_unix_ms": 1764498000000, "session_up": true,
///   "members": [ { "node": "a", "reachable": true, "address": null } ],
///   "weight": 1, "labels": ["zone=eu"], "draining": false,
///   "singletons": [
///     { "id": "mailer", "state": { "state": "running", "token": 7, "restarts": 0 },
///       "since_unix_ms": 1764497990000, "restarts": 0 },
///     { "id": "sweeper", "state": { "state": "waiting", "holder": { "node": "b", "token": 3 } },
///       "since_unix_ms": 1764497991000, "restarts": 0, "prefer": ["zone=eu"] } ] }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Status {
    /// This node's name.
    pub node: String,
    /// The backend, with any credential hidden.
    pub backend: String,
    /// When this snapshot was taken (wall clock).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "at_unix_ms", with = "crate::ops::unix_ms")
    )]
    pub at: SystemTime,
    /// Whether the backend session is up: the last probe (once a second)
    /// reached the backend, no singleton is retrying because the backend
    /// could not be asked, and the backend's lease deadline, when it reports
    /// one, is ahead. What `GET /readyz` answers. False once the runtime
    /// has stopped.
    pub session_up: bool,
    /// The cluster members as this node saw them at the last probe (for
    /// backends that have members; empty otherwise), with their liveness.
    pub members: Vec<Member>,
    /// This node's weight for placement ([`Builder::weight`]).
    #[cfg_attr(feature = "serde", serde(default = "default_weight"))]
    pub weight: u32,
    /// This node's labels ([`Builder::labels`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub labels: Vec<String>,
    /// True while the node drains ([`RuntimeHandle::drain`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub draining: bool,
    /// One entry per singleton configured on this node, in the order they
    /// were added (those given at start-up first); a removed id is gone.
    pub singletons: Vec<SingletonStatus>,
}

#[cfg(feature = "serde")]
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl Status {
    /// The singletons running here, with their fencing tokens.
    pub fn running(&self) -> impl Iterator<Item = (&str, u64)> {
        self.singletons.iter().filter_map(|s| match s.state {
            SingletonState::Running { token, .. } => Some((s.id.as_str(), token)),
            _ => None,
        })
    }

    /// The state of one singleton.
    pub fn get(&self, id: &str) -> Option<&SingletonState> {
        self.singletons
            .iter()
            .find(|s| s.id == id)
            .map(|s| &s.state)
    }

    /// True when `id` runs on this node.
    pub fn is_running(&self, id: &str) -> bool {
        matches!(self.get(id), Some(SingletonState::Running { .. }))
    }
}

/// One singleton's state on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct SingletonStatus {
    /// The singleton id.
    pub id: String,
    /// What this node is doing with it: the holder while waiting, the
    /// fencing token while running.
    pub state: SingletonState,
    /// When the current state began (wall clock): for a running id, when
    /// this tenure began; restarts within a tenure do not move it.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "since_unix_ms", with = "crate::ops::unix_ms")
    )]
    pub since: SystemTime,
    /// Restarts of this id's instance on this node since the runtime
    /// started, over all tenures.
    pub restarts: u32,
    /// The node names or labels this service prefers
    /// ([`ChildSpec::prefer`]); left out of the JSON when empty.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub prefer: Vec<String>,
    /// The node names or labels this service avoids ([`ChildSpec::avoid`]);
    /// left out of the JSON when empty.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub avoid: Vec<String>,
}

impl SingletonStatus {
    /// The fencing token of this node's tenure, while it holds the id.
    pub fn token(&self) -> Option<u64> {
        match self.state {
            SingletonState::Running { token, .. } | SingletonState::Finished { token, .. } => {
                Some(token)
            }
            _ => None,
        }
    }

    /// Who holds the id, as far as this node knows: this node while it
    /// holds it, the holder the backend named while waiting.
    pub fn holder(&self, node: &str) -> Option<Holder> {
        match &self.state {
            SingletonState::Running { token, .. } | SingletonState::Finished { token, .. } => {
                Some(Holder::new(node, Some(*token)))
            }
            SingletonState::Waiting { holder } => holder.clone(),
            _ => None,
        }
    }
}
