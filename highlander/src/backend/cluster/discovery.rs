//! Discovery: the seeds (DNS names resolved again as they change), which
//! addresses to dial and when (one dial in flight per address, refusals
//! redialed slowly, long-dead members forgotten), and what each dial's
//! outcome teaches.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info};

use super::accept::handshake_timeout;
use super::dial::Dialed;
use super::node::Node;
use super::state::State;
use super::wire::RejectReason;
use crate::backend::kit::duration::show;
use crate::{BackendErrorKind, Error};

/// Unreachable members that are not seeds are forgotten after this long.
const FORGET_AFTER: Duration = Duration::from_secs(300);
/// Seed names are resolved again this often (and after a failed dial), so
/// addresses that join a name (a new pod behind a headless Service) are
/// dialed and vanished ones stop being seeds.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// After a failed dial to a seed, its names are resolved again this soon.
const RESOLVE_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// A peer that refused our cookie is redialed this rarely; so is an address
/// that sent any other refusal before authenticating (a hint, never final).
const REFUSED_REDIAL: Duration = Duration::from_secs(2);

/// The seed addresses and the dials in flight or held back.
pub(super) struct Seeds {
    list: Vec<Seed>,
    dialing: HashSet<String>,
    retry_after: HashMap<String, Instant>,
    /// Whether a seed answered a dial (joined, or refused this node).
    heard: bool,
    /// Why the last dial of a seed that nothing answered failed.
    last_failure: Option<Error>,
}

struct Seed {
    addr: String,
    /// The member found at this address.
    name: Option<Arc<str>>,
    /// Found (from this node's own nonces) to reach this node itself.
    is_self: bool,
}

/// What a dial's outcome asks of the node, besides the bookkeeping.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Then {
    Nothing,
    /// Wake whoever waits on membership (a join in progress).
    Epoch,
    /// Dial again at once.
    Dial,
    /// Resolve the seed names again.
    Resolve,
}

impl Seeds {
    /// The seeds at `addrs`, none dialed yet.
    pub(super) fn new(addrs: Vec<String>) -> Seeds {
        Seeds {
            list: addrs
                .into_iter()
                .map(|addr| Seed {
                    addr,
                    name: None,
                    is_self: false,
                })
                .collect(),
            dialing: HashSet::new(),
            retry_after: HashMap::new(),
            heard: false,
            last_failure: None,
        }
    }

