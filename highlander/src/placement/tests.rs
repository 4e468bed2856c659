//! Pinned vectors and properties of the placement functions.

use std::collections::HashMap;

use super::*;

fn nodes(names: &[&str]) -> Vec<Candidate> {
    names.iter().map(|n| Candidate::new(*n, 1)).collect()
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tenant/{i}")).collect()
}

fn owners(ids: &[String], candidates: &[Candidate]) -> Vec<String> {
    let none = Affinity::default();
    ids.iter()
        .map(|id| place(id, &none, candidates).unwrap().name().to_string())
        .collect()
}

fn shares(owners: &[String]) -> HashMap<String, usize> {
    let mut shares = HashMap::new();
    for o in owners {
        *shares.entry(o.clone()).or_default() += 1;
    }
    shares
}

/// The hash, the logarithm and the ranking are pinned: a change to any
/// of them moves ids between nodes of a running cluster with mixed
/// versions, so these values must never change.
#[test]
fn pinned_vectors() {
    assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    assert_eq!(hash("invoice-sweeper", "node-a"), 0x1b54_5002_9dff_f1d0);
    assert_eq!(hash("invoice-sweeper", "node-b"), 0x47f8_c8ad_ad20_3364);
    assert_eq!(hash("tenant/42", "node-a"), 0x727b_77d9_28bb_a6be);
    assert_eq!(hash("", ""), 0x4f2d_b50f_1240_40cd);
    let abc = nodes(&["node-a", "node-b", "node-c"]);
    let none = Affinity::default();
    let order =
        |id: &str| -> Vec<&str> { rank(id, &none, &abc).iter().map(|c| c.name()).collect() };
    assert_eq!(order("invoice-sweeper"), ["node-c", "node-b", "node-a"]);
    assert_eq!(order("tenant/42"), ["node-b", "node-c", "node-a"]);
    assert_eq!(order("mailer"), ["node-c", "node-a", "node-b"]);
    let weighted = [
        Candidate::new("a", 3),
        Candidate::new("b", 1),
        Candidate::new("c", 2),
    ];
    let placed: Vec<&str> = (0..12)
        .map(|i| place(&format!("id-{i}"), &none, &weighted).unwrap().name())
        .collect();
    assert_eq!(
        placed,
        ["c", "a", "a", "a", "a", "c", "b", "c", "c", "c", "c", "a"]
    );
}

#[test]
fn logarithm_matches_std() {
    let mut x = 1.0f64;
    while x > 1e-17 {
        for f in [
            1.0,
            0.999_999,
            0.75,
            std::f64::consts::FRAC_1_SQRT_2,
            0.500_000_1,
            0.3,
            0.123,
        ] {
            let v = x * f;
            let ours = ln(v);
            let std = v.ln();
            let err = (ours - std).abs() / std.abs().max(1e-300);
            assert!(
                err < 1e-14 || (ours - std).abs() < 1e-15,
                "ln({v}) = {ours}, std {std}"
            );
        }
        x *= 0.37;
    }
    assert_eq!(ln(1.0), 0.0);
    assert!(
        unit(u64::MAX) < 1.0 && ln(unit(u64::MAX)) < 0.0,
        "u < 1 strictly"
    );
    assert!(unit(0) > 0.0 && ln(unit(0)).is_finite());
}

#[test]
fn three_equal_nodes_share_evenly() {
    let ids = ids(10_000);
    let shares = shares(&owners(&ids, &nodes(&["node-a", "node-b", "node-c"])));
    assert_eq!(shares.len(), 3, "{shares:?}");
    let largest = *shares.values().max().unwrap();
    assert!(
        largest <= 3_600,
        "largest share {largest} of 10,000: {shares:?}"
    );
}

#[test]
fn a_fourth_node_takes_only_its_share() {
    let ids = ids(10_000);
    let three = nodes(&["node-a", "node-b", "node-c"]);
    let four = nodes(&["node-a", "node-b", "node-c", "node-d"]);
    let before = owners(&ids, &three);
    let after = owners(&ids, &four);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            assert_eq!(a, "node-d", "an id moved between old nodes");
            moved += 1;
        }
    }
    // The minimum is a quarter; allow 1.2 times it.
    assert!(moved <= 3_000, "moved {moved} of 10,000");
    assert!(
        moved >= 2_000,
        "moved {moved} of 10,000: the new node is not carrying its share"
    );
}

