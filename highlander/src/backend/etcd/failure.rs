//! What a failed call to etcd means, decided in one place: from the gRPC
//! status code etcd answered with and, for a failure of the transport, from
//! the error *types* among its causes (tonic's `ConnectError`, rustls'
//! errors, `std::io` error kinds); never from the text of a message. Also
//! the one-line reason shown in errors and logs.

use std::error::Error as StdError;
use std::io::ErrorKind;

use tonic::{Code, ConnectError, Status};

/// What a failed call means for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// No connection to the member could be made (refused, unreachable, no
    /// route): the request was never sent, and the member is avoided for a
    /// while.
    Unreachable,
    /// TLS failed: a rustls error (a server certificate that does not
    /// verify, a client certificate the server refused, a plain server
    /// answering a TLS hello). Only the configuration fixes it.
    Tls,
    /// A connection, but the server closed it while it was being set up
    /// (perhaps TLS on one side only). Treated as unreachable, with a hint
    /// about TLS.
    Handshake,
    /// The member could not serve the request now: etcd's `Unavailable`
    /// ("no leader", "leader changed", "request timed out", "server
    /// stopped"), or a stream the transport lost. Nothing was applied: worth
    /// sending to another member.
    Unavailable,
    /// etcd no longer has the lease (`NotFound`, "requested lease not
    /// found": the only `NotFound` the calls made here can get).
    LeaseNotFound,
    /// The auth token a request carried is no longer accepted: authenticate
    /// again and repeat the request once.
    TokenRefused,
    /// `Authenticate` refused: a wrong user or password, auth not enabled,
    /// or no permission.
    CredentialsRefused,
    /// The user may not read or write these keys (`PermissionDenied`).
    Denied,
    /// Anything else: reported as it is.
    Other,
}

impl Failure {
    /// The member did not take the request at all (no connection): avoid
    /// it for a while and drop its connection.
    pub(super) fn silent(self) -> bool {
        matches!(
            self,
            Failure::Unreachable | Failure::Handshake | Failure::Tls
        )
    }

    /// Nothing was applied and another member may serve it.
    pub(super) fn undelivered(self) -> bool {
        matches!(
            self,
            Failure::Unreachable | Failure::Handshake | Failure::Tls | Failure::Unavailable
        )
    }
}

/// Which call failed: the same code means different things for
/// `Authenticate` and for the other calls, and with or without credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Call {
    /// Exchanging the user and password for a token.
    Authenticate,
    /// Any other call, on a connection without credentials.
    Request,
    /// Any other call, carrying an auth token.
    Authenticated,
}

/// What the error types among a failure's causes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// Nothing about the transport: etcd answered.
    Answer,
    /// The connection could not be made.
    Connect,
    /// The connection was closed while it was being set up.
    Closed,
    /// rustls failed (while connecting, or on the connection later).
    Tls,
}

/// The one classification (see [`Failure`]'s variants for the rules).
///
/// etcd's codes (`api/v3rpc/rpctypes/error.go`): `Unavailable` for "no
/// leader", "leader changed", "request timed out", "server stopped";
/// `NotFound` for "requested lease not found"; `PermissionDenied`;
/// `Unauthenticated` for "invalid auth token" (expired, unknown, or dropped
/// when auth was turned off and on); `InvalidArgument` for a wrong password
/// (`Authenticate`) but also for two cases a fresh token fixes, "revision of
/// auth store is old" and "user name is empty", which have no code of their
/// own. Rather than reading etcd's message, a call that carried a token and
/// was answered `InvalidArgument` is taken as a refused token: the session
/// authenticates once and repeats the call once. The requests sent here are
/// well-formed, so a genuinely invalid one (a server whose `--max-txn-ops`
/// is lower than 127) costs one `Authenticate` before the same error.
/// `FailedPrecondition` for `Authenticate` is "authentication is not
/// enabled".
pub(super) fn decide(code: Code, cause: Cause, call: Call) -> Failure {
    match cause {
        Cause::Tls => return Failure::Tls,
        Cause::Closed => return Failure::Handshake,
        Cause::Connect => return Failure::Unreachable,
        Cause::Answer => {}
    }
    match (code, call) {
        (Code::Unavailable, _) => Failure::Unavailable,
        (
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::Unauthenticated
            | Code::PermissionDenied,
            Call::Authenticate,
        ) => Failure::CredentialsRefused,
        (Code::NotFound, _) => Failure::LeaseNotFound,
        (Code::PermissionDenied, _) => Failure::Denied,
        (Code::Unauthenticated | Code::InvalidArgument, Call::Authenticated) => {
            Failure::TokenRefused
        }
        _ => Failure::Other,
    }
}

