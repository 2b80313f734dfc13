//! The limits a shard applies with are its own state, set by its log
//! (`SetLimits`; in the meta group, a cluster map carrying limits): a change
//! takes effect from the next operation, even inside one apply batch; an
//! older or repeated version changes nothing; invalid values are refused;
//! and the limits survive a restart and travel in snapshots. Before this,
//! a state machine applied with whatever limits its node was configured
//! with, so differently configured replicas diverged.

mod common;

use common::*;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use rim_proto::ErrorCode;
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1::{ClusterLimits, ClusterMap};
use rim_raft_store::{Limits, UserId};

const A: u64 = 101;
const B: u64 = 202;

/// Limits whose content limit is `bytes` (the rest: the defaults).
fn content_limit(bytes: usize) -> Limits {
    Limits { max_content_bytes: bytes, ..Limits::default() }
}

fn set_limits(version: u64, limits: &Limits) -> store::Op {
    set_raw(limits.to_proto(version))
}

fn set_raw(limits: ClusterLimits) -> store::Op {
    op(O::SetLimits(store::SetLimits { limits: Some(limits) }))
}

/// A 1:1 send of `len` bytes from A to B.
fn send_of(cmid: &str, len: usize) -> store::Op {
    send(A, B, cmid, &"x".repeat(len))
}

/// The limits version shard `s` stores (0: none).
fn version(n: &Node, s: u32) -> u64 {
    n.reader(s).limits().unwrap().map_or(0, |l| l.version)
}

#[tokio::test]
async fn set_limits_changes_the_result_of_a_later_entry_of_the_same_batch() {
    let entries = |n: &mut Node| {
        vec![
            n.entry(1, 1, vec![send_of("before", 200)]),
            n.entry(1, 1, vec![set_limits(1, &content_limit(100))]),
            n.entry(1, 1, vec![send_of("after", 200)]),
            // Within one entry too: raised again, then the same size passes.
            n.entry(1, 1, vec![set_limits(2, &content_limit(300)), send_of("raised", 200)]),
        ]
    };
    let mut one = Node::new(&[1]);
    one.apply(1, vec![create_user(A), create_user(B)]).await;
    let batch = entries(&mut one);
    let replies = one.sm(1).apply(batch).await.unwrap();
    let results: Vec<ErrorCode> = replies.iter().flat_map(|r| r.0.results.iter().map(code)).collect();
    assert_eq!(
        results,
        [ErrorCode::Ok, ErrorCode::Ok, ErrorCode::ErrorContentTooLarge, ErrorCode::Ok, ErrorCode::Ok],
        "the send after SetLimits in the same apply batch uses the new limit"
    );
    assert_eq!(version(&one, 1), 2);
    let ids: Vec<String> = list(&one.reader(1), B).into_iter().map(|m| m.client_msg_id).collect();
    assert_eq!(ids, ["before", "raised"]);

    // Another replica that applies the same log one entry at a time ends
    // identical: the result depends on the log, not on how apply batches it.
    let mut other = Node::new(&[1]);
    other.apply(1, vec![create_user(A), create_user(B)]).await;
    for e in entries(&mut other) {
        other.sm(1).apply(vec![e]).await.unwrap();
    }
    assert_eq!(other.reader(1).digest().unwrap(), one.reader(1).digest().unwrap());
}

#[tokio::test]
async fn a_stale_repeated_or_invalid_set_limits_changes_nothing() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    assert_eq!(version(&n, 1), 0, "none stored: the defaults");
    assert_eq!(code(&n.apply1(1, set_limits(3, &content_limit(100))).await), ErrorCode::Ok);
    let before = n.reader(1).data_digest().unwrap();

    // Older, equal (with other values) and version 0: ignored, and OK (a
    // leader may propose the same version twice).
    for (v, bytes) in [(2, 1000), (3, 1000), (0, 1000)] {
        assert_eq!(code(&n.apply1(1, set_limits(v, &content_limit(bytes))).await), ErrorCode::Ok, "v{v}");
    }
    // Invalid: refused, even with a newer version.
    let bad = Limits { max_op_bytes: 50, ..content_limit(100) };
    assert_eq!(code(&n.apply1(1, set_limits(4, &bad)).await), ErrorCode::ErrorBadRequest);
    assert_eq!(
        code(&n.apply1(1, op(O::SetLimits(store::SetLimits { limits: None }))).await),
        ErrorCode::ErrorBadRequest
    );
    assert_eq!(n.reader(1).data_digest().unwrap(), before, "nothing written");
    assert_eq!(version(&n, 1), 3);
    assert_eq!(code(&n.apply1(1, send_of("still-100", 200)).await), ErrorCode::ErrorContentTooLarge);
}

