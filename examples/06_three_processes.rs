//! # Three processes, one instance: the embedded cluster for real
//!
//! The same story as `04_three_nodes`, with three OS processes of this very
//! binary that find each other over loopback TCP with the `cluster://`
//! backend: no database, no external service. Each process is what a user
//! writes, a `#[highlander]` service and `highlander::run()`, configured by
//! `HIGHLANDER_BACKEND` and `HIGHLANDER_NODE`. This process starts them,
//! does things to them with signals, and prints what they report:
//!
//! 1. the first process runs `report-mailer`; two more join and wait;
//! 2. `SIGKILL` of the holder: another process takes over within
//!    milliseconds (its peers see the connections reset), with a higher
//!    fencing token; the killed node restarts and waits;
//! 3. `SIGSTOP` of the holder, longer than the failure timeout (1 s): to
//!    the others it is gone, so one of them starts an instance while the
//!    paused one still has its own (as Erlang's `:global` would);
//! 4. `SIGCONT`: the nodes meet again, the instance that has run longest
//!    survives and the other is stopped with `ShutdownReason::Conflict`, its
//!    `terminate` running;
//! 5. `SIGTERM` of the holder: it releases the id as it exits, and a
//!    standby takes over at once.
//!
//! ```text
//! cargo run --example 06_three_processes
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use highlander::{Context, Service, ShutdownReason, highlander};
use rustix::process::Signal;

/// The singleton each process runs or waits for.
#[highlander(id = "report-mailer", shutdown = "1s")]
#[derive(Default)]
struct ReportMailer {
    token: u64,
}

impl Service for ReportMailer {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.token = ctx.fencing_token();
        report(&format!("start {} {}", ctx.node(), self.token));
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        let node = std::env::var("HIGHLANDER_NODE").unwrap_or_default();
        let reason = reason.to_string().replace(' ', "_");
        report(&format!("stop {node} {} {reason}", self.token));
    }
}

/// One line to the driving process, flushed at once.
fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "EVENT {line}");
    let _ = out.flush();
}

const NODES: [&str; 3] = ["a", "b", "c"];
const GUARD: Duration = Duration::from_secs(30);

fn main() -> highlander::Result<()> {
    if std::env::var_os("DEMO_NODE_PROCESS").is_some() {
        // A node: exactly what an application's main does.
        let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
        return rt.block_on(highlander::run());
    }
    let mut demo = Demo::new();
    demo.run();
    Ok(())
}

/// What a node process reported.
#[derive(Debug, Clone)]
enum Event {
    Start { node: String, token: u64 },
    Stop { node: String, reason: String },
}

struct Demo {
    started: Instant,
    urls: HashMap<&'static str, String>,
    children: HashMap<&'static str, Child>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    /// Who runs the singleton now, as the nodes report it.
    running: Vec<String>,
}

impl Drop for Demo {
    /// Whatever happens to the demo, no node process outlives it.
    fn drop(&mut self) {
        for (_, mut child) in self.children.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Demo {
    fn new() -> Demo {
        // Each node listens on a free loopback port; every node is a seed
        // of every other. Without HIGHLANDER_COOKIE the cluster refuses to
        // listen anywhere but loopback.
        let ports: Vec<u16> = NODES
            .iter()
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free loopback port")
                    .port()
            })
            .collect();
        let seeds: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let urls = NODES
            .iter()
            .zip(&seeds)
            .map(|(n, addr)| (*n, format!("cluster://{addr}?seeds={}", seeds.join(","))))
            .collect();
        let (tx, rx) = mpsc::channel();
        Demo {
            started: Instant::now(),
            urls,
            children: HashMap::new(),
            tx,
            rx,
            running: Vec::new(),
        }
    }

    fn say(&self, line: &str) {
        let t = self.started.elapsed().as_secs_f64() * 1000.0;
        println!("{t:>8.1} ms  {line}");
    }

