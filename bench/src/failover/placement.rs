//! The choice of the shard whose leader is killed. Where each user lives
//! is the cluster's own placement rule (`rim_cluster::Placement` over the
//! map the admin service returns), never a copy of it.
//!
//! Invariant: the chosen shard is a data shard some sender lives on, and
//! the same for the same placement (ties go to the lowest id).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::Cred;
    use rim_proto::ids::{DeviceId, UserId};

    fn pair(sender_shard: u32) -> Pair {
        let cred = Cred { user: UserId(1), device: DeviceId(1), token: String::new() };
        Pair { sender: cred.clone(), recipient: cred, sender_shard, recipient_shard: 1 }
    }

    #[test]
    fn chooses_the_busiest_sender_shard_lowest_on_ties() {
        let data: BTreeSet<u32> = [1, 2, 3].into();
        let pairs = [pair(3), pair(2), pair(3), pair(2), pair(1)];
        assert_eq!(choose_shard(None, &pairs, &data).unwrap(), 2);
        assert_eq!(choose_shard(Some(1), &pairs, &data).unwrap(), 1);
        assert!(choose_shard(Some(0), &pairs, &data).is_err(), "the meta group is no data shard");
        assert!(choose_shard(Some(3), &pairs[4..], &data).is_err(), "no sender on shard 3");
        assert!(choose_shard(None, &[], &data).is_err());
    }
}
