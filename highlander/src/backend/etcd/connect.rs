//! Starting a node's session: the connections (TLS from the configuration),
//! the first read (the revision the watch starts at) and the node's lease,
//! each step retried on the next member until the connect timeout, and the
//! one-line error when start-up fails.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};
use tonic::{Response, Status};

use super::conn::{Conn, DialError, Dialer};
use super::failure::{Call, Failure, classify, reason};
use super::members::{Members, Use};
use super::pb::etcdserverpb::{LeaseGrantRequest, RangeRequest};
use super::session::{EtcdSession, RETRY_MIN, Settings, prefix_end};
use super::{Etcd, host_port, key_prefix};
use crate::backend::Backend;
use crate::{Error, Result};

/// How a start-up step failed.
#[derive(Debug)]
enum StartFailure {
    /// Still failing when the connect timeout passed: the last reason, and
    /// whether it was a failed TLS handshake.
    Unreachable { why: String, handshake: bool },
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

impl StartFailure {
    /// The one-line error `start()` fails with.
    fn into_error(self, names: &Names<'_>) -> Error {
        let Names {
            shown,
            describe,
            user,
            prefix,
        } = names;
        match self {
            StartFailure::Credentials(why) => Error::Config(format!(
                "etcd at {shown} refused user `{user}` ({describe}): {why}"
            )),
            StartFailure::Denied(why) => Error::Config(format!(
                "etcd at {shown} does not let this user read and write `{prefix}` ({describe}): {why}"
            )),
            StartFailure::Unreachable {
                why,
                handshake: true,
            } => Error::Backend(format!(
                "cannot reach etcd at {shown} ({describe}): {why} (a TLS mismatch? use etcds:// \
                 for a TLS server, with ca= its CA and cert=/key= when it requires client \
                 certificates)"
            )),
            StartFailure::Unreachable { why, .. } => {
                Error::Backend(format!("cannot reach etcd at {shown} ({describe}): {why}"))
            }
        }
    }
}

/// Runs one start-up step (`send` on the current member) until it
/// succeeds, fails for good, or `deadline` passes; each attempt gets a third
/// of the time at most and a failure moves the step to the next member, so
/// one member that hangs or refuses does not decide the outcome while others
/// may answer.
async fn at_start<T, F, Fut>(
    members: &Members,
    deadline: Instant,
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
    let per_attempt = (limit / 3).max(Duration::from_millis(500));
    let mut retry = RETRY_MIN;
    let mut last: Option<(String, bool)> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(match last {
                Some((why, handshake)) => StartFailure::Unreachable {
                    why: format!("{why} (still failing after {limit:?})"),
                    handshake,
                },
                None => StartFailure::Unreachable {
                    why: format!("no answer within {limit:?}"),
                    handshake: false,
                },
            });
        }
        let limit_now = left.min(per_attempt);
        let attempt = async {
            let conn = members
                .client(Use::Request, limit_now)
                .await
                .map_err(Failed::Dial)?;
            conn.call(&mut send).await.map_err(Failed::Answer)
        };
        match timeout(limit_now, attempt).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(Failed::Dial(DialError::Credentials(why)))) => {
                return Err(StartFailure::Credentials(why));
            }
            Ok(Err(Failed::Dial(e))) => {
                members.failed(Use::Request, !matches!(e, DialError::Failed(_)));
                last = Some((e.reason(), matches!(e, DialError::Handshake(_))));
            }
            Ok(Err(Failed::Answer(status))) => {
                let failure = classify(&status, Call::Request);
                if failure == Failure::Denied {
                    return Err(StartFailure::Denied(reason(&status)));
                }
                members.failed(Use::Request, failure.silent());
                last = Some((reason(&status), failure == Failure::Handshake));
            }
            Err(_) => members.failed(Use::Request, true),
        }
        sleep(retry.min(deadline.saturating_duration_since(Instant::now()))).await;
        retry = (retry * 2).min(Duration::from_millis(500));
    }
}

/// Connects one node: authenticates, learns the current revision (the
/// watch starts there), is granted the node's lease, and starts the tasks.
/// Each step is retried until the connect timeout, so a dead member among
/// the endpoints does not fail the start.
pub(super) async fn connect(config: Etcd, node: String) -> Result<Arc<EtcdSession>> {
    let describe = config.describe();
    let endpoints: Vec<String> = config
        .endpoints
        .iter()
        .filter_map(|e| host_port(e))
        .map(str::to_string)
        .collect();
    let shown = endpoints.join(",");
    let limit = config.connect_timeout;
    let deadline = Instant::now() + limit;
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
    let first = at_start(&members, deadline, limit, |conn: Conn| {
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
    let granted = at_start(&members, deadline, limit, |conn: Conn| {
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
            return Err(Error::Backend(format!(
                "etcd at {shown} ({describe}) did not grant a lease: {}",
                resp.error
            )));
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

    fn text(failure: StartFailure) -> String {
        failure.into_error(&NAMES).to_string()
    }

    #[test]
    fn start_errors_say_what_to_do_in_one_line() {
        let refused = text(StartFailure::Credentials("InvalidArgument: …".into()));
        assert!(refused.starts_with("etcd at 10.0.0.1:2379 refused user `app`"));
        let denied = text(StartFailure::Denied("PermissionDenied".into()));
        assert!(denied.contains("read and write `/highlander/`"), "{denied}");
        let tls = text(StartFailure::Unreachable {
            why: "invalid peer certificate: UnknownIssuer".into(),
            handshake: true,
        });
        assert!(
            tls.starts_with("cannot reach etcd at 10.0.0.1:2379") && tls.contains("TLS mismatch"),
            "{tls}"
        );
        let down = text(StartFailure::Unreachable {
            why: "Connection refused".into(),
            handshake: false,
        });
        assert!(!down.contains("TLS"), "{down}");
        for error in [refused, denied, tls, down] {
            assert!(!error.contains('\n'), "{error}");
        }
    }
}