    /// Starts node `name` as a child process running `highlander::run()`.
    fn spawn(&mut self, name: &'static str) {
        let mut child = Command::new(std::env::current_exe().expect("this binary"))
            .env("DEMO_NODE_PROCESS", "1")
            .env("HIGHLANDER_BACKEND", &self.urls[name])
            .env("HIGHLANDER_NODE", name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a node process");
        let stdout = child.stdout.take().expect("piped stdout");
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let event = match fields.as_slice() {
                    ["EVENT", "start", node, token] => Event::Start {
                        node: node.to_string(),
                        token: token.parse().unwrap_or(0),
                    },
                    ["EVENT", "stop", node, _token, reason] => Event::Stop {
                        node: node.to_string(),
                        reason: reason.replace('_', " "),
                    },
                    _ => continue,
                };
                let _ = tx.send(event);
            }
        });
        self.children.insert(name, child);
    }

    fn signal(&self, name: &str, signal: Signal) {
        let pid = rustix::process::Pid::from_child(&self.children[name]);
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("cannot signal {name}: {e}"));
    }

    /// Reads node events, printing each, until `done` says so.
    fn until(&mut self, what: &str, mut done: impl FnMut(&Event, &[String]) -> bool) {
        let deadline = Instant::now() + GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the demo waited {GUARD:?} for {what}"));
            match &event {
                Event::Start { node, token } => {
                    self.running.push(node.clone());
                    self.say(&format!(
                        "  {node} ▶ report-mailer started (fencing token {token})"
                    ));
                }
                Event::Stop { node, reason } => {
                    self.running.retain(|n| n != node);
                    self.say(&format!("  {node} ■ report-mailer terminate({reason})"));
                }
            }
            if done(&event, &self.running) {
                return;
            }
        }
    }

    fn holder(&self) -> &'static str {
        let name = self.running.first().expect("someone runs it");
        NODES.into_iter().find(|n| n == name).expect("a known node")
    }

    fn run(&mut self) {
        self.say("1. process a starts (cluster:// on loopback), then b and c join it");
        self.spawn("a");
        self.until("the first instance", |e, _| {
            matches!(e, Event::Start { .. })
        });
        self.spawn("b");
        self.spawn("c");
        // Give them a moment to connect to a and to each other.
        std::thread::sleep(Duration::from_millis(300));
        let first = self.holder();
        self.say(&format!("   {first} runs it; the other two wait"));

        self.say(&format!(
            "2. kill -KILL {first} (no terminate runs on a crash)"
        ));
        let killed_at = Instant::now();
        self.signal(first, Signal::KILL);
        let _ = self.children.get_mut(first).map(Child::wait);
        self.running.retain(|n| n != first);
        self.until("a takeover", |e, _| matches!(e, Event::Start { .. }));
        let second = self.holder();
        self.say(&format!(
            "   {second} took over {:.1} ms after the kill",
            killed_at.elapsed().as_secs_f64() * 1000.0
        ));
        self.say(&format!("   {first} restarts and waits"));
        self.spawn(first);
        std::thread::sleep(Duration::from_millis(500));

        self.say(&format!(
            "3. kill -STOP {second} for about 2 s: past the 1 s failure timeout, the others see it gone"
        ));
        self.signal(second, Signal::STOP);
        self.until("a second instance during the pause", |e, running| {
            matches!(e, Event::Start { .. }) && running.len() == 2
        });
        self.say(&format!(
            "   two instances now: {:?} ({second} is paused, not dead)",
            self.running
        ));
        std::thread::sleep(Duration::from_millis(1_000));

        self.say(&format!(
            "4. kill -CONT {second}: the nodes meet again, the longest-running instance survives"
        ));
        self.signal(second, Signal::CONT);
        self.until(
            "the conflict's loser to stop",
            |e, _| matches!(e, Event::Stop { reason, .. } if reason == "conflict"),
        );
        let survivor = self.holder();
        self.say(&format!("   one instance again, on {survivor}"));

        self.say(&format!(
            "5. kill -TERM {survivor}: it releases the id as it exits"
        ));
        let term_at = Instant::now();
        self.signal(survivor, Signal::TERM);
        // The survivor's STOP and the new START come through different
        // pipes, in either order: wait for both.
        self.until("the handoff", |_, running| {
            running.len() == 1 && running[0] != survivor
        });
        self.say(&format!(
            "   {} took over {:.1} ms after the SIGTERM",
            self.holder(),
            term_at.elapsed().as_secs_f64() * 1000.0
        ));

        for name in NODES {
            if let Some(child) = self.children.get_mut(name)
                && child.try_wait().ok().flatten().is_none()
            {
                self.signal(name, Signal::TERM);
            }
        }
        for (_, mut child) in self.children.drain() {
            let _ = child.wait();
        }
        self.say("done: every process exited");
    }
}
