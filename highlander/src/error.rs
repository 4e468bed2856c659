//! The one error type of the crate.

use std::fmt;
use std::time::Duration;

/// What went wrong, phrased so that the reader knows what to do next.
///
/// Messages never contain a credential: backend URLs are shown with their
/// password replaced by `***` (see [`redact_url`]).
///
/// Services return [`Result`], so their own errors become
/// [`Error::Service`] through [`Error::service`] or [`Error::msg`]:
///
/// ```
/// fn parse(s: &str) -> highlander::Result<u32> {
///     s.parse::<u32>().map_err(highlander::Error::service)
/// }
/// assert!(parse("7").is_ok());
/// assert_eq!(
///     parse("x").unwrap_err().to_string(),
///     "invalid digit found in string"
/// );
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two services in one runtime use the same singleton id.
    #[error(
        "duplicate singleton id `{id}`: it is used by both `{first}` and `{second}`; give one of them another id"
    )]
    DuplicateId {
        /// The id used twice.
        id: String,
        /// The service registered first.
        first: String,
        /// The service registered second.
        second: String,
    },

    /// A singleton id given at run time breaks the id rules.
    #[error("invalid singleton id `{id}`: {why}")]
    InvalidId {
        /// The id as given (cut to 60 characters).
        id: String,
        /// Which rule it breaks.
        why: &'static str,
    },

    /// The runtime's configuration cannot be used (environment or builder).
    #[error("{0}")]
    Config(String),

    /// The coordination backend failed or cannot be reached.
    #[error("{0}")]
    Backend(String),

    /// A service asked for shared state nobody registered.
    #[error(
        "no shared state of type `{type_name}` is registered: add it with Runtime::builder().state(value)"
    )]
    MissingState {
        /// The type that was asked for.
        type_name: &'static str,
    },

    /// The runtime was already stopped.
    #[error("the highlander runtime has stopped")]
    Stopped,

    /// `start()` could not reach the coordination backend within the start
    /// timeout (see [`Builder::start_timeout`](crate::Builder::start_timeout));
    /// `source` is the last attempt's error.
    #[error(
        "cannot reach {backend} within {}: {source}; check that it runs and that this node can reach it, \
         or allow longer with Builder::start_timeout or the URL's start_timeout=",
        crate::backend::kit::duration::show(*waited)
    )]
    Unreachable {
        /// The backend, as it describes itself (no credential).
        backend: String,
        /// How long start-up tried.
        waited: Duration,
        /// The last attempt's error.
        source: Box<Error>,
    },

    /// An error returned by a service's own code.
    #[error(transparent)]
    Service(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// Wraps any error from a service's own code.
    pub fn service(err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Error::Service(err.into())
    }

    /// An error with just a message, for services.
    ///
    /// ```
    /// let e = highlander::Error::msg("queue is gone");
    /// assert_eq!(e.to_string(), "queue is gone");
    /// ```
    pub fn msg(message: impl fmt::Display) -> Self {
        Error::Service(message.to_string().into())
    }
}

impl Error {
    /// The start-up policy gave up on `backend` after `waited`; `last` is
    /// the last attempt's error.
    pub fn unreachable(backend: impl Into<String>, waited: Duration, last: Error) -> Self {
        Error::Unreachable {
            backend: backend.into(),
            waited,
            source: Box::new(last),
        }
    }

    /// What kind of backend failure this is, for backend errors.
    pub fn kind(&self) -> Option<BackendErrorKind> {
        match self {
            Error::Backend(_) => Some(BackendErrorKind::Other),
            Error::Unreachable { .. } => Some(BackendErrorKind::Unreachable),
            _ => None,
        }
    }

    /// Whether trying the same thing again later may succeed: a backend
    /// that cannot be reached now, or a lease lost to a network blip. False
    /// for what only a change of configuration fixes (bad credentials, a
    /// missing database, TLS files that do not load, an invalid id) and for
    /// [`Error::Unreachable`] itself (the retrying is over).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Backend(_))
    }
}

/// What kind of backend failure an [`Error`] is: [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The engine cannot be reached now (connection refused or reset, a
    /// timeout, a name that does not resolve yet). Retrying may succeed.
    Unreachable,
    /// The engine refused this node's credentials (password, certificate,
    /// cluster cookie). Fix the configuration; retrying will not help.
    Auth,
    /// TLS could not be set up: certificate files that do not load, a
    /// server certificate that does not verify. Fix the configuration.
    Tls,
    /// The engine answered but refused the request in a way configuration
    /// must fix: a missing database or table, missing permissions.
    Refused,
    /// This node's hold on an id ended while the request was in flight.
    /// Retrying may succeed.
    LeaseLost,
    /// The engine answered something this crate does not understand (a
    /// version it does not speak, a corrupt frame).
    Protocol,
    /// Anything else the engine reported; retried like a transient failure.
    Other,
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::Service(Box::new(err))
    }
}

/// The crate's result type; services return `Result<()>` from `run`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns `url` with every credential replaced by `***`, for messages and
/// logs.
///
/// What is hidden, read the way the most lenient driver would:
/// - the password in the userinfo: everything from the first `:` after
///   `scheme://` up to the **last** `@` of the URL, so a password that holds
///   `/`, `?`, `#`, `:` or `@` (base64 does) never shows; when the user name
///   itself looks odd (it holds `/ ? # & ; =`, whitespace, ...), it is hidden
///   too;
/// - the value of every query or fragment parameter whose (percent-decoded)
///   name looks secret: `password`, `sslpassword`, `pass`, `pwd`, `secret`,
///   `token`, `cookie`, ... up to the next `&`, `;` or `#`.
///
/// A value that is not a URL at all (no `scheme://`) is shown only when it
/// is a single word such as `memory`; anything else (a `key=value`
/// connection string, say) becomes `***`.
///
/// ```
/// use highlander::redact_url;
/// assert_eq!(
///     redact_url("postgres://app:s3cret@db:5432/x"),
///     "postgres://app:***@db:5432/x"
/// );
/// assert_eq!(redact_url("postgres://app:ab/cd@db/app"), "postgres://app:***@db/app");
/// assert_eq!(redact_url("etcd://a:2379,b:2379"), "etcd://a:2379,b:2379");
/// assert_eq!(
///     redact_url("postgres://db/x?user=a&password=s3cret&sslmode=require"),
///     "postgres://db/x?user=a&password=***&sslmode=require"
/// );
/// assert_eq!(redact_url("host=db password=s3cret"), "***");
/// ```
pub fn redact_url(url: &str) -> String {
    crate::backend::kit::url::redact_url(url)
}
