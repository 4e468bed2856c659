use super::from_url;

/// Found by the `from_url` fuzz target: the etcd parser ended the
/// authority at the `?` inside the password and quoted `root:s3cr` as an
/// endpoint.
#[test]
fn backend_errors_never_quote_a_piece_of_the_password() {
    for (url, password) in [
        ("etcds://root:s3cr?et42@a:2379", "s3cr?et42"),
        ("etcd://root:s3cr/et42@a:2379", "s3cr/et42"),
        ("postgres://app:s3cr?et42@db/app?sslmode=nope", "s3cr?et42"),
        ("postgres://app:s3cr/et42@db:notaport/app", "s3cr/et42"),
        ("cluster://u:s3cr?et42@0.0.0.0:7400?seeds=", "s3cr?et42"),
        // Found by the fuzz target too: postgres quoted the `sslmode`
        // value, which ran on over a second `?` into `password=`.
        (
            "postgres://\u{1}\u{1}\0\0/&bd\0pwddb:pp?sslmode=xe=//:@7?password=app/ab",
            "app/ab",
        ),
    ] {
        let Err(e) = from_url(url) else { continue };
        let e = e.to_string();
        assert!(!e.contains(password), "{url}: {e}");
        for piece in password.split(['/', '?']).filter(|p| p.len() >= 4) {
            assert!(!e.contains(piece), "{url}: {e}");
        }
    }
}

/// Found by the `from_url` fuzz target: a huge `ttl` panicked in
/// `Duration::from_secs_f64`.
#[test]
fn huge_durations_are_an_error_not_a_panic() {
    let ttl = format!("1{}", "0".repeat(25));
    assert!(from_url(&format!("etcd://a:2379?ttl={ttl}")).is_err());
    assert!(from_url("etcd://a:2379?ttl=1e300s").is_err());
}

#[test]
fn unknown_backends_never_echo_the_value() {
    let nasty = [
        ("redis://:hunter2@cache:6379", Some("redis")),
        ("redis://u:hunter2/x@cache", Some("redis")),
        ("host=db password=hunter2", None),
        ("user:hunter2@db:5432", None),
        ("post gres://u:hunter2@db", None),
        ("hunter2://db", Some("hunter2")),
        ("x;hunter2://db", None),
        ("a?password=hunter2://x", None),
        ("", None),
    ];
    for (url, scheme) in nasty {
        let err = from_url(url).err().expect("refused").to_string();
        match scheme {
            Some(s) => assert_eq!(
                err,
                format!(
                    "unknown backend scheme `{s}://`: use memory, postgres://…, etcd://… or cluster://…"
                )
            ),
            None => {
                assert!(!err.contains("hunter2"), "{url:?} gave {err}");
                assert!(err.contains("use memory, postgres://…"), "{err}");
            }
        }
    }
}

mod start_up {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use tokio::time::Instant;

    use crate::backend::{Backend, DEFAULT_START_TIMEOUT, MemoryCluster, Session};
    use crate::service::BoxFuture;
    use crate::{BackendErrorKind, Error, Result, Runtime};

    /// A memory backend whose first `failures` connects fail with
    /// `error` (all of them when `failures` is `u32::MAX`).
    struct Flaky {
        memory: MemoryCluster,
        failures: u32,
        error: fn(u32) -> Error,
        attempts: Arc<AtomicU32>,
        url_timeout: Option<Duration>,
    }

    impl Flaky {
        fn new(failures: u32, error: fn(u32) -> Error) -> (Self, Arc<AtomicU32>) {
            let attempts = Arc::new(AtomicU32::new(0));
            let flaky = Flaky {
                memory: MemoryCluster::new(),
                failures,
                error,
                attempts: attempts.clone(),
                url_timeout: None,
            };
            (flaky, attempts)
        }
    }

    impl Backend for Flaky {
        fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>> {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst);
            if n < self.failures {
                let error = (self.error)(n);
                return Box::pin(async move { Err(error) });
            }
            self.memory.connect(node)
        }

