//! Links to a gateway: TCP (varint-framed packets) or WebSocket (one packet
//! per binary message), each in plaintext or inside TLS, behind one pair of
//! types.
//!
//! The public part is [`Endpoint`], naming a gateway, its transport and
//! whether it speaks TLS (`tls://`, `wss://`). Inside the crate, `connect`
//! opens a link and returns its two halves: a `LinkReader` that the
//! connection task polls for packets, and a `LinkWriter` that a writer task
//! owns. Everything above this module is the same for every transport.
//!
//! TLS is rustls (tokio-rustls) with the configuration the application gives
//! ([`ClientConfig::tls`](crate::ClientConfig::tls): the CAs it trusts); the
//! name verified in the gateway's certificate is the endpoint's host (a DNS
//! name or an IP address). A TLS endpoint without that configuration is a
//! configuration error, not a network one: the client stops instead of
//! retrying.
//!
//! `LinkReader::recv` is cancel-safe: partial TCP frames stay in its
//! decoder, so dropping the future between reads loses nothing. A WebSocket
//! close frame whose reason names an auth-class error code (the gateway's
//! `ERROR_KICKED` ...) is reported as a kick even if the `KICK` push before
//! it was lost.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use rim_proto::ErrorCode;
use rim_proto::codec::{FrameDecoder, decode_unframed, encode_frame};
use rim_proto::error::ErrorClass;
use rim_proto::v1::Packet;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::error::{ClientError, Result};

/// The path of the gateways' WebSocket endpoint.
pub const WS_PATH: &str = "/ws";

/// Where a gateway listens, and over which transport.
///
/// Parsed from a string ([`FromStr`]):
///
/// * `tcp://host:port` or a bare `host:port`: TCP with varint framing;
/// * `tls://host:port`: the same inside TLS;
/// * `ws://host:port` (the path defaults to `/ws`) or
///   `ws://host:port/path`: WebSocket;
/// * `wss://host:port[/path]`: WebSocket inside TLS.
///
/// TLS endpoints need [`ClientConfig::tls`](crate::ClientConfig::tls).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP listener, as `host:port`.
    Tcp(String),
    /// A TCP listener speaking TLS, as `host:port`.
    Tls(String),
    /// A WebSocket URL, `ws://host:port/ws` or `wss://host:port/ws`.
    WebSocket(String),
}

impl Endpoint {
    /// A TCP endpoint at `addr` (`host:port`).
    pub fn tcp(addr: impl fmt::Display) -> Endpoint {
        Endpoint::Tcp(addr.to_string())
    }

    /// A TCP endpoint speaking TLS at `addr` (`host:port`).
    pub fn tls(addr: impl fmt::Display) -> Endpoint {
        Endpoint::Tls(addr.to_string())
    }

    /// The WebSocket endpoint `ws://{addr}/ws`.
    pub fn ws(addr: impl fmt::Display) -> Endpoint {
        Endpoint::WebSocket(format!("ws://{addr}{WS_PATH}"))
    }

    /// The WebSocket endpoint `wss://{addr}/ws`.
    pub fn wss(addr: impl fmt::Display) -> Endpoint {
        Endpoint::WebSocket(format!("wss://{addr}{WS_PATH}"))
    }

    /// Whether the link is inside TLS.
    pub fn is_tls(&self) -> bool {
        match self {
            Endpoint::Tcp(_) => false,
            Endpoint::Tls(_) => true,
            Endpoint::WebSocket(url) => url.starts_with("wss://"),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
            Endpoint::Tls(addr) => write!(f, "tls://{addr}"),
            Endpoint::WebSocket(url) => f.write_str(url),
        }
    }
}

