//! A test node: one OS process that runs test singletons on whatever backend
//! `HIGHLANDER_BACKEND` names, and prints one line per tenure event so a
//! harness in another process can follow who holds what.
//!
//! Environment:
//! - `HIGHLANDER_BACKEND`, `HIGHLANDER_NODE`: as for any highlander program;
//! - `HL_IDS`: comma-separated singleton ids (default `solo`);
//! - `HL_ID_COUNT` + `HL_ID_PREFIX`: instead, ids `{prefix}{0..count}`;
//! - `HL_SHUTDOWN_MS`: the shutdown budget (default 2000);
//! - `HL_REBALANCE=1`: rebalancing on (`Builder::rebalance(true)`; off by default, as in the library);
//! - `HL_DRAIN_ON_SHUTDOWN=1`: drain at SIGTERM before shutting down
//!   (`Builder::drain_on_shutdown(true)`; off by default, as in the library);
//! - read by the library itself: `HIGHLANDER_NODE_WEIGHT`,
//!   `HIGHLANDER_NODE_LABELS` (placement), `HIGHLANDER_HTTP`,
//!   `HIGHLANDER_HTTP_TOKEN` (the operations endpoint);
//! - `HL_NOFILE` (optional): the process's open-file limit (`setrlimit`);
//! - `HL_FENCE_ADDR` (optional): a fence register (`host:port`, see
//!   `highlander_tests::chaos::fence`). Each instance then writes
//!   `W <id> <token> <node>` to it once before it prints `START`, and again
//!   every `HL_FENCE_MS` (default 50) until it is stopped.
//!
//! Output on stdout, one line per event, flushed at once:
//! ```text
//! READY <node>
//! START <unix_nanos> <node> <id> <token>
//! STOP <unix_nanos> <node> <id> <token> <reason>
//! ```
//! It exits 0 after SIGTERM / Ctrl-C, once every id is released.
//!
//! SIGUSR1 drains the node (`RuntimeHandle::drain`: every id handed over,
//! nothing claimed) and SIGUSR2 resumes it (`RuntimeHandle::resume`); the
//! handlers are in place before `READY` is printed.

use std::io::Write;
use std::time::Duration;

use highlander::{ChildSpec, Context, Runtime, Service, ShutdownReason};
use highlander_tests::event_line;
use tokio::signal::unix::{Signal, SignalKind, signal};

struct Probe {
    id: String,
    token: u64,
    node: String,
}

impl Service for Probe {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.token = ctx.fencing_token();
        self.node = ctx.node().to_string();
        let Ok(addr) = std::env::var("HL_FENCE_ADDR") else {
            emit(&event_line("START", &self.node, &self.id, self.token, None));
            ctx.cancelled().await;
            return Ok(());
        };
        tokio::select! {
            () = ctx.cancelled() => Ok(()),
            () = self.fenced_writes(&addr) => Ok(()),
        }
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        emit(&event_line(
            "STOP",
            &self.node,
            &self.id,
            self.token,
            Some(&reason),
        ));
    }
}

impl Probe {
    /// Writes to the fence register before `START`, then every
    /// `HL_FENCE_MS`; a refused write is logged to stderr (a stale token was
    /// kept out). Returns only if the register cannot be reached.
    async fn fenced_writes(&self, addr: &str) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let every = std::env::var("HL_FENCE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_millis(50));
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("node {}: cannot reach the fence at {addr}: {e}", self.node);
                emit(&event_line("START", &self.node, &self.id, self.token, None));
                return std::future::pending().await;
            }
        };
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let mut answers = BufReader::new(read).lines();
        let line = format!("W {} {} {}\n", self.id, self.token, self.node);
        let mut first = true;
        let mut refused = false;
        loop {
            let ok = write.write_all(line.as_bytes()).await.is_ok();
            let answer = if ok {
                answers.next_line().await.ok().flatten()
            } else {
                None
            };
            match answer.as_deref() {
                Some("OK") => {}
                Some(other) if !refused => {
                    refused = true;
                    eprintln!(
                        "node {}: fence answered {other} to {} token {}",
                        self.node, self.id, self.token
                    )
                }
                Some(_) => {}
                None => {
                    eprintln!("node {}: the fence connection broke", self.node);
                    if first {
                        emit(&event_line("START", &self.node, &self.id, self.token, None));
                    }
                    return std::future::pending().await;
                }
            }
            if first {
                emit(&event_line("START", &self.node, &self.id, self.token, None));
                first = false;
            }
            tokio::time::sleep(every).await;
        }
    }
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn ids() -> Vec<String> {
    if let Ok(count) = std::env::var("HL_ID_COUNT") {
        let count: usize = count.parse().expect("HL_ID_COUNT must be a number");
        let prefix = std::env::var("HL_ID_PREFIX").unwrap_or_else(|_| "id-".into());
        return (0..count).map(|i| format!("{prefix}{i}")).collect();
    }
    std::env::var("HL_IDS")
        .unwrap_or_else(|_| "solo".into())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Lowers the open-file limit to `HL_NOFILE`, as `ulimit -n` would.
fn limit_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Ok(n) = std::env::var("HL_NOFILE") else {
        return;
    };
    let n: u64 = n.parse().expect("HL_NOFILE must be a number");
    let maximum = getrlimit(Resource::Nofile).maximum;
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(n),
            maximum,
        },
    )
    .expect("HL_NOFILE within the hard limit");
}

