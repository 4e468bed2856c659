//! The `etcd` backend: etcd leases, transactions and watches
//! (`etcd://host:2379,host2:2379`, feature `etcd`).
//!
//! For users who already run etcd (or Kubernetes' etcd) and want a
//! replicated, fenced lock: CP, at most one tenure per id at any instant.
//!
//! # How it works
//!
//! - **One lease per node**, kept alive by one task for every id the node
//!   holds: lease traffic is O(1) however many ids the node runs.
//! - **Claim** = a transaction: put `/{namespace}/{id}` = node name (`%` and
//!   `/` in the namespace percent-encoded, so namespaces never nest), attached
//!   to the node's lease, if neither that key nor the id's reservation
//!   (below) exists. Claims from many guardians are batched into one
//!   transaction (at most 126 per transaction: etcd's limit is 128
//!   operations, nested ones included; a few transactions in flight).
//! - **Fencing token** = the key's create revision: etcd's revision only
//!   grows, so every tenure of an id gets a larger token than the one before.
//! - **Waiting**: one watch stream per node over the namespace prefix wakes a
//!   waiting guardian as soon as the holder's key is deleted (released,
//!   lease revoked on graceful shutdown, or lease expired after a crash).
//! - **Losing the lease safely**: the node ends every tenure with
//!   [`LeaseEnd::Lost`](crate::backend::LeaseEnd::Lost) when it has had no
//!   successful keep-alive for `TTL·(1 − 1 %) − stop_budget − 250 ms`,
//!   measured on its own monotonic clock from the moment the last successful
//!   keep-alive was *sent*. The server cannot expire the lease before
//!   `TTL` after it received that keep-alive, so the instance has stopped
//!   before any other node can be granted the id. A keep-alive answered with
//!   "lease not found" (expired, or `etcdctl lease revoke`) ends every tenure
//!   at once, and so does the watch seeing a held key deleted.
//! - **Members**: each node puts a member key `/{namespace}/~m/{node}` under
//!   its lease (so it goes when the node leaves or dies) naming its weight,
//!   labels and the digest of its catalog, whose ids are stored once per
//!   distinct catalog under `/{namespace}/~~c/{node}/{digest}/`, in chunks
//!   of at most 1 MiB. `~` is in no id, so these never meet an id's key.
//!   The watch sees member keys change (`members_changed`).
//! - **Handing an id to a node** (`release_to`): one transaction deletes the
//!   id's key (if it is still this tenure's) and puts a reservation key
//!   `/{namespace}/~r/{id}` naming that node, under a lease of 2 s; every
//!   claim requires that no reservation exists, except the named node's,
//!   which requires that very reservation and deletes it as it puts the id's
//!   key.
//!
//! The default TTL is [`DEFAULT_TTL`] (10 s): it must exceed the longest
//! shutdown budget plus the time to ride out an etcd leader election (1–3 s
//! with etcd's default 1 s election timeout) plus the safety margin, and the
//! core's default shutdown budget is 5 s. With `shutdown = "1s"` services a
//! TTL of 5 s is enough. A claim whose shutdown budget does not fit in the
//! TTL is refused with an error that says so.
//!
//! # URL
//!
//! ```text
//! etcd://[user[:password]@]host:port[,host:port…][/namespace][?option=value&…]
//! etcds://…    the same over TLS
//! ```
//!
//! Options: `ttl` (`10s`; 2 s to 1 day), `keepalive` (the keep-alive
//! interval, default TTL/10 capped to 1 s; 10 ms to TTL/3),
//! `start_timeout` (how long `start()` keeps trying to reach etcd, default
//! [`DEFAULT_START_TIMEOUT`](crate::backend::DEFAULT_START_TIMEOUT); 100 ms
//! to 10 min; `connect_timeout` is its old name), `ca`, `cert`, `key` (PEM
//! file paths for TLS; `ca` is required for `etcds://`), `domain` (the name
//! to verify in the server's certificate), `user`, `password`. Durations
//! take a unit (`500ms`, `5s`, `2m`); `%XX` escapes in values are decoded.
//! The namespace defaults to `highlander`.
//!
//! # Start-up
//!
//! `start()` tries to reach etcd until the start timeout: each attempt
//! reads the namespace and is granted the node's lease, each step going to
//! the members in turn, so a dead member among the endpoints does not fail
//! it. Refused credentials, a user without access to the namespace and a
//! TLS failure (a server certificate that does not verify, a refused client
//! certificate) fail at once: retrying cannot fix them.
//!
//! ```
//! use highlander::backend::from_url;
//!
//! let backend = from_url("etcd://app:s3cret@10.0.0.1:2379,10.0.0.2:2379/billing?ttl=5s").unwrap();
//! assert!(!backend.describe().contains("s3cret"));
//! assert!(from_url("etcd://").is_err());
//! ```

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::kit::duration::show;
use crate::backend::kit::secret::Secret;
use crate::backend::{Backend, Session};
use crate::service::BoxFuture;
use crate::{Error, Result};

