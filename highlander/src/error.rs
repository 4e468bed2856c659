//! The one error type of the crate.

use std::fmt;
use std::time::Duration;

/// What went wrong, phrased so that the reader knows what to do next.
///
/// Messages never contain a credential: backend URLs are shown with their
/// password replaced by `***` (see [`redact_url`]).
///
/// Backend failures carry a [`BackendErrorKind`] to match on
/// ([`Error::kind`]), and [`Error::is_retryable`] tells what retrying can
/// fix. Configuration and backend errors keep the error they come from as
/// their [`source`](std::error::Error::source); its text is usually part of
/// the one-line message already. A backend redacts before it wraps: no
/// source's text holds a credential either.
///
/// ```
/// use highlander::{BackendErrorKind, Error};
///
/// fn advice(e: &Error) -> &'static str {
///     match e.kind() {
///         Some(BackendErrorKind::Auth) => "check the credentials",
///         Some(BackendErrorKind::Unreachable) => "check the network",
///         _ if e.is_retryable() => "try again later",
///         _ => "check the configuration",
///     }
/// }
/// let e = Error::backend(BackendErrorKind::Auth, "postgres at db:5432 refused user `app`");
/// assert_eq!(advice(&e), "check the credentials");
/// ```
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

    /// The runtime's configuration cannot be used (environment, builder or
    /// backend URL). Fix the configuration: retrying will not help.
    #[error("{message}")]
    Config {
        /// One line that says what is wrong and what to do.
        message: String,
        /// The underlying error, when there is one (its text is usually
        /// part of `message` already).
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },

    /// The coordination backend failed or cannot be reached.
    #[error("{message}")]
    Backend {
        /// What kind of failure: whether retrying can help, and what to fix.
        kind: BackendErrorKind,
        /// One line that says what failed and what to do.
        message: String,
        /// The underlying error (a driver's, a transport's), when there is
        /// one (its text is usually part of `message` already).
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },

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

    /// An I/O error of the runtime's own (a `?` on an [`std::io::Error`]
    /// in a service becomes this one too).
    #[error(transparent)]
    Io(#[from] std::io::Error),

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
    /// A configuration error with one line that says what is wrong and
    /// what to do.
    ///
    /// ```
    /// let e = highlander::Error::config("set HIGHLANDER_NODE to this node's name");
    /// assert_eq!(e.to_string(), "set HIGHLANDER_NODE to this node's name");
    /// assert!(!e.is_retryable());
    /// ```
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
            source: None,
        }
    }

    /// A configuration error that keeps the error it comes from as its
    /// [`source`](std::error::Error::source).
    ///
    /// The source's text must not hold a credential: redact a URL (with
    /// [`redact_url`]) before it goes into the source's message.
    pub fn config_with(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Config {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A backend failure of `kind`, with one line that says what failed
    /// and what to do.
    ///
    /// ```
    /// use highlander::{BackendErrorKind, Error};
    /// let e = Error::backend(BackendErrorKind::Auth, "etcd refused user `app`: check its password");
    /// assert_eq!(e.kind(), Some(BackendErrorKind::Auth));
    /// assert!(!e.is_retryable());
    /// ```
    pub fn backend(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Error::Backend {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A backend failure that keeps the error it comes from (a driver's, a
    /// transport's) as its [`source`](std::error::Error::source).
    ///
    /// Backends must redact before they wrap: a driver's error text may
    /// quote the connection URL, password included. The source's text is
    /// shown by error reporters that walk the chain, so it must be as free
    /// of credentials as `message`.
    pub fn backend_with(
        kind: BackendErrorKind,
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Backend {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

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
    ///
    /// `None` for errors that are not the backend's: configuration, ids,
    /// services.
    pub fn kind(&self) -> Option<BackendErrorKind> {
        match self {
            Error::Backend { kind, .. } => Some(*kind),
            Error::Unreachable { .. } => Some(BackendErrorKind::Unreachable),
            _ => None,
        }
    }

    /// Whether trying the same thing again later may succeed: a backend
    /// that cannot be reached now, or a lease lost to a network blip
    /// ([`BackendErrorKind::Unreachable`], [`BackendErrorKind::LeaseLost`]).
    /// False for what only a change of configuration fixes (bad
    /// credentials, a missing database, TLS files that do not load, an
    /// invalid id), for [`BackendErrorKind::Other`] (not known to be
    /// transient) and for [`Error::Unreachable`] itself (the retrying is
    /// over).
    ///
    /// ```
    /// use highlander::{BackendErrorKind, Error};
    /// assert!(Error::backend(BackendErrorKind::Unreachable, "connection refused").is_retryable());
    /// assert!(!Error::backend(BackendErrorKind::Tls, "bad CA file").is_retryable());
    /// assert!(!Error::config("unknown restart policy").is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Backend { kind, .. } => kind.is_retryable(),
            _ => false,
        }
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
    /// Anything else the engine reported. Not known to be transient, so
    /// `start()` does not retry it: a backend marks what retrying can fix
    /// as [`Unreachable`](Self::Unreachable) or [`LeaseLost`](Self::LeaseLost).
    /// (A running guardian retries every failed claim whatever its kind.)
    Other,
}

impl BackendErrorKind {
    /// Whether an error of this kind may go away by itself.
    fn is_retryable(self) -> bool {
        match self {
            BackendErrorKind::Unreachable | BackendErrorKind::LeaseLost => true,
            BackendErrorKind::Auth
            | BackendErrorKind::Tls
            | BackendErrorKind::Refused
            | BackendErrorKind::Protocol
            | BackendErrorKind::Other => false,
        }
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

#[cfg(test)]
mod tests {
    use super::{BackendErrorKind, Error};
    use std::error::Error as _;
    use std::time::Duration;

    #[test]
    fn sources_are_kept_and_messages_unchanged() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::backend_with(
            BackendErrorKind::Unreachable,
            "cannot reach etcd at a:2379: refused",
            io,
        );
        assert_eq!(e.to_string(), "cannot reach etcd at a:2379: refused");
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("refused")
        );
        assert_eq!(e.kind(), Some(BackendErrorKind::Unreachable));
        assert!(e.is_retryable());

        let e = Error::config_with("bad `ttl`", "not a number".to_string());
        assert_eq!(e.to_string(), "bad `ttl`");
        assert_eq!(e.source().unwrap().to_string(), "not a number");
        assert_eq!(e.kind(), None);
        assert!(!e.is_retryable());

        let e = Error::config("plain");
        assert!(e.source().is_none());
        let e = Error::backend(BackendErrorKind::Refused, "no database `app`");
        assert!(e.source().is_none());
        assert!(!e.is_retryable());
    }

    #[test]
    fn only_transient_kinds_are_retried() {
        use BackendErrorKind::*;
        for (kind, retry) in [
            (Unreachable, true),
            (LeaseLost, true),
            (Other, false),
            (Auth, false),
            (Tls, false),
            (Refused, false),
            (Protocol, false),
        ] {
            assert_eq!(Error::backend(kind, "x").is_retryable(), retry, "{kind:?}");
        }
        assert!(!Error::Stopped.is_retryable());
        assert!(!Error::msg("service failed").is_retryable());
    }

    #[test]
    fn unreachable_names_the_backend_and_the_last_cause_in_one_line() {
        let last = Error::backend(BackendErrorKind::Unreachable, "connection refused");
        let e = Error::unreachable("etcd://a:2379/highlander", Duration::from_secs(30), last);
        let text = e.to_string();
        assert!(
            text.starts_with(
                "cannot reach etcd://a:2379/highlander within 30s: connection refused;"
            ),
            "{text}"
        );
        assert!(!text.contains('\n'));
        assert_eq!(e.source().unwrap().to_string(), "connection refused");
        assert_eq!(e.kind(), Some(BackendErrorKind::Unreachable));
        assert!(!e.is_retryable(), "the retrying is over");
    }

    #[test]
    fn io_errors_are_io_not_service() {
        fn read() -> crate::Result<()> {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file",
            ))?;
            Ok(())
        }
        let e = read().unwrap_err();
        assert!(matches!(e, Error::Io(_)), "{e:?}");
        assert_eq!(e.to_string(), "no such file");
    }
}
