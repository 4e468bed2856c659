//! A node's configuration: the settings behind [`Cluster`], their allowed
//! ranges, and the `cluster://` URL that sets them (durations as `250ms`,
//! `3s`, `2m`; the older `_ms` options as integers of milliseconds).

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Cluster, Faults};
use crate::backend::Backend;
use crate::backend::kit::duration::{ranged, show};
use crate::backend::kit::secret::Secret;
use crate::{Error, Result, redact_url};

#[derive(Clone)]
pub(crate) struct Settings {
    pub(super) listen: String,
    pub(super) advertise: Option<String>,
    pub(super) seeds: Vec<String>,
    pub(super) cookie: Option<Secret>,
    pub(super) heartbeat: Duration,
    pub(super) failure_timeout: Duration,
    pub(super) join_timeout: Duration,
    pub(super) redial: Duration,
    /// How long `start()` may try to hear from a seed (`None`: the
    /// runtime's default).
    pub(super) start_timeout: Option<Duration>,
    pub(super) faults: Option<Faults>,
    /// Where the listener of the last node started from this configuration
    /// (or a clone of it) is bound: shared by the clones.
    pub(super) bound: Arc<Mutex<Option<SocketAddr>>>,
}

/// A duration setting: its URL options (a duration, and the older integer
/// of milliseconds), its builder method, and its range.
struct Timing {
    key: &'static str,
    ms_key: &'static str,
    method: &'static str,
    min: Duration,
    max: Duration,
}

impl Timing {
    fn range(&self) -> RangeInclusive<Duration> {
        self.min..=self.max
    }
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const HEARTBEAT: Timing = Timing {
    key: "heartbeat",
    ms_key: "heartbeat_ms",
    method: "heartbeat",
    min: ms(10),
    max: ms(60_000),
};
const FAILURE_TIMEOUT: Timing = Timing {
    key: "failure_timeout",
    ms_key: "failure_timeout_ms",
    method: "failure_timeout",
    min: ms(50),
    max: ms(600_000),
};
const JOIN_TIMEOUT: Timing = Timing {
    key: "join_timeout",
    ms_key: "join_ms",
    method: "join_timeout",
    min: ms(0),
    max: ms(600_000),
};
const REDIAL: Timing = Timing {
    key: "redial",
    ms_key: "redial_ms",
    method: "redial",
    min: ms(10),
    max: ms(60_000),
};
/// The range of `start_timeout`.
const START_TIMEOUT: RangeInclusive<Duration> = ms(100)..=ms(600_000);
/// At most this many seeds.
const MAX_SEEDS: usize = 1024;
/// A cookie on a listen address other hosts can reach has at least this
/// many bytes.
pub(crate) const MIN_PUBLIC_COOKIE: usize = 16;

impl Settings {
    /// A node listening on `listen`, with no seeds, no cookie of its own
    /// and the default timings.
    pub(super) fn new(listen: String) -> Settings {
        Settings {
            listen,
            advertise: None,
            seeds: Vec::new(),
            cookie: None,
            heartbeat: ms(200),
            failure_timeout: ms(1_000),
            join_timeout: ms(500),
            redial: ms(100),
            start_timeout: None,
            faults: None,
            bound: Arc::default(),
        }
    }

