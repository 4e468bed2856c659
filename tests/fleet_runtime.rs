//! Fleets of singletons on the memory backend: ids added and removed while
//! the runtime runs, draining a node and resuming it, node weight and
//! labels, and per-service affinity in the status. Time is tokio's paused
//! clock, so waits are instant and a hang fails the hang guard.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use highlander::{
    ChildSpec, Context, Error, MemoryCluster, Runtime, RuntimeHandle, Service, ShutdownReason,
    SingletonState, Status,
};
use highlander_tests::log::Log;

/// Logs `start <id> <node>` when it starts and
/// `terminate <id> <node> <reason> <ms>` when it stops, `<ms>` on tokio's
/// (paused) clock since the spec was made.
struct Probe {
    log: Log,
    epoch: tokio::time::Instant,
    id: String,
    node: String,
}

impl Service for Probe {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.id = ctx.id().to_string();
        self.node = ctx.node().to_string();
        self.log.push(format!("start {} {}", self.id, self.node));
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        self.log.push(format!(
            "terminate {} {} {reason} {}",
            self.id,
            self.node,
            self.epoch.elapsed().as_millis()
        ));
    }
}

fn probe(id: &str, log: &Log) -> ChildSpec {
    let log = log.clone();
    let epoch = tokio::time::Instant::now();
    ChildSpec::new(id, move |_ctx| {
        let log = log.clone();
        async move {
            Ok(Probe {
                log,
                epoch,
                id: String::new(),
                node: String::new(),
            })
        }
    })
}

async fn hang_guard<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(3600), future)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

async fn start(cluster: &MemoryCluster, name: &str, specs: Vec<ChildSpec>) -> RuntimeHandle {
    highlander_tests::init_tracing();
    let mut builder = Runtime::builder()
        .rebalance(true)
        .node(name)
        .backend(cluster.clone());
    for spec in specs {
        builder = builder.child(spec);
    }
    builder.start().await.expect("runtime starts")
}

/// Waits until `condition` holds over the statuses of all `nodes`,
/// checking at every state change of any of them.
async fn settle(
    what: &str,
    nodes: &[&RuntimeHandle],
    mut condition: impl FnMut(&[Status]) -> bool,
) {
    hang_guard(what, async {
        loop {
            let armed: Vec<_> = nodes.iter().map(|n| n.changed()).collect();
            let statuses: Vec<Status> = nodes.iter().map(|n| n.status()).collect();
            if condition(&statuses) {
                return;
            }
            let mut any = tokio::task::JoinSet::new();
            for change in armed {
                any.spawn(change);
            }
            any.join_next().await;
        }
    })
    .await
}

/// How many ids run on each node, and whether every id in `ids` runs on
/// exactly one of them while the others wait on it.
fn placement(statuses: &[Status], ids: &[String]) -> (Vec<usize>, bool) {
    let counts = statuses.iter().map(|s| s.running().count()).collect();
    let settled = ids.iter().all(|id| {
        let holders = statuses.iter().filter(|s| s.is_running(id)).count();
        let others_wait = statuses.iter().all(|s| {
            matches!(
                s.get(id),
                None | Some(SingletonState::Running { .. })
                    | Some(SingletonState::Waiting { .. })
                    | Some(SingletonState::Draining)
            )
        });
        holders == 1 && others_wait
    });
    (counts, settled)
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}/{i}")).collect()
}

/// The number of `start <id> ` lines per id.
fn starts(log: &Log) -> HashMap<String, usize> {
    let mut starts = HashMap::new();
    for line in log.matching("start ") {
        let id = line.split(' ').nth(1).unwrap().to_string();
        *starts.entry(id).or_default() += 1;
    }
    starts
}

