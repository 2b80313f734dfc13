//! Where every key lives: slots, shards, replicas and nodes.
//!
//! # Keys and slots
//!
//! A key is a user id, a group id (rooms share the group id space) or an
//! account's login name. Its slot is
//!
//! ```text
//! slot = crc32(kind tag ‖ id as 8 big-endian bytes) % slots     (users, groups)
//! slot = crc32(kind tag ‖ name as UTF-8)            % slots     (accounts)
//! ```
//!
//! with the tags of [`KeyKind`]. The tags, the byte layout and the slot count
//! are persistent: changing any of them moves every key, so they are fixed at
//! bootstrap and pinned by tests.
//!
//! # The map
//!
//! The meta group (group [`META_SHARD`] = 0) stores the [`ClusterMap`]: the
//! slot → shard table, every Raft group with its replicas, and every node ever
//! added. [`Placement`] is a validated, indexed view of one map version; once
//! built, every lookup is total (`shard_of_*` always names an existing data
//! shard). Invariants checked by [`Placement::new`]:
//!
//! * `version ≥ 1`, `slots ≥ 1` and `slot_shards.len() == slots`;
//! * node ids are non-zero and unique, no node is in state `UNSPECIFIED`;
//! * shard ids are unique; the meta group 0 is listed; every group has at
//!   least one voter; replica roles are set; a node appears at most once per
//!   group, and only nodes that exist and are not `REMOVED` host replicas;
//! * every slot is owned by a listed data shard (id ≥ 1), never by the meta
//!   group. A data shard may own no slot (for instance while it is created).
//!
//! Leader ids (`leader_node_id`) are hints, not validated: a stale hint is
//! normal. [`Placement::leader_hint`] returns only hints that name a current
//! voter, and [`Placement::set_leader`] updates hints in place without
//! bumping the version (gateways learn leaders from `ERROR_NOT_LEADER`
//! replies between map versions).
//!
//! # Bootstrap
//!
//! [`bootstrap_map`] builds version 1 of a new cluster's map; see its docs for
//! the replica layout.

use std::collections::{BTreeMap, BTreeSet};

use rim_proto::ids::{GroupId, NodeId, ShardId, SlotId, UserId};
use rim_proto::v1::{ClusterMap, NodeInfo, NodeState, Replica, ReplicaRole, ShardInfo};

use crate::error::{Error, Result};

/// Id of the meta group, which holds the cluster map and owns no slot.
pub const META_SHARD: ShardId = ShardId(0);

/// Default number of slots of a new cluster.
pub const DEFAULT_SLOTS: u32 = 256;

/// Largest slot count [`bootstrap_map`] accepts.
pub const MAX_SLOTS: u32 = 1 << 16;

/// Default number of voters per data shard.
pub const DEFAULT_REPLICATION: usize = 3;

/// Minimum number of meta group voters [`bootstrap_map`] aims for (fewer
/// only if the cluster has fewer nodes).
pub const META_REPLICATION: usize = 3;

/// The kind of a key; its tag is the first hashed byte.
///
/// The tag values are persistent (they decide every key's slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum KeyKind {
    /// A user id: the user's profile, devices, message list, friends.
    User = 1,
    /// A group id; rooms live in the same id space.
    Group = 2,
    /// An account's unique login name (maps to its user id).
    Account = 3,
}

impl KeyKind {
    /// The byte hashed in front of the key.
    pub const fn tag(self) -> u8 {
        self as u8
    }
}

/// A key of the key space: what [`slot_of`] hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key<'a> {
    /// A user: its profile, devices, message list, friends.
    User(UserId),
    /// A group, super group or room (one id space).
    Group(GroupId),
    /// An account's login name, hashed as given: normalise it (case,
    /// Unicode form) first if logins are meant to be case-insensitive.
    Account(&'a str),
}

impl Key<'_> {
    /// The kind of this key (its tag is the first hashed byte).
    pub const fn kind(&self) -> KeyKind {
        match self {
            Key::User(_) => KeyKind::User,
            Key::Group(_) => KeyKind::Group,
            Key::Account(_) => KeyKind::Account,
        }
    }
}

