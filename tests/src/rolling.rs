//! A rolling restart of `node` processes, the most common operation of all:
//! each node in turn gets SIGTERM, is waited for, and is started again under
//! the same name, while its ids move to the others. Shared by the
//! `rolling` test (which asserts what must hold) and the `bench_rolling`
//! benchmark (which prints the distributions).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::process::{Event, EventKind, Fleet, NodeProcess};

/// One node of the rolling restart: its name and its `HIGHLANDER_BACKEND`.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// `HIGHLANDER_NODE`.
    pub name: String,
    /// `HIGHLANDER_BACKEND` for this node (the cluster backend gives each
    /// node its own listen address).
    pub url: String,
}

impl NodeSpec {
    /// Nodes named `names` that all use `url` (Postgres, etcd).
    pub fn same_url(names: &[&str], url: &str) -> Vec<NodeSpec> {
        names
            .iter()
            .map(|n| NodeSpec {
                name: n.to_string(),
                url: url.to_string(),
            })
            .collect()
    }
}

/// What one step (one node restarted) did.
#[derive(Debug, Clone)]
pub struct Step {
    /// The node that was restarted.
    pub node: String,
    /// Ids the node ran when it got SIGTERM.
    pub held: usize,
    /// Ids that changed holder during the step.
    pub moved: usize,
    /// For each moved id, from the old instance's stop to the new one's
    /// start, in milliseconds (0 when the new one started first, which only
    /// an AP backend may do).
    pub unowned_ms: Vec<f64>,
    /// Ids that had two running tenures at one instant during the step,
    /// judged on the one clock every process on the host shares.
    pub ran_twice: Vec<String>,
    /// How long until every id ran again after the SIGTERM, in milliseconds.
    pub all_running_after_ms: f64,
}

/// Tracks who runs which id from the merged event stream. START and STOP of
/// one (id, node) come from one pipe in order, so the per-node view is
/// always consistent even though pipes interleave.
#[derive(Default)]
struct Running {
    by_id: HashMap<String, HashSet<String>>,
}

impl Running {
    fn apply(&mut self, e: &Event) {
        let nodes = self.by_id.entry(e.id.clone()).or_default();
        match e.kind {
            EventKind::Start => {
                nodes.insert(e.node.clone());
            }
            EventKind::Stop => {
                nodes.remove(&e.node);
            }
        }
    }

    fn all_running(&self, ids: usize, except: Option<&str>) -> bool {
        self.by_id.len() == ids
            && self
                .by_id
                .values()
                .all(|nodes| nodes.iter().any(|n| Some(n.as_str()) != except))
    }

    fn held_by(&self, node: &str) -> usize {
        self.by_id.values().filter(|n| n.contains(node)).count()
    }
}

/// Reads events into `running` until `done` holds; panics after `guard`
/// with what is missing (a guard against hangs, not a timing assertion).
async fn until(
    fleet: &mut Fleet,
    running: &mut Running,
    guard: Duration,
    what: &str,
    mut done: impl FnMut(&Running) -> bool,
) {
    let deadline = tokio::time::Instant::now() + guard;
    while !done(running) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            let idle: Vec<&String> = running
                .by_id
                .iter()
                .filter(|(_, n)| n.is_empty())
                .map(|(id, _)| id)
                .take(10)
                .collect();
            panic!(
                "{what}: not reached within {guard:?}; {} ids known, unowned (first 10): {idle:?}",
                running.by_id.len()
            );
        }
        if let Some(e) = fleet.next_event(left.min(Duration::from_millis(100))).await {
            running.apply(&e);
        }
    }
}

