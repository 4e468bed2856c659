//! The one watch over the namespace: it wakes the node's waiters when a key
//! (or a reservation) is deleted, ends a held tenure whose key was deleted
//! or replaced from outside, tells `members_changed` when a member key
//! changes, and after it resumed reads the held keys again (a deletion in a
//! compacted gap is never delivered). Which tenure an event ends, and which
//! waiter it wakes, are `State` rules tested here without etcd. The watch
//! covers the ids, the member keys and the reservations, not the catalogs
//! (see `roster`).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::timeout;
use tracing::{debug, warn};

use super::batch::MAX_OPS_PER_TXN;
use super::conn::Conn;
use super::failure::{Call, classify, reason};
use super::members::Use;
use super::pb::etcdserverpb::{
    RangeRequest, TxnRequest, WatchCreateRequest, WatchRequest, request_op, response_op,
    watch_request,
};
use super::pb::mvccpb::{KeyValue, event::EventType};
use super::roster::KeyKind;
use super::session::{Inner, RETRY_MAX, RETRY_MIN, outbound};
use super::state::State;
use super::txn::one_op;

impl State {
    /// The watch saw a `kind` event on the key of `id` (created at
    /// `create_revision`, changed at `mod_revision`). A deletion wakes the
    /// id's waiter when it is newer than what the waiter has seen. The
    /// tenure the event ends, if any: a deletion after our key was created,
    /// or a key created after ours (a lagging watch may still deliver older
    /// keys' events: those do not count).
    pub(super) fn on_event(
        &mut self,
        kind: EventType,
        id: &str,
        create_revision: i64,
        mod_revision: i64,
    ) -> Option<u64> {
        let lost = match kind {
            EventType::Delete => {
                // Handed to another node: not free for this one.
                if !self.handed_elsewhere(id, mod_revision) {
                    self.wake(id, mod_revision);
                }
                self.held
                    .get(id)
                    .is_some_and(|h| (h.token as i64) < mod_revision)
            }
            EventType::Put => self
                .held
                .get(id)
                .is_some_and(|h| create_revision > h.token as i64),
        };
        self.held.get(id).filter(|_| lost).map(|h| h.token)
    }

    /// Wakes the waiter of `id` for a deletion (of its key, or of its
    /// reservation) at `revision`, when that is newer than what it has seen.
    pub(super) fn wake(&self, id: &str, revision: i64) {
        if let Some(wake) = self.wakes.get(id) {
            wake.send_if_modified(|v| {
                let newer = revision > *v;
                if newer {
                    *v = revision;
                }
                newer
            });
        }
    }

    /// The watch fell behind a compaction at `compacted`: events were lost,
    /// so every waiter that has not seen that revision wakes and retries
    /// (and asks afresh: the reservations seen may be gone).
    pub(super) fn compacted(&mut self, compacted: i64) {
        self.reserved.clear();
        self.reserved_elsewhere.clear();
        for wake in self.wakes.values() {
            wake.send_if_modified(|v| {
                let bump = *v < compacted;
                if bump {
                    *v = compacted;
                }
                bump
            });
        }
    }
}

/// After the watch resumed, a held key read again at `revision`: whether
/// the tenure `token` ends. It does when its key is gone (`found` is
/// `None`) or is another tenure's; a tenure granted after the read began is
/// not judged by it.
fn recheck_ends(token: u64, found: Option<i64>, revision: i64) -> bool {
    let ours = found == Some(token as i64);
    !ours && token as i64 <= revision
}

