//! The seeded fault schedule: the same seed, backend and count give the
//! same faults in the same order.

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
    /// How long a pause or partition lasts.
    pub hold: Duration,
    /// Quiet time after the cluster has settled, before the next fault.
    pub settle: Duration,
}

/// `count` steps drawn from `seed`, each kind with its weight (a kind with
/// weight 0 never occurs), holding pauses and partitions for a time drawn
/// from `hold`.
pub fn schedule(
    seed: u64,
    count: usize,
    weights: &[(FaultKind, u32)],
    hold: (Duration, Duration),
) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
    assert!(total > 0, "at least one fault kind needs a weight");
    (0..count)
        .map(|_| {
            let mut pick = rng.below(total);
            let kind = weights
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
            Step {
                kind,
                at_holder: rng.below(4) != 0,
                node_pick: rng.below(1024) as usize,
                hold: rng.between(hold.0, hold.1),
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
        let a = schedule(7, 200, &w, hold);
        assert_eq!(a, schedule(7, 200, &w, hold));
        assert_ne!(a, schedule(8, 200, &w, hold));
        assert!(a.iter().all(|s| s.kind != FaultKind::Pause));
        let kills = a.iter().filter(|s| s.kind == FaultKind::Kill).count();
        assert!(
            (20..80).contains(&kills),
            "{kills} kills of 200 at weight 1/4"
        );
        assert!(a.iter().all(|s| (hold.0..=hold.1).contains(&s.hold)));
    }
}
