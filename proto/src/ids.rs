//! Domain identifiers: the one vocabulary every rim crate speaks.
//!
//! Every integer that names something in rim has its own type, so a
//! [`UserId`] can never be passed where a [`Seq`] is expected. All are plain
//! `Copy` newtypes over the integer the wire carries (`uint64` / `uint32` in
//! the `.proto` files), built with `From` or the tuple constructor and read
//! with `.0`. The storage key encoding (big-endian, so byte order is numeric
//! order) lives with the store, in `rim_raft_store::keys`.
//!
//! # Invariants
//!
//! * **0 names nothing.** No user, device, group or message has id 0. In
//!   records 0 means "nobody", "the system" or "the business API" (a sender
//!   of 0), and the services refuse a 0 id with `ERROR_INVALID_ID`.
//! * **Ids are never reused.** User, device and group ids come from the meta
//!   group's allocators and only grow; a [`MessageId`] is assigned once, at
//!   apply, by the shard that accepted the send.
//! * **A list's seqs are `1..=head`, gap-free.** [`Seq`] is a position in
//!   one list (a user's list or a group's list). `Seq(0)` is the position
//!   before the first entry: a head of 0 is an empty list and "after 0"
//!   reads from the start. An entry never moves or changes seq; retention
//!   (rooms, super groups) only raises the first retained seq.
//! * **Seq arithmetic is checked.** [`Seq::MAX`] is the last position a list
//!   can hold and nothing follows it: [`Seq::checked_next`] returns `None`
//!   there, a read "after `Seq::MAX`" is empty and an append to a list whose
//!   head is `Seq::MAX` is refused. Seqs are never advanced with `+ 1` (a
//!   release build wraps to 0, the start of the list, and a debug build
//!   panics).
//! * **Shard 0 is the meta group**; data shards are `1..`.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                Self(v)
            }
        }
    };
}

id_type!(
    /// A user. Never 0 (0 means "nobody" or "the system" in records).
    UserId(u64)
);
id_type!(
    /// One device (client installation) of a user. Never 0.
    DeviceId(u64)
);
id_type!(
    /// A chat group, super group or room (one id space, kind in the record).
    /// Never 0.
    GroupId(u64)
);
id_type!(
    /// Cluster-wide unique message id: the high 16 bits are the shard that
    /// accepted the send, the low 48 bits that shard's counter.
    MessageId(u64)
);
id_type!(
    /// Position in a list: per-user seq or per-group seq. Starts at 1,
    /// gap-free; 0 is the position before the first entry. Advance it only
    /// with [`Seq::checked_next`].
    Seq(u64)
);
id_type!(
    /// A Raft group hosted by logic nodes. Shard 0 is the meta group; data
    /// shards are 1.. . All keys of a shard share its big-endian prefix.
    ShardId(u32)
);

id_type!(
    /// A slot of the key space: `crc32(key) % slots`. Slots, not keys, are
    /// assigned to shards, so a key's shard changes only when its slot moves.
    SlotId(u32)
);

/// A logic node (the same id in every Raft group the node is part of).
///
/// An alias, not a newtype: it is openraft's `NodeId` in the type config,
/// inside every persisted vote, log id and membership, and a newtype would
/// change nothing a caller can confuse (no other id is a `u64` named "node").
pub type NodeId = u64;

impl Seq {
    /// The position before the first entry of every list (an empty list's
    /// head; "after `ZERO`" reads a list from its start).
    pub const ZERO: Seq = Seq(0);

    /// The last position a list can hold: nothing follows it.
    pub const MAX: Seq = Seq(u64::MAX);

    /// The seq after this one, or `None` after [`Seq::MAX`]. Callers treat
    /// `None` as "nothing after this": a read returns no entries, an append
    /// is refused.
    pub const fn checked_next(self) -> Option<Seq> {
        match self.0.checked_add(1) {
            Some(next) => Some(Seq(next)),
            None => None,
        }
    }
}

impl MessageId {
    /// Bits of a message id that hold the per-shard counter.
    pub const COUNTER_BITS: u32 = 48;

    /// The id of the `counter`-th message accepted by `shard`.
    pub fn compose(shard: ShardId, counter: u64) -> MessageId {
        MessageId((u64::from(shard.0) << Self::COUNTER_BITS) | (counter & ((1 << Self::COUNTER_BITS) - 1)))
    }

    /// The shard that assigned this id.
    pub fn shard(self) -> ShardId {
        ShardId((self.0 >> Self::COUNTER_BITS) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_round_trips_shard() {
        let id = MessageId::compose(ShardId(7), 42);
        assert_eq!(id.shard(), ShardId(7));
        assert_eq!(id.0 & 0xffff_ffff_ffff, 42);
        assert_ne!(MessageId::compose(ShardId(1), 1), MessageId::compose(ShardId(2), 1));
    }

    #[test]
    fn seq_checked_next_stops_at_the_last_position() {
        assert_eq!(Seq::ZERO.checked_next(), Some(Seq(1)));
        assert_eq!(Seq(41).checked_next(), Some(Seq(42)));
        assert_eq!(Seq(u64::MAX - 1).checked_next(), Some(Seq::MAX));
        assert_eq!(Seq::MAX.checked_next(), None, "nothing follows the last position");
    }
}
