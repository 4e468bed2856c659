//! The fleet routes of the operations endpoint over real loopback sockets:
//! `POST /drain`, `POST /resume` and `POST /transfer/{id}?to=NODE`, each
//! behind the same bearer token as step-down, on the memory backend.
//! Deadlines are hang guards only.

use std::net::SocketAddr;
use std::time::Duration;

use highlander::{MemoryCluster, Runtime, RuntimeHandle, ShutdownReason, Status};
use highlander_tests::ops::{Answer, get, request};
use highlander_tests::probe::Probe;
use highlander_tests::wait::{GUARD, within};

const TOKEN: &str = "fleet-ops-token";
const AUTH: &str = "Authorization: Bearer fleet-ops-token";

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tenant/{i}")).collect()
}

/// Starts `node` on `cluster` with a probe instance for each of `ids`,
/// serving the endpoint on a free loopback port, with the token when
/// `token` is set.
async fn start(
    cluster: &MemoryCluster,
    probe: &Probe,
    node: &str,
    ids: &[String],
    token: bool,
    rebalance: bool,
) -> RuntimeHandle {
    let mut builder = Runtime::builder()
        .node(node)
        .backend(cluster.clone())
        .rebalance(rebalance)
        .http("127.0.0.1:0");
    if token {
        builder = builder.http_token(TOKEN);
    }
    for id in ids {
        builder = builder.child(probe.spec(id).shutdown(Duration::from_secs(1)));
    }
    builder.start().await.expect("the node starts")
}

async fn post(addr: SocketAddr, path: &str, headers: &[&str]) -> Answer {
    request(addr, "POST", path, headers, "")
        .await
        .expect("the endpoint answers")
}

/// The answer's JSON body, after checking its status and content type.
fn json(answer: &Answer, status: u16) -> serde_json::Value {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    serde_json::from_str(&answer.body).expect("a JSON body")
}

/// A one-line text answer with `status`; returns the line.
fn line(answer: &Answer, status: u16) -> String {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body.lines().count(), 1, "{}", answer.body);
    answer.body.trim().to_string()
}

fn held(status: &Status) -> Vec<String> {
    status
        .singletons
        .iter()
        .filter(|s| s.token().is_some())
        .map(|s| s.id.clone())
        .collect()
}