#[tokio::main]
async fn main() {
    limit_open_files();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let budget = std::env::var("HL_SHUTDOWN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(2));
    // `HL_REBALANCE=1`: ids move to where placement puts them when members
    // change; otherwise they stay where first claimed (the library's default).
    let rebalance = std::env::var("HL_REBALANCE").is_ok_and(|v| v == "1");
    // `HL_DRAIN_ON_SHUTDOWN=1`: SIGTERM hands every id over first.
    let drain = std::env::var("HL_DRAIN_ON_SHUTDOWN").is_ok_and(|v| v == "1");
    let mut builder = Runtime::builder()
        .rebalance(rebalance)
        .drain_on_shutdown(drain);
    for id in ids() {
        let spec_id = id.clone();
        builder = builder.child(
            ChildSpec::new(id, move |_ctx| {
                let id = spec_id.clone();
                async move {
                    Ok(Probe {
                        id,
                        token: 0,
                        node: String::new(),
                    })
                }
            })
            .shutdown(budget),
        );
    }
    let node = std::env::var("HIGHLANDER_NODE").unwrap_or_default();
    let mut signals = Signals::install();
    emit(&format!("READY {node}"));
    if let Err(e) = run(builder, &mut signals).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// SIGTERM and Ctrl-C stop the node; SIGUSR1 drains it, SIGUSR2 resumes it.
struct Signals {
    term: Signal,
    int: Signal,
    usr1: Signal,
    usr2: Signal,
}

enum Sig {
    Stop,
    Drain,
    Resume,
}

impl Signals {
    fn install() -> Signals {
        let listen = |kind| signal(kind).expect("listen for a signal");
        Signals {
            term: listen(SignalKind::terminate()),
            int: listen(SignalKind::interrupt()),
            usr1: listen(SignalKind::user_defined1()),
            usr2: listen(SignalKind::user_defined2()),
        }
    }

    async fn recv(&mut self) -> Sig {
        tokio::select! {
            _ = self.term.recv() => Sig::Stop,
            _ = self.int.recv() => Sig::Stop,
            _ = self.usr1.recv() => Sig::Drain,
            _ = self.usr2.recv() => Sig::Resume,
        }
    }
}

/// What `Builder::run` does (start, run until SIGTERM or Ctrl-C, drain
/// first when `drain_on_shutdown`, shut down gracefully; a stop signal while
/// starting stops cleanly), with the drain
/// and resume signals on top (one that arrives while starting counts once
/// started).
async fn run(builder: highlander::Builder, signals: &mut Signals) -> highlander::Result<()> {
    let start = builder.start();
    tokio::pin!(start);
    let mut draining = false;
    let handle = loop {
        tokio::select! {
            handle = &mut start => break handle?,
            sig = signals.recv() => match sig {
                Sig::Stop => return Ok(()),
                Sig::Drain => draining = true,
                Sig::Resume => draining = false,
            },
        }
    };
    let drain = |handle: &highlander::RuntimeHandle| {
        let drain = handle.drain();
        tokio::spawn(async move {
            if let Err(e) = drain.await {
                tracing::info!(error = %e, "the drain did not finish");
            }
        });
    };
    if draining {
        drain(&handle);
    }
    loop {
        tokio::select! {
            sig = signals.recv() => match sig {
                Sig::Stop => break,
                Sig::Drain => drain(&handle),
                Sig::Resume => handle.resume(),
            },
            () = handle.stopped() => return Ok(()),
        }
    }
    // As `Builder::run` does: with drain-on-shutdown, every id is handed
    // over first; a second stop signal cuts the drain short.
    tokio::select! {
        () = handle.graceful_shutdown() => {}
        _ = async { while !matches!(signals.recv().await, Sig::Stop) {} } => handle.shutdown().await,
    }
    Ok(())
}
