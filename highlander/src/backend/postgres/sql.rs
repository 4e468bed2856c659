//! Every statement the backend sends. The table is shared by all namespaces
//! of a database; one row per (namespace, id), keyed by the lock key.

/// The table the backend creates when it is missing.
pub(super) const TABLE: &str = "highlander_leases";

/// True when every table (and the lease table's reservation columns)
/// exists (checked first, so that a role without `CREATE` on the schema can
/// use tables an administrator made), and the server's version number.
pub(super) const TABLE_EXISTS: &str = "SELECT to_regclass('highlander_leases') IS NOT NULL \
       AND to_regclass('highlander_catalogs') IS NOT NULL \
       AND to_regclass('highlander_members') IS NOT NULL \
       AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('highlander_leases') \
                   AND attname = 'reserved_until' AND NOT attisdropped), \
     current_setting('server_version_num')::int";

/// Postgres 14+: a session idle for `idle_session_timeout` is ended, which
/// would free its ids long before the dead-peer detection the node vouches
/// against. Off for this session (a plain `SET`: it needs no privilege, not
/// even on `set_config`).
pub(super) const NO_IDLE_TIMEOUT: &str = "SET idle_session_timeout = 0";

/// Creates the tables, and adds the reservation columns to a lease table
/// made by an earlier version. Serialized across every node by a
/// transaction-level advisory lock, because two concurrent `CREATE TABLE IF
/// NOT EXISTS` can both pass the existence check and one then fails on the
/// catalog's unique index. Sent as one simple-protocol string: one round
/// trip.
///
/// - `highlander_leases`: one row per (namespace, id); `reserved_for` and
///   `reserved_until` are a handoff's reservation (`release_to`);
/// - `highlander_catalogs`: the ids a node runs, one row per distinct list
///   (keyed by its digest), however many nodes or announces name it;
/// - `highlander_members`: one row per node name, its weight, labels and
///   catalog digest, and the presence number of the session that announced
///   them: the row counts only while that presence lock is held.
pub(super) fn create_table(ddl_lock: i64) -> String {
    format!(
        "BEGIN;
SELECT pg_advisory_xact_lock({ddl_lock});
CREATE TABLE IF NOT EXISTS highlander_leases (
    key            bigint PRIMARY KEY,
    namespace      text NOT NULL,
    id             text NOT NULL,
    token          bigint NOT NULL DEFAULT 0,
    owner          integer,
    node           text,
    claimed_at     timestamptz,
    reserved_for   text,
    reserved_until timestamptz
) WITH (fillfactor = 80);
ALTER TABLE highlander_leases
    ADD COLUMN IF NOT EXISTS reserved_for text,
    ADD COLUMN IF NOT EXISTS reserved_until timestamptz;
COMMENT ON TABLE highlander_leases IS
  'highlander singletons: one row per (namespace, id). owner is the presence lock (namespace_key, owner) of the holding session; token is the fencing token of the latest tenure; reserved_for may claim it alone until reserved_until (a handoff).';
CREATE TABLE IF NOT EXISTS highlander_catalogs (
    namespace text NOT NULL,
    digest    bigint NOT NULL,
    ids       text[] NOT NULL,
    PRIMARY KEY (namespace, digest)
);
CREATE TABLE IF NOT EXISTS highlander_members (
    namespace    text NOT NULL,
    node         text NOT NULL,
    owner        integer NOT NULL,
    weight       bigint NOT NULL,
    labels       text[] NOT NULL,
    digest       bigint NOT NULL,
    announced_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, node),
    FOREIGN KEY (namespace, digest) REFERENCES highlander_catalogs (namespace, digest)
);
COMMIT;"
    )
}

/// Takes this session's presence lock, and says whether any lease or
/// member row still names that owner (a dead session that drew the same
/// number): then the caller unlocks and draws again. `$1` namespace key,
/// `$2` owner.
pub(super) const PRESENCE: &str = "SELECT pg_try_advisory_lock($1::int4, $2::int4), \
     EXISTS (SELECT 1 FROM highlander_leases WHERE owner = $2::int4) \
     OR EXISTS (SELECT 1 FROM highlander_members WHERE owner = $2::int4)";

