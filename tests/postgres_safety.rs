//! The lease inequality, tested: when the network between the holder and
//! the server goes silent (no packet either way, nothing closed), the holder
//! must have stopped its instance before the server could free its ids.
//!
//! The holder reaches Postgres through a proxy the test controls. The test
//! silences the proxy (it keeps both sockets open and forwards nothing,
//! like a dead link), and closes the server side exactly `X` after the last
//! byte it forwarded from the holder, `X` being the dead-peer detection the
//! holder asked the server for: the earliest moment a real server could end
//! the session. A second node, connected directly, then takes over. The
//! holder's `terminate(LeaseLost)` must come before that moment.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use highlander::backend::postgres::Postgres;
use highlander::{ChildSpec, Context, Runtime, Service, ShutdownReason, SingletonState};
use highlander_tests::postgres::PgServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

const GUARD: Duration = Duration::from_secs(60);
/// The holder's settings: heartbeat 200 ms, server timeout 3 s, margin
/// 200 ms, stop budget 1 s: it vouches for 3 s × 0.99 − 1 s − 0.2 s =
/// 1.77 s after its last successful round trip.
const SERVER_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct Times(Arc<Mutex<Vec<(String, Instant)>>>, watch::Sender<usize>);

impl Default for Times {
    fn default() -> Self {
        Times(Arc::default(), watch::Sender::new(0))
    }
}

impl Times {
    fn mark(&self, what: String) {
        self.0.lock().unwrap().push((what, Instant::now()));
        self.1.send_modify(|n| *n += 1);
    }

    /// Waits (event-driven, hang-guarded) until `what` has been marked.
    async fn wait(&self, what: &str) -> Instant {
        let mut rx = self.1.subscribe();
        timeout(GUARD, async {
            loop {
                rx.borrow_and_update();
                if let Some(at) = self.at(what) {
                    return at;
                }
                let _ = rx.changed().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no `{what}` within {GUARD:?}: {:?}", self.0.lock().unwrap()))
    }
    fn at(&self, what: &str) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, t)| *t)
    }
}

struct Probe {
    times: Times,
    node: String,
}

impl Service for Probe {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.node = ctx.node().to_string();
        self.times.mark(format!("start {}", self.node));
        ctx.cancelled().await;
        Ok(())
    }
    async fn terminate(&mut self, reason: ShutdownReason) {
        self.times.mark(format!("stop {} {reason}", self.node));
    }
}

fn spec(times: &Times) -> ChildSpec {
    let times = times.clone();
    ChildSpec::new("guarded", move |_ctx| {
        let times = times.clone();
        async move {
            Ok(Probe {
                times,
                node: String::new(),
            })
        }
    })
    .shutdown(Duration::from_secs(1))
}

