//! Throwaway certificates for the TLS tests (rcgen): a CA, a server
//! certificate and a client certificate it signed, written as PEM files to
//! a temp dir that is removed when the [`TlsFiles`] is dropped. The server
//! harnesses ([`PgServer::start_tls`](crate::postgres::PgServer::start_tls),
//! [`EtcdCluster::single_tls`](crate::etcd::EtcdCluster::single_tls)) copy
//! what they need into their own dirs.
//!
//! ```
//! let tls = highlander_tests::pki::TlsFiles::new(&["localhost"]);
//! let other = highlander_tests::pki::TlsFiles::new(&["localhost"]); // a foreign CA
//! assert!(std::fs::read_to_string(&tls.ca).unwrap().contains("BEGIN CERTIFICATE"));
//! assert_ne!(tls.ca_pem(), other.ca_pem());
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// The common name of every client certificate: what a server that checks
/// client certificates sees (`/CN=highlander-app`).
pub const CLIENT_CN: &str = "highlander-app";

/// A CA and what it signed, as PEM files in a temp dir of their own.
#[derive(Debug)]
pub struct TlsFiles {
    /// The dir holding every file below; removed on drop.
    pub dir: PathBuf,
    /// The CA's certificate: what clients trust, and what a server that
    /// asks for client certificates checks them against.
    pub ca: PathBuf,
    /// The server's certificate, for the names given to [`TlsFiles::new`].
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// A client certificate (common name [`CLIENT_CN`]).
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl TlsFiles {
    /// A new CA, a server certificate it signed for `server_names` (DNS
    /// names or IP addresses) and a client certificate, written to a new
    /// temp dir. Panics when a certificate cannot be made or written.
    pub fn new(server_names: &[&str]) -> TlsFiles {
        let dir = std::env::temp_dir().join(format!(
            "hl-pki-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            crate::unix_nanos() % 1_000_000_000
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let ca_key = KeyPair::generate().expect("generate the CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "highlander test CA");
        let ca_pem = params.self_signed(&ca_key).expect("self-sign the CA").pem();
        let issuer = Issuer::new(params, ca_key);
        let sign = |names: &[&str], cn: &str| {
            let key = KeyPair::generate().expect("generate a key");
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut params = CertificateParams::new(names).expect("certificate parameters");
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &issuer).expect("sign a certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key_pem) = sign(server_names, "highlander test server");
        let (client_pem, client_key_pem) = sign(&[], CLIENT_CN);
        TlsFiles {
            ca: write(&dir, "ca.pem", &ca_pem),
            server_cert: write(&dir, "server.pem", &server_pem),
            server_key: write(&dir, "server-key.pem", &server_key_pem),
            client_cert: write(&dir, "client.pem", &client_pem),
            client_key: write(&dir, "client-key.pem", &client_key_pem),
            dir,
        }
    }

    /// The CA's certificate as PEM text.
    pub fn ca_pem(&self) -> String {
        read(&self.ca)
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// The text of a PEM file written here.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}
