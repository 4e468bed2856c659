//! The postgres backend against a real server (started by the harness in a
//! temp dir on a free port): one holder, takeover after stop, crash and
//! `pg_terminate_backend`, graceful handoff, growing tokens, a server
//! restart under running nodes, namespaces, O(1) connections per node, ids
//! beyond the server's lock table, errors, and TLS.
//!
//! Every deadline here is a guard against hangs, never a timing assertion.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use highlander::backend::postgres::Postgres;
use highlander::backend::{Backend, Claim, ClaimRequest};
use highlander::{
    BackendErrorKind, ChildSpec, Context, Error, Runtime, RuntimeHandle, Service, ShutdownReason,
    SingletonState,
};
use highlander_tests::postgres::{PASSWORD, PgServer, wait_all};
use tokio::time::timeout;

const GUARD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Start,
    Stop(ShutdownReason),
    /// The test crashed the node or ended its session server-side: its
    /// tenures end here, whatever it reports later (the server frees its
    /// ids before the node can hear of it).
    Cut,
}

#[derive(Debug, Clone)]
struct Event {
    kind: Kind,
    node: String,
    id: String,
    token: u64,
}

/// Every tenure event of a test, in the order they happened.
#[derive(Clone)]
struct Log(Arc<Mutex<Vec<Event>>>, tokio::sync::watch::Sender<u64>);

impl Default for Log {
    fn default() -> Self {
        Log(Arc::default(), tokio::sync::watch::Sender::new(0))
    }
}

impl Log {
    fn push(&self, kind: Kind, node: &str, id: &str, token: u64) {
        let mut events = self.0.lock().unwrap();
        events.push(Event {
            kind,
            node: node.into(),
            id: id.into(),
            token,
        });
        drop(events);
        self.1.send_modify(|v| *v += 1);
    }

    fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    /// Records that the test crashes `node` or ends its session now.
    fn cut(&self, node: &str) {
        self.push(Kind::Cut, node, "*", 0);
    }

    /// Waits (event-driven) until `cond` holds for the events so far.
    async fn wait_for(&self, what: &str, mut cond: impl FnMut(&[Event]) -> bool) {
        let mut rx = self.1.subscribe();
        let found = timeout(GUARD, async {
            loop {
                rx.borrow_and_update();
                if cond(&self.events()) {
                    return;
                }
                let _ = rx.changed().await;
            }
        })
        .await;
        if found.is_err() {
            panic!("not {what} within {GUARD:?}: {:#?}", self.events());
        }
    }

    /// Waits until `node` has started a tenure of `id`.
    async fn wait_start(&self, node: &str, id: &str) {
        self.wait_for(&format!("started {id} on {node}"), |events| {
            events
                .iter()
                .any(|e| e.kind == Kind::Start && e.node == node && e.id == id)
        })
        .await;
    }

    fn starts(&self, id: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.id == id && e.kind == Kind::Start)
            .collect()
    }

    /// Checks that tenures of each id never overlap: every start comes after
    /// the stop of the tenure before it, and tokens strictly grow.
    fn assert_one_at_a_time(&self) {
        let events = self.events();
        let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        ids.retain(|id| *id != "*");
        ids.sort();
        ids.dedup();
        for id in ids {
            let mut running: Option<&Event> = None;
            let mut last_token = 0;
            let mut cut: Vec<(&str, u64)> = Vec::new();
            for e in events.iter().filter(|e| e.id == id || e.kind == Kind::Cut) {
                match &e.kind {
                    Kind::Cut => {
                        if let Some(r) = running.filter(|r| r.node == e.node) {
                            cut.push((r.node.as_str(), r.token));
                            running = None;
                        }
                    }
                    Kind::Stop(_) if cut.contains(&(e.node.as_str(), e.token)) => {}
                    Kind::Start => {
                        assert!(
                            running.is_none(),
                            "{id}: {e:?} started while {running:?} ran"
                        );
                        assert!(
                            e.token > last_token,
                            "{id}: token {} after {last_token}",
                            e.token
                        );
                        last_token = e.token;
                        running = Some(e);
                    }
                    Kind::Stop(_) => {
                        let r = running
                            .take()
                            .unwrap_or_else(|| panic!("{id}: stop without start: {e:?}"));
                        assert_eq!(
                            (r.node.as_str(), r.token),
                            (e.node.as_str(), e.token),
                            "{id}"
                        );
                    }
                }
            }
        }
    }
}

