//! Membership and placement on the postgres backend, against a real
//! server: what each node announced (weight, labels, catalog) reaches every
//! other node, a catalog of 100,000 ids is stored once and read back whole,
//! `members_changed` wakes on a join, a leave, a crash and a re-announce
//! (and not while nothing changes), and `release_to` reserves an id for its
//! target for a moment.
//!
//! Every deadline here is a guard against hangs, never a timing assertion.

use std::sync::Arc;
use std::time::Duration;

use highlander::BoxFuture;
use highlander::backend::postgres::Postgres;
use highlander::backend::{Backend, Catalog, Claim, ClaimRequest, Lease, Member, Profile, Session};
use highlander_tests::postgres::PgServer;
use highlander_tests::wait::{GUARD, within};

/// How long `members_changed` must stay pending while nothing changes.
const QUIET: Duration = Duration::from_millis(300);

async fn server() -> PgServer {
    tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("the Postgres harness starts")
}

async fn connect(pg: &PgServer, namespace: &str, node: &str) -> Arc<dyn Session> {
    let backend = Postgres::new(pg.url()).namespace(namespace);
    within(&format!("{node} connected"), GUARD, backend.connect(node))
        .await
        .unwrap_or_else(|e| panic!("{node} connects: {e}"))
}

fn profile(weight: u32, labels: &[&str], ids: impl IntoIterator<Item = String>) -> Profile {
    Profile::new(
        weight,
        labels.iter().map(|l| l.to_string()).collect(),
        Catalog::new(ids),
    )
}

async fn members(session: &Arc<dyn Session>) -> Vec<Member> {
    within("the member lookup", GUARD, session.members())
        .await
        .expect("members answers")
}

fn names(members: &[Member]) -> Vec<&str> {
    members.iter().map(|m| m.node.as_str()).collect()
}

async fn count(pg: &PgServer, sql: &str) -> i64 {
    pg.sql(sql).await[0][0]
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("a count")
}

/// A `members_changed` future that has stayed pending for a while: the
/// changes already under way (notifications, the watch of the new
/// members' sessions) have been told, and this one waits for the next.
async fn settled(session: &Arc<dyn Session>) -> BoxFuture<'static, ()> {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let mut changed = session.members_changed();
        if tokio::time::timeout(QUIET, &mut changed).await.is_err() {
            return changed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang guard: members_changed kept firing for {GUARD:?} with nothing changing"
        );
    }
}

/// Awaits `changed`, which must complete because of what the caller just
/// did.
async fn fires(what: &str, changed: BoxFuture<'static, ()>) {
    within(&format!("members_changed on {what}"), GUARD, changed).await;
}

async fn claim(session: &Arc<dyn Session>, id: &str) -> Claim {
    within(
        &format!("a claim of `{id}`"),
        GUARD,
        session.try_claim(ClaimRequest::new(id, Duration::from_secs(1))),
    )
    .await
    .expect("the claim is answered")
}

fn granted(claim: Claim, what: &str) -> Lease {
    match claim {
        Claim::Granted(lease) => lease,
        other => panic!("{what}: expected a grant, got {other:?}"),
    }
}

/// Three nodes announce different profiles; each sees all three with the
/// weight, labels and catalog each announced, and itself among them. A
/// node that announced nothing is a member without a profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sees_every_profile() {
    let pg = server().await;
    let ns = "profiles";
    let a = connect(&pg, ns, "a").await;
    let b = connect(&pg, ns, "b").await;
    let c = connect(&pg, ns, "c").await;
    let bare = connect(&pg, ns, "d").await;
    let profiles = [
        profile(1, &[], ["x".to_string()]),
        profile(2, &["zone=eu", "ssd"], (0..50).map(|i| format!("b-{i}"))),
        profile(0, &["zone=us"], ["x".to_string(), "y".to_string()]),
    ];
    for (session, p) in [&a, &b, &c].into_iter().zip(&profiles) {
        within("the announce", GUARD, session.announce(p.clone()))
            .await
            .expect("announce succeeds");
    }
    for session in [&a, &b, &c, &bare] {
        let seen = members(session).await;
        assert_eq!(names(&seen), ["a", "b", "c", "d"], "{seen:?}");
        for (member, p) in seen.iter().zip(&profiles) {
            assert_eq!(member.profile.as_ref(), Some(p), "{}", member.node);
            assert!(member.reachable);
        }
        assert_eq!(seen[3].profile, None, "d announced nothing");
    }
    // Another namespace sees none of them.
    let other = connect(&pg, "elsewhere", "z").await;
    assert_eq!(names(&members(&other).await), ["z"]);
}

