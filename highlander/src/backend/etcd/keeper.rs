//! The tasks that keep the node's lease: the one keep-alive stream
//! (granting a new lease when the node has none), the watchdog that gives
//! every tenure up at the deadline a keep-alive did not move, and revoking
//! a lease the node abandoned. The rules they apply are `state`'s.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tonic::Status;
use tracing::{debug, info, warn};

use super::conn::Conn;
use super::failure::{Failure, classify, reason};
use super::members::{Outcome, Use, out_of_reach};
use super::pb::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest};
use super::session::{Inner, RETRY_MAX, RETRY_MIN, outbound};
use super::state::NodeLease;

/// A TTL etcd answered with (seconds; never negative).
fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

impl Inner {
    /// Lease `id` with `ttl` (seconds) was granted by a request sent at
    /// `sent`. False when the session closed meanwhile: the lease is not
    /// the node's, and the caller revokes it.
    pub(super) fn install_lease(&self, id: i64, ttl: i64, sent: Instant) -> bool {
        let ttl = secs(ttl);
        if !self.lock().install(id, ttl, sent) {
            return false;
        }
        info!(node = %self.node, lease = format_args!("{id:x}"), ttl = ?ttl, "etcd lease granted");
        self.bump();
        true
    }

    /// A keep-alive sent at `sent` succeeded.
    fn renewed(&self, id: i64, sent: Instant, ttl: Option<i64>) {
        let renewed = self.lock().renewed(id, sent, ttl.map(secs));
        if renewed {
            self.bump();
        }
    }

    fn is_current(&self, id: i64) -> bool {
        self.lock().is_current(id)
    }

    /// The server says the lease is gone (expired or revoked): every tenure
    /// ends at once and a new lease is granted.
    pub(super) fn lease_gone(&self, id: i64) {
        let Some(ended) = self.lock().lease_gone(id) else {
            return;
        };
        warn!(node = %self.node, lease = format_args!("{id:x}"), ended, "etcd lease is gone (expired or revoked): every tenure ended");
        self.bump();
    }

    /// No keep-alive succeeded in time: give every tenure up before the
    /// server could expire the lease, and abandon the lease (revoked as
    /// soon as etcd can be reached, so other nodes need not wait for it).
    fn condemn(self: &Arc<Self>, id: i64) {
        let Some((ended, lease)) = self.lock().condemn(id) else {
            return;
        };
        warn!(
            node = %self.node,
            lease = format_args!("{id:x}"),
            ended,
            since_last_keepalive = ?lease.last_ok.elapsed(),
            "no successful etcd keep-alive in time: every tenure given up before the lease could expire"
        );
        self.bump();
        let inner = self.clone();
        tokio::spawn(async move { inner.revoke_until_gone(lease).await });
    }

    /// Revokes an abandoned lease as soon as etcd answers (with backoff),
    /// so other nodes need not wait for it to expire.
    async fn revoke_until_gone(self: Arc<Self>, lease: NodeLease) {
        let mut retry = RETRY_MIN;
        loop {
            match self.revoke(lease.id).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) if gone(&e) => break,
                _ => {}
            }
            if !self.pause(retry).await {
                return;
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
        debug!(node = %self.node, lease = format_args!("{:x}", lease.id), "abandoned etcd lease revoked");
        self.lock().ours.remove(&lease.id);
    }

    /// Revokes lease `id` (its keys go with it).
    pub(super) async fn revoke(&self, id: i64) -> Outcome<()> {
        let send = |c: Conn| {
            let request = c.request(LeaseRevokeRequest { id });
            async move { c.lease().lease_revoke(request).await }
        };
        self.request(send).await.map(|answer| answer.map(|_| ()))
    }

