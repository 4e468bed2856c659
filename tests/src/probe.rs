//! The one test service: each instance records when it starts (with its
//! node and fencing token) and when it stops (with the shutdown reason),
//! into a [`Probe`] that tests read and wait on.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use highlander::{MemoryCluster, Runtime, ShutdownReason};
//! use highlander_tests::probe::Probe;
//!
//! let probe = Probe::new();
//! let a = Runtime::builder()
//!     .node("a")
//!     .backend(MemoryCluster::new())
//!     .child(probe.spec("solo"))
//!     .start()
//!     .await
//!     .unwrap();
//! let start = probe.wait_start("a", "solo").await;
//! assert_eq!(start.token, 1);
//! a.shutdown().await;
//! assert_eq!(probe.stops("solo")[0].reason(), Some(&ShutdownReason::NodeShutdown));
//! probe.assert_one_at_a_time();
//! # }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use highlander::{ChildSpec, Context, Error, Service, ShutdownReason};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::wait::GUARD;

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The instance started: its tenure began.
    Start,
    /// The instance stopped: `terminate` ran (and returned) with this reason.
    Stop(ShutdownReason),
    /// The test crashed the node or ended its session from outside
    /// ([`Probe::cut`]): its tenures end here, whatever it reports later.
    Cut,
}

/// One recorded event.
#[derive(Debug, Clone)]
pub struct Event {
    /// What happened.
    pub kind: Kind,
    /// The node it happened on.
    pub node: String,
    /// The singleton id (`*` for a [`Kind::Cut`]).
    pub id: String,
    /// The fencing token of the tenure (0 for a [`Kind::Cut`]).
    pub token: u64,
    /// When, on tokio's clock (paused in tests that pause it).
    pub at: Instant,
    /// When, in nanoseconds since the Unix epoch (the clock every process
    /// on the host shares).
    pub at_nanos: u128,
}

impl Event {
    /// True for a start.
    pub fn is_start(&self) -> bool {
        self.kind == Kind::Start
    }

    /// True for a stop, whatever its reason.
    pub fn is_stop(&self) -> bool {
        matches!(self.kind, Kind::Stop(_))
    }

    /// The shutdown reason of a stop.
    pub fn reason(&self) -> Option<&ShutdownReason> {
        match &self.kind {
            Kind::Stop(reason) => Some(reason),
            _ => None,
        }
    }
}

impl fmt::Display for Event {
    /// `start <id> <node> <token>`, `stop <id> <node> <token> <reason>` or
    /// `cut <node>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Start => write!(f, "start {} {} {}", self.id, self.node, self.token),
            Kind::Stop(reason) => {
                write!(f, "stop {} {} {} {reason}", self.id, self.node, self.token)
            }
            Kind::Cut => write!(f, "cut {}", self.node),
        }
    }
}

/// How a probe instance behaves once started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Run {
    /// Runs until cancelled.
    #[default]
    Wait,
    /// Returns `Ok` at once.
    ReturnOk,
    /// Returns the error `boom` at once.
    Fail,
    /// Panics with `kaboom` at once.
    Panic,
}

/// Called while an instance runs: once before its start is recorded, then
/// at every tick, with the id, the fencing token and the node.
pub type Tick = Arc<dyn Fn(&str, u64, &str) + Send + Sync>;

/// How the instances of one spec behave.
#[derive(Clone, Default)]
struct Behaviour {
    run: Run,
    /// How long `terminate` takes before it records the stop.
    stop: Duration,
    tick: Option<(Duration, Tick)>,
}

/// Where the instances of a test record what they do; clones share it.
#[derive(Clone)]
pub struct Probe {
    events: Arc<Mutex<Vec<Event>>>,
    changed: watch::Sender<u64>,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            events: Arc::default(),
            changed: watch::Sender::new(0),
        }
    }
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.lines()).finish()
    }
}

impl Probe {
    /// An empty probe.
    pub fn new() -> Probe {
        Probe::default()
    }

    /// The spec of a probe service for `id` that runs until cancelled.
    pub fn spec(&self, id: &str) -> ChildSpec {
        self.spec_of(id, Behaviour::default())
    }

    /// The specs of [`Probe::spec`] for each of `ids`.
    pub fn specs(&self, ids: &[String]) -> Vec<ChildSpec> {
        ids.iter().map(|id| self.spec(id)).collect()
    }

    /// The spec of a probe service for `id` that behaves as `run` says.
    pub fn spec_with(&self, id: &str, run: Run) -> ChildSpec {
        self.spec_of(
            id,
            Behaviour {
                run,
                ..Behaviour::default()
            },
        )
    }

