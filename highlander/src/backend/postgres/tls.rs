//! TLS through rustls (with the `ring` provider): which `sslmode` the URL
//! and the CA make, a CA file or the system's CAs, libpq's `verify-ca` /
//! `verify-full` meanings, and client certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;

/// The URL's `sslmode`, as libpq names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    /// The mode an `sslmode=` value names (`allow` counts as `prefer`).
    pub(super) fn from_url(value: &str) -> Result<Mode, String> {
        Ok(match value {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            _ => {
                return Err(format!(
                    "sslmode `{value}` is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }

    /// The driver's mode for a TLS connection in this mode: only `prefer`
    /// falls back to plain text when the server has no TLS.
    pub(super) fn ssl_mode(self) -> SslMode {
        if self == Mode::Prefer {
            SslMode::Prefer
        } else {
            SslMode::Require
        }
    }
}

/// Whether a connection runs TLS, given the URL's mode, the CAs (if any),
/// and whether a client certificate is set: `None` for plain text, or the
/// mode TLS runs in (`sslrootcert=system` turns `prefer` into
/// `verify-full`, as libpq 16 does) and the CAs. An error says what to add
/// or change in the URL.
pub(super) fn decide(
    mode: Mode,
    roots: Option<&Roots>,
    client_cert: bool,
) -> Result<Option<(Mode, &Roots)>, String> {
    let mode = match (roots, mode) {
        // As libpq 16: the system's CAs vouch for names, not for chains alone.
        (Some(Roots::System), Mode::Prefer) => Mode::VerifyFull,
        (Some(Roots::System), mode @ (Mode::Require | Mode::VerifyCa | Mode::Disable)) => {
            return Err(format!(
                "sslrootcert=system checks the server's name: use sslmode=verify-full, not {}",
                mode.name()
            ));
        }
        (_, mode) => mode,
    };
    match (mode, roots) {
        (Mode::Disable, _) | (Mode::Prefer, None) => {
            if client_cert {
                return Err(
                    "a client certificate (sslcert/sslkey) needs TLS: \
                     add sslmode=verify-full and sslrootcert=/path/to/ca.pem (or sslrootcert=system)"
                        .to_string(),
                );
            }
            Ok(None)
        }
        (mode, None) => Err(format!(
            "sslmode={} needs the CA that signed the server's certificate: \
             add sslrootcert=/path/to/ca.pem (or sslrootcert=system for the system's CAs)",
            mode.name()
        )),
        (mode, Some(roots)) => Ok(Some((mode, roots))),
    }
}

/// Where the CAs that vouch for the server come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Roots {
    /// A PEM file (`sslrootcert=/path`).
    File(PathBuf),
    /// The system's trusted CAs (`sslrootcert=system`).
    System,
}

impl Roots {
    /// The CAs an `sslrootcert=` value names.
    pub(super) fn from_path(path: PathBuf) -> Roots {
        if path.as_os_str() == "system" {
            Roots::System
        } else {
            Roots::File(path)
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// libpq's table of modes, with this backend's rule that TLS always
    /// checks the chain (so it needs a CA).
    #[test]
    fn modes_and_cas_decide_tls() {
        let file = Roots::File(PathBuf::from("/ca.pem"));
        let system = Roots::System;
        let ok = |mode, roots, cert| decide(mode, roots, cert).map(|d| d.map(|(m, _)| m));
        assert_eq!(ok(Mode::Prefer, None, false), Ok(None));
        assert_eq!(ok(Mode::Disable, Some(&file), false), Ok(None));
        assert_eq!(ok(Mode::Prefer, Some(&file), false), Ok(Some(Mode::Prefer)));
        assert_eq!(
            ok(Mode::Require, Some(&file), true),
            Ok(Some(Mode::Require))
        );
        assert_eq!(
            ok(Mode::VerifyCa, Some(&file), false),
            Ok(Some(Mode::VerifyCa))
        );
        assert_eq!(
            ok(Mode::Prefer, Some(&system), false),
            Ok(Some(Mode::VerifyFull))
        );
        assert_eq!(
            ok(Mode::VerifyFull, Some(&system), true),
            Ok(Some(Mode::VerifyFull))
        );
        for mode in [Mode::Require, Mode::VerifyCa, Mode::VerifyFull] {
            let e = decide(mode, None, false).unwrap_err();
            assert!(e.contains("needs the CA") && e.contains(mode.name()), "{e}");
        }
        for mode in [Mode::Require, Mode::VerifyCa, Mode::Disable] {
            let e = decide(mode, Some(&system), false).unwrap_err();
            assert!(e.contains("use sslmode=verify-full"), "{e}");
        }
        for roots in [None, Some(&file)] {
            let mode = if roots.is_some() {
                Mode::Disable
            } else {
                Mode::Prefer
            };
            let e = decide(mode, roots, true).unwrap_err();
            assert!(e.contains("needs TLS"), "{e}");
        }
    }

    #[test]
    fn url_words_name_modes_and_roots() {
        assert_eq!(Mode::from_url("allow"), Ok(Mode::Prefer));
        assert_eq!(Mode::from_url("verify-ca"), Ok(Mode::VerifyCa));
        assert!(
            Mode::from_url("sometimes")
                .unwrap_err()
                .contains("`sometimes`")
        );
        assert_eq!(Mode::Prefer.ssl_mode(), SslMode::Prefer);
        assert_eq!(Mode::VerifyCa.ssl_mode(), SslMode::Require);
        assert_eq!(Roots::from_path("system".into()), Roots::System);
        assert_eq!(
            Roots::from_path("/etc/ca.pem".into()),
            Roots::File("/etc/ca.pem".into())
        );
    }
}