struct Probe {
    log: Log,
    id: String,
    node: String,
    token: u64,
}

impl Service for Probe {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.token = ctx.fencing_token();
        self.node = ctx.node().to_string();
        self.log.push(Kind::Start, &self.node, &self.id, self.token);
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        self.log
            .push(Kind::Stop(reason), &self.node, &self.id, self.token);
    }
}

fn spec(id: &str, log: &Log) -> ChildSpec {
    let (id, log) = (id.to_string(), log.clone());
    ChildSpec::new(id.clone(), move |_ctx| {
        let (id, log) = (id.clone(), log.clone());
        async move {
            Ok(Probe {
                log,
                id,
                node: String::new(),
                token: 0,
            })
        }
    })
    .shutdown(Duration::from_secs(2))
}

async fn start(backend: Postgres, node: &str, ids: &[String], log: &Log) -> RuntimeHandle {
    let mut builder = Runtime::builder().node(node).backend(backend);
    for id in ids {
        builder = builder.child(spec(id, log));
    }
    timeout(GUARD, builder.start())
        .await
        .expect("start hangs")
        .expect("runtime starts")
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

async fn wait(handle: &RuntimeHandle, what: &str, cond: impl FnMut(&highlander::Status) -> bool) {
    timeout(GUARD, handle.wait_until(cond))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{}: not {what} within {GUARD:?}: {:?}",
                handle.node(),
                handle.status()
            )
        });
}

fn is_waiting(s: &highlander::Status, id: &str) -> bool {
    matches!(s.get(id), Some(SingletonState::Waiting { .. }))
}

