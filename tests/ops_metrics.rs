//! Metrics on the memory backend, read from a real in-process recorder
//! (a small `metrics::Recorder` installed before any runtime starts): failover, step-down, restarts and stops move the gauges and
//! counters as docs/operations.md says. Each test uses its own node names,
//! so tests that share the process-wide recorder read only their series.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use highlander::ops::metrics as m;
use highlander::{ChildSpec, Context, MemoryCluster, Restart, Runtime, Service};
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// A small in-process recorder that keeps every value (metrics-util's
/// `DebuggingRecorder` resets values on each snapshot, which tests that
/// share the process-wide recorder cannot use).
#[derive(Default)]
struct Keeper {
    counters: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Key, Arc<Samples>>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

impl Recorder for Keeper {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut map = self.counters.lock().unwrap();
        Counter::from_arc(map.entry(key.clone()).or_default().clone())
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut map = self.gauges.lock().unwrap();
        Gauge::from_arc(map.entry(key.clone()).or_default().clone())
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut map = self.histograms.lock().unwrap();
        Histogram::from_arc(map.entry(key.clone()).or_default().clone())
    }
}

fn keeper() -> &'static Arc<Keeper> {
    static KEEPER: OnceLock<Arc<Keeper>> = OnceLock::new();
    KEEPER.get_or_init(|| {
        let keeper = Arc::new(Keeper::default());
        metrics::set_global_recorder(ArcRecorder(keeper.clone()))
            .expect("no other recorder in this test binary");
        keeper
    })
}

struct ArcRecorder(Arc<Keeper>);

impl Recorder for ArcRecorder {
    fn describe_counter(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_counter(k, u, d)
    }
    fn describe_gauge(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_gauge(k, u, d)
    }
    fn describe_histogram(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_histogram(k, u, d)
    }
    fn register_counter(&self, key: &Key, m: &Metadata<'_>) -> Counter {
        self.0.register_counter(key, m)
    }
    fn register_gauge(&self, key: &Key, m: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(key, m)
    }
    fn register_histogram(&self, key: &Key, m: &Metadata<'_>) -> Histogram {
        self.0.register_histogram(key, m)
    }
}

/// Every series now, as (name, sorted labels, value); a histogram gives
/// its number of samples.
#[derive(Debug)]
struct Series(Vec<(String, Labels, f64)>);

type Labels = Vec<(String, String)>;

fn read() -> Series {
    let k = keeper();
    let mut out = Vec::new();
    let mut push = |key: &Key, v: f64| {
        let mut labels: Vec<(String, String)> = key
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        labels.sort();
        out.push((key.name().to_string(), labels, v));
    };
    for (key, c) in k.counters.lock().unwrap().iter() {
        push(key, c.load(Ordering::SeqCst) as f64);
    }
    for (key, g) in k.gauges.lock().unwrap().iter() {
        push(key, f64::from_bits(g.load(Ordering::SeqCst)));
    }
    for (key, h) in k.histograms.lock().unwrap().iter() {
        push(key, h.0.lock().unwrap().len() as f64);
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
        assert!(
            tokio::time::Instant::now() < deadline,
            "never: {what}\n{s:#?}"
        );
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
    keeper();
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
        h.wait_until(|s| {
            matches!(
                s.get("fo"),
                Some(highlander::SingletonState::Waiting { .. })
            )
        })
        .await;
    }
    let id = |node| [("node", node), ("id", "fo")];
    let s = read();
    assert_eq!(s.get(m::RUNNING, &id("fo-a")), 1.0);
    assert_eq!(s.get(m::RUNNING, &id("fo-b")), 0.0);
    assert_eq!(s.get(m::TENURES_STARTED, &id("fo-a")), 1.0);
    assert_eq!(s.get(m::TENURES_STARTED, &id("fo-b")), 0.0);
    assert_eq!(
        s.get(m::CLAIM_LATENCY, &[("node", "fo-a")]),
        1.0,
        "one claim timed"
    );

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
    assert_eq!(
        s.get(m::RUNNING, &id("fo-a")),
        0.0,
        "the crashed node runs nothing"
    );
    assert_eq!(s.get(m::RUNNING, &id(new.node())), 1.0);
    assert_eq!(s.get(m::RUNNING, &id(other.node())), 0.0);
    assert_eq!(s.get(m::TENURES_STARTED, &id(new.node())), 1.0);
    assert_eq!(s.get(m::CLAIM_LATENCY, &[("node", new.node())]), 1.0);

    // Step down by hand: counted, the instance stops for `stepdown`, and
    // the last node takes over.
    new.step_down("fo").unwrap();
    other.wait_until(|s| s.is_running("fo")).await;
    new.wait_until(|s| matches!(s.get("fo"), Some(highlander::SingletonState::SteppedDown)))
        .await;
    let s = read();
    assert_eq!(s.get(m::STEPDOWNS, &id(new.node())), 1.0);
    assert_eq!(
        s.get(
            m::STOPS,
            &[("node", new.node()), ("id", "fo"), ("reason", "stepdown")]
        ),
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
        s.get(
            m::STOPS,
            &[
                ("node", other.node()),
                ("id", "fo"),
                ("reason", "node_shutdown")
            ]
        ),
        1.0
    );
    assert_eq!(s.get(m::RUNNING, &id(other.node())), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_errors_are_counted() {
    keeper();
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
        s.get(
            m::STOPS,
            &[("node", "rs-a"), ("id", "flaky"), ("reason", "error")]
        ) >= 3.0
    );
    assert_eq!(
        s.get(m::TENURES_STARTED, &labels),
        1.0,
        "restarts are one tenure"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_per_id_series_the_node_sums() {
    keeper();
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
