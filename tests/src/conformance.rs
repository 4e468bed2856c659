//! The scenarios every backend must pass, written once and run on each
//! backend (`tests/conformance.rs`) through a [`Fixture`]: how to make the
//! backend of node N, in a [`Space`] of its own for each scenario (a memory
//! cluster, an embedded cluster seeded with the nodes before it, a Postgres
//! or etcd namespace on a server the test started).
//!
//! Every scenario starts runtimes of [`Probe`] services, drives them
//! through the public API, checks what the probe recorded (one tenure at a
//! time, tokens growing) and shuts every node down. Deadlines are hang
//! guards, never timing assertions.
//!
//! | scenario | what must hold |
//! |---|---|
//! | [`one_holder_among_three`] | one instance among three nodes; the others wait for it and every node's backend names it |
//! | [`graceful_handoff`] | a holder that shuts down stops its instance, releases, and a waiting node takes over with a larger token |
//! | [`takeover_after_a_crash`] | a holder that crashes (no `terminate`, nothing released) is replaced with a larger token |
//! | [`step_down_hands_over_only_that_id`] | a step-down moves one id, and only it |
//! | [`tokens_grow_across_tenures`] | tokens grow across tenures, also of a node restarted under its name |
//! | [`many_ids_run_once_each`] | 200 ids on three nodes each run exactly once, also after the busiest node crashes |
//! | [`shutdown_stops_every_instance`] | shutdown returns once every instance's `terminate` has run |

use std::time::Duration;

use highlander::backend::Backend;
use highlander::{Runtime, RuntimeHandle, ShutdownReason, SingletonState};

use crate::probe::Probe;
use crate::wait::{
    GUARD, Holding, holder, is_waiting, runners, total_running, wait_all, wait_until_async, within,
};

/// The shutdown budget of every probe in the scenarios (it fits the short
/// etcd TTLs of the tests).
pub const BUDGET: Duration = Duration::from_millis(500);

/// How long a scenario lets things settle before it checks that nothing
/// more happened.
const SETTLE: Duration = Duration::from_millis(300);

/// One backend, as the scenarios use it.
pub trait Fixture {
    /// The backend's name, in messages.
    fn name(&self) -> &'static str;

    /// A space of its own for the scenario called `scenario`: the nodes of
    /// one space coordinate with each other and with no other space.
    fn space(&self, scenario: &str) -> Box<dyn Space>;
}

/// Where the nodes of one scenario meet.
pub trait Space {
    /// The backend of node `node`, asked at each start of a node (a node
    /// started again under its name asks again).
    fn backend(&self, node: &str) -> Box<dyn Backend>;
}

/// Runs every scenario on `fixture`, one after the other.
pub async fn run_all(fixture: &dyn Fixture) {
    crate::init_tracing();
    one_holder_among_three(fixture).await;
    graceful_handoff(fixture).await;
    takeover_after_a_crash(fixture).await;
    step_down_hands_over_only_that_id(fixture).await;
    tokens_grow_across_tenures(fixture).await;
    many_ids_run_once_each(fixture).await;
    shutdown_stops_every_instance(fixture).await;
}

/// One scenario's space, probe and name.
struct Scene {
    space: Box<dyn Space>,
    probe: Probe,
    name: String,
}

impl Scene {
    fn new(fixture: &dyn Fixture, scenario: &str) -> Scene {
        let name = format!("{}: {scenario}", fixture.name());
        eprintln!("{name}");
        Scene {
            space: fixture.space(scenario),
            probe: Probe::new(),
            name,
        }
    }

    /// Starts node `node` with a probe for each of `ids`.
    async fn start(&self, node: &str, ids: &[String]) -> RuntimeHandle {
        self.start_with(node, ids, Duration::ZERO).await
    }

