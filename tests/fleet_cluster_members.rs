//! Membership and placement on the embedded cluster, with real nodes over
//! loopback TCP: what each member announced (weight, labels, the ids it
//! runs) reaches every other member, `members_changed` wakes on every
//! change of the member list, and `release_to` keeps an id for the chosen
//! member for a while. Sessions are driven directly, as the runtime drives
//! them. Every wait on the member list goes through `members_changed` (no
//! polling), so a change it misses hangs the test; deadlines are hang
//! guards, never timing assertions.

use std::sync::Arc;

use highlander::BoxFuture;
use highlander::backend::cluster::{Cluster, Faults};
use highlander::backend::{
    Backend, Catalog, Claim, ClaimRequest, Holder, Member, Profile, Session,
};
use highlander_tests::wait::{GUARD, within};

const COOKIE: &str = "fleet cluster members test cookie";

/// A node, and its configuration (which knows its bound address).
struct Node {
    session: Arc<dyn Session>,
    cluster: Cluster,
}

impl Node {
    /// Starts node `name`, seeded with `seed` when given.
    async fn start(name: &str, seed: Option<&Node>) -> Node {
        Node::start_with(name, seed, Cluster::new("127.0.0.1:0")).await
    }

    /// As [`Node::start`], from the configuration `cluster`.
    async fn start_with(name: &str, seed: Option<&Node>, cluster: Cluster) -> Node {
        highlander_tests::init_tracing();
        let mut cluster = cluster.cookie(COOKIE);
        if let Some(seed) = seed {
            cluster = cluster.seeds([seed.addr()]);
        }
        let session = within(&format!("{name} started"), GUARD, cluster.connect(name))
            .await
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        Node { session, cluster }
    }

    fn addr(&self) -> String {
        self.cluster.local_addr().expect("started").to_string()
    }

    async fn members(&self) -> Vec<Member> {
        self.session.members().await.expect("members")
    }
}

fn profile(weight: u32, labels: &[&str], ids: impl IntoIterator<Item = String>) -> Profile {
    Profile::new(
        weight,
        labels.iter().map(|l| l.to_string()).collect(),
        Catalog::new(ids),
    )
}

fn named(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn member<'a>(members: &'a [Member], node: &str) -> Option<&'a Member> {
    members.iter().find(|m| m.node == node)
}

/// Whether `members` shows `node` reachable with exactly `profile`.
fn shows(members: &[Member], node: &str, profile: &Profile) -> bool {
    member(members, node).is_some_and(|m| m.reachable && m.profile.as_ref() == Some(profile))
}

/// Waits until `node`'s member list satisfies `pred`, looking only when
/// `changed` (created before the change awaited) or a later
/// `members_changed` completes: a change the backend does not signal
/// hangs here until the guard fails the test.
async fn seen(
    node: &Node,
    mut changed: BoxFuture<'static, ()>,
    what: &str,
    pred: impl Fn(&[Member]) -> bool,
) -> Vec<Member> {
    within(what, GUARD, async {
        loop {
            changed.await;
            changed = node.session.members_changed();
            let members = node.members().await;
            if pred(&members) {
                return members;
            }
        }
    })
    .await
}

/// As [`seen`], from a fresh `members_changed`, when the list may satisfy
/// `pred` already.
async fn sees(node: &Node, what: &str, pred: impl Fn(&[Member]) -> bool) -> Vec<Member> {
    let changed = node.session.members_changed();
    let members = node.members().await;
    if pred(&members) {
        return members;
    }
    seen(node, changed, what, pred).await
}

