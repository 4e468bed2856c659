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
//!   to the node's lease, if the key's create revision is 0. Claims from many
//!   guardians are batched into one transaction (at most 127 per
//!   transaction: etcd's limit is 128 operations, nested ones included; a
//!   few transactions in flight).
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
//! `connect_timeout` (`5s`; 100 ms to 10 min), `ca`, `cert`, `key`
//! (PEM file paths for TLS; `ca` is required for `etcds://`), `domain` (the
//! name to verify in the server's certificate), `user`, `password`. The
//! namespace defaults to `highlander`.
//!
//! ```
//! use highlander::backend::from_url;
//!
//! let backend = from_url("etcd://app:s3cret@10.0.0.1:2379,10.0.0.2:2379/billing?ttl=5s").unwrap();
//! assert!(!backend.describe().contains("s3cret"));
//! assert!(from_url("etcd://").is_err());
//! ```

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, Session};
use crate::service::BoxFuture;
use crate::{Error, Result};

mod conn;
mod pb;
mod session;

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

/// How long connecting may take before [`Backend::connect`] fails.
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
    connect_timeout: Duration,
    user: Option<(String, Password)>,
    tls: Option<Tls>,
}

/// TLS settings: PEM file paths, read when connecting.
#[derive(Clone, Debug, Default)]
struct Tls {
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    domain: Option<String>,
}

/// A password that never shows in `Debug` or `Display`.
#[derive(Clone)]
struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
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
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
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

    /// How long [`Backend::connect`] may take before it fails (default 5 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let etcd = highlander::backend::etcd::Etcd::new(["127.0.0.1:2379"])
    ///     .connect_timeout(Duration::from_secs(2));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Etcd {
        self.connect_timeout = timeout;
        self
    }

    /// Authenticates as `user` with `password`. The password never appears
    /// in an error, a log line or `Debug` output.
    ///
    /// ```
    /// let etcd = highlander::backend::etcd::Etcd::new(["127.0.0.1:2379"]).user("app", "s3cret");
    /// assert!(!format!("{etcd:?}").contains("s3cret"));
    /// ```
    pub fn user(mut self, user: impl Into<String>, password: impl Into<String>) -> Etcd {
        self.user = Some((user.into(), Password(password.into())));
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
                "etcd backend `{}`: ttl {:?} is below etcd's minimum lease TTL of 2s: use a ttl \
                 between 2s and 1 day",
                self.describe(),
                self.ttl
            )));
        }
        if self.ttl > MAX_TTL {
            return Err(Error::config(format!(
                "etcd backend: ttl {} is too long (a crashed node's ids move only after it): use \
                 a ttl between 2s and 1 day",
                shown(self.ttl)
            )));
        }
        if let Some(keepalive) = self.keepalive {
            let most = Duration::from_secs(self.ttl_secs() as u64) / 3;
            if !(MIN_KEEPALIVE..=most).contains(&keepalive) {
                return Err(Error::config(format!(
                    "etcd backend `{}`: keepalive {} is out of range: use a keepalive between \
                     10ms and a third of the TTL ({most:?})",
                    self.describe(),
                    shown(keepalive)
                )));
            }
        }
        if !(MIN_CONNECT_TIMEOUT..=MAX_CONNECT_TIMEOUT).contains(&self.connect_timeout) {
            return Err(Error::config(format!(
                "etcd backend `{}`: connect_timeout {} is out of range: use a connect_timeout \
                 between 100ms and 10m",
                self.describe(),
                shown(self.connect_timeout)
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
            let session = session::connect(config, node).await?;
            Ok(session as Arc<dyn Session>)
        })
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
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// A duration for an error message ("more than a year" for absurd ones).
fn shown(d: Duration) -> String {
    if d > Duration::from_secs(366 * 24 * 3600) {
        "(more than a year)".to_string()
    } else {
        format!("{d:?}")
    }
}

/// `host:port` of an endpoint written as `host:port`, `http://host:port` or
/// `https://host:port`.
fn host_port(endpoint: &str) -> Option<&str> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.is_empty()
        || host.contains(['/', '@', ' ', '?', '#'])
        || (host.contains(':') && !bracketed)
        || port.parse::<u16>().is_err()
    {
        return None;
    }
    Some(rest)
}

/// Parses `500ms`, `3s`, `2m` or a plain number of seconds.
fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let (number, unit) = match value.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => value.split_at(i),
        None => (value, "s"),
    };
    let number: f64 = number.parse().ok()?;
    let secs = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return None,
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return None;
    }
    // Too large for a Duration: saturate; validate() says it is out of range.
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// Decodes `%XX` escapes (for passwords with special characters).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The backend named by an `etcd://` or `etcds://` URL (see the module docs).
pub(crate) fn from_url(url: &str) -> Result<Box<dyn Backend>> {
    Ok(Box::new(parse_url(url)?))
}

