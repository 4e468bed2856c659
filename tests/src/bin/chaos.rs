//! The chaos harness: one seeded run of faults against one backend, with
//! the history checked at the end. Exits 1 and prints every offending pair
//! when a promise was broken.
//!
//! ```text
//! cargo build -p highlander-tests --bin chaos --bin node
//! cargo run -p highlander-tests --bin chaos -- --backend postgres --faults 200 --seed 7
//! cargo run -p highlander-tests --bin chaos -- --backend all --faults 30 --quick
//! ```
//!
//! Options: `--backend memory|postgres|etcd|cluster|all`, `--faults N`,
//! `--seed S`, `--kinds kill,pause,restart,partition,backend-restart,join,leave,drain`,
//! `--slack-ms MS` (added to every bound, default 1000), `--quick` (short
//! Postgres holds), `--rebalance` (rebalancing on in every node),
//! `--netns` (cluster nodes in network namespaces, partitions by
//! `iptables`; needs root), `--quiet`. See `docs/chaos.md`.

use std::time::Duration;

use highlander_tests::chaos::{Backend, FaultKind, RunConfig, run};

fn usage(msg: &str) -> ! {
    eprintln!(
        "{msg}\nusage: chaos --backend memory|postgres|etcd|cluster|all [--faults N] [--seed S] \
         [--kinds kill,pause,restart,partition,backend-restart,join,leave,drain] [--slack-ms MS] \
         [--quick] [--rebalance] [--netns] [--quiet]"
    );
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    highlander_tests::init_tracing();
    let mut backends: Vec<Backend> = Vec::new();
    let mut faults = 50;
    let mut seed = 7;
    let mut kinds = None;
    let mut slack = Duration::from_secs(1);
    let mut quick = false;
    let mut netns = false;
    let mut rebalance = false;
    let mut verbose = true;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--backend" => {
                let v = value();
                backends = if v == "all" {
                    Backend::ALL.into_iter().filter(|b| b.available()).collect()
                } else {
                    vec![Backend::parse(&v).unwrap_or_else(|| usage(&format!("no backend {v}")))]
                }
            }
            "--faults" => faults = value().parse().unwrap_or_else(|_| usage("--faults N")),
            "--seed" => seed = value().parse().unwrap_or_else(|_| usage("--seed S")),
            "--kinds" => {
                kinds = Some(
                    value()
                        .split(',')
                        .map(|k| {
                            FaultKind::parse(k)
                                .unwrap_or_else(|| usage(&format!("no fault kind {k}")))
                        })
                        .collect(),
                )
            }
            "--slack-ms" => {
                slack = Duration::from_millis(
                    value().parse().unwrap_or_else(|_| usage("--slack-ms MS")),
                )
            }
            "--quick" => quick = true,
            "--netns" => netns = true,
            "--rebalance" => rebalance = true,
            "--quiet" => verbose = false,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if backends.is_empty() {
        usage("--backend is required");
    }
    if netns && !backends.contains(&Backend::Cluster) {
        usage("--netns applies to the cluster backend only: use it with --backend cluster or all");
    }
    let node_bin = std::env::current_exe()
        .expect("the chaos binary knows its path")
        .with_file_name("node");
    let mut failed = false;
    for backend in backends {
        if backend != Backend::Memory && !node_bin.is_file() {
            usage(&format!(
                "{} is missing: cargo build -p highlander-tests --bin node",
                node_bin.display()
            ));
        }
        let mut cfg = RunConfig::new(backend, faults, seed, node_bin.clone());
        cfg.kinds = kinds.clone();
        cfg.slack = slack;
        cfg.quick = quick;
        cfg.netns = netns && backend == Backend::Cluster;
        cfg.rebalance = rebalance;
        cfg.verbose = verbose;
        eprintln!(
            "chaos: {}{}{} with {faults} faults, seed {seed}",
            backend.name(),
            if cfg.netns { " (netns)" } else { "" },
            if cfg.rebalance { " (rebalancing)" } else { "" }
        );
        let outcome = run(&cfg).await;
        print!("{}", outcome.summary());
        let path = std::env::temp_dir().join(format!("chaos-{}-{seed}.txt", backend.name()));
        if std::fs::write(&path, outcome.history.timeline()).is_ok() {
            println!("timeline: {}", path.display());
        }
        failed |= !outcome.verdict.passed();
    }
    if failed {
        std::process::exit(1);
    }
}