#[tokio::test]
async fn limits_survive_a_restart_and_travel_in_snapshots() {
    let mut src = Node::new(&[1]);
    src.apply(1, vec![create_user(A), create_user(B)]).await;
    src.apply1(1, set_limits(1, &content_limit(100))).await;
    let mut src = src.reopen();
    assert_eq!(code(&src.apply1(1, send_of("after-restart", 200)).await), ErrorCode::ErrorContentTooLarge);
    sent(&src.apply1(1, send_of("small", 50)).await);

    let snap = src.sm(1).get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut dst = Node::new(&[1]);
    let mut rx = dst.sm(1).begin_receiving_snapshot().await.unwrap();
    tokio::io::copy(&mut *src.sm(1).get_current_snapshot().await.unwrap().unwrap().snapshot, &mut *rx)
        .await
        .unwrap();
    dst.sm(1).install_snapshot(&snap.meta, rx).await.unwrap();
    assert_eq!(version(&dst, 1), 1, "the snapshot carries the limits");
    assert_eq!(code(&dst.apply1(1, send_of("installed", 200)).await), ErrorCode::ErrorContentTooLarge);
    let mut dst = dst.reopen();
    assert_eq!(code(&dst.apply1(1, send_of("installed-2", 200)).await), ErrorCode::ErrorContentTooLarge);
    assert_eq!(list(&dst.reader(1), A).len(), 1, "only the small message");
    assert!(dst.reader(1).user(UserId(A)).unwrap().is_some());
}

#[tokio::test]
async fn the_meta_group_applies_the_limits_of_its_cluster_map() {
    let mut n = Node::new(&[0]);
    let map = |version, limits: Option<ClusterLimits>| {
        op(O::SetClusterMap(store::SetClusterMap {
            map: Some(ClusterMap { version, slots: 4, limits, ..Default::default() }),
        }))
    };
    let tight = content_limit(100).to_proto(1);
    assert_eq!(
        code(&n.apply1(0, map(1, None)).await),
        ErrorCode::Ok,
        "a map without limits (older clusters)"
    );
    assert_eq!(code(&n.apply1(0, map(2, Some(tight))).await), ErrorCode::Ok);
    assert_eq!(n.reader(0).limits().unwrap(), Some(tight), "the meta group applies them too");
    assert_eq!(code(&n.apply1(0, map(3, Some(tight))).await), ErrorCode::Ok, "kept as they are");

    let refused = [
        (None, "limits dropped"),
        (Some(content_limit(200).to_proto(1)), "other values under the same version"),
        (Some(content_limit(200).to_proto(0)), "an older version"),
        (Some(Limits { max_op_bytes: 10, ..Limits::default() }.to_proto(2)), "invalid values"),
    ];
    for (limits, what) in refused {
        assert_eq!(code(&n.apply1(0, map(4, limits)).await), ErrorCode::ErrorBadRequest, "{what}");
    }
    assert_eq!(n.reader(0).cluster_map().unwrap().unwrap().version, 3);
    let looser = content_limit(200).to_proto(2);
    assert_eq!(code(&n.apply1(0, map(4, Some(looser))).await), ErrorCode::Ok);
    assert_eq!(n.reader(0).limits().unwrap(), Some(looser));
}

#[test]
fn validate_names_the_broken_rule() {
    Limits::default().validate().unwrap();
    let d = Limits::default;
    let cases = [
        (Limits { max_content_bytes: 0, ..d() }, "max_content_bytes"),
        (Limits { max_op_bytes: 64 << 10, ..d() }, "largest send"),
        (Limits { max_content_bytes: 600 << 10, max_op_bytes: 700 << 10, ..d() }, "fit a frame"),
        (Limits { max_members_per_op: 0, ..d() }, "max_members_per_op"),
        (Limits { max_trim_per_op: 0, ..d() }, "max_trim_per_op"),
        (Limits { recall_window_ms: -1, ..d() }, "recall_window_ms"),
        (Limits { orphan_claim_ms: 1_000, ..d() }, "orphan_claim_ms"),
    ];
    for (limits, rule) in cases {
        let e = limits.validate().unwrap_err();
        assert_eq!(e.code(), ErrorCode::ErrorBadRequest);
        assert!(e.to_string().contains(rule), "{e} should name {rule:?}");
    }
    let wire = Limits { small_group_limit: 7, dedup_window: 0, ..d() };
    assert_eq!(Limits::from_proto(&wire.to_proto(9)).unwrap(), wire, "round trip");
}
