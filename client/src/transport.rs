//! Links to a gateway: TCP (varint-framed packets) or WebSocket (one packet
//! per binary message), behind one pair of types.
//!
//! The public part is [`Endpoint`], naming a gateway and its transport.
//! Inside the crate, `connect` opens a link and returns its two halves: a
//! `LinkReader` that the connection task polls for packets, and a
//! `LinkWriter` that a writer task owns. Everything above this module is
//! the same for both transports.
//!
//! `LinkReader::recv` is cancel-safe: partial TCP frames stay in its
//! decoder, so dropping the future between reads loses nothing. A WebSocket
//! close frame whose reason names an auth-class error code (the gateway's
//! `ERROR_KICKED` ...) is reported as a kick even if the `KICK` push before
//! it was lost.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::BytesMut;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use rim_proto::ErrorCode;
use rim_proto::codec::{FrameDecoder, decode_unframed, encode_frame};
use rim_proto::error::ErrorClass;
use rim_proto::v1::Packet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::{ClientError, Result};

/// The path of the gateways' WebSocket endpoint.
pub const WS_PATH: &str = "/ws";

/// Where a gateway listens, and over which transport.
///
/// Parsed from a string ([`FromStr`]):
///
/// * `tcp://host:port` or a bare `host:port`: TCP with varint framing;
/// * `ws://host:port` (the path defaults to `/ws`) or
///   `ws://host:port/path`: WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP listener, as `host:port`.
    Tcp(String),
    /// A WebSocket URL, `ws://host:port/ws`.
    WebSocket(String),
}

impl Endpoint {
    /// A TCP endpoint at `addr` (`host:port`).
    pub fn tcp(addr: impl fmt::Display) -> Endpoint {
        Endpoint::Tcp(addr.to_string())
    }

    /// The WebSocket endpoint `ws://{addr}/ws`.
    pub fn ws(addr: impl fmt::Display) -> Endpoint {
        Endpoint::WebSocket(format!("ws://{addr}{WS_PATH}"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
            Endpoint::WebSocket(url) => f.write_str(url),
        }
    }
}

impl FromStr for Endpoint {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Endpoint> {
        let bad = |why: &str| ClientError::InvalidAddress(s.to_string(), why.to_string());
        if let Some(rest) = s.strip_prefix("tcp://") {
            if rest.is_empty() || rest.contains('/') {
                return Err(bad("expected tcp://host:port"));
            }
            return Ok(Endpoint::Tcp(rest.to_string()));
        }
        if let Some(rest) = s.strip_prefix("ws://") {
            return match rest.split_once('/') {
                None if !rest.is_empty() => Ok(Endpoint::ws(rest)),
                Some((host, _)) if !host.is_empty() => Ok(Endpoint::WebSocket(s.to_string())),
                _ => Err(bad("expected ws://host:port[/path]")),
            };
        }
        if s.contains("://") {
            return Err(bad("unsupported scheme (use tcp:// or ws://)"));
        }
        if !s.contains(':') {
            return Err(bad("expected host:port"));
        }
        Ok(Endpoint::Tcp(s.to_string()))
    }
}

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The receiving half of a link.
#[derive(Debug)]
pub(crate) enum LinkReader {
    /// TCP: the socket's read half and the frame decoder.
    Tcp { read: OwnedReadHalf, decoder: FrameDecoder, buf: Box<[u8]> },
    /// WebSocket: the stream half.
    Ws { stream: SplitStream<WsStream>, max_frame: usize },
}

/// The sending half of a link.
#[derive(Debug)]
pub(crate) enum LinkWriter {
    /// TCP: the socket's write half and an encoding buffer.
    Tcp { write: OwnedWriteHalf, buf: BytesMut },
    /// WebSocket: the sink half.
    Ws { sink: SplitSink<WsStream, WsMessage> },
}

/// Opens a link to `endpoint` within `timeout`, refusing packets above
/// `max_frame` bytes.
pub(crate) async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
    max_frame: usize,
) -> Result<(LinkReader, LinkWriter)> {
    let opened = tokio::time::timeout(timeout, open(endpoint, max_frame)).await;
    opened.unwrap_or(Err(ClientError::Transport(format!(
        "connecting to {endpoint} timed out after {timeout:?}"
    ))))
}

