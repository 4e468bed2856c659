//! Membership: who is connected in this namespace, what each announced,
//! and noticing when that changes.
//!
//! A member is a session holding a presence lock of the namespace (as the
//! member lookup always read them); its profile is the `highlander_members`
//! row naming that presence number, so a row counts exactly as long as its
//! session lives, and a crashed node's row stops counting the moment the
//! server ends its session, with no cleanup. The ids of a profile live in
//! `highlander_catalogs`, one row per distinct list, keyed by its digest:
//! announcing an unchanged catalog, or one another node stored already,
//! sends no ids, and a node reads each catalog once (it keeps them by
//! digest).
//!
//! Changes are noticed three ways: the `m` notification on the namespace's
//! channel (a session connected, announced or left), the probe (a watched
//! member's presence lock came free: it died), and this session's own
//! reconnects.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::sleep;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tracing::{debug, warn};

use super::errors::query_error;
use super::sql;
use super::state::{Inner, LiveInfo};
use crate::Result;
use crate::backend::{Catalog, Member, Profile};

/// How many times a lookup or an announce is tried again when a catalog
/// went away under it (a concurrent announce replaced the profile naming
/// it).
const TRIES: usize = 3;

/// What one session knows of the members.
#[derive(Default)]
pub(super) struct Membership {
    /// The latest profile this node announced, published again after a
    /// reconnect.
    pub(super) profile: Option<Profile>,
    /// Catalogs read from the server, by digest; only those the latest
    /// lookup named are kept.
    catalogs: HashMap<u64, Catalog>,
    /// The other members' presence numbers, which the probe watches: one
    /// that comes free is a member that died.
    watched: HashSet<i32>,
    /// Lookups of the presence numbers, numbered: the last sent and the
    /// last applied (an older answer never overwrites a newer one).
    sent: u64,
    applied: u64,
}

impl Membership {
    /// The presence numbers the probe watches.
    pub(super) fn watched(&self) -> impl Iterator<Item = i32> + '_ {
        self.watched.iter().copied()
    }

    /// The probe found `owner`'s presence lock free: whether it was a
    /// watched member (then the members changed).
    pub(super) fn forget(&mut self, owner: i32) -> bool {
        self.watched.remove(&owner)
    }

    /// A lookup of the presence numbers is sent now: its number.
    pub(super) fn lookup_sent(&mut self) -> u64 {
        self.sent += 1;
        self.sent
    }

    /// The lookup numbered `seq` found the other members' presence numbers
    /// `owners`: they are watched from now on, unless a later lookup was
    /// applied already. Returns whether the set differs from the one
    /// watched (a member joined or left since: the members changed).
    pub(super) fn owners_found(&mut self, seq: u64, owners: HashSet<i32>) -> bool {
        if seq <= self.applied {
            return false;
        }
        self.applied = seq;
        let changed = owners != self.watched;
        self.watched = owners;
        changed
    }

    /// The connection is gone: nothing is watched, and the answers of
    /// lookups sent on it are ignored.
    pub(super) fn connection_lost(&mut self) {
        self.watched.clear();
        self.applied = self.sent;
    }
}

/// What a member row of the lookup holds: its profile, if its node name
/// fits the session's.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Announced {
    pub(super) node: String,
    pub(super) weight: i64,
    pub(super) labels: Vec<String>,
    pub(super) digest: u64,
}

/// A row of [`sql::MEMBERS`]: one session holding a presence lock.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MemberRow {
    /// The session's `application_name` (the node name, cut by the
    /// server to 63 bytes).
    pub(super) app: String,
    pub(super) address: Option<String>,
    pub(super) owner: i32,
    pub(super) announced: Option<Announced>,
}

impl MemberRow {
    fn of(row: &Row) -> MemberRow {
        let node: Option<String> = row.get(3);
        let announced = node.map(|node| Announced {
            node,
            weight: row.get(4),
            labels: row.get(5),
            digest: row.get::<_, i64>(6) as u64,
        });
        MemberRow {
            app: row.get::<_, Option<String>>(0).unwrap_or_default(),
            address: row.get(1),
            owner: row.get::<_, i64>(2) as u32 as i32,
            announced,
        }
    }

