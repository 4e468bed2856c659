//! Opening one connection and making it ready: the dead-peer settings, the
//! tables, the presence lock, `LISTEN` (and a notification that this node
//! joined) and the prepared statements.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, timeout};
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, warn};

use super::errors::{connect_error, unreachable};
use super::keys::lock_key;
use super::probe::{ConnTask, Releases, spawn_connection};
use super::sql;
use super::state::{Inner, LiveInfo, Statements};
use super::timing::{ServerParams, Timing, Vouched};
use crate::{BackendErrorKind, Error};

/// Connecting, authenticating and preparing must finish within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// The server aborts any of our statements that runs longer, so a stuck
/// statement cannot hold the heartbeats queued behind it past the deadline.
const STATEMENT_TIMEOUT_MS: u64 = 5_000;
/// The client socket's `TCP_USER_TIMEOUT`: as long as the longest
/// dead-peer detection a session can ask the server for, so that the
/// client's kernel never gives up on the connection before the server
/// could. The session closes the connection itself (see the driver).
const CLIENT_USER_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// One connection's lifetime ("epoch"): everything granted in it ends
/// with it.
pub(super) struct Live {
    pub(super) client: Arc<Client>,
    pub(super) stmts: Arc<Statements>,
    /// This session's presence number: it holds `(namespace_key, me)`.
    pub(super) me: i32,
    pub(super) conn: ConnTask,
    pub(super) releases: Releases,
    /// The server's dead-peer detection in force for this session.
    pub(super) x: Duration,
    /// The latest successful round trip.
    pub(super) vouched: Vouched,
}

impl Live {
    /// The handles the session's lookups use.
    pub(super) fn info(&self) -> LiveInfo {
        LiveInfo {
            client: self.client.clone(),
            stmts: self.stmts.clone(),
            me: self.me,
        }
    }
}

/// Opens a connection and prepares it: the table, the presence lock, the
/// dead-peer settings, `LISTEN`, the statements.
/// A failure is an error of the kind that says whether trying again can
/// help (see [`connect_error`]).
pub(super) async fn open(inner: &Arc<Inner>) -> Result<Live, Error> {
    match timeout(SETUP_TIMEOUT, open_inner(inner)).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(format!(
            "cannot connect to postgres at {}: no answer within {SETUP_TIMEOUT:?}",
            inner.settings.target
        ))),
    }
}

async fn open_inner(inner: &Arc<Inner>) -> Result<Live, Error> {
    let settings = &inner.settings;
    let x = settings.timing.initial_server_timeout();
    let params = Timing::server_params(x);
    let (client, conn, releases) = dial(inner, &params).await?;
    let client = Arc::new(client);
    let (me, stmts, sent, version) = match prepare(inner, &client, &params, x).await {
        Ok(Ok(r)) => r,
        // Numbers drawn at random all taken: another try draws others.
        Ok(Err(message)) => {
            return Err(unreachable(format!(
                "postgres at {}: {message}",
                settings.target
            )));
        }
        Err(e) => return Err(connect_error(settings, e)),
    };
    if version < 120_000 {
        return Err(Error::backend(
            BackendErrorKind::Refused,
            format!(
                "postgres at {} is version {version}: highlander needs Postgres 12 or later (for tcp_user_timeout)",
                settings.target
            ),
        ));
    }
    Ok(Live {
        client,
        stmts: Arc::new(stmts),
        me,
        conn,
        releases,
        x,
        vouched: Vouched::new(sent, x),
    })
}

/// Connects (TLS or not) with the session's dead-peer settings as startup
/// options, and starts the task that drives the connection.
async fn dial(inner: &Inner, params: &ServerParams) -> Result<(Client, ConnTask, Releases), Error> {
    let settings = &inner.settings;
    let mut config = settings.pg.clone();
    config.application_name(&inner.node);
    let options = format!(
        "{} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
        params.options()
    );
    let options = match config.get_options() {
        Some(user) if !user.is_empty() => format!("{user} {options}"),
        _ => options,
    };
    config.options(options);
    // The client's kernel must never end the connection before the server
    // could: if it did while the link is down (a peer's unacknowledged data
    // times out), its answer to the server's next packet once the link is
    // back would be a reset, and the server would free the ids at once,
    // however long the instances still need to stop. Each session raises
    // the server's detection when a stop budget needs it, so the client's
    // is the longest a session can ask for; with it set, Linux keepalives
    // give up no sooner either. The session's own deadline notices a dead
    // link, and it closes the connection itself once its instances have
    // stopped (see the driver).
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(2))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3)
        .tcp_user_timeout(CLIENT_USER_TIMEOUT);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    let connect_err = |e: tokio_postgres::Error| connect_error(settings, e);
    let channel = settings.channel.clone();
    Ok(match &settings.tls {
        Some(tls) => {
            let (client, conn) = config
                .connect(MakeRustlsConnect::new((**tls).clone()))
                .await
                .map_err(connect_err)?;
            let (conn, releases) = spawn_connection(conn, channel);
            (client, conn, releases)
        }
        None => {
            let (client, conn) = config.connect(NoTls).await.map_err(connect_err)?;
            let (conn, releases) = spawn_connection(conn, channel);
            (client, conn, releases)
        }
    })
}

