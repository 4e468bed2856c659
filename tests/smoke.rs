use highlander::{Context, MemoryCluster, Runtime, Service, ShutdownReason, highlander};
use std::sync::Mutex;

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[highlander(id = "smoke")]
#[derive(Default)]
struct Smoke;

impl Service for Smoke {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        LOG.lock()
            .unwrap()
            .push(format!("run {} {}", ctx.node(), ctx.fencing_token()));
        ctx.cancelled().await;
        Ok(())
    }
    async fn terminate(&mut self, reason: ShutdownReason) {
        LOG.lock().unwrap().push(format!("terminate {reason}"));
    }
}

#[tokio::test]
async fn smoke() {
    let cluster = MemoryCluster::new();
    let a = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .service::<Smoke>()
        .start()
        .await
        .unwrap();
    a.wait_until(|s| s.is_running("smoke")).await;
    let b = Runtime::builder()
        .node("b")
        .backend(cluster.clone())
        .service::<Smoke>()
        .start()
        .await
        .unwrap();
    b.wait_until(|s| {
        matches!(
            s.get("smoke"),
            Some(highlander::SingletonState::Waiting { .. })
        )
    })
    .await;
    a.shutdown().await;
    b.wait_until(|s| s.is_running("smoke")).await;
    b.shutdown().await;
    println!("{:?}", LOG.lock().unwrap());
}