#[tokio::test(start_paused = true)]
async fn a_thousand_ids_added_while_running_each_run_exactly_once() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    // Load already there: 200 ids configured at start on every node.
    let base = ids("base", 200);
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let specs = base.iter().map(|id| probe(id, &log)).collect();
        nodes.push(start(&cluster, name, specs).await);
    }
    let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];
    settle("the base ids settle", &[a, b, c], |s| placement(s, &base).1).await;

    // 1,000 more, added on every node while the runtimes run, interleaved
    // with the scheduler so the guardians compete as the ids arrive.
    let added = ids("tenant", 1_000);
    for (i, id) in added.iter().enumerate() {
        for node in [a, b, c] {
            node.add(probe(id, &log)).expect("add");
        }
        if i % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let mut all = base.clone();
    all.extend(added.iter().cloned());
    settle("every id settles", &[a, b, c], |s| placement(s, &all).1).await;
    for status in [a.status(), b.status(), c.status()] {
        assert_eq!(status.singletons.len(), 1_200, "{}", status.node);
    }
    // Each id started exactly once, on the node that runs it.
    let starts = starts(&log);
    assert_eq!(starts.len(), 1_200);
    assert!(starts.values().all(|&n| n == 1), "an id started twice");
    assert_eq!(log.count("terminate "), 0, "nothing stopped");

    // A duplicate is refused with the usual error, and nothing changes.
    let err = a.add(probe("tenant/7", &log)).unwrap_err();
    assert!(
        matches!(err, Error::DuplicateId { ref id, .. } if id == "tenant/7"),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("duplicate singleton id `tenant/7`"),
        "{err}"
    );
    let err = a.add(probe("bad id", &log)).unwrap_err();
    assert!(matches!(err, Error::InvalidId { .. }), "{err}");
    assert_eq!(a.status().singletons.len(), 1_200);

    for node in &nodes {
        hang_guard("shutdown", node.shutdown()).await;
    }
}

#[tokio::test(start_paused = true)]
async fn removing_an_id_stops_it_with_removed_and_the_node_stops_competing() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let tenants = ids("tenant", 300);
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(start(&cluster, name, Vec::new()).await);
    }
    for id in &tenants {
        for node in &nodes {
            node.add(probe(id, &log)).unwrap();
        }
    }
    let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];
    settle("settled", &[a, b, c], |s| placement(s, &tenants).1).await;

    // Remove the ids `a` runs from `a` only: each stops there with
    // `removed` (terminate ran), and b or c takes it over.
    let on_a: Vec<String> = a.status().running().map(|(id, _)| id.to_string()).collect();
    assert!(!on_a.is_empty());
    for id in &on_a {
        hang_guard("remove", a.remove(id)).await.expect("removed");
    }
    for id in &on_a {
        assert!(a.status().get(id).is_none(), "{id} left a's status");
        assert_eq!(
            log.count(&format!("terminate {id} a removed ")),
            1,
            "{id}: {:?}",
            log.lines()
        );
    }
    settle("taken over", &[b, c], |s| placement(s, &on_a).1).await;
    assert_eq!(a.status().singletons.len(), 300 - on_a.len());

    // Removed from every node: nobody runs them, nobody shows them.
    let gone = &tenants[..50];
    for id in gone {
        for node in [a, b, c] {
            let removal = node.remove(id);
            // `a` may not have it any more; the others all do.
            if node.node() != "a" || !on_a.contains(id) {
                hang_guard("remove", removal).await.expect("removed");
            } else {
                let err = removal.await.unwrap_err();
                assert!(err.to_string().contains("no singleton"), "{err}");
            }
        }
    }
    for id in gone {
        assert!(cluster.holders(id).is_empty(), "{id} still held");
        for node in [a, b, c] {
            assert!(node.status().get(id).is_none());
        }
        let removed = log
            .matching(&format!("terminate {id} "))
            .iter()
            .filter(|l| l.contains(" removed "))
            .count();
        let stops = log.count(&format!("terminate {id} "));
        assert_eq!(removed, stops, "{id}: every stop was a removal");
    }
    // The rest still run exactly once.
    settle("the rest", &[a, b, c], |s| placement(s, &tenants[50..]).1).await;

    // An unknown id is a clear error.
    let err = a.remove("never-added").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot remove `never-added`: no singleton of that id is configured on this node"
    );
    for node in &nodes {
        hang_guard("shutdown", node.shutdown()).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_id_added_again_right_after_removal_waits_for_the_old_instance() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let a = start(&cluster, "a", vec![probe("report", &log)]).await;
    a.wait_until(|s| s.is_running("report")).await;
    for round in 0..20 {
        // Not awaited: the new guardian must wait for the old one itself.
        let removal = a.remove("report");
        a.add(probe("report", &log)).expect("added again");
        hang_guard("removal", removal).await.unwrap();
        hang_guard("running again", a.wait_until(|s| s.is_running("report"))).await;
        assert_eq!(log.count("start report"), round + 2);
    }
    // Starts and stops alternate: never two instances at once.
    let lines: Vec<String> = log.lines();
    for pair in lines.windows(2) {
        let kinds = (pair[0].split(' ').next(), pair[1].split(' ').next());
        assert_ne!(kinds.0, kinds.1, "{lines:?}");
    }
    assert_eq!(a.status().singletons.len(), 1);
    hang_guard("shutdown", a.shutdown()).await;
}

