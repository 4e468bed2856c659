//! What a chaos run is: the backend (with the faults that make sense for
//! it, how long they hold and the bounds it promises), the run's
//! configuration, and its outcome.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::checker::{Bounds, Model, Verdict};
use super::history::{FaultKind, History};
use super::schedule::Step;

/// The shutdown budget of every test singleton in a chaos run.
pub const SHUTDOWN_MS: u64 = 500;
/// The etcd lease TTL in chaos runs (short so that a run is quick; the
/// budget above fits it).
pub const ETCD_TTL_S: u64 = 3;
/// The Postgres backend's server-side dead-peer time `X` (its default
/// `tcp_user_timeout`), which the proxy plays for the server.
pub const PG_SERVER_TIMEOUT: Duration = Duration::from_secs(15);

/// Which backend a run exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// In-process runtimes on one `MemoryCluster`.
    Memory,
    /// Node processes on a real Postgres.
    Postgres,
    /// Node processes on a real etcd.
    Etcd,
    /// Node processes forming an embedded cluster.
    Cluster,
    /// For comparison: BEAM nodes running the original mechanism
    /// (`:global`, monitors, conflict resolver; `tests/beam/node.exs`).
    /// Needs `elixir`; not part of [`Backend::ALL`].
    Beam,
}

