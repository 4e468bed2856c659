//! The `postgres` backend: HighlanderPG's guarantee (at most one holder per
//! id while the holder can see the server) on a plain Postgres, with fencing
//! tokens and failover in milliseconds.
//!
//! Select it with `HIGHLANDER_BACKEND=postgres://user:password@host:5432/db`
//! or in code with [`Postgres`]:
//!
//! ```no_run
//! use highlander::backend::postgres::Postgres;
//! use highlander::Runtime;
//!
//! # #[tokio::main] async fn main() -> highlander::Result<()> {
//! let backend = Postgres::new("postgres://app:secret@db.internal:5432/app?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem")
//!     .namespace("billing");
//! Runtime::builder().backend(backend).run().await
//! # }
//! ```
//!
//! # How it works
//!
//! Each node keeps **one** connection, whatever the number of ids it runs or
//! waits for:
//!
//! - on connecting, the session takes a **presence lock**, a session-level
//!   advisory lock `(namespace_key, n)` with a number `n` drawn afresh for
//!   every connection. It lives exactly as long as the session.
//! - every id has a row in `highlander_leases` (created when missing),
//!   keyed by its [`lock_key`], holding the fencing token and the owner `n`.
//!   A row may be taken only when it is free or its owner's presence lock is
//!   free, so the server's own session bookkeeping decides who may hold what,
//!   and the server's shared lock table holds one lock per *node*, not per id
//!   (it fits only 10,000 to 30,000 advisory locks on a default server; this
//!   design runs 100,000 ids).
//! - claims are batched: one statement tries every id the node waits for
//!   and bumps each granted id's token.
//! - a graceful release sends `NOTIFY` on the namespace's channel, which
//!   every node `LISTEN`s to; a crashed holder is noticed by probing the
//!   presence locks of the few holders a node waits on (one tiny query every
//!   20 ms while waiting), never by polling ids.
//! - a heartbeat (every second, or the probe while waiting) proves the
//!   session alive. The client gives its leases up a safety margin before the
//!   server could end the session on its own, which it is told to do per
//!   session (`tcp_user_timeout`, `tcp_keepalives_*`). See `docs/postgres.md`
//!   for the argument with numbers.
//!
//! # URL
//!
//! A libpq-style URL as `tokio-postgres` reads it, plus:
//! - `namespace=name`: the namespace (default `highlander`), so that two
//!   applications can share a database;
//! - `sslmode=disable|prefer|require|verify-ca|verify-full` and
//!   `sslrootcert=/path/ca.pem`: TLS through rustls. `require` and
//!   `verify-ca` check the certificate chain against the CA file,
//!   `verify-full` also the host name. TLS modes need a CA file, or
//!   `sslrootcert=system` (as in libpq 16): the system's trusted CAs (read
//!   by `rustls-native-certs`, which honours `SSL_CERT_FILE` and
//!   `SSL_CERT_DIR`), always with `verify-full`;
//! - `sslcert=/path/client.crt&sslkey=/path/client.key`: a client
//!   certificate (PEM; the key in PKCS#8, PKCS#1 or SEC1) for servers that
//!   ask for one (`clientcert=verify-ca` or the `cert` method in
//!   `pg_hba.conf`). It needs TLS, so a CA as above;
//! - `server_timeout=15s`, `heartbeat=1s`, `presence_poll=20ms`,
//!   `margin=1s`: the timing of the lease argument (see the methods of
//!   [`Postgres`] of the same names; set in code, they win), each within a
//!   range (1s to 24h, 10ms to 10m, 1ms to 1m, 0 to 1h), as is
//!   `connect_timeout` (1s to 1h). `keepalives*` and `tcp_user_timeout` are
//!   refused: the backend sets them itself.
//!
//! Messages and descriptions show the URL as parsed, without its password
//! (`postgres://app@db:5432/app`), never its text.
//!
//! Use a direct connection or a session-pooling proxy: transaction pooling
//! (PgBouncer's `pool_mode = transaction`) breaks session-level locks.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::SslMode;

use super::{Backend, Session};
use crate::service::BoxFuture;
use crate::{Error, Result};

mod keys;
mod session;
mod sql;
mod tls;

pub use keys::{lock_key, namespace_key};

/// The namespace used when none is set.
pub const DEFAULT_NAMESPACE: &str = "highlander";

/// The table the backend keeps its rows in (created when missing).
pub const TABLE: &str = sql::TABLE;

