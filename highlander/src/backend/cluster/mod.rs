//! The embedded cluster: the application's own processes connect to each
//! other and agree among themselves who runs each singleton, the way Erlang
//! nodes do under `:global`. No database, no external service.
//!
//! Select it with `HIGHLANDER_BACKEND=cluster://0.0.0.0:7400?seeds=host1:7400,host2:7400`
//! and `HIGHLANDER_COOKIE=<the same long random secret on every node>`, or
//! with [`Cluster`] on the builder. Behind the cargo feature `cluster`.
//!
//! # How it works
//!
//! - **Membership.** Every node keeps one authenticated TCP connection to
//!   every other member (a full mesh, like Erlang distribution). It starts
//!   from its seeds and learns the rest from each member it connects to.
//!   A killed process is seen at once (its connections reset); a silent one
//!   (paused, cut off) when nothing arrived from it for the failure timeout
//!   (default 1 s; idle connections carry a heartbeat every 200 ms).
//! - **Authentication.** Each connection starts with an HMAC-SHA256
//!   challenge-response over fresh nonces from both sides: the cookie itself
//!   never crosses the wire; the proofs cover every field of the handshake
//!   (names, incarnations, addresses, ports, version), so none can be
//!   rewritten on the path. A peer with another cookie is refused and the
//!   refusal logged (at most once a minute per address). Without a cookie a
//!   node only listens on loopback; an empty cookie is refused, and off
//!   loopback one shorter than 16 bytes.
//!   Every frame after the handshake is sealed with ChaCha20-Poly1305 under
//!   keys derived from the cookie and that handshake: unreadable on the
//!   path, and an altered or replayed frame closes the connection.
//! - **Registry.** Claims are settled by an *arbiter*: the lowest-named
//!   ready member a node is connected to. A claim is granted only when
//!   neither the claimant nor the arbiter sees a holder, and the arbiter
//!   hands each id to one claimant at a time, so two nodes starting at once
//!   end with one instance. The new holder announces its tenure to every
//!   member directly; releases go out the same way.
//! - **Netsplit and heal.** A side that loses the holder's connection takes
//!   the id over (AP, like `:global`). When connections come back, each node
//!   sends its holdings; where two tenures of one id meet, the one that
//!   started **earliest** keeps the id, ties to the **lower node name**, and
//!   the other ends with [`LeaseEnd::Conflict`](crate::backend::LeaseEnd::Conflict).
//! - **Leave.** [`Session::close`] releases
//!   every id and says goodbye to every member before the process exits.
//! - **Fencing tokens** are `counter << 10 | hash(node) & 1023`, the counter
//!   one above the highest token seen for the id (from holders and from the
//!   arbiter) and at least the wall clock in milliseconds. Within a connected
//!   cluster they strictly grow per id; across a split two sides may issue
//!   tokens concurrently, which differ in their low bits. After a full
//!   restart only the wall clock carries them on (nothing is kept on disk):
//!   a clock set back can make them smaller than before the restart.
//!
//! `docs/cluster.md` has the protocol, the numbers and the limits.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{Backend, Session};
use crate::service::BoxFuture;
use crate::{Error, Result, redact_url};

mod accept;
mod dial;
mod discovery;
mod encoding;
mod faults;
mod gate;
mod join;
mod node;
mod seal;
mod session;
mod state;
mod tokens;
mod transcript;
mod transport;
mod wire;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub use faults::Faults;
#[cfg(not(feature = "test-util"))]
use faults::Faults;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz;

/// The embedded cluster backend: configuration for one node, given to
/// [`Builder::backend`](crate::Builder::backend).
///
/// ```no_run
/// use highlander::backend::cluster::Cluster;
/// use highlander::Runtime;
///
/// # #[tokio::main] async fn main() -> highlander::Result<()> {
/// let cluster = Cluster::new("0.0.0.0:7400")
///     .seeds(["app-1:7400", "app-2:7400", "app-3:7400"])
///     .cookie(std::env::var("MY_CLUSTER_SECRET").unwrap());
/// Runtime::builder().node("app-1").backend(cluster).run().await
/// # }
/// ```
#[derive(Clone)]
pub struct Cluster {
    settings: Settings,
}

#[derive(Clone)]
pub(crate) struct Settings {
    listen: String,
    advertise: Option<String>,
    seeds: Vec<String>,
    cookie: Option<Secret>,
    heartbeat: Duration,
    failure_timeout: Duration,
    join_timeout: Duration,
    redial: Duration,
    faults: Option<Faults>,
    /// Where the listener of the last node started from this configuration
    /// (or a clone of it) is bound: shared by the clones.
    bound: Arc<Mutex<Option<SocketAddr>>>,
}

