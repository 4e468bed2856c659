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
//! - **Moves, joins, leaves and drains** (all models):
//!   - `handoff`: an instance that stopped with reason `moved` (a drain,
//!     rebalancing, a transfer) is followed by the id's next tenure on
//!     *another* node within [`Bounds::handoff`] of the stop; such a gap is
//!     judged by this bound, not by the fault allowance. A moved id may
//!     not overlap its next tenure any more than any other: never on CP,
//!     and on AP only as the split rule above allows (a handoff is not a
//!     partition, so the loser must still see `conflict`).
//!   - `drain`: a drain got to the point where the drained node held
//!     nothing; every tenure the node had when the drain began (or began
//!     while it drained) ended with `moved` by then; and from then until
//!     the resume the node began no tenure. That every id it held runs
//!     elsewhere, soon, is the `handoff` rule.
//!   - `leave`: the node that left began nothing after the leave began
//!     (it never comes back under its name), and each of its tenures
//!     ended gracefully (`STOP`, not a kill) by the time it exited. Its
//!     ids run elsewhere within the leave's failover allowance (a graceful
//!     stop's: the restart bound), which is the unowned-stretch rule.
//!   - `join`: the joining node's name ran nothing before it joined (a new
//!     name). Nothing runs twice after it (the overlap rules).
//!   - `moved-twice`: between two consecutive fault boundaries (each
//!     fault's start and its end are changes of membership or of a
//!     member's profile), an id moves at most once: rebalancing must not
//!     bounce an id.
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
    /// How long an id whose instance stopped with `moved` may be without a
    /// tenure before the member it was handed to runs it.
    pub handoff: Duration,
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
    /// It followed a stop with reason `moved`, so it was judged by the
    /// handoff bound.
    pub handoff: bool,
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
        // `cover` is the tenure that ends last among those begun so far.
        let mut cover: Option<&Tenure> = None;
        for t in list {
            let Some(c) = cover else {
                cover = Some(t);
                continue;
            };
            if t.start > c.end + eps && c.end < history.shutdown_at {
                gap(history, bounds, c, t.start, &mut verdict);
            }
            if t.end > c.end {
                cover = Some(t);
            }
        }
        if let Some(c) = cover
            && c.end + eps < history.shutdown_at
        {
            gap(history, bounds, c, history.shutdown_at, &mut verdict);
        }
        handoffs(history, bounds, list, &mut verdict);
        moved_once(history, id, list, &mut verdict);
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

    membership(history, bounds, &tenures, &mut verdict);

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

fn moved(t: &Tenure) -> bool {
    matches!(&t.how, End::Stopped(r) if r == "moved")
}

