//! The [`Session`] one node's guardians use: claims and releases are queued
//! for the driver task (which batches them on the one connection), lookups
//! and announces run on the connection directly (see `members`), and
//! `close` releases everything and leaves.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::config::Settings;
use super::connect::open;
use super::driver::drive;
use super::errors::{query_error, unreachable};
use super::keys::lock_key;
use super::members;
use super::sql;
use super::state::{Inner, LiveInfo, PendingClaim, PendingRelease, State};
use crate::Result;
use crate::backend::{Claim, ClaimRequest, HeldId, Holder, LeaseEnd, Member, Profile, Session};
use crate::service::BoxFuture;

pub(crate) struct PgSession {
    inner: Arc<Inner>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

impl PgSession {
    /// Connects once, or fails with an error whose kind tells the
    /// runtime's start-up policy whether to try again (an unreachable
    /// server) or to stop (bad credentials, a missing database, refused
    /// TLS). Once connected, a lost connection is retried in the background
    /// by the driver.
    pub(crate) async fn connect(settings: Arc<Settings>, node: String) -> Result<PgSession> {
        let inner = Arc::new(Inner {
            settings,
            node,
            state: Mutex::new(State::default()),
            kick: Notify::new(),
            stop: CancellationToken::new(),
            members_tx: watch::channel(0).0,
            announcing: tokio::sync::Mutex::new(()),
        });
        let live = open(&inner).await?;
        // Connected from the first moment: claims and lookups made right
        // after start-up must not find the session "not connected" while
        // the driver task is being scheduled.
        inner.lock().live = Some(live.info());
        info!(node = %inner.node, backend = %inner.settings.describe, owner = live.me, "connected to postgres");
        let driver = tokio::spawn(drive(inner.clone(), live));
        Ok(PgSession {
            inner,
            driver: Mutex::new(Some(driver)),
        })
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        if let Some(driver) = self.driver.lock().unwrap_or_else(|e| e.into_inner()).take() {
            driver.abort();
        }
    }
}

/// A lookup made on the connection directly, outside the driver.
#[derive(Clone, Copy)]
enum Lookup {
    Holder { key: i64 },
    Holders,
}

impl Lookup {
    /// Its rows, or an error naming the lookup; the namespace key goes as
    /// an unsigned number, as `pg_locks` shows it.
    async fn rows(self, inner: &Inner, live: Result<LiveInfo>) -> Result<Vec<Row>> {
        let live = live?;
        let ns = i64::from(inner.settings.namespace_key as u32);
        let (what, rows) = match self {
            Lookup::Holder { key } => (
                "holder lookup",
                live.client.query(&live.stmts.holder, &[&key, &ns]).await,
            ),
            Lookup::Holders => (
                "holder listing",
                live.client
                    .query(sql::HOLDERS, &[&inner.settings.namespace, &ns])
                    .await,
            ),
        };
        rows.map_err(|e| query_error(&inner.settings, what, e))
    }
}

impl PgSession {
    /// Queues the release of this tenure of `id` (to `to`, when given).
    fn release_for(&self, id: &str, token: u64, to: Option<Arc<str>>) -> BoxFuture<'_, Result<()>> {
        let inner = &self.inner;
        let key = lock_key(&inner.settings.namespace, id);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.lock();
            // Only this tenure's release: an older one's must not end a newer.
            if st.held.remove_if(&key, token).is_none() {
                return Box::pin(async { Ok(()) });
            }
            if st.live.is_none() {
                // The session that held it is gone: the server frees it.
                return Box::pin(async { Ok(()) });
            }
            st.releases.push(PendingRelease {
                keys: vec![key],
                to,
                reply: Some(tx),
                failures: 0,
            });
        }
        inner.kick.notify_one();
        Box::pin(async move { rx.await.unwrap_or(Ok(())) })
    }
}

