//! The CP safety bound: how long a client may go on vouching for a tenure
//! after its last confirmed round trip, given the server's timeout.
//!
//! # The argument
//!
//! A CP server (Postgres ending a silent session, etcd expiring a lease)
//! frees an id no sooner than `timeout` after it **received** the holder's
//! last word. The client cannot know when that was, but it knows when it
//! **sent** that word: the receipt came later, so the server's clock starts
//! no earlier than the client's `last_ok` (the send time of the last round
//! trip the server answered). Two things shrink the time the client may
//! count on:
//!
//! - the clocks' rates differ: while the client measures `t`, the server
//!   may measure up to `t·(1 + ρ)`; after `timeout·(1 − ρ)` of client time
//!   the server has seen at most `timeout` (to first order, and ρ ≤ 1 %
//!   keeps the second order far below the margin). `ρ` is given in parts
//!   per million (`drift_ppm`); 10 000 ppm is 1 %;
//! - the client does not act the instant its deadline passes: timers fire
//!   late and tasks wait to be scheduled. `margin` absorbs that delay.
//!
//! So the client may vouch until `last_ok + usable(timeout)` with
//! `usable(timeout) = timeout·(1 − ρ) − margin`, and must end the lease
//! `budget` before that so the instance, given its stop budget, has stopped
//! before the server can grant the id to anyone else:
//! `deadline = last_ok + usable(timeout) − budget`.
//!
//! etcd uses ρ = 1 % and a 250 ms margin; Postgres ρ = 1 % and a 1 s margin
//! (configurable).

use std::ops::Add;
use std::time::Duration;

const MILLION: u128 = 1_000_000;

/// The clock-rate bound and scheduling margin of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Vouch {
    /// Bound on the clock-rate error between client and server, in parts
    /// per million (10 000 = 1 %).
    pub(crate) drift_ppm: u32,
    /// Slack for scheduling delay between the deadline and the end of the
    /// lease.
    pub(crate) margin: Duration,
}

impl Vouch {
    /// The bound with `drift_ppm` (parts per million) and `margin`.
    pub(crate) const fn new(drift_ppm: u32, margin: Duration) -> Self {
        Vouch { drift_ppm, margin }
    }

    /// How long after `last_ok` the client may count on a server whose
    /// timeout is `timeout`: `timeout·(1 − ρ) − margin`, never negative. The
    /// drift is rounded against the client (up to the nanosecond).
    pub(crate) fn usable(&self, timeout: Duration) -> Duration {
        let t = timeout.as_nanos();
        let slow = t - drift_of(t, self.ppm());
        from_nanos(slow).saturating_sub(self.margin)
    }

    /// When the client must end a lease whose instance needs `budget` to
    /// stop: `last_ok + usable(timeout) − budget` (`last_ok` itself when the
    /// budget does not fit). Works with `std` and `tokio` instants alike.
    pub(crate) fn deadline<I>(&self, last_ok: I, timeout: Duration, budget: Duration) -> I
    where
        I: Add<Duration, Output = I>,
    {
        last_ok + self.usable(timeout).saturating_sub(budget)
    }

    /// The smallest server timeout whose [`usable`](Self::usable) time is
    /// at least `needed`, to the nanosecond (callers whose server takes
    /// whole seconds round up themselves). `Duration::MAX` when no timeout
    /// is long enough.
    pub(crate) fn timeout_for(&self, needed: Duration) -> Duration {
        let ppm = self.ppm();
        if ppm == MILLION {
            return if needed.is_zero() && self.margin.is_zero() {
                Duration::ZERO
            } else {
                Duration::MAX
            };
        }
        let n = needed.as_nanos() + self.margin.as_nanos();
        let fits = |t: u128| t - drift_of(t, ppm) >= n;
        // t − ⌈t·ρ⌉ grows with t by 0 or 1 per nanosecond: start from the
        // real-valued answer and step to the exact one.
        let mut t = (n * MILLION).div_ceil(MILLION - ppm);
        while !fits(t) {
            t += 1;
        }
        while t > 0 && fits(t - 1) {
            t -= 1;
        }
        from_nanos(t)
    }

