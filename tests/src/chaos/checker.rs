//! The history checker: the properties each kind of backend promises,
//! checked on one recorded [`History`].
//!
//! - **CP** (postgres, etcd): no two tenures of one id overlap by more than
//!   the clock error; tokens strictly grow with tenure start; no fenced
//!   write is accepted from a token older than a tenure that had already
//!   begun. One overlap is excused, because no protocol can prevent it: a
//!   holder that was paused (SIGSTOP) past its lease may run on for a moment
//!   after SIGCONT before it sees that its lease is gone (the "pause between
//!   check and side effect" of `docs/safety.md`); it must stop
//!   within [`Bounds::wake_grace`], and the fence must keep its writes out.
//! - **AP** (cluster, memory with partitions): two tenures of one id overlap
//!   only if the later one began while a partition or pause was in force
//!   (or within [`Bounds::heal`] after it was undone: a node woken from
//!   SIGSTOP may act on its stale view of the others for a moment), the
//!   overlap ends within [`Bounds::heal`] after that fault was undone,
//!   and the instance that stopped did so with reason `conflict`.
//! - **All**: every stretch of time in which an id had no tenure began
//!   after a fault and ended within that fault's failover allowance after
//!   the fault was undone; tokens never repeat for an id; every node shut
//!   down cleanly at the end and no tenure was left open.
//!
//! All processes run on one host, so every timestamp comes from one clock;
//! the recorded instance intervals lie inside the leases (`START` is printed
//! after the claim, `STOP` before the release), so an overlap of records is
//! an overlap of tenures.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use super::history::{End, FaultKind, History, Tenure};

/// Which promise the backend makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// At most one tenure per id at any instant (postgres, etcd).
    Cp,
    /// One tenure per side during a split, one left after the heal
    /// (cluster, memory).
    Ap,
}

/// The stated bounds a history is checked against.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// How far two records of one clock may disagree (the same host clock:
    /// only the granularity of reading it).
    pub clock_error: Duration,
    /// For each fault kind, how long after the fault was undone an id may
    /// still be without a tenure (the stated failover bound for that fault,
    /// plus the scheduling allowance of a shared machine).
    pub failover: BTreeMap<FaultKind, Duration>,
    /// AP: how long after a heal (or SIGCONT) two instances may still run.
    pub heal: Duration,
    /// CP: how long a holder paused past its lease may run on after SIGCONT.
    pub wake_grace: Duration,
}

impl Bounds {
    /// The failover allowance for `kind` (a minute when none is set).
    pub fn failover_for(&self, kind: FaultKind) -> Duration {
        self.failover
            .get(&kind)
            .copied()
            .unwrap_or(Duration::from_secs(60))
    }
}

/// One broken promise, with the records that show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which rule (`overlap`, `token-order`, `stale-write`, `unowned`, ...).
    pub rule: &'static str,
    /// The offending pair (or record), in words.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.rule, self.detail)
    }
}

/// A stretch of time without a tenure of an id, and the fault it followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The id.
    pub id: String,
    /// The fault it is blamed on (`None`: no fault explains it).
    pub fault: Option<FaultKind>,
    /// How long the id had no tenure.
    pub length: Duration,
    /// When the id became free (Unix nanoseconds).
    pub from: u128,
}

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Every broken promise; empty means the run passed.
    pub violations: Vec<Violation>,
    /// How many tenures the history holds.
    pub tenures: usize,
    /// Overlaps that the model allows (AP splits, CP wake after a pause).
    pub excused_overlaps: usize,
    /// For each excused overlap, how long it went on after the partition
    /// was healed or the paused node woke (AP: heal to one instance; CP:
    /// how long a woken holder ran on).
    pub past_heal: Vec<Duration>,
    /// The longest of those.
    pub longest_past_heal: Duration,
    /// Every stretch without a tenure after the first one began.
    pub gaps: Vec<Gap>,
    /// Fenced writes accepted.
    pub writes_accepted: usize,
    /// Fenced writes refused (a stale token kept out).
    pub writes_rejected: usize,
}

