//! Services registered with `#[highlander]` are gathered from the whole
//! binary, and two with one id stop the runtime at start-up with an error
//! that names both types.

use highlander::{Context, Error, MemoryCluster, Runtime, Service, highlander};

#[highlander(id = "report")]
#[derive(Default)]
struct DailyReport;

#[highlander(id = "report")]
#[derive(Default)]
struct WeeklyReport;

#[highlander(id = "cleanup", restart = "transient")]
#[derive(Default)]
struct Cleanup;

macro_rules! idle_service {
    ($($t:ty),*) => {$(
        impl Service for $t {
            async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
                ctx.cancelled().await;
                Ok(())
            }
        }
    )*};
}
idle_service!(DailyReport, WeeklyReport, Cleanup);

#[tokio::test]
async fn duplicate_registered_ids_name_both_types() {
    let cluster = MemoryCluster::new();
    let err = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .registered()
        .start()
        .await
        .unwrap_err();
    match &err {
        Error::DuplicateId { id, first, second } => {
            assert_eq!(id, "report");
            assert_eq!(first, "registry::DailyReport");
            assert_eq!(second, "registry::WeeklyReport");
        }
        other => panic!("expected a duplicate id error, got {other}"),
    }
    assert_eq!(
        err.to_string(),
        "duplicate singleton id `report`: it is used by both `registry::DailyReport` and \
         `registry::WeeklyReport`; give one of them another id"
    );
    assert!(
        cluster.nodes().is_empty(),
        "nothing connects when start-up fails"
    );
}

#[tokio::test]
async fn naming_services_runs_exactly_those() {
    let cluster = MemoryCluster::new();
    let a = Runtime::builder()
        .node("a")
        .backend(cluster.clone())
        .service::<Cleanup>()
        .service::<DailyReport>()
        .start()
        .await
        .unwrap();
    let status = a.wait_until(|s| s.running().count() == 2).await;
    let mut ids: Vec<&str> = status.running().map(|(id, _)| id).collect();
    ids.sort();
    assert_eq!(ids, ["cleanup", "report"]);
    a.shutdown().await;
}

#[tokio::test]
async fn a_runtime_without_singletons_can_still_look_up_holders() {
    let cluster = MemoryCluster::new();
    let observer = Runtime::builder()
        .node("observer")
        .backend(cluster.clone())
        .start()
        .await
        .unwrap();
    let worker = Runtime::builder()
        .node("worker")
        .backend(cluster.clone())
        .service::<Cleanup>()
        .start()
        .await
        .unwrap();
    worker.wait_until(|s| s.is_running("cleanup")).await;
    let holder = observer.holder("cleanup").await.unwrap().expect("a holder");
    assert_eq!(holder.node, "worker");
    let members: Vec<String> = observer
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.node)
        .collect();
    assert_eq!(members, ["observer", "worker"]);
    worker.shutdown().await;
    observer.shutdown().await;
    assert!(
        observer.holder("cleanup").await.is_err(),
        "a stopped runtime has no session"
    );
}