/// Gives a presence lock back. `$1` namespace key, `$2` owner.
pub(super) const UNLOCK: &str = "SELECT pg_advisory_unlock($1::int4, $2::int4)";

/// Reads back the dead-peer settings in force for this session, whether it
/// runs over TCP (they are ignored on Unix sockets), the version, and
/// `idle_session_timeout` (NULL before Postgres 14).
pub(super) const SETTINGS: &str = "SELECT \
     (SELECT setting FROM pg_settings WHERE name = 'tcp_user_timeout'), \
     (SELECT setting FROM pg_settings WHERE name = 'tcp_keepalives_idle'), \
     (SELECT setting FROM pg_settings WHERE name = 'tcp_keepalives_interval'), \
     (SELECT setting FROM pg_settings WHERE name = 'tcp_keepalives_count'), \
     inet_client_addr() IS NOT NULL, \
     current_setting('server_version_num')::int, \
     (SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout')";

/// Raises the server's dead-peer detection for this session (never lowers
/// it). `$1`..`$4`: tcp_user_timeout (ms), keepalives idle, interval (s),
/// count.
pub(super) const RAISE_TIMEOUTS: &str = "SELECT set_config('tcp_user_timeout', $1::text, false), \
     set_config('tcp_keepalives_idle', $2::text, false), \
     set_config('tcp_keepalives_interval', $3::text, false), \
     set_config('tcp_keepalives_count', $4::text, false)";

/// Makes sure a row exists for each id (token 0, free). Inserted in key
/// order, so concurrent inserters never wait on each other in a cycle.
/// `$1` keys, `$2` ids, `$3` namespace.
pub(super) const INSERT: &str = "INSERT INTO highlander_leases (key, namespace, id) \
     SELECT k, $3::text, i FROM unnest($1::bigint[], $2::text[]) AS r(k, i) ORDER BY k \
     ON CONFLICT (key) DO NOTHING";

/// The batched claim: one statement for every id this node waits for.
///
/// A row may be taken when it is free (`owner IS NULL`), already this
/// session's, or its owner's presence lock is free: the owner's session has
/// ended, so it can never come back (owners are drawn afresh per session);
/// and, while a handoff's reservation runs (`reserved_until` on the
/// server's clock), only by the node it names. A grant clears the
/// reservation.
/// Liveness is checked once per distinct owner with a shared,
/// transaction-scoped try-lock, which fails while the owner holds its
/// exclusive session lock and otherwise blocks that owner number from being
/// drawn again until this statement ends. Rows are locked in key order, as
/// by every other statement here, so claimers never deadlock.
///
/// `$1` keys, `$2` ids, `$3` owner, `$4` node, `$5` namespace, `$6`
/// namespace key. Returns the granted keys and their new tokens.
pub(super) const CLAIM: &str = "WITH r AS MATERIALIZED ( \
        SELECT * FROM unnest($1::bigint[], $2::text[]) AS r(key, id)), \
     owners AS MATERIALIZED ( \
        SELECT DISTINCT l.owner FROM highlander_leases l JOIN r ON l.key = r.key \
        WHERE l.owner IS NOT NULL AND l.owner <> $3::int4), \
     dead AS MATERIALIZED ( \
        SELECT owner FROM owners WHERE pg_try_advisory_xact_lock_shared($6::int4, owner)), \
     c AS ( \
        SELECT l.key FROM highlander_leases l JOIN r ON l.key = r.key AND l.id = r.id \
        WHERE l.namespace = $5::text \
          AND (l.owner IS NULL OR l.owner = $3::int4 OR l.owner IN (SELECT owner FROM dead)) \
          AND (l.reserved_until IS NULL OR l.reserved_until <= now() OR l.reserved_for = $4::text) \
        ORDER BY l.key FOR UPDATE OF l) \
     UPDATE highlander_leases t \
        SET token = t.token + 1, owner = $3::int4, node = $4::text, claimed_at = now(), \
            reserved_for = NULL, reserved_until = NULL \
       FROM c WHERE t.key = c.key \
     RETURNING t.key, t.token";

