//! Noticing that a holder or a member moved: the release and membership
//! notifications heard on the namespace's channel (read and queued by the
//! task that drives the connection), and the probe of the presence locks of
//! the holders this node waits on and of the members it knows, which is
//! also the heartbeat.

use std::collections::HashSet;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Connection};
use tracing::debug;

use super::connect::Live;
use super::errors::{error_text, query_error};
use super::state::Inner;

/// A notification longer than this is not ours: ignored.
const MAX_PAYLOAD: usize = 8_000;
/// Releases name their keys only when they are at most this many.
const MAX_PAYLOAD_KEYS: usize = 300;
/// Parsed releases queued between the connection task and the driver; past
/// this the task drops them and the driver wakes every waiter instead.
const RELEASE_QUEUE: usize = 1_024;

/// A release heard on the namespace's channel: the owner, and the keys it
/// released when it named them.
pub(super) type Release = (i32, Option<HashSet<i64>>);

/// What a notification on the namespace's channel says.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Heard {
    /// An owner released ids.
    Release(Release),
    /// A member joined, announced a profile or left (payload `m`).
    Members,
}

/// The payload of a membership notification.
pub(super) const MEMBERS_PAYLOAD: &str = "m";

/// A notification's payload, read: a release, a membership change, or
/// (`None`) anything else, ignored.
pub(super) fn parse_heard(payload: &str) -> Option<Heard> {
    if payload == MEMBERS_PAYLOAD {
        return Some(Heard::Members);
    }
    parse_release(payload).map(Heard::Release)
}

/// The releases and membership changes the connection task hears, parsed,
/// in a bounded queue.
/// When the driver falls behind (a flood of notifications, which any role
/// may send), the task drops them and raises `lost`, and the driver wakes
/// every waiter instead: a few retries for nothing, no missed wake-up, and
/// no memory growing with the flood.
pub(super) struct Releases {
    pub(super) rx: mpsc::Receiver<Heard>,
    pub(super) lost: Arc<Lost>,
}

/// Set when releases were dropped.
#[derive(Default)]
pub(super) struct Lost {
    flag: AtomicBool,
    pub(super) notify: Notify,
}

impl Lost {
    /// Whether releases were dropped since the last call.
    pub(super) fn take(&self) -> bool {
        self.flag.swap(false, Ordering::AcqRel)
    }

    fn raise(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// The task that drives the connection; aborted (closing the socket) when
/// dropped. Ends with why the connection ended.
pub(super) struct ConnTask(pub(super) JoinHandle<String>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Drives the connection on its own task (so that loss is seen at once,
/// whatever the session is doing) and forwards the releases heard on the
/// namespace's channel (see [`Releases`]).
pub(super) fn spawn_connection<S, T>(
    mut conn: Connection<S, T>,
    channel: String,
) -> (ConnTask, Releases)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(RELEASE_QUEUE);
    let lost = Arc::new(Lost::default());
    let lost_tx = lost.clone();
    let task = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    // Any role may NOTIFY the channel: what is not exactly a
                    // release's payload is ignored here.
                    let heard = (n.channel() == channel)
                        .then(|| parse_heard(n.payload()))
                        .flatten();
                    if let Some(release) = heard {
                        // Never wait here: this task drives the connection.
                        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(release) {
                            lost_tx.raise();
                        }
                    }
                }
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    debug!(message = notice.message(), "postgres notice");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("the connection failed: {}", error_text(&e)),
                None => return "the server closed the connection".to_string(),
            }
        }
    });
    (ConnTask(task), Releases { rx, lost })
}

