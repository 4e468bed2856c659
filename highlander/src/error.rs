//! The one error type of the crate.

use std::fmt;

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

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::Service(Box::new(err))
    }
}

/// The crate's result type; services return `Result<()>` from `run`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns `url` with any password replaced by `***`, for messages and logs.
///
/// ```
/// use highlander::redact_url;
/// assert_eq!(
///     redact_url("postgres://app:s3cret@db:5432/x"),
///     "postgres://app:***@db:5432/x"
/// );
/// assert_eq!(redact_url("etcd://a:2379,b:2379"), "etcd://a:2379,b:2379");
/// assert_eq!(
///     redact_url("postgres://db/x?user=a&password=s3cret&sslmode=require"),
///     "postgres://db/x?user=a&password=***&sslmode=require"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = String::with_capacity(url.len());
    match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            out.push_str(scheme);
            out.push_str("://");
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    match userinfo.split_once(':') {
                        Some((user, _password)) => {
                            out.push_str(user);
                            out.push_str(":***");
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        let parts: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "pass",
        "secret",
        "cookie",
        "token",
        "sslpassword",
    ]
    .contains(&key.as_str())
}
