//! Connections to etcd members over gRPC: one HTTP/2 channel per member
//! (tonic), the request metadata etcd wants (`hasleader`, the auth
//! `token`), authentication and re-authentication, and the classification of
//! failures by gRPC status code.
//!
//! Each connection is to ONE member, chosen by the session (see
//! `session::Members`): there is no client-side balancer here.

use std::error::Error as StdError;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Response, Status};

use super::pb::etcdserverpb::AuthenticateRequest;
use super::pb::etcdserverpb::auth_client::AuthClient;
use super::pb::etcdserverpb::kv_client::KvClient;
use super::pb::etcdserverpb::lease_client::LeaseClient;
use super::pb::etcdserverpb::watch_client::WatchClient;
use super::{Etcd, Password};
use crate::{Error, Result};

/// etcd refuses a request with "no leader" instead of serving it from a
/// member cut off from the quorum (the clientv3 `WithRequireLeader`).
const REQUIRE_LEADER: (&str, &str) = ("hasleader", "true");
/// The metadata key etcd reads the auth token from.
const TOKEN: &str = "token";

/// The largest message taken from etcd, as etcd's Go client
/// (`math.MaxInt32`; tonic's default is 4 MiB): one watch response carries
/// every event of a revision, and a lease expiry that deletes 100,000 keys
/// is one revision.
const MAX_RECEIVE: usize = i32::MAX as usize;

/// How to connect to each member.
pub(super) struct Dialer {
    endpoints: Vec<Endpoint>,
    credentials: Option<Arc<(String, Password)>>,
}

/// Why a member could not be connected to.
pub(super) enum DialError {
    /// No connection: refused, unreachable, or not within the time limit.
    Unreachable(String),
    /// A connection, but its TLS handshake failed.
    Handshake(String),
    /// The member refused the user or password (or auth is not enabled).
    Credentials(String),
    /// The member could not authenticate now (no leader, timed out…).
    Failed(Status),
}

impl DialError {
    pub(super) fn reason(&self) -> String {
        match self {
            DialError::Unreachable(why) | DialError::Handshake(why) => why.clone(),
            DialError::Credentials(why) => why.clone(),
            DialError::Failed(status) => reason(status),
        }
    }
}

impl Dialer {
    /// Reads the TLS files; `interval` and `ping_timeout` set the HTTP/2
    /// pings every connection sends, so that a member that hangs with its
    /// connections open gets them closed (its streams break and reopen
    /// elsewhere instead of going quiet).
    pub(super) fn new(
        config: &Etcd,
        endpoints: &[String],
        interval: Duration,
        ping_timeout: Duration,
    ) -> Result<Dialer> {
        let tls = match &config.tls {
            Some(tls) => {
                let mut settings = ClientTlsConfig::new().assume_http2(true);
                if let Some(ca) = &tls.ca {
                    settings = settings
                        .ca_certificate(Certificate::from_pem(read_pem("CA certificate", ca)?));
                }
                if let Some((cert, key)) = &tls.identity {
                    settings = settings.identity(Identity::from_pem(
                        read_pem("client certificate", cert)?,
                        read_pem("client key", key)?,
                    ));
                }
                if let Some(domain) = &tls.domain {
                    settings = settings.domain_name(domain.clone());
                }
                Some(settings)
            }
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut built = Vec::with_capacity(endpoints.len());
        for host_port in endpoints {
            let bad = |e: tonic::transport::Error| {
                Error::config(format!(
                    "etcd endpoint `{host_port}` is not a usable address: {}",
                    chain(&e)
                ))
            };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host_port}"))
                .map_err(bad)?
                .connect_timeout(config.connect_timeout.min(Duration::from_secs(2)))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(ping_timeout)
                .keep_alive_while_idle(true);
            if let Some(tls) = &tls {
                endpoint = endpoint.tls_config(tls.clone()).map_err(bad)?;
            }
            built.push(endpoint);
        }
        Ok(Dialer {
            endpoints: built,
            credentials: config.user.clone().map(Arc::new),
        })
    }

    /// Connects to member `member` and, with credentials, authenticates.
    pub(super) async fn dial(&self, member: usize) -> std::result::Result<Conn, DialError> {
        let channel = self.endpoints[member]
            .connect()
            .await
            .map_err(|e| dial_error(&e))?;
        let conn = Conn {
            channel,
            token: Arc::new(Mutex::new(None)),
            credentials: self.credentials.clone(),
        };
        if conn.credentials.is_some() {
            conn.authenticate().await.map_err(|status| {
                if credentials_refused(&status) {
                    DialError::Credentials(reason(&status))
                } else if refused(&status) {
                    DialError::Unreachable(reason(&status))
                } else {
                    DialError::Failed(status)
                }
            })?;
        }
        Ok(conn)
    }
}

/// A connection to one member (cheap to clone: the clones share it).
#[derive(Clone)]
pub(super) struct Conn {
    channel: Channel,
    token: Arc<Mutex<Option<AsciiMetadataValue>>>,
    credentials: Option<Arc<(String, Password)>>,
}

