//! rim client SDK (planned).
//!
//! Will own: connecting over TCP or WebSocket to any of several gateways,
//! sign-in, a sync loop that buffers pushes while syncing and detects seq
//! gaps, acks, sends with automatic retry under the same `client_msg_id`, and
//! reconnect with backoff. Used by `rim chat`, `rim bench`, jepsen and tests.
