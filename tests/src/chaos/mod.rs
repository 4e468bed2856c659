//! The chaos harness: real node processes (or, for the memory backend,
//! runtimes in this process) of a test singleton, faults injected from a
//! seeded schedule, a recorded history, and a checker that reads it.
//!
//! - [`history`]: what a run records (tenure events, faults, fenced writes);
//! - [`checker`]: the properties each backend promises, checked on a history;
//! - [`schedule`](mod@schedule): the seeded fault schedule;
//! - [`fence`]: the downstream register that accepts a write only with a
//!   token at least the highest it has seen for the id;
//! - [`proxy`]: a TCP proxy between one node and its backend server that can
//!   go silent like a cut link (and end the server side as the server would);
//! - [`config`]: the backends (their faults, holds and bounds), a run's
//!   configuration and its outcome;
//! - [`run`](mod@run): the driver loop, over one of two drivers:
//!   [`processes`] for node processes, [`memory`] in-process for the memory
//!   backend (and [`epmd`], the BEAM comparison's name server);
//!
//! See `docs/chaos.md` for how to run it and what the bounds are.

pub mod checker;
pub mod config;
pub mod epmd;
pub mod fence;
pub mod history;
pub mod measure;
pub mod memory;
pub mod processes;
pub mod proxy;
pub mod run;
pub mod schedule;
pub mod svg;

pub use checker::{Bounds, Model, Verdict, Violation, check};
pub use config::{Backend, Outcome, RunConfig};
pub use history::{Fault, FaultKind, FenceWrite, History, Tenure};
pub use run::run;
pub use schedule::{Rng, Step, schedule};