    /// The profile row, when it is this session's node's: its node name
    /// starts with what the session calls itself (a number drawn again by
    /// another node must not lend it a stranger's profile).
    fn profile_row(&self) -> Option<&Announced> {
        self.announced
            .as_ref()
            .filter(|a| a.node.starts_with(&self.app))
    }
}

/// The catalogs the rows name that `have` lacks, each once.
pub(super) fn needed(rows: &[MemberRow], have: &HashMap<u64, Catalog>) -> Vec<u64> {
    let mut digests: Vec<u64> = rows
        .iter()
        .filter_map(|r| r.profile_row().map(|a| a.digest))
        .filter(|d| !have.contains_key(d))
        .collect();
    digests.sort_unstable();
    digests.dedup();
    digests
}

/// The members the rows describe, sorted by node name, one per name (a
/// session with a profile wins over one without: a node still draining an
/// old connection while its new one announced). A member whose catalog is
/// not in `catalogs` shows no profile.
pub(super) fn assemble(rows: &[MemberRow], catalogs: &HashMap<u64, Catalog>) -> Vec<Member> {
    let mut by_node: HashMap<String, Member> = HashMap::new();
    for row in rows {
        let profile = row.profile_row().and_then(|a| {
            let catalog = catalogs.get(&a.digest)?.clone();
            let weight = u32::try_from(a.weight.max(0)).unwrap_or(u32::MAX);
            Some((
                a.node.clone(),
                Profile::new(weight, a.labels.clone(), catalog),
            ))
        });
        let (node, profile) = match profile {
            Some((node, profile)) => (node, Some(profile)),
            None => (row.app.clone(), None),
        };
        let member = Member {
            node: node.clone(),
            reachable: true,
            address: row.address.clone(),
            profile,
        };
        match by_node.get(&node) {
            Some(seen) if seen.profile.is_some() || member.profile.is_none() => {}
            _ => {
                by_node.insert(node, member);
            }
        }
    }
    let mut members: Vec<Member> = by_node.into_values().collect();
    members.sort_by(|a, b| a.node.cmp(&b.node));
    members
}

/// The namespace key as `pg_locks` shows it (unsigned).
fn unsigned_namespace_key(inner: &Inner) -> i64 {
    i64::from(inner.settings.namespace_key as u32)
}

/// Every live member of the namespace, with its profile: one round trip,
/// and one more for the catalogs this session has not read yet. The
/// presence numbers found are watched from now on.
pub(super) async fn lookup(inner: &Inner, live: &LiveInfo) -> Result<Vec<Member>> {
    let settings = &inner.settings;
    let ns = unsigned_namespace_key(inner);
    let failed = |e| query_error(settings, "member lookup", e);
    let mut tries = 0;
    loop {
        tries += 1;
        let seq = inner.lock().members.lookup_sent();
        let rows = live
            .client
            .query(&live.stmts.members, &[&ns, &settings.namespace])
            .await
            .map_err(failed)?;
        let rows: Vec<MemberRow> = rows.iter().map(MemberRow::of).collect();
        let missing = needed(&rows, &inner.lock().members.catalogs);
        let mut read = HashMap::new();
        if !missing.is_empty() {
            let digests: Vec<i64> = missing.iter().map(|&d| d as i64).collect();
            let found = live
                .client
                .query(&live.stmts.catalogs, &[&settings.namespace, &digests])
                .await
                .map_err(failed)?;
            for row in &found {
                let ids: Vec<String> = row.get(1);
                read.insert(row.get::<_, i64>(0) as u64, Catalog::new(ids));
            }
        }
        let owners: HashSet<i32> = rows
            .iter()
            .map(|r| r.owner)
            .filter(|&o| o != live.me)
            .collect();
        let (members, changed, complete) = {
            let mut st = inner.lock();
            let m = &mut st.members;
            m.catalogs.extend(read);
            let complete = needed(&rows, &m.catalogs).is_empty();
            let members = assemble(&rows, &m.catalogs);
            let named: HashSet<u64> = rows
                .iter()
                .filter_map(|r| r.profile_row().map(|a| a.digest))
                .collect();
            m.catalogs.retain(|d, _| named.contains(d));
            (members, m.owners_found(seq, owners), complete)
        };
        if changed {
            inner.members_changed();
        }
        // A catalog gone between the two reads belonged to a profile
        // replaced meanwhile: read again.
        if complete || tries >= TRIES {
            return Ok(members);
        }
    }
}

