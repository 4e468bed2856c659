//! The runtime: builder, start-up, status, and shutdown.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::backend::{self, Backend, HeldId, Holder, Member, Session};
use crate::context::StateMap;
use crate::guardian::{Guardian, Shared, SingletonState, Slot};
use crate::ops::{NodeOps, OpsConfig};
use crate::spec::{self, ChildSpec, Singleton, validate_id};
use crate::{Context, Error, Result, Service, redact_url};

/// Runs every `#[highlander]` service in the binary until SIGTERM or Ctrl-C,
/// then stops them all and releases their ids.
///
/// Configuration comes from the environment:
/// - `HIGHLANDER_BACKEND`: `memory` (the default, with one info line saying
///   so), `postgres://…`, `etcd://…` or `cluster://…`;
/// - `HIGHLANDER_NODE`: this node's name (default: host name and pid).
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
    /// a duplicate id, an invalid id, a backend URL that cannot be used, a
    /// backend that refuses this node (bad credentials, say) or one that
    /// cannot be reached within the start timeout
    /// ([`Builder::start_timeout`]).
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
        });
        let slots: Vec<Arc<Slot>> = specs
            .into_iter()
            .map(|spec| {
                Arc::new(Slot {
                    ops: ops.slot(&spec.id),
                    spec,
                    state: Mutex::new(SingletonState::Claiming),
                    step_down: Notify::new(),
                })
            })
            .collect();

        let done = CancellationToken::new();
        crate::ops::spawn_probe(&ops, &shared, done.clone()).await;
        let mut guardians = JoinSet::new();
        for slot in &slots {
            let guardian = Guardian {
                slot: slot.clone(),
                shared: shared.clone(),
            };
            guardians.spawn(guardian.run());
        }
        let main = {
            let done = done.clone();
            let session = session.clone();
            let shutdown = shutdown.clone();
            let node = node.clone();
            // The main task keeps the shared state (and so the session) alive
            // for as long as the runtime runs, with or without singletons;
            // aborting it is what drops them.
            let shared = shared.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                while let Some(result) = guardians.join_next().await {
                    if let Err(e) = result
                        && e.is_panic()
                    {
                        error!(node = %node, "a guardian panicked: this is a bug in highlander");
                    }
                }
                session.close().await;
                drop(shared);
                info!(node = %node, "highlander stopped: every id released");
                done.cancel();
            })
        };
        let by_id = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.spec.id.clone(), i))
            .collect();
        let handle = RuntimeHandle {
            inner: Arc::new(HandleInner {
                ops,
                node,
                backend: description,
                version: shared.version.subscribe(),
                shared: Arc::downgrade(&shared),
                slots,
                by_id,
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
        handle.shutdown().await;
        Ok(())
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
        validate_id(&spec.id)?;
        if let Some(first) = seen.insert(&spec.id, &spec.type_name) {
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
    slots: Vec<Arc<Slot>>,
    by_id: HashMap<Arc<str>, usize>,
    shutdown: CancellationToken,
    done: CancellationToken,
    main: AbortHandle,
}

impl fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("node", &self.inner.node)
            .field("backend", &self.inner.backend)
            .field("singletons", &self.inner.slots.len())
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
        // Dropping the main task drops the guardians' JoinSet, which aborts
        // every guardian mid-flight; the shutdown token stays untouched so
        // no instance is stopped gracefully.
        self.inner.main.abort();
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
        let slot = self.slot(id)?;
        let running = matches!(
            *slot.state.lock().unwrap_or_else(|e| e.into_inner()),
            SingletonState::Running { .. }
        );
        if running {
            // A permit, not a wake-up of current waiters: the instance may
            // not yet be listening (its first poll may come after `run`
            // has begun), and the request must not be lost then. A permit
            // left when the tenure ends otherwise is dropped when the next
            // tenure begins.
            slot.step_down.notify_one();
        }
        Ok(())
    }

    fn slot(&self, id: &str) -> Result<&Arc<Slot>> {
        self.inner
            .by_id
            .get(id)
            .map(|&i| &self.inner.slots[i])
            .ok_or_else(|| Error::config(format!("no singleton `{id}` is configured on this node")))
    }

    /// What every singleton on this node is doing now, with the members
    /// and session state as of the last probe (at most a second old).
    pub fn status(&self) -> Status {
        let singletons = self
            .inner
            .slots
            .iter()
            .map(|slot| {
                let state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                SingletonStatus {
                    id: slot.spec.id.to_string(),
                    state: state.clone(),
                    since: slot.ops.since(),
                    restarts: slot.ops.restarts(),
                }
            })
            .collect();
        let ops = &self.inner.ops;
        Status {
            node: self.inner.node.to_string(),
            backend: self.inner.backend.clone(),
            at: crate::ops::wall_ms(),
            session_up: !self.inner.done.is_cancelled() && ops.session_up(),
            members: ops.members(),
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
///   "singletons": [
///     { "id": "mailer", "state": { "state": "running", "token": 7, "restarts": 0 },
///       "since_unix_ms": 1764497990000, "restarts": 0 },
///     { "id": "sweeper", "state": { "state": "waiting", "holder": { "node": "b", "token": 3 } },
///       "since_unix_ms": 1764497991000, "restarts": 0 } ] }
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
    /// One entry per configured singleton, in start-up order.
    pub singletons: Vec<SingletonStatus>,
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