/// The Postgres backend, configured: give it to
/// [`Builder::backend`](crate::Builder::backend).
///
/// The URL is checked when the runtime starts (a bad URL is an error from
/// [`Builder::start`](crate::Builder::start)); [`from_url`] checks it at once.
///
/// ```no_run
/// use std::time::Duration;
/// use highlander::backend::postgres::Postgres;
///
/// # #[tokio::main] async fn main() -> highlander::Result<()> {
/// let handle = highlander::Runtime::builder()
///     .backend(
///         Postgres::new("postgres://app:secret@localhost/app")
///             .namespace("reports")
///             .server_timeout(Duration::from_secs(20)),
///     )
///     .start()
///     .await?;
/// handle.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Postgres {
    url: String,
    namespace: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    timing: TimingSet,
}

/// Timing set in code, which wins over the URL's parameters.
#[derive(Debug, Clone, Copy, Default)]
struct TimingSet {
    heartbeat: Option<Duration>,
    poll: Option<Duration>,
    server_timeout: Option<Duration>,
    margin: Option<Duration>,
}

impl Postgres {
    /// A backend for the server at `url` (see the [module docs](self) for
    /// the URL's parameters).
    pub fn new(url: impl Into<String>) -> Postgres {
        Postgres {
            url: url.into(),
            namespace: None,
            ca_file: None,
            client_cert: None,
            timing: TimingSet::default(),
        }
    }

    /// The namespace: ids in different namespaces never collide, so several
    /// applications can share one database (default `highlander`, or the
    /// URL's `namespace=` parameter).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The CA certificate file (PEM) that signed the server's certificate;
    /// the same as `sslrootcert=` in the URL, `"system"` included. Turns TLS
    /// on (`sslmode=prefer` becomes a verified TLS connection).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// A client certificate chain and its private key (PEM files), for a
    /// server that authenticates clients by certificate; the same as
    /// `sslcert=` and `sslkey=` in the URL. Needs TLS (a CA, see
    /// [`ca_file`](Self::ca_file)).
    ///
    /// ```
    /// use highlander::backend::postgres::Postgres;
    ///
    /// let backend = Postgres::new("postgres://app@db.internal/app?sslmode=verify-full")
    ///     .ca_file("/etc/ssl/db-ca.pem")
    ///     .client_cert("/etc/ssl/app.crt", "/etc/ssl/app.key");
    /// # let _ = backend;
    /// ```
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// How often an idle session proves it is alive (default 1 s; 10 ms to
    /// 10 min, checked at start).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.timing.heartbeat = Some(every);
        self
    }

    /// How often a waiting node checks whether the holders it waits on are
    /// still connected (default 20 ms). One small query per interval per
    /// waiting node, whatever the number of ids. 1 ms to 1 min, checked at
    /// start.
    pub fn presence_poll(mut self, every: Duration) -> Self {
        self.timing.poll = Some(every);
        self
    }

    /// The server's dead-peer detection (default 15 s): how long after the
    /// last word from a silently vanished node the server ends its session,
    /// freeing its ids for others. Raised automatically when a singleton's
    /// shutdown budget needs more. 1 s to 24 h, checked at start.
    pub fn server_timeout(mut self, timeout: Duration) -> Self {
        self.timing.server_timeout = Some(timeout);
        self
    }

    /// Slack for scheduling delays in the lease deadline (default 1 s; at
    /// most 1 h, checked at start).
    pub fn margin(mut self, margin: Duration) -> Self {
        self.timing.margin = Some(margin);
        self
    }

    fn settings(&self) -> Result<Settings> {
        let parsed = parse_url(&self.url).map_err(Error::config)?;
        let shown = shown_url(&parsed.pg);
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
                return Err(Error::config(format!(
                    "postgres URL `{shown}`: a client certificate needs both sslcert= and sslkey="
                )));
            }
        };
        let roots = ca_file.map(|path| {
            if path.as_os_str() == "system" {
                tls::Roots::System
            } else {
                tls::Roots::File(path)
            }
        });
        let mode = match (&roots, parsed.mode) {
            // As libpq 16: the system's CAs vouch for names, not for chains alone.
            (Some(tls::Roots::System), Mode::Prefer) => Mode::VerifyFull,
            (Some(tls::Roots::System), mode @ (Mode::Require | Mode::VerifyCa | Mode::Disable)) => {
                return Err(Error::config(format!(
                    "postgres URL `{shown}`: sslrootcert=system checks the server's name: use sslmode=verify-full, not {}",
                    mode.name()
                )));
            }
            (_, mode) => mode,
        };
        let mut pg = parsed.pg;
        let tls = match (mode, &roots) {
            (Mode::Disable, _) | (Mode::Prefer, None) => {
                if client_cert.is_some() {
                    return Err(Error::config(format!(
                        "postgres URL `{shown}`: a client certificate (sslcert/sslkey) needs TLS: \
                         add sslmode=verify-full and sslrootcert=/path/to/ca.pem (or sslrootcert=system)"
                    )));
                }
                None
            }
            (mode, None) => {
                return Err(Error::config(format!(
                    "postgres URL `{shown}`: sslmode={} needs the CA that signed the server's certificate: \
                     add sslrootcert=/path/to/ca.pem (or sslrootcert=system for the system's CAs)",
                    mode.name()
                )));
            }
            (mode, Some(roots)) => {
                let config =
                    tls::client_config(roots, mode == Mode::VerifyFull, client_cert.as_ref())
                        .map_err(Error::config)?;
                pg.ssl_mode(if mode == Mode::Prefer {
                    SslMode::Prefer
                } else {
                    SslMode::Require
                });
                Some(Arc::new(config))
            }
        };
        let target = target_of(&pg);
        let timing = {
            let mut t = parsed.timing;
            let set = self.timing;
            for (method, value, range) in [
                ("heartbeat", set.heartbeat, HEARTBEAT_RANGE),
                ("presence_poll", set.poll, POLL_RANGE),
                ("server_timeout", set.server_timeout, SERVER_TIMEOUT_RANGE),
                ("margin", set.margin, MARGIN_RANGE),
            ] {
                if let Some(value) = value
                    && !range.contains(&value)
                {
                    return Err(Error::config(format!(
                        "Postgres::{method}({value:?}): {}",
                        range_text(method, range)
                    )));
                }
            }
            t.heartbeat = set.heartbeat.unwrap_or(t.heartbeat);
            t.poll = set.poll.unwrap_or(t.poll);
            t.server_timeout = set.server_timeout.unwrap_or(t.server_timeout);
            t.margin = set.margin.unwrap_or(t.margin);
            t
        };
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

