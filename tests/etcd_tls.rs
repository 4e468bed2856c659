//! The etcd backend over TLS against a real etcd that serves clients over
//! TLS only and requires client certificates (a throwaway CA from rcgen):
//! the right CA and client certificate connect, a foreign CA or no client
//! certificate are refused at start-up with one-line errors.

use std::time::Duration;

use highlander::{ChildSpec, Context, Runtime, RuntimeHandle, Service};
use highlander_tests::etcd::EtcdCluster;
use highlander_tests::pki::TlsFiles;

struct Idle;

impl Service for Idle {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

async fn try_start(url: &str) -> highlander::Result<RuntimeHandle> {
    Runtime::builder()
        .node("tls")
        .backend_url(url)
        .child(
            ChildSpec::new("tls-job", |_ctx| async { Ok(Idle) })
                .shutdown(Duration::from_millis(300)),
        )
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let files = TlsFiles::new(&["localhost", "127.0.0.1"]);
    let other = TlsFiles::new(&["localhost", "127.0.0.1"]);
    let foreign_ca = other.ca.clone();
    let etcd = EtcdCluster::single_tls(&files).await;
    let endpoint = etcd.endpoints()[0].clone();
    let url = |ca: &std::path::Path, with_client: bool, extra: &str| {
        let mut url = format!(
            "etcds://{endpoint}?ttl=3s&connect_timeout=3s&ca={}",
            ca.display()
        );
        if with_client {
            url.push_str(&format!(
                "&cert={}&key={}",
                files.client_cert.display(),
                files.client_key.display()
            ));
        }
        url.push_str(extra);
        url
    };

    // The right CA and a client certificate: it runs.
    let handle = try_start(&url(&files.ca, true, ""))
        .await
        .expect("TLS with the right CA connects");
    tokio::time::timeout(
        Duration::from_secs(60),
        handle.wait_until(|s| s.is_running("tls-job")),
    )
    .await
    .expect("hang guard: running over TLS");
    assert!(handle.status().backend.starts_with("etcds://"));
    handle.shutdown().await;

    // The name to verify can be given when the endpoint is an address.
    let handle = try_start(&url(&files.ca, true, "&domain=localhost"))
        .await
        .expect("domain=localhost verifies");
    handle.shutdown().await;

    // A server certificate from another CA is refused, in one line.
    let err = try_start(&url(&foreign_ca, true, ""))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot reach etcd") && err.contains("TLS mismatch"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");

    // No client certificate: the server refuses the handshake.
    let err = try_start(&url(&files.ca, false, ""))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot reach etcd"), "{err}");
    assert!(!err.contains('\n'), "{err}");

    // Plain etcd:// against the TLS port does not work either.
    let err = try_start(&format!("etcd://{endpoint}?connect_timeout=2s"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot reach etcd"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    drop(etcd);
}
