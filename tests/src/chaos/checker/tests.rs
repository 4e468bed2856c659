//! The checker's rules, each on a hand-made history that breaks it (and
//! one that keeps it).

use super::*;
use crate::chaos::history::{Exit, Fault, FenceWrite};
use crate::process::{Event, EventKind};

const MS: u128 = 1_000_000;

fn ev(kind: EventKind, at_ms: u128, node: &str, token: u64, reason: Option<&str>) -> Event {
    Event {
        kind,
        at_nanos: at_ms * MS,
        node: node.into(),
        id: "x".into(),
        token,
        reason: reason.map(str::to_string),
    }
}

fn start(at: u128, node: &str, token: u64) -> Event {
    ev(EventKind::Start, at, node, token, None)
}

fn stop(at: u128, node: &str, token: u64, reason: &str) -> Event {
    ev(EventKind::Stop, at, node, token, Some(reason))
}

fn fault(kind: FaultKind, node: &str, at: u128, until: u128) -> Fault {
    Fault::new(kind, Some(node), at * MS, until * MS)
}

fn bounds() -> Bounds {
    Bounds {
        clock_error: Duration::from_millis(1),
        failover: FaultKind::ALL
            .into_iter()
            .map(|k| (k, Duration::from_millis(500)))
            .collect(),
        heal: Duration::from_millis(300),
        wake_grace: Duration::from_millis(200),
        handoff: Duration::from_millis(100),
    }
}

fn history(events: Vec<Event>, faults: Vec<Fault>, end: u128) -> History {
    History {
        ids: vec!["x".into()],
        events,
        faults,
        writes: vec![],
        shutdown_at: end * MS,
        end: end * MS,
        exits: vec![],
    }
}

/// `h` checked against the CP promises and [`bounds`].
fn cp(h: &History) -> Verdict {
    check(h, Model::Cp, &bounds())
}

/// `h` checked against the AP promises and [`bounds`].
fn ap(h: &History) -> Verdict {
    check(h, Model::Ap, &bounds())
}

fn rules(v: &Verdict) -> Vec<&'static str> {
    v.violations.iter().map(|v| v.rule).collect()
}

/// A clean kill-and-take-over passes both models.
#[test]
fn a_clean_failover_passes() {
    let h = history(
        vec![
            start(0, "a", 1),
            start(120, "b", 2),
            stop(1000, "b", 2, "node_shutdown"),
        ],
        vec![fault(FaultKind::Kill, "a", 100, 300)],
        1000,
    );
    for model in [Model::Cp, Model::Ap] {
        let v = check(&h, model, &bounds());
        assert!(v.passed(), "{:?}", v.violations);
        assert_eq!(v.gaps.len(), 1);
        assert_eq!(v.gaps[0].fault, Some(FaultKind::Kill));
    }
}

#[test]
fn cp_overlap_is_caught_and_names_both_tenures() {
    let h = history(
        vec![
            start(0, "a", 1),
            start(100, "b", 2),
            stop(150, "a", 1, "lease_lost"),
            stop(1000, "b", 2, "node_shutdown"),
        ],
        vec![],
        1000,
    );
    let v = cp(&h);
    assert_eq!(rules(&v), vec!["overlap"]);
    assert!(v.violations[0].detail.contains("x on a token 1"));
    assert!(v.violations[0].detail.contains("x on b token 2"));
}

#[test]
fn cp_tokens_must_grow_with_start() {
    let h = history(
        vec![
            start(0, "a", 5),
            stop(100, "a", 5, "node_shutdown"),
            start(101, "b", 3),
            stop(1000, "b", 3, "node_shutdown"),
        ],
        vec![fault(FaultKind::Restart, "a", 99, 200)],
        1000,
    );
    assert_eq!(rules(&cp(&h)), vec!["token-order"]);
    // AP does not order tokens across a split.
    assert!(ap(&h).passed());
}