        fn describe(&self) -> String {
            "flaky://db:5432".to_string()
        }

        fn start_timeout(&self) -> Option<Duration> {
            self.url_timeout
        }
    }

    fn refused(n: u32) -> Error {
        Error::backend(
            BackendErrorKind::Unreachable,
            format!("connection refused (attempt {})", n + 1),
        )
    }

    fn bad_password(_: u32) -> Error {
        Error::backend(
            BackendErrorKind::Auth,
            "flaky://db:5432 refused user `app`: check its password",
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_comes_up_late_is_waited_for() {
        let (flaky, attempts) = Flaky::new(5, refused);
        let handle = Runtime::builder()
            .node("a")
            .backend(flaky)
            .start()
            .await
            .expect("the sixth attempt connects");
        assert_eq!(attempts.load(Ordering::SeqCst), 6);
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_never_comes_up_fails_start_after_the_timeout() {
        let (flaky, attempts) = Flaky::new(u32::MAX, refused);
        let started = Instant::now();
        let err = Runtime::builder()
            .node("a")
            .backend(flaky)
            .start_timeout(Duration::from_secs(4))
            .start()
            .await
            .unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(4) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        let n = attempts.load(Ordering::SeqCst);
        let Error::Unreachable {
            backend, source, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(backend, "flaky://db:5432");
        assert_eq!(
            source.to_string(),
            format!("connection refused (attempt {n})"),
            "the last cause"
        );
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot reach flaky://db:5432 within 4s: connection refused (attempt {n});"
            )),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_url_timeout_applies_and_the_builder_wins_over_it() {
        for (builder, url, expect) in [
            (None, None, DEFAULT_START_TIMEOUT),
            (None, Some(2), Duration::from_secs(2)),
            (Some(3), Some(2), Duration::from_secs(3)),
        ] {
            let (mut flaky, _) = Flaky::new(u32::MAX, refused);
            flaky.url_timeout = url.map(Duration::from_secs);
            let mut b = Runtime::builder().node("a").backend(flaky);
            if let Some(secs) = builder {
                b = b.start_timeout(Duration::from_secs(secs));
            }
            let started = Instant::now();
            let err = b.start().await.unwrap_err();
            let waited = started.elapsed();
            assert!(
                waited >= expect && waited < expect + Duration::from_secs(1),
                "{builder:?} {url:?}: {waited:?}"
            );
            let Error::Unreachable { waited, .. } = err else {
                panic!("{err:?}")
            };
            assert_eq!(waited, expect);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_retrying_cannot_fix_fails_start_at_once() {
        let (flaky, attempts) = Flaky::new(u32::MAX, bad_password);
        let started = Instant::now();
        let err = Runtime::builder()
            .node("a")
            .backend(flaky)
            .start()
            .await
            .unwrap_err();
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(err.kind(), Some(BackendErrorKind::Auth));
        assert_eq!(
            err.to_string(),
            "flaky://db:5432 refused user `app`: check its password"
        );
    }
}

mod cancel_safety {
    use crate::backend::conformance::dropped_try_claim_leaves_no_tenure;
    use crate::backend::{Backend, MemoryCluster};

    #[tokio::test(start_paused = true)]
    async fn memory_a_dropped_try_claim_leaves_no_tenure() {
        let cluster = MemoryCluster::new();
        let a = cluster.connect("a").await.expect("a");
        let b = cluster.connect("b").await.expect("b");
        assert!(
            dropped_try_claim_leaves_no_tenure(&*a, &*b, "job", 0).await,
            "dropped before its first poll"
        );
        assert!(cluster.holders("job").is_empty());
        // Polled: the memory backend answers in the first poll, so
        // there is no later point to drop it at.
        assert!(!dropped_try_claim_leaves_no_tenure(&*a, &*b, "job", 1).await);
        assert!(cluster.holders("job").is_empty());
    }
}