/// Refreshes the presence numbers the probe watches (after a membership
/// notification, and when a connection comes up): the lookup's number,
/// then its answer for [`owners_found`](Membership::owners_found).
pub(super) async fn watch_owners(
    inner: Arc<Inner>,
    live: LiveInfo,
    seq: u64,
) -> (
    u64,
    std::result::Result<HashSet<i32>, tokio_postgres::Error>,
) {
    let ns = unsigned_namespace_key(&inner);
    let result = live
        .client
        .query(&live.stmts.member_owners, &[&ns])
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| r.get::<_, i64>(0) as u32 as i32)
                .filter(|&o| o != live.me)
                .collect()
        });
    (seq, result)
}

/// A refresh of the watched presence numbers answered: whether it
/// succeeded (the driver tries a failed one again a heartbeat later).
pub(super) fn owners_watched(
    inner: &Inner,
    done: (
        u64,
        std::result::Result<HashSet<i32>, tokio_postgres::Error>,
    ),
) -> bool {
    match done {
        (seq, Ok(owners)) => {
            let changed = inner.lock().members.owners_found(seq, owners);
            if changed {
                inner.members_changed();
            }
            true
        }
        (_, Err(e)) => {
            debug!(node = %inner.node, error = %query_error(&inner.settings, "member watch", e), "member watch failed");
            false
        }
    }
}

/// Publishes `profile` on the connection `live`: the member row (and a
/// notification), and the catalog's ids only when no node stored that
/// catalog yet. Then, in the background, forgets the rows of members whose
/// session ended and the catalogs no row names.
pub(super) async fn publish(inner: &Inner, live: &LiveInfo, profile: &Profile) -> Result<()> {
    let settings = &inner.settings;
    let failed = |e| query_error(settings, "announcing this node's profile", e);
    let weight = i64::from(profile.weight);
    let digest = profile.catalog.digest() as i64;
    let ids: Vec<&str> = profile.catalog.ids().iter().map(|s| &**s).collect();
    // ANNOUNCE_FULL takes the same parameters as the statement that finds
    // the catalog known, and then the ids.
    let head: [&(dyn ToSql + Sync); 7] = [
        &settings.namespace,
        &inner.node,
        &live.me,
        &weight,
        &profile.labels,
        &digest,
        &settings.channel,
    ];
    let full: Vec<&(dyn ToSql + Sync)> = head.iter().copied().chain([&ids as _]).collect();
    let mut tries = 0;
    loop {
        tries += 1;
        let known = live.client.query(&live.stmts.announce_known, &head).await;
        let result = match known {
            Ok(rows) if !rows.is_empty() => Ok(()),
            Ok(_) => live.client.query(sql::ANNOUNCE_FULL, &full).await.map(drop),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => break,
            // The catalog was forgotten between our check and our row.
            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) && tries < TRIES => {}
            Err(e) => return Err(failed(e)),
        }
    }
    let client = live.client.clone();
    let namespace = settings.namespace.clone();
    let (me, key, node) = (live.me, settings.namespace_key, inner.node.clone());
    tokio::spawn(async move {
        // Either may fail harmlessly (a concurrent announce names a
        // catalog again): the next announce tries again.
        let dead = client
            .execute(sql::FORGET_DEAD, &[&namespace, &me, &key])
            .await;
        let catalogs = client.execute(sql::FORGET_CATALOGS, &[&namespace]).await;
        if let (Err(e), _) | (_, Err(e)) = (dead, catalogs) {
            debug!(node = %node, error = %e, "forgetting old members and catalogs failed");
        }
    });
    Ok(())
}

