//! Operations of the meta group (shard 0): the cluster map and id
//! allocators. They run through the same applier as data operations, so the
//! meta group gets the same durability, snapshots and determinism.
//!
//! The cluster map carries the cluster's limits (`ClusterMap.limits`, the
//! canonical value the nodes propagate to every group). A map that carries
//! them is refused if they are invalid, or older than the stored map's, or
//! gone; a map with newer limits makes them the meta group's own limits too,
//! exactly as `SetLimits` does in a data group.

use rim_proto::store::{self, IdAllocators, IdKind, IdRange};
use rim_proto::v1::ClusterMap;

use super::{Applier, Limits};
use crate::error::{Result, reject};
use crate::keys;

/// Most ids one allocation may reserve.
const MAX_ID_BLOCK: u32 = 100_000;

impl Applier<'_> {
    pub(super) fn set_cluster_map(&mut self, c: &store::SetClusterMap) -> Result<()> {
        let Some(map) = &c.map else { reject!(ErrorBadRequest, "cluster map missing") };
        let key = keys::cluster_map(self.shard);
        let stored = self.txn.get_msg::<ClusterMap>(&key)?;
        let current = stored.as_ref().map_or(0, |m| m.version);
        if map.version != current + 1 {
            reject!(
                ErrorBadRequest,
                "cluster map version {} does not follow the stored {current}",
                map.version
            );
        }
        let old = stored.and_then(|m| m.limits);
        match (&old, &map.limits) {
            (Some(_), None) => reject!(ErrorBadRequest, "the cluster map would lose its limits"),
            (_, Some(new)) if old.as_ref() != Some(new) => {
                let old_version = old.as_ref().map_or(0, |o| o.version);
                if new.version <= old_version {
                    reject!(
                        ErrorBadRequest,
                        "limits version {} does not follow the stored {old_version}",
                        new.version
                    );
                }
                Limits::from_proto(new)?;
            }
            _ => {}
        }
        self.txn.put_msg(key, map);
        match &map.limits {
            Some(limits) => self.adopt_limits(limits),
            None => Ok(()),
        }
    }

    pub(super) fn allocate_ids(&mut self, c: &store::AllocateIds) -> Result<IdRange> {
        if c.count == 0 || c.count > MAX_ID_BLOCK {
            reject!(ErrorBadRequest, "id block size must be 1..={MAX_ID_BLOCK}");
        }
        let key = keys::id_allocators(self.shard);
        let mut a: IdAllocators = self.txn.get_msg(&key)?.unwrap_or_default();
        let next = match IdKind::try_from(c.kind) {
            Ok(IdKind::User) => &mut a.next_user,
            Ok(IdKind::Device) => &mut a.next_device,
            Ok(IdKind::Group) => &mut a.next_group,
            _ => reject!(ErrorBadRequest, "unknown id kind {}", c.kind),
        };
        // Ids start at 1: 0 never names anything.
        let first = (*next).max(1);
        *next = first + u64::from(c.count);
        self.txn.put_msg(key, &a);
        Ok(IdRange { first, count: c.count })
    }
}
