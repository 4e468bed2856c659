//! What a session's handles share with its driver task: the claims and
//! releases waiting to be sent, the tenures held, the waiting claims, what
//! this node knows of the members, and the connection in use now.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use super::config::Settings;
use super::errors::unreachable;
use super::members::Membership;
use super::waiters::Waiters;
use crate::backend::kit::tenures::Tenures;
use crate::backend::{Claim, LeaseEnd};
use crate::{Error, Result};

pub(super) struct Inner {
    pub(super) settings: Arc<Settings>,
    pub(super) node: String,
    pub(super) state: Mutex<State>,
    /// Wakes the driver: new claims or releases are pending.
    pub(super) kick: Notify,
    /// Cancelled by `close` (and on drop): the driver stops.
    pub(super) stop: CancellationToken,
    /// Bumped whenever the members may answer differently
    /// (`Session::members_changed` waits on it).
    pub(super) members_tx: watch::Sender<u64>,
    /// Held while a profile is being published, so that the latest one is
    /// the last one sent.
    pub(super) announcing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
pub(super) struct State {
    /// Set while connected: what `holder` and `members` use.
    pub(super) live: Option<LiveInfo>,
    /// Why the session is not connected, for errors while disconnected.
    pub(super) last_error: Option<String>,
    pub(super) claims: Vec<PendingClaim>,
    pub(super) releases: Vec<PendingRelease>,
    /// Tenures of this node, by lock key.
    pub(super) held: Tenures<i64>,
    /// Waiting claims, and the owners' moves seen by the claim in flight.
    pub(super) waiters: Waiters,
    /// While this node holds ids: when it must give them all up unless a
    /// round trip succeeds first (published by the driver on every turn).
    pub(super) deadline: Option<Instant>,
    /// Keys whose row is known to exist (rows are never deleted).
    pub(super) known: HashSet<i64>,
    /// This node's profile, the catalogs read, the members watched.
    pub(super) members: Membership,
}

/// The connection's handles, for the lookups made outside the driver.
#[derive(Clone)]
pub(super) struct LiveInfo {
    pub(super) client: Arc<Client>,
    pub(super) stmts: Arc<Statements>,
    /// This session's presence number.
    pub(super) me: i32,
}

pub(super) struct PendingClaim {
    pub(super) id: Arc<str>,
    pub(super) key: i64,
    pub(super) budget: Duration,
    pub(super) reply: oneshot::Sender<Result<Claim>>,
    pub(super) retries: u8,
}

pub(super) struct PendingRelease {
    pub(super) keys: Vec<i64>,
    /// The node the keys are released to (`release_to`), if any.
    pub(super) to: Option<Arc<str>>,
    pub(super) reply: Option<oneshot::Sender<Result<()>>>,
    pub(super) failures: u8,
}

/// The statements prepared on each connection.
pub(super) struct Statements {
    pub(super) insert: Statement,
    pub(super) claim: Statement,
    pub(super) status: Statement,
    pub(super) probe: Statement,
    pub(super) release: Statement,
    pub(super) holder: Statement,
    pub(super) members: Statement,
    pub(super) member_owners: Statement,
    pub(super) catalogs: Statement,
    pub(super) announce_known: Statement,
}

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection now, or why there is none.
    pub(super) fn live(&self) -> Result<LiveInfo> {
        let st = self.lock();
        st.live.clone().ok_or_else(|| self.not_connected(&st))
    }

    pub(super) fn not_connected(&self, st: &State) -> Error {
        unreachable(match &st.last_error {
            Some(why) => format!("not connected to postgres ({why})"),
            None => format!("not connected to postgres at {}", self.settings.target),
        })
    }

    /// Ends the epoch: every tenure is lost, every waiting claim and waiter
    /// is woken (to find the session disconnected), and so is every wait
    /// for a membership change.
    pub(super) fn lose(&self, why: &str) {
        let message = format!("postgres at {}: {why}", self.settings.target);
        self.lock().lose(message);
        self.members_changed();
    }

    /// The members may answer differently now: wakes `members_changed`.
    pub(super) fn members_changed(&self) {
        self.members_tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl State {
    /// The connection is gone, for the reason `message`: every tenure is
    /// lost, claims waiting to be sent fail with the reason, releases
    /// succeed (the server frees what the ended session held), and waiting
    /// claims are woken.
    pub(super) fn lose(&mut self, message: String) {
        self.live = None;
        self.held.end_all(LeaseEnd::Lost);
        for claim in self.claims.drain(..) {
            let _ = claim.reply.send(Err(unreachable(message.clone())));
        }
        for release in self.releases.drain(..) {
            if let Some(reply) = release.reply {
                let _ = reply.send(Ok(()));
            }
        }
        self.waiters.connection_lost();
        self.members.connection_lost();
        self.last_error = Some(message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackendErrorKind;
    use crate::backend::Lease;
    use crate::backend::kit::tenures::Tenure;

    #[test]
    fn losing_the_connection_ends_everything_pending() {
        let mut st = State::default();
        let (lease, signal) = Lease::new(3);
        st.held.insert(1, Tenure::new(3, Duration::ZERO, signal));
        let (tx, mut claim) = oneshot::channel();
        st.claims.push(PendingClaim {
            id: "a".into(),
            key: 2,
            budget: Duration::ZERO,
            reply: tx,
            retries: 0,
        });
        let (tx, mut release) = oneshot::channel();
        st.releases.push(PendingRelease {
            keys: vec![4],
            to: None,
            reply: Some(tx),
            failures: 0,
        });
        let mut waiter = st.waiters.wait(9, 5);
        st.lose("postgres at db:5432/app as app: gone".to_string());
        assert!(st.held.is_empty() && st.claims.is_empty() && st.releases.is_empty());
        assert!(st.waiters.is_empty());
        assert_eq!(lease.signal.ended_with(), Some(LeaseEnd::Lost));
        match claim.try_recv() {
            Ok(Err(e)) => {
                assert_eq!(e.to_string(), "postgres at db:5432/app as app: gone");
                assert_eq!(e.kind(), Some(BackendErrorKind::Unreachable));
            }
            _ => panic!("the claim fails with the reason"),
        }
        assert!(matches!(release.try_recv(), Ok(Ok(()))));
        assert!(waiter.try_recv().is_err());
        assert_eq!(
            st.last_error.as_deref(),
            Some("postgres at db:5432/app as app: gone")
        );
    }
}
