//! Operating a node: status, metrics, and the HTTP endpoint.
//!
//! - [`RuntimeHandle::status`](crate::RuntimeHandle::status): per id the
//!   state (with the holder while waiting and the fencing token while
//!   running), since when, and restarts; per node the members with their
//!   liveness and whether the backend session is up. With the `serde`
//!   feature the [`Status`](crate::Status) types are `Serialize` and
//!   `Deserialize`.
//! - `ops::metrics` (feature `metrics`): every metric name, label and
//!   unit, in one table.
//! - The HTTP endpoint (feature `http`): `Builder::http` for `/healthz`,
//!   `/readyz`, `/status`, `/metrics`, the status page at `/`, and, with
//!   `Builder::http_token`, `POST /step-down/{id}`, `/drain`, `/resume`
//!   and `/transfer/{id}?to=NODE`.
//!
//! `docs/operations.md` has the whole picture, with the status page, JSON
//! logs and measured costs.
//!
//! Inside, the guardian reports every state change and every stopped
//! instance here; a probe task per runtime asks the backend for its
//! members and lease deadline once a second.

use std::mem::discriminant;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::Member;
use crate::guardian::{Shared, SingletonState};
use crate::{Builder, RuntimeHandle, ShutdownReason};

#[cfg(feature = "http")]
pub(crate) mod http;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(feature = "serde")]
mod serde_impls;

#[cfg(feature = "serde")]
pub(crate) use serde_impls::unix_ms;

/// How often the probe asks the backend for its members and lease deadline.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe that takes longer than this counts as a failed one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the builder collects for operations.
#[derive(Debug, Clone)]
pub(crate) struct OpsConfig {
    /// One series per id (the default), or per node only.
    pub(crate) metrics_per_id: bool,
    /// The HTTP address as given (`Builder::http`), parsed at start.
    #[cfg(feature = "http")]
    pub(crate) http: Option<String>,
    /// The bearer token of the write routes (step-down, drain, resume,
    /// transfer).
    #[cfg(feature = "http")]
    pub(crate) http_token: Option<String>,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            metrics_per_id: true,
            #[cfg(feature = "http")]
            http: None,
            #[cfg(feature = "http")]
            http_token: None,
        }
    }
}

impl Builder {
    /// Whether metrics carry one series per singleton id (an `id` label,
    /// the default) or only per node. Turn it off for fleets of many ids
    /// (say 100,000): each id adds a handful of series to every scrape.
    /// Without the `metrics` feature this setting has no effect.
    pub fn metrics_per_id(mut self, per_id: bool) -> Self {
        self.ops.metrics_per_id = per_id;
        self
    }
}

/// What a node knows about itself beyond its singletons' states.
pub(crate) struct NodeOps {
    #[cfg(feature = "metrics")]
    node: Arc<str>,
    per_id: bool,
    /// Slots in `Retrying` (the backend could not be asked).
    retrying: AtomicUsize,
    /// Slots that hold their id or may be about to (`Claiming`, `Running`,
    /// `Finished`): zero once a drain is complete.
    busy: AtomicUsize,
    /// False until the first probe answered, and after a failed one.
    members_ok: AtomicBool,
    probe: Mutex<ProbeResult>,
    #[cfg(feature = "http")]
    pub(crate) http: Mutex<Option<std::net::SocketAddr>>,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: metrics::NodeMetrics,
}

#[derive(Default)]
struct ProbeResult {
    members: Vec<Member>,
    lease_deadline: Option<std::time::Instant>,
}

impl NodeOps {
    pub(crate) fn new(node: Arc<str>, config: &OpsConfig) -> Arc<NodeOps> {
        #[cfg(not(feature = "metrics"))]
        let _ = node;
        #[cfg(not(feature = "http"))]
        if std::env::var_os("HIGHLANDER_HTTP").is_some_and(|v| !v.is_empty()) {
            tracing::warn!(
                "HIGHLANDER_HTTP is set but highlander was built without its `http` feature: not serving; \
                 enable it with `features = [\"http\"]` in Cargo.toml"
            );
        }
        Arc::new(NodeOps {
            #[cfg(feature = "metrics")]
            metrics: metrics::NodeMetrics::new(&node, config.metrics_per_id),
            #[cfg(feature = "metrics")]
            node,
            per_id: config.metrics_per_id,
            retrying: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            members_ok: AtomicBool::new(false),
            probe: Mutex::new(ProbeResult::default()),
            #[cfg(feature = "http")]
            http: Mutex::new(None),
        })
    }

