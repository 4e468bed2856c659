//! `highlander`: who holds which singleton, on any highlander backend.
//!
//! ```text
//! highlander status  --backend postgres://app:secret@db/app   # table of ids, holder, token, since
//! highlander members --backend etcd://10.0.0.1:2379            # the nodes the backend sees
//! highlander watch   --backend cluster://0.0.0.0:7400?seeds=app-1:7400   # every change of holder
//! ```
//!
//! The backend comes from `--backend` or `HIGHLANDER_BACKEND`; for
//! `cluster://` the cookie comes from `HIGHLANDER_COOKIE` as for the nodes,
//! and the command joins as an observer on a port of its own: it runs no
//! singleton and holds nothing. Postgres and etcd are read where the
//! backend keeps its state. `--json` prints machine-readable output.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use highlander::backend::{HeldId, Member};
use highlander::{Runtime, RuntimeHandle};
use serde_json::json;

mod url;

/// Who holds which singleton, on any highlander backend.
#[derive(Parser)]
#[command(name = "highlander", version, about)]
struct Cli {
    /// The backend, as the nodes name it (default: HIGHLANDER_BACKEND).
    #[arg(long, global = true, value_name = "URL")]
    backend: Option<String>,
    /// Print JSON instead of a table (one object per line for `watch`).
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the backend before giving up.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 10.0)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every held id: its holder, fencing token and since when.
    Status,
    /// The nodes the backend sees, and whether they are reachable.
    Members,
    /// Prints every change of holder as it happens, like `kubectl get lease -w`.
    Watch {
        /// How often to read the backend, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 250)]
        interval: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("highlander: error: {message}");
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> Result<(), String> {
    let url = match cli
        .backend
        .or_else(|| std::env::var("HIGHLANDER_BACKEND").ok())
    {
        Some(url) if !url.trim().is_empty() => url,
        _ => return Err("no backend: pass --backend URL or set HIGHLANDER_BACKEND".into()),
    };
    if !cli.timeout.is_finite() || cli.timeout <= 0.0 || cli.timeout > 3600.0 {
        return Err("--timeout must be between 0 and 3600 seconds".into());
    }
    let timeout = Duration::from_secs_f64(cli.timeout);
    let observer = url::observer(&url)?;
    let backend = highlander::backend::from_url(&observer).map_err(|e| e.to_string())?;
    let handle = Runtime::builder()
        .node(format!("highlander-cli-{}", std::process::id()))
        .backend(backend)
        // --timeout bounds reaching the backend too (the start-up policy).
        .start_timeout(timeout)
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        let out = Output::new(cli.json);
        let first = connected(&handle, &observer, timeout).await?;
        match cli.command {
            Command::Status => out.status(&first),
            Command::Members => {
                let mut members = handle.members().await.map_err(|e| e.to_string())?;
                members.retain(|m| m.node != handle.node());
                out.members(&members)
            }
            Command::Watch { interval } => {
                let interval = Duration::from_millis(interval.clamp(10, 60_000));
                watch(&handle, &out, first, interval).await
            }
        }
    }
    .await;
    handle.shutdown().await;
    result
}

/// Waits until the backend answers, and for `cluster://` until another
/// member is reachable: a node alone would show an empty cluster, which is
/// a wrong address or cookie, not an answer.
async fn connected(
    handle: &RuntimeHandle,
    url: &str,
    timeout: Duration,
) -> Result<Vec<HeldId>, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let cluster = url.starts_with("cluster://");
    loop {
        let last = match handle.holders().await {
            Ok(held) if !cluster => return Ok(held),
            Ok(held) => {
                let members = handle.members().await.map_err(|e| e.to_string())?;
                if members
                    .iter()
                    .any(|m| m.reachable && m.node != handle.node())
                {
                    return Ok(held);
                }
                format!(
                    "no member of the cluster answered at {}: check the seeds and that \
                     HIGHLANDER_COOKIE is the nodes' cookie",
                    highlander::redact_url(url)
                )
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{last} (gave up after {timeout:?})"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn watch(
    handle: &RuntimeHandle,
    out: &Output,
    mut last: Vec<HeldId>,
    interval: Duration,
) -> Result<(), String> {
    out.status(&last)?;
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
        let now = match handle.holders().await {
            Ok(now) => now,
            Err(e) => {
                out.note(&format!("cannot read the backend: {e}"))?;
                continue;
            }
        };
        for change in changes(&last, &now) {
            out.change(&change)?;
        }
        last = now;
    }
}

/// One change of holder between two listings.
#[derive(Debug, PartialEq, Eq)]
struct Change {
    id: String,
    from: Option<String>,
    to: Option<String>,
    token: Option<u64>,
}

/// What changed from `before` to `after` (both sorted by id), in id order.
fn changes(before: &[HeldId], after: &[HeldId]) -> Vec<Change> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < before.len() || j < after.len() {
        let b = before.get(i);
        let a = after.get(j);
        match (b, a) {
            (Some(b), Some(a)) if b.id == a.id => {
                if b.holder != a.holder {
                    out.push(Change {
                        id: a.id.clone(),
                        from: Some(b.holder.node.clone()),
                        to: Some(a.holder.node.clone()),
                        token: a.holder.token,
                    });
                }
                i += 1;
                j += 1;
            }
            (Some(b), a) if a.is_none_or(|a| b.id < a.id) => {
                out.push(Change {
                    id: b.id.clone(),
                    from: Some(b.holder.node.clone()),
                    to: None,
                    token: None,
                });
                i += 1;
            }
            (_, Some(a)) => {
                out.push(Change {
                    id: a.id.clone(),
                    from: None,
                    to: Some(a.holder.node.clone()),
                    token: a.holder.token,
                });
                j += 1;
            }
            (_, None) => unreachable!("the loop runs while one side has items"),
        }
    }
    out
}