/// A TCP proxy to `target` that can go silent. After it does, it closes
/// the server side `cut_after` past the last byte it forwarded upstream
/// and records that moment.
struct Proxy {
    port: u16,
    silent: watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: u16, cut_after: Duration, times: Times) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (silent, _) = watch::channel(false);
        let silent_tx = silent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let silent = silent_tx.subscribe();
                if *silent.borrow() {
                    // A dead link: accept nothing beyond the handshake.
                    tokio::spawn(async move {
                        let _held = client;
                        std::future::pending::<()>().await;
                    });
                    continue;
                }
                let server = TcpStream::connect(("127.0.0.1", target)).await.unwrap();
                let times = times.clone();
                tokio::spawn(relay(client, server, silent, cut_after, times));
            }
        });
        Proxy { port, silent }
    }

    fn silence(&self) {
        self.silent.send_replace(true);
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    silent: watch::Receiver<bool>,
    cut_after: Duration,
    times: Times,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let last_up = Arc::new(Mutex::new(Instant::now()));
    let up = {
        let silent = silent.clone();
        let last_up = last_up.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    // Over a dead link the holder's close never arrives.
                    Ok(0) | Err(_) if *silent.borrow() => std::future::pending().await,
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if *silent.borrow() {
                    continue;
                }
                // Noted before writing: the server hears it no earlier.
                *last_up.lock().unwrap() = Instant::now();
                if sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = {
        let silent = silent.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) if *silent.borrow() => std::future::pending().await,
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if *silent.borrow() {
                    continue;
                }
                if cw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let cut = async {
        let mut silent = silent.clone();
        let _ = silent.wait_for(|s| *s).await;
        let at = *last_up.lock().unwrap() + cut_after;
        tokio::time::sleep_until(at).await;
        // Returning drops the server side's halves: the server sees the
        // session end, as its own dead-peer detection would make it.
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut => times.mark("server cut".to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_holder_stops_before_the_server_could_free_its_ids() {
    let pg = PgServer::start();
    let times = Times::default();
    let proxy = Proxy::start(pg.port(), SERVER_TIMEOUT, times.clone()).await;
    let via_proxy = pg
        .url()
        .replace(&format!(":{}/", pg.port()), &format!(":{}/", proxy.port));
    let holder = Runtime::builder()
        .node("holder")
        .backend(
            Postgres::new(via_proxy)
                .heartbeat(Duration::from_millis(200))
                .server_timeout(SERVER_TIMEOUT)
                .margin(Duration::from_millis(200)),
        )
        .child(spec(&times))
        .start()
        .await
        .unwrap();
    timeout(GUARD, holder.wait_until(|s| s.is_running("guarded")))
        .await
        .unwrap();
    let standby = Runtime::builder()
        .node("standby")
        .backend(Postgres::new(pg.url()))
        .child(spec(&times))
        .start()
        .await
        .unwrap();
    timeout(
        GUARD,
        standby.wait_until(|s| matches!(s.get("guarded"), Some(SingletonState::Waiting { .. }))),
    )
    .await
    .unwrap();
    times.wait("start holder").await;

    proxy.silence();
    timeout(GUARD, standby.wait_until(|s| s.is_running("guarded")))
        .await
        .expect("the standby takes over once the server ends the holder's session");
    times.wait("start standby").await;

    let stopped = times
        .at("stop holder lease lost")
        .unwrap_or_else(|| panic!("the holder never gave up: {:?}", times.0.lock().unwrap()));
    let cut = times
        .at("server cut")
        .expect("the proxy cut the server side");
    let taken = times.at("start standby").unwrap();
    assert!(
        stopped < cut,
        "the holder stopped {:?} after the server could free its ids",
        stopped - cut
    );
    assert!(cut <= taken);
    holder.shutdown().await;
    standby.shutdown().await;
}

/// A proxy that can stall: while stalled it forwards nothing but keeps
/// every byte (and a close) in order, and delivers them on resume, like a
/// link that stops for a while and comes back.
struct StallProxy {
    port: u16,
    stalled: watch::Sender<bool>,
}

impl StallProxy {
    async fn start(target: u16) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = watch::Sender::new(false);
        let tx = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(("127.0.0.1", target)).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, tx.subscribe()));
                tokio::spawn(pump(sr, cw, tx.subscribe()));
            }
        });
        StallProxy { port, stalled }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut queue: Vec<u8> = Vec::new();
    let mut eof = false;
    loop {
        let is_stalled = *stalled.borrow_and_update();
        if !is_stalled {
            if !queue.is_empty() {
                if to.write_all(&queue).await.is_err() {
                    return;
                }
                queue.clear();
            }
            if eof {
                let _ = to.shutdown().await;
                return;
            }
        }
        tokio::select! {
            read = from.read(&mut buf), if !eof => match read {
                Ok(0) | Err(_) => eof = true,
                Ok(n) if *stalled.borrow() => queue.extend_from_slice(&buf[..n]),
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = stalled.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Stops slowly: `terminate` takes most of the 1 s budget.
struct SlowStop {
    times: Times,
    node: String,
}

impl Service for SlowStop {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.node = ctx.node().to_string();
        self.times.mark(format!("start {}", self.node));
        ctx.cancelled().await;
        Ok(())
    }
    async fn terminate(&mut self, reason: ShutdownReason) {
        tokio::time::sleep(Duration::from_millis(800)).await;
        self.times.mark(format!("stopped {} {reason}", self.node));
    }
}

/// The link stalls for longer than the holder's deadline but less than the
/// server timeout, then comes back. The holder gives up at its deadline;
/// its instance takes 800 ms to stop. The connection must stay open until
/// then: closing it at once would let the server free the ids the moment
/// the link returns, while the old instance is still stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_gives_up_keeps_its_ids_until_its_instance_has_stopped() {
    let pg = PgServer::start();
    let times = Times::default();
    let proxy = StallProxy::start(pg.port()).await;
    let via_proxy = pg
        .url()
        .replace(&format!(":{}/", pg.port()), &format!(":{}/", proxy.port));
    let slow = |times: &Times| {
        let times = times.clone();
        ChildSpec::new("slow-stop", move |_ctx| {
            let times = times.clone();
            async move {
                Ok(SlowStop {
                    times,
                    node: String::new(),
                })
            }
        })
        .shutdown(Duration::from_secs(1))
    };
    let holder = Runtime::builder()
        .node("holder")
        .backend(
            Postgres::new(via_proxy)
                .heartbeat(Duration::from_millis(200))
                .server_timeout(SERVER_TIMEOUT)
                .margin(Duration::from_millis(200)),
        )
        .child(slow(&times))
        .start()
        .await
        .unwrap();
    times.wait("start holder").await;
    let standby = Runtime::builder()
        .node("standby")
        .backend(Postgres::new(pg.url()))
        .child(slow(&times))
        .start()
        .await
        .unwrap();
    timeout(
        GUARD,
        standby.wait_until(|s| matches!(s.get("slow-stop"), Some(SingletonState::Waiting { .. }))),
    )
    .await
    .unwrap();

    // Stall past the holder's 1.77 s deadline, within the 3 s server timeout.
    proxy.stalled.send_replace(true);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    proxy.stalled.send_replace(false);

    let taken = times.wait("start standby").await;
    let stopped = times.at("stopped holder lease lost").unwrap_or_else(|| {
        panic!(
            "the holder had not stopped when the standby started: {:?}",
            times.0.lock().unwrap()
        )
    });
    assert!(stopped < taken);
    holder.shutdown().await;
    standby.shutdown().await;
}

/// Stops slowly: `terminate` takes `stop`, within its budget, and marks
/// `stopped <node> <reason>` when done.
struct Slow {
    times: Times,
    node: String,
    stop: Duration,
}

impl Service for Slow {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.node = ctx.node().to_string();
        self.times.mark(format!("start {}", self.node));
        ctx.cancelled().await;
        Ok(())
    }
    async fn terminate(&mut self, reason: ShutdownReason) {
        tokio::time::sleep(self.stop).await;
        self.times.mark(format!("stopped {} {reason}", self.node));
    }
}

