//! # Postgres: one writer, and fencing tokens that keep a stale one out
//!
//! A singleton, `ledger-writer`, appends to a row of the application's own
//! table once a second. The postgres backend makes sure one node runs it,
//! and hands every tenure a fencing token larger than any before. Each
//! write carries the token and is guarded in SQL:
//!
//! ```sql
//! UPDATE fenced_ledger SET fence = $token, entries = entries + 1, last_writer = $node
//!  WHERE name = 'main' AND fence <= $token
//! ```
//!
//! so a holder that lost its tenure but still runs (paused longer than its
//! lease, or cut off while the server crashed and freed its ids) cannot
//! write over its successor: its token is smaller than the `fence` the
//! successor left. Each tenure shows that once, by replaying its first
//! write with the previous tenure's token: the database refuses it.
//!
//! Run it in two or three terminals against one database, then stop the
//! writer with Ctrl-C (or kill it) and watch another take over:
//!
//! ```text
//! export DATABASE_URL=postgres://app:secret@localhost:5432/app
//! HIGHLANDER_NODE=a cargo run -p highlander-examples --features postgres --example 05_postgres_fencing
//! HIGHLANDER_NODE=b cargo run -p highlander-examples --features postgres --example 05_postgres_fencing
//! ```

use std::sync::Arc;
use std::time::Duration;

use highlander::backend::postgres::Postgres;
use highlander::{Context, Error, Runtime, Service, ShutdownReason};
use tokio_postgres::{Client, NoTls};

/// The application's own connection, shared with the singleton.
struct Db(Arc<Client>);

struct LedgerWriter {
    written: u64,
}

const GUARDED_WRITE: &str = "UPDATE fenced_ledger \
     SET fence = $1, entries = entries + 1, last_writer = $2 \
     WHERE name = 'main' AND fence <= $1";

impl Service for LedgerWriter {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        let db = &ctx.state::<Db>()?.0;
        let token = ctx.fencing_token() as i64;
        let node = ctx.node();
        println!("{node}: tenure {token} begins");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let rows = db
                .execute(GUARDED_WRITE, &[&token, &node])
                .await
                .map_err(Error::service)?;
            if rows == 0 {
                // A newer tenure has written: this one is stale. Stop
                // writing; the runtime restarts or moves the singleton.
                return Err(Error::msg(format!(
                    "fenced off: a tenure newer than {token} has written"
                )));
            }
            self.written += 1;
            println!("{node}: wrote entry with token {token}");
            if self.written == 1 && token > 1 {
                // What a stale holder of the previous tenure would try now.
                let stale = db
                    .execute(GUARDED_WRITE, &[&(token - 1), &"stale-holder"])
                    .await
                    .map_err(Error::service)?;
                assert_eq!(stale, 0, "the fence must refuse an older token");
                println!(
                    "{node}: a write with the previous token {} was refused",
                    token - 1
                );
            }
        }
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        println!("writer stopping ({reason}) after {} writes", self.written);
    }
}

#[tokio::main]
async fn main() -> highlander::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| Error::config("set DATABASE_URL=postgres://user:password@host:5432/db"))?;
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.map_err(|e| {
        // tokio-postgres' errors never quote the URL: safe to keep as the source.
        Error::config_with(
            format!("cannot connect to {}: {e}", highlander::redact_url(&url)),
            e,
        )
    })?;
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS fenced_ledger (
                 name text PRIMARY KEY,
                 fence bigint NOT NULL,
                 entries bigint NOT NULL,
                 last_writer text);
             INSERT INTO fenced_ledger VALUES ('main', 0, 0, NULL) ON CONFLICT DO NOTHING;",
        )
        .await
        .map_err(Error::service)?;

    Runtime::builder()
        .backend(Postgres::new(url).namespace("fencing-example"))
        .state(Db(Arc::new(client)))
        .singleton("ledger-writer", |_ctx| async {
            Ok(LedgerWriter { written: 0 })
        })
        .run()
        .await
}
