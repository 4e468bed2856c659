//! The lease inequality, tested: when the network between the holder and
//! the server goes silent (no packet either way, nothing closed), the holder
//! must have stopped its instance before the server could free its ids.
//!
//! The holder reaches Postgres through a proxy the test controls (the one
//! the chaos runs use, `highlander_tests::chaos::proxy`). The test cuts the
//! proxy (it keeps both sockets open and forwards nothing, like a dead
//! link), which closes the server side exactly `X` after the last
//! byte it forwarded from the holder, `X` being the dead-peer detection the
//! holder asked the server for: the earliest moment a real server could end
//! the session. A second node, connected directly, then takes over. The
//! holder's `terminate(LeaseLost)` must come before that moment.

use std::net::SocketAddr;
use std::time::Duration;

use highlander::backend::postgres::Postgres;
use highlander::{ChildSpec, Runtime, RuntimeHandle, ShutdownReason, SingletonState};
use highlander_tests::chaos::proxy::BackendProxy;
use highlander_tests::postgres::PgServer;
use highlander_tests::probe::{Event, Probe};
use tokio::time::{Instant, timeout};

const GUARD: Duration = Duration::from_secs(60);
/// The holder's settings: heartbeat 200 ms, server timeout 3 s, margin
/// 200 ms, stop budget 1 s: it vouches for 3 s × 0.99 − 1 s − 0.2 s =
/// 1.77 s after its last successful round trip.
const SERVER_TIMEOUT: Duration = Duration::from_secs(3);

/// The probe `guarded`, with a 1 s stop budget.
fn spec(probe: &Probe) -> ChildSpec {
    probe.spec("guarded").shutdown(Duration::from_secs(1))
}

/// The holder's backend: through `proxy`, with the settings above.
fn via_proxy(pg: &PgServer, proxy: &BackendProxy) -> Postgres {
    let url = pg.url().replace(
        &format!(":{}/", pg.port()),
        &format!(":{}/", proxy.addr.port()),
    );
    Postgres::new(url)
        .heartbeat(Duration::from_millis(200))
        .server_timeout(SERVER_TIMEOUT)
        .margin(Duration::from_millis(200))
}

fn server(pg: &PgServer) -> SocketAddr {
    ([127, 0, 0, 1], pg.port()).into()
}

/// When the holder's instance of `id` stopped with `LeaseLost`, if it did.
fn lease_lost(probe: &Probe, id: &str) -> Option<Instant> {
    probe
        .filter(|e| e.node == "holder" && e.id == id)
        .into_iter()
        .find(|e| e.reason() == Some(&ShutdownReason::LeaseLost))
        .map(|e| e.at)
}

/// The holder reaches the server through a proxy that goes silent (no
/// packet either way, nothing closed) and ends the server side `X` after
/// the last byte it forwarded from the holder, as the server's own
/// dead-peer detection would at the earliest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_holder_stops_before_the_server_could_free_its_ids() {
    let pg = PgServer::start();
    let probe = Probe::new();
    let proxy = BackendProxy::start(server(&pg), Some(SERVER_TIMEOUT)).await;
    let holder = Runtime::builder()
        .rebalance(false)
        .node("holder")
        .backend(via_proxy(&pg, &proxy))
        .child(spec(&probe))
        .start()
        .await
        .unwrap();
    timeout(GUARD, holder.wait_until(|s| s.is_running("guarded")))
        .await
        .unwrap();
    let standby = Runtime::builder()
        .rebalance(false)
        .node("standby")
        .backend(Postgres::new(pg.url()))
        .child(spec(&probe))
        .start()
        .await
        .unwrap();
    timeout(
        GUARD,
        standby.wait_until(|s| matches!(s.get("guarded"), Some(SingletonState::Waiting { .. }))),
    )
    .await
    .unwrap();
    probe.wait_start("holder", "guarded").await;

    proxy.cut();
    timeout(GUARD, standby.wait_until(|s| s.is_running("guarded")))
        .await
        .expect("the standby takes over once the server ends the holder's session");
    let taken = probe.wait_start("standby", "guarded").await.at;

    let stopped = lease_lost(&probe, "guarded")
        .unwrap_or_else(|| panic!("the holder never gave up: {probe:?}"));
    let cut = *proxy
        .detected()
        .first()
        .expect("the proxy cut the server side");
    assert!(
        stopped < cut,
        "the holder stopped {:?} after the server could free its ids",
        stopped - cut
    );
    assert!(cut <= taken);
    holder.shutdown().await;
    standby.shutdown().await;
}