impl Session for PgSession {
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>> {
        let inner = &self.inner;
        let key = lock_key(&inner.settings.namespace, &request.id);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.lock();
            if st.live.is_none() {
                let err = inner.not_connected(&st);
                return Box::pin(async move { Err(err) });
            }
            st.claims.push(PendingClaim {
                id: request.id,
                key,
                budget: request.stop_budget,
                reply: tx,
                retries: 0,
            });
        }
        inner.kick.notify_one();
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(unreachable(format!(
                    "postgres at {}: the connection was lost while claiming",
                    inner.settings.target
                )))
            })
        })
    }

    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, Result<()>> {
        self.release_for(id, token, None)
    }

    /// Releases as `release` does, reserving the id for `node` for a
    /// moment ([`RESERVATION`](super::batch::RESERVATION), on the server's
    /// clock): the other nodes' claims are refused meanwhile. The
    /// reservation never lets a claim take a held row, so it cannot make
    /// two holders.
    fn release_to(&self, id: &str, token: u64, node: &str) -> BoxFuture<'_, Result<()>> {
        self.release_for(id, token, Some(node.into()))
    }

    fn holder(&self, id: &str) -> BoxFuture<'_, Result<Option<Holder>>> {
        let inner = &self.inner;
        let key = lock_key(&inner.settings.namespace, id);
        let live = inner.live();
        Box::pin(async move {
            let rows = Lookup::Holder { key }.rows(inner, live).await?;
            Ok(rows
                .first()
                .map(|row| holder_of(row.get(0), row.get(1), row.get(2))))
        })
    }

    fn members(&self) -> BoxFuture<'_, Result<Vec<Member>>> {
        let inner = &self.inner;
        let live = inner.live();
        Box::pin(async move { members::lookup(inner, &live?).await })
    }

    /// Stores the profile (published again after every reconnect), then
    /// publishes it: one round trip when its catalog is stored already,
    /// two (with the ids) when not.
    fn announce(&self, profile: Profile) -> BoxFuture<'_, Result<()>> {
        let inner = &self.inner;
        Box::pin(async move {
            let _turn = inner.announcing.lock().await;
            inner.lock().members.profile = Some(profile.clone());
            let live = inner.live()?;
            members::publish(inner, &live, &profile).await
        })
    }

    fn members_changed(&self) -> BoxFuture<'static, ()> {
        let mut rx = self.inner.members_tx.subscribe();
        Box::pin(async move {
            // A closed channel (the session is gone) counts as a change.
            let _ = rx.changed().await;
        })
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<HeldId>>> {
        let inner = &self.inner;
        let live = inner.live();
        Box::pin(async move {
            let rows = Lookup::Holders.rows(inner, live).await?;
            Ok(rows
                .iter()
                .map(|row| {
                    HeldId::new(
                        row.get::<_, String>(0),
                        holder_of(row.get(1), row.get(2), row.get(3)),
                        row.get::<_, Option<SystemTime>>(4),
                    )
                })
                .collect())
        })
    }

    fn lease_deadline(&self) -> Option<std::time::Instant> {
        let st = self.inner.lock();
        match (&st.live, st.deadline) {
            (Some(_), Some(at)) if !st.held.is_empty() => Some(at.into_std()),
            _ => None,
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            let rx = {
                let mut st = inner.lock();
                let keys: Vec<i64> = st.held.keys().copied().collect();
                if st.live.is_some() && !keys.is_empty() {
                    let (tx, rx) = oneshot::channel();
                    st.releases.push(PendingRelease {
                        keys,
                        to: None,
                        reply: Some(tx),
                        failures: 0,
                    });
                    Some(rx)
                } else {
                    None
                }
            };
            inner.kick.notify_one();
            if let Some(rx) = rx {
                let _ = timeout(Duration::from_secs(5), rx).await;
            }
            // Tell the others this node left, without waiting for the
            // connection to close (a failure changes nothing: closing it
            // says the same, a little later).
            if let Ok(live) = inner.live() {
                let settings = &inner.settings;
                let params: [&(dyn ToSql + Sync); 4] = [
                    &settings.namespace_key,
                    &live.me,
                    &settings.channel,
                    &settings.namespace,
                ];
                let leave = live.client.query(sql::LEAVE, &params);
                let _ = timeout(Duration::from_secs(2), leave).await;
            }
            inner.stop.cancel();
            let driver = self.driver.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(driver) = driver {
                let _ = timeout(Duration::from_secs(5), driver).await;
            }
            let mut st = inner.lock();
            st.held.end_all(LeaseEnd::Lost);
        })
    }
}

/// The holder named by a lease row: the node name the row records, unless
/// the holding session's `application_name` (which the server cuts to 63
/// bytes) says otherwise.
fn holder_of(token: i64, app: Option<String>, node: Option<String>) -> Holder {
    let app = app.unwrap_or_default();
    let node = match node {
        Some(n) if n.starts_with(&app) => n,
        _ => app,
    };
    Holder::new(node, Some(token as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row's node name, unless the session holding the row is another
    /// node's (a name the server cut to 63 bytes still matches).
    #[test]
    fn holders_are_named_by_their_session() {
        let long = "n".repeat(80);
        assert_eq!(
            holder_of(4, Some(long[..63].to_string()), Some(long.clone())),
            Holder::new(long, Some(4))
        );
        assert_eq!(
            holder_of(4, Some("b".into()), Some("a".into())),
            Holder::new("b", Some(4))
        );
        assert_eq!(
            holder_of(4, None, Some("a".into())),
            Holder::new("a", Some(4))
        );
        assert_eq!(holder_of(4, None, None), Holder::new("", Some(4)));
    }
}
