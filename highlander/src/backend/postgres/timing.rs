//! The clocks of the lease argument (`docs/postgres.md`): how long the
//! client vouches for its tenures after a successful round trip, which
//! dead-peer detection it asks the server for, and when the driver sends its
//! next heartbeat or probe. Plain arithmetic on instants, no I/O.

use std::time::Duration;

use tokio::time::Instant;

use crate::backend::kit::vouch::Vouch;

/// The largest dead-peer detection a session can ask the server for:
/// `tcp_user_timeout` is a 32-bit count of milliseconds, in whole seconds.
pub(crate) const MAX_SERVER_TIMEOUT: Duration = Duration::from_secs(i32::MAX as u64 / 1000);

/// The clocks of the lease argument (see `docs/postgres.md`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) heartbeat: Duration,
    pub(crate) poll: Duration,
    pub(crate) server_timeout: Duration,
    pub(crate) margin: Duration,
    /// Bound on the clock rate error between client and server, in parts
    /// per million.
    pub(crate) drift_ppm: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_secs(1),
            poll: Duration::from_millis(20),
            server_timeout: Duration::from_secs(15),
            margin: Duration::from_secs(1),
            drift_ppm: 10_000,
        }
    }
}

impl Timing {
    /// The CP bound with this backend's drift and margin.
    fn rule(&self) -> Vouch {
        Vouch::new(self.drift_ppm, self.margin)
    }

    /// How long after the send time of its last successful round trip the
    /// client still vouches for a tenure whose instance needs `budget` to
    /// stop, when the server's dead-peer detection is `x`:
    /// `x·(1 − ρ) − budget − margin`.
    pub(crate) fn vouch(&self, x: Duration, budget: Duration) -> Duration {
        self.rule().usable(x).saturating_sub(budget)
    }

    /// The server-side detection needed for tenures with `budget`: the
    /// configured one, raised so that the client still vouches for at least
    /// three heartbeats. Whole seconds (keepalive settings are seconds).
    /// `None` when it would exceed what a server takes
    /// ([`MAX_SERVER_TIMEOUT`]): no tenure with that budget can be vouched for.
    pub(crate) fn server_timeout_for(&self, budget: Duration) -> Option<Duration> {
        let min_vouch = self
            .heartbeat
            .saturating_mul(3)
            .max(Duration::from_millis(500));
        let needed = self.rule().timeout_for(budget.saturating_add(min_vouch));
        if needed > MAX_SERVER_TIMEOUT {
            return None;
        }
        let x = self.server_timeout.max(needed);
        let x = Duration::from_secs(x.as_secs() + u64::from(x.subsec_nanos() > 0));
        (x <= MAX_SERVER_TIMEOUT).then_some(x)
    }

    /// The per-session server settings that end a silent session no sooner
    /// than `x` after the server last heard from it: `tcp_user_timeout = x`
    /// and keepalives with `idle + count × interval = x` (or more).
    pub(crate) fn server_params(x: Duration) -> ServerParams {
        let secs = x.as_secs().max(1);
        let count = 4;
        let interval = (secs / 8).max(1);
        let idle = secs.saturating_sub(count * interval).max(1);
        ServerParams {
            user_timeout_ms: secs * 1000,
            idle,
            interval,
            count,
        }
    }

    /// The first server timeout a session asks for: the configured one (in
    /// whole seconds). A claim whose budget needs more raises it first.
    pub(crate) fn initial_server_timeout(&self) -> Duration {
        // The URL's and the builder's ranges keep this far below the limit.
        self.server_timeout_for(Duration::ZERO)
            .unwrap_or(MAX_SERVER_TIMEOUT)
    }

    /// When the driver next sends a round trip after the one it sent at
    /// `last`: a probe of the holders it waits on every poll interval while
    /// any claim waits, otherwise a heartbeat every heartbeat interval.
    pub(crate) fn next_round_trip(&self, last: Instant, waiting: bool) -> Instant {
        last + if waiting { self.poll } else { self.heartbeat }
    }

    /// How long a session that gave its tenures up keeps its connection
    /// (and so its ids) open: the instances' stop budget and the margin, so
    /// that no other node starts before they stopped.
    pub(crate) fn drain(&self, budget: Duration) -> Duration {
        budget + self.margin
    }
}

