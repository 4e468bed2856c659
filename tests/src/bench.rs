//! What the benchmark binaries share: finding the `node` binary beside them
//! and printing a latency distribution (n, p50, p99, max) per scenario.
//! Benchmarks print; they never assert a time.

use std::path::PathBuf;

/// The binary `name` built beside the running one (same profile), with a
/// message naming the build command when it is missing.
pub fn sibling_bin(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("the path of this binary");
    let path = me.with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: build it beside this one, e.g. \
         `cargo build --release -p highlander-tests --bin {name} --bin {}`",
        path.display(),
        me.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("<this bench>")
    );
    path
}

/// Nanoseconds as milliseconds.
pub fn ms(nanos: u128) -> f64 {
    nanos as f64 / 1e6
}

/// The summary of a set of samples, nearest-rank percentiles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distribution {
    /// How many samples.
    pub n: usize,
    /// The median.
    pub p50: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The largest sample.
    pub max: f64,
}

impl Distribution {
    /// The distribution of `samples`; `None` when there are none.
    ///
    /// ```
    /// use highlander_tests::bench::Distribution;
    /// let d = Distribution::of(&[3.0, 1.0, 2.0]).unwrap();
    /// assert_eq!((d.n, d.p50, d.p99, d.max), (3, 2.0, 3.0, 3.0));
    /// assert!(Distribution::of(&[]).is_none());
    /// ```
    pub fn of(samples: &[f64]) -> Option<Distribution> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let rank = |p: f64| sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        (n > 0).then(|| Distribution {
            n,
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted[n - 1],
        })
    }
}

/// Prints one scenario's distribution of millisecond samples as one line.
pub fn report(name: &str, samples: &[f64]) {
    match Distribution::of(samples) {
        Some(d) => println!(
            "{name:<48} n={:<4} p50={:>9.2} ms  p99={:>9.2} ms  max={:>9.2} ms",
            d.n, d.p50, d.p99, d.max
        ),
        None => println!("{name:<48} n=0"),
    }
}
