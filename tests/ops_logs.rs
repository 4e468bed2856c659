//! Every log line of an instance carries the `id`, `node` and `token`
//! fields: lines from `run`, from its child tasks and from `terminate`, and
//! the runtime's own lines about a tenure. Checked on JSON logs, the form
//! docs/operations.md shows.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use highlander::{ChildSpec, Context, MemoryCluster, Runtime, Service, ShutdownReason};
use serde_json::Value;
use tracing::info;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Chatty;

/// How many instances have begun `run`: "running" in the status comes a
/// moment before `run` is first polled, and an instance stopped in that
/// moment logs nothing of its own, so the test waits for this instead.
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Waits until `n` instances have begun `run` (a guard against hangs).
async fn runs(n: usize) {
    highlander_tests::wait::wait_until(
        &format!("instance {n} running"),
        highlander_tests::wait::GUARD,
        || RUNS.load(Ordering::SeqCst) >= n,
    )
    .await;
}

impl Service for Chatty {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        info!("run says hello");
        RUNS.fetch_add(1, Ordering::SeqCst);
        let child = ctx.clone();
        ctx.spawn("helper", async move {
            info!("child says hello");
            child.cancelled().await;
            info!("child says bye");
            Ok(())
        });
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        info!(%reason, "terminate says bye");
    }
}

/// The fields of the spans around one event and of the event itself.
fn fields(line: &Value) -> serde_json::Map<String, Value> {
    let mut all = serde_json::Map::new();
    for span in line["spans"].as_array().into_iter().flatten() {
        if let Some(span) = span.as_object() {
            all.extend(span.clone());
        }
    }
    if let Some(event) = line["fields"].as_object() {
        all.extend(event.clone());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_line_names_id_node_and_token() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    tracing_subscriber::fmt()
        .json()
        .with_span_list(true)
        .with_current_span(false)
        .with_env_filter("ops_logs=info,highlander=debug")
        .with_writer(move || writer.clone())
        .init();

    let cluster = MemoryCluster::new();
    let spec = || ChildSpec::new("chatty", |_ctx| async { Ok(Chatty) });
    let a = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .child(spec())
        .start()
        .await
        .unwrap();
    a.wait_until(|s| s.is_running("chatty")).await;
    runs(1).await;
    let b = Runtime::builder()
        .node("b")
        .backend(cluster.clone())
        .child(spec())
        .start()
        .await
        .unwrap();
    b.wait_until(|s| {
        !s.singletons.is_empty()
            && s.get("chatty")
                .is_some_and(|st| !matches!(st, highlander::SingletonState::Claiming))
    })
    .await;
    a.shutdown().await; // b takes over: two tenures, each logged
    b.wait_until(|s| s.is_running("chatty")).await;
    runs(2).await;
    // A split: a fresh node takes the id on its side, and loses it at the
    // heal (the later tenure): its lease ends with a conflict.
    let c = Runtime::builder()
        .node("c")
        .backend(cluster.clone())
        .child(spec())
        .start()
        .await
        .unwrap();
    cluster.partition(&[&["b"], &["c"]]);
    c.wait_until(|s| s.is_running("chatty")).await;
    runs(3).await;
    cluster.heal();
    c.wait_until(|s| !s.is_running("chatty")).await;
    b.shutdown().await; // c, waiting again, takes over
    c.wait_until(|s| s.is_running("chatty")).await;
    runs(4).await;
    c.shutdown().await;

    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();

    let mut instance_lines = 0;
    for line in &lines {
        let f = fields(line);
        let message = f.get("message").and_then(Value::as_str).unwrap_or("");
        let from_instance = line["target"] == "ops_logs";
        let about_tenure = [
            "claimed: running here",
            "tenure ended",
            "released",
            "stopping instance",
        ]
        .contains(&message);
        if from_instance || about_tenure {
            for key in ["id", "node", "token"] {
                assert!(f.contains_key(key), "no `{key}` on: {line}");
            }
            assert_eq!(f["id"], "chatty", "{line}");
        }
        instance_lines += usize::from(from_instance);
    }
    // run, child hello, child bye, terminate, for each of the four
    // tenures (a, b, c during the split, c again when b shuts down).
    assert_eq!(instance_lines, 16, "{text}");
    assert!(text.contains("tenure ended"), "the conflict was logged");
}