#[tokio::test(start_paused = true)]
async fn drain_hands_every_id_over_and_resume_competes_again() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let tenants = ids("tenant", 400);
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let specs = tenants.iter().map(|id| probe(id, &log)).collect();
        nodes.push(start(&cluster, name, specs).await);
    }
    let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];
    settle("settled", &[a, b, c], |s| placement(s, &tenants).1).await;
    let held_by_a: Vec<String> = a.status().running().map(|(id, _)| id.to_string()).collect();
    assert!(!held_by_a.is_empty(), "a holds some ids (it started first)");

    assert!(!a.status().draining);
    hang_guard("drain", a.drain()).await.expect("drained");
    let status = a.status();
    assert!(status.draining && a.is_draining());
    assert_eq!(status.running().count(), 0, "a holds nothing");
    assert!(
        status.singletons.iter().all(|s| matches!(
            s.state,
            SingletonState::Draining | SingletonState::Waiting { .. }
        )),
        "{status:?}"
    );
    // Every id a held stopped there with `moved`, terminate having run,
    // and now runs exactly once on b or c.
    for id in &held_by_a {
        assert_eq!(log.count(&format!("terminate {id} a moved ")), 1, "{id}");
    }
    assert_eq!(
        log.count("terminate "),
        held_by_a.len(),
        "only a's ids stopped"
    );
    settle("b and c run everything", &[b, c], |s| {
        placement(s, &tenants).1
    })
    .await;
    for id in &tenants {
        assert!(cluster.holders(id).iter().all(|h| h.node != "a"), "{id}");
    }
    // The runtime is still up (its session answers), and a second drain
    // is one already done.
    let held = a.holders().await.expect("the session is up");
    assert_eq!(held.len(), 400);
    assert!(held.iter().all(|h| h.holder.node != "a"));
    hang_guard("drain again", a.drain())
        .await
        .expect("still drained");

    // Resume: a competes again; with b gone, it takes b's ids.
    a.resume();
    assert!(!a.status().draining && !a.is_draining());
    settle("a waits again", &[a], |s| {
        s[0].singletons
            .iter()
            .all(|x| matches!(x.state, SingletonState::Waiting { .. }))
    })
    .await;
    hang_guard("b shuts down", b.shutdown()).await;
    settle("a and c share", &[a, c], |s| placement(s, &tenants).1).await;
    assert!(a.status().running().count() > 0);
    let starts = starts(&log);
    assert!(starts.values().all(|&n| n <= 3));

    for node in [a, c] {
        hang_guard("shutdown", node.shutdown()).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_drain_hands_over_at_the_handoff_rate() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let tenants = ids("tenant", 30);
    let specs: Vec<ChildSpec> = tenants.iter().map(|id| probe(id, &log)).collect();
    let mut builder = Runtime::builder()
        .rebalance(true)
        .node("a")
        .backend(cluster.clone())
        .handoff_rate(50); // 5 per 100 ms tick
    for spec in specs {
        builder = builder.child(spec);
    }
    let a = builder.start().await.unwrap();
    a.wait_until(|s| s.running().count() == 30).await;

    hang_guard("drain", a.drain()).await.unwrap();
    // Alone, a hands everything over to nobody: it holds nothing, and
    // nothing holds the ids.
    assert_eq!(a.status().running().count(), 0);
    assert!(tenants.iter().all(|id| cluster.holders(id).is_empty()));
    // 30 ids at 5 per tick: six batches, each a tick after the one before.
    let mut at: Vec<u128> = log
        .matching("terminate ")
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(at.len(), 30);
    at.sort_unstable();
    let batches: Vec<&[u128]> = at.chunk_by(|x, y| x == y).collect();
    assert_eq!(batches.len(), 6, "{at:?}");
    assert!(batches.iter().all(|b| b.len() == 5), "{at:?}");
    for pair in batches.windows(2) {
        assert!(pair[1][0] - pair[0][0] >= 100, "{at:?}");
    }

    // Resume: a claims them all again.
    a.resume();
    hang_guard("resumed", a.wait_until(|s| s.running().count() == 30)).await;
    hang_guard("shutdown", a.shutdown()).await;
}