    fn ppm(&self) -> u128 {
        u128::from(self.drift_ppm).min(MILLION)
    }
}

/// `⌈t·ppm / 10⁶⌉`.
fn drift_of(t: u128, ppm: u128) -> u128 {
    (t * ppm).div_ceil(MILLION)
}

/// Nanoseconds to a `Duration`, saturating at `Duration::MAX`.
fn from_nanos(nanos: u128) -> Duration {
    let secs = nanos / 1_000_000_000;
    match u64::try_from(secs) {
        Ok(secs) => Duration::new(secs, (nanos % 1_000_000_000) as u32),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::Vouch;
    use std::time::{Duration, Instant};

    const ETCD: Vouch = Vouch::new(10_000, Duration::from_millis(250));
    const POSTGRES: Vouch = Vouch::new(10_000, Duration::from_secs(1));
    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn usable_is_the_timeout_less_drift_and_margin() {
        // 10 s · 0.99 − 250 ms
        assert_eq!(ETCD.usable(S(10)), MS(9_650));
        // 15 s · 0.99 − 1 s
        assert_eq!(POSTGRES.usable(S(15)), MS(13_850));
        assert_eq!(ETCD.usable(MS(200)), Duration::ZERO);
        assert_eq!(ETCD.usable(Duration::ZERO), Duration::ZERO);
        assert_eq!(Vouch::new(0, Duration::ZERO).usable(S(3)), S(3));
        assert_eq!(
            Vouch::new(2_000_000, Duration::ZERO).usable(S(3)),
            Duration::ZERO
        );
        // no overflow at the top
        assert!(ETCD.usable(Duration::MAX) < Duration::MAX);
    }

    #[test]
    fn the_deadline_leaves_the_budget_to_stop() {
        let now = Instant::now();
        assert_eq!(ETCD.deadline(now, S(10), S(5)), now + MS(4_650));
        assert_eq!(ETCD.deadline(now, S(10), S(60)), now);
        let tokio_now = tokio::time::Instant::now();
        assert_eq!(
            POSTGRES.deadline(tokio_now, S(15), S(5)),
            tokio_now + MS(8_850)
        );
    }

    #[test]
    fn timeout_for_is_the_smallest_timeout_that_fits() {
        // 4.65 s usable needs 4.9 s / 0.99
        let t = ETCD.timeout_for(MS(4_650));
        assert!(ETCD.usable(t) >= MS(4_650));
        assert!(ETCD.usable(t - Duration::from_nanos(1)) < MS(4_650));
        assert_eq!(ETCD.timeout_for(MS(9_650)), S(10));
        assert_eq!(Vouch::new(0, MS(5)).timeout_for(MS(10)), MS(15));
        assert_eq!(
            Vouch::new(1_000_000, MS(5)).timeout_for(MS(10)),
            Duration::MAX
        );
        assert_eq!(ETCD.timeout_for(Duration::MAX), Duration::MAX);
    }

    /// A property check over a spread of bounds and needs: `timeout_for`
    /// fits, and one nanosecond less does not; `usable` never grows when
    /// the timeout shrinks.
    #[test]
    fn timeout_for_and_usable_agree_everywhere() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // xorshift64: a fixed sequence, so a failure reproduces
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5_000 {
            let vouch = Vouch::new(
                (next() % 200_000) as u32,
                Duration::from_nanos(next() % 5_000_000_000),
            );
            let needed = Duration::from_nanos(next() % 100_000_000_000);
            let t = vouch.timeout_for(needed);
            assert!(vouch.usable(t) >= needed, "{vouch:?} {needed:?} {t:?}");
            if t > Duration::ZERO {
                let less = t - Duration::from_nanos(1);
                assert!(vouch.usable(less) < needed, "{vouch:?} {needed:?} {t:?}");
            }
            let a = Duration::from_nanos(next() % 100_000_000_000);
            let b = Duration::from_nanos(next() % 100_000_000_000);
            let (lo, hi) = (a.min(b), a.max(b));
            assert!(
                vouch.usable(lo) <= vouch.usable(hi),
                "{vouch:?} {lo:?} {hi:?}"
            );
            assert!(vouch.usable(hi) <= hi);
        }
    }
}