/// Who holds each requested id now, read after the claim (a fresh
/// snapshot, sent right behind it on the same connection), and for whom
/// and how many more seconds it is reserved (NULL when it is not, or no
/// longer). `$1` keys.
pub(super) const STATUS: &str = "SELECT key, namespace, id, owner, node, token, reserved_for, \
     CASE WHEN reserved_until > clock_timestamp() \
          THEN extract(epoch FROM reserved_until - clock_timestamp())::float8 END \
     FROM highlander_leases WHERE key = ANY($1::bigint[])";

/// Which of the owners a node waits for have lost their presence lock
/// (their session ended). With an empty array it is just a heartbeat.
/// `$1` owners, `$2` namespace key.
pub(super) const PROBE: &str = "SELECT o FROM unnest($1::int4[]) AS o \
     WHERE pg_try_advisory_xact_lock_shared($2::int4, o)";

/// Releases this session's rows among `$1` (key order, like the claim) and,
/// when any was released, notifies the namespace's channel, so waiting
/// nodes retry at once. The payload is the owner, followed by the released
/// keys when they are few (`owner:key,key`; a payload must stay under
/// 8,000 bytes), so that releasing one id does not wake the waiters of all
/// the others. The notification is delivered when the statement commits.
///
/// `$4` names, for each key, the node it is released to (`release_to`), or
/// NULL: a key released to a node is reserved for it for `$5` seconds on
/// the server's clock (see [`CLAIM`]); any other release clears the
/// reservation. `$1` keys, `$2` owner, `$3` channel, `$4` targets, `$5`
/// seconds.
pub(super) const RELEASE: &str = "WITH r AS MATERIALIZED ( \
        SELECT * FROM unnest($1::bigint[], $4::text[]) AS r(key, target)), \
     c AS ( \
        SELECT l.key, r.target FROM highlander_leases l JOIN r ON l.key = r.key \
        WHERE l.owner = $2::int4 ORDER BY l.key FOR UPDATE OF l), \
     u AS ( \
        UPDATE highlander_leases t SET owner = NULL, node = NULL, reserved_for = c.target, \
            reserved_until = CASE WHEN c.target IS NULL THEN NULL \
                                  ELSE now() + $5::float8 * interval '1 second' END \
        FROM c WHERE t.key = c.key \
        RETURNING t.key) \
     SELECT s.n, pg_notify($3::text, $2::int4::text || \
            CASE WHEN s.n <= 300 THEN ':' || s.keys ELSE '' END)::text \
     FROM (SELECT count(*)::bigint AS n, string_agg(key::text, ',') AS keys FROM u) s \
     WHERE s.n > 0";

/// The presence locks of a namespace's sessions in `pg_locks`: granted
/// exclusive two-integer advisory locks (`objsubid = 2`) of this database
/// whose first half (`classid`) is the namespace key given as parameter
/// `$ns` (unsigned, as `pg_locks` shows it). Joined with
/// `pg_stat_activity` as `a` on `l.pid`. (The claim and the probe take
/// shared locks on dead owners' numbers for a moment: they are not
/// presence.)
macro_rules! presence_locks {
    ($ns:literal) => {
        concat!(
            "pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
       AND l.mode = 'ExclusiveLock' \
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
       AND l.classid::bigint = ",
            $ns,
            "::bigint"
        )
    };
}

/// The session holding a lease row `t`'s presence lock, joined as `h`
/// (`h.application_name` is its node name); rows whose owner has no
/// session drop out. `$2` is the namespace key (unsigned).
macro_rules! holding_session {
    () => {
        concat!(
            "JOIN LATERAL ( \
        SELECT a.application_name FROM ",
            presence_locks!("$2"),
            " AND l.objid::bigint = (t.owner::bigint & 4294967295) \
        LIMIT 1) h ON true "
        )
    };
}

