//! Reading the URL: the parameters this backend reads itself (namespace, TLS
//! files and mode, the timing options and their ranges) are split off, the
//! rest goes to tokio-postgres; and the URL shown in messages, never with its
//! password.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::timing::Timing;
use super::tls::Mode;
use crate::backend::kit::duration::{ranged, show};
use crate::backend::kit::url::percent_decode;

/// What the URL says, before the builder's values are laid over it.
pub(super) struct Parsed {
    pub(super) pg: tokio_postgres::Config,
    pub(super) namespace: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
    pub(super) mode: Mode,
    pub(super) timing: Timing,
    /// `start_timeout=`: how long `start()` keeps trying.
    pub(super) start_timeout: Option<Duration>,
}

/// The allowed ranges of the URL's (and the builder's) numbers.
type Range = std::ops::RangeInclusive<Duration>;

/// A duration option and its allowed range, one rule for the URL and the
/// builder.
pub(super) struct Knob {
    /// The option's name, in the URL and as a method of `Postgres`.
    pub(super) name: &'static str,
    range: Range,
}

pub(super) const HEARTBEAT: Knob = Knob {
    name: "heartbeat",
    range: Duration::from_millis(10)..=Duration::from_secs(600),
};
pub(super) const POLL: Knob = Knob {
    name: "presence_poll",
    range: Duration::from_millis(1)..=Duration::from_secs(60),
};
pub(super) const SERVER_TIMEOUT: Knob = Knob {
    name: "server_timeout",
    range: Duration::from_secs(1)..=Duration::from_secs(86_400),
};
pub(super) const MARGIN: Knob = Knob {
    name: "margin",
    range: Duration::ZERO..=Duration::from_secs(3_600),
};
const CONNECT_TIMEOUT: Knob = Knob {
    name: "connect_timeout",
    range: Duration::from_secs(1)..=Duration::from_secs(3_600),
};
/// How long `start()` keeps trying to reach the server.
const START_TIMEOUT: Knob = Knob {
    name: "start_timeout",
    range: Duration::from_millis(100)..=Duration::from_secs(600),
};

/// The field of [`Timing`] an option sets.
type Field = fn(&mut Timing) -> &mut Duration;

/// The timing options, and the field of [`Timing`] each one sets.
const TIMING_KNOBS: [(&Knob, Field); 4] = [
    (&HEARTBEAT, |t| &mut t.heartbeat),
    (&POLL, |t| &mut t.poll),
    (&SERVER_TIMEOUT, |t| &mut t.server_timeout),
    (&MARGIN, |t| &mut t.margin),
];

impl Knob {
    /// `value` when it is within the range; otherwise one line naming the
    /// option and the range.
    pub(super) fn check(&self, value: Duration) -> Result<Duration, String> {
        if self.range.contains(&value) {
            Ok(value)
        } else {
            Err(self.range_text())
        }
    }

    /// A duration parameter (with its unit), checked against the range.
    fn parse(&self, value: &str) -> Result<Duration, String> {
        ranged(self.name, value, self.range.clone())
    }

    fn range_text(&self) -> String {
        format!(
            "`{}` must be a duration between {} and {}",
            self.name,
            show(*self.range.start()),
            show(*self.range.end())
        )
    }
}

