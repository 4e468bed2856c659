//! The seeded fault schedule: the same seed, backend and count give the
//! same faults in the same order.
//!
//! The schedule keeps the fleet's size within bounds: never fewer than
//! [`MIN_LIVE`] live nodes and never more than [`MAX_JOINED`] above the
//! starting size. Each step is drawn among the kinds that keep it there (no
//! leave at the minimum, no join at the maximum); when none is left (only
//! leaves in the mix, at the minimum), the step is the other one of the
//! pair.

use std::time::Duration;

use super::history::FaultKind;

/// SplitMix64: small, fast, and fully determined by its seed (no
/// dependency needed for a test schedule).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A duration uniformly in `[lo, hi]`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

/// The fewest live nodes a schedule leaves (or the starting size, if
/// smaller).
pub const MIN_LIVE: usize = 2;
/// How many nodes a schedule lets the fleet grow past its starting size.
pub const MAX_JOINED: usize = 2;

/// One step of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The fault.
    pub kind: FaultKind,
    /// Aim at the node holding the first id (else a node chosen by
    /// `node_pick`).
    pub at_holder: bool,
    /// Which node when not aiming at the holder (an index modulo the
    /// number of nodes).
    pub node_pick: usize,
    /// How long a pause or partition lasts (a drain: how long the drained
    /// node stays empty, at most [`DRAIN_HOLD`]).
    pub hold: Duration,
    /// Quiet time after the cluster has settled, before the next fault.
    pub settle: Duration,
}

/// The longest a drained node stays empty before it resumes (a drain needs
/// no long hold to mean something; Postgres' full holds are 15 s and more).
pub const DRAIN_HOLD: Duration = Duration::from_millis(1500);

/// `count` steps drawn from `seed`, each kind with its weight (a kind with
/// weight 0 never occurs), holding pauses and partitions for a time drawn
/// from `hold`, on a fleet of `nodes` nodes at the start whose size stays
/// within [`MIN_LIVE`] and `nodes + `[`MAX_JOINED`].
pub fn schedule(
    seed: u64,
    count: usize,
    weights: &[(FaultKind, u32)],
    hold: (Duration, Duration),
    nodes: usize,
) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let all: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
    assert!(all > 0, "at least one fault kind needs a weight");
    let (min, max) = (MIN_LIVE.min(nodes), nodes + MAX_JOINED);
    let mut live = nodes;
    (0..count)
        .map(|_| {
            let mut feasible: Vec<(FaultKind, u32)> = weights
                .iter()
                .copied()
                .filter(|(k, _)| match k {
                    FaultKind::Leave => live > min,
                    FaultKind::Join => live < max,
                    _ => true,
                })
                .collect();
            let mut total: u64 = feasible.iter().map(|(_, w)| u64::from(*w)).sum();
            if total == 0 {
                let other = if live <= min {
                    FaultKind::Join
                } else {
                    FaultKind::Leave
                };
                feasible = vec![(other, 1)];
                total = 1;
            }
            let mut pick = rng.below(total);
            let kind = feasible
                .iter()
                .find(|(_, w)| {
                    if pick < u64::from(*w) {
                        true
                    } else {
                        pick -= u64::from(*w);
                        false
                    }
                })
                .map(|(k, _)| *k)
                .expect("the pick is below the total weight");
            match kind {
                FaultKind::Join => live += 1,
                FaultKind::Leave => live -= 1,
                _ => {}
            }
            let mut held = rng.between(hold.0, hold.1);
            if kind == FaultKind::Drain {
                held = held.min(DRAIN_HOLD);
            }
            Step {
                kind,
                at_holder: rng.below(4) != 0,
                node_pick: rng.below(1024) as usize,
                hold: held,
                settle: Duration::from_millis(50 + rng.below(250)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_weights_count() {
        let w = [
            (FaultKind::Kill, 1),
            (FaultKind::Pause, 0),
            (FaultKind::Partition, 3),
        ];
        let hold = (Duration::from_millis(100), Duration::from_millis(200));
        let a = schedule(7, 200, &w, hold, 3);
        assert_eq!(a, schedule(7, 200, &w, hold, 3));
        assert_ne!(a, schedule(8, 200, &w, hold, 3));
        assert!(a.iter().all(|s| s.kind != FaultKind::Pause));
        let kills = a.iter().filter(|s| s.kind == FaultKind::Kill).count();
        assert!(
            (20..80).contains(&kills),
            "{kills} kills of 200 at weight 1/4"
        );
        assert!(a.iter().all(|s| (hold.0..=hold.1).contains(&s.hold)));
    }

    #[test]
    fn joins_and_leaves_keep_the_fleet_within_bounds() {
        let hold = (Duration::from_millis(100), Duration::from_millis(200));
        for w in [
            vec![(FaultKind::Leave, 1)],
            vec![(FaultKind::Join, 1)],
            vec![(FaultKind::Join, 1), (FaultKind::Leave, 1)],
        ] {
            let mut live = 3usize;
            let steps = schedule(11, 100, &w, hold, 3);
            for s in &steps {
                match s.kind {
                    FaultKind::Join => live += 1,
                    FaultKind::Leave => live -= 1,
                    _ => {}
                }
                assert!((MIN_LIVE..=3 + MAX_JOINED).contains(&live), "{live} live");
            }
            // Both directions happen: a lone kind turns at the bounds.
            // (Only leaves: a join at the minimum; only joins: a leave at
            // the maximum.)
            assert!(steps.iter().any(|s| s.kind == FaultKind::Join));
            assert!(steps.iter().any(|s| s.kind == FaultKind::Leave));
        }
        let drains = schedule(
            3,
            50,
            &[(FaultKind::Drain, 1)],
            (hold.0 * 100, hold.1 * 100),
            3,
        );
        assert!(drains.iter().all(|s| s.hold <= DRAIN_HOLD));
    }
}
