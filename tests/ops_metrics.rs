//! Metrics on the memory backend, read from a real in-process recorder
//! (metrics-util's `DebuggingRecorder`, installed before any runtime
//! starts): failover, step-down, restarts and stops move the gauges and
//! counters as docs/operations.md says. Each test uses its own node names,
//! so tests that share the process-wide recorder read only their series.

use std::sync::OnceLock;
use std::time::Duration;

use highlander::ops::metrics as m;
use highlander::{ChildSpec, Context, MemoryCluster, Restart, Runtime, Service};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

fn snapshotter() -> &'static Snapshotter {
    static SNAP: OnceLock<Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("no other recorder in this test binary");
        snapshotter
    })
}

/// The series now, as (name, sorted labels, value). Histograms give their
/// sample count (this recorder keeps no history between snapshots, so a
/// test reads each histogram once).
#[derive(Debug)]
struct Series(Vec<(String, Vec<(String, String)>, f64)>);

fn read() -> Series {
    let mut out = Vec::new();
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let key = key.key();
        let mut labels: Vec<(String, String)> = key
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        labels.sort();
        let v = match value {
            DebugValue::Counter(c) => c as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => h.len() as f64,
        };
        out.push((key.name().to_string(), labels, v));
    }
    Series(out)
}

impl Series {
    /// The value of `name` with exactly these labels (0 when absent).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        self.0
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
            .unwrap_or(0.0)
    }
}