mod batch;
mod conn;
mod connect;
mod failure;
mod fleet;
mod keeper;
mod members;
mod pb;
mod roster;
mod session;
mod state;
mod txn;
mod url;
mod watch;

pub(crate) use url::from_url;
use url::host_port;

/// The default lease TTL: 10 s.
///
/// Long enough for the default shutdown budget
/// ([`DEFAULT_SHUTDOWN`](crate::DEFAULT_SHUTDOWN), 5 s) plus a leader
/// election (1–3 s) plus the safety margin; short enough that a crashed
/// node's ids move within about 10 s (Kubernetes' lease election needs
/// 13–24 s, `etcdctl elect` 60 s).
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// The default namespace: keys are `/highlander/{id}`.
pub const DEFAULT_NAMESPACE: &str = "highlander";

/// How long start-up took before it failed, before start-up moved to the
/// runtime's policy: now `start()` keeps trying until
/// [`DEFAULT_START_TIMEOUT`](crate::backend::DEFAULT_START_TIMEOUT) unless
/// [`Etcd::start_timeout`] (or the URL's `start_timeout=`) says otherwise.
#[deprecated(
    note = "start-up retries until backend::DEFAULT_START_TIMEOUT; set Etcd::start_timeout"
)]
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The etcd backend's configuration, for
/// [`Builder::backend`](crate::Builder::backend).
///
/// ```no_run
/// use std::time::Duration;
/// use highlander::backend::etcd::Etcd;
///
/// # #[tokio::main] async fn main() -> highlander::Result<()> {
/// let etcd = Etcd::new(["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"])
///     .ttl(Duration::from_secs(5))
///     .namespace("billing")
///     .user("app", "s3cret");
/// let handle = highlander::Runtime::builder().backend(etcd).start().await?;
/// handle.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    namespace: String,
    ttl: Duration,
    keepalive: Option<Duration>,
    start_timeout: Option<Duration>,
    user: Option<(String, Secret)>,
    tls: Option<Tls>,
}

/// TLS settings: PEM file paths, read when connecting.
#[derive(Clone, Debug, Default)]
struct Tls {
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    domain: Option<String>,
}

