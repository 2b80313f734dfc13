//! Operations of the meta group (shard 0): the cluster map and id
//! allocators. They run through the same applier as data operations, so the
//! meta group gets the same durability, snapshots and determinism.

use rim_proto::store::{self, IdAllocators, IdKind, IdRange};
use rim_proto::v1::ClusterMap;

use super::Applier;
use crate::error::{Result, reject};
use crate::keys;

/// Most ids one allocation may reserve.
const MAX_ID_BLOCK: u32 = 100_000;

impl Applier<'_> {
    pub(super) fn set_cluster_map(&mut self, c: &store::SetClusterMap) -> Result<()> {
        let Some(map) = &c.map else { reject!(ErrorBadRequest, "cluster map missing") };
        let key = keys::cluster_map(self.shard);
        let current = self.txn.get_msg::<ClusterMap>(&key)?.map(|m| m.version).unwrap_or(0);
        if map.version != current + 1 {
            reject!(
                ErrorBadRequest,
                "cluster map version {} does not follow the stored {current}",
                map.version
            );
        }
        self.txn.put_msg(key, map);
        Ok(())
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
