//! Where users live and which shard is targeted: the cluster's placement
//! rule (user → data shard) computed from the cluster map, and the choice
//! of the shard whose leader is killed.
//!
//! Invariants:
//!
//! * [`shard_of_user`] is `rim_cluster::placement::slot_of` with the map's
//!   slot owners, pinned by the placement crate's golden value in the test
//!   below; a map whose slot owners do not match its slot count is an
//!   error, not a panic.
//! * The chosen shard is a data shard some sender lives on, and the same
//!   for the same placement (ties go to the lowest id).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use rim_proto::v1::ClusterMap;

use super::Pair;

/// The data shard whose leader is killed: `--shard` (it must carry a
/// sender), else the one with the most senders (the lowest id on ties).
pub(super) fn choose_shard(
    shard: Option<u32>,
    pairs: &[Pair],
    data_shards: &BTreeSet<u32>,
) -> anyhow::Result<u32> {
    if let Some(s) = shard {
        anyhow::ensure!(
            data_shards.contains(&s),
            "--shard {s} is not a data shard (the map has {data_shards:?})"
        );
        anyhow::ensure!(
            pairs.iter().any(|x| x.sender_shard == s),
            "no sender lives on shard {s}; use more --pairs or another --shard"
        );
        return Ok(s);
    }
    let mut count: BTreeMap<u32, usize> = BTreeMap::new();
    for x in pairs {
        *count.entry(x.sender_shard).or_default() += 1;
    }
    count.iter().max_by_key(|(s, n)| (**n, std::cmp::Reverse(**s))).map(|(s, _)| *s).context("no pairs")
}

/// The data shard of `user`: `slot_shards[crc32(1 ‖ id big-endian) % slots]`,
/// the cluster's placement rule (`rim_cluster::placement::slot_of`, pinned
/// by its golden test and by this module's).
pub(super) fn shard_of_user(map: &ClusterMap, user: u64) -> anyhow::Result<u32> {
    anyhow::ensure!(
        map.slots > 0 && map.slot_shards.len() == map.slots as usize,
        "the cluster map has {} slots but {} slot owners",
        map.slots,
        map.slot_shards.len()
    );
    let mut key = [0u8; 9];
    key[0] = 1; // KeyKind::User
    key[1..].copy_from_slice(&user.to_be_bytes());
    Ok(map.slot_shards[(crc32(&key) % map.slots) as usize])
}

/// CRC-32 (IEEE 802.3, as `crc32fast`), bit by bit: a few hundred keys.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_matches_the_cluster_rule() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        // rim_cluster::placement's golden value: slot_of(User, 1, 256) == 123.
        let map = ClusterMap { slots: 256, slot_shards: (0..256).collect(), ..Default::default() };
        assert_eq!(shard_of_user(&map, 1).unwrap(), 123);
        let bad = ClusterMap { slots: 4, slot_shards: vec![1], ..Default::default() };
        assert!(shard_of_user(&bad, 1).is_err());
    }
}