    /// As [`Scene::start`], with probes whose `terminate` takes `stop`.
    async fn start_with(&self, node: &str, ids: &[String], stop: Duration) -> RuntimeHandle {
        // The seam's promises, not placement's: an id stays where it was
        // first claimed (tests/src/fleet.rs covers rebalancing).
        let mut builder = Runtime::builder()
            .node(node)
            .backend(self.space.backend(node))
            .rebalance(false);
        for id in ids {
            builder = builder.child(self.probe.slow_spec(id, stop).shutdown(BUDGET));
        }
        within(
            &format!("{}: {node} started", self.name),
            GUARD,
            builder.start(),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: node {node} does not start: {e}", self.name))
    }

    /// Starts `names` one after the other, each with a probe for `ids`.
    async fn start_all(&self, names: &[&str], ids: &[String]) -> Vec<RuntimeHandle> {
        let mut handles = Vec::new();
        for name in names {
            handles.push(self.start(name, ids).await);
        }
        handles
    }

    /// Waits until the probe has seen `node` start an instance of each of
    /// `ids` (a node's status shows an id running a moment before its
    /// instance's `run` begins).
    async fn wait_started(&self, node: &str, ids: &[String]) {
        let what = format!("{}: {node} started every id", self.name);
        self.probe
            .wait_for(&what, |events| {
                ids.iter().all(|id| {
                    events
                        .iter()
                        .any(|e| e.is_start() && e.node == node && &e.id == id)
                })
            })
            .await;
    }

    /// Waits until the probe has seen `count` starts in all.
    async fn wait_starts(&self, count: usize) {
        let what = format!("{}: {count} instances started", self.name);
        self.probe
            .wait_for(&what, |events| {
                events.iter().filter(|e| e.is_start()).count() >= count
            })
            .await;
    }

    /// Crashes `handle`'s node: the runtime is aborted and the handle
    /// dropped, so nothing is released and no `terminate` runs.
    fn crash(&self, handle: RuntimeHandle) {
        self.probe.cut(handle.node());
        handle.abort();
        drop(handle);
    }

    /// Waits until `handle`'s backend names `node` as the holder of `id`,
    /// with `token` when it tells the token.
    async fn sees_holder(&self, handle: &RuntimeHandle, id: &str, node: &str, token: u64) {
        let what = format!(
            "{}: {} seeing {node} hold `{id}` with token {token}",
            self.name,
            handle.node()
        );
        wait_until_async(&what, GUARD, async || {
            let Ok(Some(h)) = handle.holder(id).await else {
                return false;
            };
            let listed = handle.holders().await.is_ok_and(|all| {
                all.iter().any(|held| {
                    held.id == id
                        && held.holder.node == node
                        && held.holder.token.is_none_or(|t| t == token)
                })
            });
            h.node == node && h.token.is_none_or(|t| t == token) && listed
        })
        .await;
    }
}

fn refs(handles: &[RuntimeHandle]) -> Vec<&RuntimeHandle> {
    handles.iter().collect()
}

fn one(id: &str) -> Vec<String> {
    vec![id.to_string()]
}

/// Three nodes: exactly one runs the id; the other two wait for it and
/// name it, and every node's backend names it; it stays so.
pub async fn one_holder_among_three(fixture: &dyn Fixture) {
    let s = Scene::new(fixture, "one-holder");
    let id = "solo";
    let nodes = s.start_all(&["a", "b", "c"], &one(id)).await;
    let all = refs(&nodes);
    let held = holder(&all, id, GUARD).await;
    s.probe.wait_start(&held.node, id).await;
    wait_all(
        &all,
        &format!("{}: every other node waiting on {}", s.name, held.node),
        GUARD,
        || {
            all.iter().enumerate().all(|(i, n)| {
                i == held.index
                    || matches!(
                        n.status().get(id),
                        Some(SingletonState::Waiting { holder: Some(h) })
                            if h.node == held.node && h.token.is_none_or(|t| t == held.token)
                    )
            })
        },
    )
    .await;
    for n in &all {
        s.sees_holder(n, id, &held.node, held.token).await;
    }
    tokio::time::sleep(SETTLE).await;
    assert_eq!(runners(&all, id), vec![held.node.clone()], "{}", s.name);
    assert_eq!(s.probe.starts(id).len(), 1, "{}: {:?}", s.name, s.probe);
    // The waiting nodes leave first: the holder's instance runs on.
    for (i, n) in nodes.iter().enumerate() {
        if i != held.index {
            n.shutdown().await;
        }
    }
    nodes[held.index].shutdown().await;
    let stops = s.probe.stops(id);
    assert_eq!(stops.len(), 1, "{}: {:?}", s.name, s.probe);
    assert_eq!(stops[0].node, held.node, "{}", s.name);
    assert_eq!(
        stops[0].reason(),
        Some(&ShutdownReason::NodeShutdown),
        "{}",
        s.name
    );
    s.probe.assert_one_at_a_time();
}

/// The holder shuts down: its instance stops with `NodeShutdown` before
/// the shutdown returns, and a waiting node takes over with a larger token
/// (twice over, until one node is left); every node left sees the new
/// holder.
pub async fn graceful_handoff(fixture: &dyn Fixture) {
    let s = Scene::new(fixture, "graceful-handoff");
    let id = "solo";
    let mut rest = s.start_all(&["a", "b", "c"], &one(id)).await;
    let mut held = holder(&refs(&rest), id, GUARD).await;
    s.probe.wait_start(&held.node, id).await;
    while rest.len() > 1 {
        let gone = rest.remove(held.index);
        gone.shutdown().await;
        assert_eq!(
            s.probe
                .stopped(id, &held.node, &ShutdownReason::NodeShutdown),
            1,
            "{}: {:?}",
            s.name,
            s.probe
        );
        assert_eq!(
            gone.status().get(id),
            Some(&SingletonState::Stopped),
            "{}",
            s.name
        );
        let next = holder(&refs(&rest), id, GUARD).await;
        assert!(
            next.token > held.token,
            "{}: token {} after {}",
            s.name,
            next.token,
            held.token
        );
        s.probe.wait_start(&next.node, id).await;
        for n in &rest {
            s.sees_holder(n, id, &next.node, next.token).await;
        }
        held = next;
    }
    rest[0].shutdown().await;
    assert_eq!(s.probe.starts(id).len(), 3, "{}: {:?}", s.name, s.probe);
    assert!(
        s.probe
            .stops(id)
            .iter()
            .all(|e| e.reason() == Some(&ShutdownReason::NodeShutdown)),
        "{}: {:?}",
        s.name,
        s.probe
    );
    s.probe.assert_one_at_a_time();
}

/// The holder crashes: nothing runs its `terminate`, and another node takes
/// over with a larger token (twice over, until one node is left).
pub async fn takeover_after_a_crash(fixture: &dyn Fixture) {
    let s = Scene::new(fixture, "crash-takeover");
    let id = "solo";
    let mut rest = s.start_all(&["a", "b", "c"], &one(id)).await;
    let mut crashed = Vec::new();
    let mut held = holder(&refs(&rest), id, GUARD).await;
    s.probe.wait_start(&held.node, id).await;
    while rest.len() > 1 {
        crashed.push(held.node.clone());
        s.crash(rest.remove(held.index));
        let next = holder(&refs(&rest), id, GUARD).await;
        assert!(
            !crashed.contains(&next.node),
            "{}: {} crashed",
            s.name,
            next.node
        );
        assert!(
            next.token > held.token,
            "{}: token {} after {}",
            s.name,
            next.token,
            held.token
        );
        s.probe.wait_start(&next.node, id).await;
        held = next;
    }
    let stopped = s.probe.filter(|e| e.is_stop() && crashed.contains(&e.node));
    assert!(
        stopped.is_empty(),
        "{}: a crash runs no terminate: {stopped:?}",
        s.name
    );
    rest[0].shutdown().await;
    s.probe.assert_one_at_a_time();
}

/// Of two ids on one node, one is stepped down: a waiting node takes that
/// one over at once, the other stays; an unknown id is an error.
pub async fn step_down_hands_over_only_that_id(fixture: &dyn Fixture) {
    let s = Scene::new(fixture, "step-down");
    let ids = vec!["x".to_string(), "y".to_string()];
    let a = s.start("a", &ids).await;
    s.wait_started("a", &ids).await;
    let b = s.start("b", &ids).await;
    within(
        &format!("{}: b waiting for x and y", s.name),
        GUARD,
        b.wait_until(|st| is_waiting(st, "x") && is_waiting(st, "y")),
    )
    .await;
    a.step_down("x").expect("x runs on a");
    s.probe.wait_start("b", "x").await;
    assert_eq!(
        s.probe.stopped("x", "a", &ShutdownReason::Stepdown),
        1,
        "{}: {:?}",
        s.name,
        s.probe
    );
    tokio::time::sleep(SETTLE).await;
    assert!(a.status().is_running("y"), "{}", s.name);
    assert!(is_waiting(&b.status(), "y"), "{}", s.name);
    assert_eq!(s.probe.stops("y").len(), 0, "{}: {:?}", s.name, s.probe);
    assert!(a.step_down("nope").is_err(), "{}", s.name);
    a.shutdown().await;
    s.probe.wait_start("b", "y").await;
    b.shutdown().await;
    s.probe.assert_one_at_a_time();
}

/// Two nodes hand the id to each other four times, the holder each time
/// shut down and started again under its name: every tenure's token is
/// larger than the one before, and each instance saw the token its node's
/// status shows.
pub async fn tokens_grow_across_tenures(fixture: &dyn Fixture) {
    let s = Scene::new(fixture, "tokens-grow");
    let id = "solo";
    let ids = one(id);
    let mut nodes = vec![s.start("a", &ids).await];
    within(
        &format!("{}: a running", s.name),
        GUARD,
        nodes[0].wait_until(|st| st.is_running(id)),
    )
    .await;
    nodes.push(s.start("b", &ids).await);
    let mut tenures: Vec<Holding> = Vec::new();
    for _ in 0..4 {
        let held = holder(&refs(&nodes), id, GUARD).await;
        s.probe
            .wait_for(
                &format!(
                    "{}: {} started with token {}",
                    s.name, held.node, held.token
                ),
                |events| {
                    events
                        .iter()
                        .any(|e| e.is_start() && e.node == held.node && e.token == held.token)
                },
            )
            .await;
        nodes[held.index].shutdown().await;
        nodes[held.index] = s.start(&held.node, &ids).await;
        tenures.push(held);
    }
    let last = holder(&refs(&nodes), id, GUARD).await;
    // The waiting node leaves first: no further tenure begins.
    nodes[1 - last.index].shutdown().await;
    nodes[last.index].shutdown().await;
    tenures.push(last);
    let tokens: Vec<u64> = tenures.iter().map(|h| h.token).collect();
    assert!(
        tokens.windows(2).all(|w| w[1] > w[0]),
        "{}: tokens {tokens:?}",
        s.name
    );
    let started: Vec<u64> = s.probe.starts(id).iter().map(|e| e.token).collect();
    assert_eq!(started, tokens, "{}: {:?}", s.name, s.probe);
    s.probe.assert_one_at_a_time();
}

/// 200 ids (with `/` in them, as per-tenant ids have) on three nodes: each
/// runs on exactly one node and starts once. The busiest node crashes: every
/// id of it moves, and each id again runs exactly once.
pub async fn many_ids_run_once_each(fixture: &dyn Fixture) {
    let s = Scene::new(fixture, "many-ids");
    let ids: Vec<String> = (0..200).map(|i| format!("tenant/{i}")).collect();
    let mut nodes = s.start_all(&["a", "b", "c"], &ids).await;
    let settled = |nodes: &[&RuntimeHandle]| {
        total_running(nodes) == ids.len()
            && nodes.iter().all(|n| {
                n.status().singletons.iter().all(|x| {
                    matches!(
                        x.state,
                        SingletonState::Running { .. } | SingletonState::Waiting { .. }
                    )
                })
            })
    };
    let all = refs(&nodes);
    wait_all(
        &all,
        &format!("{}: every id running once, the rest waiting", s.name),
        GUARD,
        || settled(&all),
    )
    .await;
    s.wait_starts(ids.len()).await;
    tokio::time::sleep(SETTLE).await;
    for id in &ids {
        assert_eq!(runners(&all, id).len(), 1, "{}: `{id}`", s.name);
    }
    let starts = s.probe.filter(|e| e.is_start()).len();
    assert_eq!(starts, ids.len(), "{}: {:?}", s.name, s.probe);
    assert!(
        s.probe.filter(|e| e.is_stop()).is_empty(),
        "{}: {:?}",
        s.name,
        s.probe
    );

    let busiest = (0..nodes.len())
        .max_by_key(|&i| nodes[i].status().running().count())
        .expect("three nodes");
    let moved = nodes[busiest].status().running().count();
    assert!(moved > 0, "{}", s.name);
    s.crash(nodes.remove(busiest));
    let rest = refs(&nodes);
    wait_all(
        &rest,
        &format!("{}: every id running again after the crash", s.name),
        GUARD,
        || settled(&rest),
    )
    .await;
    s.wait_starts(ids.len() + moved).await;
    for id in &ids {
        assert_eq!(runners(&rest, id).len(), 1, "{}: `{id}`", s.name);
    }
    let starts = s.probe.filter(|e| e.is_start()).len();
    assert_eq!(starts, ids.len() + moved, "{}: {:?}", s.name, s.probe);
    for n in &nodes {
        n.shutdown().await;
    }
    s.probe.assert_one_at_a_time();
}

/// A node holding five ids whose `terminate` takes a while shuts down:
/// when the shutdown returns every instance has stopped with
/// `NodeShutdown` and shows `Stopped`; the waiting node takes every id over,
/// and its own shutdown stops all of them too.
pub async fn shutdown_stops_every_instance(fixture: &dyn Fixture) {
    let s = Scene::new(fixture, "shutdown");
    let ids: Vec<String> = (0..5).map(|i| format!("job-{i}")).collect();
    let stop = Duration::from_millis(100);
    let a = s.start_with("a", &ids, stop).await;
    s.wait_started("a", &ids).await;
    let b = s.start_with("b", &ids, stop).await;
    within(
        &format!("{}: b waiting for every id", s.name),
        GUARD,
        b.wait_until(|st| ids.iter().all(|id| is_waiting(st, id))),
    )
    .await;
    for (node, handle) in [("a", &a), ("b", &b)] {
        s.wait_started(node, &ids).await;
        handle.shutdown().await;
        for id in &ids {
            assert_eq!(
                s.probe.stopped(id, node, &ShutdownReason::NodeShutdown),
                1,
                "{}: `{id}` on {node}: {:?}",
                s.name,
                s.probe
            );
            assert_eq!(
                handle.status().get(id),
                Some(&SingletonState::Stopped),
                "{}",
                s.name
            );
        }
    }
    assert_eq!(
        s.probe.filter(|e| e.is_start()).len(),
        2 * ids.len(),
        "{}: {:?}",
        s.name,
        s.probe
    );
    s.probe.assert_one_at_a_time();
}