impl FromStr for Endpoint {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Endpoint> {
        let bad = |why: &str| ClientError::InvalidAddress(s.to_string(), why.to_string());
        for (scheme, tls) in [("tcp", false), ("tls", true)] {
            if let Some(rest) = s.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) {
                if rest.is_empty() || rest.contains('/') {
                    return Err(bad(&format!("expected {scheme}://host:port")));
                }
                return Ok(if tls { Endpoint::tls(rest) } else { Endpoint::tcp(rest) });
            }
        }
        for scheme in ["ws", "wss"] {
            if let Some(rest) = s.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) {
                return match rest.split_once('/') {
                    None if !rest.is_empty() => {
                        Ok(Endpoint::WebSocket(format!("{scheme}://{rest}{WS_PATH}")))
                    }
                    Some((host, _)) if !host.is_empty() => Ok(Endpoint::WebSocket(s.to_string())),
                    _ => Err(bad(&format!("expected {scheme}://host:port[/path]"))),
                };
            }
        }
        if s.contains("://") {
            return Err(bad("unsupported scheme (use tcp://, tls://, ws:// or wss://)"));
        }
        if !s.contains(':') {
            return Err(bad("expected host:port"));
        }
        Ok(Endpoint::Tcp(s.to_string()))
    }
}

/// A link's byte stream: the TCP socket, or a TLS session over it.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug> Io for S {}

type Socket = Box<dyn Io>;
type WsStream = WebSocketStream<Socket>;

/// The receiving half of a link.
#[derive(Debug)]
pub(crate) enum LinkReader {
    /// TCP: the socket's read half and the frame decoder.
    Tcp { read: ReadHalf<Socket>, decoder: FrameDecoder, buf: Box<[u8]> },
    /// WebSocket: the stream half.
    Ws { stream: SplitStream<WsStream>, max_frame: usize },
}

/// The sending half of a link.
#[derive(Debug)]
pub(crate) enum LinkWriter {
    /// TCP: the socket's write half and an encoding buffer.
    Tcp { write: WriteHalf<Socket>, buf: BytesMut },
    /// WebSocket: the sink half.
    Ws { sink: SplitSink<WsStream, WsMessage> },
}

/// Opens a link to `endpoint` within `timeout` (TCP, TLS and WebSocket
/// handshakes included), refusing packets above `max_frame` bytes. A TLS
/// endpoint trusts what `tls` trusts.
pub(crate) async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
    max_frame: usize,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(LinkReader, LinkWriter)> {
    let tls = match (endpoint.is_tls(), tls) {
        (false, _) => None,
        (true, Some(tls)) => Some(tls),
        (true, None) => {
            let why = "a TLS endpoint needs ClientConfig::tls (the CAs to trust)";
            return Err(ClientError::InvalidAddress(endpoint.to_string(), why.into()));
        }
    };
    let opened = tokio::time::timeout(timeout, open(endpoint, max_frame, tls)).await;
    opened.unwrap_or(Err(ClientError::Transport(format!(
        "connecting to {endpoint} timed out after {timeout:?}"
    ))))
}

async fn open(
    endpoint: &Endpoint,
    max_frame: usize,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(LinkReader, LinkWriter)> {
    match endpoint {
        Endpoint::Tcp(addr) | Endpoint::Tls(addr) => {
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(host, _)| host);
            let (read, write) = tokio::io::split(dial(addr, host, tls).await?);
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
            let uri: Uri =
                url.parse().map_err(|e| ClientError::InvalidAddress(url.clone(), format!("{e}")))?;
            let host = uri.host().unwrap_or_default();
            let port = uri.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
            let socket = dial(&format!("{host}:{port}"), host, tls).await?;
            let (ws, _) = tokio_tungstenite::client_async_with_config(url.as_str(), socket, Some(config))
                .await
                .map_err(|e| ClientError::Transport(format!("websocket {url}: {e}")))?;
            let (sink, stream) = ws.split();
            Ok((LinkReader::Ws { stream, max_frame }, LinkWriter::Ws { sink }))
        }
    }
}