/// A part of `url` that may be quoted in an error: one that lies wholly
/// after the last `@`. A password with a `/`, `?` or `#` that was not
/// percent-encoded ends the authority early and spills into what would be
/// the endpoints, the path or the options, so nothing before the last `@`
/// is ever quoted (and the URL itself never is).
fn quotable<'a>(url: &str, part: &'a str) -> Option<&'a str> {
    let secret_end = url.rfind('@').map_or(0, |i| i + 1);
    let offset = (part.as_ptr() as usize).checked_sub(url.as_ptr() as usize)?;
    (offset >= secret_end && offset + part.len() <= url.len()).then_some(part)
}

/// The hint for a URL whose credentials may have spilled.
const ENCODE_HINT: &str = "(a password with `/`, `?`, `#` or `@` must be percent-encoded: %2F, \
                           %3F, %23, %40)";

fn parse_url(url: &str) -> Result<Etcd> {
    // The message describes the problem; it never repeats the URL, whose
    // password may not be where the parser thinks it is.
    let bad = |why: &str| Error::config(format!("invalid etcd URL: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected etcd://host:port"))?;
    let tls = match scheme {
        "etcd" => false,
        "etcds" => true,
        _ => return Err(bad("the scheme must be etcd:// or etcds://")),
    };
    let (head, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match head.find('/') {
        Some(i) => (&head[..i], &head[i + 1..]),
        None => (head, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let hosts: Vec<&str> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err(bad("no endpoint: expected etcd://host:port[,host:port…]"));
    }
    for (n, e) in hosts.iter().enumerate() {
        if host_port(e).is_none() {
            return Err(bad(&match quotable(url, e) {
                Some(e) => format!("endpoint `{e}` is not host:port"),
                None => format!("endpoint {} is not host:port {ENCODE_HINT}", n + 1),
            }));
        }
    }
    if path.contains('@') {
        return Err(bad(&format!(
            "an `@` after the endpoints {ENCODE_HINT}; a namespace with `@` goes in ?namespace="
        )));
    }
    let mut etcd = Etcd::new(hosts.iter().map(|h| h.to_string()));
    let namespace = path.trim_matches('/');
    if !namespace.is_empty() {
        etcd = etcd.namespace(namespace);
    }
    let mut user: Option<String> = None;
    let mut password: Option<String> = None;
    if let Some(info) = userinfo {
        match info.split_once(':') {
            Some((u, p)) => {
                user = Some(percent_decode(u));
                password = Some(percent_decode(p));
            }
            None => user = Some(percent_decode(info)),
        }
    }
    let mut tls_settings = Tls::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let duration = |what: &str| {
            parse_duration(value)
                .ok_or_else(|| bad(&format!("`{what}` wants a duration like 500ms, 5s or 1m")))
        };
        match key {
            "ttl" => etcd.ttl = duration("ttl")?,
            "keepalive" => etcd.keepalive = Some(duration("keepalive")?),
            "connect_timeout" => etcd.connect_timeout = duration("connect_timeout")?,
            "namespace" => etcd.namespace = percent_decode(value),
            "user" => user = Some(percent_decode(value)),
            "password" => password = Some(percent_decode(value)),
            "ca" => tls_settings.ca = Some(PathBuf::from(percent_decode(value))),
            "cert" | "key" => {
                let (cert, key_path) = tls_settings.identity.get_or_insert_with(Default::default);
                let target = if key == "cert" { cert } else { key_path };
                *target = PathBuf::from(percent_decode(value));
            }
            "domain" => tls_settings.domain = Some(percent_decode(value)),
            other => {
                let named = match quotable(url, other) {
                    Some(other) => format!("unknown option `{other}`"),
                    None => format!("an unknown option {ENCODE_HINT}"),
                };
                return Err(bad(&format!(
                    "{named}: use ttl, keepalive, connect_timeout, namespace, user, password, \
                     ca, cert, key or domain"
                )));
            }
        }
    }
    if let Some((cert, key)) = &tls_settings.identity
        && (cert.as_os_str().is_empty() || key.as_os_str().is_empty())
    {
        return Err(bad("a client certificate needs both `cert` and `key`"));
    }
    match (user, password) {
        (Some(u), p) => etcd = etcd.user(u, p.unwrap_or_default()),
        (None, Some(_)) => return Err(bad("a password without a user")),
        (None, None) => {}
    }
    let wants_tls = tls || tls_settings.ca.is_some() || tls_settings.identity.is_some();
    if wants_tls {
        if !tls {
            return Err(bad("TLS options (ca, cert, key) need the etcds:// scheme"));
        }
        etcd.tls = Some(tls_settings);
    } else if tls_settings.domain.is_some() {
        return Err(bad("`domain` needs the etcds:// scheme"));
    }
    etcd.validate()?;
    Ok(etcd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints_namespace_and_options() {
        let e = parse_url("etcd://a:2379,b:2380/billing?ttl=5s&keepalive=250ms").unwrap();
        assert_eq!(e.endpoints, vec!["a:2379", "b:2380"]);
        assert_eq!(e.namespace, "billing");
        assert_eq!(e.ttl, Duration::from_secs(5));
        assert_eq!(e.keepalive_in_effect(), Duration::from_millis(250));
        let d = parse_url("etcd://a:2379").unwrap();
        assert_eq!(d.namespace, DEFAULT_NAMESPACE);
        assert_eq!(d.ttl, DEFAULT_TTL);
        assert_eq!(d.keepalive_in_effect(), Duration::from_secs(1));
    }

    #[test]
    fn hides_the_password_everywhere() {
        let e = parse_url("etcd://app:hunter2@a:2379?ttl=3s").unwrap();
        assert!(!format!("{e:?}").contains("hunter2"));
        assert!(!e.describe().contains("hunter2"));
        assert_eq!(e.user.as_ref().map(|(_, p)| p.0.as_str()), Some("hunter2"));
        let q = parse_url("etcd://a:2379?user=app&password=hunter2").unwrap();
        assert!(!q.describe().contains("hunter2"));
        let err = parse_url("etcd://app:hunter2@a:2379?bogus=1")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("unknown option `bogus`"), "{err}");
    }

    #[test]
    fn rejects_bad_urls_in_one_line() {
        for (url, want) in [
            ("etcd://", "no endpoint"),
            ("etcd://host", "not host:port"),
            ("etcd://host:notaport", "not host:port"),
            ("etcd://a:2379?ttl=soon", "duration"),
            ("etcd://a:2379?ttl=1s", "minimum lease TTL"),
            ("etcds://a:2379", "CA certificate"),
            ("etcd://a:2379?ca=/x.pem", "etcds://"),
            ("etcd://a:2379?password=x", "without a user"),
        ] {
            let err = parse_url(url).unwrap_err().to_string();
            assert!(err.contains(want), "{url}: {err}");
            assert!(!err.contains('\n'), "{url}: {err}");
        }
    }

    #[test]
    fn out_of_range_numbers_are_one_line_errors_not_panics() {
        for (url, want) in [
            ("etcd://a:2379?ttl=99999999999999999999999", "ttl"),
            ("etcd://a:2379?ttl=100000000", "ttl"),
            ("etcd://a:2379?keepalive=0ms", "keepalive"),
            (
                "etcd://a:2379?keepalive=99999999999999999999999",
                "keepalive",
            ),
            ("etcd://a:2379?ttl=10s&keepalive=5s", "keepalive"),
            ("etcd://a:2379?connect_timeout=0", "connect_timeout"),
            (
                "etcd://a:2379?connect_timeout=99999999999999999999999m",
                "connect_timeout",
            ),
        ] {
            let err = parse_url(url).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("between"),
                "{url}: {err}"
            );
            assert!(!err.contains('\n'), "{url}: {err}");
        }
        // The builder is checked the same way (connect() validates).
        for etcd in [
            Etcd::new(["a:2379"]).ttl(Duration::MAX),
            Etcd::new(["a:2379"]).keepalive_interval(Duration::ZERO),
            Etcd::new(["a:2379"]).connect_timeout(Duration::MAX),
        ] {
            let err = etcd.validate().unwrap_err().to_string();
            assert!(err.contains("between"), "{err}");
        }
    }

    #[test]
    fn a_bad_url_never_echoes_a_credential() {
        // Passwords with characters that end the authority early (`/`, `?`)
        // spill into what would be the endpoints, path or options.
        for url in [
            "etcd://app:Xq/Zk@a:2379",
            "etcd://app:Xq?Zk@a:2379",
            "etcd://app:12/Zk@a:2379",
            "etcd://app:Xq:99/Zk@a:2379",
            "etcd://app:12?Zk@a:2379",
            "etcds://app:Xq/Zk@a:2379?ca=/ca.pem",
        ] {
            let err = parse_url(url).unwrap_err().to_string();
            assert!(
                !err.contains("Xq") && !err.contains("Zk") && !err.contains("12"),
                "{url}: {err}"
            );
            assert!(err.starts_with("invalid etcd URL"), "{url}: {err}");
            assert!(!err.contains('\n'), "{url}: {err}");
        }
        // Parts clear of the credentials are still named.
        let err = parse_url("etcd://app:s3cret@a:2379?bogus=1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown option `bogus`") && !err.contains("s3cret"),
            "{err}"
        );
        let err = parse_url("etcd://host").unwrap_err().to_string();
        assert!(err.contains("`host` is not host:port"), "{err}");
    }

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

    #[test]
    fn tls_settings() {
        let e = parse_url("etcds://a:2379?ca=/ca.pem&cert=/c.pem&key=/k.pem&domain=etcd.internal")
            .unwrap();
        let tls = e.tls.unwrap();
        assert_eq!(tls.ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            tls.identity,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        assert_eq!(tls.domain.as_deref(), Some("etcd.internal"));
    }

    #[test]
    fn durations_and_escapes() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(percent_decode("p%40ss%3Aw"), "p@ss:w");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
