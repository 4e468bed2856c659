//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: the
//! application installs the recorder (exporter) it wants, highlander only
//! records. Install it **before** starting the runtime: handles are taken
//! from the recorder installed at start-up, so metrics recorded into no
//! recorder are lost. With the `http` feature, `GET /metrics` renders
//! Prometheus text from a recorder highlander installs itself when the
//! application installed none (see `docs/operations.md`).
//!
//! # Every metric
//!
//! | name | type | labels | unit | what |
//! |---|---|---|---|---|
//! | `highlander_running` | gauge | `node`, `id` | instances | 1 while the id's instance runs on this node, else 0; without the `id` label (see below) the number of ids running on the node |
//! | `highlander_tenures_started_total` | counter | `node`, `id` | tenures | claims that succeeded: this node began holding the id |
//! | `highlander_stops_total` | counter | `node`, `id`, `reason` | instances | instances that stopped, by `reason`: `normal`, `error` (error or panic in `init`, `run` or a child), `conflict`, `lease_lost`, `stepdown`, `node_shutdown`, `moved` (handed over: drain), `removed` (`RuntimeHandle::remove`) |
//! | `highlander_restarts_total` | counter | `node`, `id` | restarts | instances restarted by policy within a tenure |
//! | `highlander_stepdowns_total` | counter | `node`, `id` | step-downs | times this node gave the id up to wait (restart intensity exceeded, or asked to with `step_down`) |
//! | `highlander_claim_latency_seconds` | histogram | `node` | seconds | from the moment an id may be free (the first claim attempt, or the wake after waiting on a holder) to "running here", over the node's ids |
//! | `highlander_session_up` | gauge | `node` | 0 or 1 | 1 while the backend session is up (what `/readyz` answers): the last probe reached the backend, no id is retrying, the lease deadline is ahead |
//! | `highlander_members` | gauge | `node` | members | cluster members this node sees, reachable or not (0 for backends without members) |
//! | `highlander_members_reachable` | gauge | `node` | members | of those, the ones this node can reach now |
//! | `highlander_lease_deadline_seconds` | gauge | `node` | seconds | time left before this node must give up its leases unless the backend confirms them again; only for backends that report it ([`Session::lease_deadline`](crate::backend::Session::lease_deadline)) |
//!
//! The node gauges are updated by a probe once a second; the per-id series
//! at every state change.
//!
//! # Label cardinality
//!
//! `node` is one value per process. `reason` has the eight values above.
//! **`id` is a label**: every configured id adds five series (one more per
//! stop reason seen) to each scrape. The claim-latency histogram is per
//! node only: with buckets, one per id would add some 16 series per id. For fleets of many
//! ids (say 100,000), turn the per-id series off with
//! [`Builder::metrics_per_id(false)`](crate::Builder::metrics_per_id): the
//! same names are then recorded without the `id` label, summed over the
//! node's ids (`highlander_running` becomes the number of ids running on
//! the node).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::metrics::{
    Counter, Gauge, Histogram, Unit, describe_counter, describe_gauge, describe_histogram,
};

use crate::ShutdownReason;
use crate::guardian::SingletonState;

/// `highlander_running`: see the [table](self).
pub const RUNNING: &str = "highlander_running";
/// `highlander_tenures_started_total`: see the [table](self).
pub const TENURES_STARTED: &str = "highlander_tenures_started_total";
/// `highlander_stops_total`: see the [table](self).
pub const STOPS: &str = "highlander_stops_total";
/// `highlander_restarts_total`: see the [table](self).
pub const RESTARTS: &str = "highlander_restarts_total";
/// `highlander_stepdowns_total`: see the [table](self).
pub const STEPDOWNS: &str = "highlander_stepdowns_total";
/// `highlander_claim_latency_seconds`: see the [table](self).
pub const CLAIM_LATENCY: &str = "highlander_claim_latency_seconds";
/// `highlander_session_up`: see the [table](self).
pub const SESSION_UP: &str = "highlander_session_up";
/// `highlander_members`: see the [table](self).
pub const MEMBERS: &str = "highlander_members";
/// `highlander_members_reachable`: see the [table](self).
pub const MEMBERS_REACHABLE: &str = "highlander_members_reachable";
/// `highlander_lease_deadline_seconds`: see the [table](self).
pub const LEASE_DEADLINE: &str = "highlander_lease_deadline_seconds";

fn describe() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        describe_gauge!(
            RUNNING,
            Unit::Count,
            "1 while the id's instance runs on this node"
        );
        describe_counter!(TENURES_STARTED, Unit::Count, "tenures begun on this node");
        describe_counter!(STOPS, Unit::Count, "instances stopped, by reason");
        describe_counter!(RESTARTS, Unit::Count, "instances restarted within a tenure");
        describe_counter!(STEPDOWNS, Unit::Count, "times this node gave an id up");
        describe_histogram!(
            CLAIM_LATENCY,
            Unit::Seconds,
            "from the id may be free to running here"
        );
        describe_gauge!(SESSION_UP, "1 while the backend session is up");
        describe_gauge!(MEMBERS, Unit::Count, "cluster members this node sees");
        describe_gauge!(
            MEMBERS_REACHABLE,
            Unit::Count,
            "members this node can reach"
        );
        describe_gauge!(
            LEASE_DEADLINE,
            Unit::Seconds,
            "time left before this node must give up its leases"
        );
    });
}