impl Verdict {
    /// Whether every promise held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

fn ms(nanos: u128) -> f64 {
    nanos as f64 / 1e6
}

/// Checks `history` against the promises of `model` within `bounds`.
pub fn check(history: &History, model: Model, bounds: &Bounds) -> Verdict {
    let tenures = history.tenures();
    let eps = bounds.clock_error.as_nanos();
    let mut verdict = Verdict {
        tenures: tenures.len(),
        ..Verdict::default()
    };
    let mut by_id: BTreeMap<&str, Vec<&Tenure>> = BTreeMap::new();
    for t in &tenures {
        by_id.entry(t.id.as_str()).or_default().push(t);
    }

    for (id, list) in &by_id {
        // Tokens never repeat; under CP they grow with tenure start.
        let mut seen: HashMap<u64, &Tenure> = HashMap::new();
        for t in list {
            if let Some(other) = seen.insert(t.token, t) {
                verdict.violations.push(Violation {
                    rule: "token-reused",
                    detail: format!("two tenures of {id} share a token:\n  {other}\n  {t}"),
                });
            }
        }
        if model == Model::Cp {
            for pair in list.windows(2) {
                if pair[1].token <= pair[0].token {
                    verdict.violations.push(Violation {
                        rule: "token-order",
                        detail: format!(
                            "a later tenure of {id} has a token not above the earlier one's:\n  {}\n  {}",
                            pair[0], pair[1]
                        ),
                    });
                }
            }
        }
        // Overlaps.
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if b.start + eps >= a.end {
                    continue;
                }
                let overlap_end = a.end.min(b.end);
                let length = overlap_end.saturating_sub(b.start);
                match excuse(history, model, bounds, a, b) {
                    Ok(after) => {
                        verdict.excused_overlaps += 1;
                        verdict.longest_past_heal = verdict.longest_past_heal.max(after);
                        verdict.past_heal.push(after);
                    }
                    Err(why) => verdict.violations.push(Violation {
                        rule: "overlap",
                        detail: format!(
                            "two tenures of {id} overlap for {:.1} ms ({why}):\n  {a}\n  {b}",
                            ms(length)
                        ),
                    }),
                }
            }
        }
        // Unowned stretches, from the first tenure to the final shutdown.
        let mut covered_until = list.first().map(|t| t.end).unwrap_or(0);
        let mut intervals: Vec<(u128, u128)> = list.iter().map(|t| (t.start, t.end)).collect();
        intervals.sort();
        for (start, end) in intervals.into_iter().skip(1) {
            if start > covered_until + eps && covered_until < history.shutdown_at {
                gap(history, bounds, id, covered_until, start, &mut verdict);
            }
            covered_until = covered_until.max(end);
        }
        if covered_until + eps < history.shutdown_at {
            gap(
                history,
                bounds,
                id,
                covered_until,
                history.shutdown_at,
                &mut verdict,
            );
        }
        // Left open.
        for t in list.iter().filter(|t| t.how == End::Open) {
            verdict.violations.push(Violation {
                rule: "left-running",
                detail: format!("a tenure never ended (no STOP, no kill): {t}"),
            });
        }
    }
    for id in &history.ids {
        if !by_id.contains_key(id.as_str()) {
            verdict.violations.push(Violation {
                rule: "never-ran",
                detail: format!("{id} never ran on any node"),
            });
        }
    }

    // Fenced writes.
    for w in &history.writes {
        if w.accepted {
            verdict.writes_accepted += 1;
        } else {
            verdict.writes_rejected += 1;
        }
        if model != Model::Cp || !w.accepted {
            continue;
        }
        if let Some(newer) = by_id.get(w.id.as_str()).and_then(|list| {
            list.iter()
                .find(|t| t.token > w.token && t.start + eps < w.at)
        }) {
            verdict.violations.push(Violation {
                rule: "stale-write",
                detail: format!(
                    "a write of {} with token {} from {} was accepted at {} after a newer tenure began:\n  {newer}",
                    w.id, w.token, w.node, w.at
                ),
            });
        }
    }

    for exit in &history.exits {
        if let Some(problem) = &exit.problem {
            verdict.violations.push(Violation {
                rule: "unclean-shutdown",
                detail: format!("node {} did not shut down cleanly: {problem}", exit.node),
            });
        }
    }
    verdict
}