/// The slot of a key: `crc32(kind tag ‖ id big-endian) % slots` for users
/// and groups, `crc32(kind tag ‖ UTF-8 name) % slots` for accounts.
///
/// # Panics
///
/// If `slots` is 0 (a validated [`Placement`] never has 0 slots).
pub fn slot_of(key: Key<'_>, slots: u32) -> SlotId {
    assert!(slots > 0, "slot_of: slots must be positive");
    let mut h = crc32fast::Hasher::new();
    h.update(&[key.kind().tag()]);
    match key {
        Key::User(UserId(id)) | Key::Group(GroupId(id)) => h.update(&id.to_be_bytes()),
        Key::Account(name) => h.update(name.as_bytes()),
    }
    SlotId(h.finalize() % slots)
}

/// A validated cluster map with lookup indexes (invariants in the module
/// docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    map: ClusterMap,
    /// shard id → index in `map.shards`.
    shard_idx: BTreeMap<ShardId, usize>,
    /// node id → index in `map.nodes`.
    node_idx: BTreeMap<NodeId, usize>,
}

fn invalid(msg: String) -> Error {
    Error::InvalidMap(msg)
}

fn is_role(r: &Replica, role: ReplicaRole) -> bool {
    r.role == role as i32
}

impl Placement {
    /// Validates `map` and indexes it; [`Error::InvalidMap`] names the first
    /// broken invariant.
    pub fn new(map: ClusterMap) -> Result<Placement> {
        if map.version == 0 {
            return Err(invalid("version is 0".into()));
        }
        if map.slots == 0 {
            return Err(invalid("slots is 0".into()));
        }
        if map.slot_shards.len() != map.slots as usize {
            return Err(invalid(format!(
                "slot table has {} entries for {} slots",
                map.slot_shards.len(),
                map.slots
            )));
        }

        let mut node_idx = BTreeMap::new();
        for (i, n) in map.nodes.iter().enumerate() {
            if n.node_id == 0 {
                return Err(invalid("node id 0".into()));
            }
            if n.state == NodeState::Unspecified as i32 {
                return Err(invalid(format!("node {} has no state", n.node_id)));
            }
            if node_idx.insert(n.node_id, i).is_some() {
                return Err(invalid(format!("duplicate node {}", n.node_id)));
            }
        }

        let mut shard_idx = BTreeMap::new();
        for (i, s) in map.shards.iter().enumerate() {
            if shard_idx.insert(ShardId(s.shard_id), i).is_some() {
                return Err(invalid(format!("duplicate shard {}", s.shard_id)));
            }
            let mut seen = BTreeSet::new();
            for r in &s.replicas {
                let Some(&ni) = node_idx.get(&r.node_id) else {
                    return Err(invalid(format!(
                        "shard {} has a replica on unknown node {}",
                        s.shard_id, r.node_id
                    )));
                };
                if map.nodes[ni].state == NodeState::Removed as i32 {
                    return Err(invalid(format!(
                        "shard {} has a replica on removed node {}",
                        s.shard_id, r.node_id
                    )));
                }
                if is_role(r, ReplicaRole::Unspecified) {
                    return Err(invalid(format!(
                        "shard {} replica on node {} has no role",
                        s.shard_id, r.node_id
                    )));
                }
                if !seen.insert(r.node_id) {
                    return Err(invalid(format!("shard {} lists node {} twice", s.shard_id, r.node_id)));
                }
            }
            if !s.replicas.iter().any(|r| is_role(r, ReplicaRole::Voter)) {
                return Err(invalid(format!("shard {} has no voter", s.shard_id)));
            }
        }
        if !shard_idx.contains_key(&META_SHARD) {
            return Err(invalid("the meta group (shard 0) is missing".into()));
        }

        for (slot, &shard) in map.slot_shards.iter().enumerate() {
            if ShardId(shard) == META_SHARD {
                return Err(invalid(format!("slot {slot} is owned by the meta group")));
            }
            if !shard_idx.contains_key(&ShardId(shard)) {
                return Err(invalid(format!("slot {slot} is owned by unknown shard {shard}")));
            }
        }

        Ok(Placement { map, shard_idx, node_idx })
    }

