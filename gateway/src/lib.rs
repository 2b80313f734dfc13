//! rim gateways (planned).
//!
//! Will own: the TCP transport on mio (epoll event loops, a slab of
//! connections, bounded per-connection queues, heartbeat and sign-in timers),
//! the WebSocket transport on tokio-tungstenite (`/ws`, binary protobuf and
//! JSON text frames), the session state machine both transports share, and
//! routing requests and push subscriptions to shard leaders.
