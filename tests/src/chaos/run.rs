//! The driver loop: starts the nodes through a driver (node processes on a
//! real backend in [`processes`](super::processes), or runtimes in this
//! process for the memory backend in [`memory`](super::memory)), injects
//! the faults of the schedule, and hands the recorded history to the
//! checker.

use std::time::{Duration, Instant};

use super::checker::{Violation, check};
use super::config::{Backend, Outcome, RunConfig};
use super::history::{End, Exit, Fault, FaultKind, FenceWrite, History};
use super::memory::MemoryDriver;
use super::processes::ProcessDriver;
use super::schedule::{Step, schedule};
use crate::process::Event;
use crate::unix_nanos;

/// With rebalancing on, how long the driver lets the fleet be after each
/// fault before it waits for one holder per id again: the members settle
/// for 300 ms, then the handoffs run.
const REBALANCE_REST: Duration = Duration::from_millis(1000);

/// Runs one seeded chaos run and checks it.
pub async fn run(cfg: &RunConfig) -> Outcome {
    let began = Instant::now();
    let mut weights = cfg.backend.weights();
    if let Some(only) = &cfg.kinds {
        weights.retain(|(k, _)| only.contains(k));
    }
    if cfg.netns {
        // The namespaces are made once, for the starting nodes.
        weights.retain(|(k, _)| *k != FaultKind::Join);
    }
    let steps = schedule(
        cfg.seed,
        cfg.faults,
        &weights,
        cfg.backend.hold(cfg.quick),
        cfg.nodes,
    );
    let bounds = cfg.backend.bounds(cfg.slack);
    let (history, mut problems) = match cfg.backend {
        Backend::Memory => drive(MemoryDriver::start(cfg).await, cfg, &steps).await,
        _ => drive(ProcessDriver::start(cfg).await, cfg, &steps).await,
    };
    let mut verdict = check(&history, cfg.backend.model(), &bounds);
    verdict.violations.append(&mut problems);
    Outcome {
        backend: cfg.backend,
        model: cfg.backend.model(),
        bounds,
        steps,
        history,
        verdict,
        elapsed: began.elapsed(),
    }
}

/// What a driver can do to its nodes.
pub(super) trait Driver {
    /// The nodes in the fleet now, sorted.
    fn nodes(&self) -> Vec<String>;
    /// Moves what the nodes reported into the recorded events.
    async fn collect(&mut self, wait: Duration);
    fn events(&self) -> &[Event];
    async fn kill(&mut self, node: &str) -> Fault;
    async fn pause(&mut self, node: &str, hold: Duration) -> Fault;
    async fn restart(&mut self, node: &str) -> (Fault, Option<String>);
    async fn partition(&mut self, node: &str, hold: Duration) -> Fault;
    async fn backend_restart(&mut self) -> Fault;
    /// Starts a node under a name not used before; it stays.
    async fn join(&mut self) -> Fault;
    /// Shuts `node` down gracefully for good; what went wrong if it did
    /// not exit cleanly.
    async fn leave(&mut self, node: &str) -> (Fault, Option<String>);
    /// Drains `node`, waits until it holds nothing (the fault's
    /// `drained`), then `hold`, then resumes it.
    async fn drain(&mut self, node: &str, hold: Duration) -> Fault;
    async fn shutdown(&mut self) -> Vec<Exit>;
    fn writes(&self) -> Vec<FenceWrite>;
}

fn snapshot<D: Driver>(d: &D, ids: &[String], faults: &[Fault]) -> History {
    History {
        ids: ids.to_vec(),
        events: d.events().to_vec(),
        faults: faults.to_vec(),
        writes: Vec::new(),
        shutdown_at: u128::MAX,
        end: unix_nanos(),
        exits: Vec::new(),
    }
}

/// Whether every id has exactly one holder now.
fn settled<D: Driver>(d: &D, ids: &[String], faults: &[Fault]) -> bool {
    let h = snapshot(d, ids, faults);
    ids.iter().all(|id| holders(&h, id).len() == 1)
}

