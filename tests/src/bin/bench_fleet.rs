//! Benchmark of placement on a fleet of singletons: nodes are runtimes in
//! this process on one backend (a server started here for Postgres and
//! etcd, like the tests do). Prints shares and p50 / p99 / max; asserts
//! nothing.
//!
//! ```text
//! cargo run --release -p highlander-tests --bin bench_fleet -- --backend memory|cluster|postgres|etcd [--ids 10000] [--no-placement]
//! cargo run --release -p highlander-tests --bin bench_fleet -- --rss [--ids 100000] [--probe]
//! ```
//!
//! Scenarios, in order, on one fleet:
//! - bring-up: 3 nodes started 100 ms apart, each running every id: time
//!   until every id runs, time until the ids are at rest, the largest share;
//! - join: a 4th node joins: its share after 5 s, the ids moved against the
//!   minimum (those whose place is the new node), and per moved id the
//!   unowned gap (its stop with `Moved` to its start on the new node);
//! - crash: the node holding the most ids is aborted: per id it held, the
//!   time until it runs elsewhere;
//! - add / remove: 10,000 more ids added on each running node, then
//!   removed: time until all run, time until all stopped.
//!
//! `--no-placement` turns the claim deferral and the rebalancing off
//! (`placement_grace(0)`, `rebalance(false)`): first come, first served.
//!
//! `--rss`: one node on the embedded cluster backend runs `--ids` ids of an
//! idle service (`--probe`: the test probe, which also logs every start and
//! stop): bring-up time and the resident memory per running id (VmRSS of
//! this process before and after); then a second node starts that waits on
//! every id, and the same per waiting id. For the heap by owner, run it
//! under `heaptrack` (peak consumers).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use highlander::backend::Backend;
use highlander::backend::cluster::Cluster;
use highlander::backend::etcd::Etcd;
use highlander::backend::postgres::Postgres;
use highlander::placement::{Affinity, Candidate, place};
use highlander::{MemoryCluster, Runtime, RuntimeHandle, ShutdownReason};
use highlander_tests::bench::report;
use highlander_tests::etcd::EtcdCluster;
use highlander_tests::postgres::PgServer;
use highlander_tests::probe::Probe;
use tokio::time::{Instant, sleep};

const GUARD: Duration = Duration::from_secs(300);
const BUDGET: Duration = Duration::from_secs(1);

struct Args {
    backend: String,
    ids: usize,
    placement: bool,
    rss: bool,
    probe: bool,
}

fn args() -> Args {
    let mut args = Args {
        backend: "memory".into(),
        ids: 0,
        placement: true,
        rss: false,
        probe: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--backend" => args.backend = value(),
            "--ids" => args.ids = value().parse().expect("--ids N"),
            "--no-placement" => args.placement = false,
            "--rss" => args.rss = true,
            "--probe" => args.probe = true,
            other => panic!(
                "unknown argument {other}: use --backend memory|cluster|postgres|etcd, --ids N, --no-placement, --rss, --probe"
            ),
        }
    }
    if args.ids == 0 {
        args.ids = if args.rss { 100_000 } else { 10_000 };
    }
    args
}

