//! TLS against a real server with `ssl = on` and a certificate from a
//! throwaway CA: `sslmode=require` with the CA file verifies the chain,
//! `verify-full` also the host name, and a certificate from another CA is
//! refused with a clear error at start-up.

use std::time::Duration;

use highlander::backend::postgres::Postgres;
use highlander::{ChildSpec, Context, Runtime, Service};
use highlander_tests::postgres::{PASSWORD, PgServer, TlsFiles, USER};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

struct Idle;

impl Service for Idle {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

/// A CA, and a server certificate it signed for `names`.
fn pki(names: &[&str]) -> (String, TlsFiles) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "highlander test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (
        ca_cert.pem(),
        TlsFiles {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    )
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("hl-tls-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

async fn try_start(node: &str, backend: Postgres) -> highlander::Result<highlander::RuntimeHandle> {
    Runtime::builder()
        .node(node)
        .backend(backend)
        .without_registered()
        .child(ChildSpec::new("tls-job", |_ctx| async { Ok(Idle) }))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file() {
    let (ca_pem, files) = pki(&["localhost"]);
    let (other_ca_pem, _) = pki(&["localhost"]);
    let pg = PgServer::start_tls(&files);
    let ca = temp_file("ca.pem", &ca_pem);
    let other_ca = temp_file("other-ca.pem", &other_ca_pem);
    let port = pg.port();
    let url = |host: &str, mode: &str, ca: &std::path::Path| {
        format!(
            "postgres://{USER}:{PASSWORD}@{host}:{port}/{USER}?sslmode={mode}&sslrootcert={}",
            ca.display()
        )
    };

    // require + CA file: the chain is verified, the name (127.0.0.1) is not.
    let a = try_start("tls-a", Postgres::new(url("127.0.0.1", "require", &ca)))
        .await
        .expect("sslmode=require with the right CA connects");
    tokio::time::timeout(
        Duration::from_secs(60),
        a.wait_until(|s| s.is_running("tls-job")),
    )
    .await
    .unwrap();
    let ssl = pg
        .sql(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'tls-a'",
        )
        .await;
    assert_eq!(ssl, [[Some("t".to_string())]], "the session is encrypted");

    // verify-full checks the name too: right for localhost, wrong for 127.0.0.1.
    let b = try_start("tls-b", Postgres::new(url("localhost", "verify-full", &ca)))
        .await
        .expect("verify-full with the certificate's name connects");
    let e = try_start("tls-c", Postgres::new(url("127.0.0.1", "verify-full", &ca)))
        .await
        .expect_err("verify-full against another name fails")
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");

    // A certificate from another CA is refused, whatever the mode.
    let e = try_start(
        "tls-d",
        Postgres::new(url("127.0.0.1", "require", &other_ca)),
    )
    .await
    .expect_err("a foreign CA fails")
    .to_string();
    assert!(e.contains("certificate"), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");

    // The builder's ca_file is the same as sslrootcert.
    let f = try_start(
        "tls-f",
        Postgres::new(format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/{USER}?sslmode=verify-ca"
        ))
        .ca_file(&ca),
    )
    .await
    .expect("ca_file works like sslrootcert");

    // TLS without a CA file is a configuration error.
    let e = try_start(
        "tls-g",
        Postgres::new(format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/{USER}?sslmode=require"
        )),
    )
    .await
    .expect_err("require without a CA file fails")
    .to_string();
    assert!(e.contains("sslrootcert"), "{e}");

    for h in [a, b, f] {
        h.shutdown().await;
    }
    let _ = std::fs::remove_file(ca);
    let _ = std::fs::remove_file(other_ca);
}
