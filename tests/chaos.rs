//! Short seeded chaos runs of every backend (the long runs and their last
//! results are in `docs/chaos.md`). Each run fails with the offending pair
//! when the checker finds a broken promise; the checker itself is tested on
//! hand-made bad histories in `highlander_tests::chaos::checker`.
//!
//! The default mix has joins, leaves and drains in it; the `*_rebalance_*`
//! runs turn rebalancing on, so that joins, resumes and returns move ids,
//! with every kind of fault in the mix: on the AP backends a split's
//! overlap must still end by the heal rule (`conflict`), never by a
//! rebalancing handoff (`moved`).

use highlander_tests::chaos::history::End;
use highlander_tests::chaos::{Backend, FaultKind, RunConfig, run};

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn chaos(backend: Backend, faults: usize, seed: u64) {
    chaos_with(backend, faults, seed, |_| {}).await;
}

async fn chaos_with(backend: Backend, faults: usize, seed: u64, tune: impl FnOnce(&mut RunConfig)) {
    let _turn = TURN.lock().await;
    let mut cfg = RunConfig::new(backend, faults, seed, env!("CARGO_BIN_EXE_node").into());
    cfg.quick = true;
    tune(&mut cfg);
    let outcome = run(&cfg).await;
    println!("{}", outcome.summary());
    assert_eq!(
        outcome.history.faults.len(),
        faults,
        "every fault was injected"
    );
    assert!(outcome.verdict.passed(), "{}", outcome.summary());
    if cfg.kinds.is_none() || cfg.rebalance {
        // Joins, leaves and drains were in it, and did something.
        let kinds: Vec<FaultKind> = outcome.history.faults.iter().map(|f| f.kind).collect();
        for k in [FaultKind::Leave, FaultKind::Drain] {
            assert!(kinds.contains(&k), "a {k} in the mix: {kinds:?}");
        }
        assert!(
            cfg.netns || kinds.contains(&FaultKind::Join),
            "a join in the mix: {kinds:?}"
        );
    }
    if cfg.rebalance {
        let moved = outcome
            .history
            .tenures()
            .iter()
            .filter(|t| t.how == End::Stopped("moved".into()))
            .count();
        assert!(moved > 0, "rebalancing or a drain moved an id");
        doctored_moves_fail(&outcome);
    }
}

/// The membership rules fail this real history once it is doctored: a
/// moved id's next tenure put on the node it moved from, and a tenure begun
/// on a node while it was drained.
fn doctored_moves_fail(outcome: &highlander_tests::chaos::Outcome) {
    use highlander_tests::chaos::check;
    use highlander_tests::process::{Event, EventKind};
    let tenures = outcome.history.tenures();
    let model = outcome.model;
    let rules = |h: &highlander_tests::chaos::History| -> Vec<&'static str> {
        check(h, model, &outcome.bounds)
            .violations
            .iter()
            .map(|v| v.rule)
            .collect()
    };
    // The first move followed by a tenure of the id elsewhere: that tenure,
    // as if the node it moved from had run it.
    let (moved_from, next) = tenures
        .iter()
        .filter(|t| t.how == End::Stopped("moved".into()))
        .find_map(|t| {
            tenures
                .iter()
                .filter(|n| n.id == t.id && n.start >= t.end)
                .min_by_key(|n| n.start)
                .map(|n| (t.node.clone(), n.clone()))
        })
        .expect("a moved id ran again");
    let mut h = outcome.history.clone();
    for e in h
        .events
        .iter_mut()
        .filter(|e| e.id == next.id && e.node == next.node && e.token == next.token)
    {
        e.node = moved_from.clone();
    }
    assert!(rules(&h).contains(&"handoff"), "{:?}", rules(&h));
    // A drained node that claims: a tenure of a new token in its drain.
    let drain = outcome
        .history
        .faults
        .iter()
        .find(|f| f.kind == FaultKind::Drain && f.drained.is_some_and(|d| d + 2_000_000 < f.until))
        .expect("a drain that held the node empty for a while");
    let node = drain.node.clone().expect("a drain has a node");
    let at = drain.drained.expect("just checked") + 1_000_000;
    let mut h = outcome.history.clone();
    for (kind, at, reason) in [
        (EventKind::Start, at, None),
        (EventKind::Stop, at + 100_000, Some("moved".to_string())),
    ] {
        h.events.push(Event {
            kind,
            at_nanos: at,
            node: node.clone(),
            id: "chaos-doctored".into(),
            token: u64::MAX,
            reason,
        });
    }
    assert!(rules(&h).contains(&"drain"), "{:?}", rules(&h));
}

/// Rebalancing on, with the default mix: membership faults, crashes,
/// pauses, partitions and backend restarts.
async fn rebalancing(backend: Backend, faults: usize, seed: u64) {
    chaos_with(backend, faults, seed, |cfg| cfg.rebalance = true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_chaos() {
    chaos(Backend::Memory, 40, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_chaos() {
    chaos(Backend::Postgres, 24, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_chaos() {
    chaos(Backend::Etcd, 16, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_chaos() {
    chaos(Backend::Cluster, 24, 7).await;
}

/// The cluster with every node in a network namespace of its own: the
/// partitions are packets dropped by the kernel (`iptables`), not a proxy
/// of the harness. Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_netns_chaos() {
    chaos_with(Backend::Cluster, 24, 7, |cfg| cfg.netns = true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_rebalance_chaos() {
    rebalancing(Backend::Memory, 20, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rebalance_chaos() {
    rebalancing(Backend::Postgres, 12, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_rebalance_chaos() {
    rebalancing(Backend::Etcd, 12, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_rebalance_chaos() {
    rebalancing(Backend::Cluster, 12, 5).await;
}

/// The checker fails a real recorded history once it is doctored: the
/// second tenure of an id moved to begin while the first still ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doctored_history_fails_the_check() {
    use highlander_tests::chaos::{Model, check};
    use highlander_tests::process::EventKind;
    let _turn = TURN.lock().await;
    let mut cfg = RunConfig::new(Backend::Memory, 6, 3, env!("CARGO_BIN_EXE_node").into());
    cfg.kinds = Some(vec![FaultKind::Kill]);
    cfg.always_holder = true;
    let outcome = run(&cfg).await;
    assert!(outcome.verdict.passed(), "{}", outcome.summary());
    let mut history = outcome.history.clone();
    let tenures: Vec<_> = history
        .tenures()
        .into_iter()
        .filter(|t| t.id == "chaos-0")
        .collect();
    assert!(tenures.len() >= 2, "a kill of the holder moved chaos-0");
    let (first, second) = (&tenures[0], &tenures[1]);
    let start = history
        .events
        .iter_mut()
        .find(|e| {
            e.kind == EventKind::Start
                && e.id == second.id
                && e.node == second.node
                && e.token == second.token
        })
        .expect("the second tenure's START");
    start.at_nanos = first.start + (first.end - first.start) / 2;
    for model in [Model::Cp, Model::Ap] {
        let verdict = check(&history, model, &outcome.bounds);
        assert!(
            verdict.violations.iter().any(|v| v.rule == "overlap"),
            "{model:?}: {:?}",
            verdict.violations
        );
    }
}
