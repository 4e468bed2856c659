//! What went wrong, in words and kinds: the text of a driver error (never a
//! password), connection failures sorted by SQLSTATE code and error type
//! into "fix the configuration" (fatal at start) and "retry later", and
//! failed statements, each keeping the driver's error as its source.

use std::fmt;
use std::io;
use std::sync::Arc;

use super::config::Settings;
use crate::{BackendErrorKind, Error};

/// The text of a driver error, without the `db error:` prefix. Driver
/// errors never contain the password.
pub(super) fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        };
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    text
}

/// Why a connection attempt or a statement failed, as far as deciding
/// what to do goes.
#[derive(Debug)]
pub(super) enum Failure<'a> {
    /// The server answered with an error: its SQLSTATE code and text.
    Server { code: &'a str, text: String },
    /// A socket error below the driver, and whether the driver was doing
    /// the TLS handshake.
    Io { error: &'a io::Error, tls: bool },
    /// Anything else the driver reports: its text, and whether it timed
    /// out or the connection closed under it.
    Driver { text: String, cut: bool },
}

impl<'a> Failure<'a> {
    /// The failure a driver error reports. The driver says what it was
    /// doing (its error kind) only in its text.
    fn of(e: &'a tokio_postgres::Error) -> Failure<'a> {
        if let Some(db) = e.as_db_error() {
            return Failure::Server {
                code: db.code().code(),
                text: error_text(e),
            };
        }
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if let Some(error) = s.downcast_ref::<io::Error>() {
                let tls = e.to_string().contains("TLS");
                return Failure::Io { error, tls };
            }
            source = s.source();
        }
        let text = error_text(e);
        let cut = text.contains("timeout") || text.contains("closed");
        Failure::Driver { text, cut }
    }

    /// The failure is the connection going away (or not coming up), not
    /// an answer of the server's.
    fn is_cut(&self) -> bool {
        match self {
            Failure::Server { code, .. } => server_refusal(code).1 == BackendErrorKind::Unreachable,
            Failure::Io { .. } => true,
            Failure::Driver { cut, .. } => *cut,
        }
    }
}

/// What a server's refusal with SQLSTATE `code` means, and its kind:
/// whether retrying can help, and what to fix when not.
fn server_refusal(code: &str) -> (&'static str, BackendErrorKind) {
    match code {
        "28P01" | "28000" => (
            "authentication failed (password hidden)",
            BackendErrorKind::Auth,
        ),
        "3D000" => ("the database does not exist", BackendErrorKind::Refused),
        "42501" => (
            "permission denied: the role needs CREATE on the schema to create highlander's tables (and to own highlander_leases to add its reservation columns), or an administrator creates them (docs/postgres.md)",
            BackendErrorKind::Refused,
        ),
        c if c.starts_with("08") || c == "53300" || c.starts_with("57P") => (
            "the server cannot take the connection now",
            BackendErrorKind::Unreachable,
        ),
        _ => ("the server refused", BackendErrorKind::Refused),
    }
}

/// Sorts a failed connection attempt into "fix the configuration" (a kind
/// retrying cannot help: fatal at start) and "the server is not there now"
/// ([`BackendErrorKind::Unreachable`]: retried), with the message for
/// either. `target` is `host:port/db as user`.
pub(super) fn judge(target: &str, failure: Failure<'_>) -> (BackendErrorKind, String) {
    use io::ErrorKind::{InvalidData, InvalidInput};
    match failure {
        Failure::Server { code, text } => {
            let (what, kind) = server_refusal(code);
            // pg_hba.conf asks for a certificate this client did not present.
            let hint = if text.contains("client certificate") {
                " (give one with sslcert= and sslkey=, or Postgres::client_cert)"
            } else {
                ""
            };
            let message = format!("cannot connect to postgres at {target}: {what}: {text}{hint}");
            (kind, message)
        }
        // A refused certificate arrives as an io::Error too.
        Failure::Io { error, tls } if tls || matches!(error.kind(), InvalidData | InvalidInput) => {
            (
                BackendErrorKind::Tls,
                format!("cannot connect to postgres at {target}: TLS failed: {error}"),
            )
        }
        Failure::Io { error, .. } => (
            BackendErrorKind::Unreachable,
            format!("cannot reach postgres at {target}: {error}"),
        ),
        Failure::Driver { text, cut } => {
            let kind = if cut {
                BackendErrorKind::Unreachable
            } else {
                BackendErrorKind::Protocol
            };
            (
                kind,
                format!("cannot connect to postgres at {target}: {text}"),
            )
        }
    }
}

/// A failed connection attempt, judged, keeping the driver's error.
pub(super) fn connect_error(settings: &Settings, e: tokio_postgres::Error) -> Error {
    let (kind, message) = judge(&settings.target, Failure::of(&e));
    Error::backend_with(kind, message, e)
}

/// The server did not answer in time, or the session has no connection
/// now or lost it: retried. `message` names the server.
pub(super) fn unreachable(message: impl Into<String>) -> Error {
    Error::backend(BackendErrorKind::Unreachable, message)
}

/// A statement of a live session failed. Shared by every caller the
/// statement fails (a batch answers many claims): each gets its own
/// [`Error`], all keeping the one driver error as their source.
#[derive(Clone)]
pub(super) struct StatementError {
    kind: BackendErrorKind,
    message: String,
    source: Arc<dyn std::error::Error + Send + Sync>,
}

impl StatementError {
    /// Statement `what` failed with `e`: a connection that went away is
    /// [`Unreachable`](BackendErrorKind::Unreachable), anything else the
    /// server said is [`Other`](BackendErrorKind::Other) (the next try
    /// may succeed).
    pub(super) fn new(settings: &Settings, what: &str, e: tokio_postgres::Error) -> Self {
        let kind = if Failure::of(&e).is_cut() {
            BackendErrorKind::Unreachable
        } else {
            BackendErrorKind::Other
        };
        let message = format!(
            "postgres at {}: {what} failed: {}",
            settings.target,
            error_text(&e)
        );
        StatementError::from_parts(kind, message, Arc::new(e))
    }

    pub(super) fn from_parts(
        kind: BackendErrorKind,
        message: String,
        source: Arc<dyn std::error::Error + Send + Sync>,
    ) -> Self {
        StatementError {
            kind,
            message,
            source,
        }
    }

    /// The error for one caller.
    pub(super) fn error(&self) -> Error {
        self.error_noting("")
    }

    /// The error for one caller, with `note` after the message.
    pub(super) fn error_noting(&self, note: &str) -> Error {
        Error::backend_with(
            self.kind,
            format!("{}{note}", self.message),
            self.source.clone(),
        )
    }
}

impl fmt::Display for StatementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// [`StatementError::new`], as the one error of one caller.
pub(super) fn query_error(settings: &Settings, what: &str, e: tokio_postgres::Error) -> Error {
    StatementError::new(settings, what, e).error()
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    const TARGET: &str = "db:5432/app as app";

    fn server(code: &str) -> (BackendErrorKind, String) {
        let text = "the server's words".to_string();
        judge(TARGET, Failure::Server { code, text })
    }

    fn retried(kind: BackendErrorKind) -> bool {
        Error::backend(kind, "x").is_retryable()
    }

    /// By SQLSTATE: credentials, a missing database and missing rights are
    /// fatal; a server that cannot take a connection now is retried.
    #[test]
    fn server_refusals_by_code() {
        for (code, kind) in [
            ("28P01", BackendErrorKind::Auth),
            ("28000", BackendErrorKind::Auth),
            ("3D000", BackendErrorKind::Refused),
            ("42501", BackendErrorKind::Refused),
            ("42704", BackendErrorKind::Refused),
            ("XX000", BackendErrorKind::Refused),
        ] {
            assert_eq!(server(code).0, kind, "{code}");
            assert!(!retried(kind), "{code}");
        }
        // 08: connection exceptions; 53300: too many connections; 57P0x:
        // shutting down, starting up, crash recovery.
        for code in ["08006", "08001", "53300", "57P01", "57P03"] {
            assert_eq!(server(code).0, BackendErrorKind::Unreachable, "{code}");
        }
        assert!(retried(BackendErrorKind::Unreachable));
        assert_eq!(
            server("28P01").1,
            "cannot connect to postgres at db:5432/app as app: authentication failed (password hidden): the server's words"
        );
        assert!(server("3D000").1.contains("the database does not exist"));
        assert!(server("42501").1.contains("needs CREATE"));
        assert!(server("53300").1.contains("cannot take the connection now"));
    }

    #[test]
    fn a_missing_client_certificate_gets_a_hint() {
        let text = "connection requires a valid client certificate".to_string();
        let (kind, message) = judge(
            TARGET,
            Failure::Server {
                code: "28000",
                text,
            },
        );
        assert_eq!(kind, BackendErrorKind::Auth);
        assert!(message.ends_with("or Postgres::client_cert)"), "{message}");
    }

    /// By error type: a socket that cannot reach the server is retried; a
    /// TLS handshake that fails (or a certificate refused, which arrives
    /// as invalid data) is fatal.
    #[test]
    fn socket_errors_by_kind() {
        let io = |error: &io::Error, tls| judge(TARGET, Failure::Io { error, tls });
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let (kind, message) = io(&refused, false);
        assert_eq!(kind, BackendErrorKind::Unreachable);
        assert!(
            message.starts_with("cannot reach postgres at db:5432/app as app: "),
            "{message}"
        );
        let (kind, message) = io(&refused, true);
        assert_eq!(kind, BackendErrorKind::Tls);
        assert!(message.contains(": TLS failed: "), "{message}");
        for kind in [io::ErrorKind::InvalidData, io::ErrorKind::InvalidInput] {
            let error = io::Error::new(kind, "invalid peer certificate: UnknownIssuer");
            let (judged, message) = io(&error, false);
            assert_eq!(judged, BackendErrorKind::Tls, "{kind:?}");
            assert!(message.ends_with("TLS failed: invalid peer certificate: UnknownIssuer"));
        }
        for kind in [
            io::ErrorKind::TimedOut,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::HostUnreachable,
        ] {
            let error = io::Error::from(kind);
            assert_eq!(io(&error, false).0, BackendErrorKind::Unreachable);
        }
    }

    #[test]
    fn other_driver_errors() {
        let driver = |text: &str, cut| Failure::Driver {
            text: text.to_string(),
            cut,
        };
        let (kind, _) = judge(TARGET, driver("timeout waiting for server", true));
        assert_eq!(kind, BackendErrorKind::Unreachable);
        let (kind, message) = judge(TARGET, driver("unexpected message from server", false));
        assert_eq!(kind, BackendErrorKind::Protocol);
        assert!(!retried(kind));
        assert_eq!(
            message,
            "cannot connect to postgres at db:5432/app as app: unexpected message from server"
        );
    }

    #[test]
    fn cut_connections_are_told_from_answers() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(
            Failure::Io {
                error: &reset,
                tls: false
            }
            .is_cut()
        );
        let answer = |code| Failure::Server {
            code,
            text: String::new(),
        };
        assert!(answer("57P01").is_cut(), "the server is shutting down");
        assert!(
            !answer("57014").is_cut(),
            "a statement timeout is an answer"
        );
        assert!(!answer("23505").is_cut());
    }

    /// Every caller of a failed statement gets its own error, with the
    /// same kind and the same kept source.
    #[test]
    fn statement_errors_keep_their_source() {
        let source = Arc::new(io::Error::other("connection reset"));
        let shared = StatementError::from_parts(
            BackendErrorKind::Unreachable,
            "postgres at db:5432/app as app: claim failed: connection reset".to_string(),
            source,
        );
        for e in [shared.error(), shared.error_noting(" (id `a`)")] {
            assert_eq!(e.kind(), Some(BackendErrorKind::Unreachable));
            assert_eq!(e.source().unwrap().to_string(), "connection reset");
        }
        assert_eq!(
            shared.error_noting(" (id `a`)").to_string(),
            "postgres at db:5432/app as app: claim failed: connection reset (id `a`)"
        );
        assert_eq!(shared.to_string(), shared.error().to_string());
    }
}
