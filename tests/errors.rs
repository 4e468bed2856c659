//! Bad input gets one clear line that says what to do, never a credential,
//! and the process exits non-zero instead of hanging. Driven through the
//! `node` binary, the way an operator meets these errors.

use std::process::Command;

fn node(env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_node"))
        .env_remove("HIGHLANDER_BACKEND")
        .env_remove("HIGHLANDER_NODE")
        .env("RUST_LOG", "off")
        .envs(env.iter().copied())
        .output()
        .expect("the node binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    lines[0]
}

#[test]
fn unknown_backend_scheme() {
    let (code, err) = node(&[("HIGHLANDER_BACKEND", "redis://app:hunter2@cache:6379/0")]);
    assert_eq!(code, 1);
    assert_eq!(
        one_line(&err),
        "error: HIGHLANDER_BACKEND: unknown backend scheme `redis://`: \
         use memory, postgres://…, etcd://… or cluster://…"
    );
    // Not a URL at all (a libpq key/value string): nothing of it is echoed.
    let (code, err) = node(&[("HIGHLANDER_BACKEND", "host=db password=hunter2")]);
    assert_eq!(code, 1);
    let line = one_line(&err);
    assert!(
        line.starts_with("error: HIGHLANDER_BACKEND: the backend is not a URL")
            && !line.contains("hunter2"),
        "{line}"
    );
}

#[test]
fn duplicate_runtime_ids() {
    let (code, err) = node(&[("HL_IDS", "mailer,mailer")]);
    assert_eq!(code, 1);
    let line = one_line(&err);
    assert!(
        line.starts_with("error: duplicate singleton id `mailer`: it is used by both"),
        "{line}"
    );
}

#[test]
fn invalid_runtime_id() {
    let (code, err) = node(&[("HL_IDS", "tenant 7")]);
    assert_eq!(code, 1);
    assert_eq!(
        one_line(&err),
        "error: invalid singleton id `tenant 7`: an id may only contain A-Z a-z 0-9 and . _ : / -"
    );
}

#[test]
fn invalid_node_name() {
    let (code, err) = node(&[("HIGHLANDER_NODE", "node one")]);
    assert_eq!(code, 1);
    assert!(
        one_line(&err).starts_with("error: invalid node name `node one`"),
        "{err}"
    );
}