    /// The spec of a probe service for `id` whose `terminate` takes `stop`
    /// before the stop is recorded (keep `stop` within the spec's shutdown
    /// budget).
    pub fn slow_spec(&self, id: &str, stop: Duration) -> ChildSpec {
        self.spec_of(
            id,
            Behaviour {
                stop,
                ..Behaviour::default()
            },
        )
    }

    /// The spec of a probe service for `id` that calls `tick` once before
    /// its start is recorded, then every `every` until it is cancelled.
    pub fn ticking_spec(&self, id: &str, every: Duration, tick: Tick) -> ChildSpec {
        self.spec_of(
            id,
            Behaviour {
                tick: Some((every, tick)),
                ..Behaviour::default()
            },
        )
    }

    fn spec_of(&self, id: &str, behaviour: Behaviour) -> ChildSpec {
        let probe = self.clone();
        ChildSpec::new(id, move |_ctx| {
            let instance = Instance {
                probe: probe.clone(),
                behaviour: behaviour.clone(),
                id: String::new(),
                node: String::new(),
                token: 0,
            };
            async move { Ok(instance) }
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, kind: Kind, node: &str, id: &str, token: u64) {
        self.lock().push(Event {
            kind,
            node: node.to_string(),
            id: id.to_string(),
            token,
            at: Instant::now(),
            at_nanos: crate::unix_nanos(),
        });
        self.changed.send_modify(|n| *n += 1);
    }

    /// Records that the test crashes `node` or ends its session now (call
    /// it just before): the node's running tenures end here, and what it
    /// reports of them later does not count.
    pub fn cut(&self, node: &str) {
        self.push(Kind::Cut, node, "*", 0);
    }

    /// Every event so far, in the order they happened.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// Every event so far as a line (see [`Event`]'s `Display`).
    pub fn lines(&self) -> Vec<String> {
        self.lock().iter().map(Event::to_string).collect()
    }

    /// The starts of `id`, in order.
    pub fn starts(&self, id: &str) -> Vec<Event> {
        self.filter(|e| e.id == id && e.is_start())
    }

    /// The stops of `id`, in order.
    pub fn stops(&self, id: &str) -> Vec<Event> {
        self.filter(|e| e.id == id && e.is_stop())
    }

    /// The events for which `pred` holds, in order.
    pub fn filter(&self, mut pred: impl FnMut(&Event) -> bool) -> Vec<Event> {
        self.lock().iter().filter(|e| pred(e)).cloned().collect()
    }

    /// How many starts of `id` on `node`.
    pub fn started(&self, id: &str, node: &str) -> usize {
        self.filter(|e| e.is_start() && e.id == id && e.node == node)
            .len()
    }

    /// How many stops of `id` on `node` with `reason`.
    pub fn stopped(&self, id: &str, node: &str, reason: &ShutdownReason) -> usize {
        self.filter(|e| e.id == id && e.node == node && e.reason() == Some(reason))
            .len()
    }

    /// Waits (at every new event) until `cond` holds for the events so far,
    /// and returns them. Fails the test after [`GUARD`] with `what` and
    /// every event.
    pub async fn wait_for(&self, what: &str, mut cond: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
        let mut rx = self.changed.subscribe();
        let found = tokio::time::timeout(GUARD, async {
            loop {
                rx.borrow_and_update();
                let events = self.events();
                if cond(&events) {
                    return events;
                }
                let _ = rx.changed().await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("hang guard: not {what} within {GUARD:?}: {self:#?}"))
    }

    /// Waits until `node` has started a tenure of `id`; returns the first
    /// such start.
    pub async fn wait_start(&self, node: &str, id: &str) -> Event {
        let is = |e: &Event| e.is_start() && e.node == node && e.id == id;
        let events = self
            .wait_for(&format!("`{id}` started on {node}"), |events| {
                events.iter().any(is)
            })
            .await;
        events.into_iter().find(is).expect("just found")
    }

    /// Waits until `node` has stopped an instance of `id` with `reason`;
    /// returns the first such stop.
    pub async fn wait_stop(&self, node: &str, id: &str, reason: &ShutdownReason) -> Event {
        let is = |e: &Event| e.node == node && e.id == id && e.reason() == Some(reason);
        let events = self
            .wait_for(
                &format!("`{id}` stopped on {node} with {reason}"),
                |events| events.iter().any(is),
            )
            .await;
        events.into_iter().find(is).expect("just found")
    }

    /// Checks that the tenures of each id never overlapped: every start
    /// came after the stop (or the [cut](Probe::cut)) of the tenure before
    /// it, and tokens strictly grew.
    pub fn assert_one_at_a_time(&self) {
        let events = self.events();
        let mut ids: Vec<&str> = events
            .iter()
            .filter(|e| e.kind != Kind::Cut)
            .map(|e| e.id.as_str())
            .collect();
        ids.sort();
        ids.dedup();
        for id in ids {
            let mut running: Option<&Event> = None;
            let mut last_token = 0;
            let mut cut: Vec<(&str, u64)> = Vec::new();
            for e in events.iter().filter(|e| e.id == id || e.kind == Kind::Cut) {
                match &e.kind {
                    Kind::Cut => {
                        if let Some(r) = running.filter(|r| r.node == e.node) {
                            cut.push((r.node.as_str(), r.token));
                            running = None;
                        }
                    }
                    Kind::Stop(_) if cut.contains(&(e.node.as_str(), e.token)) => {}
                    Kind::Start => {
                        assert!(
                            running.is_none(),
                            "`{id}`: {e} while {} ran: {self:#?}",
                            running.map(Event::to_string).unwrap_or_default()
                        );
                        assert!(
                            e.token > last_token,
                            "`{id}`: token {} after {last_token}: {self:#?}",
                            e.token
                        );
                        last_token = e.token;
                        running = Some(e);
                    }
                    Kind::Stop(_) => {
                        let r = running
                            .take()
                            .unwrap_or_else(|| panic!("`{id}`: {e} without a start: {self:#?}"));
                        assert_eq!(
                            (r.node.as_str(), r.token),
                            (e.node.as_str(), e.token),
                            "`{id}`: {self:#?}"
                        );
                    }
                }
            }
        }
    }
}

/// One instance of a probe service.
struct Instance {
    probe: Probe,
    behaviour: Behaviour,
    id: String,
    node: String,
    token: u64,
}

impl Service for Instance {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.id = ctx.id().to_string();
        self.node = ctx.node().to_string();
        self.token = ctx.fencing_token();
        let tick = self.behaviour.tick.clone();
        if let Some((_, tick)) = &tick {
            tick(&self.id, self.token, &self.node);
        }
        self.probe
            .push(Kind::Start, &self.node, &self.id, self.token);
        match self.behaviour.run {
            Run::Wait => {}
            Run::ReturnOk => return Ok(()),
            Run::Fail => return Err(Error::msg("boom")),
            Run::Panic => panic!("kaboom"),
        }
        match tick {
            None => ctx.cancelled().await,
            Some((every, tick)) => loop {
                tokio::select! {
                    () = ctx.cancelled() => break,
                    () = tokio::time::sleep(every) => tick(&self.id, self.token, &self.node),
                }
            },
        }
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        if !self.behaviour.stop.is_zero() {
            tokio::time::sleep(self.behaviour.stop).await;
        }
        self.probe
            .push(Kind::Stop(reason), &self.node, &self.id, self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(events: &[(Kind, &str, u64)]) -> Probe {
        let probe = Probe::new();
        for (kind, node, token) in events {
            let id = if *kind == Kind::Cut { "*" } else { "x" };
            probe.push(kind.clone(), node, id, *token);
        }
        probe
    }

    fn stop() -> Kind {
        Kind::Stop(ShutdownReason::NodeShutdown)
    }

    #[test]
    fn tenures_one_after_the_other_pass() {
        probe(&[
            (Kind::Start, "a", 1),
            (stop(), "a", 1),
            (Kind::Start, "b", 2),
            (Kind::Cut, "b", 0),
            (Kind::Start, "c", 3),
            // b's late report of the tenure the cut ended does not count
            (stop(), "b", 2),
        ])
        .assert_one_at_a_time();
    }

    #[test]
    #[should_panic(expected = "while start x a 1 ran")]
    fn an_overlap_fails() {
        probe(&[(Kind::Start, "a", 1), (Kind::Start, "b", 2)]).assert_one_at_a_time();
    }

    #[test]
    #[should_panic(expected = "token 1 after 2")]
    fn a_token_that_does_not_grow_fails() {
        probe(&[
            (Kind::Start, "a", 2),
            (stop(), "a", 2),
            (Kind::Start, "b", 1),
        ])
        .assert_one_at_a_time();
    }

    #[test]
    #[should_panic(expected = "without a start")]
    fn a_stop_without_a_start_fails() {
        probe(&[(stop(), "a", 1)]).assert_one_at_a_time();
    }
}