/// What [`prepare`] makes of a connection: the presence number, the
/// statements, the send time of the last setup round trip, and the
/// server's version; or, inside, why no presence number could be drawn.
type Prepared = Result<(i32, Statements, Instant, i32), String>;

/// Makes a connected session ready: the table (created when missing), the
/// check that the server took the dead-peer settings, a presence lock,
/// `LISTEN` on the namespace's channel, and the statements.
async fn prepare(
    inner: &Inner,
    client: &Client,
    params: &ServerParams,
    x: Duration,
) -> Result<Prepared, tokio_postgres::Error> {
    let settings = &inner.settings;
    let row = client.query_one(sql::TABLE_EXISTS, &[]).await?;
    let (exists, version): (bool, i32) = (row.get(0), row.get(1));
    if !exists {
        client
            .batch_execute(&sql::create_table(ddl_lock_key()))
            .await?;
    }
    if version >= 140_000 {
        // Would end a quiet session (and free its ids) sooner than the
        // dead-peer detection the node vouches against.
        client.batch_execute(sql::NO_IDLE_TIMEOUT).await?;
    }
    let row = client.query_one(sql::SETTINGS, &[]).await?;
    let tcp: bool = row.get(4);
    let idle_timeout: Option<String> = row.get(6);
    if version >= 140_000 && idle_timeout.as_deref() != Some("0") {
        warn!(
            node = %inner.node,
            "postgres at {} did not take idle_session_timeout = 0 for this session (got {idle_timeout:?}): \
             a quiet session may be ended, and its ids freed, before this node stops its instances",
            settings.target
        );
    }
    let read = |i: usize| {
        row.get::<_, Option<String>>(i)
            .and_then(|s| s.parse::<u64>().ok())
    };
    let actual = (read(0), read(1), read(2), read(3));
    let wanted = (
        Some(params.user_timeout_ms),
        Some(params.idle),
        Some(params.interval),
        Some(params.count),
    );
    if tcp && actual != wanted {
        warn!(
            node = %inner.node,
            "postgres at {} did not take the per-session dead-peer settings (wanted tcp_user_timeout={}ms, keepalives {}s+{}x{}s; got {actual:?}): \
             a silently vanished node keeps its ids until the server's own TCP timeouts end its session",
            settings.target, params.user_timeout_ms, params.idle, params.count, params.interval
        );
    }
    debug!(
        node = %inner.node,
        server_detection = ?params.detection(),
        vouch = ?settings.timing.vouch(x, crate::DEFAULT_SHUTDOWN),
        "dead-peer settings for this session"
    );
    let mut me;
    let mut tries = 0;
    loop {
        me = random_i32();
        let row = client
            .query_one(sql::PRESENCE, &[&settings.namespace_key, &me])
            .await?;
        let (locked, used): (bool, bool) = (row.get(0), row.get(1));
        if locked && !used {
            break;
        }
        if locked {
            client
                .query_one(sql::UNLOCK, &[&settings.namespace_key, &me])
                .await?;
        }
        tries += 1;
        if tries > 50 {
            return Ok(Err(
                "could not draw a free presence number in 50 tries".to_string()
            ));
        }
    }
    // The notification tells the other members a session joined.
    client
        .batch_execute(&format!(
            "LISTEN {channel}; NOTIFY {channel}, '{payload}'",
            channel = settings.channel,
            payload = super::probe::MEMBERS_PAYLOAD
        ))
        .await?;
    let sent = Instant::now();
    let (insert, claim, status, probe, release, holder) = tokio::try_join!(
        client.prepare(sql::INSERT),
        client.prepare(sql::CLAIM),
        client.prepare(sql::STATUS),
        client.prepare(sql::PROBE),
        client.prepare(sql::RELEASE),
        client.prepare(sql::HOLDER),
    )?;
    let (members, member_owners, catalogs, announce_known) = tokio::try_join!(
        client.prepare(sql::MEMBERS),
        client.prepare(sql::MEMBER_OWNERS),
        client.prepare(sql::CATALOGS),
        client.prepare(sql::ANNOUNCE_KNOWN),
    )?;
    let stmts = Statements {
        insert,
        claim,
        status,
        probe,
        release,
        holder,
        members,
        member_owners,
        catalogs,
        announce_known,
    };
    Ok(Ok((me, stmts, sent, version)))
}

/// The advisory lock that serializes creating the table, across every
/// node of every namespace.
fn ddl_lock_key() -> i64 {
    lock_key("highlander", "ddl:highlander_leases")
}

fn random_i32() -> i32 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(crate_nanos());
    hasher.write_u32(std::process::id());
    hasher.finish() as i32
}

fn crate_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