/// The per-node series, and the shared per-id handles when ids are not
/// labels.
pub(crate) struct NodeMetrics {
    session_up: Gauge,
    members: Gauge,
    reachable: Gauge,
    lease_deadline: Gauge,
    /// With `metrics_per_id(false)`: the one set of handles every id uses.
    shared: Option<Arc<Handles>>,
    /// Per node in both modes.
    claim_latency: Histogram,
}

impl NodeMetrics {
    pub(crate) fn new(node: &Arc<str>, per_id: bool) -> NodeMetrics {
        describe();
        let node = node.clone();
        NodeMetrics {
            session_up: ::metrics::gauge!(SESSION_UP, "node" => label(&node)),
            members: ::metrics::gauge!(MEMBERS, "node" => label(&node)),
            reachable: ::metrics::gauge!(MEMBERS_REACHABLE, "node" => label(&node)),
            lease_deadline: ::metrics::gauge!(LEASE_DEADLINE, "node" => label(&node)),
            claim_latency: ::metrics::histogram!(CLAIM_LATENCY, "node" => label(&node)),
            shared: (!per_id).then(|| Arc::new(Handles::new(&node, None))),
        }
    }

    pub(crate) fn for_id(&self, node: &Arc<str>, id: &Arc<str>) -> IdMetrics {
        let handles = match &self.shared {
            Some(shared) => shared.clone(),
            None => Arc::new(Handles::new(node, Some(id))),
        };
        IdMetrics { handles }
    }

    /// After each probe.
    pub(crate) fn probed(&self, ops: &super::NodeOps, deadline: Option<std::time::Instant>) {
        self.session_up
            .set(if ops.session_up() { 1.0 } else { 0.0 });
        let members = ops.members();
        self.members.set(members.len() as f64);
        self.reachable
            .set(members.iter().filter(|m| m.reachable).count() as f64);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            self.lease_deadline.set(left.as_secs_f64());
        }
    }

    /// When the runtime has stopped.
    pub(crate) fn stopped(&self) {
        self.session_up.set(0.0);
    }
}

/// A label value that shares the name's allocation instead of copying it.
fn label(name: &Arc<str>) -> ::metrics::SharedString {
    ::metrics::SharedString::from(name.clone())
}

/// One id's handles, or the node's shared ones: per id that is one
/// allocation, the `Arc` of the handles, and no copy of either name (the
/// stop counter, registered at each stop for its reason, is given them by
/// the caller).
struct Handles {
    /// Whether the series carry the `id` label.
    per_id: bool,
    running: Gauge,
    tenures: Counter,
    restarts: Counter,
    stepdowns: Counter,
}

impl Handles {
    fn new(node: &Arc<str>, id: Option<&Arc<str>>) -> Handles {
        let mut labels = vec![::metrics::Label::new("node", label(node))];
        if let Some(id) = id {
            labels.push(::metrics::Label::new("id", label(id)));
        }
        Handles {
            per_id: id.is_some(),
            running: ::metrics::gauge!(RUNNING, labels.clone()),
            tenures: ::metrics::counter!(TENURES_STARTED, labels.clone()),
            restarts: ::metrics::counter!(RESTARTS, labels.clone()),
            stepdowns: ::metrics::counter!(STEPDOWNS, labels),
        }
    }
}

/// One id's handles (or the node's shared ones). The claim latency is
/// the node's histogram, passed in, not a copy of its handle in every id.
pub(crate) struct IdMetrics {
    handles: Arc<Handles>,
}

impl IdMetrics {
    pub(crate) fn transition(
        &self,
        node: &NodeMetrics,
        old: &SingletonState,
        new: &SingletonState,
        restarted: bool,
        tenure_latency: Option<Option<Duration>>,
    ) {
        let h = &self.handles;
        let was = matches!(old, SingletonState::Running { .. });
        let is = matches!(new, SingletonState::Running { .. });
        if is && !was {
            h.running.increment(1.0);
        } else if was && !is {
            h.running.decrement(1.0);
        }
        if let Some(latency) = tenure_latency {
            h.tenures.increment(1);
            if let Some(latency) = latency {
                node.claim_latency.record(latency.as_secs_f64());
            }
        }
        if restarted {
            h.restarts.increment(1);
        }
        if matches!(new, SingletonState::SteppedDown) {
            h.stepdowns.increment(1);
        }
    }

    /// The guardian is gone without a last state change (its runtime was
    /// aborted): what it ran no longer runs.
    pub(crate) fn gone(&self, state: &SingletonState) {
        if matches!(state, SingletonState::Running { .. }) {
            self.handles.running.decrement(1.0);
        }
    }

    /// An instance of `id` stopped on `node` for `reason`.
    pub(crate) fn stopped(&self, node: &Arc<str>, id: &Arc<str>, reason: &ShutdownReason) {
        let reason = super::reason_label(reason);
        if self.handles.per_id {
            ::metrics::counter!(STOPS, "node" => label(node), "id" => label(id), "reason" => reason)
        } else {
            ::metrics::counter!(STOPS, "node" => label(node), "reason" => reason)
        }
        .increment(1);
    }
}

#[cfg(test)]
mod tests {
    /// With per-id series every id keeps one set of handles: four handles
    /// and a flag, 72 B (an 88 B allocation with the `Arc`'s counts; it was
    /// 112 B with copies of the node's and the id's names, which the stop
    /// counter is now given).
    #[test]
    fn the_handles_of_an_id_stay_small() {
        let handles = std::mem::size_of::<super::Handles>();
        println!("per-id metrics handles {handles} B");
        assert!(handles <= 72, "the per-id handles grew to {handles} B");
    }
}
