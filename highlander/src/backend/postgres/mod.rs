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
//! - the members are the sessions holding a presence lock; what each
//!   announced for placement (weight, labels, catalog) is a row naming its
//!   presence number, so it counts exactly as long as the session, and a
//!   catalog is stored once per distinct list of ids. Joins, announces and
//!   leaves `NOTIFY` the channel; the probe also watches the members'
//!   presence locks, so a death is seen within a probe interval.
//! - `release_to` reserves the released id for its target for 2 s on the
//!   server's clock: the claim statement refuses it to every other node
//!   meanwhile.
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
//!   `connect_timeout` (1s to 1h, one TCP connection attempt). Durations
//!   take a unit (`250ms`, `3s`, `2m`, `1h`). `keepalives*` and
//!   `tcp_user_timeout` are refused: the backend sets them itself;
//! - `start_timeout=30s`: how long [`Builder::start`](crate::Builder::start)
//!   keeps trying to reach the server before it fails with
//!   [`Error::Unreachable`](crate::Error::Unreachable) (100ms to 10m;
//!   [`Builder::start_timeout`](crate::Builder::start_timeout) wins over it).
//!   A wrong password, a missing database or a refused certificate fails at
//!   once, whatever the timeout.
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

use super::kit::secret::Secret;
use super::{Backend, Session};
use crate::Result;
use crate::service::BoxFuture;

// One job a file. The public face (`Postgres`, `from_url`) is here; then,
// from the outside in:
// - url, config, tls: reading the URL and the builder into `Settings`;
// - session: the `Session` the guardians call, which queues work for
// - driver: the task that owns the connection (connect, epochs, batches),
//   opened by connect (errors sorts its failures);
// - state, waiters: what the session and its driver share;
// - members: who is connected, what each announced, and noticing changes;
// - batch, probe, timing: the rules, as plain code with plain tests:
//   which claims go out and what each answer means, who moved, and how
//   long this node may still vouch for its tenures;
// - sql, keys: the statements, and the keys rows are found by.
mod batch;
mod config;
mod connect;
mod driver;
mod errors;
mod keys;
mod members;
mod probe;
mod session;
mod sql;
mod state;
mod timing;
mod tls;
mod url;
mod waiters;

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
    /// The URL as given: it may hold a password (shown only as parsed,
    /// see `shown`).
    url: Secret,
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
            url: Secret::new(url),
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

    /// The URL as parsed, without the password (never the raw text, which
    /// may hold a password its author did not escape); or a placeholder
    /// when it does not parse.
    fn shown(&self) -> String {
        match url::parse_url(self.url.expose()) {
            Ok(parsed) => url::shown_url(&parsed.pg),
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

    /// The URL's `start_timeout=`, if any (a URL that does not parse fails
    /// `start()` at once anyway).
    fn start_timeout(&self) -> Option<Duration> {
        url::parse_url(self.url.expose()).ok()?.start_timeout
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