/// Tables on a terminal (coloured) or a pipe (plain), or JSON.
struct Output {
    json: bool,
    colour: bool,
}

impl Output {
    fn new(json: bool) -> Output {
        let colour =
            !json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Output { json, colour }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn print(&self, text: &str) -> Result<(), String> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write the output: {e}"))
    }

    fn status(&self, held: &[HeldId]) -> Result<(), String> {
        if self.json {
            let rows: Vec<_> = held
                .iter()
                .map(|h| {
                    json!({
                        "id": h.id,
                        "holder": h.holder.node,
                        "token": h.holder.token,
                        "since_unix_ms": h.since.map(unix_ms),
                    })
                })
                .collect();
            return self.print(&serde_json::Value::Array(rows).to_string());
        }
        let now = SystemTime::now();
        let rows: Vec<[String; 4]> = held
            .iter()
            .map(|h| {
                [
                    h.id.clone(),
                    h.holder.node.clone(),
                    h.holder.token.map(|t| t.to_string()).unwrap_or_default(),
                    h.since
                        .map(|s| format!("{} ago", age(now.duration_since(s).unwrap_or_default())))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        self.table(["ID", "HOLDER", "TOKEN", "SINCE"], &rows, 1)
    }

    fn members(&self, members: &[Member]) -> Result<(), String> {
        if self.json {
            let rows: Vec<_> = members
                .iter()
                .map(|m| json!({"node": m.node, "reachable": m.reachable, "address": m.address}))
                .collect();
            return self.print(&serde_json::Value::Array(rows).to_string());
        }
        let rows: Vec<[String; 3]> = members
            .iter()
            .map(|m| {
                [
                    m.node.clone(),
                    if m.reachable { "yes" } else { "no" }.to_string(),
                    m.address.clone().unwrap_or_default(),
                ]
            })
            .collect();
        self.table(["NODE", "REACHABLE", "ADDRESS"], &rows, 0)
    }

    /// Left-aligned columns; column `accent` is coloured.
    fn table<const N: usize>(
        &self,
        header: [&str; N],
        rows: &[[String; N]],
        accent: usize,
    ) -> Result<(), String> {
        let mut width = header.map(str::len);
        for row in rows {
            for (w, cell) in width.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [String; N], style: &dyn Fn(usize, &str) -> String| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let pad = " ".repeat(width[i] - c.chars().count());
                    if i + 1 == N {
                        style(i, c)
                    } else {
                        format!("{}{pad}", style(i, c))
                    }
                })
                .collect();
            padded.join("   ")
        };
        self.print(&line(header.map(str::to_string), &|_, c| {
            self.paint("1", c)
        }))?;
        for row in rows {
            self.print(&line(row.clone(), &|i, c| {
                if i == accent {
                    self.paint("32", c)
                } else {
                    c.to_string()
                }
            }))?;
        }
        Ok(())
    }

    fn change(&self, c: &Change) -> Result<(), String> {
        let at = SystemTime::now();
        if self.json {
            return self.print(
                &json!({
                    "at_unix_ms": unix_ms(at),
                    "id": c.id,
                    "from": c.from,
                    "to": c.to,
                    "token": c.token,
                })
                .to_string(),
            );
        }
        let what = match (&c.from, &c.to) {
            (Some(from), Some(to)) => format!("{from} -> {}", self.paint("32", to)),
            (None, Some(to)) => format!("held by {}", self.paint("32", to)),
            (Some(from), None) => format!("{from} -> {}", self.paint("33", "(free)")),
            (None, None) => String::new(),
        };
        let token = c.token.map(|t| format!("  token {t}")).unwrap_or_default();
        self.print(&format!("{}  {}  {what}{token}", rfc3339(at), c.id))
    }

    fn note(&self, text: &str) -> Result<(), String> {
        if self.json {
            return Ok(());
        }
        eprintln!("{}  {}", rfc3339(SystemTime::now()), self.paint("31", text));
        Ok(())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `3s`, `4m12s`, `2h05m`, `3d04h`.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// UTC, millisecond precision: `2026-11-30T10:51:02.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use highlander::backend::Holder;

    fn held(id: &str, node: &str, token: u64) -> HeldId {
        HeldId::new(id, Holder::new(node, Some(token)), None)
    }

    #[test]
    fn changes_name_every_move_new_and_freed_id() {
        let before = [held("a", "n1", 1), held("b", "n1", 2), held("c", "n2", 3)];
        let after = [held("a", "n1", 1), held("b", "n2", 4), held("d", "n3", 5)];
        let got = changes(&before, &after);
        let want = [
            ("b", Some("n1"), Some("n2"), Some(4)),
            ("c", Some("n2"), None, None),
            ("d", None, Some("n3"), Some(5)),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (c, (id, from, to, token)) in got.iter().zip(want) {
            assert_eq!(c.id, id);
            assert_eq!(c.from.as_deref(), from);
            assert_eq!(c.to.as_deref(), to);
            assert_eq!(c.token, token);
        }
        assert!(changes(&after, &after).is_empty());
    }

    #[test]
    fn times_print_as_rfc3339_and_ages_stay_short() {
        let t = UNIX_EPOCH + Duration::from_millis(1_796_035_862_123);
        assert_eq!(rfc3339(t), "2026-11-30T10:51:02.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(age(Duration::from_secs(5)), "5s");
        assert_eq!(age(Duration::from_secs(252)), "4m12s");
        assert_eq!(age(Duration::from_secs(7_500)), "2h05m");
        assert_eq!(age(Duration::from_secs(273_600)), "3d04h");
    }
}
