//! The status page in a real headless browser (Debian's `chromium`): a live
//! 3-node cluster on the memory backend, each node serving its endpoint; the
//! page is loaded from one node, its script fetches /status, and the holder
//! it shows for an id is the real holder, before and after a failover.
//!
//! With `HIGHLANDER_SCREENSHOT=<file.png>` the test also saves a screenshot
//! of the page (how docs/status-page.png was made).

use std::net::SocketAddr;
use std::time::Duration;

use highlander::{
    ChildSpec, Context, MemoryCluster, Runtime, RuntimeHandle, Service, SingletonState,
};
use highlander_tests::ops::{chromium, chromium_run};

struct Idle;
impl Service for Idle {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

const IDS: [&str; 6] = [
    "billing/invoice-sweeper",
    "mailer",
    "reports/nightly",
    "search/indexer",
    "tenant-sync/acme",
    "tenant-sync/globex",
];

async fn node(cluster: &MemoryCluster, name: &str) -> RuntimeHandle {
    let mut b = Runtime::builder()
        .node(name)
        .backend(cluster.clone())
        .stepdown_delay(Duration::from_secs(3600))
        .http("127.0.0.1:0");
    for id in IDS {
        b = b.child(ChildSpec::new(id, |_ctx| async { Ok(Idle) }));
    }
    b.start().await.unwrap()
}

/// The rows of the singletons table as the browser rendered them:
/// (id, state, holder shown).
fn rows(dom: &str) -> Vec<(String, String, String)> {
    let attr = |tag: &str, name: &str| {
        let key = format!("{name}=\"");
        tag.find(&key).map(|i| {
            let rest = &tag[i + key.len()..];
            rest[..rest.find('"').unwrap_or(rest.len())].to_string()
        })
    };
    dom.split("<tr ")
        .skip(1)
        .filter_map(|tr| {
            let tag = &tr[..tr.find('>')?];
            Some((
                attr(tag, "data-id")?,
                attr(tag, "data-state")?,
                attr(tag, "data-holder")?,
            ))
        })
        .collect()
}

/// Loads the page with the search box set to `q` and returns the rows.
async fn load(addr: SocketAddr, q: &str) -> (String, Vec<(String, String, String)>) {
    let browser = chromium().expect(
        "this test needs Debian's chromium: apt-get install -y --no-install-recommends chromium (scripts/setup installs it)",
    );
    let url = format!("http://{addr}/?q={q}");
    let dom = chromium_run(
        &browser,
        &url,
        "--dump-dom",
        Duration::from_millis(2500),
        &[],
    )
    .await
    .unwrap();
    assert!(
        dom.contains("data-refreshes=\"") && !dom.contains("data-refreshes=\"0\""),
        "the page's script never loaded /status:\n{dom}"
    );
    let rows = rows(&dom);
    (dom, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_real_holder_before_and_after_failover() {
    let cluster = MemoryCluster::new();
    let a = node(&cluster, "node-a").await;
    a.wait_until(|s| s.running().count() == IDS.len()).await;
    let b = node(&cluster, "node-b").await;
    let c = node(&cluster, "node-c").await;
    for h in [&b, &c] {
        h.wait_until(|s| {
            s.singletons
                .iter()
                .all(|s| matches!(s.state, SingletonState::Waiting { .. }))
        })
        .await;
    }
    // Spread the ids: a gives two of them up, b or c takes each.
    for id in ["mailer", "tenant-sync/globex"] {
        a.step_down(id).unwrap();
        loop {
            let (cb, cc) = (b.changed(), c.changed());
            if b.status().is_running(id) || c.status().is_running(id) {
                break;
            }
            tokio::select! { _ = cb => {}, _ = cc => {} }
        }
    }
    let real = |id: &str| {
        let holders = cluster.holders(id);
        assert_eq!(holders.len(), 1, "{id}: {holders:?}");
        holders[0].node.clone()
    };
    let settled = |id: &str| {
        let holders = cluster.holders(id);
        (holders.len() == 1).then(|| holders[0].node.clone())
    };
    // Wait until every node has seen the holders settle (b and c are
    // woken when a releases; the page reads c's view).
    c.wait_until(|s| {
        s.singletons.iter().all(|st| {
            st.holder("node-c")
                .is_some_and(|h| Some(h.node) == settled(&st.id))
        })
    })
    .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.status().members.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "c never saw three members"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr = c.http_addr().unwrap();
    let (dom, shown) = load(addr, "").await;
    assert_eq!(shown.len(), IDS.len(), "{dom}");
    for (id, state, holder) in &shown {
        assert_eq!(
            *holder,
            real(id),
            "{id} ({state}) before the failover:\n{dom}"
        );
    }
    assert!(
        dom.contains(">node-a (this node)<") || dom.contains("data-node=\"node-a\""),
        "members listed"
    );
    assert_eq!(
        dom.matches("data-reachable=\"true\"").count(),
        3,
        "three live members:\n{dom}"
    );

    // The search box narrows the table.
    let (_, only) = load(addr, "tenant").await;
    let ids: Vec<&str> = only.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(ids, ["tenant-sync/acme", "tenant-sync/globex"]);

    if let Ok(file) = std::env::var("HIGHLANDER_SCREENSHOT") {
        let browser = chromium().unwrap();
        chromium_run(
            &browser,
            &format!("http://{addr}/"),
            &format!("--screenshot={file}"),
            Duration::from_millis(2500),
            &["--window-size=1100,1000"],
        )
        .await
        .unwrap();
    }

    // Crash node-a: everything it held moves to b or c.
    a.abort();
    c.wait_until(|s| {
        s.singletons.iter().all(|st| {
            st.holder("node-c")
                .is_some_and(|h| h.node != "node-a" && Some(h.node) == settled(&st.id))
        })
    })
    .await;
    // The members come from the probe (once a second): wait for it to see
    // that a has gone (hang guard only).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.status().members.iter().any(|m| m.node == "node-a") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node-a never left the members"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (dom, shown) = load(addr, "").await;
    assert_eq!(shown.len(), IDS.len(), "{dom}");
    for (id, state, holder) in &shown {
        assert_ne!(
            holder, "node-a",
            "{id} still shown on the crashed node:\n{dom}"
        );
        assert_eq!(
            *holder,
            real(id),
            "{id} ({state}) after the failover:\n{dom}"
        );
    }
    assert_eq!(
        dom.matches("data-reachable=\"true\"").count(),
        2,
        "a has left:\n{dom}"
    );

    b.shutdown().await;
    c.shutdown().await;
}

/// Stops only when the test lets it, whatever its context says (within
/// its shutdown budget): a slow `terminate`-like stop.
struct Stubborn(std::sync::Arc<tokio::sync::Semaphore>);
impl Service for Stubborn {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        let _ = self.0.acquire().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_that_runs_twice_is_highlighted() {
    let cluster = MemoryCluster::new();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let start = |name: &'static str| {
        let gate = gate.clone();
        Runtime::builder()
            .node(name)
            .backend(cluster.clone())
            .http("127.0.0.1:0")
            .child(
                ChildSpec::new("dup", move |_ctx| {
                    let gate = gate.clone();
                    async move { Ok(Stubborn(gate)) }
                })
                .shutdown(Duration::from_secs(120)),
            )
            .child(ChildSpec::new("single", |_ctx| async { Ok(Idle) }))
            .start()
    };
    let x = start("node-x").await.unwrap();
    x.wait_until(|s| s.running().count() == 2).await;
    let y = start("node-y").await.unwrap();
    // A split: y takes both ids on its side; at the heal x's earlier
    // tenure wins, y's instance of `dup` is told to stop (conflict) but
    // takes its time, so for now both nodes run it.
    cluster.partition(&[&["node-x"], &["node-y"]]);
    y.wait_until(|s| s.running().count() == 2).await;
    cluster.heal();
    y.wait_until(|s| !s.is_running("single")).await;
    assert!(
        y.status().is_running("dup"),
        "still stopping: {:?} / x: {:?} / holders {:?}",
        y.status().singletons,
        x.status().singletons,
        cluster.holders("dup")
    );
    assert_eq!(cluster.holders("dup")[0].node, "node-x");

    let (dom, shown) = load(y.http_addr().unwrap(), "").await;
    let row = |id: &str| {
        let start = dom
            .find(&format!("<tr data-id=\"{id}\""))
            .unwrap_or_else(|| panic!("no row {id}:\n{dom}"));
        dom[start..start + dom[start..].find('>').unwrap()].to_string()
    };
    assert!(
        row("dup").contains("data-twice=\"node-x\""),
        "{}",
        row("dup")
    );
    assert!(!row("single").contains("twice"), "{}", row("single"));
    assert_eq!(shown.len(), 2);
    assert!(
        dom.contains("id=\"n-twice\">1<"),
        "the summary counts it:\n{dom}"
    );

    gate.add_permits(1);
    y.wait_until(|s| !s.is_running("dup")).await;
    x.shutdown().await;
    y.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_ids_are_searched_and_paged() {
    let mut b = Runtime::builder()
        .node("big")
        .backend(MemoryCluster::new())
        .http("127.0.0.1:0");
    for i in 0..10_000 {
        b = b.child(ChildSpec::new(format!("job-{i:05}"), |_ctx| async {
            Ok(Idle)
        }));
    }
    let h = b.start().await.unwrap();
    h.wait_until(|s| s.running().count() == 10_000).await;
    let addr = h.http_addr().unwrap();

    let (dom, shown) = load(addr, "").await;
    assert_eq!(shown.len(), 50, "one page of rows");
    assert!(
        dom.contains("page 1 of 200 · 10000 ids"),
        "{}",
        &dom[..dom.len().min(4000)]
    );
    assert!(dom.contains("id=\"n-running\">10000<"));

    // "job-004" matches job-00400 … job-00499: two pages.
    let (dom, shown) = load(addr, "job-004").await;
    assert!(dom.contains("page 1 of 2 · 100 ids"));
    let ids: Vec<&str> = shown.iter().map(|r| r.0.as_str()).collect();
    let want: Vec<String> = (400..450).map(|i| format!("job-{i:05}")).collect();
    assert_eq!(ids, want);
    assert!(
        shown
            .iter()
            .all(|(_, state, holder)| state == "running" && holder == "big")
    );
    h.shutdown().await;
}