/// `tcp_user_timeout` (ms) and `tcp_keepalives_{idle,interval,count}` (s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerParams {
    pub(crate) user_timeout_ms: u64,
    pub(crate) idle: u64,
    pub(crate) interval: u64,
    pub(crate) count: u64,
}

impl ServerParams {
    /// The earliest the server can end a silent session, in seconds:
    /// `min(tcp_user_timeout, idle + count × interval)`.
    pub(crate) fn detection(&self) -> Duration {
        let keepalive = self.idle + self.count * self.interval;
        Duration::from_millis(self.user_timeout_ms.min(keepalive * 1000))
    }

    /// The settings as startup options (`-c name=value`).
    pub(crate) fn options(&self) -> String {
        format!(
            "-c tcp_user_timeout={} -c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={}",
            self.user_timeout_ms, self.idle, self.interval, self.count
        )
    }

    /// The settings as the text parameters of [`RAISE_TIMEOUTS`](super::sql::RAISE_TIMEOUTS).
    pub(crate) fn values(&self) -> [String; 4] {
        [
            self.user_timeout_ms.to_string(),
            self.idle.to_string(),
            self.interval.to_string(),
            self.count.to_string(),
        ]
    }
}

/// What the client can still vouch for in one connection: the send time of
/// its latest successful round trip, and the server's detection in force
/// when it was sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Vouched {
    last_ok: Instant,
    x: Duration,
}

impl Vouched {
    /// A connection whose setup round trip was sent at `sent`, with the
    /// server's detection `x`.
    pub(crate) fn new(sent: Instant, x: Duration) -> Vouched {
        Vouched { last_ok: sent, x }
    }

    /// A round trip sent at `sent`, while the detection was `x`, succeeded.
    /// Answers may arrive out of order: only a later send time counts.
    pub(crate) fn note_ok(&mut self, sent: Instant, x: Duration) {
        if sent > self.last_ok {
            self.last_ok = sent;
            self.x = x;
        }
    }

    /// The send time of the latest successful round trip.
    pub(crate) fn last_ok(&self) -> Instant {
        self.last_ok
    }

    /// When every tenure whose instance needs at most `budget` to stop
    /// must be given up unless a round trip succeeds first.
    pub(crate) fn deadline(&self, timing: &Timing, budget: Duration) -> Instant {
        timing.rule().deadline(self.last_ok, self.x, budget)
    }

