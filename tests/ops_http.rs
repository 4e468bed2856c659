//! The operations endpoint over real loopback sockets: health, readiness
//! (also while the backend cannot be reached), status JSON, Prometheus text,
//! the page, step-down with and without a token, and start-up errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use highlander::backend::{Backend, Claim, ClaimRequest, Holder, Member, Session};
use highlander::{BoxFuture, ChildSpec, Context, Error, MemoryCluster, Runtime, Service, Status};
use highlander_tests::ops::{get, request};

struct Idle;
impl Service for Idle {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

fn idle(id: &str) -> ChildSpec {
    ChildSpec::new(id, |_ctx| async { Ok(Idle) })
}

/// The memory backend with a switch that makes the engine unreachable:
/// every call fails while it is on (fault injection around the real
/// backend, as a lost connection would).
#[derive(Clone)]
struct Switchable {
    inner: MemoryCluster,
    down: Arc<AtomicBool>,
}

struct SwitchableSession {
    inner: Arc<dyn Session>,
    down: Arc<AtomicBool>,
}

impl Backend for Switchable {
    fn connect(&self, node: &str) -> BoxFuture<'static, highlander::Result<Arc<dyn Session>>> {
        let connect = self.inner.connect(node);
        let down = self.down.clone();
        Box::pin(async move {
            let inner = connect.await?;
            Ok(Arc::new(SwitchableSession { inner, down }) as Arc<dyn Session>)
        })
    }
    fn describe(&self) -> String {
        "memory (switchable)".into()
    }
}

impl SwitchableSession {
    fn check(&self) -> highlander::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::backend(
                highlander::BackendErrorKind::Unreachable,
                "the engine is unreachable (test switch)",
            ));
        }
        Ok(())
    }
}

impl Session for SwitchableSession {
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, highlander::Result<Claim>> {
        Box::pin(async move {
            self.check()?;
            self.inner.try_claim(request).await
        })
    }
    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, highlander::Result<()>> {
        self.inner.release(id, token)
    }
    fn holder(&self, id: &str) -> BoxFuture<'_, highlander::Result<Option<Holder>>> {
        let id = id.to_string();
        Box::pin(async move {
            self.check()?;
            self.inner.holder(&id).await
        })
    }
    fn members(&self) -> BoxFuture<'_, highlander::Result<Vec<Member>>> {
        Box::pin(async move {
            self.check()?;
            self.inner.members().await
        })
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        self.inner.close()
    }
}

