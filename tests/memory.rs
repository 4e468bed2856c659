//! The core, driven through the public API: several runtimes on one
//! `MemoryCluster`, the original library's scenarios and more. Time is
//! tokio's paused clock, so waits are instant and deterministic. What every
//! backend must do (one holder, handoffs, crashes, step-down, tokens, many
//! ids, shutdown) is in `conformance.rs`; here is what the memory backend
//! and the runtime's own supervision add.

use std::time::Duration;

use highlander::{
    ChildSpec, Context, Error, MemoryCluster, Restart, Runtime, RuntimeHandle, Service,
    ShutdownReason, SingletonState,
};

use highlander_tests::log::Log;
use highlander_tests::probe::{Probe, Run};
use highlander_tests::wait::{GUARD, holder, running, waiting, within};

async fn node(cluster: &MemoryCluster, name: &str, specs: Vec<ChildSpec>) -> RuntimeHandle {
    highlander_tests::init_tracing();
    // These tests are about the backend: ids stay where first claimed
    // (rebalancing is tests/src/fleet.rs's).
    let mut builder = Runtime::builder()
        .node(name)
        .backend(cluster.clone())
        .rebalance(false);
    for spec in specs {
        builder = builder.child(spec);
    }
    builder.start().await.expect("runtime starts")
}

/// Starts one node per name, each configured with the `solo` probe: the
/// first holds it, every other one waits.
async fn solo_nodes(cluster: &MemoryCluster, probe: &Probe, names: &[&str]) -> Vec<RuntimeHandle> {
    let mut nodes = Vec::new();
    for name in names {
        let n = node(cluster, name, vec![probe.spec("solo")]).await;
        if nodes.is_empty() {
            running(&n, "solo").await;
        } else {
            waiting(&n, "solo").await;
        }
        nodes.push(n);
    }
    nodes
}

/// The index among `nodes` of the one that runs `id`, once exactly one
/// does and every other waits.
async fn single_holder(nodes: &[&RuntimeHandle], id: &str) -> usize {
    holder(nodes, id, GUARD).await.index
}

/// A graceful handoff on the memory backend is a single call: no timer has
/// to fire (the paused clock stands still), and once every node has left
/// the cluster keeps nothing.
#[tokio::test(start_paused = true)]
async fn a_graceful_handoff_needs_no_timer_and_leaves_nothing_behind() {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let [a, b]: [RuntimeHandle; 2] = solo_nodes(&cluster, &probe, &["a", "b"])
        .await
        .try_into()
        .unwrap();
    let before = tokio::time::Instant::now();
    a.shutdown().await;
    running(&b, "solo").await;
    assert_eq!(tokio::time::Instant::now(), before);
    b.shutdown().await;
    assert!(cluster.holders("solo").is_empty());
    assert!(cluster.nodes().is_empty());
    probe.assert_one_at_a_time();
}

/// A singleton supervision tree: three child tasks that all restart when one fails.
struct Tree {
    log: Log,
}

impl Service for Tree {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        let generation = ctx.state::<Generation>()?.next();
        for name in ["fetch", "transform", "store"] {
            let child = ctx.clone();
            let log = self.log.clone();
            ctx.spawn(name, async move {
                log.push(format!("child {name} up gen{generation}"));
                if name == "transform" && generation == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Err(Error::msg("bad record"));
                }
                child.cancelled().await;
                tokio::time::sleep(Duration::from_millis(50)).await; // cleanup takes time
                log.push(format!("child {name} down gen{generation}"));
                Ok(())
            });
        }
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        self.log.push(format!("terminate {reason}"));
    }
}

#[derive(Default)]
struct Generation(std::sync::atomic::AtomicU32);