#[test]
fn a_leaving_node_gives_away_only_its_ids() {
    let ids = ids(10_000);
    let four = nodes(&["node-a", "node-b", "node-c", "node-d"]);
    let three = nodes(&["node-a", "node-c", "node-d"]);
    let before = owners(&ids, &four);
    let after = owners(&ids, &three);
    let mut orphans = Vec::new();
    for (b, a) in before.iter().zip(&after) {
        if b == "node-b" {
            orphans.push(a.clone());
        } else {
            assert_eq!(a, b, "an id of a remaining node moved");
        }
    }
    // The leaver's ids spread over the others.
    let spread = shares(&orphans);
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(
        spread.values().all(|&n| n > orphans.len() / 5),
        "{spread:?}"
    );
}

#[test]
fn weights_two_to_one() {
    let ids = ids(10_000);
    let weighted = [Candidate::new("big", 2), Candidate::new("small", 1)];
    let shares = shares(&owners(&ids, &weighted));
    let (big, small) = (shares["big"] as f64, shares["small"] as f64);
    let ratio = big / small;
    assert!((1.8..=2.2).contains(&ratio), "{shares:?}");
}

#[test]
fn weight_zero_only_when_nobody_else() {
    let ids = ids(2_000);
    let mixed = [
        Candidate::new("spare", 0),
        Candidate::new("a", 1),
        Candidate::new("b", 5),
    ];
    let split = shares(&owners(&ids, &mixed));
    assert!(!split.contains_key("spare"), "{split:?}");
    let none = Affinity::default();
    for id in &ids[..50] {
        assert_eq!(rank(id, &none, &mixed)[2].name(), "spare");
    }
    // Alone, or among other weight-0 nodes, it runs ids.
    let zeros = [Candidate::new("spare", 0), Candidate::new("spare-2", 0)];
    let split = shares(&owners(&ids, &zeros));
    assert_eq!(split.len(), 2, "{split:?}");
    // Even an avoided node of positive weight ranks before weight 0.
    let avoid = Affinity::default().avoid(["a"]);
    let two = [Candidate::new("spare", 0), Candidate::new("a", 1)];
    assert_eq!(place("x", &avoid, &two).unwrap().name(), "a");
}

#[test]
fn prefer_and_avoid() {
    let cands = [
        Candidate::new("node-a", 1).labels(["zone=eu", "ssd"]),
        Candidate::new("node-b", 1).labels(["zone=eu"]),
        Candidate::new("node-c", 1).labels(["zone=us", "ssd"]),
        Candidate::new("node-d", 1).labels(["zone=us"]),
    ];
    let eu = Affinity::default().prefer(["zone=eu"]);
    let by_name = Affinity::default().prefer(["node-d"]);
    let not_ssd = Affinity::default().avoid(["ssd"]);
    let both = Affinity::default().prefer(["zone=eu"]).avoid(["node-a"]);
    for id in ids(500) {
        let r = rank(&id, &eu, &cands);
        let first: Vec<&str> = r[..2].iter().map(|c| c.name()).collect();
        assert!(
            first.iter().all(|n| ["node-a", "node-b"].contains(n)),
            "{first:?}"
        );
        assert_eq!(place(&id, &by_name, &cands).unwrap().name(), "node-d");
        let r = rank(&id, &not_ssd, &cands);
        assert!(r[2..].iter().all(|c| c.matches("ssd")), "{r:?}");
        let r = rank(&id, &both, &cands);
        assert_eq!(r[0].name(), "node-b");
        assert_eq!(r[3].name(), "node-a");
    }
    // Affinity changes the order, never the set: avoided nodes stay.
    let only_avoided = [Candidate::new("node-a", 1)];
    assert_eq!(rank("x", &not_ssd, &only_avoided).len(), 1);
    // Within a tier, the hash decides as without affinity.
    let plain = Affinity::default();
    let eu_only = &cands[..2];
    for id in ids(200) {
        assert_eq!(
            place(&id, &eu, &cands).unwrap().name(),
            place(&id, &plain, eu_only).unwrap().name()
        );
    }
}

