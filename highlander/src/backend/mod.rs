//! The coordination seam: what a backend must do so the runtime can run
//! exactly one instance per id.
//!
//! A [`Backend`] is configuration (a URL, a [`MemoryCluster`]); connecting it
//! for one node gives a [`Session`], the node's single connection to the
//! coordination engine. The runtime runs one guardian task per singleton id,
//! and every guardian talks to the same session, one id at a time:
//!
//! ```text
//! guardian(id):  try_claim(id) ──Granted(lease)──> run instance until lease.ended()
//!                     │                                   or node shutdown, then release(id)
//!                     └──Busy { wake }──> await wake, then try_claim again (never a busy loop)
//! ```
//!
//! The per-id calls are the seam, not the wire protocol: a backend that talks
//! to a server batches them (one round trip tries every pending claim, one
//! watch or `LISTEN` wakes every waiter), and keeps O(1) connections per node
//! however many ids it runs.
//!
//! # What a lease promises
//!
//! A [`Lease`] carries a fencing token that is strictly greater than every
//! token handed out before for that id, and a [`LeaseSignal`] that the backend
//! ends:
//! - CP backends (Postgres, etcd) end it with [`LeaseEnd::Lost`] early enough
//!   that the instance, given [`ClaimRequest::stop_budget`] to stop, has
//!   stopped before the server could grant the id to any other node;
//! - AP backends (memory with partitions, the embedded cluster) end it with
//!   [`LeaseEnd::Conflict`] when a healed split finds two holders and this one
//!   loses: the holder with the earliest claim wins, ties to the lower node name.
//!
//! # Start-up: one policy for every backend
//!
//! [`Builder::start`](crate::Builder::start) owns the loop; a backend's
//! [`Backend::connect`] is one attempt. The runtime:
//!
//! 1. calls `connect`; on success, the node is up;
//! 2. on an error retrying cannot fix ([`Error::is_retryable`] is false: a
//!    refused password or certificate, a missing database, TLS files that do
//!    not load, a bad URL, and any error the backend did not mark as
//!    transient), fails `start()` at once with that error;
//! 3. otherwise logs one warning line with the cause, waits (50 ms doubling
//!    to 2 s, jittered) and tries again, until the start timeout has passed
//!    since the first try: then `start()` fails with [`Error::Unreachable`],
//!    which names the backend and carries the last cause.
//!
//! The start timeout is [`Builder::start_timeout`](crate::Builder::start_timeout)
//! if set, else the backend URL's `start_timeout=` option
//! ([`Backend::start_timeout`]), else [`DEFAULT_START_TIMEOUT`] (30 s). An
//! attempt still running when it passes is dropped, so `connect` must be
//! cancel-safe; it should also bound itself (each backend has its own
//! per-attempt connect timeout), so one hung attempt does not use the whole
//! budget.
//!
//! The embedded cluster reads "reaching the backend" as: binding its
//! listener (which must succeed), and, for a node that is not itself one of
//! its seeds, hearing from a seed. A node that is one of its own seeds may
//! found the cluster alone, as the first seed node of an Akka cluster does.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::service::BoxFuture;
use crate::{Error, Result, ShutdownReason, redact_url};

pub(crate) mod kit;
pub mod memory;

/// How long `start()` tries to reach the backend before it fails with
/// [`Error::Unreachable`]: 30 s, long enough to ride out a database or
/// etcd restarting alongside the application (a container started in the
/// same deployment, a failover of a managed database: typically 5 to 20 s),
/// short enough that a wrong address fails the deployment while someone is
/// watching instead of leaving a node that silently never runs anything.
/// Change it with [`Builder::start_timeout`](crate::Builder::start_timeout)
/// or a backend URL's `start_timeout=` option.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

pub use memory::MemoryCluster;