/// Publishes the latest profile again on a new connection (the member row
/// names the presence number, which a new connection draws afresh),
/// retrying every second until it succeeds; the driver drops it when the
/// connection is lost.
pub(super) async fn republish(inner: Arc<Inner>, live: LiveInfo) {
    let mut warned = false;
    loop {
        let result = {
            let _turn = inner.announcing.lock().await;
            let Some(profile) = inner.lock().members.profile.clone() else {
                return;
            };
            publish(&inner, &live, &profile).await
        };
        match result {
            Ok(()) => return,
            Err(e) if !warned => {
                warn!(node = %inner.node, "{e}; the other nodes see this node without its profile until it is published again (retrying every second)");
                warned = true;
            }
            Err(e) => debug!(node = %inner.node, error = %e, "publishing the profile again failed"),
        }
        sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(app: &str, owner: i32, announced: Option<(&str, i64, u64)>) -> MemberRow {
        MemberRow {
            app: app.to_string(),
            address: None,
            owner,
            announced: announced.map(|(node, weight, digest)| Announced {
                node: node.to_string(),
                weight,
                labels: vec!["zone=eu".to_string()],
                digest,
            }),
        }
    }

    /// Every session is a member; one with a row of its own shows its
    /// profile with the catalog read; one whose catalog is not read yet
    /// shows none; a row of another node's name lends nothing.
    #[test]
    fn members_come_from_sessions_and_their_rows() {
        let cat = Catalog::new(["x", "y"]);
        let rows = vec![
            row("b", 2, Some(("b", 3, cat.digest()))),
            row("a", 1, None),
            row("c", 3, Some(("zz", 1, cat.digest()))),
            row("d", 4, Some(("d", 1, 99))),
        ];
        let have = HashMap::from([(cat.digest(), cat.clone())]);
        assert_eq!(needed(&rows, &have), vec![99]);
        assert_eq!(needed(&rows, &HashMap::new()), {
            let mut v = vec![99, cat.digest()];
            v.sort_unstable();
            v
        });
        let members = assemble(&rows, &have);
        let names: Vec<&str> = members.iter().map(|m| m.node.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert!(members.iter().all(|m| m.reachable));
        let b = members[1].profile.as_ref().expect("b announced");
        assert_eq!(
            (b.weight, &b.labels[..], &b.catalog),
            (3, &["zone=eu".to_string()][..], &cat)
        );
        assert!(members[0].profile.is_none(), "a announced nothing");
        assert!(members[2].profile.is_none(), "a stranger's row");
        assert!(members[3].profile.is_none(), "catalog not read");
    }

    /// The server cuts a session's name to 63 bytes: the row's full name
    /// wins. Two sessions of one node are one member, the one with a
    /// profile kept; a negative or huge weight is clamped.
    #[test]
    fn names_are_the_rows_and_nodes_appear_once() {
        let long = "n".repeat(80);
        let cat = Catalog::default();
        let rows = vec![
            row(&long[..63], 1, None),
            row(&long[..63], 2, Some((&long, i64::MAX, cat.digest()))),
            row("w", 3, Some(("w", -5, cat.digest()))),
        ];
        let have = HashMap::from([(cat.digest(), cat)]);
        let members = assemble(&rows, &have);
        assert_eq!(members.len(), 3, "{members:?}");
        let m = members.iter().find(|m| m.node == long).expect("full name");
        assert_eq!(m.profile.as_ref().unwrap().weight, u32::MAX);
        assert!(
            members
                .iter()
                .any(|m| m.node == long[..63] && m.profile.is_none())
        );
        let w = members.iter().find(|m| m.node == "w").unwrap();
        assert_eq!(w.profile.as_ref().unwrap().weight, 0);
    }

    /// The watched numbers follow the newest lookup; any difference is a
    /// change; a death the probe finds is a change once; a lost connection
    /// watches nothing and ignores the answers still in flight.
    #[test]
    fn watched_members_follow_the_newest_lookup() {
        let mut m = Membership::default();
        let first = m.lookup_sent();
        let second = m.lookup_sent();
        assert!(m.owners_found(second, HashSet::from([1, 2])));
        assert!(!m.owners_found(first, HashSet::from([1])), "older answer");
        assert!(
            !m.owners_found(second, HashSet::from([1, 2])),
            "applied already"
        );
        let third = m.lookup_sent();
        assert!(!m.owners_found(third, HashSet::from([1, 2])), "no change");
        assert!(m.forget(2));
        assert!(!m.forget(2));
        let mut w: Vec<i32> = m.watched().collect();
        w.sort_unstable();
        assert_eq!(w, [1]);
        let fourth = m.lookup_sent();
        assert!(m.owners_found(fourth, HashSet::from([1, 3])), "3 joined");
        let late = m.lookup_sent();
        m.connection_lost();
        assert_eq!(m.watched().count(), 0);
        assert!(!m.owners_found(late, HashSet::from([7])));
        let next = m.lookup_sent();
        assert!(m.owners_found(next, HashSet::from([7])));
    }
}