#[test]
fn cp_paused_holder_that_stops_on_wake_is_excused_one_that_runs_on_is_not() {
    let events = |stop_at| {
        vec![
            start(0, "a", 1),
            start(3000, "b", 2),
            stop(stop_at, "a", 1, "lease_lost"),
            stop(6000, "b", 2, "node_shutdown"),
        ]
    };
    let faults = vec![fault(FaultKind::Pause, "a", 100, 4000)];
    let ok = cp(&history(events(4010), faults.clone(), 6000));
    assert!(ok.passed(), "{:?}", ok.violations);
    assert_eq!(ok.excused_overlaps, 1);
    let bad = cp(&history(events(4500), faults, 6000));
    assert_eq!(rules(&bad), vec!["overlap"]);
}

#[test]
fn cp_stale_fenced_write_accepted_is_caught() {
    let mut h = history(
        vec![
            start(0, "a", 1),
            stop(100, "a", 1, "lease_lost"),
            start(110, "b", 2),
            stop(1000, "b", 2, "node_shutdown"),
        ],
        vec![fault(FaultKind::Partition, "a", 50, 500)],
        1000,
    );
    let write = |at: u128, token, node: &str, accepted| FenceWrite {
        at: at * MS,
        id: "x".into(),
        token,
        node: node.into(),
        accepted,
    };
    h.writes = vec![
        write(10, 1, "a", true),
        write(109, 2, "b", true),
        write(130, 1, "a", false),
    ];
    let v = cp(&h);
    assert!(v.passed(), "{:?}", v.violations);
    assert_eq!((v.writes_accepted, v.writes_rejected), (2, 1));
    h.writes.push(write(140, 1, "a", true));
    assert_eq!(rules(&cp(&h)), vec!["stale-write"]);
}

#[test]
fn ap_overlap_needs_a_partition_a_quick_heal_and_a_conflict() {
    let events = |stop_at, reason: &str| {
        vec![
            start(0, "a", 1),
            start(200, "b", 2),
            stop(stop_at, "b", 2, reason),
            stop(2000, "a", 1, "node_shutdown"),
        ]
    };
    let split = vec![fault(FaultKind::Partition, "a", 100, 1000)];
    let ok = ap(&history(events(1100, "conflict"), split.clone(), 2000));
    assert!(ok.passed(), "{:?}", ok.violations);
    assert_eq!(ok.excused_overlaps, 1);
    // Too long after the heal.
    let slow = ap(&history(events(1500, "conflict"), split.clone(), 2000));
    assert_eq!(rules(&slow), vec!["overlap"]);
    // The loser did not see a conflict.
    let reason = ap(&history(events(1100, "lease_lost"), split, 2000));
    assert_eq!(rules(&reason), vec!["overlap"]);
    // No split at all.
    let none = ap(&history(events(1100, "conflict"), vec![], 2000));
    assert_eq!(rules(&none), vec!["overlap"]);
}

#[test]
fn an_unexplained_or_too_long_gap_is_caught() {
    let events = vec![
        start(0, "a", 1),
        stop(100, "a", 1, "lease_lost"),
        start(2000, "b", 2),
        stop(3000, "b", 2, "node_shutdown"),
    ];
    let none = cp(&history(events.clone(), vec![], 3000));
    assert_eq!(rules(&none), vec!["unowned"]);
    let slow = cp(&history(
        events,
        vec![fault(FaultKind::Kill, "a", 90, 300)],
        3000,
    ));
    assert_eq!(rules(&slow), vec!["unowned"]);
    assert!(slow.violations[0].detail.contains("after a kill of a"));
}

#[test]
fn unclean_shutdown_and_open_tenures_are_caught() {
    let mut h = history(vec![start(0, "a", 1)], vec![], 1000);
    h.exits = vec![Exit {
        node: "a".into(),
        problem: Some("exit status 101".into()),
    }];
    let mut found = rules(&ap(&h));
    found.sort();
    assert_eq!(found, vec!["left-running", "unclean-shutdown"]);
}