async fn open(endpoint: &Endpoint, max_frame: usize) -> Result<(LinkReader, LinkWriter)> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            let tcp = TcpStream::connect(addr.as_str())
                .await
                .map_err(|e| ClientError::Transport(format!("connect to {addr}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let (read, write) = tcp.into_split();
            let reader = LinkReader::Tcp {
                read,
                decoder: FrameDecoder::new(max_frame),
                buf: vec![0; 16 * 1024].into(),
            };
            Ok((reader, LinkWriter::Tcp { write, buf: BytesMut::new() }))
        }
        Endpoint::WebSocket(url) => {
            // Room for the largest packet plus WebSocket framing.
            let limit = max_frame.saturating_add(4096);
            let config = WebSocketConfig::default().max_message_size(Some(limit)).max_frame_size(Some(limit));
            let (ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
                .await
                .map_err(|e| ClientError::Transport(format!("websocket {url}: {e}")))?;
            let (sink, stream) = ws.split();
            Ok((LinkReader::Ws { stream, max_frame }, LinkWriter::Ws { sink }))
        }
    }
}

impl LinkReader {
    /// The next packet, `Ok(None)` when the server closed the link cleanly.
    /// Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Result<Option<Packet>> {
        match self {
            LinkReader::Tcp { read, decoder, buf } => loop {
                if let Some(packet) = decoder.next_frame()? {
                    return Ok(Some(packet));
                }
                let n = read.read(buf).await.map_err(|e| ClientError::ConnectionLost(e.to_string()))?;
                if n == 0 {
                    decoder.finish()?;
                    return Ok(None);
                }
                decoder.push(&buf[..n]);
            },
            LinkReader::Ws { stream, max_frame } => loop {
                match stream.next().await {
                    None => return Ok(None),
                    Some(Ok(WsMessage::Close(frame))) => return close_reason(frame.as_ref()),
                    Some(Ok(WsMessage::Binary(data))) => return Ok(Some(decode_unframed(data, *max_frame)?)),
                    Some(Ok(WsMessage::Text(_))) => {
                        return Err(ClientError::Transport("unexpected text message".into()));
                    }
                    Some(Ok(_)) => {} // ping, pong, raw frames
                    Some(Err(e)) => return Err(ClientError::ConnectionLost(e.to_string())),
                }
            },
        }
    }
}

/// What a WebSocket close frame means: the gateway names the error code in
/// the reason. A code of the auth class (`ERROR_KICKED`,
/// `ERROR_TOKEN_REVOKED`, ...) is a kick, even if its `KICK` push was lost;
/// anything else is a plain close.
fn close_reason(frame: Option<&CloseFrame>) -> Result<Option<Packet>> {
    let Some(frame) = frame else { return Ok(None) };
    match ErrorCode::from_str_name(frame.reason.as_str()) {
        Some(code) if code.class() == ErrorClass::Auth => {
            Err(ClientError::Kicked { code, reason: format!("websocket closed: {}", frame.reason) })
        }
        _ => Ok(None),
    }
}

impl LinkWriter {
    /// Writes `packets` and flushes.
    pub(crate) async fn send(&mut self, packets: &[Packet]) -> Result<()> {
        let lost = |e: &dyn fmt::Display| ClientError::ConnectionLost(e.to_string());
        match self {
            LinkWriter::Tcp { write, buf } => {
                buf.clear();
                for packet in packets {
                    encode_frame(packet, buf);
                }
                write.write_all(buf).await.map_err(|e| lost(&e))?;
                if buf.capacity() > 256 * 1024 {
                    *buf = BytesMut::new(); // do not keep a burst's buffer
                }
                Ok(())
            }
            LinkWriter::Ws { sink } => {
                for packet in packets {
                    let body = prost::Message::encode_to_vec(packet);
                    sink.feed(WsMessage::Binary(body.into())).await.map_err(|e| lost(&e))?;
                }
                sink.flush().await.map_err(|e| lost(&e))
            }
        }
    }

    /// Closes the link: a TCP shutdown, or a WebSocket close frame.
    pub(crate) async fn close(&mut self) {
        match self {
            LinkWriter::Tcp { write, .. } => {
                let _ = write.shutdown().await;
            }
            LinkWriter::Ws { sink } => {
                let _ = sink.close().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!("127.0.0.1:7000".parse::<Endpoint>().unwrap(), Endpoint::Tcp("127.0.0.1:7000".into()));
        assert_eq!("tcp://gw:7000".parse::<Endpoint>().unwrap(), Endpoint::Tcp("gw:7000".into()));
        assert_eq!(
            "ws://gw:7001".parse::<Endpoint>().unwrap(),
            Endpoint::WebSocket("ws://gw:7001/ws".into())
        );
        assert_eq!(
            "ws://gw:7001/other".parse::<Endpoint>().unwrap(),
            Endpoint::WebSocket("ws://gw:7001/other".into())
        );
        assert_eq!(Endpoint::ws("1.2.3.4:5").to_string(), "ws://1.2.3.4:5/ws");
        assert_eq!(Endpoint::tcp("1.2.3.4:5").to_string(), "tcp://1.2.3.4:5");
        for bad in ["", "gw", "http://gw:1", "ws://", "ws:///ws", "tcp://"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn websocket_close_reasons() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        let frame = |reason: &'static str| CloseFrame { code: CloseCode::Policy, reason: reason.into() };
        assert!(matches!(
            close_reason(Some(&frame("ERROR_KICKED"))),
            Err(ClientError::Kicked { code: ErrorCode::ErrorKicked, .. })
        ));
        assert!(matches!(close_reason(Some(&frame("ERROR_TOKEN_REVOKED"))), Err(ClientError::Kicked { .. })));
        assert!(matches!(close_reason(Some(&frame("ERROR_UNAVAILABLE"))), Ok(None)));
        assert!(matches!(close_reason(Some(&frame("bye"))), Ok(None)));
        assert!(matches!(close_reason(None), Ok(None)));
    }
}