#[tokio::test(start_paused = true)]
async fn a_drain_hands_over_finished_ids_too() {
    // A temporary service that returned keeps its id on its node
    // (`Finished`); a drain releases it like a running one.
    struct Once;
    impl Service for Once {
        async fn run(&mut self, _ctx: &Context) -> highlander::Result<()> {
            Ok(())
        }
    }
    let once = || {
        ChildSpec::new("once", |_ctx| async { Ok(Once) }).restart(highlander::Restart::Temporary)
    };
    let cluster = MemoryCluster::new();
    let a = start(&cluster, "a", vec![once()]).await;
    hang_guard(
        "finished",
        a.wait_until(|s| matches!(s.get("once"), Some(SingletonState::Finished { .. }))),
    )
    .await;
    let b = start(&cluster, "b", vec![once()]).await;
    hang_guard("drain", a.drain()).await.unwrap();
    assert!(matches!(
        a.status().get("once"),
        Some(SingletonState::Draining | SingletonState::Waiting { .. })
    ));
    // b claims it and runs it once in turn.
    hang_guard(
        "b finished",
        b.wait_until(|s| matches!(s.get("once"), Some(SingletonState::Finished { .. }))),
    )
    .await;
    assert_eq!(cluster.holders("once")[0].node, "b");
    hang_guard("shutdown", a.shutdown()).await;
    hang_guard("shutdown", b.shutdown()).await;
}

#[tokio::test(start_paused = true)]
async fn resume_calls_an_unfinished_drain_off() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let specs = ids("tenant", 50).iter().map(|id| probe(id, &log)).collect();
    let a = start(&cluster, "a", specs).await;
    a.wait_until(|s| s.running().count() == 50).await;
    let mut builder_b = Runtime::builder()
        .rebalance(true)
        .node("b")
        .backend(cluster.clone());
    for id in ids("tenant", 50) {
        builder_b = builder_b.child(probe(&id, &log));
    }
    let b = builder_b.start().await.unwrap();
    all_waiting(&b).await;
    let drain = a.drain();
    a.resume();
    let err = hang_guard("drain", drain).await.unwrap_err();
    assert!(err.to_string().contains("resume()"), "{err}");
    // After shutdown, a drain is refused.
    hang_guard("shutdown", a.shutdown()).await;
    assert!(matches!(a.drain().await, Err(Error::Stopped)));
    assert!(matches!(a.add(probe("late", &log)), Err(Error::Stopped)));
    hang_guard("shutdown", b.shutdown()).await;
}

