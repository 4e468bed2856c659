//! The benchmark report: every available backend through the same
//! failover / handoff / takeover / heal scenarios side by side (measured
//! from seeded chaos runs of the node processes), their own scale
//! benchmarks (`bench_*`, run as they are), and, where `elixir` is
//! installed, the BEAM's own mechanism (`tests/beam/node.exs`: `:global`,
//! monitors, a conflict resolver that stops the loser with `:shutdown`) on
//! three BEAM nodes through the same chaos driver and checker. Writes `docs/report/REPORT.md` and its SVG plots; nothing in
//! the report is typed by hand.
//!
//! ```text
//! cargo run --release -p highlander-tests --bin report
//! cargo run --release -p highlander-tests --bin report -- --runs 10 --mixed 20 --no-bench --no-beam
//! ```
//!
//! Options: `--runs N` (faults per single-kind run, default 30), `--mixed N`
//! (faults in the mixed run per backend, default 40), `--bench-runs N`
//! (runs of each `bench_*` scale scenario, default 3), `--no-bench`,
//! `--no-beam`, `--backends memory,postgres,...`, `--out DIR`
//! (default `docs/report`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use highlander_tests::chaos::measure::{SCENARIOS, latencies, percentiles};
use highlander_tests::chaos::{Backend, FaultKind, Outcome, RunConfig, run, svg};

struct Args {
    runs: usize,
    mixed: usize,
    bench_runs: usize,
    bench: bool,
    beam: bool,
    backends: Vec<Backend>,
    out: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        runs: 30,
        mixed: 40,
        bench_runs: 3,
        bench: true,
        beam: true,
        backends: Backend::ALL.into_iter().filter(|b| b.available()).collect(),
        out: workspace().join("docs/report"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => a.runs = value().parse().expect("--runs N"),
            "--mixed" => a.mixed = value().parse().expect("--mixed N"),
            "--bench-runs" => a.bench_runs = value().parse().expect("--bench-runs N"),
            "--no-bench" => a.bench = false,
            "--no-beam" => a.beam = false,
            "--out" => a.out = PathBuf::from(value()),
            "--backends" => {
                a.backends = value()
                    .split(',')
                    .map(|b| Backend::parse(b).unwrap_or_else(|| panic!("no backend {b}")))
                    .collect()
            }
            other => panic!(
                "unknown argument {other}: --runs N --mixed N --bench-runs N --no-bench --no-beam --backends LIST --out DIR"
            ),
        }
    }
    a
}

/// The workspace root (this package's parent directory).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package sits in the workspace")
        .to_path_buf()
}

/// The sibling binaries (`node`, `bench_*`), built in this profile:
/// `cargo run --bin report` builds only the report, so under `cargo run`
/// (which sets `CARGO`) they are always brought up to date (a no-op when
/// they are), otherwise only when missing.
fn ensure_bins(dir: &Path) {
    let wanted = ["node", "bench_postgres", "bench_etcd", "bench_cluster"];
    let under_cargo = std::env::var_os("CARGO").is_some();
    if !under_cargo && wanted.iter().all(|b| dir.join(b).is_file()) {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "highlander-tests", "--bins"]);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    eprintln!("report: building the node and bench binaries");
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building the sibling binaries failed");
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        text.lines().next().unwrap_or("").trim().to_string()
    })
}

fn postgres_version() -> Option<String> {
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    majors.sort();
    let bin = format!("/usr/lib/postgresql/{}/bin/postgres", majors.pop()?);
    output(&bin, &["--version"])
}

/// `Erlang/OTP <release> [erts-…] · Elixir <version>`, from
/// `elixir --version`.
fn elixir_version() -> Option<String> {
    let out = Command::new("elixir").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let otp = text
        .lines()
        .find(|l| l.starts_with("Erlang/OTP"))?
        .split(" [")
        .take(2)
        .collect::<Vec<_>>()
        .join(" [");
    let elixir = text.lines().find(|l| l.starts_with("Elixir"))?;
    Some(format!("{otp} · {elixir}"))
}

struct Measured {
    backend: String,
    slug: String,
    samples: BTreeMap<String, Vec<f64>>,
    verdicts: Vec<(String, Outcome)>,
}