impl Etcd {
    /// An etcd backend at `endpoints` (`host:port` each; `http://` or
    /// `https://` prefixes are accepted), with the default TTL and
    /// namespace and no authentication.
    ///
    /// ```
    /// let etcd = highlander::backend::etcd::Etcd::new(["127.0.0.1:2379"]);
    /// assert_eq!(highlander::backend::Backend::describe(&etcd), "etcd://127.0.0.1:2379/highlander (ttl 10s)");
    /// ```
    pub fn new<I, S>(endpoints: I) -> Etcd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Etcd {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            ttl: DEFAULT_TTL,
            keepalive: None,
            start_timeout: None,
            user: None,
            tls: None,
        }
    }

    /// The lease TTL (whole seconds, at least 2 s: etcd's minimum). A crashed
    /// node's ids move to another node after about this long; every
    /// service's shutdown budget must fit in it with room to spare.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let etcd = highlander::backend::etcd::Etcd::new(["127.0.0.1:2379"]).ttl(Duration::from_secs(5));
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Etcd {
        self.ttl = ttl;
        self
    }

    /// The key prefix: ids live at `/{namespace}/{id}`, with `%` and `/` in
    /// the namespace percent-encoded (`billing/v2` → `/billing%2Fv2/{id}`),
    /// so two namespaces never share a key. Nodes that should compete for
    /// the same ids use the same namespace.
    ///
    /// ```
    /// let etcd = highlander::backend::etcd::Etcd::new(["127.0.0.1:2379"]).namespace("billing");
    /// ```
    pub fn namespace(mut self, namespace: impl Into<String>) -> Etcd {
        self.namespace = namespace.into();
        self
    }

    /// How often the node's lease is kept alive (default: TTL/10, at most
    /// 1 s). Failed keep-alives are retried sooner.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let etcd = highlander::backend::etcd::Etcd::new(["127.0.0.1:2379"])
    ///     .keepalive_interval(Duration::from_millis(500));
    /// ```
    pub fn keepalive_interval(mut self, interval: Duration) -> Etcd {
        self.keepalive = Some(interval);
        self
    }

    /// How long `start()` keeps trying to reach etcd before it fails with
    /// [`Error::Unreachable`] (100 ms to 10 min; default
    /// [`DEFAULT_START_TIMEOUT`](crate::backend::DEFAULT_START_TIMEOUT), or
    /// [`Builder::start_timeout`](crate::Builder::start_timeout), which
    /// wins over this).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let etcd = highlander::backend::etcd::Etcd::new(["127.0.0.1:2379"])
    ///     .start_timeout(Duration::from_secs(10));
    /// ```
    pub fn start_timeout(mut self, timeout: Duration) -> Etcd {
        self.start_timeout = Some(timeout);
        self
    }

    /// The old name of [`Etcd::start_timeout`]: how long start-up may take
    /// before it fails.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let etcd = highlander::backend::etcd::Etcd::new(["127.0.0.1:2379"])
    ///     .connect_timeout(Duration::from_secs(2));
    /// ```
    pub fn connect_timeout(self, timeout: Duration) -> Etcd {
        self.start_timeout(timeout)
    }

    /// Authenticates as `user` with `password`. The password never appears
    /// in an error, a log line or `Debug` output.
    ///
    /// ```
    /// let etcd = highlander::backend::etcd::Etcd::new(["127.0.0.1:2379"]).user("app", "s3cret");
    /// assert!(!format!("{etcd:?}").contains("s3cret"));
    /// ```
    pub fn user(mut self, user: impl Into<String>, password: impl Into<String>) -> Etcd {
        self.user = Some((user.into(), Secret::new(password)));
        self
    }

    /// Connects over TLS, trusting the CA certificate in the PEM file `ca`.
    ///
    /// ```
    /// let etcd = highlander::backend::etcd::Etcd::new(["etcd.internal:2379"]).tls_ca("/etc/etcd/ca.pem");
    /// ```
    pub fn tls_ca(mut self, ca: impl Into<PathBuf>) -> Etcd {
        self.tls.get_or_insert_with(Tls::default).ca = Some(ca.into());
        self
    }

    /// Presents a client certificate (PEM files) over TLS.
    ///
    /// ```
    /// let etcd = highlander::backend::etcd::Etcd::new(["etcd.internal:2379"])
    ///     .tls_ca("/etc/etcd/ca.pem")
    ///     .tls_identity("/etc/etcd/client.pem", "/etc/etcd/client-key.pem");
    /// ```
    pub fn tls_identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Etcd {
        self.tls.get_or_insert_with(Tls::default).identity = Some((cert.into(), key.into()));
        self
    }

    /// The server name to verify in the server's certificate, when it
    /// differs from the endpoint's host.
    ///
    /// ```
    /// let etcd = highlander::backend::etcd::Etcd::new(["10.0.0.1:2379"])
    ///     .tls_ca("/etc/etcd/ca.pem")
    ///     .tls_domain("etcd.internal");
    /// ```
    pub fn tls_domain(mut self, domain: impl Into<String>) -> Etcd {
        self.tls.get_or_insert_with(Tls::default).domain = Some(domain.into());
        self
    }

    /// Checks the configuration; every problem is a one-line message.
    fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() || self.endpoints.iter().any(|e| host_port(e).is_none()) {
            return Err(Error::config(format!(
                "etcd backend `{}`: give one or more endpoints as host:port, separated by commas \
                 (etcd://10.0.0.1:2379,10.0.0.2:2379)",
                self.describe()
            )));
        }
        if self.ttl < MIN_TTL {
            return Err(Error::config(format!(
                "etcd backend `{}`: ttl {} is below etcd's minimum lease TTL of 2s: use a ttl \
                 between 2s and 24h",
                self.describe(),
                shown(self.ttl)
            )));
        }
        if self.ttl > MAX_TTL {
            return Err(Error::config(format!(
                "etcd backend: ttl {} is too long (a crashed node's ids move only after it): use \
                 a ttl between 2s and 24h",
                shown(self.ttl)
            )));
        }
        if let Some(keepalive) = self.keepalive {
            let most = Duration::from_secs(self.ttl_secs() as u64) / 3;
            if !(MIN_KEEPALIVE..=most).contains(&keepalive) {
                return Err(Error::config(format!(
                    "etcd backend `{}`: keepalive {} is out of range: use a keepalive between \
                     10ms and a third of the TTL ({})",
                    self.describe(),
                    shown(keepalive),
                    show(most)
                )));
            }
        }
        if let Some(timeout) = self.start_timeout
            && !START_TIMEOUT.contains(&timeout)
        {
            return Err(Error::config(format!(
                "etcd backend `{}`: start_timeout (or connect_timeout) {} is out of range: use a \
                 start_timeout between 100ms and 10m",
                self.describe(),
                shown(timeout)
            )));
        }
        if self.namespace.is_empty() || self.namespace.contains(['\0', '\n']) {
            return Err(Error::config(format!(
                "etcd backend `{}`: the namespace must be a non-empty key prefix",
                self.describe()
            )));
        }
        if let Some(tls) = &self.tls
            && tls.ca.is_none()
        {
            return Err(Error::config(format!(
                "etcd backend `{}`: TLS needs the CA certificate that signed the server's \
                     certificate: add ?ca=/path/to/ca.pem (or Etcd::tls_ca)",
                self.describe()
            )));
        }
        Ok(())
    }

    /// The TTL as etcd takes it: whole seconds, rounded up.
    fn ttl_secs(&self) -> i64 {
        let secs = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        i64::try_from(secs).unwrap_or(i64::MAX)
    }

    /// The start timeout the limits below follow: the configured one, else
    /// the runtime's default.
    fn start_limit(&self) -> Duration {
        self.start_timeout
            .unwrap_or(crate::backend::DEFAULT_START_TIMEOUT)
    }

    /// How long one connection to a member (TCP, and TLS) may take: 2 s at
    /// most.
    fn dial_timeout(&self) -> Duration {
        self.start_limit().min(Duration::from_secs(2))
    }

    /// How long one start-up step may wait for one member: a third of the
    /// start timeout, 0.5 to 2 s.
    fn attempt_limit(&self) -> Duration {
        (self.start_limit() / 3).clamp(Duration::from_millis(500), Duration::from_secs(2))
    }

    /// The keep-alive interval in effect.
    fn keepalive_in_effect(&self) -> Duration {
        self.keepalive.unwrap_or_else(|| {
            (Duration::from_secs(self.ttl_secs().max(1) as u64) / 10)
                .clamp(Duration::from_millis(100), Duration::from_secs(1))
        })
    }
}