    /// The map version (bumped by the meta group on every change).
    pub fn version(&self) -> u64 {
        self.map.version
    }

    /// The number of slots (fixed at bootstrap).
    pub fn slots(&self) -> u32 {
        self.map.slots
    }

    /// The shard owning `slot`, or `None` if `slot >= slots()`.
    pub fn shard_of_slot(&self, slot: SlotId) -> Option<ShardId> {
        self.map.slot_shards.get(slot.0 as usize).map(|&s| ShardId(s))
    }

    /// The shard owning a key of any kind.
    pub fn shard_of(&self, key: Key<'_>) -> ShardId {
        ShardId(self.map.slot_shards[slot_of(key, self.map.slots).0 as usize])
    }

    /// The shard owning user `user_id` (and all its user-keyed state).
    pub fn shard_of_user(&self, user_id: UserId) -> ShardId {
        self.shard_of(Key::User(user_id))
    }

    /// The shard owning group (or room) `group_id`.
    pub fn shard_of_group(&self, group_id: GroupId) -> ShardId {
        self.shard_of(Key::Group(group_id))
    }

    /// The shard owning the account with login `name`.
    pub fn shard_of_account(&self, name: &str) -> ShardId {
        self.shard_of(Key::Account(name))
    }

    /// A group (meta group or data shard) by id.
    pub fn shard(&self, shard_id: ShardId) -> Option<&ShardInfo> {
        self.shard_idx.get(&shard_id).map(|&i| &self.map.shards[i])
    }

    /// Every group, the meta group included, in map order.
    pub fn shards(&self) -> &[ShardInfo] {
        &self.map.shards
    }

    /// The data shards (ids ≥ 1), in map order.
    pub fn data_shards(&self) -> impl Iterator<Item = &ShardInfo> + '_ {
        self.map.shards.iter().filter(|s| s.shard_id != META_SHARD.0)
    }

    /// A node by id (any state, `REMOVED` included).
    pub fn node(&self, node_id: NodeId) -> Option<&NodeInfo> {
        self.node_idx.get(&node_id).map(|&i| &self.map.nodes[i])
    }

    /// Every node ever added, in map order.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.map.nodes
    }

    fn replicas_with(&self, shard_id: ShardId, role: ReplicaRole) -> Vec<NodeId> {
        self.shard(shard_id)
            .map(|s| s.replicas.iter().filter(|r| is_role(r, role)).map(|r| r.node_id).collect())
            .unwrap_or_default()
    }

    /// The voters of a group, in map order (empty if the group is unknown).
    pub fn replicas_of(&self, shard_id: ShardId) -> Vec<NodeId> {
        self.replicas_with(shard_id, ReplicaRole::Voter)
    }

    /// The learners of a group, in map order (empty if none or unknown).
    pub fn learners_of(&self, shard_id: ShardId) -> Vec<NodeId> {
        self.replicas_with(shard_id, ReplicaRole::Learner)
    }

    /// The groups with a replica (voter or learner) on `node_id`, meta group
    /// included, ascending.
    pub fn shards_on_node(&self, node_id: NodeId) -> Vec<ShardId> {
        let mut out: Vec<ShardId> = self
            .map
            .shards
            .iter()
            .filter(|s| s.replicas.iter().any(|r| r.node_id == node_id))
            .map(|s| ShardId(s.shard_id))
            .collect();
        out.sort_unstable();
        out
    }

    /// The last known leader of a group, if the hint is set and names a
    /// current voter of the group.
    pub fn leader_hint(&self, shard_id: ShardId) -> Option<&NodeInfo> {
        let s = self.shard(shard_id)?;
        let leader = s.leader_node_id;
        if leader == 0 || !s.replicas.iter().any(|r| r.node_id == leader && is_role(r, ReplicaRole::Voter)) {
            return None;
        }
        self.node(leader)
    }

    /// Records `node_id` as the leader hint of a group (0 clears it). The
    /// version is unchanged: hints are not part of the versioned map.
    ///
    /// [`Error::NotFound`] if the group is unknown; [`Error::InvalidInput`]
    /// if the node is not one of its voters (this map may be stale: refresh).
    pub fn set_leader(&mut self, shard_id: ShardId, node_id: NodeId) -> Result<()> {
        let Some(&i) = self.shard_idx.get(&shard_id) else {
            return Err(Error::NotFound(format!("shard {shard_id}")));
        };
        let shard = &mut self.map.shards[i];
        if node_id != 0
            && !shard.replicas.iter().any(|r| r.node_id == node_id && is_role(r, ReplicaRole::Voter))
        {
            return Err(Error::InvalidInput(format!("node {node_id} is not a voter of shard {shard_id}")));
        }
        shard.leader_node_id = node_id;
        Ok(())
    }

    /// [`Placement::set_leader`] by value.
    pub fn with_leader(mut self, shard_id: ShardId, node_id: NodeId) -> Result<Placement> {
        self.set_leader(shard_id, node_id)?;
        Ok(self)
    }

    /// The underlying map.
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// The underlying map, by value.
    pub fn into_map(self) -> ClusterMap {
        self.map
    }
}

