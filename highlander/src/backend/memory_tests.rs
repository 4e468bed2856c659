//! The memory backend's placement: profiles, `members_changed`,
//! `release_to`'s reservation.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};

use super::*;
use crate::backend::Catalog;

async fn node(cluster: &MemoryCluster, name: &str) -> Arc<dyn Session> {
    cluster.connect(name).await.expect("connect")
}

fn req(id: &str) -> ClaimRequest {
    ClaimRequest::new(id, Duration::from_secs(1))
}

fn ready<F: Future>(fut: &mut std::pin::Pin<&mut F>) -> bool {
    fut.as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_ready()
}

/// Three nodes, `a`, `b` and `c`.
async fn three(cluster: &MemoryCluster) -> [Arc<dyn Session>; 3] {
    [
        node(cluster, "a").await,
        node(cluster, "b").await,
        node(cluster, "c").await,
    ]
}

/// `a` claims `x` and releases it to `b`; `c`'s claim then finds it busy,
/// and gets the wake of the reservation.
async fn kept_for_b(a: &dyn Session, c: &dyn Session) -> BoxFuture<'static, ()> {
    let token = granted(a, "x").await;
    a.release_to("x", token, "b").await.unwrap();
    let Claim::Busy { wake, .. } = c.try_claim(req("x")).await.unwrap() else {
        panic!("c claimed an id kept for b");
    };
    wake
}

async fn granted(s: &dyn Session, id: &str) -> u64 {
    match s.try_claim(req(id)).await.expect("claim") {
        Claim::Granted(lease) => lease.token,
        other => panic!("{id}: expected a grant, got {other:?}"),
    }
}

#[tokio::test]
async fn members_show_the_profiles_of_the_reachable_side_only() {
    let cluster = MemoryCluster::new();
    let a = node(&cluster, "a").await;
    let b = node(&cluster, "b").await;
    let pa = Profile::new(3, vec!["zone=eu".into()], Catalog::new(["x", "y"]));
    a.announce(pa.clone()).await.unwrap();
    let members = b.members().await.unwrap();
    assert_eq!(members[0].profile.as_ref(), Some(&pa));
    assert_eq!(members[1].profile, None, "b announced nothing");

    cluster.partition(&[&["a"], &["b"]]);
    let members = b.members().await.unwrap();
    assert!(!members[0].reachable);
    assert_eq!(members[0].profile, None, "a is out of sight");
    assert_eq!(a.members().await.unwrap()[0].profile.as_ref(), Some(&pa));
    cluster.heal();
    assert_eq!(b.members().await.unwrap()[0].profile.as_ref(), Some(&pa));
}

#[tokio::test]
async fn members_changed_completes_on_every_change_and_only_then() {
    let cluster = MemoryCluster::new();
    let a = node(&cluster, "a").await;
    let profile = Profile::new(1, vec![], Catalog::new(["x"]));
    let mut quiet = pin!(a.members_changed());
    assert!(!ready(&mut quiet), "nothing changed yet");

    let mut announced = pin!(a.members_changed());
    assert!(!ready(&mut announced), "early");
    a.announce(profile.clone()).await.unwrap();
    assert!(ready(&mut announced), "announce missed");
    let mut split = pin!(a.members_changed());
    cluster.partition(&[&["a"]]);
    assert!(ready(&mut split), "partition missed");
    let mut healed = pin!(a.members_changed());
    cluster.heal();
    assert!(ready(&mut healed), "heal missed");
    // The same profile again is no change.
    let mut same = pin!(a.members_changed());
    a.announce(profile).await.unwrap();
    assert!(!ready(&mut same));

    let mut join = pin!(a.members_changed());
    let b = node(&cluster, "b").await;
    assert!(ready(&mut join), "join missed");
    let mut leave = pin!(a.members_changed());
    b.close().await;
    assert!(ready(&mut leave), "leave missed");
}