/// A coordination backend, before it is connected: what
/// [`Builder::backend`](crate::Builder::backend) takes.
pub trait Backend: Send + Sync + 'static {
    /// Makes one attempt to connect one node; the runtime owns the retrying
    /// (see [Start-up](self#start-up-one-policy-for-every-backend)).
    ///
    /// Fails with a message a user can act on. The error's kind tells the
    /// runtime whether to try again: [`Error::config`], or
    /// [`Error::backend`] with [`BackendErrorKind::Auth`](crate::BackendErrorKind::Auth),
    /// `Tls`, `Refused` or `Protocol`, for what only a change of
    /// configuration fixes (fails `start()` at once);
    /// [`BackendErrorKind::Unreachable`](crate::BackendErrorKind::Unreachable)
    /// for an engine that cannot be reached now (retried until the start
    /// timeout). [`BackendErrorKind::Other`](crate::BackendErrorKind::Other)
    /// is not retried: mark what retrying can fix. The attempt bounds itself with the backend's own connect
    /// timeout, and must be cancel-safe: the runtime drops it when the start
    /// timeout passes or the process is told to stop.
    fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>>;

    /// A description for logs and status, with any credential hidden.
    fn describe(&self) -> String;

    /// The start timeout this backend's configuration asks for (a URL's
    /// `start_timeout=` option), if any. [`Builder::start_timeout`](crate::Builder::start_timeout)
    /// wins over it; without either, `start()` uses [`DEFAULT_START_TIMEOUT`].
    fn start_timeout(&self) -> Option<Duration> {
        None
    }
}

/// A backend chosen at run time, as [`from_url`] returns it, is a backend:
/// `Runtime::builder().backend(from_url(url)?)`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> highlander::Result<()> {
/// let backend = highlander::backend::from_url("memory")?;
/// let handle = highlander::Runtime::builder().backend(backend).start().await?;
/// handle.shutdown().await;
/// # Ok(()) }
/// ```
impl Backend for Box<dyn Backend> {
    fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>> {
        (**self).connect(node)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }

    fn start_timeout(&self) -> Option<Duration> {
        (**self).start_timeout()
    }
}