/// Where the nodes meet: a backend per node name.
enum Space {
    Memory(MemoryCluster),
    Cluster(Mutex<Vec<Cluster>>),
    Postgres(String, #[allow(dead_code)] PgServer),
    Etcd(Vec<String>, #[allow(dead_code)] EtcdCluster),
}

impl Space {
    async fn new(backend: &str) -> Space {
        match backend {
            "memory" => Space::Memory(MemoryCluster::new()),
            "cluster" => Space::Cluster(Mutex::new(Vec::new())),
            "postgres" => {
                let pg = tokio::task::spawn_blocking(PgServer::start)
                    .await
                    .expect("the Postgres harness starts");
                Space::Postgres(pg.url(), pg)
            }
            "etcd" => {
                let etcd = EtcdCluster::single().await;
                Space::Etcd(etcd.endpoints(), etcd)
            }
            other => panic!("unknown backend {other}: use memory, cluster, postgres or etcd"),
        }
    }

    fn backend(&self) -> Box<dyn Backend> {
        match self {
            Space::Memory(m) => Box::new(m.clone()),
            Space::Cluster(nodes) => {
                let mut nodes = nodes.lock().unwrap();
                let seeds: Vec<String> = nodes
                    .iter()
                    .filter_map(|c| c.local_addr())
                    .map(|a| a.to_string())
                    .collect();
                let c = Cluster::new("127.0.0.1:0")
                    .cookie("bench fleet cookie")
                    .seeds(seeds);
                nodes.push(c.clone());
                Box::new(c)
            }
            Space::Postgres(url, _) => {
                Box::new(Postgres::new(url.clone()).namespace("bench_fleet"))
            }
            Space::Etcd(endpoints, _) => {
                Box::new(Etcd::new(endpoints.clone()).namespace("bench_fleet"))
            }
        }
    }
}

struct Bench {
    space: Space,
    probe: Probe,
    placement: bool,
    nodes: Vec<RuntimeHandle>,
}

impl Bench {
    async fn start(&mut self, node: &str, ids: &[String]) -> RuntimeHandle {
        let mut b = Runtime::builder()
            .node(node)
            .backend(self.space.backend())
            .rebalance(true);
        if !self.placement {
            b = b.placement_grace(Duration::ZERO).rebalance(false);
        }
        for id in ids {
            b = b.child(self.probe.spec(id).shutdown(BUDGET));
        }
        let h = b.start().await.expect("the node starts");
        self.nodes.push(h.clone());
        h
    }

    fn live(&self) -> Vec<&RuntimeHandle> {
        self.nodes
            .iter()
            .filter(|n| n.status().session_up)
            .collect()
    }

    fn shares(&self) -> BTreeMap<String, usize> {
        self.live()
            .iter()
            .map(|n| (n.node().to_string(), n.status().running().count()))
            .collect()
    }

    /// Waits until `total` ids run, each once; returns the time it took.
    async fn all_run(&self, total: usize) -> Duration {
        let start = Instant::now();
        while self.shares().values().sum::<usize>() < total {
            assert!(
                start.elapsed() < GUARD,
                "not all ids run: {:?}",
                self.shares()
            );
            sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    /// Waits until no instance started or stopped for a second.
    async fn at_rest(&self) -> Duration {
        let start = Instant::now();
        let mut seen = self.probe.events().len();
        let mut quiet = Instant::now();
        while quiet.elapsed() < Duration::from_secs(1) && start.elapsed() < GUARD {
            sleep(Duration::from_millis(50)).await;
            let now = self.probe.events().len();
            if now != seen {
                seen = now;
                quiet = Instant::now();
            }
        }
        start.elapsed() - Duration::from_secs(1)
    }
}

fn share_line(shares: &BTreeMap<String, usize>, total: usize) -> String {
    let largest = shares.values().max().copied().unwrap_or(0);
    format!(
        "{shares:?}, largest {:.1} %",
        100.0 * largest as f64 / total.max(1) as f64
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn fleet(args: &Args) {
    let space = Space::new(&args.backend).await;
    let mut b = Bench {
        space,
        probe: Probe::new(),
        placement: args.placement,
        nodes: Vec::new(),
    };
    let n = args.ids;
    let ids: Vec<String> = (0..n).map(|i| format!("tenant/{i}")).collect();
    println!(
        "bench_fleet: backend {}, {n} ids, placement {}",
        args.backend,
        if args.placement { "on" } else { "off" }
    );

    // Bring-up.
    let t0 = Instant::now();
    for (i, node) in ["a", "b", "c"].iter().enumerate() {
        if i > 0 {
            sleep(Duration::from_millis(100)).await;
        }
        b.start(node, &ids).await;
    }
    let all = b.all_run(n).await + Duration::from_millis(0);
    let rest = b.at_rest().await;
    println!(
        "bring-up: all running after {:.0} ms, at rest after {:.0} ms (from the first start {:.0} ms); shares {}",
        ms(all),
        ms(rest),
        ms(t0.elapsed()),
        share_line(&b.shares(), n)
    );

    // Join.
    let before = b.probe.events().len();
    let joined = Instant::now();
    b.start("d", &ids).await;
    sleep(Duration::from_secs(5).saturating_sub(joined.elapsed())).await;
    let shares = b.shares();
    let candidates: Vec<Candidate> = ["a", "b", "c", "d"]
        .iter()
        .map(|c| Candidate::new(*c, 1))
        .collect();
    let minimum = ids
        .iter()
        .filter(|id| place(id, &Affinity::default(), &candidates).map(|c| c.name()) == Some("d"))
        .count();
    let events = b.probe.events();
    let later = &events[before..];
    let moved: Vec<_> = later
        .iter()
        .filter(|e| e.reason() == Some(&ShutdownReason::Moved))
        .collect();
    let mut gaps = Vec::new();
    for stop in &moved {
        if let Some(start) = later
            .iter()
            .find(|e| e.is_start() && e.id == stop.id && e.at >= stop.at)
        {
            gaps.push(ms(start.at - stop.at));
        }
    }
    println!(
        "join: d runs {} ids after 5 s ({:.1} %); {} ids moved, minimum {minimum}; shares {}",
        shares.get("d").copied().unwrap_or(0),
        100.0 * shares.get("d").copied().unwrap_or(0) as f64 / n as f64,
        moved.len(),
        share_line(&shares, n)
    );
    report("join: unowned gap per moved id (stop -> start)", &gaps);
    b.all_run(n).await;
    b.at_rest().await;

    // Crash of the node holding the most.
    let (victim, held) = b
        .live()
        .iter()
        .map(|h| {
            let ids: Vec<String> = h.status().running().map(|(id, _)| id.to_string()).collect();
            (h.node().to_string(), ids)
        })
        .max_by_key(|(_, ids)| ids.len())
        .expect("a node");
    let before = b.probe.events().len();
    let crashed = Instant::now();
    b.probe.cut(&victim);
    b.nodes
        .iter()
        .find(|h| h.node() == victim)
        .expect("the victim")
        .abort();
    b.nodes.retain(|h| h.node() != victim);
    b.all_run(n).await;
    let events = b.probe.events();
    let mut first_start: HashMap<&str, Instant> = HashMap::new();
    for e in &events[before..] {
        if e.is_start() {
            first_start.entry(e.id.as_str()).or_insert(e.at);
        }
    }
    let failover: Vec<f64> = held
        .iter()
        .filter_map(|id| first_start.get(id.as_str()))
        .map(|at| ms(*at - crashed))
        .collect();
    report(
        &format!("crash of {victim} ({} ids): failover", held.len()),
        &failover,
    );
    b.at_rest().await;

    // Add and remove while running.
    let more: Vec<String> = (0..n).map(|i| format!("added/{i}")).collect();
    let t = Instant::now();
    for id in &more {
        for h in &b.nodes {
            h.add(b.probe.spec(id).shutdown(BUDGET)).expect("add");
        }
    }
    let added = t.elapsed();
    b.all_run(2 * n).await;
    println!(
        "add: {n} ids on each of {} nodes in {:.0} ms, all running after {:.0} ms",
        b.nodes.len(),
        ms(added),
        ms(t.elapsed())
    );
    b.at_rest().await;
    let t = Instant::now();
    let mut removals = Vec::new();
    for id in &more {
        for h in &b.nodes {
            removals.push(h.remove(id));
        }
    }
    for r in removals {
        r.await.expect("remove");
    }
    println!(
        "remove: {n} ids from every node, all stopped after {:.0} ms",
        ms(t.elapsed())
    );
    println!("final shares {}", share_line(&b.shares(), n));
    for h in &b.nodes {
        h.shutdown().await;
    }
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What VmRSS grew by from `before` (KiB) to `after`, per id.
fn per_id(before: u64, after: u64, n: usize) -> String {
    let grown = after.saturating_sub(before);
    format!(
        "VmRSS {before} KiB -> {after} KiB: {:.0} B ({:.2} KiB)",
        (grown * 1024) as f64 / n as f64,
        grown as f64 / n as f64,
    )
}

/// The least a service can be: it waits to be stopped.
struct Idle;

impl highlander::Service for Idle {
    async fn run(&mut self, ctx: &highlander::Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

/// What `--rss` runs per id: the idle service, or with `--probe` the test
/// probe (which also records every start and stop, two strings each).
fn rss_spec(probe: Option<&Probe>, id: &str) -> highlander::ChildSpec {
    match probe {
        Some(probe) => probe.spec(id),
        None => highlander::ChildSpec::new(id, |_ctx| async { Ok(Idle) }),
    }
    .shutdown(BUDGET)
}

/// A node of `space` with every id of `ids`, built but not started, so
/// that what is measured is the running ids and not their specs.
fn rss_node(
    space: &Space,
    node: &str,
    ids: &[String],
    probe: Option<&Probe>,
) -> highlander::Builder {
    // No rebalancing: the second node waits on every id instead of taking
    // its share.
    let mut builder = Runtime::builder()
        .node(node)
        .backend(space.backend())
        .rebalance(false);
    for id in ids {
        builder = builder.child(rss_spec(probe, id));
    }
    builder
}

async fn rss(args: &Args) {
    let n = args.ids;
    let space = Space::new("cluster").await;
    let ids: Vec<String> = (0..n).map(|i| format!("tenant/{i}")).collect();
    let probe = args.probe.then(Probe::new);
    let builder = rss_node(&space, "rss", &ids, probe.as_ref());
    let before = vm_rss_kib();
    let t = Instant::now();
    let h = builder.start().await.expect("the node starts");
    while h.status().running().count() < n {
        assert!(t.elapsed() < GUARD, "not all ids run");
        sleep(Duration::from_millis(50)).await;
    }
    let up = t.elapsed();
    sleep(Duration::from_secs(1)).await;
    let running = vm_rss_kib();
    println!(
        "rss: {n} ids on one embedded-cluster node ({} service): all running after {:.0} ms",
        if args.probe { "probe" } else { "idle" },
        ms(up),
    );
    println!("  per running id: {}", per_id(before, running, n));

    // A second node that waits on every id.
    let builder = rss_node(&space, "rss-standby", &ids, probe.as_ref());
    let before = vm_rss_kib();
    let t = Instant::now();
    let w = builder.start().await.expect("the standby starts");
    let waiting = || {
        w.status()
            .singletons
            .iter()
            .filter(|s| matches!(s.state, highlander::SingletonState::Waiting { .. }))
            .count()
    };
    while waiting() < n {
        assert!(t.elapsed() < GUARD, "not all ids wait");
        sleep(Duration::from_millis(50)).await;
    }
    let all_waiting = t.elapsed();
    sleep(Duration::from_secs(1)).await;
    let after = vm_rss_kib();
    println!(
        "  standby waiting on all {n} ids after {:.0} ms",
        ms(all_waiting)
    );
    println!(
        "  per waiting id (both nodes in this process: the standby's guardians, and the holder's view of a waiter): {}",
        per_id(before, after, n)
    );
    w.shutdown().await;
    h.shutdown().await;
}

#[tokio::main]
async fn main() {
    let args = args();
    if args.rss {
        rss(&args).await;
    } else {
        fleet(&args).await;
    }
}