/// A catalog of 100,000 ids is stored once, read back whole by another
/// node, and not sent again: announcing it again (or from another node)
/// leaves the one stored row, and only the member rows change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_of_100_000_ids_round_trips() {
    let pg = server().await;
    let ns = "big";
    let a = connect(&pg, ns, "a").await;
    let b = connect(&pg, ns, "b").await;
    let big = profile(1, &["big"], (0..100_000).map(|i| format!("tenant-{i:06}")));
    within("the announce", GUARD, a.announce(big.clone()))
        .await
        .expect("announce succeeds");
    let seen = members(&b).await;
    let got = seen[0].profile.as_ref().expect("a's profile");
    assert_eq!(got.catalog.len(), 100_000);
    assert_eq!(got, &big, "the same ids, weight and labels");
    assert!(got.catalog.contains("tenant-099999"));
    let stored = "SELECT count(*) FROM highlander_catalogs WHERE namespace = 'big'";
    assert_eq!(count(&pg, stored).await, 1);
    let size = "SELECT sum(cardinality(ids)) FROM highlander_catalogs WHERE namespace = 'big'";
    assert_eq!(count(&pg, size).await, 100_000);
    // The same catalog again, from a and from b: still one row.
    within("announcing again", GUARD, a.announce(big.clone()))
        .await
        .unwrap();
    within("b announcing the same ids", GUARD, b.announce(big.clone()))
        .await
        .unwrap();
    assert_eq!(count(&pg, stored).await, 1);
    let seen = members(&a).await;
    assert!(
        seen.iter().all(|m| m.profile.as_ref() == Some(&big)),
        "{seen:?}"
    );
}

/// A node adds an id and announces again: the others are woken, and see
/// the new catalog; the catalog nobody names any more is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_announce_after_add_is_seen() {
    let pg = server().await;
    let ns = "readd";
    let a = connect(&pg, ns, "a").await;
    let b = connect(&pg, ns, "b").await;
    a.announce(profile(1, &[], ["x".to_string()]))
        .await
        .unwrap();
    let before = members(&b).await;
    assert_eq!(before[0].profile.as_ref().unwrap().catalog.ids().len(), 1);
    let changed = settled(&b).await;
    let added = profile(1, &[], ["x".to_string(), "y".to_string()]);
    a.announce(added.clone()).await.unwrap();
    fires("a re-announce", changed).await;
    let after = members(&b).await;
    assert_eq!(after[0].profile.as_ref(), Some(&added));
    // The old catalog goes once the member row no longer names it (in the
    // background, after the announce).
    let old = "SELECT count(*) FROM highlander_catalogs WHERE namespace = 'readd'";
    within("the old catalog forgotten", GUARD, async {
        while count(&pg, old).await != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// `members_changed` stays pending while nothing changes, and completes
/// when a node joins, when one leaves (closes), when one crashes (its
/// session dropped: nothing released, no goodbye), and when one announces.
/// Each time the member list then says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_changed_on_join_leave_crash_and_announce() {
    let pg = server().await;
    let ns = "changes";
    let a = connect(&pg, ns, "a").await;
    a.announce(Profile::default()).await.unwrap();

    let changed = settled(&a).await;
    let b = connect(&pg, ns, "b").await;
    fires("a join", changed).await;
    assert_eq!(names(&members(&a).await), ["a", "b"]);

    let changed = settled(&a).await;
    b.announce(profile(3, &["late"], ["q".to_string()]))
        .await
        .unwrap();
    fires("an announce", changed).await;
    let seen = members(&a).await;
    assert_eq!(seen[1].profile.as_ref().map(|p| p.weight), Some(3));

    let changed = settled(&a).await;
    within("b closing", GUARD, b.close()).await;
    drop(b);
    fires("a leave", changed).await;
    assert_eq!(names(&members(&a).await), ["a"]);

    let c = connect(&pg, ns, "c").await;
    c.announce(profile(2, &[], ["r".to_string()]))
        .await
        .unwrap();
    let lease = granted(claim(&c, "r").await, "c claims r");
    assert_eq!(names(&members(&a).await), ["a", "c"]);
    let changed = settled(&a).await;
    drop(lease);
    drop(c); // a crash: nothing released, no goodbye
    fires("a crash", changed).await;
    within("c gone from the members", GUARD, async {
        while names(&members(&a).await) != ["a"] {
            let changed = a.members_changed();
            if names(&members(&a).await) == ["a"] {
                break;
            }
            changed.await;
        }
    })
    .await;
    // Its row stopped counting without any cleanup.
    assert_eq!(members(&a).await[0].node, "a");
}

/// An administrator ends a node's session (`pg_terminate_backend`): the
/// others see it leave, and once it has reconnected by itself, its profile
/// again, published under its new session (a member row counts only for
/// the session it names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_node_publishes_its_profile_again() {
    let pg = server().await;
    let ns = "reconnect";
    let a = connect(&pg, ns, "a").await;
    let b = connect(&pg, ns, "b").await;
    let p = profile(5, &["again"], ["x".to_string(), "y".to_string()]);
    a.announce(p.clone()).await.unwrap();
    assert_eq!(members(&b).await[0].profile.as_ref(), Some(&p));
    let owner = "SELECT owner FROM highlander_members WHERE namespace = 'reconnect' AND node = 'a'";
    let before = count(&pg, owner).await;
    let changed = settled(&b).await;
    assert_eq!(pg.terminate("a").await, 1);
    fires("a's session ending", changed).await;
    within("a's profile back after its reconnect", GUARD, async {
        loop {
            let changed = b.members_changed();
            let seen = members(&b).await;
            if seen
                .iter()
                .any(|m| m.node == "a" && m.profile.as_ref() == Some(&p))
            {
                break;
            }
            changed.await;
        }
    })
    .await;
    assert_ne!(
        count(&pg, owner).await,
        before,
        "published under the new session"
    );
    drop(a);
}

