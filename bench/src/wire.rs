//! The long-connection side of the bench: framed `Packet`s over a tokio
//! `TcpStream`.
//!
//! Packets are framed and unframed by `rim_proto::codec`; their content
//! messages (`SignInInput`, `SendInput`, `Reply`, `SignInOutput`,
//! `MessagePush`, `KickPush`, ...) are the generated `rim_proto::v1` types,
//! encoded and decoded with prost. Decoding a content message that arrived
//! in a packet shares the packet's buffer (`Bytes`) instead of copying it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use prost::Message as _;
use rim_proto::codec::{FrameDecoder, encode_frame};
use rim_proto::ids::{DeviceId, GroupId, UserId};
use rim_proto::v1::{
    Command, ContentType, ConversationKind, KickPush, Message, MessagePush, Packet, Reply, SendInput,
    SignInInput, SignInOutput,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::accounts::Cred;

/// Largest frame the bench accepts from the gateway (its replies are tiny).
pub const MAX_FRAME: usize = 64 * 1024;

/// A request packet carrying `content`.
pub fn request(request_id: u64, command: Command, content: &impl prost::Message) -> Packet {
    Packet { request_id, command: command as i32, content: content.encode_to_vec().into(), seq: 0 }
}

/// One frame's bytes: `request(request_id, command, content)`, length-prefixed.
/// A `HEARTBEAT` has no content: pass `&()`.
pub fn request_frame(request_id: u64, command: Command, content: &impl prost::Message) -> Vec<u8> {
    let mut buf = Default::default();
    encode_frame(&request(request_id, command, content), &mut buf);
    buf.to_vec()
}

/// Decodes a content message (or a `Reply`'s `data`).
pub fn decode<M: prost::Message + Default>(content: &Bytes) -> anyhow::Result<M> {
    M::decode(content.clone()).with_context(|| format!("malformed {}", std::any::type_name::<M>()))
}

/// Decodes the `Reply` in a reply packet's content.
pub fn reply(content: &Bytes) -> anyhow::Result<Reply> {
    decode(content)
}

/// `SIGN_IN` content.
pub fn sign_in_input(user: UserId, device: DeviceId, token: &str) -> SignInInput {
    SignInInput { user_id: user.0, device_id: device.0, token: token.to_string() }
}

/// `SEND` content: a 1:1 text message.
pub fn send_input(to: UserId, client_msg_id: &str, text: &[u8]) -> SendInput {
    text_input(ConversationKind::User, to.0, client_msg_id, text)
}

/// `SEND_GROUP` content: a text message to a group of `kind`.
pub fn send_group_input(
    kind: ConversationKind,
    group: GroupId,
    client_msg_id: &str,
    text: &[u8],
) -> SendInput {
    text_input(kind, group.0, client_msg_id, text)
}

fn text_input(kind: ConversationKind, conversation_id: u64, client_msg_id: &str, text: &[u8]) -> SendInput {
    SendInput {
        conversation_kind: kind as i32,
        conversation_id,
        client_msg_id: client_msg_id.to_string(),
        content_type: ContentType::Text as i32,
        content: Bytes::copy_from_slice(text),
        ..SendInput::default()
    }
}

/// The message in a `MessagePush`, or `None` if malformed.
pub fn pushed_message(push: &Bytes) -> Option<Message> {
    MessagePush::decode(push.clone()).ok()?.message
}

/// The send time stamped as the first word of the text of a `MessagePush`
/// from `sender` (how `send` and `fanout` measure delivery), or `None` for
/// another sender's or an unstamped message.
pub fn stamp_from(push: &Bytes, sender: UserId) -> Option<u64> {
    let m = pushed_message(push).filter(|m| m.sender_user_id == sender.0)?;
    std::str::from_utf8(m.content.split(|b| *b == b' ').next()?).ok()?.parse().ok()
}

/// `KickPush.code` (0 if malformed).
pub fn kick_code(push: &Bytes) -> i32 {
    KickPush::decode(push.clone()).map_or(0, |k| k.code)
}

/// The reading side of a connection: a frame decoder and a small scratch buffer.
pub struct Reader {
    dec: FrameDecoder,
    scratch: Box<[u8]>,
}

impl Reader {
    /// A reader reading at most `chunk` bytes at once, accepting frames up
    /// to [`MAX_FRAME`].
    pub fn new(chunk: usize) -> Reader {
        Reader::with_max_frame(chunk, MAX_FRAME)
    }

    /// A reader that accepts frames up to `max_frame` bytes (SYNC pages of
    /// many messages exceed [`MAX_FRAME`]).
    pub fn with_max_frame(chunk: usize, max_frame: usize) -> Reader {
        Reader { dec: FrameDecoder::new(max_frame), scratch: vec![0; chunk].into_boxed_slice() }
    }

    /// The next packet, or `None` at a clean end of stream. Cancel-safe: it
    /// only awaits the socket read, and a frame read so far stays buffered.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some(p) = self.dec.next_frame()? {
                return Ok(Some(p));
            }
            let n = r.read(&mut self.scratch).await?;
            if n == 0 {
                self.dec.finish()?;
                return Ok(None);
            }
            self.dec.push(&self.scratch[..n]);
        }
    }
}

