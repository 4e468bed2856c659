//! The sizes of what every id keeps in memory.

use super::*;
use crate::Context;
use crate::backend::{Backend, MemoryCluster};
use crate::spec::ChildSpec;
use crate::test_util::soon;

/// A service that runs until cancelled.
pub(crate) struct Idle;
impl crate::Service for Idle {
    async fn run(&mut self, ctx: &Context) -> crate::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

fn shared() -> Arc<Shared> {
    shared_on(
        futures_util::FutureExt::now_or_never(MemoryCluster::new().connect("a"))
            .expect("the memory backend connects at once")
            .unwrap(),
    )
}

/// What the guardians of node `a` share, on `session`, rebalancing on.
pub(crate) fn shared_on(session: Arc<dyn crate::backend::Session>) -> Arc<Shared> {
    let node: Arc<str> = Arc::from("a");
    Arc::new(Shared {
        node: node.clone(),
        session,
        state: Arc::new(StateMap::new()),
        shutdown: CancellationToken::new(),
        stepdown_delay: Duration::from_secs(5),
        version: watch::Sender::new(0),
        ops: crate::ops::NodeOps::new(node, &crate::ops::OpsConfig::default()),
        draining: watch::Sender::new(false),
        handoff_rate: 1_000,
        placement: crate::runtime::Placement::new(crate::runtime::DEFAULT_GRACE, true),
    })
}

/// The slot's signal keeps what was raised until it is taken: an ask made
/// before anyone listens is not lost, a handoff beats a step-down, a
/// permit is taken once, and a removal names the reason even when the node
/// shuts down too.
#[tokio::test(start_paused = true)]
async fn the_slot_signal_keeps_what_was_raised() {
    let slot = Slot::new(
        ChildSpec::new("signal", |_ctx| async { Ok(Idle) }),
        &shared(),
    );
    assert!(soon(slot.stop_or_ask()).await.is_none(), "nothing raised");
    assert!(!slot.cancel.is_cancelled());

    slot.ask(Ask::Stepdown);
    slot.ask(Ask::Moved);
    assert_eq!(soon(slot.stop_or_ask()).await, Some(ShutdownReason::Moved));
    assert!(soon(slot.asked()).await.is_none(), "the permit was taken");

    slot.ask(Ask::Stepdown);
    slot.clear_asks();
    assert!(
        soon(slot.asked()).await.is_none(),
        "a cleared permit is gone"
    );
    assert!(
        soon(slot.cancel.cancelled()).await.is_none(),
        "an ask is no stop"
    );

    slot.shut_down();
    assert!(slot.cancel.is_cancelled());
    assert_eq!(
        soon(slot.stop_or_ask()).await,
        Some(ShutdownReason::NodeShutdown)
    );
    slot.remove();
    assert_eq!(
        soon(slot.stop_or_ask()).await,
        Some(ShutdownReason::Removed)
    );
    assert!(
        soon(slot.cancel.cancelled()).await.is_some(),
        "a stop stays raised"
    );
}

/// The futures every id keeps in memory: the guardian's (one task per
/// id, waiting or running) and the boxed running part of a held id.
/// Printed with `--nocapture`; bounded so that growth is a deliberate
/// choice.
#[tokio::test]
async fn future_sizes() {
    let spec = ChildSpec::new("sizes", |_ctx| async { Ok(Idle) });
    let shared = shared();
    let slot = Arc::new(Slot::new(spec, &shared));
    let guardian = Guardian { slot, shared };
    let (lease, _signal) = Lease::new(1);
    let instance = std::mem::size_of_val(&guardian.run_instance(&lease));
    let supervise = std::mem::size_of_val(&guardian.supervise(&lease));
    let guard = std::mem::size_of_val(&guardian.guard());
    let tenure = std::mem::size_of_val(&guardian.tenure(lease.clone()));
    let ctx = Context::new("sizes".into(), "a".into(), 1, Arc::new(StateMap::new()));
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
    // 104 B each), then 280 and 520 B before the stop trigger became a
    // poll that keeps no state (it was an 80 B future pinned for the whole
    // instance), `run` and its stop stopped keeping room beside each other,
    // the running part's layers became `async` blocks (an `async fn`
    // keeps a second copy of its arguments), the restart decision a plain
    // function, and `run` one enum instead of two options; 256 B since
    // (with malloc's header a 272 B chunk; 264 B is the most that chunk
    // takes).
    // tokio's task cell (header, future, trailer, in steps of 128 B) is
    // 256 B around a future of up to 152 B, 384 B up to 280 B. The task
    // was 280 B (a 384 B cell) until the guardian's layers became `async`
    // blocks, the claim loop's next step one boxed future made where the
    // answer is taken apart, its retry delay milliseconds, the held tenure
    // a field of the slot, the exit accounting the guardian's own drop,
    // and the recovery from a panic boxed; 144 B since.
    assert!(task <= 144, "the guardian task grew to {task} B");
    assert!(tenure <= 256, "the running part grew to {tenure} B");
    assert!(trigger <= 24, "the stop trigger grew to {trigger} B");
    // 280 B: with the Arc's counts and malloc's header, a 304 B chunk (it
    // was 264 B, a 288 B chunk, before it kept the held tenure for the
    // task).
    assert!(slot <= 280, "the slot grew to {slot} B");
}
