//! The transactions the backend sends, as plain values: a claim, a
//! release, a release in favour of a node and that node's claim (each one
//! nested transaction of a batch), and the operations they are made of.
//!
//! A claim is refused while the id's key exists or the id is reserved; the
//! node a reservation names takes the id only through that very reservation
//! (compared by its mod revision), deleting it in the same step. So at any
//! revision at most one key of the id exists, and a reservation never
//! coexists with a tenure it did not give way to.

use super::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, compare,
    request_op,
};

pub(super) fn one_op(request: request_op::Request) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

/// `if create_revision(key) == revision`.
pub(super) fn created_at(key: &[u8], revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(revision)),
        ..Compare::default()
    }
}

/// `if mod_revision(key) == revision`.
pub(super) fn modified_at(key: &[u8], revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::ModRevision(revision)),
        ..Compare::default()
    }
}

pub(super) fn get(key: &[u8]) -> RequestOp {
    one_op(request_op::Request::RequestRange(RangeRequest {
        key: key.to_vec(),
        ..RangeRequest::default()
    }))
}

pub(super) fn put(key: &[u8], value: &[u8], lease: i64) -> RequestOp {
    one_op(request_op::Request::RequestPut(PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
        ..PutRequest::default()
    }))
}

pub(super) fn delete(key: &[u8]) -> RequestOp {
    delete_range(key, &[])
}

/// Deletes `key`, or every key from `key` up to `end` when `end` is not
/// empty.
pub(super) fn delete_range(key: &[u8], end: &[u8]) -> RequestOp {
    one_op(request_op::Request::RequestDeleteRange(
        DeleteRangeRequest {
            key: key.to_vec(),
            range_end: end.to_vec(),
            ..DeleteRangeRequest::default()
        },
    ))
}

/// A nested transaction, as one operation of the outer one.
pub(super) fn op_txn(txn: TxnRequest) -> RequestOp {
    one_op(request_op::Request::RequestTxn(txn))
}

/// `if create_revision(key) == token then delete(key)`.
pub(super) fn delete_if_created_at(key: &[u8], token: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(key, token)],
        success: vec![delete(key)],
        failure: Vec::new(),
    }
}

/// `if create_revision(key) == token then put(reserved, target, lease),
/// delete(key)`: the release of `release_to`. Both happen at one revision;
/// the put comes first so that watchers see the reservation before the
/// deletion that wakes the waiting target.
pub(super) fn release_to_txn(
    key: &[u8],
    token: i64,
    reserved: &[u8],
    target: &str,
    lease: i64,
) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(key, token)],
        success: vec![put(reserved, target.as_bytes(), lease), delete(key)],
        failure: Vec::new(),
    }
}

/// `if create_revision(key) == 0 and create_revision(reserved) == 0 then
/// put(key, node, lease) else get(key), get(reserved)`: a claim, refused
/// while the id is held or reserved.
pub(super) fn claim_txn(key: &[u8], reserved: &[u8], node: &str, lease: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(key, 0), created_at(reserved, 0)],
        success: vec![put(key, node.as_bytes(), lease)],
        failure: vec![get(key), get(reserved)],
    }
}

/// `if create_revision(key) == 0 and mod_revision(reserved) == reserved_at
/// then put(key, node, lease), delete(reserved) else get(key),
/// get(reserved)`: the claim of the node a reservation names.
pub(super) fn take_txn(
    key: &[u8],
    reserved: &[u8],
    node: &str,
    lease: i64,
    reserved_at: i64,
) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(key, 0), modified_at(reserved, reserved_at)],
        success: vec![put(key, node.as_bytes(), lease), delete(reserved)],
        failure: vec![get(key), get(reserved)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compared(txn: &TxnRequest) -> Vec<(&[u8], Option<&compare::TargetUnion>)> {
        txn.compare
            .iter()
            .map(|c| (c.key.as_slice(), c.target_union.as_ref()))
            .collect()
    }

    #[test]
    fn a_release_to_deletes_our_tenure_and_reserves_in_one_step() {
        let txn = release_to_txn(b"/ns/a", 40, b"/ns/~r/a", "node-2", 9);
        assert_eq!(
            compared(&txn),
            [(
                &b"/ns/a"[..],
                Some(&compare::TargetUnion::CreateRevision(40))
            )]
        );
        // The reservation first: a watcher sees it before the deletion
        // that wakes the target.
        assert_eq!(
            txn.success,
            [put(b"/ns/~r/a", b"node-2", 9), delete(b"/ns/a")]
        );
        assert!(txn.failure.is_empty(), "not our tenure: nothing happens");
    }

    #[test]
    fn only_the_reservation_named_lets_its_node_take_the_id() {
        let txn = take_txn(b"/ns/a", b"/ns/~r/a", "node-2", 7, 55);
        assert_eq!(
            compared(&txn),
            [
                (
                    &b"/ns/a"[..],
                    Some(&compare::TargetUnion::CreateRevision(0))
                ),
                (
                    &b"/ns/~r/a"[..],
                    Some(&compare::TargetUnion::ModRevision(55))
                ),
            ]
        );
        assert_eq!(
            txn.success,
            [put(b"/ns/a", b"node-2", 7), delete(b"/ns/~r/a")]
        );
        assert_eq!(txn.failure, [get(b"/ns/a"), get(b"/ns/~r/a")]);
    }

    #[test]
    fn every_nested_transaction_fits_two_operations() {
        // What MAX_OPS_PER_TXN (126) leaves each nested transaction.
        for txn in [
            claim_txn(b"k", b"r", "n", 1),
            take_txn(b"k", b"r", "n", 1, 2),
            release_to_txn(b"k", 3, b"r", "n", 1),
            delete_if_created_at(b"k", 3),
        ] {
            let ops = txn
                .compare
                .len()
                .max(txn.success.len())
                .max(txn.failure.len());
            assert!(ops <= 2, "{txn:?}");
        }
    }
}