/// One node's connection to the coordination engine.
pub trait Session: Send + Sync + 'static {
    /// Tries to claim an id for this node. Never blocks waiting for a holder:
    /// returns [`Claim::Busy`] with a future that completes when the id may
    /// have become free. An error means the engine cannot be asked now; the
    /// guardian retries with backoff and claims nothing meanwhile.
    ///
    /// # Cancel safety
    ///
    /// The guardian drops a `try_claim` future mid-flight when the node shuts
    /// down, and other callers may time one out. Dropping it must leave no
    /// tenure behind: **if the engine grants the claim after the future was
    /// dropped (or the grant cannot be handed to the caller any more), the
    /// backend releases that tenure itself**, as [`Session::release`] would,
    /// and ends its lease signal; no other node is kept waiting on a tenure
    /// nobody runs, and no signal is left dangling. Concretely:
    /// - a backend that decides synchronously (memory) decides in the first
    ///   poll, so a future dropped before it claimed nothing, and one polled
    ///   has already answered;
    /// - a backend that hands the claim to a driver task and awaits a reply
    ///   (Postgres, etcd) checks that the reply was delivered (a `oneshot`
    ///   send that fails means the future is gone) and otherwise releases
    ///   the granted tenure in the same turn of its driver;
    /// - a backend that awaits an arbiter (the embedded cluster) releases
    ///   and announces the release of a grant that arrives for a claim whose
    ///   future was dropped.
    ///
    /// A dropped future may still have cost a round trip, and a token: the
    /// next tenure's token is greater, as always.
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>>;

    /// Gives up this node's tenure of `id` (the one with `token`), so a
    /// waiting node can take over at once. Releasing a tenure that already
    /// ended is not an error.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future never keeps the tenure: the guardian treats the
    /// tenure as over once it asked, so the backend must end it whatever
    /// happens to the future. Either the release is queued before the first
    /// `await` (the driver finishes it), or it is undone by the engine's own
    /// expiry (the lease, the session) like any tenure whose holder went
    /// silent. The tenure is over for this node as soon as `release` is
    /// called: no later `try_claim` answer may count it as held.
    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, Result<()>>;

    /// Who holds `id` as far as this node can see, if the backend knows.
    ///
    /// # Cancel safety
    ///
    /// Read-only: dropping the future changes nothing.
    fn holder(&self, id: &str) -> BoxFuture<'_, Result<Option<Holder>>>;

    /// The members of the cluster as this node sees them, for backends that
    /// have members (the embedded cluster, memory); empty otherwise.
    ///
    /// # Cancel safety
    ///
    /// Read-only: dropping the future changes nothing.
    fn members(&self) -> BoxFuture<'_, Result<Vec<Member>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Every id held now as far as this node can see (in its namespace, for
    /// the backends that have one), sorted by id: what status tools such as
    /// the `highlander` CLI show. A backend that cannot list its holders
    /// returns an error that says so (the default).
    ///
    /// # Cancel safety
    ///
    /// Read-only: dropping the future changes nothing.
    fn holders(&self) -> BoxFuture<'_, Result<Vec<HeldId>>> {
        Box::pin(async {
            Err(Error::config(
                "this backend cannot list who holds which id".to_string(),
            ))
        })
    }

    /// Whether this session can honour a shutdown budget of `budget` for
    /// `id`: a backend whose leases expire (etcd) refuses a budget that does
    /// not fit in its TTL, in one line that names both and says what to
    /// change. The runtime asks for every service when it starts and does
    /// not start on an error. The default accepts any budget.
    ///
    /// # Cancel safety
    ///
    /// Synchronous: nothing to cancel.
    fn check_stop_budget(&self, id: &str, budget: Duration) -> Result<()> {
        let _ = (id, budget);
        Ok(())
    }

    /// Leaves gracefully: releases everything this node still holds and
    /// closes the connection. Called once, after every guardian has stopped.
    ///
    /// # Cancel safety
    ///
    /// The runtime awaits it to the end. Dropped anyway, it must leave this
    /// node holding nothing longer than a crash would: what the engine still
    /// holds for the node expires with its session or lease, and dropping
    /// the session (the runtime's last reference to it) is a crash.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// For backends with time-bound leases (Postgres, etcd): the moment
    /// this node must give up every lease it holds unless the engine
    /// confirms its hold again before then. Exported as the
    /// `highlander_lease_deadline_seconds` gauge and checked by readiness.
    /// `None` (the default) when the backend has no such deadline or does
    /// not report it.
    ///
    /// # Cancel safety
    ///
    /// Synchronous: nothing to cancel.
    fn lease_deadline(&self) -> Option<std::time::Instant> {
        None
    }
}

/// A request to claim one id.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// The singleton id.
    pub id: Arc<str>,
    /// How long the instance may take to stop (its `shutdown` budget). A CP
    /// backend ends the lease at least this long before the server could
    /// free the id.
    pub stop_budget: Duration,
}

impl ClaimRequest {
    /// A request for `id` by an instance that may take `stop_budget` to stop.
    pub fn new(id: impl Into<Arc<str>>, stop_budget: Duration) -> Self {
        ClaimRequest {
            id: id.into(),
            stop_budget,
        }
    }
}

/// The answer to [`Session::try_claim`].
#[non_exhaustive]
pub enum Claim {
    /// This node now holds the id.
    Granted(Lease),
    /// Someone else holds the id (or may: the backend could not rule it out).
    Busy {
        /// The holder, when the backend knows it.
        holder: Option<Holder>,
        /// Completes when the id may have become free; the guardian then
        /// tries again. It must not complete before something changed.
        wake: BoxFuture<'static, ()>,
    },
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::Granted(lease) => f.debug_tuple("Granted").field(lease).finish(),
            Claim::Busy { holder, .. } => f
                .debug_struct("Busy")
                .field("holder", holder)
                .finish_non_exhaustive(),
        }
    }
}

/// One tenure of one id on this node.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The fencing token: strictly greater than every token handed out
    /// before for this id.
    pub token: u64,
    /// Ended by the backend when the tenure ends.
    pub signal: LeaseSignal,
}