/// Polls `path` until it answers `status` (hang guard only).
async fn until_status(addr: std::net::SocketAddr, path: &str, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = get(addr, path).await.unwrap();
        if a.status == status {
            return a.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never answered {status}: last {} {}",
            a.status,
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_and_step_down_needs_the_token() {
    let cluster = MemoryCluster::new();
    let a = Runtime::builder()
        .node("http-a")
        .backend(cluster.clone())
        .child(idle("web"))
        .child(idle("tenant/acme"))
        .http("127.0.0.1:0")
        .http_token("s3cret-token")
        .start()
        .await
        .unwrap();
    a.wait_until(|s| s.running().count() == 2).await;
    let b = Runtime::builder()
        .node("http-b")
        .backend(cluster.clone())
        .child(idle("web"))
        .child(idle("tenant/acme"))
        .http("127.0.0.1:0")
        .start()
        .await
        .unwrap();
    b.wait_until(|s| {
        s.singletons
            .iter()
            .all(|s| matches!(s.state, highlander::SingletonState::Waiting { .. }))
    })
    .await;
    let addr = a.http_addr().expect("serving");
    assert!(addr.ip().is_loopback() && addr.port() != 0);

    let health = get(addr, "/healthz").await.unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(
        until_status(addr, "/readyz", 200).await.trim(),
        "ready: the backend session is up"
    );

    // /status is the Rust API's Status, as JSON.
    let body = get(addr, "/status").await.unwrap();
    assert_eq!(body.header("content-type"), Some("application/json"));
    let status: Status = serde_json::from_str(&body.body).unwrap();
    assert_eq!(status.node, "http-a");
    assert_eq!(status.singletons, a.status().singletons);
    assert!(status.is_running("web"));
    let raw: serde_json::Value = serde_json::from_str(&body.body).unwrap();
    assert_eq!(raw["singletons"][0]["state"]["state"], "running");
    assert!(raw["singletons"][0]["since_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    // b's view names a as the holder, with its token.
    let b_status: Status =
        serde_json::from_str(&get(b.http_addr().unwrap(), "/status").await.unwrap().body).unwrap();
    let web = b_status.singletons.iter().find(|s| s.id == "web").unwrap();
    assert_eq!(web.holder("http-b").unwrap().node, "http-a");
    assert_eq!(
        web.holder("http-b").unwrap().token,
        status.singletons[0].token()
    );

    let page = get(addr, "/").await.unwrap();
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.body.contains("<script>") && page.body.contains("fetch(\"status\""));

    let metrics = get(addr, "/metrics").await.unwrap();
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l == r#"highlander_running{node="http-a",id="web"} 1"#),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains(r#"highlander_claim_latency_seconds_bucket{node="http-a",le="0.005"}"#),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("# HELP highlander_running "));

    let holders = request(addr, "POST", "/holders", &[], r#"["web","nope"]"#)
        .await
        .unwrap();
    let holders: serde_json::Value = serde_json::from_str(&holders.body).unwrap();
    assert_eq!(holders["web"]["node"], "http-a");
    assert!(holders["nope"].is_null());

    // Step-down: disabled without a token (b has none), refused without
    // or with a wrong one, done with the right one.
    let b_addr = b.http_addr().unwrap();
    let off = request(b_addr, "POST", "/step-down/web", &[], "")
        .await
        .unwrap();
    assert_eq!(off.status, 403);
    assert_eq!(off.body.lines().count(), 1, "{}", off.body);
    assert!(off.body.contains("HIGHLANDER_HTTP_TOKEN"), "{}", off.body);
    let none = request(addr, "POST", "/step-down/web", &[], "")
        .await
        .unwrap();
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let wrong = request(
        addr,
        "POST",
        "/step-down/web",
        &["Authorization: Bearer s3cret-tokem"],
        "",
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);
    let unknown = request(
        addr,
        "POST",
        "/step-down/nope",
        &["Authorization: Bearer s3cret-token"],
        "",
    )
    .await
    .unwrap();
    assert_eq!(unknown.status, 404);
    assert!(a.status().is_running("web"), "no step-down yet");
    let ok = request(
        addr,
        "POST",
        "/step-down/tenant/acme",
        &["Authorization: Bearer s3cret-token"],
        "",
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body);
    b.wait_until(|s| s.is_running("tenant/acme")).await;
    assert!(a.status().is_running("web"));
    let again = request(
        addr,
        "POST",
        "/step-down/tenant/acme",
        &["Authorization: Bearer s3cret-token"],
        "",
    )
    .await
    .unwrap();
    assert_eq!(again.status, 409, "{}", again.body);

    a.shutdown().await;
    b.shutdown().await;
    assert!(
        get(addr, "/healthz").await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_backend_session() {
    let down = Arc::new(AtomicBool::new(false));
    let backend = Switchable {
        inner: MemoryCluster::new(),
        down: down.clone(),
    };
    let h = Runtime::builder()
        .node("ready-a")
        .backend(backend)
        .child(idle("r"))
        .http("127.0.0.1:0")
        .start()
        .await
        .unwrap();
    let addr = h.http_addr().unwrap();
    until_status(addr, "/readyz", 200).await;
    down.store(true, Ordering::SeqCst);
    let body = until_status(addr, "/readyz", 503).await;
    assert_eq!(
        body.trim(),
        "not ready: the backend session is down (see /status)"
    );
    assert_eq!(
        get(addr, "/healthz").await.unwrap().status,
        200,
        "alive all the same"
    );
    assert!(!h.status().session_up);
    down.store(false, Ordering::SeqCst);
    until_status(addr, "/readyz", 200).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_addresses_fail_start_up_with_one_line() {
    let e = Runtime::builder()
        .node("bad-a")
        .backend(MemoryCluster::new())
        .http("example.com:80")
        .start()
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("Builder::http: cannot use `example.com:80`"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = Runtime::builder()
        .node("bad-b")
        .backend(MemoryCluster::new())
        .http(format!("127.0.0.1:{port}"))
        .start()
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("address is in use"), "{msg}");
    assert!(!msg.contains('\n'));

    // A port alone means loopback.
    let h = Runtime::builder()
        .node("bad-c")
        .backend(MemoryCluster::new())
        .http("0")
        .start()
        .await
        .unwrap();
    assert!(h.http_addr().unwrap().ip().is_loopback());
    h.shutdown().await;
}

/// Readiness on a real Postgres server: down while the server is stopped,
/// up again once the backend has reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_real_postgres_server() {
    let mut pg = highlander_tests::postgres::PgServer::start();
    let h = Runtime::builder()
        .node("ready-pg")
        .backend_url(pg.url())
        .child(idle("pg-ready"))
        .http("127.0.0.1:0")
        .start()
        .await
        .unwrap();
    h.wait_until(|s| s.is_running("pg-ready")).await;
    let addr = h.http_addr().unwrap();
    until_status(addr, "/readyz", 200).await;
    let status: Status = serde_json::from_str(&get(addr, "/status").await.unwrap().body).unwrap();
    assert!(
        status.members.iter().any(|m| m.node == "ready-pg"),
        "{:?}",
        status.members
    );

    tokio::task::block_in_place(|| pg.stop());
    let body = until_status(addr, "/readyz", 503).await;
    assert!(body.starts_with("not ready"), "{body}");
    assert_eq!(get(addr, "/healthz").await.unwrap().status, 200);

    tokio::task::block_in_place(|| pg.start_again());
    until_status(addr, "/readyz", 200).await;
    h.wait_until(|s| s.is_running("pg-ready")).await;
    h.shutdown().await;
}
