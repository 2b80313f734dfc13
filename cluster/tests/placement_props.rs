//! Property tests of slot hashing, bootstrap layout and map validation.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rim_cluster::{Error, Key, META_SHARD, Placement, bootstrap_map, slot_of};
use rim_proto::ids::{GroupId, ShardId, SlotId, UserId};
use rim_proto::v1::{ClusterMap, NodeInfo, NodeState, ReplicaRole};

/// 1..=12 distinct non-zero node ids, in arbitrary order.
fn node_ids() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::btree_set(1u64..10_000, 1..=12)
        .prop_map(|s| s.into_iter().collect::<Vec<_>>())
        .prop_shuffle()
}

fn nodes(ids: &[u64]) -> Vec<NodeInfo> {
    ids.iter()
        .map(|&id| NodeInfo {
            node_id: id,
            state: NodeState::Active as i32,
            internal_addr: format!("n{id}:1"),
            client_addr: format!("n{id}:2"),
            http_addr: format!("n{id}:3"),
        })
        .collect()
}

/// (node ids, data shards, slots, replication), all valid.
fn bootstrap_input() -> impl Strategy<Value = (Vec<u64>, u32, u32, usize)> {
    (node_ids(), 1u32..=40, 0u32..300, 1usize..=6)
        .prop_map(|(ids, shards, extra, r)| (ids, shards, shards + extra, r))
}

proptest! {
    #[test]
    fn slot_is_deterministic_and_in_range(group in any::<bool>(), id in any::<u64>(), slots in 1u32..=u32::MAX) {
        let k = if group { Key::Group(GroupId(id)) } else { Key::User(UserId(id)) };
        let s = slot_of(k, slots);
        prop_assert!(s.0 < slots);
        prop_assert_eq!(s, slot_of(k, slots));
    }

    #[test]
    fn name_slot_is_deterministic_and_in_range(name in any::<String>(), slots in 1u32..=u32::MAX) {
        let s = slot_of(Key::Account(&name), slots);
        prop_assert!(s.0 < slots);
        prop_assert_eq!(s, slot_of(Key::Account(&name), slots));
    }

    #[test]
    fn every_key_routes_to_an_existing_data_shard(
        (ids, shards, slots, r) in bootstrap_input(),
        keys in prop::collection::vec(any::<u64>(), 1..50),
        name in any::<String>(),
    ) {
        let p = Placement::new(bootstrap_map(&nodes(&ids), shards, slots, r).unwrap()).unwrap();
        for slot in 0..p.slots() {
            let owner = p.shard_of_slot(SlotId(slot)).unwrap();
            prop_assert!(owner != META_SHARD && p.shard(owner).is_some());
        }
        for k in keys {
            for owner in [p.shard_of_user(UserId(k)), p.shard_of_group(GroupId(k))] {
                prop_assert!(owner != META_SHARD && p.shard(owner).is_some());
            }
        }
        let owner = p.shard_of_account(&name);
        prop_assert!(owner != META_SHARD && p.shard(owner).is_some());
    }

    #[test]
    fn bootstrap_spreads_replicas_evenly((ids, shards, slots, r) in bootstrap_input()) {
        let map = bootstrap_map(&nodes(&ids), shards, slots, r).unwrap();
        let p = Placement::new(map).unwrap();
        let n = ids.len();
        let rr = r.min(n);
        let meta = r.max(3).min(n);

        let mut data_load: BTreeMap<u64, usize> = ids.iter().map(|&i| (i, 0)).collect();
        let mut total_load = data_load.clone();
        for s in p.shards() {
            let voters = p.replicas_of(ShardId(s.shard_id));
            let mut distinct = voters.clone();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), voters.len());
            prop_assert!(p.learners_of(ShardId(s.shard_id)).is_empty());
            if s.shard_id == 0 {
                prop_assert_eq!(voters.len(), meta);
                let mut lowest = ids.clone();
                lowest.sort_unstable();
                lowest.truncate(meta);
                prop_assert_eq!(distinct, lowest);
            } else {
                prop_assert_eq!(voters.len(), rr);
                for v in &voters {
                    *data_load.get_mut(v).unwrap() += 1;
                }
            }
            for v in &voters {
                *total_load.get_mut(v).unwrap() += 1;
            }
        }
        let data_cap = (shards as usize * rr).div_ceil(n);
        let data_floor = shards as usize * rr / n;
        for (&node, &load) in &data_load {
            prop_assert!(load <= data_cap && load >= data_floor, "node {} holds {} (cap {})", node, load, data_cap);
        }
        let total_cap = (meta + shards as usize * rr).div_ceil(n);
        prop_assert!(total_load.values().all(|&l| l <= total_cap));

        // Every node's shard list agrees with the replica lists.
        for &id in &ids {
            let on = p.shards_on_node(id);
            prop_assert_eq!(on.len(), total_load[&id]);
        }
        // Slot i belongs to shard 1 + i % shards.
        for slot in 0..slots {
            prop_assert_eq!(p.shard_of_slot(SlotId(slot)), Some(ShardId(1 + slot % shards)));
        }
    }

    #[test]
    fn bootstrap_is_input_order_independent((ids, shards, slots, r) in bootstrap_input()) {
        let a = bootstrap_map(&nodes(&ids), shards, slots, r).unwrap();
        let mut rev = ids.clone();
        rev.reverse();
        prop_assert_eq!(a, bootstrap_map(&nodes(&rev), shards, slots, r).unwrap());
    }

    /// Random damage to a valid map is either refused with `InvalidMap`, or
    /// the result still satisfies what routing relies on.
    #[test]
    fn damaged_maps_are_refused_or_sound(
        (ids, shards, slots, r) in bootstrap_input(),
        damage in prop::collection::vec((0u8..8, any::<u32>(), any::<u64>()), 1..4),
    ) {
        let mut m = bootstrap_map(&nodes(&ids), shards, slots, r).unwrap();
        for (what, a, b) in damage {
            damage_map(&mut m, what, a, b);
        }
        match Placement::new(m.clone()) {
            Err(Error::InvalidMap(msg)) => prop_assert!(!msg.is_empty()),
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
            Ok(p) => {
                for slot in 0..p.slots() {
                    let owner = p.shard_of_slot(SlotId(slot)).unwrap();
                    prop_assert!(owner != META_SHARD && p.shard(owner).is_some());
                }
                for s in p.shards() {
                    prop_assert!(!p.replicas_of(ShardId(s.shard_id)).is_empty());
                    for rep in &s.replicas {
                        let node = p.node(rep.node_id);
                        prop_assert!(node.is_some_and(|n| n.state != NodeState::Removed as i32));
                    }
                }
                prop_assert!(p.shard(META_SHARD).is_some());
            }
        }
    }
}