impl Conn {
    pub(super) fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone()).max_decoding_message_size(MAX_RECEIVE)
    }

    pub(super) fn lease(&self) -> LeaseClient<Channel> {
        LeaseClient::new(self.channel.clone())
    }

    pub(super) fn watch(&self) -> WatchClient<Channel> {
        WatchClient::new(self.channel.clone()).max_decoding_message_size(MAX_RECEIVE)
    }

    fn current_token(&self) -> Option<AsciiMetadataValue> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `message` with the metadata every request carries.
    pub(super) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(
            REQUIRE_LEADER.0,
            AsciiMetadataValue::from_static(REQUIRE_LEADER.1),
        );
        if let Some(token) = self.current_token() {
            metadata.insert(TOKEN, token);
        }
        request
    }

    /// Runs `call` on this connection. When etcd says the auth token is no
    /// longer valid (expired, or the auth store changed since it was issued),
    /// authenticates again and runs it once more.
    pub(super) async fn call<R, F, Fut>(&self, mut call: F) -> std::result::Result<R, Status>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = std::result::Result<Response<R>, Status>>,
    {
        let used = self.current_token();
        match call(self.clone()).await {
            Err(status) if self.credentials.is_some() && token_refused(&status) => {
                if self.current_token() == used {
                    self.authenticate().await?;
                }
                call(self.clone()).await.map(Response::into_inner)
            }
            outcome => outcome.map(Response::into_inner),
        }
    }

    /// When `status` says the auth token is no longer accepted: a new token,
    /// and true when getting one worked (the request is worth repeating).
    pub(super) async fn renew_token(&self, status: &Status) -> bool {
        self.credentials.is_some() && token_refused(status) && self.authenticate().await.is_ok()
    }

    /// With credentials: a new token (after etcd cancelled a watch, which it
    /// does when the token no longer grants access). False when it failed.
    pub(super) async fn reauthenticate(&self) -> bool {
        self.credentials.is_none() || self.authenticate().await.is_ok()
    }

    /// Exchanges the user and password for a token (etcd's `Authenticate`).
    async fn authenticate(&self) -> std::result::Result<(), Status> {
        let Some(credentials) = &self.credentials else {
            return Ok(());
        };
        let (name, password) = credentials.as_ref();
        let mut request = Request::new(AuthenticateRequest {
            name: name.clone(),
            password: password.0.clone(),
        });
        request.metadata_mut().insert(
            REQUIRE_LEADER.0,
            AsciiMetadataValue::from_static(REQUIRE_LEADER.1),
        );
        let answer = AuthClient::new(self.channel.clone())
            .authenticate(request)
            .await?
            .into_inner();
        let token = AsciiMetadataValue::try_from(answer.token.as_str())
            .map_err(|_| Status::internal("etcd answered with an auth token that is not ASCII"))?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
        Ok(())
    }
}

fn read_pem(what: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::config(format!(
            "cannot read the etcd {what} {}: {e}",
            path.display()
        ))
    })
}

/// A one-line reason: the status code, etcd's message, and the causes of a
/// transport failure.
pub(super) fn reason(status: &Status) -> String {
    let mut text = format!("{:?}", status.code());
    let message = status.message();
    if !message.is_empty() {
        text.push_str(": ");
        text.push_str(message);
    }
    let mut source = status.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text.replace(['\n', '\r'], " ")
}

/// The error and its causes, on one line.
fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text.replace(['\n', '\r'], " ")
}

/// The I/O errors in `error`'s chain.
fn io_kinds(error: &(dyn StdError + 'static)) -> Vec<std::io::ErrorKind> {
    let mut kinds = Vec::new();
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
        }
        next = e.source();
    }
    kinds
}

/// A failed connect: the TLS handshake failing shows as an I/O error of
/// kind `InvalidData` (rustls' errors, e.g. an unknown CA) or the server
/// closing the connection during it; anything else is "unreachable".
fn dial_error(error: &tonic::transport::Error) -> DialError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, InvalidData, UnexpectedEof};
    let why = chain(error);
    let handshake = io_kinds(error).iter().any(|k| {
        matches!(
            k,
            InvalidData | UnexpectedEof | ConnectionReset | BrokenPipe
        )
    });
    if handshake {
        DialError::Handshake(why)
    } else {
        DialError::Unreachable(why)
    }
}

/// The request never left: the channel could not (re)connect to the member
/// (tonic reports that as `Unavailable` caused by a [`tonic::ConnectError`]).
pub(super) fn refused(status: &Status) -> bool {
    let mut next: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(e) = next {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Worth sending to another member: `Unavailable` is what a member without
/// a leader (etcd's "no leader", "leader changed", "request timed out")
/// answers, and what tonic reports when it could not reach the member.
pub(super) fn undelivered(status: &Status) -> bool {
    status.code() == Code::Unavailable
}

/// etcd's "requested lease not found" (`NotFound`: the only `NotFound` the
/// RPCs used here return).
pub(super) fn lease_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound
}

/// The user may not touch these keys.
pub(super) fn denied(status: &Status) -> bool {
    status.code() == Code::PermissionDenied
}

/// The token a request carried is no longer accepted: `Unauthenticated`
/// ("invalid auth token": expired or unknown). etcd gives no distinct code
/// for two more cases that a fresh token fixes, so those are recognised by
/// etcd's own messages (`rpctypes.ErrGRPCAuthOldRevision`,
/// `rpctypes.ErrGRPCUserEmpty`, both `InvalidArgument`), as etcd's Go client
/// does.
fn token_refused(status: &Status) -> bool {
    match status.code() {
        Code::Unauthenticated => true,
        Code::InvalidArgument => matches!(
            status.message(),
            "etcdserver: revision of auth store is old" | "etcdserver: user name is empty"
        ),
        _ => false,
    }
}

/// `Authenticate` refused: wrong user or password (`InvalidArgument`,
/// etcd's only use of it for this RPC), auth not enabled
/// (`FailedPrecondition`), or no permission.
fn credentials_refused(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::Unauthenticated
            | Code::PermissionDenied
    )
}

/// Whether a failed request's status says the TLS handshake failed (the
/// connection was made again inside the channel).
pub(super) fn handshake_failed(status: &Status) -> bool {
    use std::io::ErrorKind::InvalidData;
    status
        .source()
        .is_some_and(|s| io_kinds(s).contains(&InvalidData))
}
