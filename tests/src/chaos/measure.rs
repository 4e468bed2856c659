//! Latencies read off a recorded history: how long each fault kept an id
//! from running, per scenario.

use std::collections::BTreeMap;

use super::history::{End, FaultKind, History};
use crate::process::EventKind;

/// A scenario measured from faults of one kind.
pub const SCENARIOS: [&str; 5] = [
    "failover after SIGKILL",
    "handoff after SIGTERM",
    "handoff from the old instance's stop",
    "takeover after SIGSTOP",
    "takeover after a partition",
];

/// For each scenario of [`SCENARIOS`], the samples in milliseconds: from
/// the fault (or the old instance's `STOP`) to the first `START` of an id
/// the target held, on another node for pauses and partitions. A fault
/// after which nobody took over within its own duration gives no sample.
pub fn latencies(history: &History) -> BTreeMap<&'static str, Vec<f64>> {
    let tenures = history.tenures();
    let mut out: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for f in &history.faults {
        let Some(node) = f.node.as_deref() else {
            continue;
        };
        let held: Vec<_> = tenures
            .iter()
            .filter(|t| t.node == node && t.start <= f.at && t.end >= f.at)
            .collect();
        for t in held {
            let other_node = matches!(f.kind, FaultKind::Pause | FaultKind::Partition);
            let next = history
                .events
                .iter()
                .filter(|e| {
                    e.kind == EventKind::Start
                        && e.id == t.id
                        && e.at_nanos > f.at
                        && (!other_node || e.node != node)
                })
                .map(|e| e.at_nanos)
                .min();
            let Some(next) = next else { continue };
            let ms = |from: u128| next.saturating_sub(from) as f64 / 1e6;
            match f.kind {
                FaultKind::Kill => out.entry(SCENARIOS[0]).or_default().push(ms(f.at)),
                FaultKind::Restart => {
                    out.entry(SCENARIOS[1]).or_default().push(ms(f.at));
                    if matches!(t.how, End::Stopped(_)) && t.end >= f.at {
                        out.entry(SCENARIOS[2]).or_default().push(ms(t.end));
                    }
                }
                FaultKind::Pause if next <= f.until => {
                    out.entry(SCENARIOS[3]).or_default().push(ms(f.at))
                }
                FaultKind::Partition if next <= f.until => {
                    out.entry(SCENARIOS[4]).or_default().push(ms(f.at))
                }
                _ => {}
            }
        }
    }
    out
}

/// `(p50, p99, max)` of `samples` (nearest rank), or `None` when empty.
pub fn percentiles(samples: &[f64]) -> Option<(f64, f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = |p: f64| s[(((p * s.len() as f64).ceil() as usize).max(1) - 1).min(s.len() - 1)];
    Some((rank(0.50), rank(0.99), s[s.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&s), Some((50.0, 99.0, 100.0)));
        assert_eq!(percentiles(&[3.0]), Some((3.0, 3.0, 3.0)));
        assert_eq!(percentiles(&[]), None);
    }
}