/// Starts `nodes` (each running the fleet's ids), waits until all `ids`
/// run, then restarts each node in turn and reports every step. Every node
/// is stopped with SIGTERM at the end.
pub async fn rolling_restart(
    fleet: &mut Fleet,
    nodes: &[NodeSpec],
    ids: usize,
    guard: Duration,
) -> Vec<Step> {
    let mut procs: Vec<NodeProcess> = Vec::new();
    for n in nodes {
        procs.push(
            fleet
                .spawn(&n.name, &[("HIGHLANDER_BACKEND", &n.url)])
                .await,
        );
    }
    let mut running = Running::default();
    until(
        fleet,
        &mut running,
        guard,
        "all ids running at start",
        |r| r.all_running(ids, None),
    )
    .await;

    let mut steps = Vec::new();
    for (i, spec) in nodes.iter().enumerate() {
        let from = fleet.history.len();
        let held = running.held_by(&spec.name);
        let t0 = crate::unix_nanos();
        procs[i].signal("TERM");
        let status = procs[i].wait_exit(guard).await;
        assert!(status.success(), "node {} exited with {status}", spec.name);
        until(fleet, &mut running, guard, "every id running again", |r| {
            r.all_running(ids, Some(&spec.name))
        })
        .await;
        let all_running_after_ms = crate::bench::ms(
            fleet
                .history
                .last()
                .map(|e| e.at_nanos.saturating_sub(t0))
                .unwrap_or(0),
        );
        procs[i] = fleet
            .spawn(&spec.name, &[("HIGHLANDER_BACKEND", &spec.url)])
            .await;
        // Let the newcomer settle (it may start nothing, or, on a backend
        // that places ids, take some back) before the next step.
        fleet.drain(Duration::from_millis(300)).await;
        // `drain` recorded events without applying them: replay the history.
        running = Running::default();
        for e in &fleet.history {
            running.apply(e);
        }
        let mut step = judge(&fleet.history[from..], &spec.name);
        step.held = held;
        step.all_running_after_ms = all_running_after_ms;
        steps.push(step);
    }
    for p in &mut procs {
        p.signal("TERM");
    }
    for p in &mut procs {
        let _ = p.wait_exit(guard).await;
    }
    steps
}

/// Replays one step's events in time order: which ids moved, for how long
/// each was unowned, and which ran twice at one instant.
fn judge(events: &[Event], node: &str) -> Step {
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| (e.at_nanos, matches!(e.kind, EventKind::Start)));
    let mut open: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut stopped_at: HashMap<&str, u128> = HashMap::new();
    let mut twice: HashSet<String> = HashSet::new();
    let mut unowned_ms = Vec::new();
    let mut moved: HashSet<&str> = HashSet::new();
    for e in sorted {
        let nodes = open.entry(e.id.as_str()).or_default();
        match e.kind {
            EventKind::Stop => {
                nodes.remove(e.node.as_str());
                if e.node == node {
                    stopped_at.insert(e.id.as_str(), e.at_nanos);
                }
            }
            EventKind::Start => {
                if nodes.iter().any(|n| *n != e.node) {
                    twice.insert(e.id.clone());
                }
                nodes.insert(e.node.as_str());
                if e.node != node && moved.insert(e.id.as_str()) {
                    let gap = stopped_at
                        .get(e.id.as_str())
                        .map(|stop| e.at_nanos.saturating_sub(*stop))
                        .unwrap_or(0);
                    unowned_ms.push(crate::bench::ms(gap));
                }
            }
        }
    }
    let mut ran_twice: Vec<String> = twice.into_iter().collect();
    ran_twice.sort();
    Step {
        node: node.to_string(),
        held: 0,
        moved: moved.len(),
        unowned_ms,
        ran_twice,
        all_running_after_ms: 0.0,
    }
}

/// Prints the steps as the benchmark and the test's output show them.
pub fn print(backend: &str, steps: &[Step]) {
    for s in steps {
        crate::bench::report(
            &format!(
                "{backend}: restart {} (held {}, moved {})",
                s.node, s.held, s.moved
            ),
            &s.unowned_ms,
        );
        println!(
            "{:<48} all running again {:.1} ms after SIGTERM; ran twice: {}",
            "",
            s.all_running_after_ms,
            s.ran_twice.len()
        );
    }
}
