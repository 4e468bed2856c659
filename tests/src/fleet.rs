//! The fleet scenarios (`highlander_tests::fleet`): placement, rebalancing,
//! drain, transfer, weights, ids added and removed under load, and nodes
//! that run different ids, generic over the backend fixtures of
//! [`conformance`](crate::conformance). `tests/fleet.rs` runs them on every
//! backend.
//!
//! What they check is behaviour: shares, which instance stopped with which
//! reason, that every moved id runs again, and (on a backend that promises
//! it) that no id ever runs twice at once. Times are hang guards only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use highlander::placement::{Affinity, Candidate, place};
use highlander::{Runtime, RuntimeHandle, ShutdownReason, SingletonState};

use crate::conformance::{Fixture, Space};
use crate::probe::Probe;
use crate::wait::{wait_until, within};

/// The hang guard of every wait.
const GUARD: Duration = Duration::from_secs(60);
/// Each instance's shutdown budget: short, and within etcd's test TTL.
const BUDGET: Duration = Duration::from_secs(1);
/// Ids per node in the balance scenarios.
const IDS: usize = 600;

/// Runs every fleet scenario on `fixture`. `exact`: the backend promises
/// that an id never runs on two nodes at once (memory, Postgres, etcd; not
/// the embedded cluster, which is AP).
pub async fn run_all(fixture: &dyn Fixture, exact: bool) {
    crate::init_tracing();
    balanced_bring_up(fixture, exact).await;
    join_rebalances(fixture, exact).await;
    drain_hands_everything_over(fixture, exact).await;
    transfer_moves_one_id(fixture, exact).await;
    weight_zero_gets_nothing(fixture, exact).await;
    add_and_remove_under_load(fixture, exact).await;
    heterogeneous_nodes(fixture, exact).await;
}

/// `n` ids named `prefix/i`.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}/{i}")).collect()
}

/// One scenario: its space, probe, name and nodes.
struct Fleet {
    space: Box<dyn Space>,
    probe: Probe,
    name: String,
    exact: bool,
    nodes: Vec<RuntimeHandle>,
}

impl Fleet {
    fn new(fixture: &dyn Fixture, scenario: &str, exact: bool) -> Fleet {
        let name = format!("{}: fleet {scenario}", fixture.name());
        eprintln!("{name}");
        Fleet {
            space: fixture.space(&format!("fleet-{scenario}")),
            probe: Probe::new(),
            name,
            exact,
            nodes: Vec::new(),
        }
    }

    /// Starts `node` of `weight` with a probe for each of `ids`.
    async fn start(&mut self, node: &str, weight: u32, ids: &[String]) -> RuntimeHandle {
        self.start_with(node, ids, |b| b.weight(weight)).await
    }

