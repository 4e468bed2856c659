//! Benchmark of the operations side on the memory backend. Prints
//! n / p50 / p99 / max per scenario; asserts nothing.
//!
//! ```text
//! cargo build --release -p highlander-tests --bin bench_ops
//! target/release/bench_ops [--ids 10000] [--big 100000] [--runs 30] [--rounds 5]
//! ```
//!
//! Scenarios:
//! - `status`: one node runs `--ids` ids (then `--big` ids, 0 to skip) and
//!   serves HTTP on loopback; `GET /status` `--runs` times: latency and
//!   body size; and `RuntimeHandle::status()` in-process;
//! - `metrics`: `--ids` ids on two nodes of one memory cluster, and again
//!   on two nodes of the embedded cluster backend over loopback TCP: time from
//!   start until the first node runs them all, then SIGKILL-like abort of
//!   that node and time until the second runs them all; over `--rounds`
//!   rounds, in a child process per mode (the global recorder cannot be
//!   removed): `none` (the `metrics` feature is built in but no recorder is
//!   installed: every record is a no-op, the closest to a build without
//!   it), `prometheus` (highlander's Prometheus recorder, one series per
//!   id) and `prometheus-per-node` (`metrics_per_id(false)`); then the time
//!   and size of one `GET /metrics` render.

use std::time::Instant;

use highlander::backend::Backend;
use highlander::backend::cluster::Cluster;
use highlander::{ChildSpec, Context, MemoryCluster, Runtime, RuntimeHandle, Service};
use highlander_tests::bench::report;
use highlander_tests::ops::get;

struct Idle;
impl Service for Idle {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

struct Args {
    ids: usize,
    big: usize,
    runs: usize,
    rounds: usize,
    child: Option<String>,
    backend: String,
}

fn args() -> Args {
    let mut a = Args {
        ids: 10_000,
        big: 100_000,
        runs: 30,
        rounds: 5,
        child: None,
        backend: "memory".to_string(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--ids" => a.ids = value().parse().expect("--ids N"),
            "--big" => a.big = value().parse().expect("--big N"),
            "--runs" => a.runs = value().parse().expect("--runs N"),
            "--rounds" => a.rounds = value().parse().expect("--rounds N"),
            "--backend" => a.backend = value(),
            "--child" => a.child = Some(value()),
            other => panic!("unknown flag {other}: use --ids, --big, --runs, --rounds"),
        }
    }
    a
}

async fn start(
    backend: impl Backend,
    node: &str,
    ids: usize,
    http: bool,
    per_id: bool,
) -> RuntimeHandle {
    let mut b = Runtime::builder()
        .node(node)
        .backend(backend)
        .metrics_per_id(per_id);
    if http {
        b = b.http("127.0.0.1:0");
    }
    for i in 0..ids {
        b = b.child(ChildSpec::new(format!("job-{i:06}"), |_ctx| async {
            Ok(Idle)
        }));
    }
    b.start().await.expect("start")
}

async fn status_scenario(ids: usize, runs: usize) {
    let h = start(MemoryCluster::new(), "status-a", ids, true, true).await;
    h.wait_until(|s| s.running().count() == ids).await;
    let addr = h.http_addr().expect("serving");
    let mut lat = Vec::new();
    let mut size = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let a = get(addr, "/status").await.expect("GET /status");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        size = a.body.len();
    }
    report(
        &format!("GET /status, {ids} ids ({} KiB)", size / 1024),
        &lat,
    );
    let mut lat = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(h.status());
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report(&format!("RuntimeHandle::status(), {ids} ids"), &lat);
    h.shutdown().await;
}

/// The two nodes' backends: one memory cluster, or two embedded-cluster
/// nodes on loopback, the second seeded with the first's bound address.
struct Pair {
    memory: Option<MemoryCluster>,
    first: Option<Cluster>,
}

const COOKIE: &str = "bench-ops-cookie-not-a-secret";

impl Pair {
    fn new(backend: &str) -> Pair {
        match backend {
            "memory" => Pair {
                memory: Some(MemoryCluster::new()),
                first: None,
            },
            "cluster" => Pair {
                memory: None,
                first: Some(Cluster::new("127.0.0.1:0").cookie(COOKIE)),
            },
            other => panic!("unknown backend `{other}`: use memory or cluster"),
        }
    }

    fn a(&self) -> Box<dyn Backend> {
        match (&self.memory, &self.first) {
            (Some(m), _) => Box::new(m.clone()),
            (_, Some(c)) => Box::new(c.clone()),
            _ => unreachable!(),
        }
    }

    fn b(&self) -> Box<dyn Backend> {
        match (&self.memory, &self.first) {
            (Some(m), _) => Box::new(m.clone()),
            (_, Some(c)) => {
                let seed = c.local_addr().expect("the first node is bound").to_string();
                Box::new(Cluster::new("127.0.0.1:0").cookie(COOKIE).seeds([seed]))
            }
            _ => unreachable!(),
        }
    }
}

async fn metrics_child(backend: &str, mode: &str, ids: usize, rounds: usize) {
    let (http, per_id) = match mode {
        "none" => (false, true),
        "prometheus" => (true, true),
        "prometheus-per-node" => (true, false),
        other => panic!("unknown mode {other}"),
    };
    let (mut up, mut over) = (Vec::new(), Vec::new());
    let mut render = Vec::new();
    let mut size = 0;
    for _ in 0..rounds {
        let pair = Pair::new(backend);
        let t = Instant::now();
        // The same names every round, as one process would have: the
        // recorder keeps each series it has seen.
        let a = start(pair.a(), "a", ids, http, per_id).await;
        a.wait_until(|s| s.running().count() == ids).await;
        up.push(t.elapsed().as_secs_f64() * 1e3);
        let b = start(pair.b(), "b", ids, false, per_id).await;
        b.wait_until(|s| {
            s.singletons
                .iter()
                .all(|s| matches!(s.state, highlander::SingletonState::Waiting { .. }))
        })
        .await;
        if let Some(addr) = a.http_addr() {
            let t = Instant::now();
            let m = get(addr, "/metrics").await.expect("GET /metrics");
            render.push(t.elapsed().as_secs_f64() * 1e3);
            size = m.body.len();
        }
        let t = Instant::now();
        a.abort();
        b.wait_until(|s| s.running().count() == ids).await;
        over.push(t.elapsed().as_secs_f64() * 1e3);
        b.shutdown().await;
    }
    report(&format!("{backend}: {ids} ids up, metrics={mode}"), &up);
    report(
        &format!("{backend}: {ids} ids failed over, metrics={mode}"),
        &over,
    );
    if !render.is_empty() {
        report(
            &format!("GET /metrics, metrics={mode} ({} KiB)", size / 1024),
            &render,
        );
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    if let Some(mode) = a.child {
        metrics_child(&a.backend, &mode, a.ids, a.rounds).await;
        return;
    }
    status_scenario(a.ids, a.runs).await;
    if a.big > 0 {
        status_scenario(a.big, a.runs.min(10)).await;
    }
    let me = std::env::current_exe().expect("this binary");
    for backend in ["memory", "cluster"] {
        for mode in ["none", "prometheus", "prometheus-per-node"] {
            let status = std::process::Command::new(&me)
                .args(["--child", mode, "--ids", &a.ids.to_string()])
                .args(["--rounds", &a.rounds.to_string(), "--backend", backend])
                .status()
                .expect("run the child");
            assert!(status.success(), "the {backend} {mode} child failed");
        }
    }
}
