//! Runnable examples for highlander, one story per file in this folder:
//!
//! - `01_quick_start.rs`: one service on the memory backend;
//! - `02_supervision_tree.rs`: a singleton whose child tasks restart together;
//! - `03_runtime_ids.rs`: one singleton per tenant, ids known at run time;
//! - `04_three_nodes.rs`: three nodes in one process, a takeover, a split and a heal;
//! - `05_postgres_fencing.rs`: fenced writes with the Postgres backend
//!   (`--features postgres`);
//! - `06_three_processes.rs`: three OS processes on the embedded cluster
//!   (`cluster://` on loopback): kill, pause, resume, graceful stop;
//! - `07_fleet.rs`: tenants added at run time, a node drained and resumed,
//!   a tenant removed.
//!
//! Run one with `cargo run --example 04_three_nodes`.