fn slow(id: &str, times: &Times, budget: Duration, stop: Duration) -> ChildSpec {
    let times = times.clone();
    ChildSpec::new(id, move |_ctx| {
        let times = times.clone();
        async move {
            Ok(Slow {
                times,
                node: String::new(),
                stop,
            })
        }
    })
    .shutdown(budget)
}

impl Times {
    /// The first `start …` marked after `after`, waited for (hang-guarded).
    async fn first_start_after(&self, after: Instant) -> (String, Instant) {
        let mut rx = self.1.subscribe();
        timeout(GUARD, async {
            loop {
                rx.borrow_and_update();
                let found = self
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(w, t)| w.starts_with("start ") && *t > after)
                    .cloned();
                if let Some(found) = found {
                    return found;
                }
                let _ = rx.changed().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no start within {GUARD:?}: {:?}", self.0.lock().unwrap()))
    }
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
    let times = Times::default();
    let budget = Duration::from_secs(8);
    let stop = Duration::from_secs(7);
    let holder = Runtime::builder()
        .node("holder")
        .backend(
            Postgres::new(pg.url_at(ns.ns_ip()))
                .heartbeat(Duration::from_millis(200))
                .server_timeout(SERVER_TIMEOUT)
                .margin(Duration::from_millis(200)),
        )
        .child(slow("long", &times, budget, stop))
        .start()
        .await
        .unwrap();
    times.wait("start holder").await;
    // The standby reaches the server over its Unix socket: the cut does
    // not touch it.
    let standby = Runtime::builder()
        .node("standby")
        .backend(Postgres::new(pg.url_via_socket()))
        .child(slow("long", &times, budget, stop))
        .start()
        .await
        .unwrap();
    timeout(
        GUARD,
        standby.wait_until(|s| matches!(s.get("long"), Some(SingletonState::Waiting { .. }))),
    )
    .await
    .unwrap();

    ns.cut();
    let cut = Instant::now();
    // Past the client's old socket timeout, within the raised server timeout.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    ns.restore();

    let (who, began) = times.first_start_after(cut).await;
    let stopped = times.at("stopped holder lease lost").unwrap_or_else(|| {
        panic!(
            "`{who}` began {:?} after the cut, while the old instance was still running: {:?}",
            began - cut,
            times.0.lock().unwrap()
        )
    });
    assert!(
        stopped < began,
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
    let times = Times::default();
    // A heartbeat slower than the role's idle timeout: the session is idle
    // for 4 s at a time.
    let holder = Runtime::builder()
        .node("holder")
        .backend(Postgres::new(pg.url()).heartbeat(Duration::from_secs(4)))
        .child(spec(&times))
        .start()
        .await
        .unwrap();
    times.wait("start holder").await;
    let pid = |rows: Vec<Vec<Option<String>>>| rows.first().and_then(|r| r[0].clone());
    let query = "SELECT pid FROM pg_stat_activity WHERE application_name = 'holder'";
    let before = pid(pg.sql(query).await).expect("the holder's session");
    // Longer than the idle timeout, and past one heartbeat.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        times.at("stop holder lease lost"),
        None,
        "the holder lost its lease: {:?}",
        times.0.lock().unwrap()
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
    let times = Times::default();
    // The 5 s budget needs a 6 s server timeout; the session has 3 s.
    let holder = Runtime::builder()
        .node("holder")
        .backend(
            Postgres::new(pg.url())
                .heartbeat(Duration::from_millis(200))
                .server_timeout(SERVER_TIMEOUT)
                .margin(Duration::from_millis(200)),
        )
        .child(slow(
            "long",
            &times,
            Duration::from_secs(5),
            Duration::from_millis(1),
        ))
        .child(spec(&times))
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
