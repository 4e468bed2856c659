//! Waiting in tests: for a condition, for the runtimes of a test to reach a
//! state, and for the one holder of an id. Every deadline here is a hang
//! guard that fails the test with what was awaited, never a timing
//! assertion.
//!
//! ```no_run
//! # async fn demo(a: highlander::RuntimeHandle, b: highlander::RuntimeHandle) {
//! use highlander_tests::wait::{GUARD, holder, wait_until};
//! let held = holder(&[&a, &b], "solo", GUARD).await;
//! println!("{} holds solo with token {}", held.node, held.token);
//! let flag = std::sync::atomic::AtomicBool::new(true);
//! wait_until("the flag set", GUARD, || flag.load(std::sync::atomic::Ordering::SeqCst)).await;
//! # }
//! ```

use std::future::{Future, poll_fn};
use std::task::Poll;
use std::time::Duration;

use highlander::{RuntimeHandle, SingletonState, Status};

/// The hang guard most waits use: far beyond anything a passing test needs,
/// on a busy machine too.
pub const GUARD: Duration = Duration::from_secs(60);

/// How often [`wait_until`] and [`wait_until_async`] check their condition.
const POLL: Duration = Duration::from_millis(5);

/// Awaits `future`, failing the test when it has not completed within
/// `deadline`, with a message naming `what`.
pub async fn within<T>(what: &str, deadline: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(deadline, future)
        .await
        .unwrap_or_else(|_| panic!("hang guard: not {what} within {deadline:?}"))
}

/// Waits until `cond` holds, checking it every few milliseconds (for
/// conditions nothing announces: log lines, counters). Fails the test after
/// `deadline`, naming `what`.
pub async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    within(what, deadline, async {
        while !cond() {
            tokio::time::sleep(POLL).await;
        }
    })
    .await
}

/// As [`wait_until`], for a condition that has to ask something (a
/// backend's view of the holder, the member list).
pub async fn wait_until_async(what: &str, deadline: Duration, mut cond: impl AsyncFnMut() -> bool) {
    within(what, deadline, async {
        while !cond().await {
            tokio::time::sleep(POLL).await;
        }
    })
    .await
}

/// Waits until `cond` holds, checking it at every state change of any of
/// `handles` (no polling). Fails the test after `deadline` with `what` and
/// the status of every handle.
///
/// Each round subscribes to every handle's changes *before* it checks, so
/// a change between the check and the wait is never missed.
pub async fn wait_all(
    handles: &[&RuntimeHandle],
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> bool,
) {
    let waited = tokio::time::timeout(deadline, async {
        loop {
            let mut changes: Vec<_> = handles.iter().map(|h| Box::pin(h.changed())).collect();
            let mut woke = false;
            poll_fn(|cx| {
                for change in changes.iter_mut() {
                    woke |= change.as_mut().poll(cx).is_ready();
                }
                Poll::Ready(())
            })
            .await;
            if cond() {
                return;
            }
            if woke {
                continue;
            }
            poll_fn(|cx| {
                for change in changes.iter_mut() {
                    if change.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(());
                    }
                }
                Poll::Pending
            })
            .await;
        }
    })
    .await;
    if waited.is_err() {
        let status: Vec<Status> = handles.iter().map(|h| h.status()).collect();
        panic!("hang guard: not {what} within {deadline:?}; status: {status:#?}");
    }
}

/// Waits until `handle`'s status satisfies `cond` (at every state change),
/// and returns that status. Fails the test after `deadline`, naming `what`
/// and the node.
pub async fn status(
    handle: &RuntimeHandle,
    what: &str,
    deadline: Duration,
    cond: impl FnMut(&Status) -> bool,
) -> Status {
    tokio::time::timeout(deadline, handle.wait_until(cond))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "hang guard: {} not {what} within {deadline:?}: {:#?}",
                handle.node(),
                handle.status()
            )
        })
}

/// Waits until `handle` runs `id`.
pub async fn running(handle: &RuntimeHandle, id: &str) -> Status {
    status(handle, &format!("running `{id}`"), GUARD, |s| {
        s.is_running(id)
    })
    .await
}

/// Waits until `handle` waits for another node's tenure of `id`.
pub async fn waiting(handle: &RuntimeHandle, id: &str) -> Status {
    status(handle, &format!("waiting for `{id}`"), GUARD, |s| {
        is_waiting(s, id)
    })
    .await
}

/// True when `status` shows its node waiting for another's tenure of `id`.
pub fn is_waiting(status: &Status, id: &str) -> bool {
    matches!(status.get(id), Some(SingletonState::Waiting { .. }))
}

/// The fencing token of `handle`'s tenure of `id`, while it runs it.
pub fn token_of(handle: &RuntimeHandle, id: &str) -> Option<u64> {
    handle
        .status()
        .running()
        .find(|(i, _)| *i == id)
        .map(|(_, t)| t)
}

/// The one node running an id, as [`holder`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// Its position in the handles given to [`holder`].
    pub index: usize,
    /// Its node name.
    pub node: String,
    /// The fencing token of its tenure.
    pub token: u64,
}

/// The names of the nodes among `handles` that run `id` now.
pub fn runners(handles: &[&RuntimeHandle], id: &str) -> Vec<String> {
    handles
        .iter()
        .filter(|h| h.status().is_running(id))
        .map(|h| h.node().to_string())
        .collect()
}

/// Waits (at every state change) until exactly one of `handles` runs `id`
/// and every other one waits for it, and returns that one. Fails the test
/// after `deadline`.
pub async fn holder(handles: &[&RuntimeHandle], id: &str, deadline: Duration) -> Holding {
    let mut found = None;
    wait_all(handles, &format!("one holder of `{id}`"), deadline, || {
        let statuses: Vec<Status> = handles.iter().map(|h| h.status()).collect();
        let running: Vec<(usize, u64)> = statuses
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.running().find(|(r, _)| *r == id).map(|(_, t)| (i, t)))
            .collect();
        let waiting = statuses.iter().filter(|s| is_waiting(s, id)).count();
        if let [(index, token)] = running[..]
            && waiting == handles.len() - 1
        {
            found = Some(Holding {
                index,
                node: handles[index].node().to_string(),
                token,
            });
            return true;
        }
        false
    })
    .await;
    found.expect("found when the wait ended")
}

/// Waits (at every state change) until exactly `count` of `handles` run
/// `id` (two sides of a split may each run it), and returns their names.
pub async fn runners_of(
    handles: &[&RuntimeHandle],
    id: &str,
    count: usize,
    deadline: Duration,
) -> Vec<String> {
    let mut found = Vec::new();
    wait_all(
        handles,
        &format!("`{id}` running on exactly {count} nodes"),
        deadline,
        || {
            found = runners(handles, id);
            found.len() == count
        },
    )
    .await;
    found
}

/// How many ids `handles` run between them.
pub fn total_running(handles: &[&RuntimeHandle]) -> usize {
    handles.iter().map(|h| h.status().running().count()).sum()
}
