//! The demos are part of the product: run the built example binaries the way
//! the README does and check the stories they tell. `cargo test` builds the
//! examples before it runs any test, next to this test's own binary.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// `target/<profile>/examples/<name>`, built by this `cargo test`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run through `cargo test`, which builds the examples",
        path.display()
    );
    path
}

/// Runs an example to completion (a guard kills it after 120 s) and returns
/// its stdout; fails with everything it printed when it does not exit 0.
fn run(name: &str) -> String {
    let mut child = Command::new(example(name))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("collect output");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn three_nodes_in_one_process_tell_the_whole_story() {
    let out = run("04_three_nodes");
    for step in ["1. ", "2. ", "3. ", "4. ", "5. ", "done"] {
        assert!(out.contains(step), "step {step:?} missing:\n{out}");
    }
    // The netsplit's loser is stopped with Conflict and its terminate runs;
    // the graceful stop runs terminate with node shutdown; the crash none.
    assert_eq!(count(&out, "terminate(conflict)"), 1, "{out}");
    assert!(out.contains("terminate(node shutdown)"), "{out}");
    assert!(out.contains("one instance again"), "{out}");
}

#[test]
fn three_processes_on_the_embedded_cluster_tell_the_whole_story() {
    let out = run("06_three_processes");
    for step in [
        "1. ",
        "2. ",
        "3. ",
        "4. ",
        "5. ",
        "done: every process exited",
    ] {
        assert!(out.contains(step), "step {step:?} missing:\n{out}");
    }
    assert!(out.contains("took over"), "{out}");
    assert!(out.contains("two instances now"), "{out}");
    // Exactly one instance is stopped by the heal, with Conflict.
    assert_eq!(count(&out, "terminate(conflict)"), 1, "{out}");
    assert!(out.contains("terminate(node shutdown)"), "{out}");
    // Tokens grow across the takeovers the story shows.
    let tokens: Vec<u64> = out
        .lines()
        .filter_map(|l| l.split("fencing token ").nth(1))
        .filter_map(|t| t.trim_end_matches(')').parse().ok())
        .collect();
    assert!(tokens.len() >= 3, "{out}");
    assert!(
        tokens[1] > tokens[0],
        "the takeover's token grows: {tokens:?}"
    );
}

#[test]
fn a_fleet_is_added_drained_and_trimmed_at_run_time() {
    let out = run("07_fleet");
    for step in ["1. ", "2. ", "3. ", "4. ", "done"] {
        assert!(out.contains(step), "step {step:?} missing:\n{out}");
    }
    // a ran the tenants first (it claims the moment they are added), then
    // handed every one over; afterwards it runs none.
    let moved = count(&out, "stops (moved)");
    assert!(moved > 0, "{out}");
    assert!(out.contains("a runs 0, "), "{out}");
    assert!(out.contains("a draining: true"), "{out}");
    // wonka stops once more, removed, and runs nowhere.
    assert_eq!(count(&out, "wonka stops (removed)"), 1, "{out}");
    assert!(out.contains("wonka runs on 0 nodes"), "{out}");
}