fn damage_map(m: &mut ClusterMap, what: u8, a: u32, b: u64) {
    let pick = |len: usize| if len == 0 { 0 } else { a as usize % len };
    match what {
        0 => m.version = b % 3,
        1 => m.slots = a % (m.slots + 2),
        2 if !m.slot_shards.is_empty() => {
            let i = pick(m.slot_shards.len());
            m.slot_shards[i] = (b % (m.shards.len() as u64 + 2)) as u32;
        }
        3 if !m.nodes.is_empty() => {
            let i = pick(m.nodes.len());
            m.nodes[i].node_id = b % 20;
        }
        4 if !m.nodes.is_empty() => {
            let i = pick(m.nodes.len());
            m.nodes[i].state = (b % 6) as i32;
        }
        5 if !m.shards.is_empty() => {
            let i = pick(m.shards.len());
            m.shards[i].shard_id = (b % 5) as u32;
        }
        6 if !m.shards.is_empty() => {
            let i = pick(m.shards.len());
            let s = &mut m.shards[i];
            if !s.replicas.is_empty() {
                let j = (b as usize) % s.replicas.len();
                if b.is_multiple_of(2) {
                    s.replicas[j].role = ReplicaRole::Learner as i32;
                } else {
                    s.replicas[j].node_id = b % 20;
                }
            }
        }
        7 if !m.shards.is_empty() => {
            let i = pick(m.shards.len());
            m.shards.remove(i);
        }
        _ => {}
    }
}
