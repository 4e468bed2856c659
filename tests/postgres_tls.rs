//! TLS against a real server with `ssl = on` and a certificate from a
//! throwaway CA: `sslmode=require` with the CA file verifies the chain,
//! `verify-full` also the host name, and a certificate from another CA is
//! refused with a clear error at start-up. A server that wants client
//! certificates gets one from `sslcert`/`sslkey` (or the builder), and
//! `sslrootcert=system` trusts what the system trusts, through a `node`
//! process whose `SSL_CERT_FILE` names the test CA.

use std::time::Duration;

use highlander::backend::postgres::Postgres;
use highlander::{ChildSpec, Context, Runtime, Service};
use highlander_tests::pki::TlsFiles;
use highlander_tests::postgres::{PASSWORD, PgServer, USER};
use highlander_tests::process::Fleet;

struct Idle;

impl Service for Idle {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

async fn try_start(node: &str, backend: Postgres) -> highlander::Result<highlander::RuntimeHandle> {
    Runtime::builder()
        .node(node)
        .backend(backend)
        .child(ChildSpec::new("tls-job", |_ctx| async { Ok(Idle) }))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file() {
    let files = TlsFiles::new(&["localhost"]);
    let other = TlsFiles::new(&["localhost"]);
    let pg = PgServer::start_tls(&files);
    let ca = files.ca.clone();
    let other_ca = other.ca.clone();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_and_system_roots() {
    let files = TlsFiles::new(&["localhost"]);
    let pg = PgServer::start_tls_with_client_certs(&files);
    let ca = files.ca.clone();
    let client_cert = files.client_cert.clone();
    let client_key = files.client_key.clone();
    let port = pg.port();
    let base = format!("postgres://{USER}:{PASSWORD}@localhost:{port}/{USER}?sslmode=verify-full");

    // Without a client certificate the server refuses, and says why.
    let e = try_start(
        "mtls-none",
        Postgres::new(format!("{base}&sslrootcert={}", ca.display())),
    )
    .await
    .expect_err("no client certificate, no session")
    .to_string();
    assert!(e.contains("sslcert= and sslkey="), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");

    // With one, from the URL: the session runs and the server saw it.
    let a = try_start(
        "mtls-url",
        Postgres::new(format!(
            "{base}&sslrootcert={}&sslcert={}&sslkey={}",
            ca.display(),
            client_cert.display(),
            client_key.display()
        )),
    )
    .await
    .expect("sslcert + sslkey connect");
    tokio::time::timeout(
        Duration::from_secs(60),
        a.wait_until(|s| s.is_running("tls-job")),
    )
    .await
    .unwrap();
    let dn = pg
        .sql(
            "SELECT s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'mtls-url'",
        )
        .await;
    assert_eq!(
        dn,
        [[Some(format!("/CN={}", highlander_tests::pki::CLIENT_CN))]]
    );

    // The builder's client_cert is the same; a key file that is not one is
    // named in the error, and its content never shown.
    let b = try_start(
        "mtls-builder",
        Postgres::new(&base)
            .ca_file(&ca)
            .client_cert(&client_cert, &client_key),
    )
    .await
    .expect("client_cert works like sslcert/sslkey");
    let e = try_start(
        "mtls-bad-key",
        Postgres::new(&base)
            .ca_file(&ca)
            .client_cert(&client_cert, &ca),
    )
    .await
    .expect_err("a certificate is not a key")
    .to_string();
    assert!(e.contains("(sslkey"), "{e}");
    assert!(!e.contains("BEGIN"), "{e}");

    // sslrootcert=system: the node binary, as a user would run it, with the
    // system's CA list replaced by the test CA through SSL_CERT_FILE.
    let url = format!(
        "postgres://{USER}:{PASSWORD}@localhost:{port}/{USER}?sslrootcert=system&sslcert={}&sslkey={}",
        client_cert.display(),
        client_key.display()
    );
    let ca_path = ca.display().to_string();
    let mut fleet = Fleet::new(
        env!("CARGO_BIN_EXE_node"),
        &url,
        &[("HL_IDS", "system-roots"), ("SSL_CERT_FILE", &ca_path)],
    );
    let mut node = fleet.spawn("mtls-system", &[]).await;
    let start = fleet
        .wait_start("system-roots", Duration::from_secs(60))
        .await;
    assert_eq!(start.node, "mtls-system");
    node.signal("TERM");
    assert!(
        node.wait_exit(Duration::from_secs(60)).await.success(),
        "the node exits cleanly"
    );

    for h in [a, b] {
        h.shutdown().await;
    }
}