impl Postgres {
    /// The URL as parsed, without the password (never the raw text, which
    /// may hold a password its author did not escape); or a placeholder
    /// when it does not parse.
    fn shown(&self) -> String {
        match parse_url(&self.url) {
            Ok(parsed) => shown_url(&parsed.pg),
            Err(_) => "postgres://(invalid URL)".to_string(),
        }
    }
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &self.shown())
            .field("namespace", &self.namespace)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("timing", &self.timing)
            .finish()
    }
}

impl Backend for Postgres {
    fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>> {
        let settings = self.settings();
        let node = node.to_string();
        Box::pin(async move {
            let session = session::PgSession::connect(Arc::new(settings?), node).await?;
            Ok(Arc::new(session) as Arc<dyn Session>)
        })
    }

    fn describe(&self) -> String {
        let namespace = self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
        match &self.namespace {
            Some(_) => format!("{} (namespace {namespace})", self.shown()),
            None => self.shown(),
        }
    }
}

/// The backend named by a `postgres://` or `postgresql://` URL, checked now.
///
/// ```
/// let err = highlander::backend::postgres::from_url("postgres://app:hunter2@db/app?bogus=1")
///     .err()
///     .unwrap();
/// assert!(err.to_string().contains("bogus"));
/// assert!(!err.to_string().contains("hunter2"));
/// ```
pub fn from_url(url: &str) -> Result<Box<dyn Backend>> {
    let backend = Postgres::new(url);
    backend.settings()?;
    Ok(Box::new(backend))
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
    /// How long after the send time of its last successful round trip the
    /// client still vouches for a tenure whose instance needs `budget` to
    /// stop, when the server's dead-peer detection is `x`:
    /// `x·(1 − ρ) − budget − margin`.
    pub(crate) fn vouch(&self, x: Duration, budget: Duration) -> Duration {
        let slow = x.mul_f64(1.0 - f64::from(self.drift_ppm) / 1e6);
        slow.saturating_sub(budget).saturating_sub(self.margin)
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
        let needed = budget.saturating_add(self.margin).saturating_add(min_vouch);
        if needed > MAX_SERVER_TIMEOUT {
            return None;
        }
        let needed = needed.div_f64(1.0 - f64::from(self.drift_ppm) / 1e6);
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

    pub(crate) fn options(&self) -> String {
        format!(
            "-c tcp_user_timeout={} -c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={}",
            self.user_timeout_ms, self.idle, self.interval, self.count
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

struct Parsed {
    pg: tokio_postgres::Config,
    namespace: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    mode: Mode,
    timing: Timing,
}

/// `250ms`, `3s`, `1.5s`, `2m`, `1h`.
fn parse_duration(value: &str) -> std::result::Result<Duration, String> {
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

/// Splits off the parameters this backend reads itself and hands the rest
/// to tokio-postgres. Every message shows the URL with its password hidden.
fn parse_url(url: &str) -> std::result::Result<Parsed, String> {
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
        match key {
            "namespace" => namespace = Some(decoded()?),
            "sslrootcert" => ca_file = Some(PathBuf::from(decoded()?)),
            "sslmode" => {
                mode = match value {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    _ => {
                        return Err(bad(&format!(
                            "sslmode `{value}` is not one of disable, prefer, require, verify-ca, verify-full"
                        )));
                    }
                }
            }
            "heartbeat" => {
                timing.heartbeat = ranged(key, value, HEARTBEAT_RANGE).map_err(|e| bad(&e))?
            }
            "presence_poll" => timing.poll = ranged(key, value, POLL_RANGE).map_err(|e| bad(&e))?,
            "server_timeout" => {
                timing.server_timeout =
                    ranged(key, value, SERVER_TIMEOUT_RANGE).map_err(|e| bad(&e))?
            }
            "margin" => timing.margin = ranged(key, value, MARGIN_RANGE).map_err(|e| bad(&e))?,
            "connect_timeout" => {
                connect_timeout =
                    Some(ranged(key, value, CONNECT_TIMEOUT_RANGE).map_err(|e| bad(&e))?)
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

fn percent_decode(s: &str) -> std::result::Result<String, String> {
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
fn shown_url(pg: &tokio_postgres::Config) -> String {
    let target = target_of(pg);
    let (hosts, user) = target.rsplit_once(" as ").unwrap_or((&target, ""));
    match pg.get_user() {
        Some(_) => format!("postgres://{user}@{hosts}"),
        None => format!("postgres://{hosts}"),
    }
}

/// The allowed ranges of the URL's (and the builder's) numbers.
type Range = std::ops::RangeInclusive<Duration>;
const HEARTBEAT_RANGE: Range = Duration::from_millis(10)..=Duration::from_secs(600);
const POLL_RANGE: Range = Duration::from_millis(1)..=Duration::from_secs(60);
const SERVER_TIMEOUT_RANGE: Range = Duration::from_secs(1)..=Duration::from_secs(86_400);
const MARGIN_RANGE: Range = Duration::ZERO..=Duration::from_secs(3_600);
const CONNECT_TIMEOUT_RANGE: Range = Duration::from_secs(1)..=Duration::from_secs(3_600);

/// The largest dead-peer detection a session can ask the server for:
/// `tcp_user_timeout` is a 32-bit count of milliseconds, in whole seconds.
pub(crate) const MAX_SERVER_TIMEOUT: Duration = Duration::from_secs(i32::MAX as u64 / 1000);

fn range_text(option: &str, range: Range) -> String {
    format!(
        "`{option}` must be a duration between {} and {}",
        show_duration(*range.start()),
        show_duration(*range.end())
    )
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

/// A duration parameter, checked against its range: one message naming the
/// option and the range.
fn ranged(option: &str, value: &str, range: Range) -> std::result::Result<Duration, String> {
    match parse_duration(value) {
        Ok(d) if range.contains(&d) => Ok(d),
        _ => Err(format!(
            "{} (like 250ms, 3s or 2m), not `{}`",
            range_text(option, range),
            value.chars().take(40).collect::<String>()
        )),
    }
}

/// `host:port/db as user`, for messages (never the password).
fn target_of(pg: &tokio_postgres::Config) -> String {
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
    use crate::DEFAULT_SHUTDOWN;

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
            let err = Postgres::new(url).settings().err().expect(url).to_string();
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
        let err = |pg: Postgres| pg.settings().err().expect("an error").to_string();
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
        let e = Postgres::new("postgres://a@h/d?sslrootcert=system&sslmode=verify-ca")
            .settings()
            .err()
            .expect("verify-ca with system roots is refused")
            .to_string();
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
            let err = Postgres::new(url)
                .settings()
                .err()
                .expect(query)
                .to_string();
            assert!(err.contains(&format!("`{option}`")), "{err}");
            assert!(err.contains("between"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = Postgres::new("postgres://a@h/d")
            .heartbeat(Duration::MAX)
            .settings()
            .err()
            .expect("a huge heartbeat")
            .to_string();
        assert!(
            err.contains("`heartbeat` must be a duration between 10ms and 10m"),
            "{err}"
        );
        let err = Postgres::new("postgres://a@h/d")
            .margin(Duration::from_secs(u64::MAX))
            .settings()
            .err()
            .expect("a huge margin")
            .to_string();
        assert!(err.contains("margin"), "{err}");
        // The backend sets these itself: refused rather than ignored.
        for query in ["keepalives_idle=5", "tcp_user_timeout=100", "keepalives=0"] {
            let url = format!("postgres://app:hunter2@db/app?{query}");
            let err = Postgres::new(url)
                .settings()
                .err()
                .expect(query)
                .to_string();
            assert!(err.contains("set by the backend"), "{err}");
        }
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

    #[test]
    fn server_params_never_detect_sooner_than_asked() {
        for secs in 1..200 {
            let x = Duration::from_secs(secs);
            assert!(Timing::server_params(x).detection() >= x, "{secs}");
        }
    }
}