fn with_id(mut e: Event, id: &str) -> Event {
    e.id = id.into();
    e
}

fn drain(node: &str, at: u128, drained: Option<u128>, until: u128) -> Fault {
    let mut f = fault(FaultKind::Drain, node, at, until);
    f.drained = drained.map(|d| d * MS);
    f
}

#[test]
fn a_moved_id_must_run_elsewhere_within_the_handoff_bound() {
    let h = |events| history(events, vec![], 1000);
    let ok = h(vec![
        start(0, "a", 1),
        stop(100, "a", 1, "moved"),
        start(150, "b", 2),
        stop(1000, "b", 2, "node_shutdown"),
    ]);
    let v = cp(&ok);
    assert!(v.passed(), "{:?}", v.violations);
    assert!(v.gaps[0].handoff, "{:?}", v.gaps);
    // Too slow: 200 ms, bound 100 ms (and no fault needed to blame).
    let slow = h(vec![
        start(0, "a", 1),
        stop(100, "a", 1, "moved"),
        start(300, "b", 2),
        stop(1000, "b", 2, "node_shutdown"),
    ]);
    for model in [Model::Cp, Model::Ap] {
        assert_eq!(rules(&check(&slow, model, &bounds())), vec!["handoff"]);
    }
    // Back on the node it moved from.
    let back = h(vec![
        start(0, "a", 1),
        stop(100, "a", 1, "moved"),
        start(150, "a", 2),
        stop(1000, "a", 2, "node_shutdown"),
    ]);
    assert_eq!(rules(&cp(&back)), vec!["handoff"]);
    // Never again.
    let never = h(vec![start(0, "a", 1), stop(100, "a", 1, "moved")]);
    assert_eq!(rules(&ap(&never)), vec!["handoff"]);
}

#[test]
fn a_move_excuses_no_overlap_cp_never_ap_only_a_split_ended_by_conflict() {
    // The next holder began before the mover had stopped.
    let early = history(
        vec![
            start(0, "a", 1),
            start(90, "b", 2),
            stop(100, "a", 1, "moved"),
            stop(1000, "b", 2, "node_shutdown"),
        ],
        vec![fault(FaultKind::Join, "b", 50, 60)],
        1000,
    );
    for model in [Model::Cp, Model::Ap] {
        assert_eq!(rules(&check(&early, model, &bounds())), vec!["overlap"]);
    }
    // AP, during a split: the loser stopped with `moved`, not `conflict`.
    let split = history(
        vec![
            start(0, "a", 1),
            start(200, "b", 2),
            stop(1100, "b", 2, "moved"),
            stop(2000, "a", 1, "node_shutdown"),
        ],
        vec![fault(FaultKind::Partition, "a", 100, 1000)],
        2000,
    );
    assert_eq!(rules(&ap(&split)), vec!["overlap"]);
}

#[test]
fn a_drained_node_hands_everything_over_and_holds_nothing_until_resumed() {
    let base = vec![
        start(0, "a", 1),
        stop(140, "a", 1, "moved"),
        start(160, "b", 2),
        stop(2000, "b", 2, "node_shutdown"),
    ];
    let ok = cp(&history(
        base.clone(),
        vec![drain("a", 100, Some(150), 1000)],
        2000,
    ));
    assert!(ok.passed(), "{:?}", ok.violations);
    // It never got empty.
    let never = cp(&history(
        base.clone(),
        vec![drain("a", 100, None, 1000)],
        2000,
    ));
    assert_eq!(rules(&never), vec!["drain"]);
    // Its instance ran on past the moment it was said to be empty.
    let late = history(
        vec![
            start(0, "a", 1),
            stop(300, "a", 1, "moved"),
            start(320, "b", 2),
            stop(2000, "b", 2, "node_shutdown"),
        ],
        vec![drain("a", 100, Some(150), 1000)],
        2000,
    );
    assert_eq!(rules(&cp(&late)), vec!["drain"]);
    // Stopped for another reason than a handoff.
    let mut reason = base.clone();
    reason[1] = stop(140, "a", 1, "lease_lost");
    let reason = history(reason, vec![drain("a", 100, Some(150), 1000)], 2000);
    assert_eq!(rules(&ap(&reason)), vec!["drain"]);
    // Began another id's tenure while drained.
    let mut began = base;
    began.push(with_id(start(500, "a", 3), "y"));
    began.push(with_id(stop(2000, "a", 3, "node_shutdown"), "y"));
    let began = history(began, vec![drain("a", 100, Some(150), 1000)], 2000);
    assert_eq!(rules(&cp(&began)), vec!["drain"]);
}