#[tokio::test(start_paused = true)]
async fn release_to_keeps_the_id_for_the_named_node() {
    let cluster = MemoryCluster::new();
    let a = node(&cluster, "a").await;
    let b = node(&cluster, "b").await;
    let c = node(&cluster, "c").await;
    let token = granted(&*a, "x").await;
    a.release_to("x", token, "b").await.unwrap();

    // c is refused, with b as the holder-to-be, and woken when the
    // reservation ends.
    let Claim::Busy { holder, wake } = c.try_claim(req("x")).await.unwrap() else {
        panic!("c claimed an id kept for b");
    };
    assert_eq!(holder, Some(Holder::new("b", None)));
    let Claim::Busy { .. } = a.try_claim(req("x")).await.unwrap() else {
        panic!("a claimed back an id it gave to b");
    };
    // b gets it at once, with a greater token.
    assert!(granted(&*b, "x").await > token);
    let Claim::Busy { holder, .. } = c.try_claim(req("x")).await.unwrap() else {
        panic!("c claimed a held id");
    };
    assert_eq!(holder.map(|h| h.node), Some("b".to_string()));
    drop(wake);
}

#[tokio::test(start_paused = true)]
async fn a_reservation_ends_after_a_while_or_when_its_node_leaves() {
    let cluster = MemoryCluster::new();
    let [a, b, c] = three(&cluster).await;

    // Expiry: the waiter is woken when the reservation ends.
    let wake = kept_for_b(&*a, &*c).await;
    let started = Instant::now();
    wake.await;
    assert!(started.elapsed() >= RESERVATION - Duration::from_millis(1));
    let tc = granted(&*c, "x").await;

    // The named node leaves: the id is free at once.
    c.release_to("y", 0, "b").await.unwrap(); // not held: nothing kept
    let _ = granted(&*a, "y").await;
    c.release("x", tc).await.unwrap();
    let mut wake = pin!(kept_for_b(&*a, &*c).await);
    assert!(!ready(&mut wake));
    b.close().await;
    assert!(ready(&mut wake), "the leave did not wake the waiter");
    let _ = granted(&*c, "x").await;
}

#[tokio::test]
async fn a_reservation_for_a_node_out_of_sight_does_not_block() {
    let cluster = MemoryCluster::new();
    let [a, _b, c] = three(&cluster).await;
    let token = granted(&*a, "x").await;
    a.release_to("x", token, "b").await.unwrap();
    cluster.partition(&[&["a", "c"], &["b"]]);
    let _ = granted(&*c, "x").await;
}

#[tokio::test(start_paused = true)]
async fn a_tenure_is_contested_while_split_and_until_the_loser_has_stopped() {
    let cluster = MemoryCluster::new();
    let [a, b, _c] = three(&cluster).await;
    let ta = granted(&*a, "x").await;
    assert!(!a.contested("x", ta), "one holder, one side");
    assert!(!a.contested("x", ta + 1), "not this tenure");
    assert!(!b.contested("x", ta), "b holds nothing");

    // Split: a's side cannot tell whether the other took x, even before it
    // does.
    cluster.partition(&[&["a"], &["b", "c"]]);
    assert!(a.contested("x", ta));
    let tb = granted(&*b, "x").await;
    assert!(a.contested("x", ta) && b.contested("x", tb));

    // The heal settles it: a's earlier tenure keeps x, b's ends. b's
    // instance may take its stop budget to stop: until then, a's tenure
    // still overlaps it.
    cluster.heal();
    assert_eq!(cluster.holders("x"), vec![Holder::new("a", Some(ta))]);
    assert!(!b.contested("x", tb), "b's tenure is over");
    assert!(a.contested("x", ta), "b's instance may still be stopping");
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(a.contested("x", ta));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(!a.contested("x", ta), "b's stop budget is over");

    // Everybody on one side of a "split" is no split.
    cluster.partition(&[&["a", "b", "c"]]);
    assert!(!a.contested("x", ta));
}