impl Lease {
    /// A lease with `token`, and the signal the backend keeps to end it.
    pub fn new(token: u64) -> (Lease, LeaseSignal) {
        let signal = LeaseSignal::new();
        (
            Lease {
                token,
                signal: signal.clone(),
            },
            signal,
        )
    }

    /// Completes when the backend ends the tenure.
    pub fn ended(&self) -> impl Future<Output = LeaseEnd> + Send + '_ {
        self.signal.ended()
    }
}

/// How a backend tells a holder its tenure is over. Cloneable: the backend
/// keeps one clone, the lease another. The first [`LeaseSignal::end`] wins.
#[derive(Clone)]
pub struct LeaseSignal {
    inner: Arc<SignalInner>,
}

struct SignalInner {
    cancel: CancellationToken,
    end: OnceLock<LeaseEnd>,
}

impl LeaseSignal {
    /// A signal that has not ended.
    pub fn new() -> Self {
        LeaseSignal {
            inner: Arc::new(SignalInner {
                cancel: CancellationToken::new(),
                end: OnceLock::new(),
            }),
        }
    }

    /// Ends the tenure with `end`. Returns false when it had already ended.
    pub fn end(&self, end: LeaseEnd) -> bool {
        let first = self.inner.end.set(end).is_ok();
        self.inner.cancel.cancel();
        first
    }

    /// How the tenure ended, if it has.
    pub fn ended_with(&self) -> Option<LeaseEnd> {
        self.inner.end.get().cloned()
    }

    /// Completes when the tenure ends.
    pub async fn ended(&self) -> LeaseEnd {
        self.inner.cancel.cancelled().await;
        self.inner.end.get().cloned().unwrap_or(LeaseEnd::Lost)
    }
}

impl Default for LeaseSignal {
    fn default() -> Self {
        LeaseSignal::new()
    }
}

impl fmt::Debug for LeaseSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseSignal")
            .field("ended", &self.inner.end.get())
            .finish()
    }
}

/// Why a tenure ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEnd {
    /// The backend can no longer vouch for this node's hold on the id.
    Lost,
    /// A healed split found another holder, and it won.
    Conflict {
        /// The node that keeps the id, when known.
        winner: Option<String>,
    },
}

impl From<LeaseEnd> for ShutdownReason {
    fn from(end: LeaseEnd) -> Self {
        match end {
            LeaseEnd::Lost => ShutdownReason::LeaseLost,
            LeaseEnd::Conflict { .. } => ShutdownReason::Conflict,
        }
    }
}

/// Who holds an id.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Holder {
    /// The holder's node name.
    pub node: String,
    /// Its fencing token, when the backend knows it.
    pub token: Option<u64>,
}

impl Holder {
    /// The holder `node`, with its fencing token when the backend knows it.
    pub fn new(node: impl Into<String>, token: Option<u64>) -> Self {
        Holder {
            node: node.into(),
            token,
        }
    }
}

/// One held id, as [`Session::holders`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldId {
    /// The singleton id.
    pub id: String,
    /// Its holder and the fencing token of the tenure.
    pub holder: Holder,
    /// When the tenure began, on the wall clock, when the backend records
    /// it.
    pub since: Option<SystemTime>,
}

impl HeldId {
    /// `id`, held by `holder` since `since` when known.
    pub fn new(id: impl Into<String>, holder: Holder, since: Option<SystemTime>) -> Self {
        HeldId {
            id: id.into(),
            holder,
            since,
        }
    }
}

/// A member of the cluster, as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Member {
    /// The member's node name.
    pub node: String,
    /// Whether this node can reach it now.
    pub reachable: bool,
    /// Its address, when it has one.
    pub address: Option<String>,
}

impl Member {
    /// The member `node`, reachable or not, at `address` when it has one.
    pub fn new(node: impl Into<String>, reachable: bool, address: Option<String>) -> Self {
        Member {
            node: node.into(),
            reachable,
            address,
        }
    }
}

