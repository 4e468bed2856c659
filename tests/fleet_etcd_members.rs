//! Membership and placement on the etcd backend, against a real etcd:
//! sessions announce their profiles and see each other's (weight, labels,
//! catalogs of up to 100,000 ids), `members_changed` fires on a join, a
//! leave, a crash and a re-announce, and `release_to` keeps a third node out
//! while the node it names takes the id, until the reservation lapses.
//! Deadlines here are hang guards, never timing claims.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use highlander::backend::etcd::Etcd;
use highlander::backend::{Backend, Catalog, Claim, ClaimRequest, Lease, Profile, Session};
use highlander_tests::etcd::EtcdCluster;
use highlander_tests::wait::{GUARD, within};

/// etcd's shortest TTL: a crashed session's keys go within about 2.5 s.
const TTL: Duration = Duration::from_secs(2);
const BUDGET: Duration = Duration::from_millis(100);

async fn session(cluster: &EtcdCluster, node: &str) -> Arc<dyn Session> {
    Etcd::new(cluster.endpoints())
        .ttl(TTL)
        .keepalive_interval(Duration::from_millis(200))
        .connect(node)
        .await
        .expect("a session on etcd")
}

fn profile(weight: u32, labels: &[&str], ids: &[&str]) -> Profile {
    Profile::new(
        weight,
        labels.iter().map(|l| l.to_string()).collect(),
        Catalog::new(ids.iter().copied()),
    )
}

/// What `session` sees: each member's node and profile, by node.
async fn seen(session: &dyn Session) -> Vec<(String, Option<Profile>)> {
    let mut members: Vec<_> = session
        .members()
        .await
        .expect("members")
        .into_iter()
        .map(|m| {
            assert!(m.reachable, "{m:?}");
            (m.node, m.profile)
        })
        .collect();
    members.sort_by(|a, b| a.0.cmp(&b.0));
    members
}

async fn claim(session: &dyn Session, id: &str) -> Claim {
    session
        .try_claim(ClaimRequest::new(id, BUDGET))
        .await
        .expect("etcd answers the claim")
}

