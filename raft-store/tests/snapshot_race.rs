//! Snapshot builds racing snapshot installs on one shard: whatever the
//! interleaving, neither fails, the snapshot pointer never moves backwards,
//! and the file it names is present and reads back.

mod common;

use std::time::Duration;

use common::*;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{LogId, SnapshotMeta};
use rim_raft_store::TypeConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

type Meta = SnapshotMeta<u64, openraft::BasicNode>;

const A: u64 = 101;
const B: u64 = 202;

/// A snapshot as a leader ships it, with the digest of the state it holds.
struct Shipped {
    meta: Meta,
    bytes: Vec<u8>,
    digest: [u8; 32],
}

/// `rounds` snapshots of a source replica of shard 1. Snapshot `r` is at
/// log index `2r + 3`, so a [`replica`] that installed snapshot `r - 1` and
/// applied one entry more ([`advance`]) is still behind it.
async fn shipped(rounds: usize, sends_per_round: usize) -> Vec<Shipped> {
    let mut src = Node::new(&[1]);
    src.apply(1, vec![create_user(A), create_user(B)]).await;
    let text = "y".repeat(400);
    let mut out = Vec::new();
    for r in 0..rounds {
        let ops = (0..sends_per_round).map(|i| send(A, B, &format!("r{r}-{i}"), &text)).collect();
        src.apply(1, ops).await;
        src.apply1(1, send(B, A, &format!("r{r}"), "back")).await;
        let snap = src.sm(1).get_snapshot_builder().await.build_snapshot().await.unwrap();
        let meta = snap.meta.clone();
        out.push(Shipped { meta, bytes: read_all(snap).await, digest: src.reader(1).digest().unwrap() });
    }
    out
}

async fn read_all(snap: Snapshot<TypeConfig>) -> Vec<u8> {
    let mut data = snap.snapshot;
    let mut bytes = Vec::new();
    data.read_to_end(&mut bytes).await.unwrap();
    bytes
}

/// Receives `s` into shard 1 of `n` the way openraft does, ready to install.
async fn receive(n: &mut Node, s: &Shipped) -> Box<tokio::fs::File> {
    let mut rx = n.sm(1).begin_receiving_snapshot().await.unwrap();
    rx.write_all(&s.bytes).await.unwrap();
    rx.flush().await.unwrap();
    rx
}

/// A replica of shard 1 with state of its own at log index 1, behind every
/// [`shipped`] snapshot.
async fn replica() -> Node {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B), send(A, B, "own", "z")]).await;
    n
}

async fn applied(n: &mut Node) -> Option<LogId<u64>> {
    n.sm(1).applied_state().await.unwrap().0
}

/// Applies one more entry to shard 1 of `n` (after an install too);
/// returns the new applied log id and digest.
async fn advance(n: &mut Node) -> (Option<LogId<u64>>, [u8; 32]) {
    let index = applied(n).await.map(|l| l.index).unwrap_or(0) + 1;
    let entry = make_entry(index, 1_700_000_000_000, vec![send(A, B, &format!("adv-{index}"), "z")]);
    n.sm(1).apply(vec![entry]).await.unwrap();
    (applied(n).await, n.reader(1).digest().unwrap())
}