/// The link stalls for longer than the holder's deadline but less than the
/// server timeout, then comes back (the proxy forwards nothing meanwhile and
/// delivers every byte, and a close, in order after). The holder gives up
/// at its deadline; its instance takes 800 ms to stop. The connection must
/// stay open until then: closing it at once would let the server free the
/// ids the moment the link returns, while the old instance is still
/// stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_gives_up_keeps_its_ids_until_its_instance_has_stopped() {
    let pg = PgServer::start();
    let probe = Probe::new();
    let proxy = BackendProxy::start(server(&pg), None).await;
    let slow = |probe: &Probe| {
        probe
            .slow_spec("slow-stop", Duration::from_millis(800))
            .shutdown(Duration::from_secs(1))
    };
    let holder = Runtime::builder()
        .rebalance(false)
        .node("holder")
        .backend(via_proxy(&pg, &proxy))
        .child(slow(&probe))
        .start()
        .await
        .unwrap();
    probe.wait_start("holder", "slow-stop").await;
    let standby = standby_waiting(Postgres::new(pg.url()), slow(&probe)).await;

    // Stall past the holder's 1.77 s deadline, within the 3 s server timeout.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    proxy.heal();

    let taken = probe.wait_start("standby", "slow-stop").await.at;
    let stopped = lease_lost(&probe, "slow-stop").unwrap_or_else(|| {
        panic!("the holder had not stopped when the standby started: {probe:?}")
    });
    assert!(stopped < taken);
    holder.shutdown().await;
    standby.shutdown().await;
}

/// Starts node `standby` on `backend` with `spec` and waits until it
/// waits for the spec's id (held by the other node).
async fn standby_waiting(backend: Postgres, spec: ChildSpec) -> RuntimeHandle {
    let id = spec.id().to_string();
    let standby = Runtime::builder()
        .rebalance(false)
        .node("standby")
        .backend(backend)
        .child(spec)
        .start()
        .await
        .unwrap();
    timeout(
        GUARD,
        standby.wait_until(|s| matches!(s.get(&id), Some(SingletonState::Waiting { .. }))),
    )
    .await
    .unwrap();
    standby
}

/// The first start of `id` after `after`, waited for (hang-guarded).
async fn first_start_after(probe: &Probe, id: &str, after: Instant) -> Event {
    let is = |e: &Event| e.is_start() && e.id == id && e.at > after;
    let events = probe
        .wait_for(&format!("a start of `{id}` after the cut"), |events| {
            events.iter().any(is)
        })
        .await;
    events.into_iter().find(is).expect("just found")
}

/// A shutdown budget larger than the server timeout raises the server's
/// dead-peer detection for the session (here from 3 s to 9 s). The link to
/// the server then really dies (every packet lost, in a network namespace)
/// for longer than the client socket's own timeout used to be (2.77 s), and
/// comes back before the raised server timeout. The holder gives up at its
/// deadline and its instance takes 7 s to stop. No tenure may begin anywhere
/// before that instance has stopped: if the client's kernel had aborted the
/// socket meanwhile, its answer to the server's next keepalive would be a
/// reset, and the server would free the id at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stop_budget_survives_a_dead_link_that_comes_back() {
    let ns = highlander_tests::netns::Netns::create();
    let pg = PgServer::start_in(&ns);
    let probe = Probe::new();
    let budget = Duration::from_secs(8);
    let stop = Duration::from_secs(7);
    let slow = |probe: &Probe| probe.slow_spec("long", stop).shutdown(budget);
    let holder = Runtime::builder()
        .rebalance(false)
        .node("holder")
        .backend(
            Postgres::new(pg.url_at(ns.ns_ip()))
                .heartbeat(Duration::from_millis(200))
                .server_timeout(SERVER_TIMEOUT)
                .margin(Duration::from_millis(200)),
        )
        .child(slow(&probe))
        .start()
        .await
        .unwrap();
    probe.wait_start("holder", "long").await;
    // The standby reaches the server over its Unix socket: the cut does
    // not touch it.
    let standby = standby_waiting(Postgres::new(pg.url_via_socket()), slow(&probe)).await;

    ns.cut();
    let cut = Instant::now();
    // Past the client's old socket timeout, within the raised server timeout.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    ns.restore();

    let began = first_start_after(&probe, "long", cut).await;
    let who = &began.node;
    let stopped = lease_lost(&probe, "long").unwrap_or_else(|| {
        panic!(
            "`{who}` began {:?} after the cut, while the old instance was still running: {probe:?}",
            began.at - cut,
        )
    });
    assert!(
        stopped < began.at,
        "`{who}` began before the old instance stopped"
    );
    holder.shutdown().await;
    standby.shutdown().await;
}

