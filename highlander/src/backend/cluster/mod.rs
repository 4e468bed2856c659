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
//! - **Profiles** ([`Session::announce`]). The head of a node's profile
//!   (weight, labels, its catalog's digest and length) rides in its first
//!   frame on every connection and goes to every member when it changes;
//!   the catalog (the ids it runs) is sent only to a member that asks for
//!   it, having no catalog of that digest yet, in parts of about 4 MiB.
//!   [`Session::members`] shows each member's profile once complete; it is
//!   dropped when the member goes down or leaves, and
//!   [`Session::members_changed`] watches the member table.
//! - **Hand-off** ([`Session::release_to`]). A release in favour of a
//!   member reserves the id for it on every member that can reach it: for
//!   2 s (or until it holds the id or goes down) everyone else's claims are
//!   busy, and it claims as soon as it hears of the release.
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
use std::sync::Arc;
use std::time::Duration;

use crate::Result;
use crate::backend::kit::secret::Secret;
use crate::backend::{Backend, Session};
use crate::service::BoxFuture;

mod accept;
mod config;
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

pub(crate) use config::from_url;
use config::{MIN_PUBLIC_COOKIE, Settings};

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
            settings: Settings::new(listen.into()),
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
        self.settings.cookie = Some(Secret::new(cookie));
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

    /// How long `start()` keeps trying to hear from a seed before it fails
    /// with [`Error::Unreachable`](crate::Error::Unreachable) (100 ms to
    /// 10 min; default
    /// [`DEFAULT_START_TIMEOUT`](crate::backend::DEFAULT_START_TIMEOUT), or
    /// [`Builder::start_timeout`](crate::Builder::start_timeout), which wins
    /// over this). A node that is one of its own seeds, or has none, never
    /// waits for that: it may found the cluster alone.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let cluster = highlander::backend::cluster::Cluster::new("0.0.0.0:7400")
    ///     .seeds(["app-1:7400", "app-2:7400"])
    ///     .start_timeout(Duration::from_secs(10));
    /// ```
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.settings.start_timeout = Some(timeout);
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

    fn start_timeout(&self) -> Option<Duration> {
        self.settings.start_timeout
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