/// The backend named by a URL, as in `HIGHLANDER_BACKEND`:
/// `memory`, `postgres://…`, `etcd://…` or `cluster://…`.
///
/// A scheme whose cargo feature is not enabled is an error that names the
/// feature to enable.
///
/// ```
/// let memory = highlander::backend::from_url("memory").unwrap();
/// assert_eq!(memory.describe(), "memory");
/// let err = highlander::backend::from_url("redis://:hunter2@cache:6379").err().unwrap();
/// assert_eq!(
///     err.to_string(),
///     "unknown backend scheme `redis://`: use memory, postgres://…, etcd://… or cluster://…"
/// );
/// let err = highlander::backend::from_url("host=db password=hunter2").err().unwrap();
/// assert!(!err.to_string().contains("hunter2"));
/// ```
pub fn from_url(url: &str) -> Result<Box<dyn Backend>> {
    let url = url.trim();
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or(url);
    let parsed = match scheme {
        "memory" | "mem" => return Ok(Box::new(MemoryCluster::global())),
        "postgres" | "postgresql" => postgres_from_url(url),
        "etcd" | "etcds" => etcd_from_url(url),
        "cluster" => cluster_from_url(url),
        _ => return Err(unknown_backend(url)),
    };
    parsed.map_err(|e| scrub(e, url))
}

/// Defence in depth for the backends' own messages: any run of 4 or more
/// characters of a secret of `url` (what [`redact_url`] hides) that a message
/// quotes is replaced by `***`, say from a parser that ended the authority at
/// a `?` inside the password and quoted the "host" it found, or quoted a
/// parameter whose value swallowed a `password=`.
fn scrub(error: Error, url: &str) -> Error {
    const N: usize = 4;
    let secret: HashSet<&str> = kit::url::secrets(url)
        .into_iter()
        .flat_map(|run| windows(run, N))
        .collect();
    if secret.is_empty() {
        return error;
    }
    let hide = |message: String| {
        let starts: Vec<usize> = message
            .char_indices()
            .map(|(i, _)| i)
            .chain([message.len()])
            .collect();
        let mut hidden = vec![false; starts.len()];
        for k in 0..starts.len().saturating_sub(N) {
            if secret.contains(&message[starts[k]..starts[k + N]]) {
                hidden[k..k + N].fill(true);
            }
        }
        let mut out = String::with_capacity(message.len());
        for (k, ch) in message.chars().enumerate() {
            if !hidden[k] {
                out.push(ch);
            } else if k == 0 || !hidden[k - 1] {
                out.push_str("***");
            }
        }
        out
    };
    // A kept source is shown by reporters that walk the chain: keep it only
    // when no error in it quotes a piece of a secret.
    let clean = |source: Option<Box<dyn std::error::Error + Send + Sync>>| {
        source.filter(|source| {
            let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**source);
            while let Some(e) = next {
                let text = e.to_string();
                if hide(text.clone()) != text {
                    return false;
                }
                next = e.source();
            }
            true
        })
    };
    match error {
        Error::Config { message, source } => Error::Config {
            message: hide(message),
            source: clean(source),
        },
        Error::Backend {
            kind,
            message,
            source,
        } => Error::Backend {
            kind,
            message: hide(message),
            source: clean(source),
        },
        other => other,
    }
}

/// Every run of `n` characters of `text`.
fn windows(text: &str, n: usize) -> impl Iterator<Item = &str> {
    let starts: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    (0..starts.len().saturating_sub(n)).map(move |k| &text[starts[k]..starts[k + n]])
}

/// The error for a URL no backend takes. It names the scheme only when the
/// value has one that is spelled like a scheme; the rest of the value (which
/// may hold a password in any shape) is never echoed.
fn unknown_backend(url: &str) -> Error {
    const USE: &str = "use memory, postgres://…, etcd://… or cluster://…";
    let scheme = url.split_once("://").map(|(s, _)| s);
    let plain = |s: &str| {
        (1..=32).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    };
    Error::config(match scheme {
        Some(s) if plain(s) => format!("unknown backend scheme `{s}://`: {USE}"),
        _ => format!(
            "the backend is not a URL this crate knows (the value is not shown, it may hold a password): {USE}"
        ),
    })
}