/// Allowed ranges, in milliseconds: `(URL key, builder method, min, max)`.
const HEARTBEAT_MS: (&str, &str, u64, u64) = ("heartbeat_ms", "heartbeat", 10, 60_000);
const FAILURE_TIMEOUT_MS: (&str, &str, u64, u64) =
    ("failure_timeout_ms", "failure_timeout", 50, 600_000);
const JOIN_MS: (&str, &str, u64, u64) = ("join_ms", "join_timeout", 0, 600_000);
const REDIAL_MS: (&str, &str, u64, u64) = ("redial_ms", "redial", 10, 60_000);
/// At most this many seeds.
const MAX_SEEDS: usize = 1024;
/// A cookie on a listen address other hosts can reach has at least this
/// many bytes.
pub(crate) const MIN_PUBLIC_COOKIE: usize = 16;

impl Settings {
    /// Checks every duration and count. `url` is the redacted URL the
    /// settings came from, to name its keys in the error; without it the
    /// builder methods are named.
    fn validate(&self, url: Option<&str>) -> Result<()> {
        for ((key, method, min, max), value) in [
            (HEARTBEAT_MS, self.heartbeat),
            (FAILURE_TIMEOUT_MS, self.failure_timeout),
            (JOIN_MS, self.join_timeout),
            (REDIAL_MS, self.redial),
        ] {
            let range = Duration::from_millis(min)..=Duration::from_millis(max);
            if !range.contains(&value) {
                return Err(Error::config(match url {
                    Some(url) => format!(
                        "`{url}`: {key} must be between {min} and {max} (milliseconds), got {}",
                        value.as_millis()
                    ),
                    None => format!(
                        "cluster backend: Cluster::{method} must be between {min} ms and {max} ms, \
                         got {value:?}"
                    ),
                }));
            }
        }
        if self.failure_timeout <= self.heartbeat {
            return Err(Error::config(match url {
                Some(url) => format!(
                    "`{url}`: failure_timeout_ms must be longer than heartbeat_ms (several heartbeats)"
                ),
                None => "cluster backend: Cluster::failure_timeout must be longer than \
                         Cluster::heartbeat (several heartbeats)"
                    .to_string(),
            }));
        }
        if self.seeds.len() > MAX_SEEDS {
            return Err(Error::config(format!(
                "cluster backend: {} seeds given, at most {MAX_SEEDS} are allowed; list a few \
                 members, the others are learned from them",
                self.seeds.len()
            )));
        }
        if self.cookie.as_ref().is_some_and(|c| c.0.is_empty()) {
            return Err(Error::config(format!(
                "{}the cluster cookie is empty: anyone could compute its proofs. Use a long random \
                 secret, the same on every node, e.g. `head -c 32 /dev/urandom | base64`",
                url.map(|u| format!("`{u}`: ")).unwrap_or_default()
            )));
        }
        Ok(())
    }
}