/// Why the overlap of `a` (started first) and `b` is allowed, or why not.
fn excuse(
    history: &History,
    model: Model,
    bounds: &Bounds,
    a: &Tenure,
    b: &Tenure,
) -> Result<Duration, String> {
    let eps = bounds.clock_error.as_nanos();
    match model {
        Model::Cp => {
            // The earlier holder was paused when the later one began, and
            // stopped soon after it woke.
            let paused = history.faults.iter().find(|f| {
                f.kind == FaultKind::Pause
                    && f.node.as_deref() == Some(a.node.as_str())
                    && f.at <= b.start
                    && b.start <= f.until + eps
            });
            match paused {
                Some(f) if a.end <= f.until + bounds.wake_grace.as_nanos() => {
                    Ok(past(a.end, f.until))
                }
                Some(f) => Err(format!(
                    "the first holder was paused but ran on {:.1} ms after SIGCONT",
                    ms(a.end.saturating_sub(f.until))
                )),
                None => Err("no pause of the first holder explains it".into()),
            }
        }
        Model::Ap => {
            let fault = history.faults.iter().rev().find(|f| {
                matches!(f.kind, FaultKind::Partition | FaultKind::Pause)
                    && f.at <= b.start + eps
                    && b.start <= f.until + bounds.heal.as_nanos()
            });
            let Some(f) = fault else {
                return Err("it began while no partition or pause was in force".into());
            };
            let overlap_end = a.end.min(b.end);
            if overlap_end > f.until + bounds.heal.as_nanos() {
                return Err(format!(
                    "it lasted {:.1} ms past the heal of a {} (bound {:?})",
                    ms(overlap_end - f.until),
                    f.kind,
                    bounds.heal
                ));
            }
            let loser = if a.end <= b.end { a } else { b };
            match &loser.how {
                End::Stopped(r) if r == "conflict" => Ok(past(overlap_end, f.until)),
                End::Killed => Ok(past(overlap_end, f.until)),
                other => Err(format!(
                    "the instance that stopped ended with {other:?}, not conflict"
                )),
            }
        }
    }
}

/// How long after `undone` the overlap went on.
fn past(end: u128, undone: u128) -> Duration {
    Duration::from_nanos(end.saturating_sub(undone) as u64)
}