    async fn start_with(
        &mut self,
        node: &str,
        ids: &[String],
        f: impl FnOnce(highlander::Builder) -> highlander::Builder,
    ) -> RuntimeHandle {
        let mut builder = f(Runtime::builder()
            .node(node)
            .backend(self.space.backend(node))
            .rebalance(true));
        for id in ids {
            builder = builder.child(self.spec(id));
        }
        let handle = within(
            &format!("{}: {node} started", self.name),
            GUARD,
            builder.start(),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: node {node} does not start: {e}", self.name));
        self.nodes.push(handle.clone());
        handle
    }

    /// The probe's spec for `id`.
    fn spec(&self, id: &str) -> highlander::ChildSpec {
        self.probe.spec(id).shutdown(BUDGET)
    }

    /// Who runs each of `ids` now, from the nodes' status.
    fn runners(&self) -> HashMap<String, Vec<String>> {
        let mut by_id: HashMap<String, Vec<String>> = HashMap::new();
        for n in &self.nodes {
            for (id, _) in n.status().running() {
                by_id
                    .entry(id.to_string())
                    .or_default()
                    .push(n.node().to_string());
            }
        }
        by_id
    }

    /// How many ids each node runs.
    fn shares(&self) -> BTreeMap<String, usize> {
        self.nodes
            .iter()
            .map(|n| (n.node().to_string(), n.status().running().count()))
            .collect()
    }

    /// Waits until each of `ids` runs on exactly one node and `cond` holds
    /// for the shares.
    async fn settle(
        &self,
        what: &str,
        ids: &[String],
        cond: impl Fn(&BTreeMap<String, usize>) -> bool,
    ) {
        let what = format!("{}: {what}", self.name);
        let mut last = String::new();
        let waited = tokio::time::timeout(GUARD, async {
            loop {
                let runners = self.runners();
                let once = ids
                    .iter()
                    .all(|id| runners.get(id).is_some_and(|r| r.len() == 1));
                let shares = self.shares();
                if once && cond(&shares) {
                    return;
                }
                last = format!(
                    "{shares:?}, {} of {} ids run once",
                    ids.iter()
                        .filter(|id| runners.get(*id).is_some_and(|r| r.len() == 1))
                        .count(),
                    ids.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if waited.is_err() {
            panic!("hang guard: not {what} within {GUARD:?}: {last}");
        }
    }

    /// The checks every scenario ends with, and shutdown.
    async fn finish(self) {
        if self.exact {
            self.probe.assert_one_at_a_time();
        }
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}

/// Whether every id of `ids` runs where placement puts it among `nodes`
/// (all of weight 1).
fn at_place(f: &Fleet, ids: &[String], nodes: &[&str]) -> bool {
    let candidates: Vec<Candidate> = nodes.iter().map(|n| Candidate::new(*n, 1)).collect();
    let runners = f.runners();
    ids.iter().all(|id| {
        let best = place(id, &Affinity::default(), &candidates).expect("a candidate");
        runners
            .get(id)
            .is_some_and(|r| r.len() == 1 && r[0] == best.name())
    })
}

/// Whether the probe has caught up with the status: each id of `ids`
/// runs on one node, and its last recorded event is its start there. (A
/// status shows an instance running before its `run` records the start.)
fn recorded(f: &Fleet, ids: &[String]) -> bool {
    let runners = f.runners();
    let events = f.probe.events();
    let mut last: HashMap<&str, &crate::probe::Event> = HashMap::new();
    for e in &events {
        last.insert(&e.id, e);
    }
    ids.iter()
        .all(|id| match (runners.get(id), last.get(id.as_str())) {
            (Some(nodes), Some(e)) => nodes.len() == 1 && e.is_start() && e.node == nodes[0],
            _ => false,
        })
}

fn within_share(count: usize, total: usize, nodes: usize) -> bool {
    let fair = total as f64 / nodes as f64;
    (count as f64 - fair).abs() <= fair * 0.2
}

/// Three nodes started one after the other end up with a third of the ids
/// each (within 20 %): the first one up claims everything, and each join
/// hands the newcomer its share.
pub async fn balanced_bring_up(fixture: &dyn Fixture, exact: bool) {
    let mut f = Fleet::new(fixture, "bring-up", exact);
    let all = ids("tenant", IDS);
    for node in ["a", "b", "c"] {
        f.start(node, 1, &all).await;
    }
    f.settle("balanced over three nodes", &all, |s| {
        s.values().all(|&n| within_share(n, IDS, 3))
    })
    .await;
    wait_until(&format!("{}: every id at its place", f.name), GUARD, || {
        at_place(&f, &all, &["a", "b", "c"])
    })
    .await;
    f.finish().await;
}

/// A fourth node joins three balanced ones: it gets at least 15 % of the
/// ids; every id that moved stopped with `Moved` on its old node (its
/// `terminate` ran: the probe records the stop after it) and runs again.
pub async fn join_rebalances(fixture: &dyn Fixture, exact: bool) {
    let mut f = Fleet::new(fixture, "join", exact);
    let all = ids("tenant", IDS);
    for node in ["a", "b", "c"] {
        f.start(node, 1, &all).await;
    }
    // Every start recorded, so that the events after `before` are the
    // join's alone.
    wait_until(&format!("{}: every id at its place", f.name), GUARD, || {
        at_place(&f, &all, &["a", "b", "c"]) && recorded(&f, &all)
    })
    .await;
    let before = f.probe.events().len();
    f.start("d", 1, &all).await;
    f.settle("the fourth node took its share", &all, |s| {
        s["d"] * 100 >= IDS * 15
    })
    .await;
    wait_until(&format!("{}: every id at its place", f.name), GUARD, || {
        at_place(&f, &all, &["a", "b", "c", "d"])
    })
    .await;
    let events = f.probe.events();
    let moved: Vec<_> = events[before..].iter().filter(|e| e.is_stop()).collect();
    assert!(!moved.is_empty(), "{}: nothing moved", f.name);
    for stop in &moved {
        assert_eq!(
            stop.reason(),
            Some(&ShutdownReason::Moved),
            "{}: {stop}",
            f.name
        );
        assert!(
            events
                .iter()
                .any(|e| e.is_start() && e.id == stop.id && e.at >= stop.at),
            "{}: {} moved and never ran again",
            f.name,
            stop.id
        );
    }
    // Only d gained: no id moved between the old nodes.
    let starts_elsewhere = events[before..]
        .iter()
        .filter(|e| e.is_start() && e.node != "d")
        .count();
    if starts_elsewhere > 0 {
        let first = events[before..]
            .iter()
            .find(|e| e.is_start() && e.node != "d")
            .expect("counted");
        let history: Vec<String> = events
            .iter()
            .filter(|e| e.id == first.id)
            .map(|e| e.to_string())
            .collect();
        panic!(
            "{}: {starts_elsewhere} ids moved between the old nodes, e.g. {history:?}",
            f.name
        );
    }
    f.finish().await;
}

/// A drain hands every id over to the others (each stopped with `Moved`),
/// and the drained node holds nothing.
pub async fn drain_hands_everything_over(fixture: &dyn Fixture, exact: bool) {
    let mut f = Fleet::new(fixture, "drain", exact);
    let all = ids("job", 300);
    for node in ["a", "b", "c"] {
        f.start(node, 1, &all).await;
    }
    f.settle("running", &all, |s| s.values().all(|&n| n > 0))
        .await;
    let b = f.nodes[1].clone();
    let held: HashSet<String> = b.status().running().map(|(id, _)| id.to_string()).collect();
    within(&format!("{}: b drained", f.name), GUARD, b.drain())
        .await
        .expect("the drain completes");
    f.settle("every id on a or c", &all, |s| s["b"] == 0).await;
    for id in &held {
        let stops: Vec<_> = f
            .probe
            .stops(id)
            .into_iter()
            .filter(|e| e.node == "b")
            .collect();
        assert_eq!(stops.len(), 1, "{}: {id}: {stops:?}", f.name);
        assert_eq!(
            stops[0].reason(),
            Some(&ShutdownReason::Moved),
            "{}",
            f.name
        );
    }
    // Resumed, it gets its share back: every id at its place again.
    b.resume();
    wait_until(&format!("{}: b's ids back on b", f.name), GUARD, || {
        at_place(&f, &all, &["a", "b", "c"])
    })
    .await;
    f.finish().await;
}

/// `transfer` moves one id to the named node, and refuses, in one line
/// each, an id not held here, an unknown node and a node that does not run
/// the id.
pub async fn transfer_moves_one_id(fixture: &dyn Fixture, exact: bool) {
    let mut f = Fleet::new(fixture, "transfer", exact);
    let both = ids("shared", 20);
    let mut only_a = both.clone();
    only_a.push("mine".to_string());
    let a = f.start("a", 1, &only_a).await;
    let b = f.start("b", 1, &both).await;
    f.settle("running", &only_a, |_| true).await;
    let (id, from, to) = {
        let runners = f.runners();
        let id = both[0].clone();
        let from = runners[&id][0].clone();
        let to = if from == "a" { "b" } else { "a" };
        (id, from, to.to_string())
    };
    let (holder, other) = if from == "a" { (&a, &b) } else { (&b, &a) };
    // The members' profiles reach the holder's view soon after the start.
    wait_until(&format!("{}: {from} knows {to}", f.name), GUARD, || {
        holder
            .status()
            .members
            .iter()
            .any(|m| m.node == to && m.profile.is_some())
    })
    .await;
    let before = f.probe.stops(&id).len();
    holder.transfer(&id, &to).expect("transfer");
    within(
        &format!("{}: {id} on {to}", f.name),
        GUARD,
        other.wait_until(|s| s.is_running(&id)),
    )
    .await;
    let stops = f.probe.stops(&id);
    assert_eq!(stops.len(), before + 1, "{}: {stops:?}", f.name);
    assert_eq!(stops[before].node, from);
    assert_eq!(stops[before].reason(), Some(&ShutdownReason::Moved));

    // Refusals, one line each (once the old holder has let go).
    within(
        &format!("{}: {from} let {id} go", f.name),
        GUARD,
        holder.wait_until(|s| !s.is_running(&id)),
    )
    .await;
    let not_held = holder.transfer(&id, &to).unwrap_err().to_string();
    assert!(not_held.contains("does not hold it"), "{not_held}");
    let unknown = other.transfer(&id, "zed").unwrap_err().to_string();
    assert!(unknown.contains("no reachable member"), "{unknown}");
    let refused = a.transfer("mine", "b").unwrap_err().to_string();
    assert!(refused.contains("does not run it"), "{refused}");
    for e in [not_held, unknown, refused] {
        assert!(!e.contains('\n'), "{e}");
    }
    f.finish().await;
}

/// A node of weight 0 started first takes everything (liveness first), and
/// gives it all away as nodes of positive weight join.
pub async fn weight_zero_gets_nothing(fixture: &dyn Fixture, exact: bool) {
    let mut f = Fleet::new(fixture, "weight-zero", exact);
    let all = ids("w", 300);
    f.start("standby", 0, &all).await;
    f.settle("the standby runs everything alone", &all, |_| true)
        .await;
    f.start("a", 1, &all).await;
    f.start("b", 1, &all).await;
    f.settle("the standby runs nothing", &all, |s| s["standby"] == 0)
        .await;
    f.finish().await;
}

/// Ids added on every node while they run, then half of them removed
/// everywhere: each added id runs exactly once, each removed one stops
/// (with `Removed`) and runs nowhere.
pub async fn add_and_remove_under_load(fixture: &dyn Fixture, exact: bool) {
    let mut f = Fleet::new(fixture, "add-remove", exact);
    let base = ids("base", 150);
    for node in ["a", "b", "c"] {
        f.start(node, 1, &base).await;
    }
    f.settle("running", &base, |_| true).await;
    let added = ids("added", 300);
    for id in &added {
        for n in &f.nodes {
            n.add(f.spec(id)).expect("add");
        }
    }
    let mut all = base.clone();
    all.extend(added.iter().cloned());
    f.settle("every added id runs once", &all, |s| {
        s.values().all(|&n| within_share(n, all.len(), 3))
    })
    .await;
    let (gone, kept) = added.split_at(150);
    for id in gone {
        for n in &f.nodes {
            within(&format!("{}: {id} removed", f.name), GUARD, n.remove(id))
                .await
                .expect("remove");
        }
    }
    let mut left = base.clone();
    left.extend(kept.iter().cloned());
    f.settle("the rest runs once", &left, |_| true).await;
    let runners = f.runners();
    for id in gone {
        assert!(!runners.contains_key(id), "{}: {id} still runs", f.name);
        let stops = f.probe.stops(id);
        assert_eq!(
            stops.last().and_then(|e| e.reason()),
            Some(&ShutdownReason::Removed),
            "{}: {id}: {stops:?}",
            f.name
        );
    }
    f.finish().await;
}

/// Nodes that run different ids: an id only one node runs goes there at
/// once, though that node started last and defers long on shared ids, and
/// never moves; shared ids balance over the nodes that run them.
pub async fn heterogeneous_nodes(fixture: &dyn Fixture, exact: bool) {
    let mut f = Fleet::new(fixture, "heterogeneous", exact);
    let shared = ids("shared", 150);
    let own = ids("own", 30);
    let grace = Duration::from_secs(30);
    f.start_with("b", &shared, |b| b.placement_grace(grace))
        .await;
    f.start_with("c", &shared, |b| b.placement_grace(grace))
        .await;
    f.settle("shared ids run", &shared, |_| true).await;
    let mut a_ids = shared.clone();
    a_ids.extend(own.iter().cloned());
    let a = f
        .start_with("a", &a_ids, |b| b.placement_grace(grace))
        .await;
    // Its own ids are not deferred: a is the only candidate.
    within(
        &format!("{}: a runs its own ids", f.name),
        Duration::from_secs(10),
        a.wait_until(|s| own.iter().all(|id| s.is_running(id))),
    )
    .await;
    f.settle("balanced over three nodes", &a_ids, |s| {
        s["a"] >= own.len() + shared.len() / 6
    })
    .await;
    for id in &own {
        assert!(f.probe.stops(id).is_empty(), "{}: {id} moved", f.name);
        assert!(
            !matches!(a.status().get(id), Some(SingletonState::Waiting { .. })),
            "{}",
            f.name
        );
    }
    f.finish().await;
}