    /// The per-id record of one singleton.
    pub(crate) fn slot(&self, id: &Arc<str>) -> SlotOps {
        let _ = (id, self.per_id);
        // Every slot starts in `Claiming`, which counts as busy.
        self.busy.fetch_add(1, Ordering::Relaxed);
        SlotOps {
            track: Mutex::new(Track {
                since: wall_ms(),
                // Every slot starts in `Claiming`: the first attempt is now.
                claim_started: Some(Instant::now()),
            }),
            restarts: AtomicU32::new(0),
            #[cfg(feature = "metrics")]
            metrics: self.metrics.for_id(&self.node, id),
        }
    }

    /// Whether the backend session is up: the last probe of the members
    /// answered, no singleton is retrying because the backend could not be
    /// asked, and the backend's lease deadline (when it has one) is ahead.
    pub(crate) fn session_up(&self) -> bool {
        let deadline_ok = self
            .lock_probe()
            .lease_deadline
            .is_none_or(|d| d > std::time::Instant::now());
        deadline_ok
            && self.members_ok.load(Ordering::Relaxed)
            && self.retrying.load(Ordering::Relaxed) == 0
    }

    /// The number of ids this node holds or is claiming now.
    pub(crate) fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// The members as of the last probe.
    pub(crate) fn members(&self) -> Vec<Member> {
        self.lock_probe().members.clone()
    }

    fn lock_probe(&self) -> std::sync::MutexGuard<'_, ProbeResult> {
        self.probe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the backend once; called by [`spawn_probe`]'s task.
    async fn probe_once(&self, shared: &Weak<Shared>) {
        let Some(session) = shared.upgrade().map(|s| s.session.clone()) else {
            return;
        };
        let answer = tokio::time::timeout(PROBE_TIMEOUT, session.members()).await;
        let lease_deadline = session.lease_deadline();
        drop(session);
        let (ok, members) = match answer {
            Ok(Ok(members)) => (true, Some(members)),
            _ => (false, None),
        };
        {
            let mut probe = self.lock_probe();
            if let Some(mut members) = members {
                // Status shows a member's weight and labels, not the ids it
                // runs (which may be 100,000 and are not in the JSON).
                for m in &mut members {
                    if let Some(p) = &mut m.profile {
                        p.catalog = crate::backend::Catalog::default();
                    }
                }
                probe.members = members;
            }
            probe.lease_deadline = lease_deadline;
        }
        self.members_ok.store(ok, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.probed(self, lease_deadline);
    }
}

/// Starts the node's probe: once now (so the first status has members),
/// then every [`PROBE_EVERY`] until `done`.
pub(crate) async fn spawn_probe(ops: &Arc<NodeOps>, shared: &Arc<Shared>, done: CancellationToken) {
    let weak = Arc::downgrade(shared);
    ops.probe_once(&weak).await;
    let ops = ops.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval_at(Instant::now() + PROBE_EVERY, PROBE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = done.cancelled() => break,
                _ = every.tick() => ops.probe_once(&weak).await,
            }
        }
        ops.members_ok.store(false, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        ops.metrics.stopped();
    });
}

/// What the operations side keeps per singleton, next to its state.
pub(crate) struct SlotOps {
    /// Guarded by the slot's state lock: written only while it is held.
    track: Mutex<Track>,
    restarts: AtomicU32,
    #[cfg(feature = "metrics")]
    metrics: metrics::IdMetrics,
}

struct Track {
    since: SystemTime,
    /// When the id last seemed free: the first claim attempt, or the wake
    /// after a wait. Cleared when the claim succeeds.
    claim_started: Option<Instant>,
}

impl SlotOps {
    fn lock(&self) -> std::sync::MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the current state began (wall clock).
    pub(crate) fn since(&self) -> SystemTime {
        self.lock().since
    }

