//! Driving `node` processes (the `node` binary of this package): start them
//! with a backend URL, follow their tenure events, signal them.
//!
//! Integration tests find the binary with `env!("CARGO_BIN_EXE_node")`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// What a node process reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `START` or `STOP`.
    pub kind: EventKind,
    /// When, in nanoseconds since the Unix epoch (one clock for the host).
    pub at_nanos: u128,
    /// The node that reported it.
    pub node: String,
    /// The singleton id.
    pub id: String,
    /// The fencing token of the tenure.
    pub token: u64,
    /// For `STOP`: the shutdown reason, spaces replaced by `_`
    /// (`node_shutdown`, `lease_lost`, `conflict`, ...).
    pub reason: Option<String>,
}

/// The kind of an [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A tenure began: the instance runs.
    Start,
    /// A tenure's instance stopped (`terminate` ran).
    Stop,
}

/// Parses one output line of the `node` binary; `None` for other lines.
pub fn parse_event(line: &str) -> Option<Event> {
    let mut parts = line.split_whitespace();
    let kind = match parts.next()? {
        "START" => EventKind::Start,
        "STOP" => EventKind::Stop,
        _ => return None,
    };
    let at_nanos = parts.next()?.parse().ok()?;
    let node = parts.next()?.to_string();
    let id = parts.next()?.to_string();
    let token = parts.next()?.parse().ok()?;
    let reason = parts.next().map(str::to_string);
    Some(Event {
        kind,
        at_nanos,
        node,
        id,
        token,
        reason,
    })
}

/// A running `node` process.
pub struct NodeProcess {
    /// Its node name (`HIGHLANDER_NODE`).
    pub name: String,
    child: Child,
    pid: u32,
}

/// Starts `node` processes and merges their events into one stream, in the
/// order they were read.
pub struct Fleet {
    bin: std::path::PathBuf,
    backend: String,
    env: Vec<(String, String)>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    /// Every event seen so far, in arrival order.
    pub history: Vec<Event>,
}

impl Fleet {
    /// A fleet of `bin` processes using the backend at `backend`, each with
    /// the extra environment `env` (for example `HL_IDS`).
    pub fn new(bin: impl AsRef<Path>, backend: &str, env: &[(&str, &str)]) -> Fleet {
        let (tx, rx) = mpsc::unbounded_channel();
        Fleet {
            bin: bin.as_ref().to_path_buf(),
            backend: backend.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tx,
            rx,
            history: Vec::new(),
        }
    }

    /// Starts one node named `name` and waits until it has printed `READY`.
    /// Its stderr goes to this process's stderr.
    pub async fn spawn(&mut self, name: &str, extra_env: &[(&str, &str)]) -> NodeProcess {
        self.spawn_in(name, extra_env, &[]).await
    }

    /// As [`spawn`](Self::spawn), with the binary run through `prefix` (a
    /// program and its arguments that exec the binary, such as
    /// `ip netns exec <ns>`, see
    /// [`Topology::exec_prefix`](crate::netns_cluster::Topology::exec_prefix));
    /// empty for none.
    pub async fn spawn_in(
        &mut self,
        name: &str,
        extra_env: &[(&str, &str)],
        prefix: &[String],
    ) -> NodeProcess {
        let mut command = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        command
            .env("HIGHLANDER_BACKEND", &self.backend)
            .env("HIGHLANDER_NODE", name)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        let pid = child.id().expect("a just-started child has a pid");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut ready = Some(ready_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("READY") {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                } else if let Some(event) = parse_event(&line) {
                    let _ = tx.send(event);
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), ready_rx)
            .await
            .unwrap_or_else(|_| panic!("node {name} did not print READY within 60 s"))
            .unwrap_or_else(|_| panic!("node {name} exited before it was ready"));
        NodeProcess {
            name: name.to_string(),
            child,
            pid,
        }
    }

    /// The next event from any node, or `None` after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let event = tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()?;
        self.history.push(event.clone());
        Some(event)
    }

    /// Waits for the first event matching `pred`; panics with the history
    /// after `timeout` (a guard against hangs, not a timing assertion).
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Event {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(e) if pred(&e) => return e,
                Some(_) => {}
                None => panic!(
                    "no matching event within {timeout:?}; history: {:#?}",
                    self.history
                ),
            }
        }
    }

    /// The first event already recorded that matches `pred`, else the next
    /// one to arrive (a guard against hangs after `timeout`). Events of
    /// different nodes come through different pipes, in either order: a
    /// test waiting for a STOP may already have read the START that came
    /// after it.
    pub async fn seen_or_wait(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Event {
        if let Some(e) = self.history.iter().find(|e| pred(e)) {
            return e.clone();
        }
        self.wait_for(timeout, pred).await
    }

    /// Waits for a `START` of `id` on any node.
    pub async fn wait_start(&mut self, id: &str, timeout: Duration) -> Event {
        self.wait_for(timeout, |e| e.kind == EventKind::Start && e.id == id)
            .await
    }

    /// Reads events until none arrives for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) {
        while self.next_event(quiet).await.is_some() {}
    }
}

impl NodeProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends a signal by name (`KILL`, `TERM`, `STOP`, `CONT`, `INT`).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }

    /// Waits for the process to exit; kills it and panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait on a child works"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!("node {} did not exit within {timeout:?}", self.name)
            }
        }
    }
}