/// A release's notification: `owner`, or `owner:key,key,…` (at most
/// [`MAX_PAYLOAD_KEYS`] keys) when it released a few ids. `None` for
/// anything else.
pub(super) fn parse_release(payload: &str) -> Option<Release> {
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    let (owner, keys) = match payload.split_once(':') {
        Some((owner, keys)) => (owner, Some(keys)),
        None => (payload, None),
    };
    let owner: i32 = owner.parse().ok()?;
    let keys = match keys {
        None => None,
        Some(keys) => {
            let keys: Vec<&str> = keys.split(',').collect();
            if keys.len() > MAX_PAYLOAD_KEYS {
                return None;
            }
            Some(
                keys.into_iter()
                    .map(|k| k.parse::<i64>().ok())
                    .collect::<Option<HashSet<i64>>>()?,
            )
        }
    };
    Some((owner, keys))
}

/// A probe's answer: the owners found dead, and when it was sent under
/// which server detection.
pub(super) struct ProbeDone {
    x: Duration,
    sent: Instant,
    result: Result<Vec<i32>, tokio_postgres::Error>,
}

/// Asks which of the owners this node waits on, and of the members it
/// knows, have lost their presence lock; with none, a plain heartbeat.
pub(super) fn start_probe(
    inner: &Arc<Inner>,
    live: &Live,
) -> Pin<Box<dyn Future<Output = ProbeDone> + Send>> {
    let owners: Vec<i32> = {
        let st = inner.lock();
        let mut owners = st.waiters.owners();
        owners.extend(st.members.watched());
        owners.sort_unstable();
        owners.dedup();
        owners
    };
    let client = live.client.clone();
    let stmts = live.stmts.clone();
    let namespace_key = inner.settings.namespace_key;
    let x = live.x;
    Box::pin(async move {
        let sent = Instant::now();
        let result = client
            .query(&stmts.probe, &[&owners, &namespace_key])
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect());
        ProbeDone { x, sent, result }
    })
}

/// A probe answered: the session is alive as of its send time, the claims
/// waiting on a dead owner retry, and a dead member is a membership change.
/// A failed probe changes nothing (the deadline notices a connection that
/// stopped answering).
pub(super) fn finish_probe(inner: &Arc<Inner>, live: &mut Live, done: ProbeDone) {
    match done.result {
        Ok(dead) => {
            live.vouched.note_ok(done.sent, done.x);
            if !dead.is_empty() {
                let mut st = inner.lock();
                let mut left = false;
                for owner in dead {
                    debug!(node = %inner.node, owner, "a holder's or member's session ended");
                    st.waiters.owner_changed(owner, None);
                    left |= st.members.forget(owner);
                }
                drop(st);
                if left {
                    inner.members_changed();
                }
            }
        }
        Err(e) => {
            debug!(node = %inner.node, error = %query_error(&inner.settings, "probe", e), "probe failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a release's exact payload counts; junk from any role is ignored.
    #[test]
    fn only_release_payloads_are_read() {
        assert_eq!(parse_release("42"), Some((42, None)));
        assert_eq!(
            parse_release("-7:1,-2"),
            Some((-7, Some(HashSet::from([1, -2]))))
        );
        for junk in [
            "",
            "x",
            " 42",
            "42:",
            "42:1,,2",
            "42:1,x",
            "99999999999",
            "1:2:3",
            &"1".repeat(9_000),
            &format!("1:{}", vec!["5"; 301].join(",")),
        ] {
            assert_eq!(parse_release(junk), None, "{junk:.40}");
        }
        // The most a release names.
        let keys = vec!["-9223372036854775808"; 300].join(",");
        assert!(parse_release(&format!("1:{keys}")).is_some());
    }

    /// `m` is a membership change; a release is a release; junk is nothing.
    #[test]
    fn membership_notifications_are_told_apart() {
        assert_eq!(parse_heard("m"), Some(Heard::Members));
        assert_eq!(parse_heard("42"), Some(Heard::Release((42, None))));
        assert_eq!(parse_heard("m:1"), None);
        assert_eq!(parse_heard("M"), None);
    }

    #[test]
    fn dropped_releases_are_reported_once() {
        let lost = Lost::default();
        assert!(!lost.take());
        lost.raise();
        lost.raise();
        assert!(lost.take());
        assert!(!lost.take());
    }
}