/// Splits off the parameters this backend reads itself and hands the rest
/// to tokio-postgres. Every message shows the URL with its password hidden.
pub(super) fn parse_url(url: &str) -> Result<Parsed, String> {
    let url = url.trim();
    // Never the URL itself: a password with an unescaped `/`, `?`, `&` or
    // `=` would defeat any redaction of the raw text.
    let bad = |why: &dyn fmt::Display| format!("invalid postgres URL: {why}");
    let rest = match url.split_once("://") {
        Some(("postgres" | "postgresql", rest)) => rest,
        _ => return Err(bad(&"it must start with postgres:// or postgresql://")),
    };
    // The credentials end at the first `@` (as tokio-postgres reads them):
    // the query starts at the first `?` after it.
    let after_credentials = url.len() - rest.len() + rest.find('@').map_or(0, |at| at + 1);
    let (head, query) = match url[after_credentials..].find('?') {
        Some(q) => (
            &url[..after_credentials + q],
            &url[after_credentials + q + 1..],
        ),
        None => (url, ""),
    };
    let mut namespace = None;
    let mut ca_file = None;
    let mut client_cert = None;
    let mut client_key = None;
    let mut mode = Mode::Prefer;
    let mut timing = Timing::default();
    let mut connect_timeout = None;
    let mut start_timeout = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || percent_decode(value).map_err(|e| bad(&e));
        if let Some((knob, field)) = TIMING_KNOBS.iter().find(|(knob, _)| knob.name == key) {
            *field(&mut timing) = knob.parse(value).map_err(|e| bad(&e))?;
            continue;
        }
        match key {
            "namespace" => namespace = Some(decoded()?),
            "sslrootcert" => ca_file = Some(PathBuf::from(decoded()?)),
            "sslmode" => mode = Mode::from_url(value).map_err(|e| bad(&e))?,
            "connect_timeout" => {
                connect_timeout = Some(CONNECT_TIMEOUT.parse(value).map_err(|e| bad(&e))?)
            }
            "start_timeout" => {
                start_timeout = Some(START_TIMEOUT.parse(value).map_err(|e| bad(&e))?)
            }
            "keepalives"
            | "keepalives_idle"
            | "keepalives_interval"
            | "keepalives_retries"
            | "tcp_user_timeout" => {
                return Err(bad(&format!(
                    "`{key}` is set by the backend itself (its dead-peer timing follows server_timeout): remove it"
                )));
            }
            "sslcert" => client_cert = Some(PathBuf::from(decoded()?)),
            "sslkey" => client_key = Some(PathBuf::from(decoded()?)),
            "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(bad(&format!(
                    "`{key}` is not supported: use an unencrypted client key file, and no CRL"
                )));
            }
            _ => rest.push(pair),
        }
    }
    let mut base = head.to_string();
    if mode == Mode::Disable {
        rest.push("sslmode=disable");
    }
    if !rest.is_empty() {
        base.push('?');
        base.push_str(&rest.join("&"));
    }
    let mut pg: tokio_postgres::Config = base.parse().map_err(|e: tokio_postgres::Error| {
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = format!("{why}: {s}");
            source = s.source();
        }
        bad(&why)
    })?;
    if pg.get_hosts().is_empty() {
        return Err(bad(&"no host"));
    }
    if let Some(timeout) = connect_timeout {
        pg.connect_timeout(timeout);
    }
    Ok(Parsed {
        pg,
        namespace,
        ca_file,
        client_cert,
        client_key,
        mode,
        timing,
        start_timeout,
    })
}

/// `postgres://user@host:port/db`, rebuilt from the parsed URL: never the
/// password, never the raw text.
pub(super) fn shown_url(pg: &tokio_postgres::Config) -> String {
    let target = target_of(pg);
    let (hosts, user) = target.rsplit_once(" as ").unwrap_or((&target, ""));
    match pg.get_user() {
        Some(_) => format!("postgres://{user}@{hosts}"),
        None => format!("postgres://{hosts}"),
    }
}