/// Waits until `node` has seen `other`'s profile (what transfer and a
/// drain's handoff go by).
async fn knows(node: &RuntimeHandle, other: &str) {
    within(&format!("{} knows {other}", node.node()), GUARD, async {
        while !node
            .status()
            .members
            .iter()
            .any(|m| m.node == other && m.reachable && m.profile.is_some())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_routes_need_the_token_as_step_down_does() {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let all = ids(3);
    let open = start(&cluster, &probe, "open", &all, false, false).await;
    open.wait_until(|s| s.running().count() == 3).await;
    let closed = start(&cluster, &probe, "closed", &all, true, false).await;
    let (open_addr, closed_addr) = (open.http_addr().unwrap(), closed.http_addr().unwrap());

    let routes = [
        ("drain", "/drain"),
        ("resume", "/resume"),
        ("transfer", "/transfer/tenant/0?to=closed"),
    ];
    for (action, path) in routes {
        // No token configured: disabled, whatever is sent.
        for headers in [&[][..], &[AUTH][..]] {
            let off = line(&post(open_addr, path, headers).await, 403);
            assert!(
                off.starts_with(&format!("{action} over HTTP is disabled"))
                    && off.contains("HIGHLANDER_HTTP_TOKEN"),
                "{off}"
            );
        }
        // A token configured: refused without it or with a wrong one.
        for headers in [
            &[][..],
            &["Authorization: Bearer fleet-ops-tokem"][..],
            &["Authorization: Basic fleet-ops-token"][..],
        ] {
            let refused = post(closed_addr, path, headers).await;
            line(&refused, 401);
            assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
        }
        // Read-only verbs do not reach them.
        assert_eq!(get(closed_addr, path).await.unwrap().status, 405, "{path}");
    }
    // Nothing was done.
    assert!(!open.is_draining() && !closed.is_draining());
    assert_eq!(open.status().running().count(), 3);
    assert!(probe.filter(|e| e.is_stop()).is_empty(), "{probe:?}");
    open.shutdown().await;
    closed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_resume_over_http() {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let all = ids(40);
    let a = start(&cluster, &probe, "a", &all, true, true).await;
    let b = start(&cluster, &probe, "b", &all, false, true).await;
    // Rebalanced: both hold some.
    within("both nodes hold ids", GUARD, async {
        loop {
            let (ca, cb) = (a.changed(), b.changed());
            let (sa, sb) = (a.status(), b.status());
            let (ha, hb) = (held(&sa), held(&sb));
            if !ha.is_empty() && !hb.is_empty() && ha.len() + hb.len() == all.len() {
                return;
            }
            tokio::select! { _ = ca => {}, _ = cb => {} }
        }
    })
    .await;
    let addr = a.http_addr().unwrap();
    let had = held(&a.status());

    let first = json(&post(addr, "/drain", &[AUTH]).await, 200);
    assert_eq!(first["node"], "a");
    assert_eq!(first["draining"], true);
    assert_eq!(first["started"], true);
    assert!(a.is_draining());
    let status: Status = serde_json::from_str(&get(addr, "/status").await.unwrap().body).unwrap();
    assert!(status.draining, "GET /status shows the drain");

    // Every id ends on b; each of a's stopped with `moved`.
    within(
        "a drained",
        GUARD,
        b.wait_until(|s| all.iter().all(|id| s.is_running(id))),
    )
    .await;
    within(
        "a holds nothing",
        GUARD,
        a.wait_until(|s| held(s).is_empty()),
    )
    .await;
    for id in &had {
        assert_eq!(
            probe.stopped(id, "a", &ShutdownReason::Moved),
            1,
            "{id}: {probe:?}"
        );
    }
    // Asking again joins the drain and reads the count.
    let again = json(&post(addr, "/drain", &[AUTH]).await, 200);
    assert_eq!(again["started"], false);
    assert_eq!(again["held"], 0);

    let resumed = json(&post(addr, "/resume", &[AUTH]).await, 200);
    assert_eq!(resumed["resumed"], true);
    assert_eq!(resumed["draining"], false);
    assert!(!a.is_draining());
    let status: Status = serde_json::from_str(&get(addr, "/status").await.unwrap().body).unwrap();
    assert!(!status.draining);
    // Competing again, a gets its share back (rebalancing is on).
    within(
        "a runs ids again",
        GUARD,
        a.wait_until(|s| s.running().count() > 0),
    )
    .await;
    let idle = json(&post(addr, "/resume", &[AUTH]).await, 200);
    assert_eq!(idle["resumed"], false, "nothing to call off");

    a.shutdown().await;
    b.shutdown().await;
    probe.assert_one_at_a_time();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_over_http_moves_one_id_and_refuses_in_one_line() {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    let shared = ids(5);
    let mut a_ids = shared.clone();
    a_ids.push("mine".to_string());
    // a first: it holds every id (rebalancing off, so nothing moves back).
    let a = start(&cluster, &probe, "a", &a_ids, true, false).await;
    a.wait_until(|s| s.running().count() == a_ids.len()).await;
    let b = start(&cluster, &probe, "b", &shared, true, false).await;
    knows(&a, "b").await;
    let (addr, b_addr) = (a.http_addr().unwrap(), b.http_addr().unwrap());

    // Refusals, one line each, moving nothing.
    let missing = line(&post(addr, "/transfer/tenant/0", &[AUTH]).await, 400);
    assert!(missing.contains("?to=NODE"), "{missing}");
    let empty = line(&post(addr, "/transfer/tenant/0?to=", &[AUTH]).await, 400);
    assert!(empty.contains("?to=NODE"), "{empty}");
    let stray = line(&post(addr, "/transfer/tenant/0?node=b", &[AUTH]).await, 400);
    assert!(stray.contains("unknown parameter `node`"), "{stray}");
    let twice = line(
        &post(addr, "/transfer/tenant/0?to=b&to=b", &[AUTH]).await,
        400,
    );
    assert!(twice.contains("twice"), "{twice}");
    let escape = line(&post(addr, "/transfer/tenant/0?to=%zz", &[AUTH]).await, 400);
    assert!(escape.contains("%25"), "{escape}");
    let unknown_id = line(&post(addr, "/transfer/nope?to=b", &[AUTH]).await, 404);
    assert!(
        unknown_id.contains("no singleton `nope` is configured"),
        "{unknown_id}"
    );
    let not_here = line(&post(b_addr, "/transfer/tenant/0?to=a", &[AUTH]).await, 409);
    assert!(not_here.contains("does not run on this node"), "{not_here}");
    let unknown_node = line(&post(addr, "/transfer/tenant/0?to=zed", &[AUTH]).await, 422);
    assert!(
        unknown_node.contains("no reachable member"),
        "{unknown_node}"
    );
    let itself = line(&post(addr, "/transfer/tenant/0?to=a", &[AUTH]).await, 422);
    assert!(itself.contains("that is this node"), "{itself}");
    let not_run = line(&post(addr, "/transfer/mine?to=b", &[AUTH]).await, 422);
    assert!(not_run.contains("does not run it"), "{not_run}");
    assert_eq!(a.status().running().count(), a_ids.len(), "nothing moved");
    assert!(probe.filter(|e| e.is_stop()).is_empty(), "{probe:?}");

    // The move: a `%XX` escape in the node name is decoded (`%62` is `b`).
    let token = a
        .status()
        .singletons
        .iter()
        .find(|s| s.id == "tenant/3")
        .and_then(|s| s.token())
        .unwrap();
    let moved = json(&post(addr, "/transfer/tenant/3?to=%62", &[AUTH]).await, 200);
    assert_eq!(moved["id"], "tenant/3");
    assert_eq!(moved["from"], "a");
    assert_eq!(moved["to"], "b");
    assert_eq!(moved["token"], token);
    probe.wait_start("b", "tenant/3").await;
    assert_eq!(probe.stopped("tenant/3", "a", &ShutdownReason::Moved), 1);
    assert_eq!(probe.starts("tenant/3").len(), 2, "{probe:?}");
    // Only that id moved.
    assert_eq!(a.status().running().count(), a_ids.len() - 1);
    assert_eq!(
        probe.filter(|e| e.is_stop()).len(),
        1,
        "one stop: {probe:?}"
    );
    // Asked again, a no longer holds it.
    let gone = line(&post(addr, "/transfer/tenant/3?to=b", &[AUTH]).await, 409);
    assert!(gone.contains("does not run on this node"), "{gone}");

    a.shutdown().await;
    b.shutdown().await;
    probe.assert_one_at_a_time();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_routes_refuse_once_shutdown_began() {
    let cluster = MemoryCluster::new();
    let probe = Probe::new();
    // A slow stop keeps the endpoint up while the node shuts down.
    let h = Runtime::builder()
        .node("leaving")
        .backend(cluster.clone())
        .http("127.0.0.1:0")
        .http_token(TOKEN)
        .child(
            probe
                .slow_spec("slow", Duration::from_secs(3))
                .shutdown(Duration::from_secs(10)),
        )
        .start()
        .await
        .unwrap();
    h.wait_until(|s| s.is_running("slow")).await;
    let addr = h.http_addr().unwrap();
    let stopping = tokio::spawn({
        let h = h.clone();
        async move { h.shutdown().await }
    });
    within("shutdown began", GUARD, async {
        while !matches!(get(addr, "/readyz").await, Ok(a) if a.status == 503) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    for (path, action) in [
        ("/drain", "drain"),
        ("/resume", "resume"),
        ("/transfer/slow?to=x", "transfer"),
    ] {
        let answer = post(addr, path, &[AUTH]).await;
        let refused = line(&answer, 503);
        assert_eq!(
            refused,
            format!("cannot {action}: the node is shutting down")
        );
    }
    stopping.await.unwrap();
}