#[test]
fn a_node_that_left_stopped_gracefully_never_returns_and_its_ids_run_elsewhere() {
    let leave = || vec![fault(FaultKind::Leave, "a", 90, 150)];
    let events = |stop_at, next_at| {
        vec![
            start(0, "a", 1),
            stop(stop_at, "a", 1, "node_shutdown"),
            start(next_at, "b", 2),
            stop(2000, "b", 2, "node_shutdown"),
        ]
    };
    let ok = cp(&history(events(100, 110), leave(), 2000));
    assert!(ok.passed(), "{:?}", ok.violations);
    // Back under its name.
    let mut back = events(100, 110);
    back.push(with_id(start(500, "a", 5), "y"));
    back.push(with_id(stop(2000, "a", 5, "node_shutdown"), "y"));
    let back = ap(&history(back, leave(), 2000));
    assert_eq!(rules(&back), vec!["leave"]);
    // Its instance stopped after the process had exited.
    let after = cp(&history(events(200, 210), leave(), 2000));
    assert_eq!(rules(&after), vec!["leave"]);
    // Its id ran elsewhere too late: past the exit + the allowance.
    let slow = cp(&history(events(100, 800), leave(), 2000));
    assert_eq!(rules(&slow), vec!["unowned"]);
    assert!(slow.violations[0].detail.contains("after a leave of a"));
}

#[test]
fn a_join_takes_a_new_name_and_moves_each_id_at_most_once() {
    // Rebalancing after the join moves x twice (a to b, b to c) with no
    // change of members in between.
    let events = vec![
        start(0, "a", 1),
        stop(200, "a", 1, "moved"),
        start(210, "b", 2),
        stop(400, "b", 2, "moved"),
        start(410, "c", 3),
        stop(2000, "c", 3, "node_shutdown"),
    ];
    let join_c = fault(FaultKind::Join, "c", 100, 110);
    let twice = cp(&history(events.clone(), vec![join_c.clone()], 2000));
    assert_eq!(rules(&twice), vec!["moved-twice"]);
    // Two joins, one move after each: fine.
    let two_joins = vec![join_c, fault(FaultKind::Join, "d", 300, 310)];
    let ok = cp(&history(events, two_joins, 2000));
    assert!(ok.passed(), "{:?}", ok.violations);
    // A join under a name that already ran.
    let reused = history(
        vec![
            start(0, "c", 1),
            stop(100, "c", 1, "node_shutdown"),
            start(120, "a", 2),
            stop(2000, "a", 2, "node_shutdown"),
        ],
        vec![
            fault(FaultKind::Leave, "c", 90, 130),
            fault(FaultKind::Join, "c", 500, 510),
        ],
        2000,
    );
    assert_eq!(rules(&ap(&reused)), vec!["join"]);
    // Nothing runs twice after a join on CP.
    let twice_running = history(
        vec![
            start(0, "a", 1),
            start(300, "c", 2),
            stop(1000, "a", 1, "node_shutdown"),
            stop(1000, "c", 2, "node_shutdown"),
        ],
        vec![fault(FaultKind::Join, "c", 100, 110)],
        1000,
    );
    assert_eq!(rules(&cp(&twice_running)), vec!["overlap"]);
}