fn gap(history: &History, bounds: &Bounds, id: &str, from: u128, to: u128, verdict: &mut Verdict) {
    let eps = bounds.clock_error.as_nanos();
    // The latest fault that began before the id became free.
    let fault = history.faults.iter().rev().find(|f| f.at <= from + eps);
    let length = Duration::from_nanos((to - from) as u64);
    let explained = fault.filter(|f| {
        let limit = f.until + bounds.failover_for(f.kind).as_nanos();
        from <= limit && to <= limit
    });
    verdict.gaps.push(Gap {
        id: id.to_string(),
        fault: fault.map(|f| f.kind),
        length,
        from,
    });
    if explained.is_none() {
        let why = match fault {
            Some(f) => format!(
                "after a {} of {} undone at {}, allowance {:?}",
                f.kind,
                f.node.as_deref().unwrap_or("the backend"),
                f.until,
                bounds.failover_for(f.kind)
            ),
            None => "with no fault before it".into(),
        };
        verdict.violations.push(Violation {
            rule: "unowned",
            detail: format!(
                "{id} had no tenure for {:.1} ms from {from} to {to} ({why})",
                ms(to - from)
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::history::{Exit, Fault, FenceWrite};
    use crate::process::{Event, EventKind};

    const MS: u128 = 1_000_000;

    fn ev(kind: EventKind, at_ms: u128, node: &str, token: u64, reason: Option<&str>) -> Event {
        Event {
            kind,
            at_nanos: at_ms * MS,
            node: node.into(),
            id: "x".into(),
            token,
            reason: reason.map(str::to_string),
        }
    }

    fn start(at: u128, node: &str, token: u64) -> Event {
        ev(EventKind::Start, at, node, token, None)
    }

    fn stop(at: u128, node: &str, token: u64, reason: &str) -> Event {
        ev(EventKind::Stop, at, node, token, Some(reason))
    }

    fn fault(kind: FaultKind, node: &str, at: u128, until: u128) -> Fault {
        Fault {
            kind,
            node: Some(node.into()),
            at: at * MS,
            until: until * MS,
        }
    }

    fn bounds() -> Bounds {
        Bounds {
            clock_error: Duration::from_millis(1),
            failover: FaultKind::ALL
                .into_iter()
                .map(|k| (k, Duration::from_millis(500)))
                .collect(),
            heal: Duration::from_millis(300),
            wake_grace: Duration::from_millis(200),
        }
    }

    fn history(events: Vec<Event>, faults: Vec<Fault>, end: u128) -> History {
        History {
            ids: vec!["x".into()],
            events,
            faults,
            writes: vec![],
            shutdown_at: end * MS,
            end: end * MS,
            exits: vec![],
        }
    }

    fn rules(v: &Verdict) -> Vec<&'static str> {
        v.violations.iter().map(|v| v.rule).collect()
    }

    /// A clean kill-and-take-over passes both models.
    #[test]
    fn a_clean_failover_passes() {
        let h = history(
            vec![
                start(0, "a", 1),
                start(120, "b", 2),
                stop(1000, "b", 2, "node_shutdown"),
            ],
            vec![fault(FaultKind::Kill, "a", 100, 300)],
            1000,
        );
        for model in [Model::Cp, Model::Ap] {
            let v = check(&h, model, &bounds());
            assert!(v.passed(), "{:?}", v.violations);
            assert_eq!(v.gaps.len(), 1);
            assert_eq!(v.gaps[0].fault, Some(FaultKind::Kill));
        }
    }

    #[test]
    fn cp_overlap_is_caught_and_names_both_tenures() {
        let h = history(
            vec![
                start(0, "a", 1),
                start(100, "b", 2),
                stop(150, "a", 1, "lease_lost"),
                stop(1000, "b", 2, "node_shutdown"),
            ],
            vec![],
            1000,
        );
        let v = check(&h, Model::Cp, &bounds());
        assert_eq!(rules(&v), vec!["overlap"]);
        assert!(v.violations[0].detail.contains("x on a token 1"));
        assert!(v.violations[0].detail.contains("x on b token 2"));
    }

    #[test]
    fn cp_tokens_must_grow_with_start() {
        let h = history(
            vec![
                start(0, "a", 5),
                stop(100, "a", 5, "node_shutdown"),
                start(101, "b", 3),
                stop(1000, "b", 3, "node_shutdown"),
            ],
            vec![fault(FaultKind::Restart, "a", 99, 200)],
            1000,
        );
        assert_eq!(rules(&check(&h, Model::Cp, &bounds())), vec!["token-order"]);
        // AP does not order tokens across a split.
        assert!(check(&h, Model::Ap, &bounds()).passed());
    }

    #[test]
    fn cp_paused_holder_that_stops_on_wake_is_excused_one_that_runs_on_is_not() {
        let events = |stop_at| {
            vec![
                start(0, "a", 1),
                start(3000, "b", 2),
                stop(stop_at, "a", 1, "lease_lost"),
                stop(6000, "b", 2, "node_shutdown"),
            ]
        };
        let faults = vec![fault(FaultKind::Pause, "a", 100, 4000)];
        let ok = check(
            &history(events(4010), faults.clone(), 6000),
            Model::Cp,
            &bounds(),
        );
        assert!(ok.passed(), "{:?}", ok.violations);
        assert_eq!(ok.excused_overlaps, 1);
        let bad = check(&history(events(4500), faults, 6000), Model::Cp, &bounds());
        assert_eq!(rules(&bad), vec!["overlap"]);
    }

    #[test]
    fn cp_stale_fenced_write_accepted_is_caught() {
        let mut h = history(
            vec![
                start(0, "a", 1),
                stop(100, "a", 1, "lease_lost"),
                start(110, "b", 2),
                stop(1000, "b", 2, "node_shutdown"),
            ],
            vec![fault(FaultKind::Partition, "a", 50, 500)],
            1000,
        );
        let write = |at: u128, token, node: &str, accepted| FenceWrite {
            at: at * MS,
            id: "x".into(),
            token,
            node: node.into(),
            accepted,
        };
        h.writes = vec![
            write(10, 1, "a", true),
            write(109, 2, "b", true),
            write(130, 1, "a", false),
        ];
        let v = check(&h, Model::Cp, &bounds());
        assert!(v.passed(), "{:?}", v.violations);
        assert_eq!((v.writes_accepted, v.writes_rejected), (2, 1));
        h.writes.push(write(140, 1, "a", true));
        assert_eq!(rules(&check(&h, Model::Cp, &bounds())), vec!["stale-write"]);
    }

    #[test]
    fn ap_overlap_needs_a_partition_a_quick_heal_and_a_conflict() {
        let events = |stop_at, reason: &str| {
            vec![
                start(0, "a", 1),
                start(200, "b", 2),
                stop(stop_at, "b", 2, reason),
                stop(2000, "a", 1, "node_shutdown"),
            ]
        };
        let split = vec![fault(FaultKind::Partition, "a", 100, 1000)];
        let ok = check(
            &history(events(1100, "conflict"), split.clone(), 2000),
            Model::Ap,
            &bounds(),
        );
        assert!(ok.passed(), "{:?}", ok.violations);
        assert_eq!(ok.excused_overlaps, 1);
        // Too long after the heal.
        let slow = check(
            &history(events(1500, "conflict"), split.clone(), 2000),
            Model::Ap,
            &bounds(),
        );
        assert_eq!(rules(&slow), vec!["overlap"]);
        // The loser did not see a conflict.
        let reason = check(
            &history(events(1100, "lease_lost"), split, 2000),
            Model::Ap,
            &bounds(),
        );
        assert_eq!(rules(&reason), vec!["overlap"]);
        // No split at all.
        let none = check(
            &history(events(1100, "conflict"), vec![], 2000),
            Model::Ap,
            &bounds(),
        );
        assert_eq!(rules(&none), vec!["overlap"]);
    }

    #[test]
    fn an_unexplained_or_too_long_gap_is_caught() {
        let events = vec![
            start(0, "a", 1),
            stop(100, "a", 1, "lease_lost"),
            start(2000, "b", 2),
            stop(3000, "b", 2, "node_shutdown"),
        ];
        let none = check(&history(events.clone(), vec![], 3000), Model::Cp, &bounds());
        assert_eq!(rules(&none), vec!["unowned"]);
        let slow = check(
            &history(events, vec![fault(FaultKind::Kill, "a", 90, 300)], 3000),
            Model::Cp,
            &bounds(),
        );
        assert_eq!(rules(&slow), vec!["unowned"]);
        assert!(slow.violations[0].detail.contains("after a kill of a"));
    }

    #[test]
    fn unclean_shutdown_and_open_tenures_are_caught() {
        let mut h = history(vec![start(0, "a", 1)], vec![], 1000);
        h.exits = vec![Exit {
            node: "a".into(),
            problem: Some("exit status 101".into()),
        }];
        let mut found = rules(&check(&h, Model::Ap, &bounds()));
        found.sort();
        assert_eq!(found, vec!["left-running", "unclean-shutdown"]);
    }
}