    /// Whether the tenures just granted can be kept: `budget` is the
    /// largest stop budget of the epoch's tenures, `granted` the largest of
    /// the ones just granted. The new largest budget, or why the grant came
    /// too late to vouch for it (then the session gives everything up).
    pub(crate) fn admit(
        &self,
        timing: &Timing,
        budget: Duration,
        granted: Duration,
        now: Instant,
    ) -> Result<Duration, String> {
        let budget = budget.max(granted);
        if now >= self.deadline(timing, budget) {
            return Err("the claim's answer came too late to vouch for it".to_string());
        }
        Ok(budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_SHUTDOWN;

    /// The defaults of the lease argument in docs/postgres.md.
    #[test]
    fn default_timing() {
        let t = Timing::default();
        let x = t.initial_server_timeout();
        assert_eq!(x, Duration::from_secs(15));
        // The default budget needs no more than the default timeout.
        assert_eq!(t.server_timeout_for(DEFAULT_SHUTDOWN), Some(x));
        let p = Timing::server_params(x);
        assert_eq!(
            p,
            ServerParams {
                user_timeout_ms: 15_000,
                idle: 11,
                interval: 1,
                count: 4
            }
        );
        assert_eq!(p.detection(), Duration::from_secs(15));
        // 15 s × 0.99 − 5 s − 1 s
        assert_eq!(t.vouch(x, DEFAULT_SHUTDOWN), Duration::from_millis(8_850));
        // A 30 s budget raises the server's timeout so the client still
        // vouches for three heartbeats.
        let x30 = t.server_timeout_for(Duration::from_secs(30)).unwrap();
        assert!(t.vouch(x30, Duration::from_secs(30)) >= Duration::from_secs(3));
        assert!(x30 < Duration::from_secs(36));
    }

    /// Any stop budget: the timing arithmetic never panics.
    #[test]
    fn huge_budgets_do_not_panic() {
        let t = Timing::default();
        assert_eq!(t.server_timeout_for(Duration::MAX), None);
        let days = Duration::from_secs(30 * 86_400);
        assert_eq!(t.server_timeout_for(days), None);
        let x = t
            .server_timeout_for(Duration::from_secs(20 * 86_400))
            .unwrap();
        assert!(x <= MAX_SERVER_TIMEOUT);
        let _ = t.vouch(x, Duration::MAX);
        assert!(Timing::server_params(x).user_timeout_ms <= i32::MAX as u64);
    }

    #[test]
    fn server_params_never_detect_sooner_than_asked() {
        for secs in 1..200 {
            let x = Duration::from_secs(secs);
            assert!(Timing::server_params(x).detection() >= x, "{secs}");
        }
    }

    #[test]
    fn server_params_as_options_and_values() {
        let p = Timing::server_params(Duration::from_secs(40));
        assert_eq!(
            p.options(),
            "-c tcp_user_timeout=40000 -c tcp_keepalives_idle=20 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=4"
        );
        assert_eq!(p.values(), ["40000", "20", "5", "4"].map(String::from));
    }

    /// The deadline follows the latest *send* time that succeeded, with the
    /// detection in force when it was sent; a late answer to an older
    /// round trip moves nothing.
    #[test]
    fn the_deadline_follows_the_latest_successful_send() {
        let t = Timing::default();
        let x = Duration::from_secs(15);
        let start = Instant::now();
        let mut v = Vouched::new(start, x);
        let budget = DEFAULT_SHUTDOWN;
        assert_eq!(v.deadline(&t, budget), start + Duration::from_millis(8_850));
        let later = start + Duration::from_secs(2);
        v.note_ok(later, x);
        assert_eq!(v.last_ok(), later);
        assert_eq!(v.deadline(&t, budget), later + Duration::from_millis(8_850));
        // An older round trip answered late, even under a larger detection.
        v.note_ok(start + Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(v.last_ok(), later);
        assert_eq!(v.deadline(&t, budget), later + Duration::from_millis(8_850));
        // A raise counts from the first round trip sent under it.
        let raised = Duration::from_secs(30);
        v.note_ok(later + Duration::from_secs(1), raised);
        assert_eq!(
            v.deadline(&t, budget),
            later + Duration::from_secs(1) + t.vouch(raised, budget)
        );
        // A larger budget means an earlier deadline.
        assert!(v.deadline(&t, Duration::from_secs(10)) < v.deadline(&t, budget));
    }

    #[test]
    fn grants_are_admitted_only_before_the_deadline() {
        let t = Timing::default();
        let start = Instant::now();
        let v = Vouched::new(start, Duration::from_secs(15));
        let five = Duration::from_secs(5);
        // The epoch's budget grows to the largest granted one.
        assert_eq!(v.admit(&t, Duration::ZERO, five, start), Ok(five));
        assert_eq!(v.admit(&t, five, Duration::ZERO, start), Ok(five));
        // 15 s × 0.99 − 5 s − 1 s = 8.85 s
        let just_before = start + Duration::from_millis(8_849);
        assert_eq!(v.admit(&t, Duration::ZERO, five, just_before), Ok(five));
        let at = start + Duration::from_millis(8_850);
        assert!(v.admit(&t, Duration::ZERO, five, at).is_err());
        // A budget larger than the detection can vouch for is refused at once.
        let err = v
            .admit(&t, Duration::ZERO, Duration::from_secs(20), start)
            .unwrap_err();
        assert!(err.contains("too late"), "{err}");
    }

    #[test]
    fn round_trips_follow_the_poll_while_waiting() {
        let t = Timing::default();
        let last = Instant::now();
        assert_eq!(t.next_round_trip(last, false), last + t.heartbeat);
        assert_eq!(t.next_round_trip(last, true), last + t.poll);
        assert_eq!(t.drain(Duration::from_secs(5)), Duration::from_secs(6));
    }
}