#[cfg(feature = "postgres")]
fn postgres_from_url(url: &str) -> Result<Box<dyn Backend>> {
    postgres::from_url(url)
}

#[cfg(feature = "etcd")]
fn etcd_from_url(url: &str) -> Result<Box<dyn Backend>> {
    etcd::from_url(url)
}

#[cfg(feature = "cluster")]
fn cluster_from_url(url: &str) -> Result<Box<dyn Backend>> {
    cluster::from_url(url)
}

#[cfg(not(feature = "postgres"))]
fn postgres_from_url(url: &str) -> Result<Box<dyn Backend>> {
    missing_feature(url, "postgres")
}

#[cfg(not(feature = "etcd"))]
fn etcd_from_url(url: &str) -> Result<Box<dyn Backend>> {
    missing_feature(url, "etcd")
}

#[cfg(not(feature = "cluster"))]
fn cluster_from_url(url: &str) -> Result<Box<dyn Backend>> {
    missing_feature(url, "cluster")
}

#[allow(dead_code)]
fn missing_feature(url: &str, feature: &str) -> Result<Box<dyn Backend>> {
    Err(Error::config(format!(
        "backend `{}` needs the `{feature}` feature of highlander: \
         enable it with `highlander = {{ version = \"0.1\", features = [\"{feature}\"] }}` in Cargo.toml",
        redact_url(url)
    )))
}

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;

#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub mod etcd;

#[cfg(feature = "cluster")]
#[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
pub mod cluster;

/// Checks every backend can run on itself.
#[cfg(test)]
pub(crate) mod conformance {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use super::{Claim, ClaimRequest, Session};

