//! What one chaos run records, and the tenures rebuilt from it.

use std::collections::HashMap;
use std::fmt;

use crate::process::{Event, EventKind};

/// A kind of fault the schedule injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL of a node process (memory: `RuntimeHandle::abort`), then a
    /// new process under the same name.
    Kill,
    /// SIGSTOP of a node, a pause, then SIGCONT.
    Pause,
    /// SIGTERM of a node (memory: `RuntimeHandle::shutdown`), then a new one
    /// under the same name.
    Restart,
    /// A network partition: a node cut from the others (cluster, memory) or
    /// from the backend server (postgres, etcd), then healed.
    Partition,
    /// The backend server itself stopped and started again.
    BackendRestart,
    /// A node with a name never used before starts and stays: the fleet
    /// grows (with rebalancing on, ids move to it).
    Join,
    /// A node shuts down gracefully (SIGTERM; memory:
    /// `RuntimeHandle::shutdown`) and does not come back under its name.
    Leave,
    /// A node drains (SIGUSR1 to the `node` binary; memory:
    /// `RuntimeHandle::drain`), holds nothing for a while, then resumes
    /// (SIGUSR2; memory: `RuntimeHandle::resume`).
    Drain,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 8] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Restart,
        FaultKind::Partition,
        FaultKind::BackendRestart,
        FaultKind::Join,
        FaultKind::Leave,
        FaultKind::Drain,
    ];

    /// A short name (`kill`, `pause`, `restart`, `partition`,
    /// `backend-restart`, `join`, `leave`, `drain`).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Restart => "restart",
            FaultKind::Partition => "partition",
            FaultKind::BackendRestart => "backend-restart",
            FaultKind::Join => "join",
            FaultKind::Leave => "leave",
            FaultKind::Drain => "drain",
        }
    }

    /// The kind named `name` (as [`FaultKind::name`] writes it).
    pub fn parse(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether it changes who is in the fleet or what a member takes on
    /// (join, leave, drain) rather than breaking something.
    pub fn is_membership(self) -> bool {
        matches!(self, FaultKind::Join | FaultKind::Leave | FaultKind::Drain)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One injected fault, in the host's one clock (Unix nanoseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// What was done.
    pub kind: FaultKind,
    /// To which node (`None` for the backend server).
    pub node: Option<String>,
    /// When it began (just before the signal, cut or stop).
    pub at: u128,
    /// When it was undone: the SIGCONT, the heal, the replacement node or
    /// the restarted server ready (for a kill: the new process ready). For a
    /// join: the new node's process ready; for a leave: the node exited;
    /// for a drain: the resume.
    pub until: u128,
    /// A drain only: when the drained node held nothing any more (its last
    /// instance stopped); `None` if it never got there, or for other kinds.
    pub drained: Option<u128>,
}

impl Fault {
    /// A fault of `kind` on `node` (`None`: the backend server) from `at`
    /// to `until`.
    pub fn new(kind: FaultKind, node: Option<&str>, at: u128, until: u128) -> Fault {
        Fault {
            kind,
            node: node.map(str::to_string),
            at,
            until,
            drained: None,
        }
    }
}

/// One write the downstream register answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceWrite {
    /// When the register decided.
    pub at: u128,
    /// The singleton id written for.
    pub id: String,
    /// The writer's fencing token.
    pub token: u64,
    /// The writer's node.
    pub node: String,
    /// Whether the register accepted it (token ≥ the highest seen).
    pub accepted: bool,
}

/// How a node ended at the end of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The node.
    pub node: String,
    /// `None` when it exited cleanly (status 0 after SIGTERM, or a runtime
    /// that shut down); otherwise what went wrong.
    pub problem: Option<String>,
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The singleton ids the nodes ran.
    pub ids: Vec<String>,
    /// Tenure events from every node, in any order.
    pub events: Vec<Event>,
    /// The faults, in the order they were injected.
    pub faults: Vec<Fault>,
    /// The downstream register's log.
    pub writes: Vec<FenceWrite>,
    /// When the final shutdown of every node began.
    pub shutdown_at: u128,
    /// When the last node had exited.
    pub end: u128,
    /// How each node ended.
    pub exits: Vec<Exit>,
}

/// How a tenure ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The node printed `STOP` with this reason.
    Stopped(String),
    /// The node was killed while the instance ran.
    Killed,
    /// Nothing ended it by the end of the history.
    Open,
}

/// One continuous period in which one node ran one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenure {
    /// The singleton id.
    pub id: String,
    /// The node that ran it.
    pub node: String,
    /// Its fencing token.
    pub token: u64,
    /// `START`, Unix nanoseconds.
    pub start: u128,
    /// `STOP` (or the kill, or the history's end), Unix nanoseconds.
    pub end: u128,
    /// How it ended.
    pub how: End,
}

