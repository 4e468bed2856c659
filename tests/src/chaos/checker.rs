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
        Fault::new(kind, Some(node), at * MS, until * MS)
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
            handoff: Duration::from_millis(100),
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

    fn with_id(mut e: Event, id: &str) -> Event {
        e.id = id.into();
        e
    }

    fn drain(node: &str, at: u128, drained: Option<u128>, until: u128) -> Fault {
        let mut f = fault(FaultKind::Drain, node, at, until);
        f.drained = drained.map(|d| d * MS);
        f
    }

    #[test]
    fn a_moved_id_must_run_elsewhere_within_the_handoff_bound() {
        let h = |events| history(events, vec![], 1000);
        let ok = h(vec![
            start(0, "a", 1),
            stop(100, "a", 1, "moved"),
            start(150, "b", 2),
            stop(1000, "b", 2, "node_shutdown"),
        ]);
        let v = check(&ok, Model::Cp, &bounds());
        assert!(v.passed(), "{:?}", v.violations);
        assert!(v.gaps[0].handoff, "{:?}", v.gaps);
        // Too slow: 200 ms, bound 100 ms (and no fault needed to blame).
        let slow = h(vec![
            start(0, "a", 1),
            stop(100, "a", 1, "moved"),
            start(300, "b", 2),
            stop(1000, "b", 2, "node_shutdown"),
        ]);
        for model in [Model::Cp, Model::Ap] {
            assert_eq!(rules(&check(&slow, model, &bounds())), vec!["handoff"]);
        }
        // Back on the node it moved from.
        let back = h(vec![
            start(0, "a", 1),
            stop(100, "a", 1, "moved"),
            start(150, "a", 2),
            stop(1000, "a", 2, "node_shutdown"),
        ]);
        assert_eq!(rules(&check(&back, Model::Cp, &bounds())), vec!["handoff"]);
        // Never again.
        let never = h(vec![start(0, "a", 1), stop(100, "a", 1, "moved")]);
        assert_eq!(rules(&check(&never, Model::Ap, &bounds())), vec!["handoff"]);
    }

    #[test]
    fn a_move_excuses_no_overlap_cp_never_ap_only_a_split_ended_by_conflict() {
        // The next holder began before the mover had stopped.
        let early = history(
            vec![
                start(0, "a", 1),
                start(90, "b", 2),
                stop(100, "a", 1, "moved"),
                stop(1000, "b", 2, "node_shutdown"),
            ],
            vec![fault(FaultKind::Join, "b", 50, 60)],
            1000,
        );
        for model in [Model::Cp, Model::Ap] {
            assert_eq!(rules(&check(&early, model, &bounds())), vec!["overlap"]);
        }
        // AP, during a split: the loser stopped with `moved`, not `conflict`.
        let split = history(
            vec![
                start(0, "a", 1),
                start(200, "b", 2),
                stop(1100, "b", 2, "moved"),
                stop(2000, "a", 1, "node_shutdown"),
            ],
            vec![fault(FaultKind::Partition, "a", 100, 1000)],
            2000,
        );
        assert_eq!(rules(&check(&split, Model::Ap, &bounds())), vec!["overlap"]);
    }

    #[test]
    fn a_drained_node_hands_everything_over_and_holds_nothing_until_resumed() {
        let base = vec![
            start(0, "a", 1),
            stop(140, "a", 1, "moved"),
            start(160, "b", 2),
            stop(2000, "b", 2, "node_shutdown"),
        ];
        let ok = check(
            &history(base.clone(), vec![drain("a", 100, Some(150), 1000)], 2000),
            Model::Cp,
            &bounds(),
        );
        assert!(ok.passed(), "{:?}", ok.violations);
        // It never got empty.
        let never = check(
            &history(base.clone(), vec![drain("a", 100, None, 1000)], 2000),
            Model::Cp,
            &bounds(),
        );
        assert_eq!(rules(&never), vec!["drain"]);
        // Its instance ran on past the moment it was said to be empty.
        let late = history(
            vec![
                start(0, "a", 1),
                stop(300, "a", 1, "moved"),
                start(320, "b", 2),
                stop(2000, "b", 2, "node_shutdown"),
            ],
            vec![drain("a", 100, Some(150), 1000)],
            2000,
        );
        assert_eq!(rules(&check(&late, Model::Cp, &bounds())), vec!["drain"]);
        // Stopped for another reason than a handoff.
        let mut reason = base.clone();
        reason[1] = stop(140, "a", 1, "lease_lost");
        let reason = history(reason, vec![drain("a", 100, Some(150), 1000)], 2000);
        assert_eq!(rules(&check(&reason, Model::Ap, &bounds())), vec!["drain"]);
        // Began another id's tenure while drained.
        let mut began = base;
        began.push(with_id(start(500, "a", 3), "y"));
        began.push(with_id(stop(2000, "a", 3, "node_shutdown"), "y"));
        let began = history(began, vec![drain("a", 100, Some(150), 1000)], 2000);
        assert_eq!(rules(&check(&began, Model::Cp, &bounds())), vec!["drain"]);
    }

    #[test]
    fn a_node_that_left_stopped_gracefully_never_returns_and_its_ids_run_elsewhere() {
        let leave = || vec![fault(FaultKind::Leave, "a", 90, 150)];
        let events = |stop_at, next_at| {
            vec![
                start(0, "a", 1),
                stop(stop_at, "a", 1, "node_shutdown"),
                start(next_at, "b", 2),
                stop(2000, "b", 2, "node_shutdown"),
            ]
        };
        let ok = check(
            &history(events(100, 110), leave(), 2000),
            Model::Cp,
            &bounds(),
        );
        assert!(ok.passed(), "{:?}", ok.violations);
        // Back under its name.
        let mut back = events(100, 110);
        back.push(with_id(start(500, "a", 5), "y"));
        back.push(with_id(stop(2000, "a", 5, "node_shutdown"), "y"));
        let back = check(&history(back, leave(), 2000), Model::Ap, &bounds());
        assert_eq!(rules(&back), vec!["leave"]);
        // Its instance stopped after the process had exited.
        let after = check(
            &history(events(200, 210), leave(), 2000),
            Model::Cp,
            &bounds(),
        );
        assert_eq!(rules(&after), vec!["leave"]);
        // Its id ran elsewhere too late: past the exit + the allowance.
        let slow = check(
            &history(events(100, 800), leave(), 2000),
            Model::Cp,
            &bounds(),
        );
        assert_eq!(rules(&slow), vec!["unowned"]);
        assert!(slow.violations[0].detail.contains("after a leave of a"));
    }

    #[test]
    fn a_join_takes_a_new_name_and_moves_each_id_at_most_once() {
        // Rebalancing after the join moves x twice (a to b, b to c) with no
        // change of members in between.
        let events = vec![
            start(0, "a", 1),
            stop(200, "a", 1, "moved"),
            start(210, "b", 2),
            stop(400, "b", 2, "moved"),
            start(410, "c", 3),
            stop(2000, "c", 3, "node_shutdown"),
        ];
        let join_c = fault(FaultKind::Join, "c", 100, 110);
        let twice = check(
            &history(events.clone(), vec![join_c.clone()], 2000),
            Model::Cp,
            &bounds(),
        );
        assert_eq!(rules(&twice), vec!["moved-twice"]);
        // Two joins, one move after each: fine.
        let two_joins = vec![join_c, fault(FaultKind::Join, "d", 300, 310)];
        let ok = check(&history(events, two_joins, 2000), Model::Cp, &bounds());
        assert!(ok.passed(), "{:?}", ok.violations);
        // A join under a name that already ran.
        let reused = history(
            vec![
                start(0, "c", 1),
                stop(100, "c", 1, "node_shutdown"),
                start(120, "a", 2),
                stop(2000, "a", 2, "node_shutdown"),
            ],
            vec![
                fault(FaultKind::Leave, "c", 90, 130),
                fault(FaultKind::Join, "c", 500, 510),
            ],
            2000,
        );
        assert_eq!(rules(&check(&reused, Model::Ap, &bounds())), vec!["join"]);
        // Nothing runs twice after a join on CP.
        let twice_running = history(
            vec![
                start(0, "a", 1),
                start(300, "c", 2),
                stop(1000, "a", 1, "node_shutdown"),
                stop(1000, "c", 2, "node_shutdown"),
            ],
            vec![fault(FaultKind::Join, "c", 100, 110)],
            1000,
        );
        assert_eq!(
            rules(&check(&twice_running, Model::Cp, &bounds())),
            vec!["overlap"]
        );
    }
}