/// A secret that never shows in `Debug`.
#[derive(Clone)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Cluster {
    /// A node listening on `listen` (`host:port`; port 0 picks a free one),
    /// with no seeds yet, the cookie from `HIGHLANDER_COOKIE`, and the
    /// default timings (heartbeat 200 ms, failure timeout 1 s, join wait
    /// 500 ms, redial every 100 ms).
    ///
    /// ```
    /// let c = highlander::backend::cluster::Cluster::new("127.0.0.1:7400")
    ///     .seeds(["127.0.0.1:7401"]);
    /// use highlander::backend::Backend;
    /// assert_eq!(c.describe(), "cluster://127.0.0.1:7400?seeds=127.0.0.1:7401");
    /// ```
    pub fn new(listen: impl Into<String>) -> Self {
        Cluster {
            settings: Settings {
                listen: listen.into(),
                advertise: None,
                seeds: Vec::new(),
                cookie: None,
                heartbeat: Duration::from_millis(200),
                failure_timeout: Duration::from_secs(1),
                join_timeout: Duration::from_millis(500),
                redial: Duration::from_millis(100),
                faults: None,
                bound: Arc::default(),
            },
        }
    }

    /// Adds seeds: `host:port` addresses of other members to start from.
    /// Listing every node, this one included, is fine.
    pub fn seeds<I, S>(mut self, seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.settings
            .seeds
            .extend(seeds.into_iter().map(Into::into));
        self
    }

    /// The cluster secret, instead of `HIGHLANDER_COOKIE`. Every node needs
    /// the same one; it is never sent, logged or shown.
    pub fn cookie(mut self, cookie: impl Into<String>) -> Self {
        self.settings.cookie = Some(Secret(cookie.into()));
        self
    }

    /// The address other members dial to reach this node, when it differs
    /// from the listen address (behind NAT, or a proxy). By default: the
    /// listen address, or when listening on `0.0.0.0`, the address the peer
    /// sees plus the listen port.
    pub fn advertise(mut self, addr: impl Into<String>) -> Self {
        self.settings.advertise = Some(addr.into());
        self
    }

    /// How often an idle connection sends a heartbeat (default 200 ms).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.settings.heartbeat = every;
        self
    }

    /// How long a member may stay silent before it counts as unreachable
    /// and its ids are taken over (default 1 s). Keep it several heartbeats
    /// long.
    pub fn failure_timeout(mut self, timeout: Duration) -> Self {
        self.settings.failure_timeout = timeout;
        self
    }

    /// How long a starting node waits for its seeds before it claims
    /// anything on its own (default 500 ms). It stops waiting as soon as
    /// every seed and every member they named is connected.
    pub fn join_timeout(mut self, timeout: Duration) -> Self {
        self.settings.join_timeout = timeout;
        self
    }

    /// How soon an unreachable member is dialed again (default 100 ms).
    pub fn redial(mut self, every: Duration) -> Self {
        self.settings.redial = every;
        self
    }

    /// The address this node's listener is bound to, once a runtime has
    /// started it (`None` before): how to learn the port when listening on
    /// port 0. Clones of this configuration share it; when several nodes
    /// start from one configuration, it is the latest one's.
    ///
    /// ```
    /// use highlander::backend::cluster::Cluster;
    /// use highlander::Runtime;
    ///
    /// # #[tokio::main] async fn main() -> highlander::Result<()> {
    /// let cluster = Cluster::new("127.0.0.1:0");
    /// let first = Runtime::builder()
    ///     .node("first")
    ///     .backend(cluster.clone())
    ///     .start()
    ///     .await?;
    /// let addr = cluster.local_addr().expect("started");
    /// assert_ne!(addr.port(), 0);
    /// // Another node can use it as its seed.
    /// let second = Runtime::builder()
    ///     .node("second")
    ///     .backend(Cluster::new("127.0.0.1:0").seeds([addr.to_string()]))
    ///     .start()
    ///     .await?;
    /// second.shutdown().await;
    /// first.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn local_addr(&self) -> Option<SocketAddr> {
        *self
            .settings
            .bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Routes this node's links through `faults`, so a test can cut and
    /// heal them. Needs the `test-util` feature.
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn faults(mut self, faults: &Faults) -> Self {
        self.settings.faults = Some(faults.clone());
        self
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        f.debug_struct("Cluster")
            .field("listen", &s.listen)
            .field("advertise", &s.advertise)
            .field("seeds", &s.seeds)
            .field("cookie", &s.cookie.as_ref().map(|_| "***"))
            .field("heartbeat", &s.heartbeat)
            .field("failure_timeout", &s.failure_timeout)
            .finish_non_exhaustive()
    }
}

impl Backend for Cluster {
    fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>> {
        let settings = Arc::new(self.settings.clone());
        let name = node.to_string();
        Box::pin(async move {
            settings.validate(None)?;
            let node = join::start(settings, &name).await?;
            Ok(Arc::new(session::ClusterSession { node }) as Arc<dyn Session>)
        })
    }

    fn describe(&self) -> String {
        let s = &self.settings;
        let mut out = format!("cluster://{}", s.listen);
        let mut sep = '?';
        if !s.seeds.is_empty() {
            out.push_str(&format!("{sep}seeds={}", s.seeds.join(",")));
            sep = '&';
        }
        if let Some(a) = &s.advertise {
            out.push_str(&format!("{sep}advertise={a}"));
        }
        out
    }
}

/// Parses `cluster://HOST:PORT?seeds=a:7400,b:7400`, with optional
/// `advertise=HOST:PORT`, `heartbeat_ms`, `failure_timeout_ms`, `join_ms`,
/// `redial_ms` and `cookie` (prefer `HIGHLANDER_COOKIE`: URLs end up in
/// process listings).
pub(crate) fn from_url(url: &str) -> Result<Box<dyn Backend>> {
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
        let millis = || {
            value
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| {
                    Error::config(format!(
                        "`{shown}`: `{key}` must be a number of milliseconds"
                    ))
                })
        };
        cluster = match key {
            "seeds" => cluster.seeds(value.split(',').map(str::trim).filter(|s| !s.is_empty())),
            "advertise" => cluster.advertise(value),
            "cookie" => cluster.cookie(value),
            "heartbeat_ms" => cluster.heartbeat(millis()?),
            "failure_timeout_ms" => cluster.failure_timeout(millis()?),
            "join_ms" => cluster.join_timeout(millis()?),
            "redial_ms" => cluster.redial(millis()?),
            _ => {
                return Err(Error::config(format!(
                    "`{shown}`: unknown parameter `{key}`; use seeds, advertise, heartbeat_ms, \
                     failure_timeout_ms, join_ms, redial_ms (and HIGHLANDER_COOKIE for the secret)"
                )));
            }
        };
    }
    cluster.settings.validate(Some(&shown))?;
    Ok(Box::new(cluster))
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
}