/// The holder of one id: its row, and the session that holds the row's
/// presence lock, found in `pg_locks` and named by `pg_stat_activity`
/// (application_name is the node name). No session: nobody holds it.
/// `$1` key, `$2` namespace key (as an unsigned 32-bit number).
pub(super) const HOLDER: &str = concat!(
    "SELECT t.token, h.application_name, t.node FROM highlander_leases t ",
    holding_session!(),
    "WHERE t.key = $1::bigint AND t.owner IS NOT NULL"
);

/// Every held id of one namespace, with the session that holds it, as
/// [`HOLDER`] finds it for one id. `$1` namespace name, `$2` namespace key
/// (unsigned).
pub(super) const HOLDERS: &str = concat!(
    "SELECT t.id, t.token, h.application_name, t.node, t.claimed_at FROM highlander_leases t ",
    holding_session!(),
    "WHERE t.namespace = $1 AND t.owner IS NOT NULL ORDER BY t.id"
);

/// The nodes of this namespace connected now (sessions holding a presence
/// lock with this namespace key), each with its presence number (`objid`,
/// unsigned) and the profile it announced, if any: the member row naming
/// that presence number, so a crashed node's row stops counting the moment
/// its session ends. `$1` namespace key (unsigned), `$2` namespace.
pub(super) const MEMBERS: &str = concat!(
    "SELECT s.app, s.addr, s.objid, p.node, p.weight, p.labels, p.digest FROM ( \
        SELECT DISTINCT a.application_name AS app, a.client_addr::text AS addr, \
               l.objid::bigint AS objid FROM ",
    presence_locks!("$1"),
    ") s LEFT JOIN highlander_members p \
       ON p.namespace = $2::text AND (p.owner::bigint & 4294967295) = s.objid"
);

/// The presence numbers (unsigned) of this namespace's sessions: what the
/// probe then watches for deaths. `$1` namespace key (unsigned).
pub(super) const MEMBER_OWNERS: &str = concat!(
    "SELECT DISTINCT l.objid::bigint FROM ",
    presence_locks!("$1")
);

/// The catalogs of `$2` digests in namespace `$1`.
pub(super) const CATALOGS: &str = "SELECT digest, ids FROM highlander_catalogs \
     WHERE namespace = $1::text AND digest = ANY($2::bigint[])";

/// The member row of a node, as an upsert.
macro_rules! upsert_member {
    ($source:literal) => {
        concat!(
            "INSERT INTO highlander_members (namespace, node, owner, weight, labels, digest, announced_at) ",
            $source,
            " ON CONFLICT (namespace, node) DO UPDATE SET owner = EXCLUDED.owner, \
               weight = EXCLUDED.weight, labels = EXCLUDED.labels, digest = EXCLUDED.digest, \
               announced_at = EXCLUDED.announced_at \
             RETURNING 1"
        )
    };
}

/// Announces a profile whose catalog is stored already (one row, and a
/// notification `m` on the channel), sending no ids; no row when the
/// catalog is not stored (then [`ANNOUNCE_FULL`]). `$1` namespace, `$2`
/// node, `$3` owner, `$4` weight, `$5` labels, `$6` digest, `$7` channel.
pub(super) const ANNOUNCE_KNOWN: &str = concat!(
    "WITH m AS (",
    upsert_member!(
        "SELECT $1::text, $2::text, $3::int4, $4::int8, $5::text[], $6::int8, now() \
         WHERE EXISTS (SELECT 1 FROM highlander_catalogs WHERE namespace = $1::text AND digest = $6::int8)"
    ),
    ") SELECT pg_notify($7::text, 'm')::text FROM m"
);

