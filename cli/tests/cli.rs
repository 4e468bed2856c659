//! The `highlander` command against real servers and real node processes
//! (the `node` binary of `highlander-tests`, which `cargo test --workspace`
//! builds beside this test): what it prints is what the nodes report.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use highlander_tests::cluster::direct_nodes;
use highlander_tests::postgres::PgServer;
use highlander_tests::process::{Event, EventKind, Fleet, NodeProcess};

const GUARD: Duration = Duration::from_secs(60);
const COOKIE: &str = "cli-test-cookie-not-a-real-secret";

/// `target/<profile>/<name>`, built by the same `cargo test`.
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace` (or build it with \
         `cargo build -p highlander-tests --bin node`)",
        path.display()
    );
    path
}

fn highlander(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_highlander"))
        .args(args)
        .env_remove("HIGHLANDER_BACKEND")
        .env_remove("HIGHLANDER_COOKIE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run highlander")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "highlander failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

/// The holder of each id as the node processes reported it (their first
/// START each, in whatever order they come).
async fn holders(fleet: &mut Fleet, ids: &[&str]) -> Vec<(String, String, u64)> {
    let started = |fleet: &Fleet, id: &str| {
        fleet
            .history
            .iter()
            .find(|e| e.kind == EventKind::Start && e.id == id)
            .map(|e| (e.id.clone(), e.node.clone(), e.token))
    };
    let deadline = tokio::time::Instant::now() + GUARD;
    while ids.iter().any(|id| started(fleet, id).is_none()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every id started: {:#?}",
            fleet.history
        );
        fleet.next_event(Duration::from_millis(100)).await;
    }
    let mut out: Vec<_> = ids.iter().filter_map(|id| started(fleet, id)).collect();
    out.sort();
    out
}

async fn three(fleet: &mut Fleet, urls: &[(String, String)]) -> Vec<NodeProcess> {
    let mut nodes = Vec::new();
    for (name, url) in urls {
        nodes.push(fleet.spawn(name, &[("HIGHLANDER_BACKEND", url)]).await);
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_members_and_watch_on_postgres() {
    let pg = PgServer::start();
    let url = pg.url();
    let mut fleet = Fleet::new(bin("node"), &url, &[("HL_IDS", "mailer,billing")]);
    let urls: Vec<(String, String)> = ["p1", "p2", "p3"]
        .iter()
        .map(|n| (n.to_string(), url.clone()))
        .collect();
    let nodes = three(&mut fleet, &urls).await;
    let held = holders(&mut fleet, &["billing", "mailer"]).await;

    // The table: one row per id with the holder and token the nodes report;
    // piped, so no colour codes.
    let table = stdout(&highlander(&["status", "--backend", &url], &[]));
    assert!(table.starts_with("ID"), "{table}");
    assert!(!table.contains('\x1b'), "no colour when piped: {table:?}");
    for (id, node, token) in &held {
        let row = table
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("no row for {id}: {table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], node, "{row}");
        assert_eq!(cells[2], token.to_string(), "{row}");
    }

    // JSON for scripts, and the password never printed.
    let json = stdout(&highlander(
        &["status", "--json"],
        &[("HIGHLANDER_BACKEND", &url)],
    ));
    assert!(
        !json.contains(highlander_tests::postgres::PASSWORD),
        "{json}"
    );
    let rows: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    for (id, node, token) in &held {
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id.as_str())
            .unwrap_or_else(|| panic!("no {id} in {json}"));
        assert_eq!(row["holder"], node.as_str(), "{json}");
        assert_eq!(row["token"], *token, "{json}");
    }

    let members = stdout(&highlander(&["members", "--backend", &url], &[]));
    for n in ["p1", "p2", "p3"] {
        assert!(members.lines().any(|l| l.starts_with(n)), "{members}");
    }
    assert!(
        !members.contains("highlander-cli"),
        "the command itself is no member: {members}"
    );

    // watch: SIGKILL the holder of `mailer`; the command prints the move to
    // the node that really took over.
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_highlander"))
        .args(["watch", "--json", "--backend", &url])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start highlander watch");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        watch.stdout.take().expect("piped"),
    ));
    let first = tokio::time::timeout(GUARD, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        first.starts_with('['),
        "watch prints the current state first: {first}"
    );
    let (_, old, _) = held.iter().find(|h| h.0 == "mailer").unwrap().clone();
    let victim = nodes.iter().position(|n| n.name == old).unwrap();
    nodes[victim].signal("KILL");
    let next: Event = fleet
        .wait_for(GUARD, |e| e.kind == EventKind::Start && e.id == "mailer")
        .await;
    let change = loop {
        let line = tokio::time::timeout(GUARD, lines.next_line())
            .await
            .expect("a change within the guard")
            .unwrap()
            .expect("watch keeps running");
        if line.contains(r#""id":"mailer""#) && !line.contains(r#""to":null"#) {
            break line;
        }
    };
    assert!(
        change.contains(&format!(r#""to":"{}""#, next.node)),
        "{change}"
    );
    assert!(
        change.contains(&format!(r#""token":{}"#, next.token)),
        "{change}"
    );
    for n in &nodes {
        n.signal("TERM");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_the_cluster_joins_as_an_observer_and_a_wrong_cookie_is_one_line() {
    let urls = direct_nodes(&["c1", "c2", "c3"]);
    let mut fleet = Fleet::new(
        bin("node"),
        "",
        &[("HL_IDS", "mailer"), ("HIGHLANDER_COOKIE", COOKIE)],
    );
    let nodes = three(&mut fleet, &urls).await;
    let held = holders(&mut fleet, &["mailer"]).await;
    let url = &urls[0].1;

    let table = stdout(&highlander(
        &["status", "--backend", url],
        &[("HIGHLANDER_COOKIE", COOKIE)],
    ));
    let row = table
        .lines()
        .find(|l| l.starts_with("mailer"))
        .expect(&table);
    assert_eq!(
        row.split_whitespace().nth(1),
        Some(held[0].1.as_str()),
        "{table}"
    );

    let members = stdout(&highlander(
        &["members", "--backend", url],
        &[("HIGHLANDER_COOKIE", COOKIE)],
    ));
    for n in ["c1", "c2", "c3"] {
        assert!(
            members
                .lines()
                .any(|l| l.starts_with(n) && l.contains("yes")),
            "{members}"
        );
    }

    let wrong = highlander(
        &["status", "--timeout", "2", "--backend", url],
        &[("HIGHLANDER_COOKIE", "not-the-cookie-of-this-cluster")],
    );
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("highlander: error:") && err.contains("cookie"),
        "{err}"
    );
    assert!(!err.contains("not-the-cookie"), "{err}");
    for n in &nodes {
        n.signal("TERM");
    }
}

#[test]
fn bad_input_is_one_line_without_the_password() {
    let none = highlander(&["status"], &[]);
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("--backend") && err.contains("HIGHLANDER_BACKEND"),
        "{err}"
    );

    let bad = highlander(
        &["status", "--backend", "redis://u:hunter2@cache:6379"],
        &[],
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && !err.contains("hunter2"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let port = highlander_tests::free_port();
    let down = highlander(
        &[
            "status",
            "--timeout",
            "1",
            "--backend",
            &format!("postgres://app:hunter2@127.0.0.1:{port}/app"),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(!down.status.success() && !err.contains("hunter2"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&port.to_string()),
        "names where it looked: {err}"
    );

    let memory = highlander(&["status", "--backend", "memory"], &[]);
    assert!(String::from_utf8_lossy(&memory.stderr).contains("one process"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_etcd_reads_the_keys_the_nodes_hold() {
    let etcd = highlander_tests::etcd::EtcdCluster::single().await;
    let url = etcd.url();
    let mut fleet = Fleet::new(bin("node"), &url, &[("HL_IDS", "mailer,billing")]);
    let urls: Vec<(String, String)> = ["e1", "e2"]
        .iter()
        .map(|n| (n.to_string(), url.clone()))
        .collect();
    let nodes = three(&mut fleet, &urls).await;
    let held = holders(&mut fleet, &["billing", "mailer"]).await;
    let json = stdout(&highlander(&["status", "--json", "--backend", &url], &[]));
    let rows: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let got: Vec<(String, String, u64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["holder"].as_str().unwrap().to_string(),
                r["token"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, held, "{json}");
    for n in &nodes {
        n.signal("TERM");
    }
}