    /// The seed addresses, as dialed.
    pub(super) fn addrs(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|s| s.addr.as_str())
    }

    /// Whether a seed answered a dial of this node: it joined one, or one
    /// refused it (a node with another cookie, say, is alive all the same).
    pub(super) fn heard(&self) -> bool {
        self.heard
    }

    /// Whether a seed address was found (by this node's own dial of it) to
    /// reach this node itself.
    pub(super) fn has_self(&self) -> bool {
        self.list.iter().any(|s| s.is_self)
    }

    /// Why the last failed dial of a seed failed, once.
    pub(super) fn take_failure(&mut self) -> Option<Error> {
        self.last_failure.take()
    }

    /// Whether every seed address is this node's own (or there is none).
    pub(super) fn all_self(&self) -> bool {
        self.list.iter().all(|s| s.is_self)
    }

    /// Whether the node has joined: every seed and every member it knows
    /// connected and synced.
    pub(super) fn joined(&self, state: &State) -> bool {
        let member_synced = |n: &Arc<str>| state.peer(n).is_some_and(|p| p.synced());
        let addr_synced = |a: &str| {
            state
                .peers()
                .any(|(_, p)| p.synced() && p.addr() == Some(a))
        };
        self.list.iter().all(|s| {
            s.is_self || s.name.as_ref().is_some_and(member_synced) || addr_synced(&s.addr)
        }) && state.peers().all(|(_, p)| p.synced())
    }

    /// The addresses to dial at `now`, marked as being dialed: members that
    /// are down and seeds not known as members, except this node's own
    /// addresses, addresses being dialed or held back after a refusal, and
    /// addresses of members that are up. Members down for long that are
    /// not seeds are forgotten first.
    pub(super) fn targets(&mut self, state: &mut State, now: Instant) -> Vec<String> {
        if state.is_closed() {
            return Vec::new();
        }
        let seeds: HashSet<&str> = self.list.iter().map(|s| s.addr.as_str()).collect();
        state.forget(|p| {
            p.is_down()
                && p.down_since() + FORGET_AFTER < now
                && p.addr().is_none_or(|a| !seeds.contains(a))
        });
        let busy = |addr: &str| {
            self.dialing.contains(addr)
                || self.retry_after.get(addr).is_some_and(|t| *t > now)
                || state
                    .peers()
                    .any(|(_, p)| !p.is_down() && p.addr() == Some(addr))
        };
        let mut targets: Vec<String> = Vec::new();
        for (_, p) in state.peers() {
            if let (true, Some(addr)) = (p.is_down(), p.addr())
                && !busy(addr)
                && !targets.iter().any(|t| t == addr)
            {
                targets.push(addr.to_string());
            }
        }
        for s in &self.list {
            let known = s.name.as_ref().is_some_and(|n| state.peer(n).is_some());
            if !s.is_self && !known && !busy(&s.addr) && !targets.contains(&s.addr) {
                targets.push(s.addr.clone());
            }
        }
        for t in &targets {
            self.dialing.insert(t.clone());
        }
        targets
    }

    /// The dial of `addr` ended with `outcome` at `now`.
    pub(super) fn dialed(&mut self, addr: &str, outcome: Dialed, now: Instant) -> Then {
        self.dialing.remove(addr);
        let is_seed = self.list.iter().any(|s| s.addr == addr);
        if is_seed && matches!(outcome, Dialed::Connected(_) | Dialed::Rejected(_)) {
            self.heard = true;
        }
        let seeds = self.list.iter_mut().filter(|s| s.addr == addr);
        match outcome {
            Dialed::Connected(name) => {
                self.retry_after.remove(addr);
                for s in seeds {
                    s.name = Some(name.clone());
                }
                Then::Nothing
            }
            Dialed::OnlySelf => {
                // Known from this node's own nonces, not from the wire.
                for s in seeds {
                    s.is_self = true;
                }
                Then::Epoch
            }
            // When this node's own acceptor saw the dial, the address
            // reached is one of its own: dial the name's other addresses
            // (or find it all self) at once. Otherwise whoever answered
            // said so without proof: only a hint, redialed later.
            Dialed::Rejected(RejectReason::SelfDial) => Then::Dial,
            Dialed::Rejected(
                RejectReason::BadCookie | RejectReason::NameTaken | RejectReason::Version,
            ) => {
                self.retry_after
                    .insert(addr.to_string(), now + REFUSED_REDIAL);
                Then::Nothing
            }
            Dialed::Rejected(RejectReason::Duplicate) => Then::Nothing,
            Dialed::Failed(why) => {
                if is_seed {
                    self.last_failure = Some(why);
                    Then::Resolve
                } else {
                    Then::Nothing
                }
            }
        }
    }

    /// The seed names resolved to `now`: addresses no longer among them
    /// stop being seeds, new ones become seeds. Returns (added, vanished).
    fn update(&mut self, now: Vec<String>) -> (usize, usize) {
        let before = self.list.len();
        self.list.retain(|s| now.contains(&s.addr));
        let vanished = before - self.list.len();
        let mut added = 0;
        for addr in now {
            if !self.list.iter().any(|s| s.addr == addr) {
                self.list.push(Seed {
                    addr,
                    name: None,
                    is_self: false,
                });
                added += 1;
            }
        }
        (added, vanished)
    }
}

