//! A guardian's slot: what the runtime and the handles share with one
//! guardian (its state, the signal that tells it to act, its placement
//! standing), and the asks a handle can make.

use super::*;

/// Why a handle asks a running instance to stop and give its id up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Ask {
    /// [`RuntimeHandle::step_down`](crate::RuntimeHandle::step_down).
    Stepdown = 1,
    /// A handoff: the id moves to another node (a drain).
    Moved = 2,
}

impl Ask {
    /// Its bit in [`SlotSignal`].
    pub(super) fn bit(self) -> u8 {
        match self {
            Ask::Stepdown => ASK_STEPDOWN,
            Ask::Moved => ASK_MOVED,
        }
    }
}

/// [`SlotSignal`] bits: the node shuts down.
const SHUTDOWN: u8 = 1;
/// The id was removed from this node.
const REMOVED: u8 = 2;
/// A handle asked the instance to step down.
const ASK_STEPDOWN: u8 = 4;
/// A handoff asked the instance to give the id up (stronger than a
/// step-down: when both were asked, the id moves).
const ASK_MOVED: u8 = 8;
/// The guardian must end.
const STOP: u8 = SHUTDOWN | REMOVED;
/// A permit to stop the instance and give the id up.
const ASKS: u8 = ASK_STEPDOWN | ASK_MOVED;

/// What tells a guardian to act: the node shuts down, the id is removed,
/// or a handle asks the instance to give the id up. One set of flags and
/// one waker per id, inline in its [`Slot`], for all three: no cancellation
/// token per id (a tree node of its own, some 110 bytes), and a wait is a
/// reference and a mask (16 bytes), not a registration in a wait list
/// (some 100 bytes in every wait of every guardian).
///
/// One waker, not a list: only the guardian's own task waits on its slot
/// (every wait of it polls with the task's waker), the runtime and the
/// handles only raise flags. A flag stays raised until it is taken, so a
/// signal raised before anyone listens is not lost: every wait registers
/// the waker, then looks at the flags.
pub(crate) struct SlotSignal {
    flags: AtomicU8,
    waker: AtomicWaker,
}

impl SlotSignal {
    pub(super) fn new() -> SlotSignal {
        SlotSignal {
            flags: AtomicU8::new(0),
            waker: AtomicWaker::new(),
        }
    }

    pub(super) fn raise(&self, bits: u8) {
        self.flags.fetch_or(bits, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Ready with the raised bits of `mask` once any is raised. Only the
    /// guardian's task may wait (see [`SlotSignal`]). The waits are
    /// `poll_fn`s around it: a reference and a mask, no state of their own.
    pub(super) fn poll_wait(&self, mask: u8, cx: &mut std::task::Context<'_>) -> Poll<u8> {
        let raised = self.flags.load(Ordering::SeqCst) & mask;
        if raised != 0 {
            return Poll::Ready(raised);
        }
        self.waker.register(cx.waker());
        // Looked at again after registering: a raise in between has either
        // been seen here or wakes the waker just registered.
        match self.flags.load(Ordering::SeqCst) & mask {
            0 => Poll::Pending,
            raised => Poll::Ready(raised),
        }
    }

    /// True once the node shuts down or the id was removed.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.flags.load(Ordering::SeqCst) & STOP != 0
    }

    /// Completes once the node shuts down or the id was removed.
    pub(crate) fn cancelled(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_wait(STOP, cx).map(drop))
    }
}

/// The state of one guardian, shared with the runtime handle.
pub(crate) struct Slot {
    pub(crate) spec: ChildSpec,
    pub(crate) state: Mutex<SingletonState>,
    /// Raised when the node shuts down ([`Slot::shut_down`], by the
    /// runtime) or the id is removed from this node, and by the asks to
    /// give the id up.
    pub(crate) cancel: SlotSignal,
    /// The tenure a drain last asked to move, so each tenure is asked once.
    pub(crate) moving: AtomicU64,
    /// How many members rank ahead of this node for the id (placement);
    /// `u32::MAX`: no placement, claim at once.
    pub(crate) rank: AtomicU32,
    /// [`name_hash`] of the best member other than this node.
    pub(crate) rival: AtomicU64,
    pub(crate) ops: crate::ops::SlotOps,
    /// The tenure this node holds, for the guardian to release should it
    /// panic.
    pub(super) held: Held,
}

