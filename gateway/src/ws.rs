//! WebSocket transport (tokio-tungstenite): in progress.
