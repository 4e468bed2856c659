//! Starting a node's session: the connections (TLS from the configuration),
//! the first read (the revision the watch starts at) and the node's lease,
//! each step going to the members in turn until one answers, and the
//! one-line error of an attempt that failed. The runtime repeats a failed
//! attempt until the start timeout (`kit::startup`), unless the error says
//! retrying cannot fix it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, timeout};
use tonic::{Response, Status};

use super::conn::{Conn, DialError, Dialer};
use super::failure::{Call, Failure, classify, reason};
use super::members::{Members, Use};
use super::pb::etcdserverpb::{LeaseGrantRequest, RangeRequest};
use super::session::{EtcdSession, Settings, prefix_end};
use super::{Etcd, host_port, key_prefix};
use crate::backend::Backend;
use crate::{Error, Result};

/// How a start-up step failed.
#[derive(Debug)]
enum StartFailure {
    /// Every member failed: the last reason, and whether the server closed
    /// the connection while it was being set up (TLS on one side only?).
    /// Retrying may help.
    Unreachable { why: String, handshake: bool },
    /// TLS failed: a certificate that does not verify, or refused.
    Tls(String),
    /// The user or password was refused.
    Credentials(String),
    /// The user may not use the namespace.
    Denied(String),
}

/// What a start-up error names: never the password.
struct Names<'a> {
    /// The endpoints, `host:port,…`.
    shown: &'a str,
    /// The backend's description (password hidden).
    describe: &'a str,
    user: &'a str,
    prefix: &'a str,
}

/// What to do about TLS, after a TLS failure.
const TLS_HINT: &str = "(a TLS mismatch? use etcds:// for a TLS server, with ca= its CA and \
                        cert=/key= when it requires client certificates)";

impl StartFailure {
    /// The one-line error of the failed attempt, of a kind that says
    /// whether retrying can help: only [`Unreachable`](crate::BackendErrorKind::Unreachable)
    /// is retried at start-up; credentials, permissions and TLS fail at once.
    fn into_error(self, names: &Names<'_>) -> Error {
        let Names {
            shown,
            describe,
            user,
            prefix,
        } = names;
        match self {
            StartFailure::Credentials(why) => Error::backend(
                crate::BackendErrorKind::Auth,
                format!("etcd at {shown} refused user `{user}` ({describe}): {why}"),
            ),
            StartFailure::Denied(why) => Error::backend(
                crate::BackendErrorKind::Refused,
                format!(
                    "etcd at {shown} does not let this user read and write `{prefix}` ({describe}): {why}"
                ),
            ),
            StartFailure::Tls(why) => Error::backend(
                crate::BackendErrorKind::Tls,
                format!("cannot reach etcd at {shown} ({describe}): {why} {TLS_HINT}"),
            ),
            StartFailure::Unreachable {
                why,
                handshake: true,
            } => Error::backend(
                crate::BackendErrorKind::Unreachable,
                format!("cannot reach etcd at {shown}: {why} {TLS_HINT}"),
            ),
            StartFailure::Unreachable { why, .. } => Error::backend(
                crate::BackendErrorKind::Unreachable,
                format!("cannot reach etcd at {shown}: {why}"),
            ),
        }
    }
}

/// Runs one start-up step (`send`) on the members in turn, from the
/// current one, until one answers: each gets `limit` at most and a failure
/// moves the step to the next, so one member that hangs or refuses does not
/// decide the outcome while others may answer. Fails once every member
/// failed (with the last reason), or at once on what retrying cannot fix.
async fn on_some_member<T, F, Fut>(
    members: &Members,
    limit: Duration,
    mut send: F,
) -> std::result::Result<T, StartFailure>
where
    F: FnMut(Conn) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
{
    enum Failed {
        Dial(DialError),
        Answer(Status),
    }
    let mut last = (format!("no answer within {limit:?}"), false);
    for _ in 0..members.count() {
        let attempt = async {
            let conn = members
                .client(Use::Request, limit)
                .await
                .map_err(Failed::Dial)?;
            conn.call(&mut send).await.map_err(Failed::Answer)
        };
        match timeout(limit, attempt).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(Failed::Dial(DialError::Credentials(why)))) => {
                return Err(StartFailure::Credentials(why));
            }
            Ok(Err(Failed::Dial(DialError::Tls(why)))) => return Err(StartFailure::Tls(why)),
            Ok(Err(Failed::Dial(e))) => {
                members.failed(Use::Request, !matches!(e, DialError::Failed(_)));
                last = (e.reason(), matches!(e, DialError::Handshake(_)));
            }
            Ok(Err(Failed::Answer(status))) => {
                let failure = classify(&status, Call::Request);
                match failure {
                    Failure::Denied => return Err(StartFailure::Denied(reason(&status))),
                    Failure::Tls => return Err(StartFailure::Tls(reason(&status))),
                    _ => {}
                }
                members.failed(Use::Request, failure.silent());
                last = (reason(&status), failure == Failure::Handshake);
            }
            Err(_) => {
                members.failed(Use::Request, true);
                last = (format!("no answer within {limit:?}"), false);
            }
        }
    }
    let (why, handshake) = last;
    Err(StartFailure::Unreachable { why, handshake })
}