/// What a failed call's status means (its code and the causes it carries).
pub(super) fn classify(status: &Status, call: Call) -> Failure {
    decide(status.code(), cause(status.source(), false), call)
}

/// What a failed connect means: [`Failure::Tls`], [`Failure::Handshake`]
/// or [`Failure::Unreachable`].
pub(super) fn classify_connect(error: &(dyn StdError + 'static)) -> Failure {
    match cause(Some(error), true) {
        Cause::Tls => Failure::Tls,
        Cause::Closed => Failure::Handshake,
        Cause::Connect | Cause::Answer => Failure::Unreachable,
    }
}

/// Walks `error`'s causes. A rustls error (tokio-rustls hands it over
/// inside an I/O error) means TLS failed. Inside a failed connect (a
/// tonic [`ConnectError`], or `connecting`), the server closing or resetting
/// the connection means the handshake failed: the TCP connection had been
/// made, and only the handshake reads from it.
fn cause(error: Option<&(dyn StdError + 'static)>, connecting: bool) -> Cause {
    let mut connect = connecting;
    let (mut tls, mut closed) = (false, false);
    let mut next = error;
    while let Some(e) = next {
        if e.is::<ConnectError>() {
            connect = true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            let from_rustls = io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>());
            let shut = matches!(
                io.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            );
            tls |= from_rustls;
            closed |= connect && shut;
        }
        tls |= e.is::<rustls::Error>();
        next = e.source();
    }
    match (tls, closed, connect) {
        (true, _, _) => Cause::Tls,
        (false, true, _) => Cause::Closed,
        (false, false, true) => Cause::Connect,
        (false, false, false) => Cause::Answer,
    }
}

/// A one-line reason: the status code, etcd's message, and the causes of a
/// transport failure.
pub(super) fn reason(status: &Status) -> String {
    let mut text = format!("{:?}", status.code());
    let message = status.message();
    if !message.is_empty() {
        text.push_str(": ");
        text.push_str(message);
    }
    with_causes(text, status.source())
}

/// The error and its causes, on one line.
pub(super) fn chain(error: &dyn StdError) -> String {
    with_causes(error.to_string(), error.source())
}

/// `text`, then each cause not already shown, on one line.
fn with_causes(mut text: String, mut source: Option<&dyn StdError>) -> String {
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn the_table() {
        use Call::{Authenticate as Auth, Authenticated as Authed, Request as Plain};
        use Cause::{Answer, Closed, Connect, Tls as Rustls};
        use Failure::*;
        #[rustfmt::skip]
        let table = [
            // A member without a leader, or one tonic could not reach.
            (Code::Unavailable,        Answer,  Plain,  Unavailable),
            (Code::Unavailable,        Answer,  Authed, Unavailable),
            (Code::Unavailable,        Answer,  Auth,   Unavailable),
            (Code::Unavailable,        Connect, Plain,  Unreachable),
            (Code::Unavailable,        Closed,  Plain,  Handshake),
            (Code::Unavailable,        Rustls,  Plain,  Tls),
            (Code::Unknown,            Rustls,  Authed, Tls),
            (Code::Unknown,            Closed,  Auth,   Handshake),
            (Code::Unknown,            Connect, Auth,   Unreachable),
            // The lease.
            (Code::NotFound,           Answer,  Plain,  LeaseNotFound),
            (Code::NotFound,           Answer,  Authed, LeaseNotFound),
            // Access.
            (Code::PermissionDenied,   Answer,  Plain,  Denied),
            (Code::PermissionDenied,   Answer,  Authed, Denied),
            (Code::PermissionDenied,   Answer,  Auth,   CredentialsRefused),
            // Tokens: refused only matters with credentials.
            (Code::Unauthenticated,    Answer,  Authed, TokenRefused),
            (Code::InvalidArgument,    Answer,  Authed, TokenRefused),
            (Code::Unauthenticated,    Answer,  Plain,  Other),
            (Code::InvalidArgument,    Answer,  Plain,  Other),
            // Authenticate itself.
            (Code::InvalidArgument,    Answer,  Auth,   CredentialsRefused),
            (Code::FailedPrecondition, Answer,  Auth,   CredentialsRefused),
            (Code::Unauthenticated,    Answer,  Auth,   CredentialsRefused),
            (Code::FailedPrecondition, Answer,  Plain,  Other),
            // The rest is reported as it is.
            (Code::OutOfRange,         Answer,  Plain,  Other),
            (Code::ResourceExhausted,  Answer,  Authed, Other),
            (Code::DeadlineExceeded,   Answer,  Plain,  Other),
            (Code::Cancelled,          Answer,  Plain,  Other),
            (Code::Unknown,            Answer,  Plain,  Other),
            (Code::Internal,           Answer,  Auth,   Other),
        ];
        for (code, cause, call, want) in table {
            assert_eq!(
                decide(code, cause, call),
                want,
                "{code:?} {cause:?} {call:?}"
            );
        }
    }

    /// A status the way tonic builds one from a failed connect.
    fn connect_failed(io: io::Error) -> Status {
        Status::from_error(Box::new(ConnectError(Box::new(io))))
    }

    fn rustls_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        )
    }

    #[test]
    fn transport_failures_by_their_types() {
        let refused = connect_failed(io::ErrorKind::ConnectionRefused.into());
        assert_eq!(refused.code(), Code::Unavailable);
        assert_eq!(classify(&refused, Call::Request), Failure::Unreachable);
        let unknown_ca = connect_failed(rustls_error());
        assert_eq!(classify(&unknown_ca, Call::Authenticated), Failure::Tls);
        // The server hung up during the handshake.
        let eof = connect_failed(io::ErrorKind::UnexpectedEof.into());
        assert_eq!(classify(&eof, Call::Request), Failure::Handshake);
        // A reset on a connection that was up is not a handshake.
        let reset = Status::from_error(Box::new(io::Error::from(io::ErrorKind::ConnectionReset)));
        assert_eq!(classify(&reset, Call::Request), Failure::Other);
        // A TLS alert after the handshake (a client certificate refused).
        let alert = Status::from_error(Box::new(rustls_error()));
        assert_eq!(classify(&alert, Call::Request), Failure::Tls);
        // A connect that failed without a ConnectError around it.
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(classify_connect(&timed_out), Failure::Unreachable);
        assert_eq!(classify_connect(&rustls_error()), Failure::Tls);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(classify_connect(&reset), Failure::Handshake);
    }

    #[test]
    fn messages_do_not_decide() {
        for message in [
            "etcdserver: requested lease not found",
            "etcdserver: revision of auth store is old",
            "connection refused",
            "",
        ] {
            let status = Status::new(Code::Unavailable, message);
            assert_eq!(classify(&status, Call::Authenticated), Failure::Unavailable);
            let status = Status::new(Code::InvalidArgument, message);
            assert_eq!(classify(&status, Call::Request), Failure::Other);
        }
    }

    #[test]
    fn which_failures_move_on() {
        assert!(Failure::Unreachable.silent() && Failure::Handshake.silent());
        assert!(Failure::Tls.silent() && Failure::Tls.undelivered());
        assert!(!Failure::Unavailable.silent());
        assert!(Failure::Unavailable.undelivered() && Failure::Unreachable.undelivered());
        for f in [
            Failure::LeaseNotFound,
            Failure::Denied,
            Failure::Other,
            Failure::TokenRefused,
        ] {
            assert!(!f.silent() && !f.undelivered(), "{f:?}");
        }
    }

    #[test]
    fn reasons_are_one_line() {
        let status = connect_failed(io::Error::other("first\nsecond"));
        let text = reason(&status);
        assert!(text.starts_with("Unavailable"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        let nested = io::Error::other(io::Error::other("inner"));
        assert_eq!(chain(&nested), "inner");
    }
}
