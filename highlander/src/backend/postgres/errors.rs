//! What went wrong, in words: the text of a driver error (never a
//! password), and connection failures sorted by SQLSTATE code and error
//! type into "fix the configuration" (fatal at start) and "retry later".

use std::io;

use super::config::Settings;
use crate::Error;

/// Why connecting failed, and whether retrying can help.
#[derive(Debug)]
pub(super) struct ConnectError {
    pub(super) message: String,
    pub(super) fatal: bool,
}

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

/// A statement of a live session failed.
pub(super) fn query_error(settings: &Settings, what: &str, e: &tokio_postgres::Error) -> Error {
    Error::backend(
        crate::BackendErrorKind::Other,
        format!(
            "postgres at {}: {what} failed: {}",
            settings.target,
            error_text(e)
        ),
    )
}

/// Why a connection attempt failed, as far as deciding what to do goes.
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
}

/// What a server's refusal with SQLSTATE `code` means, and whether it is
/// fatal (retrying cannot help: the configuration must change).
fn server_refusal(code: &str) -> (&'static str, bool) {
    match code {
        "28P01" | "28000" => ("authentication failed (password hidden)", true),
        "3D000" => ("the database does not exist", true),
        "42501" => (
            "permission denied: the role needs CREATE on the schema to create the highlander_leases table, or an administrator creates it",
            true,
        ),
        c if c.starts_with("08") || c == "53300" || c.starts_with("57P") => {
            ("the server cannot take the connection now", false)
        }
        _ => ("the server refused", true),
    }
}

/// Sorts a connection failure into "fix the configuration" (fatal at
/// start) and "the server is not there now" (retried), with the message
/// for either. `target` is `host:port/db as user`.
pub(super) fn judge(target: &str, failure: Failure<'_>) -> ConnectError {
    use io::ErrorKind::{InvalidData, InvalidInput};
    match failure {
        Failure::Server { code, text } => {
            let (what, fatal) = server_refusal(code);
            // pg_hba.conf asks for a certificate this client did not present.
            let hint = if text.contains("client certificate") {
                " (give one with sslcert= and sslkey=, or Postgres::client_cert)"
            } else {
                ""
            };
            ConnectError {
                message: format!("cannot connect to postgres at {target}: {what}: {text}{hint}"),
                fatal,
            }
        }
        // A refused certificate arrives as an io::Error too.
        Failure::Io { error, tls } if tls || matches!(error.kind(), InvalidData | InvalidInput) => {
            ConnectError {
                message: format!("cannot connect to postgres at {target}: TLS failed: {error}"),
                fatal: true,
            }
        }
        Failure::Io { error, .. } => ConnectError {
            message: format!("cannot reach postgres at {target}: {error}"),
            fatal: false,
        },
        Failure::Driver { text, cut } => ConnectError {
            message: format!("cannot connect to postgres at {target}: {text}"),
            fatal: !cut,
        },
    }
}

/// [`judge`] for a driver error.
pub(super) fn classify(settings: &Settings, e: &tokio_postgres::Error) -> ConnectError {
    judge(&settings.target, Failure::of(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: &str = "db:5432/app as app";

    fn server(code: &str) -> ConnectError {
        let text = "the server's words".to_string();
        judge(TARGET, Failure::Server { code, text })
    }

    /// By SQLSTATE: credentials, a missing database and missing rights are
    /// fatal; a server that cannot take a connection now is retried.
    #[test]
    fn server_refusals_by_code() {
        for code in ["28P01", "28000", "3D000", "42501", "42704", "XX000"] {
            assert!(server(code).fatal, "{code}");
        }
        // 08: connection exceptions; 53300: too many connections; 57P0x:
        // shutting down, starting up, crash recovery.
        for code in ["08006", "08001", "53300", "57P01", "57P03"] {
            assert!(!server(code).fatal, "{code}");
        }
        let e = server("28P01");
        assert_eq!(
            e.message,
            "cannot connect to postgres at db:5432/app as app: authentication failed (password hidden): the server's words"
        );
        assert!(
            server("3D000")
                .message
                .contains("the database does not exist")
        );
        assert!(server("42501").message.contains("needs CREATE"));
        assert!(
            server("53300")
                .message
                .contains("cannot take the connection now")
        );
    }

    #[test]
    fn a_missing_client_certificate_gets_a_hint() {
        let text = "connection requires a valid client certificate".to_string();
        let e = judge(
            TARGET,
            Failure::Server {
                code: "28000",
                text,
            },
        );
        assert!(e.fatal);
        assert!(
            e.message.ends_with("or Postgres::client_cert)"),
            "{}",
            e.message
        );
    }

    /// By error type: a socket that cannot reach the server is retried; a
    /// TLS handshake that fails (or a certificate refused, which arrives
    /// as invalid data) is fatal.
    #[test]
    fn socket_errors_by_kind() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let e = judge(
            TARGET,
            Failure::Io {
                error: &refused,
                tls: false,
            },
        );
        assert!(!e.fatal);
        assert!(
            e.message
                .starts_with("cannot reach postgres at db:5432/app as app: "),
            "{}",
            e.message
        );
        let e = judge(
            TARGET,
            Failure::Io {
                error: &refused,
                tls: true,
            },
        );
        assert!(e.fatal);
        assert!(e.message.contains(": TLS failed: "), "{}", e.message);
        for kind in [io::ErrorKind::InvalidData, io::ErrorKind::InvalidInput] {
            let error = io::Error::new(kind, "invalid peer certificate: UnknownIssuer");
            let e = judge(
                TARGET,
                Failure::Io {
                    error: &error,
                    tls: false,
                },
            );
            assert!(e.fatal, "{kind:?}");
            assert!(
                e.message
                    .ends_with("TLS failed: invalid peer certificate: UnknownIssuer")
            );
        }
        for kind in [
            io::ErrorKind::TimedOut,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::HostUnreachable,
        ] {
            let error = io::Error::from(kind);
            assert!(
                !judge(
                    TARGET,
                    Failure::Io {
                        error: &error,
                        tls: false
                    }
                )
                .fatal,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn other_driver_errors() {
        let cut = |text: &str| Failure::Driver {
            text: text.to_string(),
            cut: true,
        };
        assert!(!judge(TARGET, cut("timeout waiting for server")).fatal);
        let e = judge(
            TARGET,
            Failure::Driver {
                text: "unexpected message from server".into(),
                cut: false,
            },
        );
        assert!(e.fatal);
        assert_eq!(
            e.message,
            "cannot connect to postgres at db:5432/app as app: unexpected message from server"
        );
    }
}