/// Asserts that shard 1's pointer names `s` and that its file, the only one
/// left in the shard's snapshot directory, holds `s`'s bytes.
async fn assert_current_is(n: &mut Node, s: &Shipped) {
    let cur = n.sm(1).get_current_snapshot().await.unwrap().expect("a current snapshot");
    assert_eq!(cur.meta, s.meta, "the pointer names the newest snapshot");
    assert!(read_all(cur).await == s.bytes, "the pointer's file holds the installed snapshot");
    let files: Vec<String> = std::fs::read_dir(n.dir.path().join("snapshots").join("1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let ours = format!("-{}.bin", s.meta.snapshot_id);
    assert!(files.len() == 1 && files[0].ends_with(&ours), "only the pointer's file is left: {files:?}");
}

/// Asserts that a built snapshot's data installs on `probe` to `digest`.
async fn assert_reads_back(probe: &mut Node, snap: Snapshot<TypeConfig>, digest: [u8; 32]) {
    let meta = snap.meta.clone();
    let s = Shipped { meta, bytes: read_all(snap).await, digest };
    let rx = receive(probe, &s).await;
    probe.sm(1).install_snapshot(&s.meta, rx).await.unwrap();
    assert_eq!(probe.reader(1).digest().unwrap(), s.digest, "the built snapshot reads back");
}

/// A build whose view predates an install, finishing after it, must leave
/// the pointer (and the file) of the newer installed snapshot in place.
#[tokio::test]
async fn a_late_build_never_moves_the_pointer_back() {
    let newer = shipped(1, 20).await.remove(0);
    let mut n = replica().await;
    let mut builder = n.sm(1).get_snapshot_builder().await;
    assert!(applied(&mut n).await < newer.meta.last_log_id);

    let rx = receive(&mut n, &newer).await;
    n.sm(1).install_snapshot(&newer.meta, rx).await.unwrap();
    let built = builder.build_snapshot().await.unwrap();

    assert_eq!(built.meta, newer.meta, "the late build returns the installed snapshot");
    assert!(read_all(built).await == newer.bytes);
    assert_current_is(&mut n, &newer).await;
}

/// An install arriving while a build is writing its temporary file waits
/// for the build instead of removing that file: both succeed, and the
/// pointer ends at the installed snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_during_a_build_waits_for_it() {
    let newer = shipped(1, 20).await.remove(0);
    let mut n = replica().await;
    let (at, digest_then) = (applied(&mut n).await, n.reader(1).digest().unwrap());
    let mut builder = n.sm(1).get_snapshot_builder().await;
    let (reached_tx, reached_rx) = oneshot::channel();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    builder.before_rename(move || {
        let _ = reached_tx.send(());
        let _ = release_rx.blocking_recv();
    });
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    reached_rx.await.unwrap();

    let rx = receive(&mut n, &newer).await;
    {
        let install = n.sm(1).install_snapshot(&newer.meta, rx);
        tokio::pin!(install);
        // Give an install that does not wait time to finish (and clean up).
        let early = tokio::time::timeout(Duration::from_millis(300), &mut install).await;
        release_tx.send(()).unwrap();
        match early {
            Ok(res) => res.unwrap(),
            Err(_) => install.await.unwrap(),
        }
    }
    let built = build.await.unwrap().expect("the build survives the install");

    assert_eq!(built.meta.last_log_id, at, "the build went first and published its own view");
    assert_reads_back(&mut replica().await, built, digest_then).await;
    assert_eq!(applied(&mut n).await, newer.meta.last_log_id);
    assert_current_is(&mut n, &newer).await;
}

/// Rounds of two builds and an install started together, with staggered
/// starts: every build and install succeeds, each build returns a readable
/// snapshot of its view or of the install, and after each round the
/// pointer names the installed snapshot, whose file is present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_builds_and_installs_keep_the_pointer_readable() {
    const ROUNDS: usize = 12;
    let snaps = shipped(ROUNDS, 60).await;
    let mut n = replica().await;
    let mut probe = Node::new(&[1]);
    for (r, s) in snaps.iter().enumerate() {
        // The views are past the pointer, so both builds write a file.
        let view = advance(&mut n).await;
        let mut b1 = n.sm(1).get_snapshot_builder().await;
        let mut b2 = n.sm(1).get_snapshot_builder().await;
        let rx = receive(&mut n, s).await;
        let pause = |k: usize| Duration::from_millis(((r + k) % 4) as u64);
        let (p1, p2) = (pause(1), pause(2));
        let build1 = tokio::spawn(async move { b1.build_snapshot().await });
        let build2 = tokio::spawn(async move {
            tokio::time::sleep(p1).await;
            b2.build_snapshot().await
        });
        tokio::time::sleep(p2).await;
        n.sm(1).install_snapshot(&s.meta, rx).await.unwrap();

        for build in [build1, build2] {
            let built = build.await.unwrap().unwrap_or_else(|e| panic!("round {r}: build failed: {e}"));
            let digest = if built.meta.last_log_id == view.0 {
                view.1
            } else {
                assert_eq!(built.meta, s.meta, "round {r}: a build returns its view or the install");
                s.digest
            };
            assert_reads_back(&mut probe, built, digest).await;
        }
        assert_current_is(&mut n, s).await;
    }
}