impl fmt::Display for Tenure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match &self.how {
            End::Stopped(r) => format!("stopped: {r}"),
            End::Killed => "killed".into(),
            End::Open => "still open".into(),
        };
        write!(
            f,
            "{} on {} token {} from {} to {} ({:.1} ms, {how})",
            self.id,
            self.node,
            self.token,
            self.start,
            self.end,
            (self.end.saturating_sub(self.start)) as f64 / 1e6
        )
    }
}

impl History {
    /// Rebuilds the tenures: each `START` matched with the same node's `STOP`
    /// of the same id and token, or ended by a kill of that node. Sorted by
    /// id, then start.
    pub fn tenures(&self) -> Vec<Tenure> {
        enum Item<'a> {
            Event(&'a Event),
            Kill(&'a Fault),
        }
        let mut items: Vec<(u128, Item<'_>)> = self
            .events
            .iter()
            .map(|e| (e.at_nanos, Item::Event(e)))
            .chain(
                self.faults
                    .iter()
                    .filter(|f| f.kind == FaultKind::Kill)
                    .map(|f| (f.at, Item::Kill(f))),
            )
            .collect();
        items.sort_by_key(|(at, _)| *at);
        let mut open: HashMap<(String, String, u64), u128> = HashMap::new();
        let mut done = Vec::new();
        for (at, item) in items {
            match item {
                Item::Event(e) => {
                    let key = (e.node.clone(), e.id.clone(), e.token);
                    match e.kind {
                        EventKind::Start => {
                            open.insert(key, at);
                        }
                        EventKind::Stop => {
                            if let Some(start) = open.remove(&key) {
                                done.push(Tenure {
                                    id: e.id.clone(),
                                    node: e.node.clone(),
                                    token: e.token,
                                    start,
                                    end: at,
                                    how: End::Stopped(e.reason.clone().unwrap_or_default()),
                                });
                            }
                        }
                    }
                }
                Item::Kill(f) => {
                    let victims: Vec<_> = open
                        .keys()
                        .filter(|(node, _, _)| Some(node) == f.node.as_ref())
                        .cloned()
                        .collect();
                    for key in victims {
                        let start = open.remove(&key).unwrap_or(at);
                        done.push(Tenure {
                            id: key.1,
                            node: key.0,
                            token: key.2,
                            start,
                            end: at,
                            how: End::Killed,
                        });
                    }
                }
            }
        }
        let end = self
            .end
            .max(self.events.iter().map(|e| e.at_nanos).max().unwrap_or(0));
        for ((node, id, token), start) in open {
            done.push(Tenure {
                id,
                node,
                token,
                start,
                end,
                how: End::Open,
            });
        }
        done.sort_by(|a, b| (a.id.as_str(), a.start).cmp(&(b.id.as_str(), b.start)));
        done
    }
}

impl History {
    /// Every event and fault as one line each, in time order (milliseconds
    /// since the first record), for reading a failed run.
    pub fn timeline(&self) -> String {
        let mut lines: Vec<(u128, String)> = Vec::new();
        for e in &self.events {
            let kind = match e.kind {
                crate::process::EventKind::Start => "START",
                crate::process::EventKind::Stop => "STOP ",
            };
            lines.push((
                e.at_nanos,
                format!(
                    "{kind} {} {} token {} {}",
                    e.node,
                    e.id,
                    e.token,
                    e.reason.as_deref().unwrap_or("")
                ),
            ));
        }
        for f in &self.faults {
            let who = f.node.as_deref().unwrap_or("backend");
            lines.push((f.at, format!("FAULT {} {who} begins", f.kind)));
            if let Some(drained) = f.drained {
                lines.push((drained, format!("FAULT {} {who} holds nothing", f.kind)));
            }
            let undone = match f.kind {
                FaultKind::Join => "ready",
                FaultKind::Leave => "exited",
                FaultKind::Drain => "resumed",
                _ => "undone",
            };
            lines.push((f.until, format!("FAULT {} {who} {undone}", f.kind)));
        }
        lines.push((self.shutdown_at, "SHUTDOWN begins".into()));
        lines.sort_by_key(|(at, _)| *at);
        let origin = lines.first().map(|(at, _)| *at).unwrap_or(0);
        lines
            .into_iter()
            .map(|(at, l)| format!("{:>12.3} ms  {l}\n", at.saturating_sub(origin) as f64 / 1e6))
            .collect()
    }
}
