//! TLS through rustls (with the `ring` provider): a CA file or the system's
//! CAs, libpq's `verify-ca` / `verify-full` meanings, and client
//! certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// Where the CAs that vouch for the server come from.
#[derive(Debug, Clone)]
pub(super) enum Roots {
    /// A PEM file (`sslrootcert=/path`).
    File(PathBuf),
    /// The system's trusted CAs (`sslrootcert=system`).
    System,
}

/// A client configuration that trusts `roots`. With `check_hostname` false
/// (libpq's `verify-ca`, and `require` with a CA file), the chain is
/// verified but the name in the certificate is not. `client` is a
/// certificate chain and key (PEM files) to present when the server asks.
pub(super) fn client_config(
    roots: &Roots,
    check_hostname: bool,
    client: Option<&(PathBuf, PathBuf)>,
) -> Result<ClientConfig, String> {
    let roots = Arc::new(root_store(roots)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = if check_hostname {
        builder.with_root_certificates(roots)
    } else {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| format!("TLS setup failed: {e}"))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
    };
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_file, key_file)) => {
            let (chain, key) = client_identity(cert_file, key_file)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "the client certificate {} does not fit the key {}: {e}",
                    cert_file.display(),
                    key_file.display()
                )
            })
        }
    }
}

fn root_store(roots: &Roots) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(ca_file) => {
            for cert in pem_certs(ca_file, "CA file", "sslrootcert")? {
                store.add(cert).map_err(|e| {
                    format!("bad certificate in the CA file {}: {e}", ca_file.display())
                })?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            // Bundles carry the odd certificate rustls cannot use; skip those.
            let (_added, _skipped) = store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                return Err(format!(
                    "sslrootcert=system found no trusted CA on this system{why} \
                     (install ca-certificates, set SSL_CERT_FILE, or give sslrootcert=/path/to/ca.pem)"
                ));
            }
        }
    }
    Ok(store)
}

/// The certificates of a PEM file, at least one; `what` and its URL
/// parameter `param` name the file in messages.
fn pem_certs(path: &Path, what: &str, param: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the {what} {shown} ({param}): {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "the {what} {shown} ({param}) holds no PEM certificate"
        ));
    }
    Ok(certs)
}

fn client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = pem_certs(cert, "client certificate file", "sslcert")?;
    // The key's bytes never reach a message: only its path does.
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "cannot read the client key {} (sslkey; PEM, PKCS#8, PKCS#1 or SEC1, unencrypted): {e}",
            key.display()
        )
    })?;
    Ok((chain, key))
}

/// Verifies the chain up to a trusted CA and accepts any server name, as
/// libpq's `sslmode=verify-ca` does.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // The chain was verified before the name was compared.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