impl Generation {
    fn next(&self) -> u32 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn supervision_tree_restarts_all_children_together() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let tree_log = log.clone();
    let a = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .state(Generation::default())
        .singleton("tree", move |_ctx| {
            let log = tree_log.clone();
            async move { Ok(Tree { log }) }
        })
        .start()
        .await
        .unwrap();
    // Generation 0 fails through its `transform` child; generation 1 runs on.
    loop {
        if log.count("child") >= 6 + 2 {
            break;
        }
        a.changed().await;
    }
    a.wait_until(|s| {
        matches!(
            s.get("tree"),
            Some(SingletonState::Running { restarts: 1, .. })
        )
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.shutdown().await;
    let lines = log.lines();
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| l == needle)
            .unwrap_or_else(|| panic!("{needle} in {lines:?}"))
    };
    // Every generation-0 child was stopped and awaited before terminate ran, and
    // before any generation-1 child started.
    let first_terminate = pos("terminate error: child task `transform` failed: bad record");
    for name in ["fetch", "store"] {
        assert!(
            pos(&format!("child {name} down gen0")) < first_terminate,
            "{lines:?}"
        );
    }
    for name in ["fetch", "transform", "store"] {
        assert!(
            pos(&format!("child {name} up gen1")) > first_terminate,
            "{lines:?}"
        );
        assert!(
            pos(&format!("child {name} down gen1")) < pos("terminate node shutdown"),
            "{lines:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn restart_policies() {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let a = node(
        &cluster,
        "a",
        vec![
            probe
                .spec_with("perm-ok", Run::ReturnOk)
                .restart(Restart::Permanent)
                .intensity(1000, Duration::from_secs(1)),
            probe
                .spec_with("trans-ok", Run::ReturnOk)
                .restart(Restart::Transient),
            probe
                .spec_with("trans-err", Run::Fail)
                .restart(Restart::Transient)
                .intensity(2, Duration::from_secs(60)),
            probe
                .spec_with("temp-err", Run::Fail)
                .restart(Restart::Temporary),
        ],
    )
    .await;
    a.wait_until(|s| {
        matches!(
            s.get("trans-ok"),
            Some(SingletonState::Finished {
                reason: ShutdownReason::Normal,
                ..
            })
        ) && matches!(
            s.get("temp-err"),
            Some(SingletonState::Finished {
                reason: ShutdownReason::Error(_),
                ..
            })
        ) && matches!(s.get("trans-err"), Some(SingletonState::SteppedDown))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let boom = ShutdownReason::Error("boom".into());
    // permanent restarts even after a normal return
    assert!(probe.starts("perm-ok").len() >= 3, "{probe:?}");
    // transient: a normal return ends it; temporary: even an error does
    assert_eq!(probe.starts("trans-ok").len(), 1);
    assert_eq!(probe.starts("temp-err").len(), 1);
    assert_eq!(probe.stopped("temp-err", "a", &boom), 1);
    // transient after errors: restarted until the intensity (2 in 60 s) is exceeded
    assert_eq!(probe.starts("trans-err").len(), 3);
    // A finished singleton still holds its id: nobody else runs it.
    let b = node(
        &cluster,
        "b",
        vec![
            probe
                .spec_with("trans-ok", Run::ReturnOk)
                .restart(Restart::Transient),
        ],
    )
    .await;
    waiting(&b, "trans-ok").await;
    a.shutdown().await;
    b.wait_until(|s| matches!(s.get("trans-ok"), Some(SingletonState::Finished { .. })))
        .await;
    assert_eq!(probe.starts("trans-ok").len(), 2);
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn intensity_exceeded_steps_down_and_another_node_takes_over() {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let a = node(&cluster, "a", vec![probe.spec_with("flaky", Run::Panic)]).await;
    running(&a, "flaky").await;
    let ok = Probe::new();
    let b = node(&cluster, "b", vec![ok.spec("flaky")]).await;
    // a: 1 start + 3 restarts (default intensity 3 in 5 s), then it steps down
    a.wait_until(|s| matches!(s.get("flaky"), Some(SingletonState::SteppedDown)))
        .await;
    running(&b, "flaky").await;
    assert_eq!(probe.started("flaky", "a"), 4, "{probe:?}");
    // every panic became Error and still ran terminate
    let kaboom = ShutdownReason::Error("panicked: kaboom".into());
    assert_eq!(probe.stopped("flaky", "a", &kaboom), 4, "{probe:?}");
    // after its step-down delay, a waits for b instead of grabbing the id back
    tokio::time::sleep(Duration::from_secs(6)).await;
    waiting(&a, "flaky").await;
    assert!(b.status().is_running("flaky"));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_run_is_an_error_and_the_guardian_lives_on() {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let a = node(
        &cluster,
        "a",
        vec![
            probe
                .spec_with("p", Run::Panic)
                .intensity(1, Duration::from_secs(1)),
        ],
    )
    .await;
    a.wait_until(|s| matches!(s.get("p"), Some(SingletonState::SteppedDown)))
        .await;
    let kaboom = ShutdownReason::Error("panicked: kaboom".into());
    assert_eq!(probe.stopped("p", "a", &kaboom), 2);
    // The guardian is alive: after the delay it claims again and runs it again.
    a.wait_until(|s| s.is_running("p")).await;
    a.shutdown().await;
}

/// Simulates a netsplit on `names.len()` nodes split into `sides`, heals, and
/// checks one instance per side during the split and one after, with the loser
/// seeing Conflict and the oldest tenure surviving.
async fn split_and_heal(names: &[&str], sides: &[&[&str]]) {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let nodes = solo_nodes(&cluster, &probe, names).await;
    let original = nodes[0].node().to_string();

    cluster.partition(sides);
    // each side without the holder takes over: one instance per side
    for side in sides {
        let on_side: Vec<&RuntimeHandle> =
            nodes.iter().filter(|n| side.contains(&n.node())).collect();
        single_holder(&on_side, "solo").await;
    }
    assert_eq!(cluster.holders("solo").len(), sides.len());
    let running_during: usize = nodes
        .iter()
        .filter(|n| n.status().is_running("solo"))
        .count();
    assert_eq!(running_during, sides.len());

    cluster.heal();
    let survivor = single_holder(&nodes.iter().collect::<Vec<_>>(), "solo").await;
    assert_eq!(
        nodes[survivor].node(),
        original,
        "the longest tenure survives"
    );
    assert_eq!(cluster.holders("solo").len(), 1);
    // every other side's instance stopped, each with Conflict
    let stops = probe.stops("solo");
    assert_eq!(stops.len(), sides.len() - 1, "{probe:?}");
    assert!(
        stops
            .iter()
            .all(|e| e.reason() == Some(&ShutdownReason::Conflict)),
        "{probe:?}"
    );
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn two_node_split_runs_one_per_side_and_heal_keeps_one() {
    split_and_heal(&["a", "b"], &[&["a"], &["b"]]).await;
}

#[tokio::test(start_paused = true)]
async fn ten_node_split_4_6_then_heal() {
    let names = ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9"];
    split_and_heal(
        &names,
        &[
            &["n0", "n1", "n2", "n3"],
            &["n4", "n5", "n6", "n7", "n8", "n9"],
        ],
    )
    .await;
    // and with the holder on the majority side
    split_and_heal(
        &names,
        &[
            &["n6", "n7", "n8", "n9"],
            &["n0", "n1", "n2", "n3", "n4", "n5"],
        ],
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn heal_tie_goes_to_the_lower_node_name() {
    // Both sides claim at the same instant (paused clock): the lower name wins.
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    cluster.partition(&[&["b"], &["a"]]);
    let b = node(&cluster, "b", vec![probe.spec("solo")]).await;
    let a = node(&cluster, "a", vec![probe.spec("solo")]).await;
    running(&a, "solo").await;
    running(&b, "solo").await;
    cluster.heal();
    let survivor = single_holder(&[&a, &b], "solo").await;
    assert_eq!(survivor, 0, "a wins the tie");
    assert_eq!(
        probe.stopped("solo", "b", &ShutdownReason::Conflict),
        1,
        "{probe:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn bad_runtime_ids_and_duplicates_are_refused() {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let err = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .child(probe.spec("has space"))
        .start()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid singleton id `has space`: an id may only contain A-Z a-z 0-9 and . _ : / -"
    );
    let err = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .child(probe.spec("same"))
        .child(probe.spec_with("same", Run::Fail))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateId { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("duplicate singleton id `same`: it is used by both"),
        "{err}"
    );
    // nothing was left connected
    assert!(cluster.nodes().is_empty());
    // two runtimes with one node name on one cluster
    let a = node(&cluster, "a", vec![]).await;
    let err = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("node name `a` is already connected"),
        "{err}"
    );
    a.shutdown().await;
}

struct Stubborn(Log);

impl Service for Stubborn {
    async fn run(&mut self, _ctx: &Context) -> highlander::Result<()> {
        // ignores cancellation
        std::future::pending::<()>().await;
        Ok(())
    }
    async fn terminate(&mut self, reason: ShutdownReason) {
        self.0.push(format!("stubborn terminate {reason}"));
    }
}

struct SlowTerminate(Log);

impl Service for SlowTerminate {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
    async fn terminate(&mut self, _reason: ShutdownReason) {
        self.0.push("terminate began".into());
        tokio::time::sleep(Duration::from_secs(3600)).await;
        self.0.push("terminate finished".into());
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_budget_bounds_a_stuck_instance() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let slow_log = log.clone();
    let stubborn_log = log.clone();
    let a = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .child(
            ChildSpec::new("stubborn", move |_ctx| {
                let log = stubborn_log.clone();
                async move { Ok(Stubborn(log)) }
            })
            .shutdown(Duration::from_secs(2)),
        )
        .child(
            ChildSpec::new("slow", move |_ctx| {
                let log = slow_log.clone();
                async move { Ok(SlowTerminate(log)) }
            })
            .shutdown(Duration::from_secs(3)),
        )
        .start()
        .await
        .unwrap();
    running(&a, "stubborn").await;
    running(&a, "slow").await;
    let t0 = tokio::time::Instant::now();
    a.shutdown().await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // The stuck `run` was abandoned with the terminate reserve left, and
    // terminate ran; the slow terminate was cut at the end of its budget.
    let mut lines = log.lines();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "stubborn terminate node shutdown".to_string(),
            "terminate began".to_string()
        ]
    );
}

struct WithInit {
    greeting: String,
}

impl Service for WithInit {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.state::<Log>()?.push(self.greeting.clone());
        ctx.cancelled().await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn shared_state_and_missing_state() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let a = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .state(log.clone())
        .singleton("hello", |ctx: &Context| {
            let greeting = format!(
                "hello from {} with token {}",
                ctx.node(),
                ctx.fencing_token()
            );
            async move { Ok(WithInit { greeting }) }
        })
        .start()
        .await
        .unwrap();
    running(&a, "hello").await;
    a.wait_until(|_| !log.lines().is_empty()).await;
    assert_eq!(log.lines(), vec!["hello from a with token 1".to_string()]);
    a.shutdown().await;

    // Without the state, run fails with an error that says what to do.
    let b = Runtime::builder()
        .node("b")
        .backend(cluster.clone())
        .child(
            ChildSpec::new("hello", |_ctx: &Context| async {
                Ok(WithInit {
                    greeting: String::new(),
                })
            })
            .restart(Restart::Temporary),
        )
        .start()
        .await
        .unwrap();
    let status = b
        .wait_until(|s| matches!(s.get("hello"), Some(SingletonState::Finished { .. })))
        .await;
    match status.get("hello") {
        Some(SingletonState::Finished {
            reason: ShutdownReason::Error(e),
            ..
        }) => assert!(
            e.contains("no shared state of type") && e.contains("Runtime::builder().state(value)"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    b.shutdown().await;
}

// ---------------------------------------------------------------------------
// A panic anywhere in user code is an error that follows the restart policy;
// the guardian never dies with the lease held.

/// Where a [`Panicky`] service panics.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Site {
    /// The factory's synchronous part (before its `async move`).
    Factory,
    /// The service's `Drop`, after a normal return.
    Drop,
    /// The synchronous part of `run` (before its first `.await`).
    RunSync,
    /// The synchronous part of `terminate`, after a normal return.
    TerminateSync,
    /// A child task spawned with `ctx.spawn` fails with an error whose
    /// `Display` panics.
    Child,
}

/// Shared state only node `b` has.
struct Cfg;

struct Panicky {
    site: Site,
    log: Log,
}

/// An error whose `Display` panics.
#[derive(Debug)]
struct BadDisplay;

impl std::fmt::Display for BadDisplay {
    fn fmt(&self, _f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("display")
    }
}

impl std::error::Error for BadDisplay {}

impl Service for Panicky {
    #[allow(clippy::manual_async_fn)]
    fn run(
        &mut self,
        ctx: &Context,
    ) -> impl std::future::Future<Output = highlander::Result<()>> + Send {
        self.log.push(format!("start {}", ctx.node()));
        if self.site == Site::RunSync {
            panic!("sync run");
        }
        let site = self.site;
        async move {
            if site == Site::Child {
                ctx.spawn("child", async { Err(Error::service(BadDisplay)) });
                ctx.cancelled().await;
            }
            Ok(())
        }
    }

    #[allow(clippy::manual_async_fn)]
    fn terminate(
        &mut self,
        reason: ShutdownReason,
    ) -> impl std::future::Future<Output = ()> + Send {
        self.log.push(format!("terminate {reason}"));
        if self.site == Site::TerminateSync {
            panic!("sync terminate");
        }
        async {}
    }
}

impl Drop for Panicky {
    fn drop(&mut self) {
        if self.site == Site::Drop && !std::thread::panicking() {
            panic!("drop");
        }
    }
}

/// The spec of a [`Panicky`] service: on a node without [`Cfg`] it panics at
/// `site`; with it (node `b`), it runs until cancelled.
fn panicky(site: Site, log: &Log) -> ChildSpec {
    let log = log.clone();
    ChildSpec::new("x", move |ctx: &Context| {
        log.push(format!("factory {}", ctx.node()));
        let healthy = ctx.state::<Cfg>().is_ok();
        if site == Site::Factory && !healthy {
            // The synchronous part of the factory: no `async` block yet.
            let _cfg: &Cfg = ctx.state::<Cfg>().unwrap();
        }
        let log = log.clone();
        async move {
            if healthy {
                Ok(Panicky {
                    site: Site::Child,
                    log,
                })
            } else {
                Ok(Panicky { site, log })
            }
        }
    })
}

/// Bounds a wait that hangs on a broken guardian (virtual time: instant).
async fn hang_guard<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    within(what, GUARD, future).await
}

/// Checks one panic site two ways: as `temporary` the instance finishes
/// with an error naming the panic; as `transient` with an intensity of 1 on a
/// 2-node cluster, node `a` restarts it once, then steps down and `b` (where
/// it does not panic) takes over.
async fn panic_site(site: Site, expected: &str) {
    highlander_tests::init_tracing();
    // temporary: the reason says what panicked
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let a = node(
        &cluster,
        "a",
        vec![panicky(site, &log).restart(Restart::Temporary)],
    )
    .await;
    let status = hang_guard(
        "the instance finishes",
        a.wait_until(|s| matches!(s.get("x"), Some(SingletonState::Finished { .. }))),
    )
    .await;
    match status.get("x") {
        Some(SingletonState::Finished {
            reason: ShutdownReason::Error(e),
            ..
        }) => assert_eq!(e, expected, "{site:?}"),
        other => panic!("{site:?}: {other:?}"),
    }
    hang_guard("shutdown", a.shutdown()).await;
    assert!(cluster.holders("x").is_empty(), "{site:?}: released");

    // transient on two nodes: restarted by policy, then taken over
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let bad = panicky(site, &log)
        .restart(Restart::Transient)
        .intensity(1, Duration::from_secs(60));
    let a = node(&cluster, "a", vec![bad.clone()]).await;
    hang_guard(
        "a claims",
        a.wait_until(|s| !matches!(s.get("x"), Some(SingletonState::Claiming))),
    )
    .await;
    let b = Runtime::builder()
        .node("b")
        .backend(cluster.clone())
        .state(Cfg)
        .child(bad)
        .start()
        .await
        .unwrap();
    hang_guard("b takes over", running(&b, "x")).await;
    hang_guard(
        "a stepped down",
        a.wait_until(|s| {
            matches!(
                s.get("x"),
                Some(SingletonState::SteppedDown | SingletonState::Waiting { .. })
            )
        }),
    )
    .await;
    assert_eq!(log.count("factory a"), 2, "{site:?}: {:?}", log.lines());
    assert_eq!(cluster.holders("x")[0].node, "b");
    hang_guard("shutdown a", a.shutdown()).await;
    hang_guard("shutdown b", b.shutdown()).await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_the_sync_part_of_a_factory_is_an_error() {
    panic_site(
        Site::Factory,
        "init panicked: called `Result::unwrap()` on an `Err` value: MissingState { type_name: \"memory::Cfg\" }",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_the_drop_of_a_service_is_an_error() {
    panic_site(Site::Drop, "dropping the service panicked: drop").await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_the_sync_part_of_run_is_an_error() {
    panic_site(Site::RunSync, "panicked: sync run").await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_the_sync_part_of_terminate_is_an_error() {
    panic_site(Site::TerminateSync, "terminate panicked: sync terminate").await;
}

#[tokio::test(start_paused = true)]
async fn panic_in_the_error_of_a_child_is_an_error() {
    panic_site(
        Site::Child,
        "child task `child` failed: (the error's Display panicked: display)",
    )
    .await;
}

// ---------------------------------------------------------------------------
// terminate always runs, also after `run` or a child overran the budget, and
// no child starts once the instance stops.

/// A service whose `run` and one child ignore cancellation.
struct Deaf {
    log: Log,
    run_too: bool,
}

/// Logs when the future holding it is dropped.
struct DropLog(Log, &'static str);

impl Drop for DropLog {
    fn drop(&mut self) {
        self.0.push(format!("dropped {}", self.1));
    }
}

impl Service for Deaf {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        let guard = DropLog(self.log.clone(), "child");
        ctx.spawn("deaf", async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok(())
        });
        let _guard = DropLog(self.log.clone(), "run");
        if self.run_too {
            std::future::pending::<()>().await;
        }
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        self.log.push(format!("terminate {reason}"));
    }
}

async fn deaf(run_too: bool) -> Vec<String> {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let deaf_log = log.clone();
    let a = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .child(
            ChildSpec::new("deaf", move |_ctx| {
                let log = deaf_log.clone();
                async move { Ok(Deaf { log, run_too }) }
            })
            .shutdown(Duration::from_secs(4)),
        )
        .start()
        .await
        .unwrap();
    running(&a, "deaf").await;
    hang_guard("shutdown", a.shutdown()).await;
    log.lines()
}

#[tokio::test(start_paused = true)]
async fn terminate_runs_after_a_child_overran_the_budget() {
    let lines = deaf(false).await;
    // run returned, the child was aborted, then terminate ran
    assert_eq!(
        lines,
        ["dropped run", "dropped child", "terminate node shutdown"],
        "{lines:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn terminate_runs_after_run_overran_the_budget() {
    let lines = deaf(true).await;
    // run was dropped, the child aborted, and terminate still ran
    assert_eq!(
        lines,
        ["dropped run", "dropped child", "terminate node shutdown"],
        "{lines:?}"
    );
}

/// Tries to start children once it is stopping: from `run` after
/// cancellation, from a child, and from `terminate` through a kept context.
struct LateSpawner {
    log: Log,
    ctx: Option<Context>,
}

fn late_child(
    log: &Log,
    from: &str,
) -> impl std::future::Future<Output = highlander::Result<()>> + Send + 'static {
    let log = log.clone();
    let from = from.to_string();
    async move {
        log.push(format!("late child from {from} ran"));
        Ok(())
    }
}

impl Service for LateSpawner {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.ctx = Some(ctx.clone());
        let (child_ctx, log) = (ctx.clone(), self.log.clone());
        ctx.spawn("lingering", async move {
            child_ctx.cancelled().await;
            let started = child_ctx.spawn("late", late_child(&log, "child"));
            log.push(format!("spawn from child returned {started:?}"));
            Ok(())
        });
        ctx.cancelled().await;
        let started = ctx.spawn("late", late_child(&self.log, "run"));
        self.log
            .push(format!("spawn from run returned {started:?}"));
        Ok(())
    }

    async fn terminate(&mut self, _reason: ShutdownReason) {
        if let Some(ctx) = &self.ctx {
            let started = ctx.spawn("late", late_child(&self.log, "terminate"));
            self.log
                .push(format!("spawn from terminate returned {started:?}"));
        }
        // Give a wrongly started child every chance to run.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn children_are_refused_once_the_instance_stops() {
    let cluster = MemoryCluster::new();
    let log = Log::default();
    let spawner_log = log.clone();
    let a = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .singleton("late", move |_ctx| {
            let log = spawner_log.clone();
            async move { Ok(LateSpawner { log, ctx: None }) }
        })
        .start()
        .await
        .unwrap();
    running(&a, "late").await;
    hang_guard("shutdown", a.shutdown()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut lines = log.lines();
    lines.sort();
    assert_eq!(
        lines,
        [
            "spawn from child returned false",
            "spawn from run returned false",
            "spawn from terminate returned false",
        ],
        "no late child ran"
    );
}

// ---------------------------------------------------------------------------
// The last resort: should the guardian itself panic (here: a backend whose
// release panics once), it releases its tenure, says so, and claims again.

/// A memory backend whose sessions panic in their first `release`.
struct PanickyRelease(MemoryCluster);

struct PanickyReleaseSession {
    inner: std::sync::Arc<dyn highlander::backend::Session>,
    panicked: std::sync::atomic::AtomicBool,
}

impl highlander::backend::Backend for PanickyRelease {
    fn connect(
        &self,
        node: &str,
    ) -> highlander::BoxFuture<
        'static,
        highlander::Result<std::sync::Arc<dyn highlander::backend::Session>>,
    > {
        let connect = self.0.connect(node);
        Box::pin(async move {
            let session: std::sync::Arc<dyn highlander::backend::Session> =
                std::sync::Arc::new(PanickyReleaseSession {
                    inner: connect.await?,
                    panicked: Default::default(),
                });
            Ok(session)
        })
    }

    fn describe(&self) -> String {
        "memory, panicking in its first release".into()
    }
}

impl highlander::backend::Session for PanickyReleaseSession {
    fn try_claim(
        &self,
        request: highlander::backend::ClaimRequest,
    ) -> highlander::BoxFuture<'_, highlander::Result<highlander::backend::Claim>> {
        self.inner.try_claim(request)
    }

    fn release(&self, id: &str, token: u64) -> highlander::BoxFuture<'_, highlander::Result<()>> {
        if !self
            .panicked
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("release: a bug in the backend");
        }
        self.inner.release(id, token)
    }

    fn holder(
        &self,
        id: &str,
    ) -> highlander::BoxFuture<'_, highlander::Result<Option<highlander::backend::Holder>>> {
        self.inner.holder(id)
    }

    fn close(&self) -> highlander::BoxFuture<'_, ()> {
        self.inner.close()
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_guardian_releases_its_tenure_and_claims_again() {
    highlander_tests::init_tracing();
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let a = Runtime::builder()
        .node("a")
        .backend(PanickyRelease(cluster.clone()))
        .child(probe.spec("solo"))
        .start()
        .await
        .unwrap();
    running(&a, "solo").await;
    let b = node(&cluster, "b", vec![probe.spec("solo")]).await;
    waiting(&b, "solo").await;
    // The step-down's release panics inside a's guardian.
    a.step_down("solo").unwrap();
    hang_guard("b takes over", running(&b, "solo")).await;
    assert_eq!(probe.stopped("solo", "a", &ShutdownReason::Stepdown), 1);
    assert_eq!(a.status().get("solo"), Some(&SingletonState::SteppedDown));
    // a's guardian lives on: it waits for b, and takes over when b goes.
    hang_guard("a waits", waiting(&a, "solo")).await;
    hang_guard("b stops", b.shutdown()).await;
    hang_guard("a takes over", running(&a, "solo")).await;
    hang_guard("a stops", a.shutdown()).await;
    assert!(cluster.holders("solo").is_empty());
}

/// A step-down asked for the moment `run` has begun is never lost: the
/// instance may not yet listen for it then (its first poll can come after
/// `run` started), so the request waits for it. 200 tenures, each stepped
/// down from inside its own `run`'s first moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_down_right_after_run_begins_is_not_lost() {
    struct Eager(tokio::sync::mpsc::UnboundedSender<()>);
    impl Service for Eager {
        async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
            let _ = self.0.send(());
            ctx.cancelled().await;
            Ok(())
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = Runtime::builder()
        .node("a")
        .backend(MemoryCluster::new())
        .stepdown_delay(Duration::from_millis(1))
        .child(ChildSpec::new("eager", move |_ctx| {
            let tx = tx.clone();
            async move { Ok(Eager(tx)) }
        }))
        .start()
        .await
        .unwrap();
    for round in 0..200 {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the instance never ran again"))
            .expect("the runtime runs");
        handle.step_down("eager").unwrap();
    }
    handle.shutdown().await;
}