/// Announces a profile with its catalog's ids (`$8`), stored unless
/// another node stored that catalog already. Parameters as
/// [`ANNOUNCE_KNOWN`].
pub(super) const ANNOUNCE_FULL: &str = concat!(
    "WITH c AS (INSERT INTO highlander_catalogs (namespace, digest, ids) \
        VALUES ($1::text, $6::int8, $8::text[]) ON CONFLICT DO NOTHING), \
     m AS (",
    upsert_member!("VALUES ($1::text, $2::text, $3::int4, $4::int8, $5::text[], $6::int8, now())"),
    ") SELECT pg_notify($7::text, 'm')::text FROM m"
);

/// Deletes the member rows of this namespace whose session has ended (its
/// presence lock is free). `$1` namespace, `$2` this session's owner, `$3`
/// namespace key.
pub(super) const FORGET_DEAD: &str = "DELETE FROM highlander_members \
     WHERE namespace = $1::text AND owner <> $2::int4 \
       AND pg_try_advisory_xact_lock_shared($3::int4, owner)";

/// Deletes the catalogs of this namespace no member row names. One that a
/// concurrent announce names meanwhile makes this fail (the foreign key),
/// harmlessly. `$1` namespace.
pub(super) const FORGET_CATALOGS: &str = "DELETE FROM highlander_catalogs c \
     WHERE c.namespace = $1::text AND NOT EXISTS ( \
        SELECT 1 FROM highlander_members m WHERE m.namespace = c.namespace AND m.digest = c.digest)";

/// Leaving: deletes this session's member row, gives its presence lock
/// back when no lease row names it any more (so the others' next member
/// lookup no longer lists it), and notifies `m`. `$1` namespace key, `$2`
/// owner, `$3` channel, `$4` namespace.
pub(super) const LEAVE: &str = "WITH d AS ( \
        DELETE FROM highlander_members WHERE namespace = $4::text AND owner = $2::int4 RETURNING 1) \
     SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM highlander_leases WHERE owner = $2::int4) \
                 THEN pg_advisory_unlock($1::int4, $2::int4) END, \
            (SELECT count(*) FROM d), pg_notify($3::text, 'm')::text";

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared pieces join up into the statements as written out.
    #[test]
    fn lookups_read_as_one_statement() {
        let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let owners = squeeze(MEMBER_OWNERS);
        let presence = "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' \
                 AND l.granted AND l.objsubid = 2 AND l.mode = 'ExclusiveLock' AND l.database = (SELECT oid FROM pg_database \
                 WHERE datname = current_database()) AND l.classid::bigint = $1::bigint";
        assert!(owners.ends_with(&squeeze(presence)), "{owners}");
        let members = squeeze(MEMBERS);
        assert!(
            members.contains(&format!(
                "{}) s LEFT JOIN highlander_members p ON p.namespace = $2::text",
                squeeze(presence)
            )),
            "{members}"
        );
        for announce in [ANNOUNCE_KNOWN, ANNOUNCE_FULL] {
            let announce = squeeze(announce);
            assert!(
                announce
                    .contains("ON CONFLICT (namespace, node) DO UPDATE SET owner = EXCLUDED.owner")
                    && announce
                        .ends_with("RETURNING 1) SELECT pg_notify($7::text, 'm')::text FROM m"),
                "{announce}"
            );
        }
        let holder = squeeze(HOLDER);
        assert!(
            holder.contains(
                "FROM highlander_leases t JOIN LATERAL ( SELECT a.application_name FROM pg_locks l"
            ),
            "{holder}"
        );
        assert!(
            holder.contains(
                "AND l.classid::bigint = $2::bigint AND l.objid::bigint = (t.owner::bigint & 4294967295) \
                 LIMIT 1) h ON true WHERE t.key = $1::bigint AND t.owner IS NOT NULL"
            ),
            "{holder}"
        );
        assert!(
            squeeze(HOLDERS).ends_with(
                "LIMIT 1) h ON true WHERE t.namespace = $1 AND t.owner IS NOT NULL ORDER BY t.id"
            ),
            "{}",
            squeeze(HOLDERS)
        );
    }
}
