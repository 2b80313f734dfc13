//! rim placement (planned): slots, shards and the meta group.
//!
//! Will own: `slot = crc32(kind, id) % SLOTS`, the slot → shard table with its
//! version, shard replica sets, the meta group's state (nodes, shards, id
//! allocators), routing a key to its shard leader, and membership operations
//! (add a learner, catch up, promote; refuse a removal that loses quorum).