impl Inner {
    /// The one watch over the namespace: wakes waiters when a key is
    /// deleted, and ends a tenure whose key was deleted from outside.
    pub(super) async fn watcher(self: Arc<Self>, mut next: i64) {
        let mut retry = RETRY_MIN;
        let mut resumed = false;
        let prefix = self.prefix.as_bytes().to_vec();
        let range_end = self.layout.watch_end();
        while !self.stop.is_cancelled() {
            let Some(conn) = self.stream_client(Use::Watch).await else {
                if !self.pause(retry).await {
                    return;
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            };
            let (watches, requests) = mpsc::channel(1);
            let create = WatchCreateRequest {
                key: prefix.clone(),
                range_end: range_end.clone(),
                start_revision: next,
                progress_notify: true,
                ..WatchCreateRequest::default()
            };
            let _ = watches.try_send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
            });
            let mut client = conn.watch();
            let open = client.watch(conn.request(outbound(requests)));
            let opened = tokio::select! {
                _ = self.stop.cancelled() => return,
                opened = timeout(self.request_timeout, open) => opened,
            };
            let mut stream = match opened {
                Ok(Ok(stream)) => {
                    if resumed {
                        // Events between the break and now may have been
                        // compacted away (the watch then resumes after
                        // them): read the held keys again.
                        tokio::spawn(self.clone().recheck_held());
                    }
                    resumed = true;
                    stream.into_inner()
                }
                outcome => {
                    let why = self.stream_failed(Use::Watch, &conn, outcome).await;
                    debug!(node = %self.node, %why, retry_in = ?retry, "cannot open the etcd watch");
                    if !self.pause(retry).await {
                        return;
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    _ = self.stop.cancelled() => return,
                    message = stream.message() => message,
                };
                match message {
                    Ok(Some(resp)) => {
                        retry = RETRY_MIN;
                        if resp.canceled {
                            if resp.compact_revision > 0 {
                                next = resp.compact_revision;
                                self.lock().compacted(next);
                                // Member keys may have changed unseen.
                                self.fleet.bump();
                            } else if !conn.reauthenticate().await {
                                self.members.failed(Use::Watch, false);
                            }
                            debug!(node = %self.node, reason = resp.cancel_reason, "etcd watch canceled; reopening");
                            break;
                        }
                        for event in &resp.events {
                            if let Some(kv) = &event.kv {
                                next = next.max(kv.mod_revision + 1);
                                self.on_event(event.r#type(), kv);
                            }
                        }
                        if resp.events.is_empty()
                            && !resp.created
                            && let Some(header) = &resp.header
                        {
                            next = next.max(header.revision + 1);
                        }
                    }
                    Ok(None) => {
                        self.members.failed(Use::Watch, false);
                        break;
                    }
                    Err(e) => {
                        // A broken stream: the member may have lost its
                        // leader (watches need one), restarted, or stopped
                        // answering HTTP/2 pings. Another member, then.
                        self.members
                            .failed(Use::Watch, classify(&e, Call::Request).silent());
                        debug!(node = %self.node, why = %reason(&e), "etcd watch broke; reopening on the next member");
                        break;
                    }
                }
            }
            drop(watches);
            if !self.pause(retry).await {
                return;
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// Reads every held key (after the watch resumed: a deletion in a
    /// compacted gap was never seen) and ends each tenure whose key is gone
    /// or is no longer the one the tenure created. Retried until etcd
    /// answers or the session stops.
    async fn recheck_held(self: Arc<Self>) {
        let held: Vec<(Arc<str>, u64)> = {
            let state = self.lock();
            state
                .held
                .iter()
                .map(|(id, h)| (id.clone(), h.token))
                .collect()
        };
        for chunk in held.chunks(MAX_OPS_PER_TXN) {
            let txn = TxnRequest {
                compare: Vec::new(),
                success: chunk
                    .iter()
                    .map(|(id, _)| {
                        one_op(request_op::Request::RequestRange(RangeRequest {
                            key: self.key(id).into_bytes(),
                            keys_only: true,
                            ..RangeRequest::default()
                        }))
                    })
                    .collect(),
                failure: Vec::new(),
            };
            let mut retry = RETRY_MIN;
            let resp = loop {
                let send = |c: Conn| {
                    let request = c.request(txn.clone());
                    async move { c.kv().txn(request).await }
                };
                if let Ok(Ok(resp)) = self.request(send).await {
                    break resp;
                }
                if !self.pause(retry).await {
                    return;
                }
                retry = (retry * 2).min(RETRY_MAX);
            };
            let revision = resp.header.map(|h| h.revision).unwrap_or(0);
            for ((id, token), answer) in chunk.iter().zip(resp.responses) {
                let Some(response_op::Response::ResponseRange(range)) = answer.response else {
                    continue;
                };
                let found = range.kvs.first().map(|kv| kv.create_revision);
                if recheck_ends(*token, found, revision) {
                    self.end_tenure(id, *token);
                }
            }
        }
    }

    /// Ends the tenure of `id` with `token`, if it still runs: its key was
    /// deleted or replaced from outside.
    fn end_tenure(&self, id: &str, token: u64) {
        if self.lock().end_tenure(id, token) {
            warn!(node = %self.node, id, token, "the key of a held id was deleted or replaced in etcd: tenure ended");
            self.bump();
        }
    }

    fn on_event(&self, kind: EventType, kv: &KeyValue) {
        let id = match self.layout.kind(&kv.key) {
            Some(KeyKind::Id(id)) => id,
            Some(KeyKind::Member(node)) => {
                if node == self.node && kind == EventType::Delete {
                    self.fleet.rewrite();
                }
                return self.fleet.bump();
            }
            Some(KeyKind::Reservation(id)) => {
                let mut state = self.lock();
                match kind {
                    // Seen before the deletion of the id's key (the release
                    // puts it first): the waiter it wakes takes the id at
                    // once.
                    EventType::Put => {
                        let for_me = kv.value == self.node.as_bytes();
                        state.reservation_put(id, for_me, kv.mod_revision);
                    }
                    // A reservation taken, or lapsed: the id may be free.
                    EventType::Delete => state.reservation_deleted(id, kv.mod_revision),
                }
                return;
            }
            Some(KeyKind::Other) | None => return,
        };
        let lost = self
            .lock()
            .on_event(kind, id, kv.create_revision, kv.mod_revision);
        if let Some(token) = lost {
            self.end_tenure(id, token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use tokio::sync::watch;

    use crate::backend::kit::tenures::Tenure;
    use crate::backend::{LeaseEnd, LeaseSignal};

    /// A state holding `a` created at revision 10, with a waiter on `b`.
    fn state() -> (State, LeaseSignal, watch::Receiver<i64>) {
        let mut state = State::default();
        let signal = LeaseSignal::new();
        state.held.insert(
            Arc::from("a"),
            Tenure::new(10, Duration::ZERO, signal.clone()),
        );
        state.expect(&Arc::from("b"));
        let wake = state.wakes["b"].subscribe();
        (state, signal, wake)
    }

    #[test]
    fn a_deletion_after_our_key_ends_the_tenure() {
        let (mut state, _, _) = state();
        assert_eq!(state.on_event(EventType::Delete, "a", 0, 12), Some(10));
        // A lagging watch's deletion of an older key of the id does not.
        assert_eq!(state.on_event(EventType::Delete, "a", 0, 9), None);
        // Neither do other ids' events.
        assert_eq!(state.on_event(EventType::Delete, "c", 0, 12), None);
        assert_eq!(state.on_event(EventType::Put, "c", 12, 12), None);
    }

    #[test]
    fn a_key_created_after_ours_ends_the_tenure() {
        let (mut state, _, _) = state();
        assert_eq!(state.on_event(EventType::Put, "a", 10, 10), None, "ours");
        assert_eq!(state.on_event(EventType::Put, "a", 7, 8), None, "older");
        assert_eq!(state.on_event(EventType::Put, "a", 11, 11), Some(10));
    }

    #[test]
    fn the_event_only_names_the_tenure_ending_it_is_the_caller() {
        let (mut state, signal, _) = state();
        assert_eq!(state.on_event(EventType::Delete, "a", 0, 12), Some(10));
        assert!(signal.ended_with().is_none());
        assert!(state.end_tenure("a", 10));
        assert_eq!(signal.ended_with(), Some(LeaseEnd::Lost));
        assert_eq!(state.on_event(EventType::Delete, "a", 0, 13), None);
    }

    #[test]
    fn a_deletion_wakes_the_waiter_once_per_newer_revision() {
        let (mut state, _, mut wake) = state();
        state.on_event(EventType::Delete, "b", 0, 20);
        assert!(wake.has_changed().unwrap());
        assert_eq!(*wake.borrow_and_update(), 20);
        // An older deletion (a lagging watch) changes nothing.
        state.on_event(EventType::Delete, "b", 0, 15);
        assert!(!wake.has_changed().unwrap());
        // A put never wakes anyone.
        state.on_event(EventType::Put, "b", 30, 30);
        assert!(!wake.has_changed().unwrap());
    }

    #[test]
    fn a_reservation_gone_wakes_the_waiter_and_ends_no_tenure() {
        let (mut state, signal, mut wake) = state();
        state.wake("b", 21);
        assert_eq!(*wake.borrow_and_update(), 21);
        state.wake("b", 21);
        assert!(!wake.has_changed().unwrap(), "once per revision");
        state.wake("a", 22);
        assert!(signal.ended_with().is_none());
        assert_eq!(state.on_event(EventType::Delete, "a", 0, 23), Some(10));
    }

    #[test]
    fn a_reservation_for_this_node_is_taken_once_and_goes_with_its_deletion() {
        let (mut state, _, mut wake) = state();
        state.reservation_put("b", true, 20);
        assert!(
            !wake.has_changed().unwrap(),
            "the deletion of the key wakes"
        );
        assert_eq!(state.take_reservation("b"), Some(20));
        assert_eq!(state.take_reservation("b"), None, "once");
        // Another node's reservation replaces this node's.
        state.reservation_put("b", true, 21);
        state.reservation_put("b", false, 22);
        assert_eq!(state.take_reservation("b"), None);
        // Taken or lapsed: gone, and the waiter wakes.
        state.reservation_put("b", true, 23);
        state.reservation_deleted("b", 24);
        assert_eq!(state.take_reservation("b"), None);
        assert_eq!(*wake.borrow_and_update(), 24);
        // A compaction may have hidden its deletion: asked afresh.
        state.reservation_put("b", true, 25);
        state.compacted(30);
        assert_eq!(state.take_reservation("b"), None);
    }

    #[test]
    fn a_handoff_to_another_node_wakes_nobody_until_its_reservation_goes() {
        let (mut state, _, mut wake) = state();
        // The handoff: the reservation for "z", then the key deleted.
        state.reservation_put("b", false, 20);
        state.on_event(EventType::Delete, "b", 0, 20);
        assert!(!wake.has_changed().unwrap(), "not free for this node");
        assert_eq!(state.take_reservation("b"), None);
        // Taken (or lapsed): the waiter asks again.
        state.reservation_deleted("b", 21);
        assert_eq!(*wake.borrow_and_update(), 21);
        // A later release of the id wakes it as any deletion does.
        state.on_event(EventType::Delete, "b", 0, 30);
        assert_eq!(*wake.borrow_and_update(), 30);
        // A handoff to this node wakes it at the deletion.
        state.reservation_put("b", true, 40);
        state.on_event(EventType::Delete, "b", 0, 40);
        assert_eq!(*wake.borrow_and_update(), 40);
    }

    #[test]
    fn a_compaction_wakes_every_waiter_behind_it() {
        let (mut state, _, mut wake) = state();
        state.compacted(40);
        assert_eq!(*wake.borrow_and_update(), 40);
        state.compacted(30);
        assert!(!wake.has_changed().unwrap(), "never backwards");
    }

    #[test]
    fn a_recheck_ends_tenures_whose_key_is_gone_or_another() {
        assert!(!recheck_ends(10, Some(10), 50), "still ours");
        assert!(recheck_ends(10, None, 50), "gone");
        assert!(recheck_ends(10, Some(30), 50), "re-created");
        assert!(!recheck_ends(60, None, 50), "granted after the read began");
    }
}