impl fmt::Debug for Etcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .field("keepalive", &self.keepalive_in_effect())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("password", &self.user.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl Backend for Etcd {
    fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>> {
        let config = self.clone();
        let node = node.to_string();
        Box::pin(async move {
            config.validate()?;
            let session = connect::connect(config, node).await?;
            Ok(session as Arc<dyn Session>)
        })
    }

    fn start_timeout(&self) -> Option<Duration> {
        self.start_timeout
    }

    fn describe(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        let user = match &self.user {
            Some((user, _)) => format!("{user}:***@"),
            None => String::new(),
        };
        format!(
            "{scheme}://{user}{}/{} (ttl {}s)",
            self.endpoints.join(","),
            self.namespace,
            self.ttl_secs()
        )
    }
}

/// The prefix of every key of `namespace`: `/{namespace}/`, with `%` and
/// `/` in the namespace percent-encoded (`%25`, `%2F`). The namespace is
/// thus one path segment, so no namespace's prefix is a prefix of another's
/// keys: namespace `billing` with id `v2/x` is `/billing/v2/x`, namespace
/// `billing/v2` with id `x` is `/billing%2Fv2/x`. (Before 0.1.0 shipped the
/// namespace went in verbatim and those two were the same key.)
pub(crate) fn key_prefix(namespace: &str) -> String {
    let mut prefix = String::with_capacity(namespace.len() + 2);
    prefix.push('/');
    for c in namespace.chars() {
        match c {
            '%' => prefix.push_str("%25"),
            '/' => prefix.push_str("%2F"),
            c => prefix.push(c),
        }
    }
    prefix.push('/');
    prefix
}

const MIN_TTL: Duration = Duration::from_secs(2);
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
const MIN_KEEPALIVE: Duration = Duration::from_millis(10);
/// The TTLs etcd takes, for messages (`validate` says which end was missed).
const TTL: RangeInclusive<Duration> = MIN_TTL..=MAX_TTL;
/// The keep-alive intervals any TTL allows, for messages.
const KEEPALIVE: RangeInclusive<Duration> = MIN_KEEPALIVE..=Duration::from_secs(8 * 3600);
const START_TIMEOUT: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);

/// A duration for an error message ("more than a year" for absurd ones).
fn shown(d: Duration) -> String {
    if d > Duration::from_secs(366 * 24 * 3600) {
        "(more than a year)".to_string()
    } else {
        show(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_one_key_segment() {
        assert_eq!(key_prefix("highlander"), "/highlander/");
        assert_eq!(key_prefix("billing/v2"), "/billing%2Fv2/");
        assert_eq!(key_prefix("100%/x"), "/100%25%2Fx/");
        let (a, b) = (key_prefix("billing"), key_prefix("billing/v2"));
        assert_ne!(format!("{a}v2/x"), format!("{b}x"));
        assert!(!b.starts_with(&a) && !a.starts_with(&b));
        // Escaping is injective: `a%2Fb` and `a/b` differ too.
        assert_ne!(key_prefix("a%2Fb"), key_prefix("a/b"));
    }
}