/// A hash of a node name, to compare names without keeping a copy.
pub(crate) fn name_hash(node: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    node.hash(&mut h);
    h.finish() | 1
}

impl Slot {
    pub(crate) fn new(spec: ChildSpec, shared: &Shared) -> Slot {
        Slot {
            ops: shared.ops.slot(&spec.id),
            spec,
            state: Mutex::new(SingletonState::Claiming),
            cancel: SlotSignal::new(),
            moving: AtomicU64::new(0),
            rank: AtomicU32::new(u32::MAX),
            rival: AtomicU64::new(0),
            held: Held::default(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SingletonState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the current tenure's instance to stop and give the id up.
    ///
    /// A permit, not a wake-up of current waiters: the instance may not yet
    /// be listening (its first poll may come after `run` has begun), and
    /// the request must not be lost then. A permit left when the tenure
    /// ends otherwise is dropped when the next tenure begins.
    pub(crate) fn ask(&self, ask: Ask) {
        self.cancel.raise(ask.bit());
    }

    /// Completes once a permit to give the id up is there (taken by
    /// [`Slot::asked_reason`]).
    pub(super) fn asked(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(move |cx| self.cancel.poll_wait(ASKS, cx).map(drop))
    }

    /// Takes the permit: why the instance was asked to stop (the strongest
    /// ask since the permit was last taken).
    pub(super) fn asked_reason(&self) -> ShutdownReason {
        let asked = self.cancel.flags.fetch_and(!ASKS, Ordering::SeqCst);
        if asked & ASK_MOVED != 0 {
            ShutdownReason::Moved
        } else {
            ShutdownReason::Stepdown
        }
    }

    /// Drops a permit left from an earlier tenure.
    pub(super) fn clear_asks(&self) {
        self.cancel.flags.fetch_and(!ASKS, Ordering::SeqCst);
    }

    /// What stops a running instance from outside: the node shuts down or
    /// the id was removed (that reason, whichever came first of the two),
    /// or a permit to give the id up (taken).
    pub(super) fn stop_or_ask(&self) -> impl Future<Output = ShutdownReason> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_stop_or_ask(cx))
    }

    /// [`Slot::stop_or_ask`] as a poll, for a future that keeps no state
    /// of its own for it.
    pub(super) fn poll_stop_or_ask(&self, cx: &mut std::task::Context<'_>) -> Poll<ShutdownReason> {
        self.cancel.poll_wait(STOP | ASKS, cx).map(|raised| {
            if raised & STOP != 0 {
                self.cancel_reason()
            } else {
                self.asked_reason()
            }
        })
    }

    /// Withdraws the id from this node: its instance stops with
    /// [`ShutdownReason::Removed`], the id is released and the guardian ends.
    pub(crate) fn remove(&self) {
        self.cancel.raise(REMOVED);
    }

    /// The node shuts down: the instance stops with
    /// [`ShutdownReason::NodeShutdown`] (unless the id was removed first),
    /// the id is released and the guardian ends. The runtime calls it for
    /// every slot once its shutdown has begun.
    pub(crate) fn shut_down(&self) {
        self.cancel.raise(SHUTDOWN);
    }

    /// Why the instance stops once `cancel` is raised.
    pub(super) fn cancel_reason(&self) -> ShutdownReason {
        if self.cancel.flags.load(Ordering::SeqCst) & REMOVED != 0 {
            ShutdownReason::Removed
        } else {
            ShutdownReason::NodeShutdown
        }
    }

    /// How many ranks this node defers its claim by: its rank among the
    /// members that run the id, not counting `holder` (the [`name_hash`] of
    /// the id's last known holder, 0: none) when it ranks ahead, so that
    /// after a holder fails the best of the others claims at once.
    pub(crate) fn defer_ranks(&self, holder: u64) -> u32 {
        let rank = self.rank.load(Ordering::Relaxed);
        if rank == u32::MAX {
            return 0;
        }
        let rank = if rank > 0 && holder != 0 && self.rival.load(Ordering::Relaxed) == holder {
            rank - 1
        } else {
            rank
        };
        rank.min(crate::runtime::MAX_DEFER_RANKS)
    }

    /// The token of the tenure this node holds, if it holds the id.
    pub(crate) fn held_token(&self) -> Option<u64> {
        match *self.lock() {
            SingletonState::Running { token, .. } | SingletonState::Finished { token, .. } => {
                Some(token)
            }
            _ => None,
        }
    }
}