/// `host:port/db as user`, for messages (never the password).
pub(super) fn target_of(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = pg
                .get_ports()
                .get(i)
                .or(pg.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match h {
                Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let user = pg.get_user().unwrap_or("(default user)");
    let db = pg.get_dbname().unwrap_or(user);
    format!("{}/{db} as {user}", hosts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durations take a unit, in every option; a bare number is refused
    /// with a hint (libpq's `connect_timeout=10` included).
    #[test]
    fn durations_take_a_unit() {
        let p = parse_url(
            "postgres://db/app?heartbeat=1.5s&presence_poll=250ms&server_timeout=2m&margin=0s&connect_timeout=1h&start_timeout=10s",
        )
        .unwrap();
        assert_eq!(p.timing.heartbeat, Duration::from_millis(1_500));
        assert_eq!(p.timing.poll, Duration::from_millis(250));
        assert_eq!(p.timing.server_timeout, Duration::from_secs(120));
        assert_eq!(p.timing.margin, Duration::ZERO);
        assert_eq!(
            p.pg.get_connect_timeout(),
            Some(&Duration::from_secs(3_600))
        );
        assert_eq!(p.start_timeout, Some(Duration::from_secs(10)));
        assert_eq!(parse_url("postgres://db").unwrap().start_timeout, None);
        for (query, message) in [
            (
                "connect_timeout=10",
                "`connect_timeout` must be a duration between 1s and 1h (like 250ms, 3s or 2m), not `10`: add a unit, like `10s`",
            ),
            (
                "start_timeout=50ms",
                "`start_timeout` must be a duration between 100ms and 10m (like 250ms, 3s or 2m), not `50ms`",
            ),
            (
                "heartbeat=soon",
                "`heartbeat` must be a duration between 10ms and 10m (like 250ms, 3s or 2m), not `soon`",
            ),
        ] {
            let err = parse_url(&format!("postgres://db?{query}"))
                .err()
                .expect(query);
            assert_eq!(err, format!("invalid postgres URL: {message}"));
        }
    }

    #[test]
    fn knobs_hold_their_ranges() {
        assert_eq!(
            HEARTBEAT.check(Duration::from_millis(10)),
            Ok(Duration::from_millis(10))
        );
        assert_eq!(
            HEARTBEAT.check(Duration::from_millis(9)),
            Err("`heartbeat` must be a duration between 10ms and 10m".to_string())
        );
        assert_eq!(MARGIN.check(Duration::ZERO), Ok(Duration::ZERO));
        let err = POLL.parse("2h").unwrap_err();
        assert_eq!(
            err,
            "`presence_poll` must be a duration between 1ms and 1m (like 250ms, 3s or 2m), not `2h`"
        );
        // A long value is cut in the message.
        let err = SERVER_TIMEOUT
            .parse(&format!("{}s", "9".repeat(100)))
            .unwrap_err();
        assert!(err.ends_with(&format!("not `{}`", "9".repeat(40))), "{err}");
    }

    /// Values are percent-decoded strictly; a `+` is a plus.
    #[test]
    fn percent_escapes_decode() {
        let namespace =
            |v: &str| parse_url(&format!("postgres://db?namespace={v}")).map(|p| p.namespace);
        assert_eq!(
            namespace("billing%2Fv2"),
            Ok(Some("billing/v2".to_string()))
        );
        assert_eq!(namespace("a+b"), Ok(Some("a+b".to_string())));
        assert_eq!(namespace("%C3%A9"), Ok(Some("é".to_string())));
        for bad in ["%4", "%zz", "%FF"] {
            let err = namespace(bad).unwrap_err();
            assert!(
                err.starts_with("invalid postgres URL: a `%` escape"),
                "{err}"
            );
        }
    }

    #[test]
    fn backend_parameters_are_split_off() {
        let p = parse_url(
            "postgresql://app:pw@db:6543/app?namespace=ns&application_name=x&heartbeat=2s&sslmode=disable&connect_timeout=3s",
        )
        .unwrap();
        assert_eq!(p.namespace.as_deref(), Some("ns"));
        assert_eq!(p.mode, Mode::Disable);
        assert_eq!(p.timing.heartbeat, Duration::from_secs(2));
        assert_eq!(p.pg.get_application_name(), Some("x"));
        assert_eq!(p.pg.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(shown_url(&p.pg), "postgres://app@db:6543/app");
        let p = parse_url("postgres://db").unwrap();
        assert_eq!(target_of(&p.pg), "db:5432/(default user) as (default user)");
        assert_eq!(shown_url(&p.pg), "postgres://db:5432/(default user)");
        for bad in [
            "mysql://db",
            "postgres://",
            "postgres://db?sslmode=allow-ish",
        ] {
            let err = parse_url(bad).err().expect(bad);
            assert!(err.starts_with("invalid postgres URL: "), "{err}");
        }
    }
}
