//! Storage micro-benchmarks: state-machine apply throughput and durable log
//! append throughput at several batch sizes. Results go to
//! docs/benchmarks.md (run: `make bench-store`).
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use rim_proto::store::{self, Op, Proposal, op::Op as O};
use rim_raft_store::raft::Entry;
use rim_raft_store::{ApplySabotage, Db, DbOptions, LogStore, Request, ShardId, StateMachine};

fn entry(index: u64, ops: Vec<Op>) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request(Proposal { now_ms: 1_700_000_000_000, ops })),
    }
}

fn send(n: u64) -> Op {
    Op {
        op: Some(O::SendToUser(store::SendToUser {
            sender_user_id: 1,
            sender_device_id: 1,
            recipient_user_id: 2,
            client_msg_id: format!("m{n}"),
            content_type: rim_proto::v1::ContentType::Text as i32,
            content: vec![b'x'; 100].into(),
            refers_to: 0,
        })),
    }
}

fn user(id: u64) -> Op {
    Op { op: Some(O::CreateUser(store::CreateUser { user_id: id, ..Default::default() })) }
}

/// Applies entries of `ops_per_entry` sends, 64 entries per apply call.
fn bench_apply(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut g = c.benchmark_group("sm_apply");
    g.measurement_time(Duration::from_secs(5));
    for ops_per_entry in [1usize, 16] {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&DbOptions::new(dir.path())).unwrap();
        let mut sm = StateMachine::open(db, ShardId(1), ApplySabotage::default()).unwrap();
        rt.block_on(sm.apply(vec![entry(1, vec![user(1), user(2)])])).unwrap();
        let (mut index, mut msg) = (2u64, 0u64);
        g.throughput(Throughput::Elements((64 * ops_per_entry) as u64));
        g.bench_function(BenchmarkId::new("sends_per_entry", ops_per_entry), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let entries: Vec<Entry> = (0..64)
                        .map(|_| {
                            index += 1;
                            entry(
                                index,
                                (0..ops_per_entry)
                                    .map(|_| {
                                        msg += 1;
                                        send(msg)
                                    })
                                    .collect(),
                            )
                        })
                        .collect();
                    let t = Instant::now();
                    rt.block_on(sm.apply(entries)).unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

/// Durable (fsynced) log appends of `batch` entries each.
fn bench_append(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut g = c.benchmark_group("log_append_fsync");
    g.measurement_time(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&DbOptions::new(dir.path())).unwrap();
    let log = LogStore::new(db, ShardId(1));
    let mut index = 0u64;
    for batch in [1u64, 16, 256] {
        g.throughput(Throughput::Elements(batch));
        g.bench_function(BenchmarkId::new("entries_per_append", batch), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let entries: Vec<Entry> = (0..batch)
                        .map(|_| {
                            index += 1;
                            entry(index, vec![send(index)])
                        })
                        .collect();
                    let t = Instant::now();
                    rt.block_on(log.append_durable(entries)).unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_apply, bench_append);
criterion_main!(benches);