#[test]
fn rank_place_and_position_agree() {
    let cands = nodes(&["a", "b", "c", "d", "e"]);
    let none = Affinity::default();
    for id in ids(300) {
        let r = rank(&id, &none, &cands);
        assert_eq!(r.len(), 5);
        assert_eq!(r[0].name(), place(&id, &none, &cands).unwrap().name());
        for (i, c) in r.iter().enumerate() {
            assert_eq!(position(&id, &none, &cands, c.name()), Some(i));
        }
    }
    assert_eq!(position("x", &none, &cands, "zz"), None);
    assert!(place("x", &none, &[]).is_none());
    // Deterministic whatever the order the candidates come in.
    let mut reversed = cands.clone();
    reversed.reverse();
    for id in ids(300) {
        assert_eq!(
            place(&id, &none, &cands).unwrap().name(),
            place(&id, &none, &reversed).unwrap().name()
        );
    }
}

#[test]
fn names_labels_and_affinity_checks() {
    assert!(check_name("node-a").is_ok());
    assert!(check_name("").is_err());
    assert!(check_name("has space").is_err());
    assert!(check_name("nœud").is_err());
    assert!(check_name(&"x".repeat(201)).is_err());
    assert!(check_label("zone=eu").is_ok());
    assert!(check_label("ssd").is_ok());
    assert!(check_label("a,b").is_err());
    assert!(check_label("=eu").is_err());
    assert!(check_label("zone=").is_err());
    assert_eq!(parse_labels(" zone=eu , ssd ").unwrap(), ["zone=eu", "ssd"]);
    assert_eq!(parse_labels("").unwrap(), Vec::<String>::new());
    assert!(
        parse_labels("zone=eu,,ssd")
            .unwrap_err()
            .contains("empty label")
    );
    assert!(parse_labels("ssd,ssd").unwrap_err().contains("twice"));
    assert!(
        parse_labels("zone=")
            .unwrap_err()
            .starts_with("HIGHLANDER_NODE_LABELS: ")
    );
    assert_eq!(parse_weight("3"), Ok(3));
    assert_eq!(parse_weight(" 0 "), Ok(0));
    for bad in ["-1", "1.5", "heavy", "", "4294967296"] {
        let e = parse_weight(bad).unwrap_err();
        assert!(e.starts_with("HIGHLANDER_NODE_WEIGHT: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
    assert!(
        Affinity::default()
            .prefer(["a", "zone=eu"])
            .avoid(["b"])
            .check()
            .is_ok()
    );
    let e = Affinity::default().prefer(["a", "a"]).check().unwrap_err();
    assert!(e.contains("twice"), "{e}");
    let e = Affinity::default()
        .prefer(["a"])
        .avoid(["a"])
        .check()
        .unwrap_err();
    assert!(e.contains("twice"), "{e}");
    let e = Affinity::default().avoid([""]).check().unwrap_err();
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn standing_agrees_with_rank() {
    let nodes: Vec<Candidate> = (0..5)
        .map(|i| Candidate::new(format!("n{i}"), (i % 3) as u32).labels(["zone=eu"]))
        .collect();
    let affinity = Affinity::default().prefer(["n3"]).avoid(["n1"]);
    for id in (0..200).map(|i| format!("id/{i}")) {
        let order = rank(&id, &affinity, &nodes);
        for me in &nodes {
            let others = nodes.iter().filter(|c| c.name() != me.name());
            let (ahead, best) = standing(&id, &affinity, me, others);
            let pos = order.iter().position(|c| c.name() == me.name()).unwrap();
            assert_eq!(ahead, pos, "{id} {me}");
            let first_other = order.iter().find(|c| c.name() != me.name()).unwrap();
            assert_eq!(best.unwrap().name(), first_other.name());
        }
    }
}
