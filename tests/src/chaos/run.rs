//! The drivers: node processes on a real backend (postgres, etcd, cluster)
//! or runtimes in this process (memory), faults from the schedule, and the
//! recorded history handed to the checker.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use highlander::{
    ChildSpec, Context, MemoryCluster, Runtime, RuntimeHandle, Service, ShutdownReason,
};

use super::checker::{Bounds, Model, Verdict, check};
use super::fence::Fence;
use super::history::{End, Exit, Fault, FaultKind, History};
use super::proxy::BackendProxy;
use super::schedule::{Step, schedule};
use crate::process::{Event, EventKind, Fleet, NodeProcess};
use crate::unix_nanos;

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

    /// The faults that make sense for it, with their weights.
    pub fn weights(self) -> Vec<(FaultKind, u32)> {
        use FaultKind::*;
        match self {
            // One process: no signals, no server.
            Backend::Memory => vec![(Kill, 3), (Restart, 2), (Partition, 3)],
            Backend::Postgres | Backend::Etcd => vec![
                (Kill, 3),
                (Pause, 2),
                (Restart, 2),
                (Partition, 2),
                (BackendRestart, 1),
            ],
            Backend::Cluster | Backend::Beam => {
                vec![(Kill, 3), (Pause, 2), (Restart, 2), (Partition, 3)]
            }
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
        let failover: Vec<(FaultKind, Duration)> = match self {
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
        Bounds {
            clock_error: ms(1),
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
    /// Cluster only: run each node in a network namespace of its own
    /// ([`Topology`](crate::netns_cluster::Topology)) and make partitions
    /// with `iptables` there instead of the harness's TCP proxies. Needs
    /// root.
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

/// Runs one seeded chaos run and checks it.
pub async fn run(cfg: &RunConfig) -> Outcome {
    let began = Instant::now();
    let mut weights = cfg.backend.weights();
    if let Some(only) = &cfg.kinds {
        weights.retain(|(k, _)| only.contains(k));
    }
    let steps = schedule(cfg.seed, cfg.faults, &weights, cfg.backend.hold(cfg.quick));
    let bounds = cfg.backend.bounds(cfg.slack);
    let (history, mut problems) = match cfg.backend {
        Backend::Memory => drive(MemoryDriver::start(cfg).await, cfg, &steps).await,
        _ => drive(ProcessDriver::start(cfg).await, cfg, &steps).await,
    };
    let mut verdict = check(&history, cfg.backend.model(), &bounds);
    verdict.violations.append(&mut problems);
    Outcome {
        backend: cfg.backend,
        model: cfg.backend.model(),
        bounds,
        steps,
        history,
        verdict,
        elapsed: began.elapsed(),
    }
}

/// What a driver can do to its nodes.
trait Driver {
    fn nodes(&self) -> Vec<String>;
    /// Moves what the nodes reported into the recorded events.
    async fn collect(&mut self, wait: Duration);
    fn events(&self) -> &[Event];
    async fn kill(&mut self, node: &str) -> Fault;
    async fn pause(&mut self, node: &str, hold: Duration) -> Fault;
    async fn restart(&mut self, node: &str) -> (Fault, Option<String>);
    async fn partition(&mut self, node: &str, hold: Duration) -> Fault;
    async fn backend_restart(&mut self) -> Fault;
    async fn shutdown(&mut self) -> Vec<Exit>;
    fn writes(&self) -> Vec<super::history::FenceWrite>;
}

fn snapshot<D: Driver>(d: &D, ids: &[String], faults: &[Fault]) -> History {
    History {
        ids: ids.to_vec(),
        events: d.events().to_vec(),
        faults: faults.to_vec(),
        writes: Vec::new(),
        shutdown_at: u128::MAX,
        end: unix_nanos(),
        exits: Vec::new(),
    }
}

/// The node holding `id` now, if exactly one does.
fn holders(history: &History, id: &str) -> Vec<String> {
    history
        .tenures()
        .into_iter()
        .filter(|t| t.id == id && t.how == End::Open)
        .map(|t| t.node)
        .collect()
}

async fn drive<D: Driver>(
    mut d: D,
    cfg: &RunConfig,
    steps: &[Step],
) -> (History, Vec<super::checker::Violation>) {
    let mut faults: Vec<Fault> = Vec::new();
    let mut problems = Vec::new();
    let mut exits = Vec::new();
    let guard = Duration::from_secs(90);
    let settled = |d: &D, faults: &[Fault]| {
        let h = snapshot(d, &cfg.ids, faults);
        cfg.ids.iter().all(|id| holders(&h, id).len() == 1)
    };
    // Everyone up, each id running once.
    let deadline = Instant::now() + guard;
    while !settled(&d, &faults) && Instant::now() < deadline {
        d.collect(Duration::from_millis(50)).await;
    }
    let nodes = d.nodes();
    for (i, step) in steps.iter().enumerate() {
        let h = snapshot(&d, &cfg.ids, &faults);
        let holder = holders(&h, &cfg.ids[0]).into_iter().next();
        let target = match (step.at_holder || cfg.always_holder, holder) {
            (true, Some(h)) => h,
            _ => nodes[step.node_pick % nodes.len()].clone(),
        };
        let fault = match step.kind {
            FaultKind::Kill => d.kill(&target).await,
            FaultKind::Pause => d.pause(&target, step.hold).await,
            FaultKind::Restart => {
                let (fault, problem) = d.restart(&target).await;
                exits.push(Exit {
                    node: target.clone(),
                    problem,
                });
                fault
            }
            FaultKind::Partition => d.partition(&target, step.hold).await,
            FaultKind::BackendRestart => d.backend_restart().await,
        };
        if cfg.verbose {
            eprintln!(
                "fault {:>3}/{}: {} {} for {:.0} ms",
                i + 1,
                steps.len(),
                fault.kind,
                fault.node.as_deref().unwrap_or("backend"),
                (fault.until - fault.at) as f64 / 1e6
            );
        }
        faults.push(fault);
        let deadline = Instant::now() + guard;
        loop {
            d.collect(Duration::from_millis(20)).await;
            if settled(&d, &faults) {
                break;
            }
            if Instant::now() > deadline {
                problems.push(super::checker::Violation {
                    rule: "stuck",
                    detail: format!(
                        "not exactly one holder per id {guard:?} after fault {} ({} of {})",
                        i + 1,
                        step.kind,
                        target
                    ),
                });
                break;
            }
        }
        if problems.iter().any(|p| p.rule == "stuck") {
            break;
        }
        d.collect(step.settle).await;
    }
    d.collect(Duration::from_millis(300)).await;
    let shutdown_at = unix_nanos();
    exits.extend(d.shutdown().await);
    d.collect(Duration::from_millis(300)).await;
    let history = History {
        ids: cfg.ids.clone(),
        events: d.events().to_vec(),
        faults,
        writes: d.writes(),
        shutdown_at,
        end: unix_nanos(),
        exits,
    };
    (history, problems)
}

// ---------------------------------------------------------------- processes

enum Server {
    Postgres(crate::postgres::PgServer),
    Etcd(crate::etcd::EtcdCluster),
    Cluster(crate::cluster::Partitioner),
    ClusterNetns(crate::netns_cluster::Topology),
    Beam {
        epmd_port: u16,
        ctl_dir: PathBuf,
        _epmd: Epmd,
    },
}

/// Stops the epmd daemon that the first BEAM node started on its port, at
/// the end of the run or when the run panics.
struct Epmd(u16);

impl Epmd {
    fn kill(&self) {
        let _ = std::process::Command::new("epmd")
            .arg("-kill")
            .env("ERL_EPMD_PORT", self.0.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for Epmd {
    fn drop(&mut self) {
        self.kill();
    }
}

struct ProcessDriver {
    backend: Backend,
    fleet: Fleet,
    procs: HashMap<String, NodeProcess>,
    urls: HashMap<String, String>,
    proxies: HashMap<String, BackendProxy>,
    /// Per node, what its binary is run through (`ip netns exec <ns>`).
    prefixes: HashMap<String, Vec<String>>,
    server: Server,
    fence: Fence,
    _fence_server: super::fence::FenceServer,
}

const COOKIE: &str = "chaos-cookie-not-a-real-secret";

impl ProcessDriver {
    async fn start(cfg: &RunConfig) -> ProcessDriver {
        let names: Vec<String> = (0..cfg.nodes).map(|i| format!("n{i}")).collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let fence = Fence::new();
        let mut topology = (cfg.backend == Backend::Cluster && cfg.netns).then(|| {
            tokio::task::block_in_place(|| crate::netns_cluster::Topology::create(&name_refs))
        });
        // Nodes in namespaces reach the host at its address on their bridge.
        let fence_ip = topology.as_ref().map_or_else(
            || std::net::Ipv4Addr::LOCALHOST.into(),
            |t| t.host_ip().into(),
        );
        let fence_server = fence.serve_on(fence_ip).await;
        let mut proxies = HashMap::new();
        let mut urls = HashMap::new();
        let mut prefixes = HashMap::new();
        let server = match cfg.backend {
            Backend::Postgres => {
                let pg = tokio::task::spawn_blocking(crate::postgres::PgServer::start)
                    .await
                    .expect("the Postgres harness starts");
                let target: SocketAddr = ([127, 0, 0, 1], pg.port()).into();
                for n in &names {
                    let proxy = BackendProxy::start(target, Some(PG_SERVER_TIMEOUT)).await;
                    let url = pg.url().replace(
                        &format!(":{}/", pg.port()),
                        &format!(":{}/", proxy.addr.port()),
                    );
                    urls.insert(n.clone(), url);
                    proxies.insert(n.clone(), proxy);
                }
                Server::Postgres(pg)
            }
            Backend::Etcd => {
                let etcd = crate::etcd::EtcdCluster::single().await;
                let target: SocketAddr = etcd.endpoints()[0].parse().expect("an etcd endpoint");
                for n in &names {
                    let proxy = BackendProxy::start(target, None).await;
                    urls.insert(
                        n.clone(),
                        format!("etcd://{}/highlander?ttl={ETCD_TTL_S}s", proxy.addr),
                    );
                    proxies.insert(n.clone(), proxy);
                }
                Server::Etcd(etcd)
            }
            Backend::Cluster if topology.is_some() => {
                let topo = topology.take().expect("just checked");
                // Every node listens on its namespace's address, seeds by name.
                let seeds: Vec<String> = names
                    .iter()
                    .map(|n| format!("{}:7400", crate::netns_cluster::Topology::dns(n)))
                    .collect();
                for n in &names {
                    let url = format!("cluster://{}:7400?seeds={}", topo.ip(n), seeds.join(","));
                    urls.insert(n.clone(), url);
                    prefixes.insert(n.clone(), topo.exec_prefix(n));
                }
                Server::ClusterNetns(topo)
            }
            Backend::Cluster => {
                let mut partitioner = crate::cluster::Partitioner::new();
                for (n, url) in crate::cluster::proxied_nodes(&name_refs, &mut partitioner).await {
                    urls.insert(n, url);
                }
                Server::Cluster(partitioner)
            }
            Backend::Beam => {
                let ctl_dir = std::env::temp_dir().join(format!(
                    "hl-beam-{}-{}",
                    std::process::id(),
                    unix_nanos() % 1_000_000_000
                ));
                std::fs::create_dir_all(&ctl_dir).expect("create the BEAM control dir");
                for n in &names {
                    urls.insert(n.clone(), "beam".to_string());
                }
                let epmd_port = crate::cluster::free_port();
                Server::Beam {
                    epmd_port,
                    ctl_dir,
                    _epmd: Epmd(epmd_port),
                }
            }
            Backend::Memory => unreachable!("memory runs in-process"),
        };
        let shutdown = SHUTDOWN_MS.to_string();
        let fence_addr = fence_server.addr.to_string();
        let mut env: Vec<(String, String)> = vec![
            ("HL_IDS".into(), cfg.ids.join(",")),
            ("HL_SHUTDOWN_MS".into(), shutdown),
            ("HL_FENCE_ADDR".into(), fence_addr),
            ("HIGHLANDER_COOKIE".into(), COOKIE.into()),
        ];
        let mut bin = cfg.node_bin.clone();
        if let Server::Beam {
            epmd_port, ctl_dir, ..
        } = &server
        {
            bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("beam/node.sh");
            let peers: Vec<String> = names.iter().map(|n| format!("{n}@127.0.0.1")).collect();
            env.extend([
                ("HL_PEERS".into(), peers.join(",")),
                ("HL_CTL_DIR".into(), ctl_dir.display().to_string()),
                ("ERL_EPMD_PORT".into(), epmd_port.to_string()),
                ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
            ]);
        }
        let env_refs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let fleet = Fleet::new(&bin, "", &env_refs);
        let mut driver = ProcessDriver {
            backend: cfg.backend,
            fleet,
            procs: HashMap::new(),
            urls,
            proxies,
            prefixes,
            server,
            fence,
            _fence_server: fence_server,
        };
        for n in &names {
            driver.spawn(n).await;
        }
        driver
    }

    async fn spawn(&mut self, name: &str) {
        let url = self.urls[name].clone();
        let prefix = self.prefixes.get(name).cloned().unwrap_or_default();
        let p = self
            .fleet
            .spawn_in(name, &[("HIGHLANDER_BACKEND", url.as_str())], &prefix)
            .await;
        self.procs.insert(name.to_string(), p);
    }
}

impl Driver for ProcessDriver {
    fn nodes(&self) -> Vec<String> {
        let mut n: Vec<String> = self.urls.keys().cloned().collect();
        n.sort();
        n
    }

    async fn collect(&mut self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || self.fleet.next_event(left).await.is_none() {
                return;
            }
        }
    }

    fn events(&self) -> &[Event] {
        &self.fleet.history
    }

    async fn kill(&mut self, node: &str) -> Fault {
        let at = unix_nanos();
        let mut p = self.procs.remove(node).expect("a running node");
        p.signal("KILL");
        let _ = p.wait_exit(Duration::from_secs(30)).await;
        self.spawn(node).await;
        Fault {
            kind: FaultKind::Kill,
            node: Some(node.into()),
            at,
            until: unix_nanos(),
        }
    }

    async fn pause(&mut self, node: &str, hold: Duration) -> Fault {
        let at = unix_nanos();
        self.procs[node].signal("STOP");
        self.collect(hold).await;
        self.procs[node].signal("CONT");
        Fault {
            kind: FaultKind::Pause,
            node: Some(node.into()),
            at,
            until: unix_nanos(),
        }
    }

    async fn restart(&mut self, node: &str) -> (Fault, Option<String>) {
        let at = unix_nanos();
        let mut p = self.procs.remove(node).expect("a running node");
        p.signal("TERM");
        let status = p.wait_exit(Duration::from_secs(30)).await;
        let problem = (!status.success()).then(|| format!("after SIGTERM: {status}"));
        self.spawn(node).await;
        let fault = Fault {
            kind: FaultKind::Restart,
            node: Some(node.into()),
            at,
            until: unix_nanos(),
        };
        (fault, problem)
    }

    async fn partition(&mut self, node: &str, hold: Duration) -> Fault {
        let at = unix_nanos();
        match &self.server {
            Server::Cluster(p) => {
                let others: Vec<String> = self.nodes().into_iter().filter(|n| n != node).collect();
                let others: Vec<&str> = others.iter().map(String::as_str).collect();
                p.partition(&[&[node], &others]);
            }
            Server::ClusterNetns(t) => {
                let others: Vec<String> = self.nodes().into_iter().filter(|n| n != node).collect();
                let others: Vec<&str> = others.iter().map(String::as_str).collect();
                tokio::task::block_in_place(|| t.partition(&[&[node], &others]));
            }
            Server::Beam { ctl_dir, .. } => {
                std::fs::write(ctl_dir.join(node), "cut").expect("write the BEAM control file")
            }
            _ => self.proxies[node].cut(),
        }
        self.collect(hold).await;
        match &self.server {
            Server::Cluster(p) => p.heal(),
            Server::ClusterNetns(t) => tokio::task::block_in_place(|| t.heal()),
            Server::Beam { ctl_dir, .. } => {
                std::fs::write(ctl_dir.join(node), "heal").expect("write the BEAM control file")
            }
            _ => self.proxies[node].heal(),
        }
        Fault {
            kind: FaultKind::Partition,
            node: Some(node.into()),
            at,
            until: unix_nanos(),
        }
    }

    async fn backend_restart(&mut self) -> Fault {
        let at = unix_nanos();
        match &mut self.server {
            Server::Postgres(pg) => tokio::task::block_in_place(|| pg.restart()),
            Server::Etcd(etcd) => {
                etcd.kill_member(0);
                etcd.restart_member(0).await;
            }
            Server::Cluster(_) | Server::ClusterNetns(_) | Server::Beam { .. } => {}
        }
        let _ = self.backend;
        Fault {
            kind: FaultKind::BackendRestart,
            node: None,
            at,
            until: unix_nanos(),
        }
    }

    async fn shutdown(&mut self) -> Vec<Exit> {
        for p in self.procs.values() {
            p.signal("TERM");
        }
        let mut exits = Vec::new();
        let mut names: Vec<String> = self.procs.keys().cloned().collect();
        names.sort();
        for name in names {
            let mut p = self.procs.remove(&name).expect("listed");
            let status = p.wait_exit(Duration::from_secs(30)).await;
            let mut problem = (!status.success()).then(|| format!("after SIGTERM: {status}"));
            // Reaped: no process of that pid may be left.
            let alive = std::process::Command::new("kill")
                .arg("-0")
                .arg(p.pid().to_string())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if alive {
                problem = Some(format!("pid {} still running", p.pid()));
            }
            exits.push(Exit {
                node: name,
                problem,
            });
        }
        if let Server::Beam { ctl_dir, _epmd, .. } = &self.server {
            // The first node started epmd as a daemon: stop it too.
            _epmd.kill();
            let _ = std::fs::remove_dir_all(ctl_dir);
        }
        exits
    }

    fn writes(&self) -> Vec<super::history::FenceWrite> {
        self.fence.log()
    }
}

// ------------------------------------------------------------------ memory

struct MemProbe {
    id: String,
    node: String,
    token: u64,
    events: Arc<Mutex<Vec<Event>>>,
    fence: Fence,
}

impl MemProbe {
    fn record(&self, kind: EventKind, reason: Option<String>) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Event {
                kind,
                at_nanos: unix_nanos(),
                node: self.node.clone(),
                id: self.id.clone(),
                token: self.token,
                reason,
            });
    }
}

impl Service for MemProbe {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.token = ctx.fencing_token();
        self.node = ctx.node().to_string();
        self.fence.write(&self.id, self.token, &self.node);
        self.record(EventKind::Start, None);
        loop {
            tokio::select! {
                () = ctx.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    self.fence.write(&self.id, self.token, &self.node);
                }
            }
        }
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        self.record(EventKind::Stop, Some(reason.to_string().replace(' ', "_")));
    }
}

struct MemoryDriver {
    cluster: MemoryCluster,
    ids: Vec<String>,
    names: Vec<String>,
    handles: HashMap<String, RuntimeHandle>,
    events: Arc<Mutex<Vec<Event>>>,
    seen: Vec<Event>,
    fence: Fence,
}

impl MemoryDriver {
    async fn start(cfg: &RunConfig) -> MemoryDriver {
        let mut d = MemoryDriver {
            cluster: MemoryCluster::new(),
            ids: cfg.ids.clone(),
            names: (0..cfg.nodes).map(|i| format!("n{i}")).collect(),
            handles: HashMap::new(),
            events: Arc::default(),
            seen: Vec::new(),
            fence: Fence::new(),
        };
        for n in d.names.clone() {
            d.spawn(&n).await;
        }
        d
    }

    fn builder(&self, name: &str) -> highlander::Builder {
        let mut builder = Runtime::builder().node(name).backend(self.cluster.clone());
        for id in &self.ids {
            let (id2, events, fence) = (id.clone(), self.events.clone(), self.fence.clone());
            builder = builder.child(
                ChildSpec::new(id.clone(), move |_ctx| {
                    let probe = MemProbe {
                        id: id2.clone(),
                        node: String::new(),
                        token: 0,
                        events: events.clone(),
                        fence: fence.clone(),
                    };
                    async move { Ok(probe) }
                })
                .shutdown(Duration::from_millis(SHUTDOWN_MS)),
            );
        }
        builder
    }

    async fn spawn(&mut self, name: &str) {
        // An aborted runtime lets go of its name once its tasks are
        // dropped, a moment after `abort`: retry until then.
        let mut tries = 0;
        let handle = loop {
            match self.builder(name).start().await {
                Ok(h) => break h,
                Err(e) if tries < 500 && e.to_string().contains("already connected") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("a memory runtime starts: {e}"),
            }
        };
        self.handles.insert(name.to_string(), handle);
    }
}

impl Driver for MemoryDriver {
    fn nodes(&self) -> Vec<String> {
        self.names.clone()
    }

    async fn collect(&mut self, wait: Duration) {
        tokio::time::sleep(wait).await;
        let events = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.seen = events;
    }

    fn events(&self) -> &[Event] {
        &self.seen
    }

    async fn kill(&mut self, node: &str) -> Fault {
        let at = unix_nanos();
        let h = self.handles.remove(node).expect("a running node");
        h.abort();
        h.stopped().await;
        self.spawn(node).await;
        Fault {
            kind: FaultKind::Kill,
            node: Some(node.into()),
            at,
            until: unix_nanos(),
        }
    }

    async fn pause(&mut self, node: &str, hold: Duration) -> Fault {
        // One process cannot be paused in part: a pause is a partition.
        let mut f = self.partition(node, hold).await;
        f.kind = FaultKind::Pause;
        f
    }

    async fn restart(&mut self, node: &str) -> (Fault, Option<String>) {
        let at = unix_nanos();
        let h = self.handles.remove(node).expect("a running node");
        h.shutdown().await;
        self.spawn(node).await;
        let fault = Fault {
            kind: FaultKind::Restart,
            node: Some(node.into()),
            at,
            until: unix_nanos(),
        };
        (fault, None)
    }

    async fn partition(&mut self, node: &str, hold: Duration) -> Fault {
        let at = unix_nanos();
        let others: Vec<&str> = self
            .names
            .iter()
            .map(String::as_str)
            .filter(|n| *n != node)
            .collect();
        self.cluster.partition(&[&[node], &others]);
        self.collect(hold).await;
        self.cluster.heal();
        Fault {
            kind: FaultKind::Partition,
            node: Some(node.into()),
            at,
            until: unix_nanos(),
        }
    }

    async fn backend_restart(&mut self) -> Fault {
        let now = unix_nanos();
        Fault {
            kind: FaultKind::BackendRestart,
            node: None,
            at: now,
            until: now,
        }
    }

    async fn shutdown(&mut self) -> Vec<Exit> {
        let mut exits = Vec::new();
        let mut names: Vec<String> = self.handles.keys().cloned().collect();
        names.sort();
        for name in names {
            let h = self.handles.remove(&name).expect("listed");
            let done = tokio::time::timeout(Duration::from_secs(30), h.shutdown()).await;
            exits.push(Exit {
                node: name,
                problem: done
                    .is_err()
                    .then(|| "did not shut down within 30 s".to_string()),
            });
        }
        exits
    }

    fn writes(&self) -> Vec<super::history::FenceWrite> {
        self.fence.log()
    }
}