/// Opens a TCP connection to `gateway`, bound to `local` first if given (to
/// spread connections over loopback source addresses), with small socket
/// buffers when `small` (idle connections).
pub async fn connect(gateway: SocketAddr, local: Option<Ipv4Addr>, small: bool) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = local {
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    if small {
        socket.set_recv_buffer_size(4096)?;
        socket.set_send_buffer_size(4096)?;
    }
    let stream = socket.connect(gateway).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Why a sign-in over the long connection failed.
#[derive(Debug)]
pub enum SignInError {
    /// Connecting, writing or reading failed (or timed out).
    Io(String),
    /// The gateway replied with this error code.
    Refused(i32, String),
}

impl std::fmt::Display for SignInError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignInError::Io(e) => write!(f, "{e}"),
            SignInError::Refused(code, msg) => write!(f, "refused with code {code}: {msg}"),
        }
    }
}

/// Sends `SIGN_IN` (request id 1) and waits for its reply within `timeout`;
/// returns the heartbeat interval the gateway announced.
pub async fn sign_in<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut Reader,
    user: UserId,
    device: DeviceId,
    token: &str,
    timeout: Duration,
) -> Result<Duration, SignInError> {
    let io = async {
        stream.write_all(&request_frame(1, Command::SignIn, &sign_in_input(user, device, token))).await?;
        loop {
            let Some(p) = reader.next(stream).await? else { bail!("closed by the gateway") };
            if p.request_id == 1 && p.command == Command::SignIn as i32 {
                return reply(&p.content);
            }
        }
    };
    let r = match tokio::time::timeout(timeout, io).await {
        Err(_) => return Err(SignInError::Io(format!("no sign-in reply within {timeout:?}"))),
        Ok(Err(e)) => return Err(SignInError::Io(format!("{e:#}"))),
        Ok(Ok(r)) => r,
    };
    if r.code != 0 {
        return Err(SignInError::Refused(r.code, r.message));
    }
    // A malformed or absent interval means the gateway's default.
    let ms = decode::<SignInOutput>(&r.data).map_or(0, |o| o.heartbeat_interval_ms);
    Ok(Duration::from_millis(if ms == 0 { 30_000 } else { u64::from(ms) }))
}

/// A signed-in connection.
pub struct Connected {
    /// The user whose device signed in.
    pub user: UserId,
    /// The connection.
    pub stream: TcpStream,
    /// Its reading side's frame decoder.
    pub reader: Reader,
    /// The heartbeat interval the gateway announced.
    pub heartbeat: Duration,
}

/// Connects and signs in every user's device, 16 at a time.
pub async fn connect_all(gateway: SocketAddr, users: &[Cred]) -> anyhow::Result<Vec<Connected>> {
    let sem = Arc::new(Semaphore::new(16));
    let mut tasks = JoinSet::new();
    for (i, c) in users.iter().cloned().enumerate() {
        let sem = sem.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let mut stream = tokio::time::timeout(Duration::from_secs(10), connect(gateway, None, false))
                .await
                .context("connect timeout")??;
            let mut reader = Reader::new(16 * 1024);
            let hb = sign_in(&mut stream, &mut reader, c.user, c.device, &c.token, Duration::from_secs(15))
                .await
                .map_err(|e| anyhow::anyhow!("sign-in of user {}: {e}", c.user))?;
            anyhow::Ok((i, Connected { user: c.user, stream, reader, heartbeat: hb }))
        });
    }
    let mut out: Vec<Option<Connected>> = (0..users.len()).map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        let (i, c) = r.context("connect task panicked")??;
        out[i] = Some(c);
    }
    out.into_iter().map(|c| c.context("missing connection")).collect()
}

