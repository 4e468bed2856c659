//! Reading the URL: the parameters this backend reads itself (namespace, TLS
//! files and mode, the timing options and their ranges) are split off, the
//! rest goes to tokio-postgres; and the URL shown in messages, never with its
//! password.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::timing::Timing;
use super::tls::Mode;

/// What the URL says, before the builder's values are laid over it.
pub(super) struct Parsed {
    pub(super) pg: tokio_postgres::Config,
    pub(super) namespace: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
    pub(super) mode: Mode,
    pub(super) timing: Timing,
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

    /// A duration parameter, checked against the range.
    fn parse(&self, value: &str) -> Result<Duration, String> {
        parse_duration(value)
            .ok()
            .and_then(|d| self.check(d).ok())
            .ok_or_else(|| {
                format!(
                    "{} (like 250ms, 3s or 2m), not `{}`",
                    self.range_text(),
                    value.chars().take(40).collect::<String>()
                )
            })
    }

    fn range_text(&self) -> String {
        format!(
            "`{}` must be a duration between {} and {}",
            self.name,
            show_duration(*self.range.start()),
            show_duration(*self.range.end())
        )
    }
}

/// `250ms`, `3s`, `1.5s`, `2m`, `1h`.
fn parse_duration(value: &str) -> Result<Duration, String> {
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{value}` is not a duration like 250ms, 3s or 2m"))?;
    let secs = match unit {
        "ms" => number / 1000.0,
        "s" | "" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("`{value}` is not a duration like 250ms, 3s or 2m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{value}`: {e}"))
}

/// `250ms`, `3s`, `2m`, `1h`: as the URL writes them.
fn show_duration(d: Duration) -> String {
    if d.is_zero() {
        "0s".to_string()
    } else if d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else if d.as_secs().is_multiple_of(3600) {
        format!("{}h", d.as_secs() / 3600)
    } else if d.as_secs().is_multiple_of(60) {
        format!("{}m", d.as_secs() / 60)
    } else {
        format!("{}s", d.as_secs())
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
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or("a `%` escape is cut short")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| "a `%` escape is not hex")?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "a parameter is not UTF-8".to_string())
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

    #[test]
    fn durations_read_as_the_docs_write_them() {
        for (text, d) in [
            ("250ms", Duration::from_millis(250)),
            ("3s", Duration::from_secs(3)),
            ("1.5s", Duration::from_millis(1_500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3_600)),
            // libpq's connect_timeout is plain seconds.
            ("7", Duration::from_secs(7)),
        ] {
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
        for junk in ["", "soon", "3d", "-1s", "1e3s", "s"] {
            assert!(parse_duration(junk).is_err(), "{junk}");
        }
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(10), "10ms"),
            (Duration::from_secs(45), "45s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(86_400), "24h"),
        ] {
            assert_eq!(show_duration(d), text);
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
        let err = SERVER_TIMEOUT.parse(&"9".repeat(100)).unwrap_err();
        assert!(err.ends_with(&format!("not `{}`", "9".repeat(40))), "{err}");
    }

    #[test]
    fn percent_escapes_decode() {
        assert_eq!(percent_decode("billing%2Fv2").as_deref(), Ok("billing/v2"));
        assert_eq!(percent_decode("a+b").as_deref(), Ok("a b"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Ok("é"));
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%FF").is_err());
    }

    #[test]
    fn backend_parameters_are_split_off() {
        let p = parse_url(
            "postgresql://app:pw@db:6543/app?namespace=ns&application_name=x&heartbeat=2s&sslmode=disable&connect_timeout=3",
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