/// `idle_session_timeout` (Postgres 14+) set for the role would end a quiet
/// session, and so free its ids, long before the dead-peer detection the
/// holder vouches against. The session turns it off for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_idle_session_timeout_does_not_end_the_session() {
    let pg = PgServer::start();
    pg.psql("ALTER ROLE highlander SET idle_session_timeout = '1s'");
    let probe = Probe::new();
    // A heartbeat slower than the role's idle timeout: the session is idle
    // for 4 s at a time.
    let holder = Runtime::builder()
        .rebalance(false)
        .node("holder")
        .backend(Postgres::new(pg.url()).heartbeat(Duration::from_secs(4)))
        .child(spec(&probe))
        .start()
        .await
        .unwrap();
    probe.wait_start("holder", "guarded").await;
    let pid = |rows: Vec<Vec<Option<String>>>| rows.first().and_then(|r| r[0].clone());
    let query = "SELECT pid FROM pg_stat_activity WHERE application_name = 'holder'";
    let before = pid(pg.sql(query).await).expect("the holder's session");
    // Longer than the idle timeout, and past one heartbeat.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        lease_lost(&probe, "guarded"),
        None,
        "the holder lost its lease: {probe:?}"
    );
    let after = pid(pg.sql(query).await);
    assert_eq!(
        after.as_deref(),
        Some(before.as_str()),
        "the session was replaced"
    );
    assert!(holder.status().is_running("guarded"));
    holder.shutdown().await;
}

/// A claim whose stop budget needs a higher server timeout than the session
/// has raises it first. When the raise fails (here the administrator revoked
/// `set_config` from PUBLIC), the server still ends a silent session after
/// the old timeout, too soon for that budget: the id must not be granted,
/// neither now nor on a retry, while ids whose budget the old timeout covers
/// are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_raise_of_the_server_timeout_is_not_recorded() {
    let pg = PgServer::start();
    pg.sql("REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC")
        .await;
    let probe = Probe::new();
    // The 5 s budget needs a 6 s server timeout; the session has 3 s.
    let holder = Runtime::builder()
        .rebalance(false)
        .node("holder")
        .backend(
            Postgres::new(pg.url())
                .heartbeat(Duration::from_millis(200))
                .server_timeout(SERVER_TIMEOUT)
                .margin(Duration::from_millis(200)),
        )
        .child(
            probe
                .slow_spec("long", Duration::from_millis(1))
                .shutdown(Duration::from_secs(5)),
        )
        .child(spec(&probe))
        .start()
        .await
        .unwrap();
    // Count the failed claims of `long` (each one a Retrying state entered
    // anew), until it has failed three times or was granted.
    let mut failures = 0;
    let mut was_retrying = false;
    let status = timeout(
        GUARD,
        holder.wait_until(|s| {
            let retrying = matches!(s.get("long"), Some(SingletonState::Retrying { .. }));
            if retrying && !was_retrying {
                failures += 1;
            }
            was_retrying = retrying;
            s.is_running("long") || (failures >= 3 && s.is_running("guarded"))
        }),
    )
    .await
    .expect("`long` neither ran nor failed three times");
    assert!(
        !status.is_running("long"),
        "`long` was granted with a 3 s server timeout for its 5 s stop budget: {status:#?}"
    );
    match status.get("long") {
        Some(SingletonState::Retrying { error }) => {
            assert!(error.contains("set_config"), "{error}");
            assert!(
                !error.contains(highlander_tests::postgres::PASSWORD),
                "{error}"
            );
        }
        other => panic!("`long`: {other:?}"),
    }
    holder.shutdown().await;
}
