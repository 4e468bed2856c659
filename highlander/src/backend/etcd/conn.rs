//! Connections to etcd members over gRPC: one HTTP/2 channel per member
//! (tonic, with TLS when configured), the request metadata etcd wants
//! (`hasleader`, the auth `token`), authentication and re-authentication.
//!
//! Each connection is to ONE member, chosen by the session (see
//! `members::Members`): there is no client-side balancer here.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};

use super::Etcd;
use super::failure::{Call, Failure, chain, classify, classify_connect, reason};
use super::pb::etcdserverpb::AuthenticateRequest;
use super::pb::etcdserverpb::auth_client::AuthClient;
use super::pb::etcdserverpb::kv_client::KvClient;
use super::pb::etcdserverpb::lease_client::LeaseClient;
use super::pb::etcdserverpb::watch_client::WatchClient;
use crate::backend::kit::secret::Secret;
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
    credentials: Option<Arc<(String, Secret)>>,
}

/// Why a member could not be connected to.
pub(super) enum DialError {
    /// No connection: refused, unreachable, or not within the time limit.
    Unreachable(String),
    /// A connection, but the server closed it during the set-up.
    Handshake(String),
    /// TLS failed: a certificate that does not verify, or refused.
    Tls(String),
    /// The member refused the user or password (or auth is not enabled).
    Credentials(String),
    /// The member could not authenticate now (no leader, timed out…).
    Failed(Status),
}

impl DialError {
    pub(super) fn reason(&self) -> String {
        match self {
            DialError::Unreachable(why) | DialError::Handshake(why) | DialError::Tls(why) => {
                why.clone()
            }
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
                .connect_timeout(config.dial_timeout())
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
        let channel = self.endpoints[member].connect().await.map_err(|e| {
            let why = chain(&e);
            match classify_connect(&e) {
                Failure::Handshake => DialError::Handshake(why),
                Failure::Tls => DialError::Tls(why),
                _ => DialError::Unreachable(why),
            }
        })?;
        let conn = Conn {
            channel,
            token: Arc::new(Mutex::new(None)),
            credentials: self.credentials.clone(),
        };
        if conn.credentials.is_some() {
            conn.authenticate().await.map_err(|status| {
                match classify(&status, Call::Authenticate) {
                    Failure::CredentialsRefused => DialError::Credentials(reason(&status)),
                    Failure::Unreachable => DialError::Unreachable(reason(&status)),
                    Failure::Handshake => DialError::Handshake(reason(&status)),
                    Failure::Tls => DialError::Tls(reason(&status)),
                    _ => DialError::Failed(status),
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
    credentials: Option<Arc<(String, Secret)>>,
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
            Err(status) if self.token_refused(&status) => {
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
        self.token_refused(status) && self.authenticate().await.is_ok()
    }

    /// How a failure on this connection is classified: with credentials,
    /// its calls carry a token.
    pub(super) fn call_kind(&self) -> Call {
        if self.credentials.is_some() {
            Call::Authenticated
        } else {
            Call::Request
        }
    }

    /// The token `status` answered is no longer accepted.
    fn token_refused(&self, status: &Status) -> bool {
        classify(status, self.call_kind()) == Failure::TokenRefused
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
            password: password.expose().to_string(),
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