#[tokio::test(start_paused = true)]
async fn weight_labels_and_affinity_are_shown_in_status() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let a = Runtime::builder()
        .rebalance(true)
        .node("a")
        .backend(cluster.clone())
        .weight(3)
        .labels(["zone=eu", "ssd"])
        .child(probe("plain", &log))
        .child(
            probe("picky", &log)
                .prefer(["node-b", "zone=eu"])
                .avoid(["spot"]),
        )
        .start()
        .await
        .unwrap();
    a.add(probe("late", &log).avoid(["zone=us"])).unwrap();
    let status = a.status();
    assert_eq!(status.weight, 3);
    assert_eq!(status.labels, ["zone=eu", "ssd"]);
    let by_id: HashMap<&str, _> = status
        .singletons
        .iter()
        .map(|s| (s.id.as_str(), s))
        .collect();
    assert!(by_id["plain"].prefer.is_empty() && by_id["plain"].avoid.is_empty());
    assert_eq!(by_id["picky"].prefer, ["node-b", "zone=eu"]);
    assert_eq!(by_id["picky"].avoid, ["spot"]);
    assert_eq!(by_id["late"].avoid, ["zone=us"]);
    // The JSON form carries them, and reads back the same.
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["weight"], 3);
    assert_eq!(json["labels"][1], "ssd");
    assert_eq!(json["draining"], false);
    assert_eq!(json["singletons"][1]["prefer"][1], "zone=eu");
    assert!(
        json["singletons"][0].get("prefer").is_none(),
        "empty lists are left out"
    );
    let back: Status = serde_json::from_value(json).unwrap();
    assert_eq!(back, status);

    // Bad affinity entries are refused, at start and when added.
    let err = a.add(probe("odd", &log).prefer(["node a"])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "singleton `odd`: `prefer` entry `node a` cannot name a node: use only visible ASCII characters (no spaces)"
    );
    let err = Runtime::builder()
        .rebalance(true)
        .node("b")
        .backend(cluster.clone())
        .child(probe("odd", &log).prefer(["x"]).avoid(["x"]))
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`x` is given twice"), "{err}");
    // Bad labels from the builder.
    let err = Runtime::builder()
        .rebalance(true)
        .node("b")
        .backend(cluster.clone())
        .labels(["zone=eu", "a,b"])
        .start()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Builder::labels: invalid node label `a,b`: a label cannot contain a comma"
    );
    // The default weight, and no labels.
    let b = start(&cluster, "b", Vec::new()).await;
    assert_eq!((b.status().weight, b.status().labels.len()), (1, 0));
    hang_guard("shutdown", a.shutdown()).await;
    hang_guard("shutdown", b.shutdown()).await;
}

/// Waits until every singleton of `node` waits for its id.
async fn all_waiting(node: &RuntimeHandle) {
    let waiting = node.wait_until(|s| {
        s.singletons
            .iter()
            .all(|x| matches!(x.state, SingletonState::Waiting { .. }))
    });
    hang_guard("all waiting", waiting).await;
}

/// Every id of `ids` stopped `moved` on `from`, nothing else stopped, and
/// `to` runs them all.
async fn handed_over(log: &Log, ids: &[String], from: &str, to: &RuntimeHandle) {
    for id in ids {
        assert_eq!(
            log.count(&format!("terminate {id} {from} moved ")),
            1,
            "{id}: {:?}",
            log.lines()
        );
    }
    assert_eq!(
        log.count("terminate "),
        ids.len(),
        "nothing but the handoffs stopped"
    );
    let all = ids.len();
    let running = to.wait_until(|s| s.running().count() == all);
    hang_guard("the other node runs everything", running).await;
}

/// With `drain_on_shutdown(true)`, SIGTERM makes `run()` hand every id
/// over (stopped with `moved`, the other node takes over) before it
/// returns. Real time: a signal is awaited, not a timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_first_when_asked_to() {
    highlander_tests::init_tracing();
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let tenants = ids("tenant", 20);
    let mut builder = Runtime::builder()
        .rebalance(true)
        .node("a")
        .backend(cluster.clone())
        .drain_on_shutdown(true);
    for id in &tenants {
        builder = builder.child(probe(id, &log));
    }
    let a = tokio::spawn(builder.run());
    let all_on = |node: &str| {
        tenants
            .iter()
            .all(|id| cluster.holders(id).iter().any(|h| h.node == node))
    };
    hang_guard("a runs everything", async {
        while !all_on("a") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let b = start(
        &cluster,
        "b",
        tenants.iter().map(|id| probe(id, &log)).collect(),
    )
    .await;
    all_waiting(&b).await;

    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM)
        .expect("SIGTERM to this process");
    hang_guard("run returns", a).await.unwrap().expect("run");
    handed_over(&log, &tenants, "a", &b).await;
    b.shutdown().await;
}