/// Writes a frame within 5 s; false on failure or timeout.
pub async fn write_frame(wr: &mut OwnedWriteHalf, frame: &[u8]) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(5), wr.write_all(frame)).await, Ok(Ok(())))
}

/// Heartbeats a connection that sends nothing else (a recipient) until
/// stopped; returns the write half (dropping it would half-close the
/// connection, which the gateway closes at once).
pub async fn heartbeat(
    mut wr: OwnedWriteHalf,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> OwnedWriteHalf {
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut id = 1;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                id += 1;
                let f = request_frame(id, Command::Heartbeat, &());
                if !write_frame(&mut wr, &f).await {
                    return wr;
                }
            }
            _ = stop.changed() => return wr,
        }
    }
}

#[cfg(test)]
mod tests {
    use rim_proto::ErrorCode;

    use super::*;

    /// Frames written by the bench read back as the same packets, their
    /// content as the same messages, also when the bytes arrive one at a time.
    #[tokio::test]
    async fn packets_round_trip() {
        let sign_in = sign_in_input(UserId(10001), DeviceId(20001), "tk");
        let send = send_input(UserId(7), "c-1", b"123 hello");
        let mut wire = request_frame(1, Command::SignIn, &sign_in);
        wire.extend(request_frame(u64::MAX, Command::Send, &send));
        wire.extend(request_frame(3, Command::Heartbeat, &()));

        for chunk in [1, 64 * 1024] {
            let (mut reader, mut bytes) = (Reader::new(chunk), &wire[..]);
            let p = reader.next(&mut bytes).await.unwrap().unwrap();
            assert_eq!((p.request_id, p.command(), p.seq), (1, Command::SignIn, 0));
            assert_eq!(decode::<SignInInput>(&p.content).unwrap(), sign_in);
            let p = reader.next(&mut bytes).await.unwrap().unwrap();
            assert_eq!((p.request_id, p.command()), (u64::MAX, Command::Send));
            assert_eq!(decode::<SendInput>(&p.content).unwrap(), send);
            let p = reader.next(&mut bytes).await.unwrap().unwrap();
            assert_eq!((p.request_id, p.command(), p.content.len()), (3, Command::Heartbeat, 0));
            assert!(reader.next(&mut bytes).await.unwrap().is_none(), "clean end of stream");
        }
    }

    #[test]
    fn decodes_replies_and_pushes() {
        let r = Reply { code: 3000, message: "bad token".into(), ..Reply::default() };
        assert_eq!(reply(&r.encode_to_vec().into()).unwrap(), r);
        assert!(reply(&Bytes::from_static(&[0x0a, 0x05, 1])).is_err(), "truncated field");

        let m =
            Message { sender_user_id: 12, seq: 3, content: Bytes::from_static(b"t=5"), ..Message::default() };
        let push: Bytes = MessagePush { message: Some(m.clone()), persisted: true }.encode_to_vec().into();
        assert_eq!(pushed_message(&push), Some(m.clone()));
        assert_eq!(stamp_from(&push, UserId(12)), None, "no stamp");
        let stamped = Message { content: Bytes::from_static(b"42 xx"), ..m };
        let stamped: Bytes = MessagePush { message: Some(stamped), persisted: true }.encode_to_vec().into();
        assert_eq!(stamp_from(&stamped, UserId(12)), Some(42));
        assert_eq!(stamp_from(&stamped, UserId(13)), None, "another sender");
        let kick = KickPush { code: ErrorCode::ErrorKicked as i32, reason: String::new() };
        assert_eq!(kick_code(&kick.encode_to_vec().into()), ErrorCode::ErrorKicked as i32);
    }
}