impl TryFrom<ClusterMap> for Placement {
    type Error = Error;

    fn try_from(map: ClusterMap) -> Result<Placement> {
        Placement::new(map)
    }
}

impl From<Placement> for ClusterMap {
    fn from(p: Placement) -> ClusterMap {
        p.into_map()
    }
}

/// The initial cluster map (version 1) a new cluster writes into its meta
/// group.
///
/// * Nodes are stored sorted by id, in state `ACTIVE`; the output does not
///   depend on the input order.
/// * The meta group has `min(max(replication, META_REPLICATION), n)` voters:
///   the nodes with the lowest ids. (It is never less replicated than the
///   data it describes.)
/// * Data shards `1..=data_shards` get `r = min(replication, n)` voters each.
///   Replica places are dealt round-robin over the sorted nodes, continuing
///   after the meta group's: shard `s` takes the `r` consecutive places
///   starting at `meta + (s-1)·r` (mod n). Any run of consecutive places
///   visits every node ⌊L/n⌋ or ⌈L/n⌉ times, so each node holds at most
///   ⌈data_shards·r/n⌉ data replicas, and the total load (meta included) is
///   balanced the same way. With 3 nodes and `replication = 3` every group is
///   on every node.
/// * Each shard's voter list is rotated by `(s-1) mod r`, so the first voter
///   (a natural preferred leader) differs between neighbouring shards.
/// * Slot `i` is owned by shard `1 + i % data_shards`.
/// * No leader hints are set.
///
/// Refuses ([`Error::InvalidInput`]) no nodes, a node id 0 or repeated,
/// `data_shards == 0`, `slots < data_shards`, `slots > MAX_SLOTS` and
/// `replication == 0`.
pub fn bootstrap_map(
    nodes: &[NodeInfo],
    data_shards: u32,
    slots: u32,
    replication: usize,
) -> Result<ClusterMap> {
    let bad = |m: String| Err(Error::InvalidInput(m));
    if nodes.is_empty() {
        return bad("no nodes".into());
    }
    if data_shards == 0 {
        return bad("data_shards must be at least 1".into());
    }
    if slots < data_shards {
        return bad(format!("slots ({slots}) must be at least data_shards ({data_shards})"));
    }
    if slots > MAX_SLOTS {
        return bad(format!("slots ({slots}) must be at most {MAX_SLOTS}"));
    }
    if replication == 0 {
        return bad("replication must be at least 1".into());
    }

    let mut sorted = nodes.to_vec();
    sorted.sort_by_key(|n| n.node_id);
    if sorted[0].node_id == 0 {
        return bad("node id 0 is reserved".into());
    }
    if let Some(w) = sorted.windows(2).find(|w| w[0].node_id == w[1].node_id) {
        return bad(format!("node id {} is listed twice", w[0].node_id));
    }
    for n in &mut sorted {
        n.state = NodeState::Active as i32;
    }

    let n = sorted.len();
    let r = replication.min(n);
    let meta_r = replication.max(META_REPLICATION).min(n);
    let voter = |node_id: u64| Replica { node_id, role: ReplicaRole::Voter as i32 };

    let mut shards = Vec::with_capacity(data_shards as usize + 1);
    shards.push(ShardInfo {
        shard_id: META_SHARD.0,
        replicas: sorted[..meta_r].iter().map(|n| voter(n.node_id)).collect(),
        leader_node_id: 0,
    });
    for s in 0..data_shards as usize {
        let start = meta_r + s * r;
        let mut replicas: Vec<Replica> = (0..r).map(|j| voter(sorted[(start + j) % n].node_id)).collect();
        replicas.rotate_left(s % r);
        shards.push(ShardInfo { shard_id: s as u32 + 1, replicas, leader_node_id: 0 });
    }

    Ok(ClusterMap {
        version: 1,
        slots,
        slot_shards: (0..slots).map(|i| 1 + i % data_shards).collect(),
        shards,
        nodes: sorted,
        limits: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> NodeInfo {
        NodeInfo {
            node_id: id,
            state: NodeState::Active as i32,
            internal_addr: format!("10.0.0.{id}:7001"),
            client_addr: format!("10.0.0.{id}:7000"),
            http_addr: format!("10.0.0.{id}:7002"),
        }
    }

    fn nodes(ids: &[u64]) -> Vec<NodeInfo> {
        ids.iter().map(|&i| node(i)).collect()
    }

    fn placement(n: u64, shards: u32, slots: u32, r: usize) -> Placement {
        let ids: Vec<u64> = (1..=n).collect();
        Placement::new(bootstrap_map(&nodes(&ids), shards, slots, r).unwrap()).unwrap()
    }

    /// Pins the hash: changing it would move every key of every cluster.
    #[test]
    fn slot_golden_values() {
        let mut h = crc32fast::Hasher::new();
        h.update(&[1, 0, 0, 0, 0, 0, 0, 0, 42]);
        assert_eq!(slot_of(Key::User(UserId(42)), u32::MAX), SlotId(h.finalize() % u32::MAX));
        assert_eq!(
            [
                slot_of(Key::User(UserId(1)), 256),
                slot_of(Key::Group(GroupId(1)), 256),
                slot_of(Key::Account("alice"), 256),
            ]
            .map(|s| s.0),
            GOLDEN
        );
        assert_eq!(slot_of(Key::Account(""), 7), SlotId(crc32fast::hash(&[3]) % 7));
    }

    const GOLDEN: [u32; 3] = [123, 190, 87];

    #[test]
    fn kinds_hash_apart() {
        let same = (0..1000u64)
            .filter(|&i| slot_of(Key::User(UserId(i)), 256) == slot_of(Key::Group(GroupId(i)), 256))
            .count();
        assert!(same < 30, "{same}");
    }

    #[test]
    fn three_nodes_r3_everything_everywhere() {
        let p = placement(3, 8, 256, 3);
        assert_eq!(p.version(), 1);
        assert_eq!(p.slots(), 256);
        for s in p.shards() {
            let mut v = p.replicas_of(ShardId(s.shard_id));
            v.sort_unstable();
            assert_eq!(v, vec![1, 2, 3], "shard {}", s.shard_id);
        }
        for n in 1..=3 {
            assert_eq!(p.shards_on_node(n), (0..=8).map(ShardId).collect::<Vec<_>>());
        }
        let firsts: BTreeSet<u64> = (1..=3).map(|s| p.replicas_of(ShardId(s))[0]).collect();
        assert_eq!(firsts.len(), 3, "preferred leaders spread");
        assert_eq!(p.data_shards().count(), 8);
        assert!(p.learners_of(ShardId(1)).is_empty());
    }

    #[test]
    fn single_node() {
        let p = placement(1, 4, 16, 3);
        assert_eq!(p.replicas_of(META_SHARD), vec![1]);
        assert_eq!(p.shards_on_node(1), (0..=4).map(ShardId).collect::<Vec<_>>());
        assert_eq!(p.shard_of_slot(SlotId(5)), Some(ShardId(2)));
        assert_eq!(p.shard_of_slot(SlotId(16)), None);
    }

    #[test]
    fn five_nodes_meta_on_lowest_ids() {
        let ids = [50, 10, 40, 20, 30];
        let map = bootstrap_map(&nodes(&ids), 5, 64, 3).unwrap();
        let p = Placement::new(map).unwrap();
        assert_eq!(p.replicas_of(META_SHARD), vec![10, 20, 30]);
        assert_eq!(p.nodes().iter().map(|n| n.node_id).collect::<Vec<_>>(), vec![10, 20, 30, 40, 50]);
        // 5 shards x 3 replicas over 5 nodes: 3 each.
        for id in ids {
            assert_eq!(p.shards_on_node(id).iter().filter(|&&s| s != META_SHARD).count(), 3);
        }
        // Replication 5 puts the meta group on all 5.
        let p5 = Placement::new(bootstrap_map(&nodes(&ids), 2, 64, 5).unwrap()).unwrap();
        assert_eq!(p5.replicas_of(META_SHARD).len(), 5);
        // Replication 1 still gives the meta group 3 voters.
        let p1 = Placement::new(bootstrap_map(&nodes(&ids), 2, 64, 1).unwrap()).unwrap();
        assert_eq!(p1.replicas_of(META_SHARD).len(), 3);
        assert_eq!(p1.replicas_of(ShardId(1)).len(), 1);
    }

    #[test]
    fn bootstrap_sets_active_and_is_order_independent() {
        let mut ns = nodes(&[3, 1, 2]);
        ns[0].state = NodeState::Joining as i32;
        let a = bootstrap_map(&ns, 3, 30, 2).unwrap();
        ns.reverse();
        let b = bootstrap_map(&ns, 3, 30, 2).unwrap();
        assert_eq!(a, b);
        assert!(a.nodes.iter().all(|n| n.state == NodeState::Active as i32));
    }

    #[test]
    fn bootstrap_rejects_bad_input() {
        let ns = nodes(&[1, 2, 3]);
        let cases: Vec<(Vec<NodeInfo>, u32, u32, usize, &str)> = vec![
            (vec![], 1, 1, 1, "no nodes"),
            (ns.clone(), 0, 1, 1, "data_shards"),
            (ns.clone(), 4, 3, 1, "slots (3)"),
            (ns.clone(), 1, MAX_SLOTS + 1, 1, "at most"),
            (ns.clone(), 1, 1, 0, "replication"),
            (nodes(&[1, 0]), 1, 1, 1, "id 0"),
            (nodes(&[2, 1, 2]), 1, 1, 1, "twice"),
        ];
        for (ns, shards, slots, r, want) in cases {
            match bootstrap_map(&ns, shards, slots, r) {
                Err(Error::InvalidInput(m)) => assert!(m.contains(want), "{m} / {want}"),
                other => panic!("expected InvalidInput({want}), got {other:?}"),
            }
        }
    }

    #[test]
    fn routing_is_consistent_with_slots() {
        let p = placement(3, 4, 64, 3);
        let shard = |slot: SlotId| ShardId(1 + slot.0 % 4);
        for id in 0..500u64 {
            assert_eq!(p.shard_of_user(UserId(id)), shard(slot_of(Key::User(UserId(id)), 64)));
            assert_eq!(p.shard_of_group(GroupId(id)), shard(slot_of(Key::Group(GroupId(id)), 64)));
        }
        assert_eq!(p.shard_of_account("bob"), shard(slot_of(Key::Account("bob"), 64)));
    }

    #[test]
    fn leader_hints() {
        let one = ShardId(1);
        let mut p = placement(5, 3, 12, 3);
        assert!(p.leader_hint(one).is_none());
        let v = p.replicas_of(one);
        p.set_leader(one, v[1]).unwrap();
        assert_eq!(p.leader_hint(one).map(|n| n.node_id), Some(v[1]));
        assert_eq!(p.version(), 1);
        let outsider = (1..=5).find(|id| !v.contains(id)).unwrap();
        assert!(matches!(p.set_leader(one, outsider), Err(Error::InvalidInput(_))));
        assert!(matches!(p.set_leader(ShardId(99), 1), Err(Error::NotFound(_))));
        let p = p.with_leader(one, 0).unwrap();
        assert!(p.leader_hint(one).is_none());

        // A stale hint in a stored map is accepted but not reported.
        let mut map = p.into_map();
        map.shards[1].leader_node_id = outsider;
        let p = Placement::new(map.clone()).unwrap();
        assert!(p.leader_hint(one).is_none());
        map.shards[1].leader_node_id = 777;
        assert!(Placement::new(map).unwrap().leader_hint(one).is_none());
    }

    #[test]
    fn learners_and_lookups() {
        let mut map = bootstrap_map(&nodes(&[1, 2, 3]), 2, 8, 2).unwrap();
        map.nodes.push(NodeInfo { state: NodeState::Joining as i32, ..node(4) });
        map.shards[1].replicas.push(Replica { node_id: 4, role: ReplicaRole::Learner as i32 });
        map.version = 2;
        let p = Placement::try_from(map).unwrap();
        assert_eq!(p.learners_of(ShardId(1)), vec![4]);
        assert!(!p.replicas_of(ShardId(1)).contains(&4));
        assert_eq!(p.shards_on_node(4), vec![ShardId(1)]);
        assert_eq!(p.node(4).unwrap().state, NodeState::Joining as i32);
        assert!(p.node(5).is_none());
        assert!(p.shard(ShardId(3)).is_none());
        assert!(p.replicas_of(ShardId(3)).is_empty());
        assert_eq!(p.shard(META_SHARD).unwrap().shard_id, 0);
        assert_eq!(ClusterMap::from(p.clone()), *p.map());
    }

    /// Each broken map is refused with `InvalidMap` naming the problem.
    #[test]
    fn new_rejects_broken_maps() {
        let good = bootstrap_map(&nodes(&[1, 2, 3]), 3, 6, 3).unwrap();
        Placement::new(good.clone()).unwrap();
        type Breaker = fn(&mut ClusterMap);
        let cases: Vec<(Breaker, &str)> = vec![
            (|m| m.version = 0, "version"),
            (|m| m.slots = 0, "slots is 0"),
            (|m| m.slots = 7, "slot table has 6 entries for 7 slots"),
            (|m| m.slot_shards.truncate(5), "slot table"),
            (|m| m.slot_shards[2] = 9, "slot 2 is owned by unknown shard 9"),
            (|m| m.slot_shards[4] = 0, "slot 4 is owned by the meta group"),
            (|m| m.nodes[1].node_id = 0, "node id 0"),
            (|m| m.nodes[1].node_id = 1, "duplicate node 1"),
            (|m| m.nodes[2].state = 0, "node 3 has no state"),
            (|m| m.shards[2].shard_id = 1, "duplicate shard 1"),
            (
                |m| {
                    m.shards.remove(0);
                },
                "meta group",
            ),
            (|m| m.shards[1].replicas[0].node_id = 9, "unknown node 9"),
            (|m| m.nodes[0].state = NodeState::Removed as i32, "removed node 1"),
            (|m| m.shards[1].replicas[0].role = 0, "has no role"),
            (|m| m.shards[1].replicas[1].node_id = m.shards[1].replicas[0].node_id, "twice"),
            (|m| m.shards[3].replicas.clear(), "shard 3 has no voter"),
            (
                |m| m.shards[3].replicas.iter_mut().for_each(|r| r.role = ReplicaRole::Learner as i32),
                "shard 3 has no voter",
            ),
        ];
        for (i, (breaker, want)) in cases.into_iter().enumerate() {
            let mut m = good.clone();
            breaker(&mut m);
            match Placement::new(m) {
                Err(Error::InvalidMap(msg)) => {
                    assert!(msg.contains(want), "case {i}: {msg:?} lacks {want:?}")
                }
                other => panic!("case {i}: expected InvalidMap({want}), got {other:?}"),
            }
        }
    }

    #[test]
    fn unused_data_shard_is_fine() {
        let mut m = bootstrap_map(&nodes(&[1, 2, 3]), 2, 4, 3).unwrap();
        m.shards.push(ShardInfo { shard_id: 3, replicas: m.shards[1].replicas.clone(), leader_node_id: 0 });
        let p = Placement::new(m).unwrap();
        assert_eq!(p.data_shards().map(|s| s.shard_id).collect::<Vec<_>>(), vec![1, 2, 3]);
    }
}