    /// The `try_claim` cancel-safety rule: `a` starts claiming `id`, the
    /// future is polled `polls` times (yielding to other tasks between
    /// polls) and dropped if it has not answered; then `b` must be able to
    /// claim `id`, waiting at most for the wake-ups the backend gives it.
    /// Returns whether the future was dropped mid-flight (a future that
    /// answered was a plain claim; its tenure is released before `b` tries).
    pub(crate) async fn dropped_try_claim_leaves_no_tenure(
        a: &dyn Session,
        b: &dyn Session,
        id: &str,
        polls: usize,
    ) -> bool {
        let request = ClaimRequest::new(id, Duration::from_secs(1));
        let mut dropped = true;
        {
            let mut claim = pin!(a.try_claim(request.clone()));
            let mut cx = Context::from_waker(Waker::noop());
            for _ in 0..polls {
                if let Poll::Ready(answer) = claim.as_mut().poll(&mut cx) {
                    dropped = false;
                    if let Ok(Claim::Granted(lease)) = answer {
                        a.release(id, lease.token).await.expect("release");
                    }
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        // Hang guard only: a tenure left behind would keep `b` waiting for
        // ever; a correct backend wakes it as soon as nothing holds the id.
        let claimed = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match b.try_claim(request.clone()).await {
                    Ok(Claim::Granted(lease)) => return lease,
                    Ok(Claim::Busy { wake, .. }) => wake.await,
                    Err(e) => panic!("b cannot ask: {e}"),
                }
            }
        })
        .await;
        let lease = claimed.unwrap_or_else(|_| {
            panic!("`{id}` is still held after a dropped try_claim ({polls} polls)")
        });
        b.release(id, lease.token).await.expect("release");
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::from_url;

    /// Found by the `from_url` fuzz target: the etcd parser ended the
    /// authority at the `?` inside the password and quoted `root:s3cr` as an
    /// endpoint.
    #[test]
    fn backend_errors_never_quote_a_piece_of_the_password() {
        for (url, password) in [
            ("etcds://root:s3cr?et42@a:2379", "s3cr?et42"),
            ("etcd://root:s3cr/et42@a:2379", "s3cr/et42"),
            ("postgres://app:s3cr?et42@db/app?sslmode=nope", "s3cr?et42"),
            ("postgres://app:s3cr/et42@db:notaport/app", "s3cr/et42"),
            ("cluster://u:s3cr?et42@0.0.0.0:7400?seeds=", "s3cr?et42"),
            // Found by the fuzz target too: postgres quoted the `sslmode`
            // value, which ran on over a second `?` into `password=`.
            (
                "postgres://\u{1}\u{1}\0\0/&bd\0pwddb:pp?sslmode=xe=//:@7?password=app/ab",
                "app/ab",
            ),
        ] {
            let Err(e) = from_url(url) else { continue };
            let e = e.to_string();
            assert!(!e.contains(password), "{url}: {e}");
            for piece in password.split(['/', '?']).filter(|p| p.len() >= 4) {
                assert!(!e.contains(piece), "{url}: {e}");
            }
        }
    }

    /// Found by the `from_url` fuzz target: a huge `ttl` panicked in
    /// `Duration::from_secs_f64`.
    #[test]
    fn huge_durations_are_an_error_not_a_panic() {
        let ttl = format!("1{}", "0".repeat(25));
        assert!(from_url(&format!("etcd://a:2379?ttl={ttl}")).is_err());
        assert!(from_url("etcd://a:2379?ttl=1e300s").is_err());
    }

    #[test]
    fn unknown_backends_never_echo_the_value() {
        let nasty = [
            ("redis://:hunter2@cache:6379", Some("redis")),
            ("redis://u:hunter2/x@cache", Some("redis")),
            ("host=db password=hunter2", None),
            ("user:hunter2@db:5432", None),
            ("post gres://u:hunter2@db", None),
            ("hunter2://db", Some("hunter2")),
            ("x;hunter2://db", None),
            ("a?password=hunter2://x", None),
            ("", None),
        ];
        for (url, scheme) in nasty {
            let err = from_url(url).err().expect("refused").to_string();
            match scheme {
                Some(s) => assert_eq!(
                    err,
                    format!(
                        "unknown backend scheme `{s}://`: use memory, postgres://…, etcd://… or cluster://…"
                    )
                ),
                None => {
                    assert!(!err.contains("hunter2"), "{url:?} gave {err}");
                    assert!(err.contains("use memory, postgres://…"), "{err}");
                }
            }
        }
    }

    mod start_up {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::time::Duration;

        use tokio::time::Instant;

        use crate::backend::{Backend, DEFAULT_START_TIMEOUT, MemoryCluster, Session};
        use crate::service::BoxFuture;
        use crate::{BackendErrorKind, Error, Result, Runtime};

        /// A memory backend whose first `failures` connects fail with
        /// `error` (all of them when `failures` is `u32::MAX`).
        struct Flaky {
            memory: MemoryCluster,
            failures: u32,
            error: fn(u32) -> Error,
            attempts: Arc<AtomicU32>,
            url_timeout: Option<Duration>,
        }

        impl Flaky {
            fn new(failures: u32, error: fn(u32) -> Error) -> (Self, Arc<AtomicU32>) {
                let attempts = Arc::new(AtomicU32::new(0));
                let flaky = Flaky {
                    memory: MemoryCluster::new(),
                    failures,
                    error,
                    attempts: attempts.clone(),
                    url_timeout: None,
                };
                (flaky, attempts)
            }
        }

        impl Backend for Flaky {
            fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>> {
                let n = self.attempts.fetch_add(1, Ordering::SeqCst);
                if n < self.failures {
                    let error = (self.error)(n);
                    return Box::pin(async move { Err(error) });
                }
                self.memory.connect(node)
            }

            fn describe(&self) -> String {
                "flaky://db:5432".to_string()
            }

            fn start_timeout(&self) -> Option<Duration> {
                self.url_timeout
            }
        }

        fn refused(n: u32) -> Error {
            Error::backend(
                BackendErrorKind::Unreachable,
                format!("connection refused (attempt {})", n + 1),
            )
        }

        fn bad_password(_: u32) -> Error {
            Error::backend(
                BackendErrorKind::Auth,
                "flaky://db:5432 refused user `app`: check its password",
            )
        }

        #[tokio::test(start_paused = true)]
        async fn a_backend_that_comes_up_late_is_waited_for() {
            let (flaky, attempts) = Flaky::new(5, refused);
            let handle = Runtime::builder()
                .node("a")
                .backend(flaky)
                .start()
                .await
                .expect("the sixth attempt connects");
            assert_eq!(attempts.load(Ordering::SeqCst), 6);
            handle.shutdown().await;
        }

        #[tokio::test(start_paused = true)]
        async fn a_backend_that_never_comes_up_fails_start_after_the_timeout() {
            let (flaky, attempts) = Flaky::new(u32::MAX, refused);
            let started = Instant::now();
            let err = Runtime::builder()
                .node("a")
                .backend(flaky)
                .start_timeout(Duration::from_secs(4))
                .start()
                .await
                .unwrap_err();
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_secs(4) && waited < Duration::from_secs(5),
                "{waited:?}"
            );
            let n = attempts.load(Ordering::SeqCst);
            let Error::Unreachable {
                backend, source, ..
            } = &err
            else {
                panic!("{err:?}")
            };
            assert_eq!(backend, "flaky://db:5432");
            assert_eq!(
                source.to_string(),
                format!("connection refused (attempt {n})"),
                "the last cause"
            );
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "cannot reach flaky://db:5432 within 4s: connection refused (attempt {n});"
                )),
                "{text}"
            );
            assert!(!text.contains('\n'), "{text}");
        }

        #[tokio::test(start_paused = true)]
        async fn the_url_timeout_applies_and_the_builder_wins_over_it() {
            for (builder, url, expect) in [
                (None, None, DEFAULT_START_TIMEOUT),
                (None, Some(2), Duration::from_secs(2)),
                (Some(3), Some(2), Duration::from_secs(3)),
            ] {
                let (mut flaky, _) = Flaky::new(u32::MAX, refused);
                flaky.url_timeout = url.map(Duration::from_secs);
                let mut b = Runtime::builder().node("a").backend(flaky);
                if let Some(secs) = builder {
                    b = b.start_timeout(Duration::from_secs(secs));
                }
                let started = Instant::now();
                let err = b.start().await.unwrap_err();
                let waited = started.elapsed();
                assert!(
                    waited >= expect && waited < expect + Duration::from_secs(1),
                    "{builder:?} {url:?}: {waited:?}"
                );
                let Error::Unreachable { waited, .. } = err else {
                    panic!("{err:?}")
                };
                assert_eq!(waited, expect);
            }
        }

        #[tokio::test(start_paused = true)]
        async fn an_error_retrying_cannot_fix_fails_start_at_once() {
            let (flaky, attempts) = Flaky::new(u32::MAX, bad_password);
            let started = Instant::now();
            let err = Runtime::builder()
                .node("a")
                .backend(flaky)
                .start()
                .await
                .unwrap_err();
            assert_eq!(attempts.load(Ordering::SeqCst), 1);
            assert_eq!(started.elapsed(), Duration::ZERO);
            assert_eq!(err.kind(), Some(BackendErrorKind::Auth));
            assert_eq!(
                err.to_string(),
                "flaky://db:5432 refused user `app`: check its password"
            );
        }
    }

    mod cancel_safety {
        use crate::backend::conformance::dropped_try_claim_leaves_no_tenure;
        use crate::backend::{Backend, MemoryCluster};

        #[tokio::test(start_paused = true)]
        async fn memory_a_dropped_try_claim_leaves_no_tenure() {
            let cluster = MemoryCluster::new();
            let a = cluster.connect("a").await.expect("a");
            let b = cluster.connect("b").await.expect("b");
            assert!(
                dropped_try_claim_leaves_no_tenure(&*a, &*b, "job", 0).await,
                "dropped before its first poll"
            );
            assert!(cluster.holders("job").is_empty());
            // Polled: the memory backend answers in the first poll, so
            // there is no later point to drop it at.
            assert!(!dropped_try_claim_leaves_no_tenure(&*a, &*b, "job", 1).await);
            assert!(cluster.holders("job").is_empty());
        }
    }
}