async fn measure(backend: Backend, a: &Args, node_bin: &Path) -> Measured {
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut verdicts = Vec::new();
    let single = |kind: FaultKind, seed: u64| {
        let mut cfg = RunConfig::new(backend, a.runs, seed, node_bin.to_path_buf());
        cfg.kinds = Some(vec![kind]);
        cfg.always_holder = true;
        cfg.ids = vec!["solo".into()];
        cfg.quick = true;
        cfg
    };
    let mut runs = vec![("SIGKILL of the holder", single(FaultKind::Kill, 1))];
    runs.push((
        "graceful restart of the holder",
        single(FaultKind::Restart, 2),
    ));
    let mut mixed = RunConfig::new(backend, a.mixed, 7, node_bin.to_path_buf());
    mixed.quick = true;
    runs.push(("mixed faults", mixed));
    for (name, cfg) in runs {
        eprintln!(
            "report: {} — {name} ({} faults)",
            backend.name(),
            cfg.faults
        );
        let outcome = run(&cfg).await;
        eprint!("{}", outcome.summary());
        for (scenario, s) in latencies(&outcome.history) {
            samples.entry(scenario.to_string()).or_default().extend(s);
        }
        if backend.model() == highlander_tests::chaos::Model::Ap {
            samples
                .entry("heal to one instance".into())
                .or_default()
                .extend(
                    outcome
                        .verdict
                        .past_heal
                        .iter()
                        .map(|d| d.as_secs_f64() * 1e3),
                );
        }
        verdicts.push((name.to_string(), outcome));
    }
    Measured {
        backend: backend.name().to_string(),
        slug: backend.name().to_string(),
        samples,
        verdicts,
    }
}

fn bench(bin: &Path, args: &[&str]) -> String {
    eprintln!("report: {} {}", bin.display(), args.join(" "));
    match Command::new(bin).args(args).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => format!(
            "(failed: {})\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        ),
        Err(e) => format!("(cannot run: {e})"),
    }
}

