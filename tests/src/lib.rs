//! Test harnesses shared by the integration tests: real servers started from
//! the machine's packages on free ports in temp dirs, a driver for `node`
//! processes (the `node` binary of this package), the one probe service
//! ([`probe`]), waits with hang guards ([`wait`]), throwaway certificates
//! ([`pki`]) and the scenarios every backend must pass ([`conformance`]).

use std::time::{SystemTime, UNIX_EPOCH};

use highlander::ShutdownReason;

pub mod bench;
pub mod chaos;
pub mod cluster;
pub mod conformance;
pub mod etcd;
pub mod fixtures;
pub mod fleet;
pub mod log;
pub mod netns;
pub mod netns_cluster;
pub mod ops;
pub mod pki;
pub mod postgres;
pub mod probe;
pub mod process;
pub mod rolling;
pub mod wait;

/// Nanoseconds since the Unix epoch, the one clock every process on this
/// host shares.
pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// One line of the `node` binary's output.
pub fn event_line(
    kind: &str,
    node: &str,
    id: &str,
    token: u64,
    reason: Option<&ShutdownReason>,
) -> String {
    let reason = reason
        .map(|r| format!(" {}", r.to_string().replace(' ', "_")))
        .unwrap_or_default();
    format!("{kind} {} {node} {id} {token}{reason}", unix_nanos())
}

/// Logs to the test's captured output when `RUST_LOG` is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct ports on 127.0.0.1 that were free a moment ago (all bound
/// at once, then released, so they differ from each other).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("a bound socket has an address")
                .port()
        })
        .collect()
}