/// Every address the configured seeds stand for: an `ip:port` as it is, a
/// `name:port` as every address the name resolves to now (a Kubernetes
/// headless Service, a Compose service name, Consul DNS), or the name
/// itself when it resolves to nothing yet (dialing it resolves it again).
pub(super) async fn seed_addresses(configured: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for seed in configured.iter().filter(|s| !s.is_empty()) {
        let resolved: Vec<String> = if seed.parse::<SocketAddr>().is_ok() {
            vec![seed.clone()]
        } else {
            match tokio::net::lookup_host(seed.as_str()).await {
                Ok(addrs) => addrs.map(|a| a.to_string()).collect(),
                Err(e) => {
                    debug!(seed = %seed, error = %e, "seed name does not resolve now");
                    Vec::new()
                }
            }
        };
        let resolved = if resolved.is_empty() {
            vec![seed.clone()]
        } else {
            resolved
        };
        for addr in resolved {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

/// Whether any seed is a name (so worth resolving again).
pub(super) fn have_names(configured: &[String]) -> bool {
    configured
        .iter()
        .any(|s| !s.is_empty() && s.parse::<SocketAddr>().is_err())
}

impl Node {
    /// Dials every target every redial interval, and at once when kicked.
    pub(super) async fn dial_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = sleep(self.settings.redial) => {}
                _ = self.kick.notified() => {}
            }
            let targets = {
                let mut sh = self.lock();
                let sh = &mut *sh;
                sh.seeds.targets(&mut sh.state, Instant::now())
            };
            for addr in targets {
                let node = self.clone();
                tokio::spawn(async move {
                    let limit = handshake_timeout(&node.settings);
                    let outcome = timeout(limit, node.clone().dial(addr.clone()))
                        .await
                        .unwrap_or_else(|_| {
                            Dialed::Failed(Error::backend(
                                BackendErrorKind::Unreachable,
                                format!(
                                    "{addr} did not finish the handshake within {}",
                                    show(limit)
                                ),
                            ))
                        });
                    node.dialed(&addr, outcome);
                });
            }
        }
    }

    fn dialed(&self, addr: &str, outcome: Dialed) {
        let then = self.lock().seeds.dialed(addr, outcome, Instant::now());
        self.bump_dials();
        match then {
            Then::Nothing => {}
            Then::Epoch => self.bump_epoch(),
            Then::Dial => self.kick.notify_one(),
            Then::Resolve => self.resolve_now.notify_one(),
        }
    }

    /// Resolves the seed names again every [`RESOLVE_EVERY`] and after a
    /// failed dial: a new address becomes a seed and is dialed at once; a
    /// vanished one stops being a seed (its member, if any, is forgotten
    /// once its connection is gone, as any member that is not a seed).
    pub(super) async fn resolve_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = sleep(RESOLVE_EVERY) => {}
                _ = self.resolve_now.notified() => {
                    // Many failed dials resolve once, and a dead seed
                    // redialed every 100 ms asks DNS at most once a second.
                    sleep(self.settings.redial.max(RESOLVE_AFTER_FAILURE)).await;
                }
            }
            let now = seed_addresses(&self.settings.seeds).await;
            let (added, vanished) = self.lock().seeds.update(now);
            if added + vanished > 0 {
                info!(node = %self.name, added, vanished, "seed names resolved to other addresses");
                self.kick.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cluster::state::ConnId;
    use crate::backend::cluster::wire::{MemberInfo, Msg, SYNC_CHUNK};

    const A: &str = "10.0.0.1:7400";
    const B: &str = "10.0.0.2:7400";

    fn seeds() -> Seeds {
        Seeds::new(vec![A.to_string(), B.to_string()])
    }

    fn failed() -> Dialed {
        Dialed::Failed(Error::backend(
            BackendErrorKind::Unreachable,
            "cannot connect to 10.0.0.1:7400: connection refused",
        ))
    }

    /// Connects member `name` at `addr` and delivers its `Sync`, naming
    /// `members`.
    fn up(state: &mut State, name: &str, addr: &str, members: Vec<MemberInfo>) -> ConnId {
        let info = MemberInfo {
            name: Arc::from(name),
            incarnation: 1,
            addr: Some(addr.to_string()),
        };
        let (conn, _) = state.adopt(&info, true, SYNC_CHUNK).unwrap();
        let sync = Msg::Sync {
            ready: true,
            members,
            holdings: vec![],
            profile: None,
        };
        let _ = state.on_frame(&info.name, conn, sync, 0);
        conn
    }

    #[test]
    fn every_seed_is_dialed_once_at_a_time_and_again_after_a_failure() {
        let (mut seeds, mut state) = (seeds(), State::new(Arc::from("me")));
        let now = Instant::now();
        assert_eq!(seeds.targets(&mut state, now), [A, B]);
        assert!(seeds.targets(&mut state, now).is_empty(), "both in flight");
        // A failed seed is dialed again, and its names resolved again.
        assert_eq!(seeds.dialed(A, failed(), now), Then::Resolve);
        assert_eq!(seeds.targets(&mut state, now), [A]);
        // A failure at an address that is no seed resolves nothing.
        assert_eq!(seeds.dialed("10.9.9.9:1", failed(), now), Then::Nothing);
    }

    #[test]
    fn a_refusal_holds_the_address_back_for_a_while() {
        let (mut seeds, mut state) = (seeds(), State::new(Arc::from("me")));
        let now = Instant::now();
        let _ = seeds.targets(&mut state, now);
        let refused = Dialed::Rejected(RejectReason::BadCookie);
        assert_eq!(seeds.dialed(A, refused, now), Then::Nothing);
        assert!(
            seeds
                .targets(&mut state, now + Duration::from_secs(1))
                .is_empty()
        );
        assert_eq!(
            seeds.targets(&mut state, now + REFUSED_REDIAL + Duration::from_millis(1)),
            [A]
        );
        // An unproven "that is you" asks for another dial at once, and the
        // address stays a seed.
        let _ = seeds.dialed(A, Dialed::Rejected(RejectReason::SelfDial), now);
        assert!(!seeds.all_self());
        assert_eq!(
            seeds.dialed(B, Dialed::Rejected(RejectReason::SelfDial), now),
            Then::Dial
        );
    }

    #[test]
    fn this_nodes_own_address_is_never_dialed_again() {
        let mut seeds = Seeds::new(vec![A.to_string()]);
        let mut state = State::new(Arc::from("me"));
        let now = Instant::now();
        let _ = seeds.targets(&mut state, now);
        assert!(!seeds.all_self());
        assert_eq!(seeds.dialed(A, Dialed::OnlySelf, now), Then::Epoch);
        assert!(seeds.all_self());
        assert!(seeds.targets(&mut state, now).is_empty());
        assert!(seeds.joined(&state), "alone, with only itself as seed");
    }

    #[test]
    fn members_up_are_not_dialed_and_members_down_are() {
        let (mut seeds, mut state) = (seeds(), State::new(Arc::from("me")));
        let now = Instant::now();
        let _ = seeds.targets(&mut state, now);
        let c = MemberInfo {
            name: Arc::from("c"),
            incarnation: 1,
            addr: Some("10.0.0.3:7400".into()),
        };
        let conn = up(&mut state, "a", A, vec![c]);
        assert_eq!(
            seeds.dialed(A, Dialed::Connected(Arc::from("a")), now),
            Then::Nothing
        );
        // "c", learned from "a", is dialed; "a" is up; B is still in flight.
        assert_eq!(seeds.targets(&mut state, now), ["10.0.0.3:7400"]);
        assert!(!seeds.joined(&state), "c and B are not connected yet");
        // "a" goes down: dialed again at the address it has.
        let _ = state.conn_closed(&Arc::from("a"), conn);
        assert_eq!(seeds.targets(&mut state, now), [A]);
    }

    #[test]
    fn members_down_for_long_are_forgotten_unless_they_are_seeds() {
        let (mut seeds, mut state) = (seeds(), State::new(Arc::from("me")));
        let a = up(&mut state, "a", A, vec![]);
        let c = up(&mut state, "c", "10.0.0.3:7400", vec![]);
        let _ = state.conn_closed(&Arc::from("a"), a);
        let _ = state.conn_closed(&Arc::from("c"), c);
        let later = Instant::now() + FORGET_AFTER + Duration::from_secs(1);
        let _ = seeds.targets(&mut state, later);
        assert!(state.peer("a").is_some(), "a seed is kept");
        assert!(state.peer("c").is_none(), "c is forgotten");
    }

    #[test]
    fn joined_means_every_seed_and_every_member_synced() {
        let (seeds, mut state) = (seeds(), State::new(Arc::from("me")));
        assert!(!seeds.joined(&state));
        up(&mut state, "a", A, vec![]);
        assert!(!seeds.joined(&state), "B is missing");
        up(&mut state, "b", B, vec![]);
        assert!(seeds.joined(&state));
    }

    #[test]
    fn resolving_again_adds_and_drops_seed_addresses() {
        let mut seeds = seeds();
        assert_eq!(
            seeds.update(vec![B.to_string(), "10.0.0.4:7400".into()]),
            (1, 1)
        );
        assert_eq!(
            seeds.update(vec![B.to_string(), "10.0.0.4:7400".into()]),
            (0, 0)
        );
        let mut state = State::new(Arc::from("me"));
        assert_eq!(
            seeds.targets(&mut state, Instant::now()),
            [B, "10.0.0.4:7400"]
        );
    }

    #[test]
    fn only_names_are_resolved_again() {
        assert!(!have_names(&[
            A.to_string(),
            "[::1]:7400".into(),
            String::new()
        ]));
        assert!(have_names(&[A.to_string(), "cluster.test:7400".into()]));
    }

    #[test]
    fn a_seed_that_answers_is_heard_even_when_it_refuses() {
        let now = Instant::now();
        let mut seeds = seeds();
        assert!(!seeds.heard());
        let _ = seeds.dialed(A, failed(), now);
        let _ = seeds.dialed("10.9.9.9:1", Dialed::Rejected(RejectReason::BadCookie), now);
        assert!(!seeds.heard(), "a failure, and a refusal from no seed");
        let last = seeds.take_failure().expect("the seed's failure is kept");
        assert!(last.to_string().contains("connection refused"), "{last}");
        assert!(seeds.take_failure().is_none(), "taken once");
        let _ = seeds.dialed(B, Dialed::Rejected(RejectReason::BadCookie), now);
        assert!(seeds.heard(), "a refusal proves the seed is up");
        let mut seeds = self::seeds();
        let _ = seeds.dialed(A, Dialed::Connected(Arc::from("a")), now);
        assert!(seeds.heard());
        assert!(!seeds.has_self());
        let _ = seeds.dialed(B, Dialed::OnlySelf, now);
        assert!(seeds.has_self());
    }
}
