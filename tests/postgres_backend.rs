//! The postgres backend against a real server (started by the harness in a
//! temp dir on a free port): what is particular to it. `conformance.rs`
//! runs what every backend must do (one holder, handoffs, crashes,
//! step-down, tokens, many ids, shutdown); here are `pg_terminate_backend`,
//! members, a server restart under running nodes, namespaces, O(1)
//! connections per node, errors, the lease deadline and forged
//! notifications.
//!
//! Every deadline here is a guard against hangs, never a timing assertion.

use std::time::Duration;

use highlander::backend::postgres::Postgres;
use highlander::backend::{Backend, Claim, ClaimRequest};
use highlander::{BackendErrorKind, Error, Runtime, RuntimeHandle, ShutdownReason, SingletonState};
use highlander_tests::postgres::{PASSWORD, PgServer};
use highlander_tests::probe::{Kind, Probe};
use highlander_tests::wait::{self, GUARD, holder, is_waiting, total_running, wait_all, within};

async fn start(backend: Postgres, node: &str, ids: &[String], probe: &Probe) -> RuntimeHandle {
    let mut builder = Runtime::builder().node(node).backend(backend);
    for id in ids {
        builder = builder.child(probe.spec(id).shutdown(Duration::from_secs(2)));
    }
    within("the runtime started", GUARD, builder.start())
        .await
        .expect("runtime starts")
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

async fn wait(handle: &RuntimeHandle, what: &str, cond: impl FnMut(&highlander::Status) -> bool) {
    wait::status(handle, what, GUARD, cond).await;
}

/// Every node sees every connected node as a member; an administrator ends
/// the holder's session: it loses the lease at once and a node (maybe the
/// same, reconnected) takes over with a larger token. Once every node has
/// left, no row names an owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_takeover_after_pg_terminate_backend() {
    let pg = PgServer::start();
    let probe = Probe::new();
    let id = vec!["job".to_string()];
    let a = start(Postgres::new(pg.url()), "a", &id, &probe).await;
    let b = start(Postgres::new(pg.url()), "b", &id, &probe).await;
    let c = start(Postgres::new(pg.url()), "c", &id, &probe).await;
    let all = [&a, &b, &c];
    let held = holder(&all, "job", GUARD).await;
    probe.wait_start(&held.node, "job").await;
    for h in all {
        let members: Vec<String> = h
            .members()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.node)
            .collect();
        assert_eq!(members, ["a", "b", "c"]);
    }

    probe.cut(&held.node);
    assert_eq!(pg.terminate(&held.node).await, 1);
    probe
        .wait_for("taken over after pg_terminate_backend", |events| {
            let lost = events.iter().any(|e| {
                e.node == held.node
                    && e.token == held.token
                    && e.kind == Kind::Stop(ShutdownReason::LeaseLost)
            });
            let new_start = events.iter().any(|e| e.is_start() && e.token > held.token);
            lost && new_start
        })
        .await;
    // The server frees the ids the moment the session's backend exits, a
    // fraction of a millisecond before the node can read that its
    // connection closed: the one case (with a server crash) where fencing
    // tokens, not the lease, keep a late write out. docs/postgres.md says so.
    // The waiting nodes leave first, then the holder: its release, with
    // nobody left to claim, clears the owner.
    let last = holder(&all, "job", GUARD).await;
    for (i, h) in all.iter().enumerate() {
        if i != last.index {
            h.shutdown().await;
        }
    }
    all[last.index].shutdown().await;
    probe.assert_one_at_a_time();
    assert!(
        pg.sql("SELECT 1 FROM highlander_leases WHERE owner IS NOT NULL")
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_under_running_nodes() {
    let mut pg = PgServer::start();
    let probe = Probe::new();
    let id = vec!["r".to_string()];
    let a = start(Postgres::new(pg.url()), "a", &id, &probe).await;
    let b = start(Postgres::new(pg.url()), "b", &id, &probe).await;
    let c = start(Postgres::new(pg.url()), "c", &id, &probe).await;
    let all = [&a, &b, &c];
    let held = holder(&all, "r", GUARD).await;
    probe.wait_start(&held.node, "r").await;
    let before = held.token;

    pg.stop();
    // Everyone stops: the holder's lease is lost, nobody runs r.
    for h in &all {
        wait(h, "not running r", |s| !s.is_running("r")).await;
    }
    assert_eq!(
        probe.stopped("r", &held.node, &ShutdownReason::LeaseLost),
        1,
        "{probe:?}"
    );
    pg.start_again();
    // Exactly one resumes, with a larger token.
    let after = holder(&all, "r", GUARD).await.token;
    assert!(after > before, "{after} after {before}");
    for h in all {
        h.shutdown().await;
    }
    probe.assert_one_at_a_time();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_do_not_collide_and_tables_are_created_once() {
    let pg = PgServer::start();
    // Many nodes create the table at once in a fresh database.
    pg.create_database("race");
    let probe = Probe::new();
    let id = vec!["same-id".to_string()];
    let mut handles = Vec::new();
    let starts: Vec<_> = (0..6)
        .map(|i| {
            let url = pg.url_for("race");
            let probe = probe.clone();
            let id = id.clone();
            let ns = if i % 2 == 0 { "app-one" } else { "app-two" };
            tokio::spawn(async move {
                start(
                    Postgres::new(url).namespace(ns),
                    &format!("n{i}"),
                    &id,
                    &probe,
                )
                .await
            })
        })
        .collect();
    for s in starts {
        handles.push(s.await.unwrap());
    }
    // The same id runs once per namespace.
    let one: Vec<&RuntimeHandle> = handles.iter().step_by(2).collect();
    let two: Vec<&RuntimeHandle> = handles.iter().skip(1).step_by(2).collect();
    let h1 = holder(&one, "same-id", GUARD).await;
    let h2 = holder(&two, "same-id", GUARD).await;
    assert_ne!(h1.node, h2.node);
    let rows = pg
        .sql_in(
            "race",
            "SELECT namespace, token FROM highlander_leases ORDER BY namespace",
        )
        .await;
    let rows: Vec<(String, String)> = rows
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    assert_eq!(
        rows,
        [
            ("app-one".into(), "1".into()),
            ("app-two".into(), "1".into())
        ]
    );
    for h in &handles {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_ids_on_three_nodes_with_one_connection_each() {
    let pg = PgServer::start();
    let probe = Probe::new();
    let ids = ids("k-", 1_000);
    let a = start(Postgres::new(pg.url()), "a", &ids, &probe).await;
    let b = start(Postgres::new(pg.url()), "b", &ids, &probe).await;
    let c = start(Postgres::new(pg.url()), "c", &ids, &probe).await;
    let all = [&a, &b, &c];
    wait_all(&all, "1,000 ids running, the rest waiting", GUARD, || {
        total_running(&all) == 1_000
            && all.iter().all(|h| {
                h.status().singletons.iter().all(|s| {
                    !matches!(
                        s.state,
                        SingletonState::Claiming | SingletonState::Retrying { .. }
                    )
                })
            })
    })
    .await;
    for name in ["a", "b", "c"] {
        assert_eq!(pg.sessions_of(name).await, 1, "{name} keeps one connection");
    }
    // Fail the busiest node over: all of its ids move, once each.
    let busiest = *all
        .iter()
        .max_by_key(|h| h.status().running().count())
        .unwrap();
    let moved = busiest.status().running().count();
    assert!(moved > 0);
    let name = busiest.node().to_string();
    probe.cut(&name);
    assert_eq!(pg.terminate(&name).await, 1);
    busiest.shutdown().await;
    let rest: Vec<&RuntimeHandle> = all.iter().copied().filter(|h| h.node() != name).collect();
    wait_all(&rest, "every id moved", GUARD, || {
        total_running(&rest) == 1_000
    })
    .await;
    for h in rest {
        h.shutdown().await;
    }
    probe.assert_one_at_a_time();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_without_the_password() {
    let pg = PgServer::start();
    let no_pw = |e: &str| {
        println!("error: {e}");
        assert!(!e.contains(PASSWORD), "password in `{e}`")
    };

    // Bad URL: rejected at once.
    let bad = format!(
        "postgres://highlander:{PASSWORD}@127.0.0.1:{}/highlander?nonsense=1",
        pg.port()
    );
    let e = highlander::backend::from_url(&bad)
        .err()
        .unwrap()
        .to_string();
    no_pw(&e);
    assert!(e.contains("nonsense"), "{e}");

    // Numbers out of range: one line naming the option, no panic in start.
    for (query, option) in [
        ("heartbeat=10000000000000000000s", "heartbeat"),
        ("margin=10000000000000000000s", "margin"),
    ] {
        let e = Runtime::builder()
            .node("x")
            .backend(Postgres::new(format!("{}?{query}", pg.url())))
            .start()
            .await
            .expect_err(query)
            .to_string();
        no_pw(&e);
        assert!(e.contains(&format!("`{option}` must be")), "{e}");
    }

    // Wrong password: start fails, saying so.
    let wrong = format!(
        "postgres://highlander:not-it@127.0.0.1:{}/highlander",
        pg.port()
    );
    let e = Runtime::builder()
        .node("x")
        .backend(Postgres::new(wrong))
        .start()
        .await;
    // Not retried: the start-up policy stops at an error of this kind.
    let e = e.expect_err("wrong password fails");
    assert_eq!(e.kind(), Some(BackendErrorKind::Auth), "{e}");
    let e = e.to_string();
    println!("error: {e}");
    assert!(e.contains("authentication failed"), "{e}");
    assert!(!e.contains("not-it"), "{e}");

    // Missing database.
    let e = Runtime::builder()
        .node("x")
        .backend(Postgres::new(pg.url_for("nope")))
        .start()
        .await
        .expect_err("a missing database fails");
    assert_eq!(e.kind(), Some(BackendErrorKind::Refused), "{e}");
    let e = e.to_string();
    no_pw(&e);
    assert!(e.contains("database") && e.contains("nope"), "{e}");
}

/// A port nobody listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// An unreachable server: `start()` keeps trying until the URL's
/// `start_timeout`, then fails with `Error::Unreachable`, naming the
/// server and the last cause, never the password; nothing ever ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_start_within_the_start_timeout() {
    let closed = closed_port();
    let url =
        format!("postgres://highlander:{PASSWORD}@127.0.0.1:{closed}/highlander?start_timeout=2s");
    let probe = Probe::new();
    let builder = Runtime::builder()
        .node("lonely")
        .backend(Postgres::new(url))
        .child(probe.spec("u"));
    let e = within("start gives up at its timeout", GUARD, builder.start())
        .await
        .expect_err("an unreachable server fails start");
    let Error::Unreachable {
        backend,
        waited,
        source,
    } = &e
    else {
        panic!("not Unreachable: {e:?}")
    };
    assert_eq!(*waited, Duration::from_secs(2));
    assert_eq!(
        backend,
        &format!("postgres://highlander@127.0.0.1:{closed}/highlander")
    );
    assert_eq!(
        source.kind(),
        Some(BackendErrorKind::Unreachable),
        "{source}"
    );
    let text = e.to_string();
    println!("error: {text}");
    assert!(text.contains(&format!("127.0.0.1:{closed}")), "{text}");
    assert!(text.contains("within 2s"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(!format!("{e:?}").contains(PASSWORD));
    assert!(probe.events().is_empty());

    // The builder's start timeout wins over the URL's.
    let url =
        format!("postgres://highlander:{PASSWORD}@127.0.0.1:{closed}/highlander?start_timeout=10m");
    let e = within(
        "the builder's timeout is used",
        GUARD,
        Runtime::builder()
            .node("lonely")
            .backend(Postgres::new(url))
            .start_timeout(Duration::from_secs(1))
            .start(),
    )
    .await
    .expect_err("still unreachable");
    assert!(
        matches!(e, Error::Unreachable { waited, .. } if waited == Duration::from_secs(1)),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stop_budget_and_holder_lookups() {
    let pg = PgServer::start();
    let probe = Probe::new();
    // A 40 s budget needs more than the default 15 s server timeout: the
    // session raises it (set_config) before it claims, and the claim works.
    let a = within(
        "a started",
        GUARD,
        Runtime::builder()
            .node("a")
            .backend(Postgres::new(pg.url()))
            .child(probe.spec("slow").shutdown(Duration::from_secs(40)))
            .start(),
    )
    .await
    .unwrap();
    wait(&a, "running slow", |s| s.is_running("slow")).await;

    // Another node looks holders up. (It runs a singleton of its own: a
    // runtime with none drops its session at once, see the report.)
    let own = vec!["observer-own".to_string()];
    let observer = start(Postgres::new(pg.url()), "observer", &own, &probe).await;
    let holder = observer
        .holder("slow")
        .await
        .unwrap()
        .expect("a holds slow");
    assert_eq!((holder.node.as_str(), holder.token), ("a", Some(1)));
    assert_eq!(observer.holder("never-claimed").await.unwrap(), None);
    probe.wait_start("a", "slow").await;
    a.shutdown().await;
    assert_eq!(observer.holder("slow").await.unwrap(), None);
    let members: Vec<String> = observer
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.node)
        .collect();
    assert_eq!(members, ["observer"]);
    observer.shutdown().await;
    probe.assert_one_at_a_time();
}

/// Rows are never deleted by highlander; if an operator deletes one anyway,
/// the next claim inserts it again instead of failing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_is_recreated() {
    let pg = PgServer::start();
    let probe = Probe::new();
    let a = Runtime::builder()
        .node("a")
        .backend(Postgres::new(pg.url()))
        .stepdown_delay(Duration::from_millis(100))
        .child(probe.spec("gone").shutdown(Duration::from_secs(2)))
        .start()
        .await
        .unwrap();
    wait(&a, "running gone", |s| s.is_running("gone")).await;
    probe.wait_start("a", "gone").await;
    a.step_down("gone").unwrap();
    wait(&a, "stepped down", |s| !s.is_running("gone")).await;
    pg.sql("DELETE FROM highlander_leases").await;
    probe
        .wait_for("gone running again", |events| {
            events.iter().filter(|e| e.is_start()).count() == 2
        })
        .await;
    a.shutdown().await;
}

/// Any role may `NOTIFY` the namespace's channel. Another role floods it
/// with junk and with well-formed releases of 100,000 made-up owners while
/// `b` waits on `a`: nothing moves, and the real release that follows (in
/// order, behind the flood) still hands `x` over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_notifications_changes_nothing() {
    let pg = PgServer::start();
    let probe = Probe::new();
    let ids = vec!["x".to_string()];
    let a = start(Postgres::new(pg.url()), "a", &ids, &probe).await;
    wait(&a, "running x", |s| s.is_running("x")).await;
    let b = start(Postgres::new(pg.url()), "b", &ids, &probe).await;
    wait(&b, "waiting for x", |s| is_waiting(s, "x")).await;

    let channel = format!(
        "highlander_{:08x}",
        highlander::backend::postgres::namespace_key("highlander") as u32
    );
    pg.sql("CREATE ROLE mallory").await;
    pg.sql(&format!(
        "SET ROLE mallory; \
         SELECT count(pg_notify('{channel}', p)) FROM ( \
           SELECT 'junk ' || g AS p FROM generate_series(1, 2000) g \
           UNION ALL SELECT g::text || ':' || g || ',x' FROM generate_series(1, 2000) g \
           UNION ALL SELECT repeat('7', 7000) || g FROM generate_series(1, 200) g \
           UNION ALL SELECT g::text FROM generate_series(1, 100000) g \
           UNION ALL SELECT g::text || ':' || (g * 7919) FROM generate_series(1, 100000) g) j; \
         RESET ROLE"
    ))
    .await;
    assert!(a.status().is_running("x"));
    assert!(is_waiting(&b.status(), "x"));

    a.step_down("x").unwrap();
    wait(&b, "running x", |s| s.is_running("x")).await;
    a.shutdown().await;
    b.shutdown().await;
    probe.assert_one_at_a_time();
}

/// The session reports when this node must give its ids up if the server
/// stays silent (the `highlander_lease_deadline_seconds` gauge): nothing
/// while it holds nothing, then a moment within one server timeout that
/// moves forward with every heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_deadline_is_reported_while_ids_are_held() {
    let pg = PgServer::start();
    let probe = Probe::new();
    let backend = Postgres::new(pg.url()).heartbeat(Duration::from_millis(100));
    let observer = start(backend.clone(), "observer", &[], &probe).await;
    let quiet = observer.session().unwrap();
    let holder = start(backend, "holder", &ids("deadline", 1), &probe).await;
    wait(&holder, "running", |s| s.running().count() == 1).await;
    assert_eq!(
        quiet.lease_deadline(),
        None,
        "a node that holds nothing has no deadline"
    );
    let session = holder.session().unwrap();
    let first = session.lease_deadline().expect("a deadline while holding");
    let now = std::time::Instant::now();
    assert!(
        first > now && first < now + Duration::from_secs(15),
        "{:?}",
        first - now
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = session.lease_deadline().expect("still held");
    assert!(later > first, "heartbeats move the deadline forward");
    holder.shutdown().await;
    observer.shutdown().await;
}

/// A `try_claim` future dropped before its answer leaves no tenure: the
/// grant the server makes for it is released at once, and another node
/// gets the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_claim_leaves_no_tenure() {
    let pg = PgServer::start();
    let a = Postgres::new(pg.url()).connect("drop-a").await.unwrap();
    let b = Postgres::new(pg.url()).connect("drop-b").await.unwrap();
    for round in 0..3 {
        let id = format!("dropped-{round}");
        let request = ClaimRequest::new(id.as_str(), Duration::from_secs(1));
        // Queued when asked: the driver claims it for nobody.
        drop(a.try_claim(request.clone()));
        let token = format!("SELECT token FROM highlander_leases WHERE id = '{id}'");
        within("a's claim reaches the server", GUARD, async {
            while pg.sql(&token).await != [[Some("1".to_string())]] {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        // What b heard last, for the message should this hang.
        let mut last = String::from("nothing yet");
        let claimed = tokio::time::timeout(GUARD, async {
            loop {
                match b.try_claim(request.clone()).await.expect("b can ask") {
                    Claim::Granted(lease) => return lease,
                    Claim::Busy { holder, wake } => {
                        last = format!("busy, holder {holder:?}");
                        wake.await;
                        last = format!("woken after busy, holder {holder:?}");
                    }
                    other => panic!("{other:?}"),
                }
            }
        })
        .await;
        let Ok(lease) = claimed else {
            let row = pg
                .sql(&format!(
                    "SELECT owner, node, token, reserved_for FROM highlander_leases WHERE id = '{id}'"
                ))
                .await;
            panic!(
                "hang guard: the id is not free {GUARD:?} after a dropped try_claim; b last: {}; row (owner, node, token, reserved_for): {row:?}",
                last
            );
        };
        assert_eq!(lease.token, 2, "b's tenure follows a's");
        b.release(&id, lease.token).await.unwrap();
    }
    a.close().await;
    b.close().await;
}
