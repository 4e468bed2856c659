//! Resolving the configuration once: the builder's values laid over the
//! URL's, checked (namespace, TLS files and mode, timing ranges), into the
//! [`Settings`] every connection of a session uses.

use std::sync::Arc;

use super::keys::namespace_key;
use super::timing::Timing;
use super::url::{HEARTBEAT, MARGIN, POLL, SERVER_TIMEOUT, parse_url, shown_url, target_of};
use super::{DEFAULT_NAMESPACE, Postgres, TimingSet, tls};
use crate::{Error, Result};

/// Everything a session needs, resolved once.
pub(crate) struct Settings {
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) namespace: String,
    pub(crate) namespace_key: i32,
    pub(crate) channel: String,
    /// The URL with the password hidden, and the namespace.
    pub(crate) describe: String,
    /// `host:port/db as user`, for messages.
    pub(crate) target: String,
    pub(crate) timing: Timing,
    /// At most this many ids per claim statement.
    pub(crate) batch: usize,
}

impl Postgres {
    /// The settings of this backend, or the one-line error that says what
    /// to fix (never showing the password).
    pub(super) fn settings(&self) -> Result<Settings> {
        let parsed = parse_url(self.url.expose()).map_err(Error::config)?;
        let shown = shown_url(&parsed.pg);
        let in_url = |why: String| Error::config(format!("postgres URL `{shown}`: {why}"));
        let namespace = self
            .namespace
            .clone()
            .or(parsed.namespace)
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        validate_namespace(&namespace)?;
        let ca_file = self.ca_file.clone().or(parsed.ca_file);
        let client_cert = match (&self.client_cert, parsed.client_cert, parsed.client_key) {
            (Some(set), _, _) => Some(set.clone()),
            (None, Some(cert), Some(key)) => Some((cert, key)),
            (None, None, None) => None,
            (None, _, _) => {
                return Err(in_url(
                    "a client certificate needs both sslcert= and sslkey=".to_string(),
                ));
            }
        };
        let roots = ca_file.map(tls::Roots::from_path);
        let mut pg = parsed.pg;
        let tls = match tls::decide(parsed.mode, roots.as_ref(), client_cert.is_some())
            .map_err(in_url)?
        {
            None => None,
            Some((mode, roots)) => {
                let config =
                    tls::client_config(roots, mode == tls::Mode::VerifyFull, client_cert.as_ref())
                        .map_err(Error::config)?;
                pg.ssl_mode(mode.ssl_mode());
                Some(Arc::new(config))
            }
        };
        let target = target_of(&pg);
        let mut timing = parsed.timing;
        self.timing.apply(&mut timing).map_err(Error::config)?;
        Ok(Settings {
            describe: format!("{shown} (namespace {namespace})"),
            target,
            namespace_key: namespace_key(&namespace),
            channel: format!("highlander_{:08x}", namespace_key(&namespace) as u32),
            namespace,
            pg,
            tls,
            timing,
            batch: 5_000,
        })
    }
}

impl TimingSet {
    /// Lays the timing set in code over `timing`, each value checked
    /// against its range first.
    fn apply(&self, timing: &mut Timing) -> std::result::Result<(), String> {
        for (knob, value, field) in [
            (&HEARTBEAT, self.heartbeat, &mut timing.heartbeat),
            (&POLL, self.poll, &mut timing.poll),
            (
                &SERVER_TIMEOUT,
                self.server_timeout,
                &mut timing.server_timeout,
            ),
            (&MARGIN, self.margin, &mut timing.margin),
        ] {
            if let Some(value) = value {
                *field = knob
                    .check(value)
                    .map_err(|e| format!("Postgres::{}({value:?}): {e}", knob.name))?;
            }
        }
        Ok(())
    }
}