    /// The one keep-alive task: grants the node's lease when it has none,
    /// keeps it alive every `interval` over one stream, and reopens the
    /// stream (on another member when one is down) with backoff.
    pub(super) async fn keeper(self: Arc<Self>) {
        let mut changes = self.changes.subscribe();
        let mut retry = RETRY_MIN;
        'outer: while !self.stop.is_cancelled() {
            let Some(conn) = self.stream_client(Use::KeepAlive).await else {
                if !self.pause(retry).await {
                    break;
                }
                retry = (retry * 2).min(self.interval.max(RETRY_MIN));
                continue;
            };
            let (current, closed) = {
                let state = self.lock();
                (state.lease, state.closed)
            };
            // `close` clears the lease: a new one now would outlive the
            // session.
            if closed {
                break;
            }
            let Some(lease) = current else {
                let sent = Instant::now();
                let grant = conn.call(|c: Conn| {
                    let request = c.request(LeaseGrantRequest {
                        ttl: self.ttl_secs,
                        id: 0,
                    });
                    async move { c.lease().lease_grant(request).await }
                });
                match timeout(self.request_timeout, grant).await {
                    Ok(Ok(resp)) if resp.ttl > 0 => {
                        if !self.install_lease(resp.id, resp.ttl, sent) {
                            // Closed while the grant was on its way: give
                            // the lease back (`close` waits for this task).
                            let _ = self.revoke(resp.id).await;
                            break;
                        }
                        retry = RETRY_MIN;
                    }
                    outcome => {
                        self.members.failed(Use::KeepAlive, out_of_reach(&outcome));
                        let why = match outcome {
                            Ok(Err(e)) => reason(&e),
                            Ok(Ok(resp)) => format!("granted with no TTL: {}", resp.error),
                            Err(_) => "timed out".into(),
                        };
                        debug!(node = %self.node, %why, retry_in = ?retry, "cannot get an etcd lease yet");
                        if !self.pause(retry).await {
                            break;
                        }
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
                continue;
            };
            // Opening the stream sends one keep-alive and awaits its answer.
            let (keeper, requests) = mpsc::channel(2);
            let _ = keeper.try_send(LeaseKeepAliveRequest { id: lease.id });
            let sent = Instant::now();
            let open = async {
                let mut stream = conn
                    .lease()
                    .lease_keep_alive(conn.request(outbound(requests)))
                    .await?
                    .into_inner();
                let first = stream.message().await?;
                Ok::<_, Status>((stream, first))
            };
            let opened = tokio::select! {
                _ = self.stop.cancelled() => break,
                opened = timeout(self.request_timeout, open) => opened,
            };
            let mut stream = match opened {
                Ok(Ok((stream, Some(resp)))) if resp.ttl > 0 => {
                    self.renewed(lease.id, sent, Some(resp.ttl));
                    retry = RETRY_MIN;
                    stream
                }
                Ok(Ok((_, Some(_)))) => {
                    // A TTL of 0: etcd no longer has the lease.
                    self.lease_gone(lease.id);
                    continue;
                }
                Ok(Err(e)) if gone(&e) => {
                    self.lease_gone(lease.id);
                    continue;
                }
                outcome => {
                    let why = self.stream_failed(Use::KeepAlive, &conn, outcome).await;
                    debug!(node = %self.node, %why, retry_in = ?retry, "etcd keep-alive failed");
                    if !self.pause(retry).await {
                        break;
                    }
                    retry = (retry * 2).min(self.interval.max(RETRY_MIN));
                    continue;
                }
            };
            let mut next = Instant::now() + self.interval;
            loop {
                tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    _ = sleep_until(next) => {}
                    changed = changes.changed() => {
                        if changed.is_err() || !self.is_current(lease.id) {
                            continue 'outer;
                        }
                        continue;
                    }
                }
                next = Instant::now() + self.interval;
                let sent = Instant::now();
                if keeper
                    .try_send(LeaseKeepAliveRequest { id: lease.id })
                    .is_err()
                {
                    self.members.failed(Use::KeepAlive, false);
                    continue 'outer;
                }
                let answer = tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    answer = timeout(self.request_timeout, stream.message()) => answer,
                };
                match answer {
                    Ok(Ok(Some(resp))) if resp.ttl > 0 => {
                        self.renewed(lease.id, sent, Some(resp.ttl))
                    }
                    Ok(Ok(Some(_))) => {
                        self.lease_gone(lease.id);
                        continue 'outer;
                    }
                    outcome => {
                        self.members.failed(Use::KeepAlive, out_of_reach(&outcome));
                        let why = match outcome {
                            Ok(Err(e)) => reason(&e),
                            Ok(Ok(None)) => "stream closed".into(),
                            _ => "timed out".into(),
                        };
                        debug!(node = %self.node, %why, "etcd keep-alive failed; reopening the stream on the next member");
                        continue 'outer;
                    }
                }
            }
        }
    }

    /// Ends every tenure at the node's deadline unless a keep-alive moved it.
    pub(super) async fn watchdog(self: Arc<Self>) {
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            let deadline = self.lock().deadline();
            let expired = async {
                match deadline {
                    Some((_, at)) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = expired => {
                    let expired = self.lock().expired(Instant::now());
                    if let Some(id) = expired {
                        self.condemn(id);
                    }
                }
            }
        }
    }
}

/// etcd no longer has the lease.
fn gone(status: &Status) -> bool {
    classify(status, super::failure::Call::Request) == Failure::LeaseNotFound
}