fn cell(samples: Option<&Vec<f64>>) -> String {
    match samples.and_then(|s| percentiles(s).map(|p| (p, s.len()))) {
        Some(((p50, p99, max), n)) => format!("{p50:.1} / {p99:.1} / {max:.1} (n={n})"),
        None => "—".into(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let exe = std::env::current_exe().expect("the report knows its path");
    let dir = exe
        .parent()
        .expect("a binary lives in a directory")
        .to_path_buf();
    ensure_bins(&dir);
    let node_bin = dir.join("node");
    let started = std::time::Instant::now();
    let mut measured = Vec::new();
    for &backend in &a.backends {
        measured.push(measure(backend, &a, &node_bin).await);
    }
    let beam_result = if a.beam && Backend::Beam.available() {
        let mut m = measure(Backend::Beam, &a, &node_bin).await;
        m.backend = "BEAM :global".into();
        Some(m)
    } else {
        None
    };
    let mut benches = Vec::new();
    if a.bench {
        let r = a.bench_runs.to_string();
        for b in &a.backends {
            let (bin, args): (&str, Vec<&str>) = match b {
                Backend::Postgres => (
                    "bench_postgres",
                    vec!["--runs", "0", "--big-runs", &r, "--huge-runs", "0"],
                ),
                Backend::Etcd => (
                    "bench_etcd",
                    vec!["--only", "many", "--runs", &r, "--ttl", "3"],
                ),
                Backend::Cluster => ("bench_cluster", vec!["--only", "many", "--many-runs", &r]),
                Backend::Memory | Backend::Beam => continue,
            };
            let text = bench(&dir.join(bin), &args);
            benches.push((b.name(), format!("{bin} {}", args.join(" ")), text));
        }
    }

    // ------------------------------------------------------------ write
    std::fs::create_dir_all(&a.out).expect("create the report directory");
    if let Some(b) = beam_result {
        measured.push(b);
    }
    let all: Vec<&Measured> = measured.iter().collect();
    let mut md = String::new();
    let commit = output(
        "git",
        &[
            "-C",
            &workspace().display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .unwrap_or_default();
    let _ = writeln!(md, "# highlander: failover, handoff and chaos report\n");
    let _ = writeln!(
        md,
        "Generated by `cargo run --release -p highlander-tests --bin report` (commit `{commit}`, {}); do not edit by hand. \
         How the chaos runs work and what the checker checks: [`docs/chaos.md`](../chaos.md).\n",
        output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default()
    );
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(
        md,
        "- {} · {} CPUs · {}",
        output("uname", &["-srm"]).unwrap_or_default(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        if dir.ends_with("release") {
            "release build"
        } else {
            "debug build"
        }
    );
    for v in [
        postgres_version(),
        output("etcd", &["--version"]),
        elixir_version(),
    ]
    .into_iter()
    .flatten()
    {
        let _ = writeln!(md, "- {v}");
    }
    let _ = writeln!(
        md,
        "- 3 node processes (memory: 3 runtimes in one process) on loopback, shutdown budget 500 ms, etcd TTL 3 s, Postgres and cluster backends with their defaults; \
         BEAM: 3 Elixir nodes (`tests/beam/node.exs`), `net_ticktime` 4 s (the default 60 s would make every pause take over a minute), a peer reconnect every 20 ms as a cluster manager would do\n"
    );
    let _ = writeln!(md, "## Side by side (p50 / p99 / max in ms)\n");
    let _ = writeln!(
        md,
        "Each sample is one fault of a seeded chaos run aimed at the holder: from the signal (or the cut) to the first `START` of the id elsewhere, in the host's one clock. \
         *Heal to one instance*: from the heal (or SIGCONT) until the loser has stopped with `conflict` (AP backends only). \
         Pauses and partitions of the Postgres runs last 1–3 s, shorter than its 15 s server timeout, so no takeover happens there (see the chaos run below).\n"
    );
    let mut header = "| scenario |".to_string();
    let mut rule = "|---|".to_string();
    for m in &all {
        let _ = write!(header, " {} |", m.backend);
        rule.push_str("---|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    let mut scenarios: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    scenarios.push("heal to one instance".into());
    for m in &all {
        for k in m.samples.keys() {
            if !scenarios.contains(k) {
                scenarios.push(k.clone());
            }
        }
    }
    for s in &scenarios {
        let mut row = format!("| {s} |");
        for m in &all {
            let _ = write!(row, " {} |", cell(m.samples.get(s)));
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);
    let rows: Vec<(String, Vec<f64>)> = all
        .iter()
        .filter_map(|m| {
            m.samples
                .get(SCENARIOS[0])
                .map(|s| (m.backend.clone(), s.clone()))
        })
        .collect();
    if !rows.is_empty() {
        std::fs::write(
            a.out.join("failover.svg"),
            svg::distribution(
                "Failover after SIGKILL of the holder (ms, log scale)",
                &rows,
            ),
        )
        .expect("write failover.svg");
        let _ = writeln!(md, "![failover latency per backend](failover.svg)\n");
    }
    let rows: Vec<(String, Vec<f64>)> = all
        .iter()
        .filter_map(|m| {
            m.samples
                .get(SCENARIOS[1])
                .map(|s| (m.backend.clone(), s.clone()))
        })
        .collect();
    if !rows.is_empty() {
        std::fs::write(
            a.out.join("handoff.svg"),
            svg::distribution("Handoff after SIGTERM of the holder (ms, log scale)", &rows),
        )
        .expect("write handoff.svg");
        let _ = writeln!(md, "![handoff latency per backend](handoff.svg)\n");
    }

    let _ = writeln!(md, "## Chaos runs behind these numbers\n");
    let _ = writeln!(
        md,
        "| backend | run | model | faults | tenures | excused overlaps | longest past heal / wake (ms) | longest unowned (ms) | fenced writes accepted / refused | result |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for m in &measured {
        for (name, o) in &m.verdicts {
            let longest_gap = o
                .verdict
                .gaps
                .iter()
                .map(|g| g.length)
                .max()
                .unwrap_or(Duration::ZERO);
            let _ = writeln!(
                md,
                "| {} | {name} | {:?} | {} | {} | {} | {:.1} | {:.1} | {} / {} | {} |",
                m.backend,
                o.model,
                o.history.faults.len(),
                o.verdict.tenures,
                o.verdict.excused_overlaps,
                o.verdict.longest_past_heal.as_secs_f64() * 1e3,
                longest_gap.as_secs_f64() * 1e3,
                o.verdict.writes_accepted,
                o.verdict.writes_rejected,
                if o.verdict.passed() {
                    "pass".to_string()
                } else {
                    format!("**FAIL** ({} violations)", o.verdict.violations.len())
                }
            );
        }
    }
    let _ = writeln!(md);
    for m in &measured {
        let failed: Vec<String> = m
            .verdicts
            .iter()
            .flat_map(|(_, o)| o.verdict.violations.iter().map(|v| v.to_string()))
            .collect();
        if !failed.is_empty() {
            let _ = writeln!(
                md,
                "Violations ({}):\n\n```text\n{}\n```\n",
                m.backend,
                failed.join("\n")
            );
        }
    }
    let _ = writeln!(md, "### Timelines of the mixed runs (id `chaos-0`)\n");
    for m in &measured {
        if let Some((_, o)) = m.verdicts.iter().find(|(n, _)| n == "mixed faults") {
            let file = format!("timeline-{}.svg", m.slug);
            let title = format!(
                "{}: who ran chaos-0 during {} seeded faults",
                m.backend,
                o.history.faults.len()
            );
            std::fs::write(
                a.out.join(&file),
                svg::timeline(&title, &o.history, "chaos-0"),
            )
            .expect("write a timeline");
            let _ = writeln!(md, "![{title}]({file})\n");
        }
    }
    if !benches.is_empty() {
        let _ = writeln!(md, "## Scale: the backends' own benchmarks\n");
        let _ = writeln!(
            md,
            "Their output as printed (10,000 ids over 3 node processes: time until all run, then SIGKILL of the node holding the most and time until all of its ids run elsewhere).\n"
        );
        for (name, cmd, text) in &benches {
            let _ = writeln!(
                md,
                "### {name}\n\n`{cmd}`\n\n```text\n{}\n```\n",
                text.trim_end()
            );
        }
    }
    if a.beam && !Backend::Beam.available() {
        let _ = writeln!(
            md,
            "The BEAM comparison did not run (no `elixir` on this machine, or its run failed); install it with `apt-get install elixir` and run the report again.\n"
        );
    }
    let _ = writeln!(
        md,
        "Report generated in {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(a.out.join("REPORT.md"), md).expect("write REPORT.md");
    eprintln!("report: wrote {}", a.out.join("REPORT.md").display());
}