/// Connects one node: authenticates, learns the current revision (the
/// watch starts there), is granted the node's lease, and starts the tasks.
/// Each step goes to the members in turn until one answers, so a dead
/// member among the endpoints does not fail the start.
pub(super) async fn connect(config: Etcd, node: String) -> Result<Arc<EtcdSession>> {
    let describe = config.describe();
    let endpoints: Vec<String> = config
        .endpoints
        .iter()
        .filter_map(|e| host_port(e))
        .map(str::to_string)
        .collect();
    let shown = endpoints.join(",");
    let limit = config.attempt_limit();
    let ttl_secs = config.ttl_secs();
    let interval = config.keepalive_in_effect();
    let request_timeout = (Duration::from_secs(ttl_secs as u64) / 4)
        .clamp(Duration::from_millis(500), Duration::from_secs(3));
    // HTTP/2 pings on every connection (every keep-alive interval, answered
    // within the request timeout): a member that hangs with its connections
    // open (paused, overloaded) gets its connections closed, so streams on
    // it (the watch, a keep-alive) break and reopen elsewhere instead of
    // going quiet.
    let dialer = Dialer::new(&config, &endpoints, interval, request_timeout)?;
    let members = Members::new(
        dialer,
        endpoints.len(),
        Duration::from_secs(ttl_secs.max(1) as u64),
        request_timeout,
    );
    let prefix = key_prefix(&config.namespace);
    let names = Names {
        shown: &shown,
        describe: &describe,
        user: config.user.as_ref().map_or("", |(u, _)| u.as_str()),
        prefix: &prefix,
    };
    let first = on_some_member(&members, limit, |conn: Conn| {
        let request = conn.request(RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            keys_only: true,
            limit: 1,
            ..RangeRequest::default()
        });
        async move { conn.kv().range(request).await }
    })
    .await;
    let revision = match first {
        Ok(resp) => resp.header.map(|h| h.revision).unwrap_or(0),
        Err(failure) => return Err(failure.into_error(&names)),
    };
    let mut sent = Instant::now();
    let granted = on_some_member(&members, limit, |conn: Conn| {
        sent = Instant::now();
        let request = conn.request(LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        });
        async move { conn.lease().lease_grant(request).await }
    })
    .await;
    let granted = match granted {
        Ok(resp) if resp.ttl > 0 => resp,
        Ok(resp) => {
            return Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "etcd at {shown} ({describe}) did not grant a lease: {}",
                    resp.error
                ),
            ));
        }
        Err(failure) => return Err(failure.into_error(&names)),
    };
    let settings = Settings {
        node,
        prefix,
        ttl_secs,
        interval,
        describe: describe.clone(),
    };
    Ok(EtcdSession::start(
        settings,
        members,
        (granted.id, granted.ttl, sent),
        revision,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: Names<'static> = Names {
        shown: "10.0.0.1:2379",
        describe: "etcd://app:***@10.0.0.1:2379/highlander (ttl 10s)",
        user: "app",
        prefix: "/highlander/",
    };

    #[test]
    fn start_errors_say_what_to_do_in_one_line() {
        let refused = StartFailure::Credentials("InvalidArgument: …".into()).into_error(&NAMES);
        assert!(!refused.is_retryable(), "{refused}");
        let refused = refused.to_string();
        assert!(refused.starts_with("etcd at 10.0.0.1:2379 refused user `app`"));
        let denied = StartFailure::Denied("PermissionDenied".into()).into_error(&NAMES);
        assert!(!denied.is_retryable(), "{denied}");
        let denied = denied.to_string();
        assert!(denied.contains("read and write `/highlander/`"), "{denied}");
        let tls =
            StartFailure::Tls("invalid peer certificate: UnknownIssuer".into()).into_error(&NAMES);
        assert!(!tls.is_retryable(), "{tls}");
        let tls = tls.to_string();
        assert!(
            tls.starts_with("cannot reach etcd at 10.0.0.1:2379") && tls.contains("TLS mismatch"),
            "{tls}"
        );
        let closed = StartFailure::Unreachable {
            why: "connection reset".into(),
            handshake: true,
        }
        .into_error(&NAMES);
        assert!(closed.is_retryable(), "{closed}");
        let closed = closed.to_string();
        assert!(closed.contains("TLS mismatch"), "{closed}");
        let down = StartFailure::Unreachable {
            why: "Connection refused".into(),
            handshake: false,
        }
        .into_error(&NAMES);
        assert!(down.is_retryable(), "{down}");
        let down = down.to_string();
        assert!(!down.contains("TLS"), "{down}");
        for error in [refused, denied, tls, closed, down] {
            assert!(!error.contains('\n'), "{error}");
        }
    }
}