    /// Checks every duration and count. `url` is the redacted URL the
    /// settings came from, to name its keys in the error; without it the
    /// builder methods are named.
    pub(super) fn validate(&self, url: Option<&str>) -> Result<()> {
        for (t, value) in [
            (&HEARTBEAT, self.heartbeat),
            (&FAILURE_TIMEOUT, self.failure_timeout),
            (&JOIN_TIMEOUT, self.join_timeout),
            (&REDIAL, self.redial),
        ] {
            if !t.range().contains(&value) {
                return Err(Error::config(match url {
                    // A duration option is checked as it is read: only the
                    // milliseconds ones get here.
                    Some(url) => format!(
                        "`{url}`: {} must be between {} and {} (milliseconds), got {}",
                        t.ms_key,
                        t.min.as_millis(),
                        t.max.as_millis(),
                        value.as_millis()
                    ),
                    None => format!(
                        "cluster backend: Cluster::{} must be between {} and {}, got {}",
                        t.method,
                        show(t.min),
                        show(t.max),
                        show(value)
                    ),
                }));
            }
        }
        if let Some(t) = self.start_timeout.filter(|t| !START_TIMEOUT.contains(t)) {
            return Err(Error::config(format!(
                "cluster backend: Cluster::start_timeout must be between {} and {}, got {}",
                show(*START_TIMEOUT.start()),
                show(*START_TIMEOUT.end()),
                show(t)
            )));
        }
        if self.failure_timeout <= self.heartbeat {
            return Err(Error::config(format!(
                "{}the failure timeout ({}) must be longer than the heartbeat ({}): several \
                 heartbeats long",
                url.map(|u| format!("`{u}`: "))
                    .unwrap_or_else(|| "cluster backend: ".to_string()),
                show(self.failure_timeout),
                show(self.heartbeat)
            )));
        }
        if self.seeds.len() > MAX_SEEDS {
            return Err(Error::config(format!(
                "cluster backend: {} seeds given, at most {MAX_SEEDS} are allowed; list a few \
                 members, the others are learned from them",
                self.seeds.len()
            )));
        }
        if self.cookie.as_ref().is_some_and(Secret::is_empty) {
            return Err(Error::config(format!(
                "{}the cluster cookie is empty: anyone could compute its proofs. Use a long random \
                 secret, the same on every node, e.g. `head -c 32 /dev/urandom | base64`",
                url.map(|u| format!("`{u}`: ")).unwrap_or_default()
            )));
        }
        Ok(())
    }
}

/// Parses `cluster://HOST:PORT?seeds=a:7400,b:7400`, with optional
/// `advertise=HOST:PORT`, the durations `heartbeat`, `failure_timeout`,
/// `join_timeout`, `redial` and `start_timeout` (`250ms`, `3s`, `2m`), the
/// older `heartbeat_ms`, `failure_timeout_ms`, `join_ms` and `redial_ms`
/// (integers of milliseconds), and `cookie` (prefer `HIGHLANDER_COOKIE`:
/// URLs end up in process listings).
pub(crate) fn from_url(url: &str) -> Result<Box<dyn Backend>> {
    Ok(Box::new(parse(url)?))
}

/// The node a `cluster://` URL configures, checked.
fn parse(url: &str) -> Result<Cluster> {
    let shown = redact_url(url);
    let rest = url
        .strip_prefix("cluster://")
        .ok_or_else(|| Error::config(format!("`{shown}` is not a cluster:// URL")))?;
    let (listen, query) = rest.split_once('?').unwrap_or((rest, ""));
    let listen = listen.trim_end_matches('/');
    if listen.is_empty() || !listen.contains(':') {
        return Err(Error::config(format!(
            "`{shown}` needs a listen address with a port, as in \
             cluster://0.0.0.0:7400?seeds=host1:7400,host2:7400"
        )));
    }
    let mut cluster = Cluster::new(listen);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = |why: String| Error::config(format!("`{shown}`: {why}"));
        let millis = || {
            value
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| bad(format!("`{key}` must be a number of milliseconds")))
        };
        let timing = |t: &Timing| ranged(t.key, value, t.range()).map_err(&bad);
        cluster = match key {
            "seeds" => cluster.seeds(value.split(',').map(str::trim).filter(|s| !s.is_empty())),
            "advertise" => cluster.advertise(value),
            "cookie" => cluster.cookie(value),
            "heartbeat" => cluster.heartbeat(timing(&HEARTBEAT)?),
            "heartbeat_ms" => cluster.heartbeat(millis()?),
            "failure_timeout" => cluster.failure_timeout(timing(&FAILURE_TIMEOUT)?),
            "failure_timeout_ms" => cluster.failure_timeout(millis()?),
            "join_timeout" => cluster.join_timeout(timing(&JOIN_TIMEOUT)?),
            "join_ms" => cluster.join_timeout(millis()?),
            "redial" => cluster.redial(timing(&REDIAL)?),
            "redial_ms" => cluster.redial(millis()?),
            "start_timeout" => {
                cluster.start_timeout(ranged(key, value, START_TIMEOUT).map_err(&bad)?)
            }
            _ => {
                return Err(bad(format!(
                    "unknown parameter `{key}`; use seeds, advertise, heartbeat, failure_timeout, \
                     join_timeout, redial, start_timeout (durations like 250ms or 3s; \
                     heartbeat_ms, failure_timeout_ms, join_ms and redial_ms take milliseconds) \
                     and HIGHLANDER_COOKIE for the secret"
                )));
            }
        };
    }
    cluster.settings.validate(Some(&shown))?;
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_hide_the_cookie() {
        let b = from_url(
            "cluster://0.0.0.0:7400?seeds=a:7400,b:7400&cookie=hunter2&failure_timeout_ms=800",
        )
        .unwrap();
        assert_eq!(b.describe(), "cluster://0.0.0.0:7400?seeds=a:7400,b:7400");
        let err = from_url("cluster://0.0.0.0:7400?cookie=hunter2&bogus=1")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bogus") && !err.contains("hunter2"), "{err}");
        assert!(from_url("cluster://?seeds=a:1").is_err());
        assert!(from_url("cluster://127.0.0.1:1?heartbeat_ms=500&failure_timeout_ms=400").is_err());
        let dbg = format!("{:?}", Cluster::new("127.0.0.1:1").cookie("hunter2"));
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    #[test]
    fn an_empty_cookie_in_the_url_is_refused() {
        let err = from_url("cluster://0.0.0.0:7400?cookie=")
            .err()
            .expect("an empty cookie is refused")
            .to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn numbers_out_of_range_are_refused_with_one_line() {
        for (url, key) in [
            (
                "cluster://127.0.0.1:0?failure_timeout_ms=18446744073709551615",
                "failure_timeout_ms",
            ),
            ("cluster://127.0.0.1:0?redial_ms=0", "redial_ms"),
            ("cluster://127.0.0.1:0?heartbeat_ms=0", "heartbeat_ms"),
            (
                "cluster://127.0.0.1:0?heartbeat_ms=18446744073709551615",
                "heartbeat_ms",
            ),
            (
                "cluster://127.0.0.1:0?join_ms=18446744073709551615",
                "join_ms",
            ),
            (
                "cluster://127.0.0.1:0?redial_ms=18446744073709551615",
                "redial_ms",
            ),
        ] {
            let err = from_url(url)
                .err()
                .unwrap_or_else(|| panic!("{url} is refused"));
            let err = err.to_string();
            assert!(err.contains(key) && err.contains("between"), "{url}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[tokio::test]
    async fn builder_numbers_out_of_range_are_refused() {
        for (cluster, what) in [
            (
                Cluster::new("127.0.0.1:0").heartbeat(Duration::ZERO),
                "heartbeat",
            ),
            (Cluster::new("127.0.0.1:0").redial(Duration::ZERO), "redial"),
            (
                Cluster::new("127.0.0.1:0").failure_timeout(Duration::MAX),
                "failure_timeout",
            ),
            (
                Cluster::new("127.0.0.1:0").join_timeout(Duration::MAX),
                "join_timeout",
            ),
        ] {
            let err = cluster
                .connect("a")
                .await
                .err()
                .unwrap_or_else(|| panic!("{what} out of range is refused"))
                .to_string();
            assert!(err.contains(what) && err.contains("between"), "{err}");
        }
    }

    #[test]
    fn durations_read_as_durations_and_the_millisecond_options_still_work() {
        let timings = |url: &str| {
            let s = parse(url).unwrap().settings;
            (s.heartbeat, s.failure_timeout, s.join_timeout, s.redial)
        };
        let want = (ms(50), ms(2_000), ms(1_000), ms(250));
        assert_eq!(
            timings(
                "cluster://127.0.0.1:0?heartbeat=50ms&failure_timeout=2s&join_timeout=1s&redial=250ms"
            ),
            want
        );
        assert_eq!(
            timings(
                "cluster://127.0.0.1:0?heartbeat_ms=50&failure_timeout_ms=2000&join_ms=1000&redial_ms=250"
            ),
            want
        );
        // The defaults, and the start timeout the runtime asks the backend.
        assert_eq!(
            timings("cluster://127.0.0.1:0"),
            (ms(200), ms(1_000), ms(500), ms(100))
        );
        let b = from_url("cluster://127.0.0.1:0?start_timeout=45s").unwrap();
        assert_eq!(b.start_timeout(), Some(Duration::from_secs(45)));
        assert_eq!(
            from_url("cluster://127.0.0.1:0").unwrap().start_timeout(),
            None
        );
        let built = Cluster::new("127.0.0.1:0").start_timeout(Duration::from_secs(3));
        assert_eq!(Backend::start_timeout(&built), Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_duration_without_a_unit_or_out_of_range_is_refused_with_one_line() {
        for (url, key, hint) in [
            (
                "cluster://127.0.0.1:0?heartbeat=200",
                "heartbeat",
                "add a unit",
            ),
            (
                "cluster://127.0.0.1:0?failure_timeout=1h",
                "failure_timeout",
                "between 50ms and 10m",
            ),
            (
                "cluster://127.0.0.1:0?join_timeout=soon",
                "join_timeout",
                "between 0s and 10m",
            ),
            (
                "cluster://127.0.0.1:0?redial=5ms",
                "redial",
                "between 10ms and 1m",
            ),
            (
                "cluster://127.0.0.1:0?start_timeout=30",
                "start_timeout",
                "like `30s`",
            ),
            (
                "cluster://127.0.0.1:0?start_timeout=1h",
                "start_timeout",
                "between 100ms and 10m",
            ),
            (
                "cluster://127.0.0.1:0?heartbeat_ms=5s",
                "heartbeat_ms",
                "number of milliseconds",
            ),
        ] {
            let err = from_url(url)
                .err()
                .unwrap_or_else(|| panic!("{url} is refused"))
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{url}: {err}");
            assert!(err.contains(hint), "{url}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = from_url("cluster://127.0.0.1:0?heartbeat=500ms&failure_timeout=400ms")
            .err()
            .expect("a failure timeout shorter than the heartbeat")
            .to_string();
        assert!(err.contains("400ms") && err.contains("500ms"), "{err}");
    }

    #[tokio::test]
    async fn a_start_timeout_out_of_range_is_refused_from_the_builder() {
        let err = Cluster::new("127.0.0.1:0")
            .start_timeout(Duration::from_millis(10))
            .connect("a")
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("start_timeout") && err.contains("between"),
            "{err}"
        );
    }
}