/// With rebalancing on, a change of members moves ids once the members
/// have been still for 300 ms: let that happen before the next fault, so
/// that each fault's moves are its own.
async fn rest<D: Driver>(d: &mut D, cfg: &RunConfig, faults: &[Fault]) {
    if !cfg.rebalance {
        return;
    }
    d.collect(REBALANCE_REST).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !settled(d, &cfg.ids, faults) && Instant::now() < deadline {
        d.collect(Duration::from_millis(20)).await;
    }
}

/// The node holding `id` now, if exactly one does.
fn holders(history: &History, id: &str) -> Vec<String> {
    history
        .tenures()
        .into_iter()
        .filter(|t| t.id == id && t.how == End::Open)
        .map(|t| t.node)
        .collect()
}

async fn drive<D: Driver>(mut d: D, cfg: &RunConfig, steps: &[Step]) -> (History, Vec<Violation>) {
    let mut faults: Vec<Fault> = Vec::new();
    let mut problems = Vec::new();
    let mut exits = Vec::new();
    let guard = Duration::from_secs(90);
    let settled = |d: &D, faults: &[Fault]| settled(d, &cfg.ids, faults);
    // Everyone up, each id running once.
    let deadline = Instant::now() + guard;
    while !settled(&d, &faults) && Instant::now() < deadline {
        d.collect(Duration::from_millis(50)).await;
    }
    rest(&mut d, cfg, &faults).await;
    for (i, step) in steps.iter().enumerate() {
        let nodes = d.nodes();
        let h = snapshot(&d, &cfg.ids, &faults);
        let holder = holders(&h, &cfg.ids[0]).into_iter().next();
        let target = match (step.at_holder || cfg.always_holder, holder) {
            (true, Some(h)) => h,
            _ => nodes[step.node_pick % nodes.len()].clone(),
        };
        let fault = match step.kind {
            FaultKind::Kill => d.kill(&target).await,
            FaultKind::Pause => d.pause(&target, step.hold).await,
            FaultKind::Restart => {
                let (fault, problem) = d.restart(&target).await;
                exits.push(Exit {
                    node: target.clone(),
                    problem,
                });
                fault
            }
            FaultKind::Partition => d.partition(&target, step.hold).await,
            FaultKind::BackendRestart => d.backend_restart().await,
            FaultKind::Join => d.join().await,
            FaultKind::Leave => {
                let (fault, problem) = d.leave(&target).await;
                exits.push(Exit {
                    node: target.clone(),
                    problem,
                });
                fault
            }
            FaultKind::Drain => d.drain(&target, step.hold).await,
        };
        if cfg.verbose {
            eprintln!(
                "fault {:>3}/{}: {} {} for {:.0} ms",
                i + 1,
                steps.len(),
                fault.kind,
                fault.node.as_deref().unwrap_or("backend"),
                (fault.until - fault.at) as f64 / 1e6
            );
        }
        faults.push(fault);
        let deadline = Instant::now() + guard;
        loop {
            d.collect(Duration::from_millis(20)).await;
            if settled(&d, &faults) {
                break;
            }
            if Instant::now() > deadline {
                problems.push(Violation {
                    rule: "stuck",
                    detail: format!(
                        "not exactly one holder per id {guard:?} after fault {} ({} of {})",
                        i + 1,
                        step.kind,
                        target
                    ),
                });
                break;
            }
        }
        if problems.iter().any(|p| p.rule == "stuck") {
            break;
        }
        rest(&mut d, cfg, &faults).await;
        d.collect(step.settle).await;
    }
    d.collect(Duration::from_millis(300)).await;
    let shutdown_at = unix_nanos();
    exits.extend(d.shutdown().await);
    d.collect(Duration::from_millis(300)).await;
    let history = History {
        ids: cfg.ids.clone(),
        events: d.events().to_vec(),
        faults,
        writes: d.writes(),
        shutdown_at,
        end: unix_nanos(),
        exits,
    };
    (history, problems)
}