/// Opens a TCP connection to `addr`; with `tls`, completes a TLS handshake
/// over it, verifying the certificate for `host`.
async fn dial(addr: &str, host: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Socket> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| ClientError::Transport(format!("connect to {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = tls else { return Ok(Box::new(tcp)) };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| ClientError::InvalidAddress(addr.to_string(), format!("not a TLS server name: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Transport(format!("TLS handshake with {addr}: {e}")))?;
    Ok(Box::new(tls))
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
                // TLS may hold the last record until flushed.
                write.flush().await.map_err(|e| lost(&e))?;
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

    /// Closes the link: a TCP shutdown (after `close_notify` under TLS), or
    /// a WebSocket close frame.
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
        let parsed = [
            ("127.0.0.1:7000", Endpoint::Tcp("127.0.0.1:7000".into()), false),
            ("tcp://gw:7000", Endpoint::Tcp("gw:7000".into()), false),
            ("tls://gw:7000", Endpoint::Tls("gw:7000".into()), true),
            ("ws://gw:7001", Endpoint::WebSocket("ws://gw:7001/ws".into()), false),
            ("ws://gw:7001/other", Endpoint::WebSocket("ws://gw:7001/other".into()), false),
            ("wss://gw:7001", Endpoint::WebSocket("wss://gw:7001/ws".into()), true),
            ("wss://gw:7001/other", Endpoint::WebSocket("wss://gw:7001/other".into()), true),
        ];
        for (text, endpoint, tls) in parsed {
            assert_eq!(text.parse::<Endpoint>().unwrap(), endpoint, "{text}");
            assert_eq!(endpoint.is_tls(), tls, "{text}");
        }
        let shown = [
            (Endpoint::tcp("1.2.3.4:5"), "tcp://1.2.3.4:5"),
            (Endpoint::tls("1.2.3.4:5"), "tls://1.2.3.4:5"),
            (Endpoint::ws("1.2.3.4:5"), "ws://1.2.3.4:5/ws"),
            (Endpoint::wss("1.2.3.4:5"), "wss://1.2.3.4:5/ws"),
        ];
        for (endpoint, text) in shown {
            assert_eq!(endpoint.to_string(), text);
            assert_eq!(text.parse::<Endpoint>().unwrap(), endpoint, "round trip");
        }
        let unsupported = ["", "gw", "http://gw:1", "https://gw:1"];
        let incomplete = ["ws://", "ws:///ws", "wss://", "tcp://", "tls://", "tls://gw:1/x"];
        for bad in unsupported.into_iter().chain(incomplete) {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} parsed");
        }
    }

    /// A TLS server on loopback with the test PKI's certificate that
    /// echoes every frame it gets; returns its address.
    async fn echo_server(pki: &rim_testkit::tls::TestPki) -> std::net::SocketAddr {
        let config = rim_cluster::tls::server_config(&pki.cert, &pki.key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await
                        && n > 0
                        && tls.write_all(&buf[..n]).await.is_ok()
                    {}
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn tls_links_verify_the_gateway_and_need_a_configuration() {
        let pki = rim_testkit::tls::TestPki::new();
        let addr = echo_server(&pki).await;
        let trusted = rim_cluster::tls::client_config(&pki.ca).unwrap();
        let timeout = Duration::from_secs(10);
        // By IP address and by DNS name, both in the certificate.
        for endpoint in [Endpoint::tls(addr), Endpoint::tls(format!("localhost:{}", addr.port()))] {
            let (mut reader, mut writer) =
                connect(&endpoint, timeout, 1 << 20, Some(&trusted)).await.unwrap();
            let packet = Packet { request_id: 7, command: 1, content: vec![9u8; 40_000].into(), seq: 0 };
            writer.send(std::slice::from_ref(&packet)).await.unwrap();
            assert_eq!(reader.recv().await.unwrap(), Some(packet), "{endpoint}");
            writer.close().await;
        }

        let untrusted = rim_cluster::tls::client_config(&pki.other_ca).unwrap();
        let err = connect(&Endpoint::tls(addr), timeout, 1 << 20, Some(&untrusted)).await.unwrap_err();
        assert!(matches!(&err, ClientError::Transport(m) if m.contains("UnknownIssuer")), "{err}");
        assert!(err.is_retryable(), "another gateway may be configured right");

        for endpoint in [Endpoint::tls(addr), Endpoint::wss(addr)] {
            let err = connect(&endpoint, timeout, 1 << 20, None).await.unwrap_err();
            assert!(matches!(err, ClientError::InvalidAddress(..)), "{endpoint}: {err}");
            assert!(!err.is_retryable(), "a configuration error stops the client");
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