/// Records the stretch from the end of `from` to `to` in which its id had
/// no tenure, and whether it is within the allowance: after a `moved` stop,
/// the handoff rule judges it (see [`handoffs`]); otherwise the latest fault
/// that began before the id became free must explain it.
fn gap(history: &History, bounds: &Bounds, from: &Tenure, to: u128, verdict: &mut Verdict) {
    let eps = bounds.clock_error.as_nanos();
    let (id, from_tenure, from) = (from.id.as_str(), from, from.end);
    // The latest fault that began before the id became free.
    let fault = history.faults.iter().rev().find(|f| f.at <= from + eps);
    let length = Duration::from_nanos((to - from) as u64);
    let handoff = moved(from_tenure);
    verdict.gaps.push(Gap {
        id: id.to_string(),
        fault: fault.map(|f| f.kind),
        length,
        from,
        handoff,
    });
    if handoff {
        return;
    }
    let explained = fault.filter(|f| {
        let limit = f.until + bounds.failover_for(f.kind).as_nanos();
        from <= limit && to <= limit
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

/// Every instance stopped with `moved` is followed, within the handoff
/// bound, by the id's next tenure on another node (`list`: one id's
/// tenures by start).
fn handoffs(history: &History, bounds: &Bounds, list: &[&Tenure], verdict: &mut Verdict) {
    let eps = bounds.clock_error.as_nanos();
    let limit = bounds.handoff.as_nanos();
    for (i, t) in list.iter().enumerate() {
        if !moved(t) || t.end >= history.shutdown_at {
            continue;
        }
        // Already running elsewhere when this one stopped (an overlap is
        // the overlap rules' business): taken over at once.
        if list
            .iter()
            .any(|n| n.node != t.node && n.start <= t.end + eps && n.end > t.end)
        {
            continue;
        }
        // The first tenure to begin at or after the stop.
        let next = list
            .iter()
            .enumerate()
            .find(|(j, n)| *j != i && n.start + eps >= t.end)
            .map(|(_, n)| *n);
        let problem = match next {
            Some(n) if n.start > t.end + limit => Some(format!(
                "the next tenure began {:.1} ms after the stop (bound {:?}):\n  {t}\n  {n}",
                ms(n.start - t.end),
                bounds.handoff
            )),
            Some(n) if n.node == t.node => Some(format!(
                "the next tenure ran on the node it moved from:\n  {t}\n  {n}"
            )),
            Some(_) => None,
            None if t.end + limit < history.shutdown_at => Some(format!(
                "it never ran again before the final shutdown:\n  {t}"
            )),
            None => None,
        };
        if let Some(p) = problem {
            verdict.violations.push(Violation {
                rule: "handoff",
                detail: format!("{} moved from {}: {p}", t.id, t.node),
            });
        }
    }
}

/// At most one `moved` stop of an id between two consecutive fault
/// boundaries (every fault's start and end), from the first fault on.
fn moved_once(history: &History, id: &str, list: &[&Tenure], verdict: &mut Verdict) {
    let mut bounds: Vec<u128> = history
        .faults
        .iter()
        .flat_map(|f| [f.at, f.until])
        .chain([history.shutdown_at])
        .collect();
    bounds.sort();
    bounds.dedup();
    for w in bounds.windows(2) {
        let moves: Vec<&&Tenure> = list
            .iter()
            .filter(|t| moved(t) && w[0] <= t.end && t.end < w[1])
            .collect();
        if moves.len() > 1 {
            let lines: Vec<String> = moves.iter().map(|t| format!("  {t}")).collect();
            verdict.violations.push(Violation {
                rule: "moved-twice",
                detail: format!(
                    "{id} moved {} times between {} and {} with no change of members in between:\n{}",
                    moves.len(),
                    w[0],
                    w[1],
                    lines.join("\n")
                ),
            });
        }
    }
}

/// The drain, leave and join rules (see the module docs).
fn membership(history: &History, bounds: &Bounds, tenures: &[Tenure], verdict: &mut Verdict) {
    let eps = bounds.clock_error.as_nanos();
    let mut push = |rule: &'static str, detail: String| {
        verdict.violations.push(Violation { rule, detail });
    };
    for f in &history.faults {
        let Some(node) = f.node.as_deref() else {
            continue;
        };
        let on_node = || tenures.iter().filter(move |t| t.node == node);
        match f.kind {
            FaultKind::Drain => {
                let Some(drained) = f.drained else {
                    push(
                        "drain",
                        format!("the drain of {node} from {} never emptied the node", f.at),
                    );
                    continue;
                };
                // What it had, or began, before it held nothing.
                for t in on_node().filter(|t| t.start <= drained + eps && t.end + eps >= f.at) {
                    if t.end > drained + eps {
                        push(
                            "drain",
                            format!(
                                "{node} still ran an instance after its drain completed at {drained}:\n  {t}"
                            ),
                        );
                    } else if !moved(t) {
                        push(
                            "drain",
                            format!(
                                "a drain of {node} stopped an instance without `moved`:\n  {t}"
                            ),
                        );
                    }
                }
                for t in on_node().filter(|t| t.start > drained + eps && t.start < f.until) {
                    push(
                        "drain",
                        format!(
                            "{node} began a tenure while drained (from {drained} until the resume at {}):\n  {t}",
                            f.until
                        ),
                    );
                }
            }
            FaultKind::Leave => {
                for t in on_node().filter(|t| t.start > f.at + eps) {
                    push(
                        "leave",
                        format!("{node} began a tenure after it left at {}:\n  {t}", f.at),
                    );
                }
                for t in on_node().filter(|t| t.start <= f.at + eps && t.end + eps >= f.at) {
                    if !matches!(t.how, End::Stopped(_)) || t.end > f.until + eps {
                        push(
                            "leave",
                            format!(
                                "a tenure of {node} did not stop gracefully by its exit at {}:\n  {t}",
                                f.until
                            ),
                        );
                    }
                }
            }
            FaultKind::Join => {
                for t in on_node().filter(|t| t.start + eps < f.at) {
                    push(
                        "join",
                        format!(
                            "{node} joined at {} under a name that had already run:\n  {t}",
                            f.at
                        ),
                    );
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