/// `RuntimeHandle::graceful_shutdown` (for applications with their own
/// signal handling) does what a SIGTERM does in `run()`: with
/// `drain_on_shutdown(true)` every id is handed over before the runtime
/// stops; without it, every instance stops with `node shutdown` and the
/// ids are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_only_when_configured_to() {
    highlander_tests::init_tracing();
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let tenants = ids("tenant", 20);
    let node = |name: &str, drain: bool| {
        let mut builder = Runtime::builder()
            .node(name)
            .backend(cluster.clone())
            .drain_on_shutdown(drain);
        for id in &tenants {
            builder = builder.child(probe(id, &log));
        }
        builder.start()
    };
    let a = node("a", true).await.expect("a starts");
    hang_guard(
        "a runs everything",
        a.wait_until(|s| s.running().count() == 20),
    )
    .await;
    let b = node("b", false).await.expect("b starts");
    all_waiting(&b).await;

    // Draining: each id stops `moved` on a and runs on b before a stops.
    hang_guard("a drains and stops", a.graceful_shutdown()).await;
    hang_guard("a has stopped", a.stopped()).await;
    handed_over(&log, &tenants, "a", &b).await;

    // Not draining: a plain shutdown.
    hang_guard("b stops", b.graceful_shutdown()).await;
    for id in &tenants {
        assert_eq!(
            log.count(&format!("terminate {id} b node shutdown ")),
            1,
            "{id}: {:?}",
            log.lines()
        );
    }
    assert_eq!(log.count("terminate "), 40);
    // On a stopped runtime it returns at once.
    hang_guard("again", a.graceful_shutdown()).await;
}