/// A holder releases an id to `b`: a third node's claim is refused (Busy)
/// while `b`'s succeeds; released to a node that does not take it, the
/// reservation lapses and the third node's claim, woken by then, succeeds,
/// with a larger token each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_to_reserves_the_id_for_its_target() {
    let pg = server().await;
    let ns = "handoff";
    let a = connect(&pg, ns, "a").await;
    let b = connect(&pg, ns, "b").await;
    let c = connect(&pg, ns, "c").await;
    let first = granted(claim(&a, "job").await, "a claims job");
    within(
        "the release to b",
        GUARD,
        a.release_to("job", first.token, "b"),
    )
    .await
    .expect("release_to succeeds");
    let reserved = "SELECT reserved_for FROM highlander_leases WHERE id = 'job'";
    assert_eq!(pg.sql(reserved).await[0][0].as_deref(), Some("b"));
    match claim(&c, "job").await {
        Claim::Busy { .. } => {}
        other => panic!("c's claim of an id reserved for b: {other:?}"),
    }
    match claim(&a, "job").await {
        Claim::Busy { .. } => {}
        other => panic!("a's claim of an id it released to b: {other:?}"),
    }
    let second = granted(claim(&b, "job").await, "b claims the id reserved for it");
    assert!(second.token > first.token);
    assert_eq!(
        pg.sql(reserved).await[0][0],
        None,
        "the grant cleared the reservation"
    );

    // Released to a, which does not claim it: c waits, then gets it.
    within(
        "the release to a",
        GUARD,
        b.release_to("job", second.token, "a"),
    )
    .await
    .unwrap();
    let wake = match claim(&c, "job").await {
        Claim::Busy { wake, .. } => wake,
        other => panic!("c's claim of an id reserved for a: {other:?}"),
    };
    within("the reservation lapsing", GUARD, wake).await;
    let third = granted(
        claim(&c, "job").await,
        "c claims once the reservation lapsed",
    );
    assert!(third.token > second.token);
    // Nobody else holds it meanwhile.
    match claim(&b, "job").await {
        Claim::Busy { holder, .. } => {
            assert_eq!(holder.map(|h| h.node), Some("c".to_string()));
        }
        other => panic!("b's claim of c's id: {other:?}"),
    }
}