    /// Restarts of this id on this node since the runtime started.
    pub(crate) fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Called by the guardian, under the slot's state lock, when the state
    /// changes from `old` to `new`.
    pub(crate) fn transition(&self, node: &NodeOps, old: &SingletonState, new: &SingletonState) {
        use SingletonState::*;
        let mut track = self.lock();
        let same_state = discriminant(old) == discriminant(new) && token(old) == token(new);
        if !same_state {
            track.since = wall_ms();
        }
        match (
            matches!(old, Retrying { .. }),
            matches!(new, Retrying { .. }),
        ) {
            (false, true) => {
                node.retrying.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                node.retrying.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        match (is_busy(old), is_busy(new)) {
            (false, true) => {
                node.busy.fetch_add(1, Ordering::SeqCst);
            }
            (true, false) => {
                node.busy.fetch_sub(1, Ordering::SeqCst);
            }
            _ => {}
        }
        if matches!(new, Claiming) && !matches!(old, Claiming | Retrying { .. }) {
            track.claim_started = Some(Instant::now());
        }
        let mut restarted = false;
        let mut tenure_latency = None;
        if let Running { token: t, restarts } = new {
            match old {
                Running {
                    token: old_token,
                    restarts: old_restarts,
                } if old_token == t => {
                    if restarts > old_restarts {
                        restarted = true;
                    }
                }
                _ => tenure_latency = Some(track.claim_started.take().map(|t| t.elapsed())),
            }
        }
        drop(track);
        if restarted {
            self.restarts.fetch_add(1, Ordering::Relaxed);
        }
        #[cfg(feature = "metrics")]
        self.metrics
            .transition(&node.metrics, old, new, restarted, tenure_latency);
        #[cfg(not(feature = "metrics"))]
        let _ = tenure_latency;
    }

    /// Called by the guardian when an instance has stopped, with why.
    pub(crate) fn stopped(&self, node: &Arc<str>, id: &Arc<str>, reason: &ShutdownReason) {
        #[cfg(feature = "metrics")]
        self.metrics.stopped(node, id, reason);
        #[cfg(not(feature = "metrics"))]
        let _ = (node, id, reason);
    }
}

/// The wall clock to the millisecond: what the JSON form keeps, so a
/// status survives a round trip through it unchanged.
pub(crate) fn wall_ms() -> SystemTime {
    let now = SystemTime::now();
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => std::time::UNIX_EPOCH + Duration::from_millis(d.as_millis() as u64),
        Err(_) => now,
    }
}

/// Holds the id, or may be granted it by a claim in flight.
fn is_busy(state: &SingletonState) -> bool {
    matches!(
        state,
        SingletonState::Claiming | SingletonState::Running { .. } | SingletonState::Finished { .. }
    )
}

fn token(state: &SingletonState) -> Option<u64> {
    match state {
        SingletonState::Running { token, .. } | SingletonState::Finished { token, .. } => {
            Some(*token)
        }
        _ => None,
    }
}

/// A short word for a stop reason: the `reason` label, bounded.
#[cfg(feature = "metrics")]
pub(crate) fn reason_label(reason: &ShutdownReason) -> &'static str {
    match reason {
        ShutdownReason::Conflict => "conflict",
        ShutdownReason::LeaseLost => "lease_lost",
        ShutdownReason::NodeShutdown => "node_shutdown",
        ShutdownReason::Error(_) => "error",
        ShutdownReason::Stepdown => "stepdown",
        ShutdownReason::Normal => "normal",
        ShutdownReason::Moved => "moved",
        ShutdownReason::Removed => "removed",
    }
}

impl RuntimeHandle {
    /// The address the HTTP endpoint listens on (with port 0 asked, the
    /// port the system chose), or `None` when it is not serving. Needs the
    /// `http` feature.
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        *self.ops().http.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Held by a guardian task for its whole life: when the task is dropped
/// mid-flight (an aborted runtime), what it ran is no longer running, and
/// the gauges say so.
pub(crate) struct ExitGuard {
    slot: Arc<crate::guardian::Slot>,
    node: Arc<NodeOps>,
}

impl ExitGuard {
    pub(crate) fn new(slot: &Arc<crate::guardian::Slot>, node: &Arc<NodeOps>) -> ExitGuard {
        ExitGuard {
            slot: slot.clone(),
            node: node.clone(),
        }
    }
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let state = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*state, SingletonState::Retrying { .. }) {
            self.node.retrying.fetch_sub(1, Ordering::Relaxed);
        }
        if is_busy(&state) {
            self.node.busy.fetch_sub(1, Ordering::SeqCst);
        }
        #[cfg(feature = "metrics")]
        self.slot.ops.metrics.gone(&state);
    }
}
