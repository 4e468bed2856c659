//! The sizes of what every id keeps in memory.

use super::*;
use crate::Context;
use crate::backend::{Backend, MemoryCluster};
use crate::spec::ChildSpec;

struct Idle;
impl crate::Service for Idle {
    async fn run(&mut self, ctx: &Context) -> crate::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

/// The futures every id keeps in memory: the guardian's (one task per
/// id, waiting or running) and the boxed running part of a held id.
/// Printed with `--nocapture`; bounded so that growth is a deliberate
/// choice.
#[tokio::test]
async fn future_sizes() {
    let session = MemoryCluster::new().connect("a").await.unwrap();
    let node: Arc<str> = Arc::from("a");
    let ops = crate::ops::NodeOps::new(node.clone(), &crate::ops::OpsConfig::default());
    let spec = ChildSpec::new("sizes", |_ctx| async { Ok(Idle) });
    let shared = Arc::new(Shared {
        node,
        session,
        state: Arc::new(StateMap::new()),
        shutdown: CancellationToken::new(),
        stepdown_delay: Duration::from_secs(5),
        version: watch::Sender::new(0),
        ops,
        draining: watch::Sender::new(false),
        handoff_rate: 1_000,
        placement: crate::runtime::Placement::new(crate::runtime::DEFAULT_GRACE, true),
    });
    let slot = Arc::new(Slot::new(spec, &shared));
    let guardian = Guardian { slot, shared };
    let (lease, _signal) = Lease::new(1);
    let instance = std::mem::size_of_val(&guardian.run_instance(&lease));
    let supervise = std::mem::size_of_val(&guardian.supervise(&lease));
    let held = Held::default();
    let guard = std::mem::size_of_val(&guardian.guard(&held));
    let tenure = std::mem::size_of_val(&guardian.tenure(lease.clone(), &held));
    let ctx = Context::new(
        "sizes".into(),
        "a".into(),
        1,
        Arc::new(StateMap::new()),
        CancellationToken::new(),
    );
    let trigger = std::mem::size_of_val(&guardian.stop_trigger(&ctx, &lease));
    let slot = std::mem::size_of::<Slot>();
    let task = std::mem::size_of_val(&guardian.run(None));
    println!(
        "guardian task future {task} B (guard {guard} B), running part (boxed) {tenure} B \
         (supervise {supervise} B, instance {instance} B, its stop trigger {trigger} B), \
         slot {slot} B"
    );
    // Every id carries the task; a held one the running part too. They
    // were 1824 and 1288 B before the rarely used states were boxed, then
    // 472 B and (supervise alone) 976 B before every wait, the build of an
    // instance and the end of a tenure were boxed, then 288 and 824 B
    // before the stop trigger waited on the slot, the lease and the
    // context by reference (16 B each) instead of in wait lists (72 to
    // 104 B each); 536 B since. tokio's task cell (header, future, trailer, in steps of
    // 128 B) is 384 B around a 280 B future, 512 B around 288 B: eight
    // bytes more cost 128 per id.
    assert!(task <= 280, "the guardian task grew to {task} B");
    assert!(tenure <= 536, "the running part grew to {tenure} B");
    assert!(trigger <= 80, "the stop trigger grew to {trigger} B");
    // 264 B: with the Arc's counts and malloc's header, a 288 B chunk.
    assert!(slot <= 264, "the slot grew to {slot} B");
}