/// Waits (hang guard only) until `check` holds on fresh snapshots; for the
/// per-node gauges the probe updates once a second.
async fn eventually(what: &str, mut check: impl FnMut(&Series) -> bool) -> Series {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = read();
        if check(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}\n{s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Idle;
impl Service for Idle {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

/// Fails every run.
struct AlwaysFails;
impl Service for AlwaysFails {
    async fn run(&mut self, _ctx: &Context) -> highlander::Result<()> {
        Err(highlander::Error::msg("not today"))
    }
}

fn idle(id: &str) -> ChildSpec {
    ChildSpec::new(id, |_ctx| async { Ok(Idle) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_step_down_move_the_series() {
    snapshotter();
    let cluster = MemoryCluster::new();
    let start = |node: &'static str| {
        Runtime::builder()
            .node(node)
            .backend(cluster.clone())
            .stepdown_delay(Duration::from_secs(3600))
            .child(idle("fo"))
            .start()
    };
    let a = start("fo-a").await.unwrap();
    a.wait_until(|s| s.is_running("fo")).await;
    let b = start("fo-b").await.unwrap();
    let c = start("fo-c").await.unwrap();
    for h in [&b, &c] {
        h.wait_until(|s| matches!(s.get("fo"), Some(highlander::SingletonState::Waiting { .. })))
            .await;
    }
    let id = |node| [("node", node), ("id", "fo")];
    let s = read();
    assert_eq!(s.get(m::RUNNING, &id("fo-a")), 1.0);
    assert_eq!(s.get(m::RUNNING, &id("fo-b")), 0.0);
    assert_eq!(s.get(m::TENURES_STARTED, &id("fo-a")), 1.0);
    assert_eq!(s.get(m::TENURES_STARTED, &id("fo-b")), 0.0);
    assert_eq!(s.get(m::CLAIM_LATENCY, &id("fo-a")), 1.0, "one claim timed");

    // Crash the holder: one of the others takes over, a's gauge drops.
    a.abort();
    let (new, other) = loop {
        let (cb, cc) = (b.changed(), c.changed());
        if b.status().is_running("fo") {
            break (&b, &c);
        }
        if c.status().is_running("fo") {
            break (&c, &b);
        }
        tokio::select! { _ = cb => {}, _ = cc => {} }
    };
    let s = read();
    assert_eq!(s.get(m::RUNNING, &id("fo-a")), 0.0, "the crashed node runs nothing");
    assert_eq!(s.get(m::RUNNING, &id(new.node())), 1.0);
    assert_eq!(s.get(m::RUNNING, &id(other.node())), 0.0);
    assert_eq!(s.get(m::TENURES_STARTED, &id(new.node())), 1.0);
    assert_eq!(s.get(m::CLAIM_LATENCY, &id(new.node())), 1.0);

    // Step down by hand: counted, the instance stops for `stepdown`, and
    // the last node takes over.
    new.step_down("fo").unwrap();
    other.wait_until(|s| s.is_running("fo")).await;
    new.wait_until(|s| matches!(s.get("fo"), Some(highlander::SingletonState::SteppedDown)))
        .await;
    let s = read();
    assert_eq!(s.get(m::STEPDOWNS, &id(new.node())), 1.0);
    assert_eq!(
        s.get(m::STOPS, &[("node", new.node()), ("id", "fo"), ("reason", "stepdown")]),
        1.0
    );
    assert_eq!(s.get(m::RUNNING, &id(new.node())), 0.0);
    assert_eq!(s.get(m::RUNNING, &id(other.node())), 1.0);

    // The probe: sessions up, members seen (the crashed node has left).
    eventually("b and c up, two members each", |s| {
        ["fo-b", "fo-c"].iter().all(|n| {
            s.get(m::SESSION_UP, &[("node", n)]) == 1.0 && s.get(m::MEMBERS, &[("node", n)]) == 2.0
        })
    })
    .await;

    // Shutdown stops the instance for `node_shutdown` and the session goes down.
    other.shutdown().await;
    new.shutdown().await;
    let s = eventually("sessions down after shutdown", |s| {
        s.get(m::SESSION_UP, &[("node", "fo-b")]) == 0.0
            && s.get(m::SESSION_UP, &[("node", "fo-c")]) == 0.0
    })
    .await;
    assert_eq!(
        s.get(m::STOPS, &[("node", other.node()), ("id", "fo"), ("reason", "node_shutdown")]),
        1.0
    );
    assert_eq!(s.get(m::RUNNING, &id(other.node())), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_errors_are_counted() {
    snapshotter();
    let spec = ChildSpec::new("flaky", |_ctx| async { Ok(AlwaysFails) })
        .restart(Restart::Permanent)
        .intensity(10, Duration::from_secs(60));
    let h = Runtime::builder()
        .node("rs-a")
        .backend(MemoryCluster::new())
        .child(spec)
        .start()
        .await
        .unwrap();
    h.wait_until(|s| s.singletons[0].restarts >= 3).await;
    let s = read();
    let labels = [("node", "rs-a"), ("id", "flaky")];
    assert!(s.get(m::RESTARTS, &labels) >= 3.0);
    assert!(
        s.get(m::STOPS, &[("node", "rs-a"), ("id", "flaky"), ("reason", "error")]) >= 3.0
    );
    assert_eq!(s.get(m::TENURES_STARTED, &labels), 1.0, "restarts are one tenure");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_per_id_series_the_node_sums() {
    snapshotter();
    let mut builder = Runtime::builder()
        .node("agg-a")
        .backend(MemoryCluster::new())
        .metrics_per_id(false);
    for i in 0..5 {
        builder = builder.child(idle(&format!("agg-{i}")));
    }
    let h = builder.start().await.unwrap();
    h.wait_until(|s| s.running().count() == 5).await;
    let s = read();
    assert_eq!(s.get(m::RUNNING, &[("node", "agg-a")]), 5.0);
    assert_eq!(s.get(m::TENURES_STARTED, &[("node", "agg-a")]), 5.0);
    assert!(
        !s.0.iter()
            .any(|(_, l, _)| l.iter().any(|(k, v)| k == "id" && v.starts_with("agg-"))),
        "no series has an id label"
    );
    h.step_down("agg-3").unwrap();
    h.wait_until(|s| s.running().count() == 4).await;
    assert_eq!(read().get(m::RUNNING, &[("node", "agg-a")]), 4.0);
    h.shutdown().await;
    assert_eq!(read().get(m::RUNNING, &[("node", "agg-a")]), 0.0);
}