/// The one runtime among `handles` that runs `id`, once exactly one does
/// and every other waits for it.
async fn sole_holder<'a>(handles: &'a [&'a RuntimeHandle], id: &str) -> &'a RuntimeHandle {
    wait_all(handles, GUARD, &format!("one holder of {id}"), || {
        let holders = handles.iter().filter(|h| h.status().is_running(id)).count();
        assert!(holders <= 1, "{id} runs on {holders} nodes");
        let waiting = handles
            .iter()
            .filter(|h| is_waiting(&h.status(), id))
            .count();
        holders == 1 && waiting == handles.len() - 1
    })
    .await;
    handles
        .iter()
        .copied()
        .find(|h| h.status().is_running(id))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_among_three_and_graceful_handoffs() {
    let pg = PgServer::start();
    let log = Log::default();
    let id = vec!["solo".to_string()];
    let a = start(Postgres::new(pg.url()), "a", &id, &log).await;
    let b = start(Postgres::new(pg.url()), "b", &id, &log).await;
    let c = start(Postgres::new(pg.url()), "c", &id, &log).await;
    let all = [&a, &b, &c];
    let first = sole_holder(&all, "solo").await;
    log.wait_start(first.node(), "solo").await;

    // Holder lookup: pg_locks + pg_stat_activity, from every node.
    let token = first.status().running().next().unwrap().1;
    for h in &all {
        let holder = h.holder("solo").await.unwrap().expect("someone holds solo");
        assert_eq!(holder.node, first.node());
        assert_eq!(holder.token, Some(token));
        let members: Vec<String> = h
            .members()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.node)
            .collect();
        assert_eq!(members, ["a", "b", "c"]);
    }
    // One connection per node.
    for name in ["a", "b", "c"] {
        assert_eq!(pg.sessions_of(name).await, 1, "{name}");
    }

    // Graceful handoff twice: the holder stops, releases with NOTIFY, and a
    // waiting node takes over.
    let first_name = first.node().to_string();
    first.shutdown().await;
    let rest: Vec<&RuntimeHandle> = all
        .iter()
        .copied()
        .filter(|h| h.node() != first_name)
        .collect();
    let second = sole_holder(&rest, "solo").await;
    log.wait_start(second.node(), "solo").await;
    let second_name = second.node().to_string();
    second.shutdown().await;
    let last: Vec<&RuntimeHandle> = rest
        .iter()
        .copied()
        .filter(|h| h.node() != second_name)
        .collect();
    let third = sole_holder(&last, "solo").await;
    log.wait_start(third.node(), "solo").await;
    third.shutdown().await;

    log.assert_one_at_a_time();
    let starts = log.starts("solo");
    assert_eq!(starts.len(), 3, "{:?}", log.events());
    let stops: Vec<Event> = log
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, Kind::Stop(_)))
        .collect();
    assert!(
        stops
            .iter()
            .all(|e| e.kind == Kind::Stop(ShutdownReason::NodeShutdown)),
        "{stops:?}"
    );
    assert!(
        pg.sql("SELECT 1 FROM highlander_leases WHERE owner IS NOT NULL")
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_after_crash_and_after_pg_terminate_backend() {
    let pg = PgServer::start();
    let log = Log::default();
    let id = vec!["job".to_string()];
    let a = start(Postgres::new(pg.url()), "a", &id, &log).await;
    wait(&a, "running job", |s| s.is_running("job")).await;
    let b = start(Postgres::new(pg.url()), "b", &id, &log).await;
    wait(&b, "waiting for job", |s| is_waiting(s, "job")).await;

    // A crash: the runtime vanishes without releasing; its connection closes.
    log.cut("a");
    a.abort();
    drop(a);
    wait(&b, "running job after a's crash", |s| s.is_running("job")).await;
    log.wait_start("b", "job").await;
    let c = start(Postgres::new(pg.url()), "c", &id, &log).await;
    wait(&c, "waiting for job", |s| is_waiting(s, "job")).await;

    // An administrator ends b's session: b loses the lease at once and c
    // (or b, reconnected) takes over with a larger token.
    let before = b.status().running().next().unwrap().1;
    log.cut("b");
    assert_eq!(pg.terminate("b").await, 1);
    log.wait_for("taken over after pg_terminate_backend", |events| {
        let b_lost = events.iter().any(|e| {
            e.node == "b" && e.token == before && e.kind == Kind::Stop(ShutdownReason::LeaseLost)
        });
        let new_start = events
            .iter()
            .any(|e| e.kind == Kind::Start && e.token > before);
        b_lost && new_start
    })
    .await;
    let tokens: Vec<u64> = log.starts("job").iter().map(|e| e.token).collect();
    assert!(tokens.windows(2).all(|w| w[1] > w[0]), "{tokens:?}");
    // The server frees b's ids the moment its backend exits, a fraction of
    // a millisecond before b can read that its connection closed: the one
    // case (with a server crash) where fencing tokens, not the lease, keep
    // a late write out. docs/postgres.md says so.
    b.shutdown().await;
    c.shutdown().await;
    log.assert_one_at_a_time();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_under_running_nodes() {
    let mut pg = PgServer::start();
    let log = Log::default();
    let id = vec!["r".to_string()];
    let a = start(Postgres::new(pg.url()), "a", &id, &log).await;
    let b = start(Postgres::new(pg.url()), "b", &id, &log).await;
    let c = start(Postgres::new(pg.url()), "c", &id, &log).await;
    let all = [&a, &b, &c];
    let holder = sole_holder(&all, "r").await.node().to_string();
    log.wait_start(&holder, "r").await;
    let before = log.starts("r").last().unwrap().token;

    pg.stop();
    // Everyone stops: the holder's lease is lost, nobody runs r.
    for h in &all {
        wait(h, "not running r", |s| !s.is_running("r")).await;
    }
    let lost = log.events();
    assert!(
        lost.iter()
            .any(|e| e.node == holder && e.kind == Kind::Stop(ShutdownReason::LeaseLost)),
        "{lost:?}"
    );
    pg.start_again();
    // Exactly one resumes, with a larger token.
    let resumed = sole_holder(&all, "r").await;
    let after = resumed.status().running().next().unwrap().1;
    assert!(after > before, "{after} after {before}");
    for h in all {
        h.shutdown().await;
    }
    log.assert_one_at_a_time();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_do_not_collide_and_tables_are_created_once() {
    let pg = PgServer::start();
    // Many nodes create the table at once in a fresh database.
    pg.create_database("race");
    let log = Log::default();
    let id = vec!["same-id".to_string()];
    let mut handles = Vec::new();
    let starts: Vec<_> = (0..6)
        .map(|i| {
            let url = pg.url_for("race");
            let log = log.clone();
            let id = id.clone();
            let ns = if i % 2 == 0 { "app-one" } else { "app-two" };
            tokio::spawn(async move {
                start(
                    Postgres::new(url).namespace(ns),
                    &format!("n{i}"),
                    &id,
                    &log,
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
    let h1 = sole_holder(&one, "same-id").await;
    let h2 = sole_holder(&two, "same-id").await;
    assert_ne!(h1.node(), h2.node());
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
    let log = Log::default();
    let ids = ids("k-", 1_000);
    let a = start(Postgres::new(pg.url()), "a", &ids, &log).await;
    let b = start(Postgres::new(pg.url()), "b", &ids, &log).await;
    let c = start(Postgres::new(pg.url()), "c", &ids, &log).await;
    let all = [&a, &b, &c];
    let total = |all: &[&RuntimeHandle]| {
        all.iter()
            .map(|h| h.status().running().count())
            .sum::<usize>()
    };
    wait_all(&all, GUARD, "1,000 ids running, the rest waiting", || {
        total(&all) == 1_000
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
    log.cut(&name);
    assert_eq!(pg.terminate(&name).await, 1);
    busiest.shutdown().await;
    let rest: Vec<&RuntimeHandle> = all.iter().copied().filter(|h| h.node() != name).collect();
    wait_all(&rest, GUARD, "every id moved", || total(&rest) == 1_000).await;
    for h in rest {
        h.shutdown().await;
    }
    log.assert_one_at_a_time();
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
    let log = Log::default();
    let builder = Runtime::builder()
        .node("lonely")
        .backend(Postgres::new(url))
        .child(spec("u", &log));
    let e = timeout(GUARD, builder.start())
        .await
        .expect("start gives up at its timeout, not never")
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
    assert!(log.events().is_empty());

    // The builder's start timeout wins over the URL's.
    let url =
        format!("postgres://highlander:{PASSWORD}@127.0.0.1:{closed}/highlander?start_timeout=10m");
    let e = timeout(
        GUARD,
        Runtime::builder()
            .node("lonely")
            .backend(Postgres::new(url))
            .start_timeout(Duration::from_secs(1))
            .start(),
    )
    .await
    .expect("the builder's timeout is used")
    .expect_err("still unreachable");
    assert!(
        matches!(e, Error::Unreachable { waited, .. } if waited == Duration::from_secs(1)),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stop_budget_and_holder_lookups() {
    let pg = PgServer::start();
    let log = Log::default();
    // A 40 s budget needs more than the default 15 s server timeout: the
    // session raises it (set_config) before it claims, and the claim works.
    let (id, spec_log) = ("slow".to_string(), log.clone());
    let slow = ChildSpec::new(id.clone(), move |_ctx| {
        let (id, log) = (id.clone(), spec_log.clone());
        async move {
            Ok(Probe {
                log,
                id,
                node: String::new(),
                token: 0,
            })
        }
    })
    .shutdown(Duration::from_secs(40));
    let a = timeout(
        GUARD,
        Runtime::builder()
            .node("a")
            .backend(Postgres::new(pg.url()))
            .child(slow)
            .start(),
    )
    .await
    .unwrap()
    .unwrap();
    wait(&a, "running slow", |s| s.is_running("slow")).await;

    // Another node looks holders up. (It runs a singleton of its own: a
    // runtime with none drops its session at once, see the report.)
    let own = vec!["observer-own".to_string()];
    let observer = start(Postgres::new(pg.url()), "observer", &own, &log).await;
    let holder = observer
        .holder("slow")
        .await
        .unwrap()
        .expect("a holds slow");
    assert_eq!((holder.node.as_str(), holder.token), ("a", Some(1)));
    assert_eq!(observer.holder("never-claimed").await.unwrap(), None);
    log.wait_start("a", "slow").await;
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
    log.assert_one_at_a_time();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stepping_down_one_id_hands_over_only_that_one() {
    let pg = PgServer::start();
    let log = Log::default();
    let ids = vec!["x".to_string(), "y".to_string()];
    let a = start(Postgres::new(pg.url()), "a", &ids, &log).await;
    wait(&a, "running x and y", |s| s.running().count() == 2).await;
    let b = start(Postgres::new(pg.url()), "b", &ids, &log).await;
    wait(&b, "waiting for x and y", |s| {
        is_waiting(s, "x") && is_waiting(s, "y")
    })
    .await;
    log.wait_start("a", "x").await;

    // The release notifies with the released key: b takes x at once, and
    // y stays where it is.
    a.step_down("x").unwrap();
    wait(&b, "running x", |s| s.is_running("x")).await;
    log.wait_start("b", "x").await;
    assert!(a.status().is_running("y"));
    assert!(is_waiting(&b.status(), "y"));
    let stops: Vec<Event> = log
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, Kind::Stop(_)))
        .collect();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0].kind, Kind::Stop(ShutdownReason::Stepdown));
    a.shutdown().await;
    wait(&b, "running y", |s| s.is_running("y")).await;
    b.shutdown().await;
    log.assert_one_at_a_time();
}

/// Rows are never deleted by highlander; if an operator deletes one anyway,
/// the next claim inserts it again instead of failing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_is_recreated() {
    let pg = PgServer::start();
    let log = Log::default();
    let a = Runtime::builder()
        .node("a")
        .backend(Postgres::new(pg.url()))
        .stepdown_delay(Duration::from_millis(100))
        .child(spec("gone", &log))
        .start()
        .await
        .unwrap();
    wait(&a, "running gone", |s| s.is_running("gone")).await;
    log.wait_start("a", "gone").await;
    a.step_down("gone").unwrap();
    wait(&a, "stepped down", |s| !s.is_running("gone")).await;
    pg.sql("DELETE FROM highlander_leases").await;
    log.wait_for("gone running again", |events| {
        events.iter().filter(|e| e.kind == Kind::Start).count() == 2
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
    let log = Log::default();
    let ids = vec!["x".to_string()];
    let a = start(Postgres::new(pg.url()), "a", &ids, &log).await;
    wait(&a, "running x", |s| s.is_running("x")).await;
    let b = start(Postgres::new(pg.url()), "b", &ids, &log).await;
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
    log.assert_one_at_a_time();
}

/// The session reports when this node must give its ids up if the server
/// stays silent (the `highlander_lease_deadline_seconds` gauge): nothing
/// while it holds nothing, then a moment within one server timeout that
/// moves forward with every heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_deadline_is_reported_while_ids_are_held() {
    let pg = PgServer::start();
    let log = Log::default();
    let backend = Postgres::new(pg.url()).heartbeat(Duration::from_millis(100));
    let observer = start(backend.clone(), "observer", &[], &log).await;
    let quiet = observer.session().unwrap();
    let holder = start(backend, "holder", &ids("deadline", 1), &log).await;
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
        timeout(GUARD, async {
            while pg.sql(&token).await != [[Some("1".to_string())]] {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("a's claim reaches the server");
        let lease = timeout(GUARD, async {
            loop {
                match b.try_claim(request.clone()).await.expect("b can ask") {
                    Claim::Granted(lease) => return lease,
                    Claim::Busy { wake, .. } => wake.await,
                    other => panic!("{other:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("`{id}` is still held after a dropped try_claim"));
        assert_eq!(lease.token, 2, "b's tenure follows a's");
        b.release(&id, lease.token).await.unwrap();
    }
    a.close().await;
    b.close().await;
}