/// Runs the `node` binary with `env` and returns its exit code and stderr.
fn node(env: &[(&str, &str)]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_node"))
        .env_remove("HIGHLANDER_BACKEND")
        .env_remove("HIGHLANDER_NODE")
        .env_remove("HIGHLANDER_NODE_WEIGHT")
        .env_remove("HIGHLANDER_NODE_LABELS")
        .env("RUST_LOG", "off")
        .envs(env.iter().copied())
        .output()
        .expect("the node binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn weight_and_labels_from_the_environment_fail_with_one_clear_line() {
    let cases = [
        (
            ("HIGHLANDER_NODE_WEIGHT", "heavy"),
            "error: HIGHLANDER_NODE_WEIGHT: `heavy` is not a weight: use a whole number from 0 to \
             4294967295 (1 is the default; 0 hosts an id only when no other node can)",
        ),
        (
            ("HIGHLANDER_NODE_WEIGHT", "-1"),
            "error: HIGHLANDER_NODE_WEIGHT: `-1` is not a weight: use a whole number from 0 to \
             4294967295 (1 is the default; 0 hosts an id only when no other node can)",
        ),
        (
            ("HIGHLANDER_NODE_LABELS", "zone=eu,,ssd"),
            "error: HIGHLANDER_NODE_LABELS: an empty label (two commas in a row, or one at an end): \
             write labels like `zone=eu,ssd`",
        ),
        (
            ("HIGHLANDER_NODE_LABELS", "zone=,ssd"),
            "error: HIGHLANDER_NODE_LABELS: invalid node label `zone=`: `key=` needs a value: \
             write `key=value`, or the key alone",
        ),
        (
            ("HIGHLANDER_NODE_LABELS", "ssd, ssd"),
            "error: HIGHLANDER_NODE_LABELS: node label `ssd` is given twice",
        ),
    ];
    for ((key, value), expected) in cases {
        let (code, err) = node(&[(key, value)]);
        assert_eq!(code, 1, "{key}={value}: {err}");
        assert_eq!(err, expected, "{key}={value}");
    }
}

/// Memory per id: RSS of this process before and after 100,000 ids run
/// on one node (all running), then on a second node (all waiting). Prints
/// the numbers; run alone with
/// `cargo test -p highlander-tests --test fleet_runtime memory_per_id -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run alone, by hand"]
async fn memory_per_id() {
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
    struct Idle;
    impl Service for Idle {
        async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
            ctx.cancelled().await;
            Ok(())
        }
    }
    const N: usize = 100_000;
    let cluster = MemoryCluster::new();
    let specs =
        || (0..N).map(|i| ChildSpec::new(format!("tenant/{i:06}"), |_ctx| async { Ok(Idle) }));
    let before = rss_kib();
    let mut builder = Runtime::builder()
        .rebalance(true)
        .node("a")
        .backend(cluster.clone())
        .metrics_per_id(false);
    for spec in specs() {
        builder = builder.child(spec);
    }
    let a = builder.start().await.unwrap();
    a.wait_until(|s| s.running().count() == N).await;
    let running = rss_kib();
    let mut builder = Runtime::builder()
        .rebalance(true)
        .node("b")
        .backend(cluster.clone())
        .metrics_per_id(false);
    for spec in specs() {
        builder = builder.child(spec);
    }
    let b = builder.start().await.unwrap();
    b.wait_until(|s| {
        s.singletons
            .iter()
            .all(|x| matches!(x.state, SingletonState::Waiting { .. }))
    })
    .await;
    let waiting = rss_kib();
    println!(
        "memory backend, {N} ids: {:.2} KiB per running id, {:.2} KiB per waiting id (RSS, backend included)",
        (running - before) as f64 / N as f64,
        (waiting - running) as f64 / N as f64,
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A node that stepped down from an id is not handed it back by
/// rebalancing while its step-down delay runs (its profile leaves the id
/// out), and gets it back by rebalancing once the delay is over, where
/// placement puts it.
#[tokio::test(start_paused = true)]
async fn rebalancing_respects_a_step_down() {
    let cluster = MemoryCluster::new();
    let probe = highlander_tests::probe::Probe::new();
    let delay = Duration::from_secs(10);
    let start = |name: &'static str, ids: &'static [&'static str]| {
        let mut b = Runtime::builder()
            .rebalance(true)
            .node(name)
            .backend(cluster.clone())
            .stepdown_delay(delay);
        for id in ids {
            b = b.child(probe.spec(id));
        }
        b.start()
    };
    let a = start("a", &["x"]).await.unwrap();
    let b = start("b", &["x"]).await.unwrap();
    // x settles where placement puts it.
    let candidates = [
        highlander::placement::Candidate::new("a", 1),
        highlander::placement::Candidate::new("b", 1),
    ];
    let place = highlander::placement::place("x", &Default::default(), &candidates)
        .unwrap()
        .name()
        .to_string();
    let (home, other) = if place == "a" { (&a, &b) } else { (&b, &a) };
    home.wait_until(|s| s.is_running("x")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(home.status().is_running("x"));

    let before = probe.stops("x").len();
    home.step_down("x").unwrap();
    other.wait_until(|s| s.is_running("x")).await;
    // A change of members while home is stepped down: x stays put.
    let c = start("c", &[]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(other.status().is_running("x"), "{:?}", probe);
    assert!(
        !probe.stops("x")[before..]
            .iter()
            .any(|e| e.reason() == Some(&ShutdownReason::Moved)),
        "{probe:?}"
    );
    // After the delay home runs it again: handed back with Moved.
    home.wait_until(|s| s.is_running("x")).await;
    let stops = probe.stops("x");
    assert_eq!(
        stops.last().and_then(|e| e.reason()),
        Some(&ShutdownReason::Moved),
        "{probe:?}"
    );
    probe.assert_one_at_a_time();
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}