fn validate_namespace(namespace: &str) -> Result<()> {
    if namespace.is_empty()
        || namespace.len() > 100
        || !namespace.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Error::config(format!(
            "invalid postgres namespace `{}`: use 1 to 100 visible ASCII characters",
            namespace.chars().take(60).collect::<String>()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::from_url;
    use super::*;
    use crate::backend::Backend;

    /// The error of a configuration that must be refused.
    fn refused(pg: Postgres, what: &str) -> String {
        pg.settings().err().expect(what).to_string()
    }

    #[test]
    fn url_errors_hide_the_password() {
        for url in [
            "postgres://app:hunter2@db/app?bogus=1",
            "postgres://app:hunter2@db:notaport/app",
            "postgres://app:hunter2@db/app?sslmode=sometimes",
            "postgres://app:hunter2@db/app?sslmode=require",
            "postgres://app:hunter2@db/app?sslpassword=hunter2",
            "postgres://app:hunter2@db/app?sslcert=/x",
            "postgres://app:hunter2@db/app?sslcert=/x&sslkey=/y",
            "postgres://app:hunter2@db/app?sslrootcert=system&sslmode=require",
        ] {
            let err = refused(Postgres::new(url), url);
            assert!(!err.contains("hunter2"), "{err}");
            assert!(!err.ends_with("invalid connection string"), "{err}");
            // The URL as parsed (never its text), or none when it does not parse.
            assert!(
                err.starts_with("invalid postgres URL: ")
                    || err.contains("`postgres://app@db:5432/app`"),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_tls_files_are_named() {
        let base = "postgres://app:hunter2@db/app?sslmode=verify-full";
        let err = |pg: Postgres| refused(pg, "an error");
        let e = err(Postgres::new(format!(
            "{base}&sslrootcert=/nonexistent/ca.pem"
        )));
        assert!(e.contains("/nonexistent/ca.pem (sslrootcert)"), "{e}");
        let ca = std::env::temp_dir().join(format!("hl-unit-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let e = err(Postgres::new(base).ca_file(&ca));
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = err(Postgres::new(base)
            .ca_file("system")
            .client_cert("/nonexistent/c.crt", "/nonexistent/c.key"));
        assert!(
            e.contains("/nonexistent/c.crt (sslcert)") || e.contains("sslrootcert=system found no"),
            "{e}"
        );
        let e = err(Postgres::new("postgres://app:hunter2@db/app").client_cert("/c.crt", "/c.key"));
        assert!(e.contains("needs TLS"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let _ = std::fs::remove_file(ca);
    }

    #[test]
    fn system_roots_mean_verify_full() {
        let s = Postgres::new("postgres://a@h/d?sslrootcert=system").settings();
        match s {
            // A machine without CA bundle says so; with one, TLS is on.
            Ok(s) => assert!(s.tls.is_some()),
            Err(e) => assert!(e.to_string().contains("found no trusted CA"), "{e}"),
        }
        let e = refused(
            Postgres::new("postgres://a@h/d?sslrootcert=system&sslmode=verify-ca"),
            "verify-ca with system roots is refused",
        );
        assert!(e.contains("use sslmode=verify-full"), "{e}");
    }

    #[test]
    fn namespace_from_url_and_builder() {
        let s = Postgres::new("postgres://a@h/d?namespace=billing%2Fv2")
            .settings()
            .unwrap();
        assert_eq!(s.namespace, "billing/v2");
        let s = Postgres::new("postgres://a@h/d?namespace=x")
            .namespace("y")
            .settings()
            .unwrap();
        assert_eq!(s.namespace, "y");
        let s = Postgres::new("postgres://a@h/d").settings().unwrap();
        assert_eq!(s.namespace, DEFAULT_NAMESPACE);
        assert!(
            Postgres::new("postgres://a@h/d")
                .namespace("")
                .settings()
                .is_err()
        );
    }

    #[test]
    fn debug_and_describe_hide_the_password() {
        let pg = Postgres::new("postgres://app:hunter2@db/app");
        assert!(!format!("{pg:?}").contains("hunter2"));
        assert!(!pg.describe().contains("hunter2"));
        let s = pg.settings().unwrap();
        assert!(!s.describe.contains("hunter2"));
        assert_eq!(s.target, "db:5432/app as app");
    }

    #[test]
    fn timing_from_url_and_builder() {
        let s = Postgres::new(
            "postgres://a@h/d?server_timeout=3s&heartbeat=200ms&presence_poll=5ms&margin=0.5s",
        )
        .settings()
        .unwrap();
        assert_eq!(s.timing.server_timeout, Duration::from_secs(3));
        assert_eq!(s.timing.heartbeat, Duration::from_millis(200));
        assert_eq!(s.timing.poll, Duration::from_millis(5));
        assert_eq!(s.timing.margin, Duration::from_millis(500));
        let s = Postgres::new("postgres://a@h/d?server_timeout=3s")
            .server_timeout(Duration::from_secs(20))
            .settings()
            .unwrap();
        assert_eq!(s.timing.server_timeout, Duration::from_secs(20));
        assert!(
            Postgres::new("postgres://a@h/d?heartbeat=soon")
                .settings()
                .is_err()
        );
    }

    /// Numbers out of range are one clear error naming the option and its
    /// range, never a panic later.
    #[test]
    fn out_of_range_numbers_are_refused_by_name() {
        for (query, option) in [
            ("heartbeat=10000000000000000000s", "heartbeat"),
            ("heartbeat=1ms", "heartbeat"),
            ("margin=10000000000000000000s", "margin"),
            ("presence_poll=100000000000s", "presence_poll"),
            ("presence_poll=0ms", "presence_poll"),
            ("server_timeout=100000000000s", "server_timeout"),
            ("server_timeout=10ms", "server_timeout"),
            ("connect_timeout=100000000000", "connect_timeout"),
            ("connect_timeout=soon", "connect_timeout"),
        ] {
            let url = format!("postgres://app:hunter2@db/app?{query}");
            let err = refused(Postgres::new(url), query);
            assert!(err.contains(&format!("`{option}`")), "{err}");
            assert!(err.contains("between"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = refused(
            Postgres::new("postgres://a@h/d").heartbeat(Duration::MAX),
            "a huge heartbeat",
        );
        assert!(
            err.contains("`heartbeat` must be a duration between 10ms and 10m"),
            "{err}"
        );
        let err = refused(
            Postgres::new("postgres://a@h/d").margin(Duration::from_secs(u64::MAX)),
            "a huge margin",
        );
        assert!(err.contains("margin"), "{err}");
        // The backend sets these itself: refused rather than ignored.
        for query in ["keepalives_idle=5", "tcp_user_timeout=100", "keepalives=0"] {
            let url = format!("postgres://app:hunter2@db/app?{query}");
            let err = refused(Postgres::new(url), query);
            assert!(err.contains("set by the backend"), "{err}");
        }
    }

    /// Passwords with characters a URL should have escaped (`/`, `?`, `&`,
    /// `=`) never appear in a message or description.
    #[test]
    fn odd_passwords_never_show() {
        for url in [
            "postgres://app:pa/ss?wo=rd&x@db/app?bogus=1",
            "postgres://app:pa/ss?wo=rd&x@db/app?heartbeat=soon",
            "postgres://app:pa/ss?wo=rd&x@db/app",
            "postgres://app:pa?ss@db:notaport/app",
            "postgres://app:s3cr/t@db/app?sslmode=require",
        ] {
            let pg = Postgres::new(url);
            let mut shown = vec![format!("{pg:?}"), pg.describe()];
            match pg.settings() {
                Ok(s) => shown.push(s.describe.clone()),
                Err(e) => shown.push(e.to_string()),
            }
            if let Err(e) = from_url(url) {
                shown.push(e.to_string());
            }
            for text in shown {
                for secret in ["pa/ss", "ss?wo", "wo=rd", "rd&x", "pa?ss", "s3cr"] {
                    assert!(!text.contains(secret), "{url}: {text}");
                }
            }
        }
    }
}