fn granted(claim: Claim) -> Lease {
    match claim {
        Claim::Granted(lease) => lease,
        Claim::Busy { holder, .. } => panic!("busy, held by {holder:?}"),
        _ => panic!("neither granted nor busy"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_see_each_others_profiles() {
    let etcd = EtcdCluster::single().await;
    let a = session(&etcd, "a").await;
    let b = session(&etcd, "b/1").await;
    let c = session(&etcd, "c%2F").await;
    let profiles = [
        profile(1, &[], &["x", "y"]),
        profile(2, &["zone=eu", "ssd"], &["y", "z", "w/1"]),
        profile(0, &["zone=us"], &[]),
    ];
    for (s, p) in [&a, &b, &c].into_iter().zip(profiles.clone()) {
        s.announce(p).await.expect("announce");
    }
    let want = vec![
        ("a".to_string(), Some(profiles[0].clone())),
        ("b/1".to_string(), Some(profiles[1].clone())),
        ("c%2F".to_string(), Some(profiles[2].clone())),
    ];
    for s in [&a, &b, &c] {
        assert_eq!(seen(&**s).await, want);
    }
    // A member that announced nothing yet is a member without a profile.
    let d = session(&etcd, "d").await;
    within("d's member key", GUARD, async {
        while seen(&*a).await.len() < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(seen(&*a).await[3], ("d".to_string(), None));
    // Member keys are no ids: the holders are the ids held, no more.
    let _lease = granted(claim(&*a, "x").await);
    let held: Vec<String> = d
        .holders()
        .await
        .expect("holders")
        .into_iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(held, ["x"]);
    for s in [a, b, c, d] {
        s.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_of_100000_ids_round_trips_and_a_new_one_replaces_it() {
    let etcd = EtcdCluster::single().await;
    let a = session(&etcd, "a").await;
    let b = session(&etcd, "b").await;
    let ids: Vec<String> = (0..100_000).map(|i| format!("tenant/{i:06}")).collect();
    let big = Profile::new(3, vec!["big".into()], Catalog::new(ids.iter().cloned()));
    a.announce(big.clone()).await.expect("announce 100,000 ids");
    let members = seen(&*b).await;
    assert_eq!(members[0], ("a".to_string(), Some(big.clone())));
    // One more id (what `add` does): the new catalog is seen, and only its
    // chunks remain.
    let more = Profile::new(
        3,
        vec!["big".into()],
        Catalog::new(ids.iter().cloned().chain(["tenant/extra".to_string()])),
    );
    let changed = b.members_changed();
    a.announce(more.clone()).await.expect("announce again");
    within("members_changed after a re-announce", GUARD, changed).await;
    assert_eq!(seen(&*b).await[0], ("a".to_string(), Some(more.clone())));
    let chunks = etcd.etcdctl(&["get", "--prefix", "/highlander/~~c/", "--keys-only"]);
    let chunks: Vec<&str> = chunks.lines().filter(|l| !l.is_empty()).collect();
    let digest = format!("{:016x}", more.catalog.digest());
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert!(chunks.iter().all(|k| k.contains(&digest)), "{chunks:?}");
    for s in [a, b] {
        s.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_changed_fires_on_join_leave_crash_and_reannounce() {
    let etcd = EtcdCluster::single().await;
    let a = session(&etcd, "a").await;
    a.announce(Profile::default()).await.expect("announce");

    let changed = a.members_changed();
    let b = session(&etcd, "b").await;
    within("members_changed on a join", GUARD, changed).await;
    within("b among the members", GUARD, async {
        while seen(&*a).await.len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let changed = a.members_changed();
    let labelled = profile(5, &["gpu"], &["job"]);
    b.announce(labelled.clone()).await.expect("announce");
    within("members_changed on a re-announce", GUARD, changed).await;
    assert_eq!(seen(&*a).await[1], ("b".to_string(), Some(labelled)));

    let changed = a.members_changed();
    b.close().await;
    within("members_changed on a leave", GUARD, changed).await;
    assert_eq!(seen(&*a).await.len(), 1, "b left");

    let c = session(&etcd, "c").await;
    c.announce(Profile::default()).await.expect("announce");
    assert_eq!(seen(&*a).await.len(), 2);
    let changed = a.members_changed();
    drop(c); // a crash: nothing revoked, the lease expires
    within("members_changed on a crash", GUARD, changed).await;
    within("c gone from the members", GUARD, async {
        while seen(&*a).await.len() > 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(seen(&*a).await[0].0, "a");

    // A member key deleted from outside is written again.
    let changed = a.members_changed();
    etcd.etcdctl(&["del", "/highlander/~m/a"]);
    within("members_changed on the deletion", GUARD, changed).await;
    within("a's member key written again", GUARD, async {
        while seen(&*a).await.len() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        seen(&*a).await[0],
        ("a".to_string(), Some(Profile::default()))
    );
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_to_keeps_others_out_while_its_target_takes_the_id_then_lapses() {
    let etcd = EtcdCluster::single().await;
    let a = session(&etcd, "a").await;
    let b = session(&etcd, "b").await;
    let c = session(&etcd, "c").await;

    let first = granted(claim(&*a, "job").await);
    // b waits for the id; a hands it to b.
    let Claim::Busy { wake, .. } = claim(&*b, "job").await else {
        panic!("a holds job");
    };
    a.release_to("job", first.token, "b")
        .await
        .expect("release_to");
    // Within the reservation a third node's claim is refused, naming b.
    let Claim::Busy { holder, .. } = claim(&*c, "job").await else {
        panic!("c took a reserved id");
    };
    assert_eq!(holder.map(|h| h.node), Some("b".to_string()));
    within("b woken by the release", GUARD, wake).await;
    let second = granted(claim(&*b, "job").await);
    assert!(
        second.token > first.token,
        "{} > {}",
        second.token,
        first.token
    );
    assert_eq!(
        a.holder("job").await.expect("holder").map(|h| h.node),
        Some("b".to_string())
    );

    // Reserved for a node that never comes: the others are kept out, then
    // the reservation lapses, wakes them and one of them takes the id.
    b.release_to("job", second.token, "gone")
        .await
        .expect("release_to");
    let Claim::Busy { wake, holder } = claim(&*c, "job").await else {
        panic!("c took an id reserved for another node");
    };
    assert_eq!(holder.map(|h| h.node), Some("gone".to_string()));
    let Claim::Busy { .. } = claim(&*a, "job").await else {
        panic!("a took an id reserved for another node");
    };
    within("c woken when the reservation lapses", GUARD, wake).await;
    let third = granted(claim(&*c, "job").await);
    assert!(third.token > second.token);

    // A release_to of a tenure no longer held reserves nothing.
    a.release_to("job", first.token, "a")
        .await
        .expect("release_to");
    assert!(matches!(claim(&*a, "job").await, Claim::Busy { .. }));
    for s in [a, b, c] {
        s.close().await;
    }
}

/// A claim dropped after it was sent (a deferred claim given up, a node
/// shutting down) leaves no tenure behind: when etcd grants it anyway, the
/// backend releases it at once, and a waiting node takes the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_dropped_in_flight_leaves_no_tenure() {
    let etcd = EtcdCluster::single().await;
    let a = session(&etcd, "a").await;
    let b = session(&etcd, "b").await;
    let mut dropped = a.try_claim(ClaimRequest::new("orphan", BUDGET));
    let first = std::future::poll_fn(|cx| Poll::Ready(dropped.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the claim went to etcd");
    drop(dropped);
    within("b holding the id nobody runs", GUARD, async {
        loop {
            match claim(&*b, "orphan").await {
                Claim::Granted(_) => break,
                Claim::Busy { wake, .. } => wake.await,
                _ => panic!("neither granted nor busy"),
            }
        }
    })
    .await;
    for s in [a, b] {
        s.close().await;
    }
}