async fn three() -> (Node, Node, Node) {
    let a = Node::start("a", None).await;
    let b = Node::start("b", Some(&a)).await;
    let c = Node::start("c", Some(&a)).await;
    for n in [&a, &b, &c] {
        sees(n, "three reachable members", |m| {
            m.len() == 3 && m.iter().all(|m| m.reachable)
        })
        .await;
    }
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_sees_every_profile() {
    let (a, b, c) = three().await;
    let profiles = [
        ("a", profile(1, &["zone=eu"], named(&["x", "y"]))),
        ("b", profile(3, &["zone=us", "ssd"], named(&["y", "z"]))),
        ("c", profile(0, &[], (0..100).map(|i| format!("job/{i}")))),
    ];
    for (node, (_, p)) in [&a, &b, &c].into_iter().zip(&profiles) {
        node.session.announce(p.clone()).await.expect("announce");
    }
    for node in [&a, &b, &c] {
        let members = sees(node, "every profile", |m| {
            profiles.iter().all(|(n, p)| shows(m, n, p))
        })
        .await;
        let b_seen = member(&members, "b").unwrap().profile.clone().unwrap();
        assert_eq!(b_seen.weight, 3);
        assert_eq!(b_seen.labels, ["zone=us", "ssd"]);
        assert!(b_seen.catalog.contains("z") && !b_seen.catalog.contains("x"));
    }
    for n in [a, b, c] {
        n.session.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogs_of_100000_ids_reach_a_joining_and_a_connected_member() {
    // About 20 MB of ids: several parts, each far below the frame limit;
    // and about 2 MB, one part.
    let long = profile(
        2,
        &["big"],
        (0..100_000).map(|i| format!("tenant-{i:06}/{}", "w".repeat(180))),
    );
    let short = profile(1, &[], (0..100_000).map(|i| format!("fleet/worker-{i:06}")));
    // Sealing and opening 20 MB in a debug build keeps both cores busy for
    // seconds (the cipher's generic code is built without optimisation): a
    // failure timeout that long keeps heartbeats out of the test.
    let slow = || Cluster::new("127.0.0.1:0").failure_timeout(std::time::Duration::from_secs(60));
    let a = Node::start_with("a", None, slow()).await;
    a.session.announce(long.clone()).await.unwrap();
    // "b" joins after "a" announced: it learns the profile from a's Sync.
    let b = Node::start_with("b", Some(&a), slow()).await;
    let members = sees(&b, "a's 100,000 ids", |m| shows(m, "a", &long)).await;
    let seen = member(&members, "a").unwrap().profile.clone().unwrap();
    assert_eq!(seen.catalog.len(), 100_000);
    assert_eq!(seen.catalog.digest(), long.catalog.digest());
    assert_eq!(seen.catalog.ids(), long.catalog.ids());
    // "b" announces once connected: "a" learns it from the Announce.
    b.session.announce(short.clone()).await.unwrap();
    let members = sees(&a, "b's 100,000 ids", |m| shows(m, "b", &short)).await;
    assert_eq!(
        member(&members, "b")
            .unwrap()
            .profile
            .as_ref()
            .unwrap()
            .catalog,
        short.catalog
    );
    // Each node shows its own profile too.
    assert!(shows(&a.members().await, "a", &long));
    assert!(shows(&b.members().await, "b", &short));
    b.session.close().await;
    a.session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_changed_fires_on_join_announce_leave_and_crash() {
    let a = Node::start("a", None).await;
    let before = profile(1, &["zone=eu"], named(&["x", "y"]));
    a.session.announce(before.clone()).await.unwrap();

    // Join.
    let changed = a.session.members_changed();
    assert!(member(&a.members().await, "b").is_none());
    let b = Node::start("b", Some(&a)).await;
    seen(&a, changed, "b joined", |m| {
        member(m, "b").is_some_and(|m| m.reachable)
    })
    .await;

    // An announce, then a re-announce with one id more (what `add` does),
    // each seen by the other node.
    let changed = a.session.members_changed();
    let first = profile(2, &["zone=us"], named(&["x", "y"]));
    b.session.announce(first.clone()).await.unwrap();
    seen(&a, changed, "b's profile", |m| shows(m, "b", &first)).await;
    let changed = a.session.members_changed();
    let added = profile(2, &["zone=us"], named(&["x", "y", "z"]));
    b.session.announce(added.clone()).await.unwrap();
    let members = seen(&a, changed, "b's new profile", |m| shows(m, "b", &added)).await;
    assert!(
        member(&members, "b")
            .unwrap()
            .profile
            .as_ref()
            .unwrap()
            .catalog
            .contains("z")
    );
    let changed = b.session.members_changed();
    let after = profile(1, &["zone=eu"], named(&["x"]));
    a.session.announce(after.clone()).await.unwrap();
    seen(&b, changed, "a's new profile", |m| shows(m, "a", &after)).await;

    // A graceful leave: gone from the list, with its profile.
    let changed = a.session.members_changed();
    b.session.close().await;
    seen(&a, changed, "b gone", |m| member(m, "b").is_none()).await;

    // A crash (the session dropped without `close`): unreachable, and its
    // profile dropped.
    let c = Node::start("c", Some(&a)).await;
    c.session.announce(first.clone()).await.unwrap();
    sees(&a, "c's profile", |m| shows(m, "c", &first)).await;
    let changed = a.session.members_changed();
    drop(c);
    let members = seen(&a, changed, "c unreachable", |m| {
        member(m, "c").is_some_and(|m| !m.reachable)
    })
    .await;
    assert_eq!(member(&members, "c").unwrap().profile, None);
    assert!(shows(&members, "a", &after), "its own profile stays");
    a.session.close().await;
}

/// A member cut off loses its profile with its reachability; once the link
/// heals, the new connection carries the profile again without anyone
/// announcing anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_comes_back_when_a_cut_link_heals() {
    let faults = Faults::new();
    let a = Node::start_with("a", None, Cluster::new("127.0.0.1:0").faults(&faults)).await;
    let b = Node::start_with("b", Some(&a), Cluster::new("127.0.0.1:0").faults(&faults)).await;
    let mine = profile(4, &["zone=eu"], named(&["x", "y"]));
    a.session.announce(mine.clone()).await.unwrap();
    sees(&b, "a's profile", |m| shows(m, "a", &mine)).await;
    let changed = b.session.members_changed();
    faults.cut("a", "b");
    let members = seen(&b, changed, "a cut off", |m| {
        member(m, "a").is_some_and(|m| !m.reachable)
    })
    .await;
    assert_eq!(member(&members, "a").unwrap().profile, None);
    let changed = b.session.members_changed();
    faults.heal();
    seen(&b, changed, "a's profile again", |m| shows(m, "a", &mine)).await;
    b.session.close().await;
    a.session.close().await;
}

/// What a claim answered.
enum Answer {
    Granted(u64),
    Busy(Option<Holder>, BoxFuture<'static, ()>),
}

impl Answer {
    /// The holder named by a busy answer.
    fn busy_with(&self) -> Option<&str> {
        match self {
            Answer::Busy(Some(h), _) => Some(&h.node),
            _ => None,
        }
    }

    fn token(self, what: &str) -> u64 {
        match self {
            Answer::Granted(token) => token,
            Answer::Busy(holder, _) => panic!("{what}: busy with {holder:?}"),
        }
    }

    fn wake(self, what: &str) -> BoxFuture<'static, ()> {
        match self {
            Answer::Busy(_, wake) => wake,
            Answer::Granted(token) => panic!("{what}: granted with token {token}"),
        }
    }
}

/// Claims `id` on `node`.
async fn claim(node: &Node, id: &str) -> Answer {
    let request = ClaimRequest::new(id, std::time::Duration::from_secs(1));
    match node.session.try_claim(request).await.expect("claim") {
        Claim::Granted(lease) => Answer::Granted(lease.token),
        Claim::Busy { holder, wake } => Answer::Busy(holder, wake),
        other => panic!("{other:?}"),
    }
}

/// Waits until `node` sees `holder` hold `id` (nobody, for `None`).
async fn held_by(node: &Node, id: &str, holder: Option<&str>) {
    let what = format!("{id} held by {holder:?}");
    highlander_tests::wait::wait_until_async(&what, GUARD, async || {
        let seen = node.session.holder(id).await.unwrap();
        seen.as_ref().map(|h| h.node.as_str()) == holder
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_to_keeps_the_id_for_the_chosen_member_then_lapses() {
    let (a, b, c) = three().await;
    let first = claim(&a, "x").await.token("a claims x");
    held_by(&c, "x", Some("a")).await;
    // "b" waits for x.
    let b_wake = claim(&b, "x").await.wake("b claims a held id");
    a.session.release_to("x", first, "b").await.unwrap();
    // "c" heard of the release, yet its claim is busy, naming "b"; so is
    // the releasing node's own.
    held_by(&c, "x", None).await;
    assert_eq!(claim(&c, "x").await.busy_with(), Some("b"));
    assert_eq!(claim(&a, "x").await.busy_with(), Some("b"));
    // "b" is woken and takes it.
    within("b woken by the hand-off", GUARD, b_wake).await;
    let second = claim(&b, "x").await.token("the chosen member claims");
    assert!(second > first, "tokens grow: {second} after {first}");

    // Handed to "a", which does not claim: the reservation lapses, and the
    // node kept out is woken and takes the id.
    held_by(&c, "x", Some("b")).await;
    b.session.release_to("x", second, "a").await.unwrap();
    held_by(&c, "x", None).await;
    let answer = claim(&c, "x").await;
    assert_eq!(answer.busy_with(), Some("a"));
    let c_wake = answer.wake("c claims a reserved id");
    within("c woken when the reservation lapses", GUARD, c_wake).await;
    let third = loop {
        match claim(&c, "x").await {
            Answer::Granted(token) => break token,
            Answer::Busy(_, wake) => within("c woken again", GUARD, wake).await,
        }
    };
    assert!(third > second);
    for n in [a, b, c] {
        n.session.close().await;
    }
}