impl Backend {
    /// Every highlander backend.
    pub const ALL: [Backend; 4] = [
        Backend::Memory,
        Backend::Postgres,
        Backend::Etcd,
        Backend::Cluster,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Postgres => "postgres",
            Backend::Etcd => "etcd",
            Backend::Cluster => "cluster",
            Backend::Beam => "beam",
        }
    }

    /// The backend named `name`.
    pub fn parse(name: &str) -> Option<Backend> {
        Backend::ALL
            .into_iter()
            .chain([Backend::Beam])
            .find(|b| b.name() == name)
    }

    /// The promise it makes.
    pub fn model(self) -> Model {
        match self {
            Backend::Postgres | Backend::Etcd => Model::Cp,
            Backend::Memory | Backend::Cluster | Backend::Beam => Model::Ap,
        }
    }

    /// The faults that make sense for it, with their weights. Join, leave
    /// and drain are part of every highlander backend's mix (not the BEAM
    /// comparison's: its nodes know no drain).
    pub fn weights(self) -> Vec<(FaultKind, u32)> {
        use FaultKind::*;
        let membership = [(Join, 1), (Leave, 1), (Drain, 1)];
        match self {
            // One process: no signals, no server.
            Backend::Memory => [(Kill, 3), (Restart, 2), (Partition, 3)]
                .into_iter()
                .chain(membership)
                .collect(),
            Backend::Postgres | Backend::Etcd => [
                (Kill, 3),
                (Pause, 2),
                (Restart, 2),
                (Partition, 2),
                (BackendRestart, 1),
            ]
            .into_iter()
            .chain(membership)
            .collect(),
            Backend::Cluster => [(Kill, 3), (Pause, 2), (Restart, 2), (Partition, 3)]
                .into_iter()
                .chain(membership)
                .collect(),
            Backend::Beam => vec![(Kill, 3), (Pause, 2), (Restart, 2), (Partition, 3)],
        }
    }

    /// How long pauses and partitions last: longer than the lease (or the
    /// failure timeout) so that the others take over. With `quick`, the
    /// Postgres ones are shorter than its 15 s server timeout (no takeover,
    /// the link just stalls) to keep the test suite short.
    pub fn hold(self, quick: bool) -> (Duration, Duration) {
        let ms = Duration::from_millis;
        match self {
            Backend::Memory => (ms(100), ms(800)),
            Backend::Cluster => (ms(1300), ms(2500)),
            // Past the net tick (4 s here; a silent node is down after
            // 4–5 s).
            Backend::Beam => (ms(5500), ms(6500)),
            Backend::Etcd => (ms(ETCD_TTL_S * 1000 + 500), ms(ETCD_TTL_S * 1000 + 2000)),
            Backend::Postgres if quick => (ms(1000), ms(3000)),
            Backend::Postgres => (ms(15_500), ms(18_000)),
        }
    }

    /// The stated bounds (see `docs/chaos.md`), each widened by `slack`
    /// for scheduling on a shared machine.
    pub fn bounds(self, slack: Duration) -> Bounds {
        use FaultKind::*;
        let ms = Duration::from_millis;
        let ttl = ms(ETCD_TTL_S * 1000);
        // A graceful release (or a release to a chosen member) is seen by
        // the others at once: memory in the same call, the cluster by
        // broadcast, Postgres by NOTIFY, etcd by its watch.
        let handoff = match self {
            Backend::Memory | Backend::Cluster | Backend::Beam => ms(100),
            Backend::Postgres | Backend::Etcd => ms(200),
        };
        let mut failover: Vec<(FaultKind, Duration)> = match self {
            // Release and takeover happen in the same call.
            Backend::Memory => vec![(Kill, ms(100)), (Restart, ms(100)), (Partition, ms(100))],
            // A killed holder's presence lock is free within a millisecond
            // and probed every 20 ms; a graceful release NOTIFYs. A holder
            // that wakes past its deadline gives up at once but keeps its
            // connection (and so its ids) for its stop budget + the 1 s
            // margin, so that no one starts before its instances stopped
            // (docs/postgres.md). After a cut or a server restart,
            // reconnecting backs off up to 5 s.
            Backend::Postgres => vec![
                (Kill, ms(200)),
                (Restart, ms(200)),
                (Pause, ms(SHUTDOWN_MS + 1_000 + 200)),
                (Partition, ms(5_500)),
                (BackendRestart, ms(5_500)),
            ],
            // A crashed (or cut, or paused) holder's keys live until its
            // lease expires: the TTL after the last keep-alive.
            Backend::Etcd => vec![
                (Kill, ttl + ms(100)),
                (Restart, ms(200)),
                (Pause, ttl + ms(100)),
                (Partition, ttl + ms(5_000)),
                (BackendRestart, ttl + ms(5_000)),
            ],
            // A dead TCP connection is seen at once; a silent member after
            // the 1 s failure timeout.
            Backend::Cluster => vec![
                (Kill, ms(100)),
                (Restart, ms(100)),
                (Pause, ms(1_100)),
                (Partition, ms(1_100)),
            ],
            // A dead connection is seen at once; the monitors fire and the
            // standbys register; a pause is seen after the net tick.
            Backend::Beam => vec![
                (Kill, ms(100)),
                (Restart, ms(100)),
                (Pause, ms(5_000)),
                (Partition, ms(100)),
            ],
        };
        // A leave is a graceful stop that is not followed by a restart: its
        // ids go as a restart's do. A join or a drain frees an id only by a
        // handoff.
        let graceful = failover
            .iter()
            .find(|(k, _)| *k == Restart)
            .map_or(handoff, |(_, d)| *d);
        failover.extend([(Leave, graceful), (Join, handoff), (Drain, handoff)]);
        Bounds {
            clock_error: ms(1),
            handoff: handoff + slack,
            failover: failover.into_iter().map(|(k, d)| (k, d + slack)).collect(),
            // :global resolves a conflict within about 210 ms of the heal.
            heal: if self == Backend::Beam {
                ms(500)
            } else {
                ms(200)
            } + slack,
            wake_grace: ms(SHUTDOWN_MS) + slack,
        }
    }

    /// Whether it can run here: every highlander backend can (the tests
    /// package enables all features); the BEAM needs `elixir`.
    pub fn available(self) -> bool {
        match self {
            Backend::Beam => std::process::Command::new("elixir")
                .arg("--version")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            _ => true,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The backend.
    pub backend: Backend,
    /// How many faults.
    pub faults: usize,
    /// The schedule's seed.
    pub seed: u64,
    /// How many nodes.
    pub nodes: usize,
    /// The singleton ids every node runs.
    pub ids: Vec<String>,
    /// Only these fault kinds (those the backend supports); `None`: all.
    pub kinds: Option<Vec<FaultKind>>,
    /// Added to every stated bound (a shared machine schedules late).
    pub slack: Duration,
    /// Short Postgres holds (see [`Backend::hold`]).
    pub quick: bool,
    /// The `node` binary (not needed for memory).
    pub node_bin: PathBuf,
    /// Print each fault as it happens.
    pub verbose: bool,
    /// Aim every fault at the holder of the first id (for measurements).
    pub always_holder: bool,
    /// Rebalancing on in every node (`Builder::rebalance(true)`; the
    /// `node` binary's `HL_REBALANCE=1`): a change of members hands ids
    /// over to where placement puts them. Off by default, as in the
    /// library.
    pub rebalance: bool,
    /// Cluster only: run each node in a network namespace of its own
    /// ([`Topology`](crate::netns_cluster::Topology)) and make partitions
    /// with `iptables` there instead of the harness's TCP proxies. Needs
    /// root. Joins are left out of the mix then (the namespaces are made
    /// once, for the starting nodes).
    pub netns: bool,
}

impl RunConfig {
    /// Defaults: 3 nodes, ids `chaos-0..2`, 1 s slack, full holds.
    pub fn new(backend: Backend, faults: usize, seed: u64, node_bin: PathBuf) -> RunConfig {
        RunConfig {
            backend,
            faults,
            seed,
            nodes: 3,
            ids: (0..3).map(|i| format!("chaos-{i}")).collect(),
            kinds: None,
            slack: Duration::from_secs(1),
            quick: false,
            node_bin,
            verbose: false,
            always_holder: false,
            rebalance: false,
            netns: false,
        }
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The backend.
    pub backend: Backend,
    /// The model it was checked against.
    pub model: Model,
    /// The bounds used.
    pub bounds: Bounds,
    /// The schedule that ran.
    pub steps: Vec<Step>,
    /// What happened.
    pub history: History,
    /// What the checker found (plus anything the driver saw go wrong).
    pub verdict: Verdict,
    /// How long the run took.
    pub elapsed: Duration,
}

impl Outcome {
    /// A summary in a few lines, with every violation.
    pub fn summary(&self) -> String {
        let mut kinds: BTreeMap<FaultKind, usize> = BTreeMap::new();
        for f in &self.history.faults {
            *kinds.entry(f.kind).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let longest_gap = self
            .verdict
            .gaps
            .iter()
            .map(|g| g.length)
            .max()
            .unwrap_or_default();
        let mut out = format!(
            "{} ({:?}): {} faults ({}), {} tenures, {} excused overlaps (at most {:.1} ms past the heal), longest unowned {:.1} ms, fenced writes {} accepted / {} refused, {:.1} s: {}\n",
            self.backend.name(),
            self.model,
            self.history.faults.len(),
            kinds.join(", "),
            self.verdict.tenures,
            self.verdict.excused_overlaps,
            self.verdict.longest_past_heal.as_secs_f64() * 1e3,
            longest_gap.as_secs_f64() * 1e3,
            self.verdict.writes_accepted,
            self.verdict.writes_rejected,
            self.elapsed.as_secs_f64(),
            if self.verdict.passed() {
                "PASS"
            } else {
                "FAIL"
            }
        );
        for v in &self.verdict.violations {
            out.push_str(&format!("VIOLATION {v}\n"));
        }
        out
    }
}
