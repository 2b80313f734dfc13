//! The long-connection side of the bench: framed `Packet`s over a tokio
//! `TcpStream`, and the few content messages it speaks.
//!
//! Packets are framed and unframed by `rim_proto::codec` (prost). The
//! content messages inside them (`SignInInput`, `SendInput`, `Reply`,
//! `SignInOutput`, `MessagePush`, `KickPush`) are written and read here with
//! a minimal protobuf encoder and field scanner, because the `rim` crate
//! does not depend on prost directly (see the report for the one-line
//! dependency that would replace this). A unit test checks the encoder
//! against prost's encoding of a `Packet` and against the example bytes of
//! `docs/protocol.md`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use rim_proto::codec::{FrameDecoder, encode_frame};
use rim_proto::v1::{Command, ContentType, ConversationKind, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest frame the bench accepts from the gateway (its replies are tiny).
pub const MAX_FRAME: usize = 64 * 1024;

/// A protobuf message under construction (fields in any order, proto3
/// defaults omitted).
#[derive(Default)]
pub struct Enc(Vec<u8>);

impl Enc {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    /// A varint field (uint64, uint32, enum, non-negative int32).
    pub fn uint(mut self, field: u32, v: u64) -> Enc {
        if v != 0 {
            self.varint(u64::from(field) << 3);
            self.varint(v);
        }
        self
    }

    /// A length-delimited field (bytes, string, message).
    pub fn bytes(mut self, field: u32, b: &[u8]) -> Enc {
        if !b.is_empty() {
            self.varint((u64::from(field) << 3) | 2);
            self.varint(b.len() as u64);
            self.0.extend_from_slice(b);
        }
        self
    }

    /// The encoded message.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// A field value read by [`fields`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Val<'a> {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 2.
    Bytes(&'a [u8]),
    /// Wire types 1 and 5 (skipped).
    Fixed,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of a protobuf message in wire order, or `None` if it is malformed.
pub fn fields(buf: &[u8]) -> Option<Vec<(u32, Val<'_>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos)?;
        let field = u32::try_from(key >> 3).ok()?;
        let val = match key & 7 {
            0 => Val::Varint(read_varint(buf, &mut pos)?),
            2 => {
                let len = usize::try_from(read_varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(len).filter(|e| *e <= buf.len())?;
                let b = &buf[pos..end];
                pos = end;
                Val::Bytes(b)
            }
            1 => {
                pos += 8;
                Val::Fixed
            }
            5 => {
                pos += 4;
                Val::Fixed
            }
            _ => return None,
        };
        out.push((field, val));
    }
    (pos == buf.len()).then_some(out)
}

/// The last varint value of `field` (0 if absent).
pub fn get_uint(fields: &[(u32, Val<'_>)], field: u32) -> u64 {
    fields
        .iter()
        .rev()
        .find_map(|(f, v)| match v {
            Val::Varint(x) if *f == field => Some(*x),
            _ => None,
        })
        .unwrap_or(0)
}

/// The last bytes value of `field` (empty if absent).
pub fn get_bytes<'a>(fields: &[(u32, Val<'a>)], field: u32) -> &'a [u8] {
    fields
        .iter()
        .rev()
        .find_map(|(f, v)| match v {
            Val::Bytes(b) if *f == field => Some(*b),
            _ => None,
        })
        .unwrap_or(&[])
}

/// A decoded `Reply`: code, message, data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `ErrorCode` number, 0 = OK.
    pub code: i32,
    /// Detail for logs.
    pub message: String,
    /// Output message on success.
    pub data: Vec<u8>,
}

/// Decodes the `Reply` in a reply packet's content.
pub fn reply(content: &[u8]) -> anyhow::Result<Reply> {
    let f = fields(content).context("malformed Reply")?;
    Ok(Reply {
        code: get_uint(&f, 1) as i32,
        message: String::from_utf8_lossy(get_bytes(&f, 2)).into_owned(),
        data: get_bytes(&f, 3).to_vec(),
    })
}

/// A request packet.
pub fn request(request_id: u64, command: Command, content: Vec<u8>) -> Packet {
    Packet { request_id, command: command as i32, content: content.into(), seq: 0 }
}

/// `SIGN_IN` content.
pub fn sign_in_input(user: u64, device: u64, token: &str) -> Vec<u8> {
    Enc::default().uint(1, user).uint(2, device).bytes(3, token.as_bytes()).finish()
}

/// `SEND` content: a 1:1 text message.
pub fn send_input(to: u64, client_msg_id: &str, text: &[u8]) -> Vec<u8> {
    Enc::default()
        .uint(1, ConversationKind::User as u64)
        .uint(2, to)
        .bytes(3, client_msg_id.as_bytes())
        .uint(4, ContentType::Text as u64)
        .bytes(5, text)
        .finish()
}

/// `SignInOutput.heartbeat_interval_ms` (0 if absent or malformed).
pub fn heartbeat_interval_ms(sign_in_output: &[u8]) -> u64 {
    fields(sign_in_output).map_or(0, |f| get_uint(&f, 6))
}

/// `(sender_user_id, content)` of the message in a `MessagePush`.
pub fn pushed_message(push: &[u8]) -> Option<(u64, Vec<u8>)> {
    let f = fields(push)?;
    let m = fields(get_bytes(&f, 1))?;
    Some((get_uint(&m, 2), get_bytes(&m, 10).to_vec()))
}

/// `KickPush.code`.
pub fn kick_code(push: &[u8]) -> i32 {
    fields(push).map_or(0, |f| get_uint(&f, 1) as i32)
}

/// One frame's bytes.
pub fn frame(p: &Packet) -> Vec<u8> {
    let mut buf = Default::default();
    encode_frame(p, &mut buf);
    buf.to_vec()
}

/// The reading side of a connection: a frame decoder and a small scratch buffer.
pub struct Reader {
    dec: FrameDecoder,
    scratch: Box<[u8]>,
}

impl Reader {
    /// A reader reading at most `chunk` bytes at once.
    pub fn new(chunk: usize) -> Reader {
        Reader { dec: FrameDecoder::new(MAX_FRAME), scratch: vec![0; chunk].into_boxed_slice() }
    }

    /// The next packet, or `None` at a clean end of stream.
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
    user: u64,
    device: u64,
    token: &str,
    timeout: Duration,
) -> Result<Duration, SignInError> {
    let io = async {
        stream.write_all(&frame(&request(1, Command::SignIn, sign_in_input(user, device, token)))).await?;
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
    let ms = heartbeat_interval_ms(&r.data);
    Ok(Duration::from_millis(if ms == 0 { 30_000 } else { ms }))
}

/// A reader like [`Reader::new`] that accepts frames up to `max_frame`
/// bytes (SYNC pages of many messages exceed [`MAX_FRAME`]).
pub fn reader_with_max_frame(chunk: usize, max_frame: usize) -> Reader {
    Reader { dec: FrameDecoder::new(max_frame), scratch: vec![0; chunk].into_boxed_slice() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_matches_prost_and_the_protocol_example() {
        // docs/protocol.md, section 1.
        let content = sign_in_input(10001, 20001, "tk");
        assert_eq!(content, [0x08, 0x91, 0x4e, 0x10, 0xa1, 0x9c, 0x01, 0x1a, 0x02, 0x74, 0x6b]);
        let wire = frame(&request(1, Command::SignIn, content));
        assert_eq!(
            wire,
            [
                0x11, 0x08, 0x01, 0x10, 0x01, 0x1a, 0x0b, 0x08, 0x91, 0x4e, 0x10, 0xa1, 0x9c, 0x01, 0x1a,
                0x02, 0x74, 0x6b
            ]
        );
        // A Packet encoded here equals prost's encoding of the same Packet.
        let p = Packet { request_id: u64::MAX, command: 7, content: vec![1u8; 300].into(), seq: 1 << 40 };
        let mine =
            Enc::default().uint(1, p.request_id).uint(2, 7).bytes(3, &p.content).uint(4, p.seq).finish();
        let theirs = frame(&p);
        assert_eq!(&theirs[theirs.len() - mine.len()..], &mine[..]);
        let mut prefix = Enc::default();
        prefix.varint(mine.len() as u64);
        assert_eq!(&theirs[..theirs.len() - mine.len()], &prefix.finish()[..]);
    }

    #[test]
    fn scanner_reads_what_prost_wrote() {
        let p = Packet { request_id: 42, command: 4, content: b"hello".to_vec().into(), seq: 9 };
        let wire = frame(&p);
        let f = fields(&wire[1..]).expect("well formed");
        assert_eq!((get_uint(&f, 1), get_uint(&f, 2), get_uint(&f, 4)), (42, 4, 9));
        assert_eq!(get_bytes(&f, 3), b"hello");
        assert_eq!(get_uint(&f, 99), 0);
        assert!(fields(&[0x0a, 0x05, 1]).is_none(), "truncated bytes field");
        assert!(fields(&[0x08, 0x80]).is_none(), "truncated varint");
    }

    #[test]
    fn decodes_replies_and_pushes() {
        let r = Enc::default().uint(1, 3000).bytes(2, b"bad token").finish();
        assert_eq!(reply(&r).unwrap(), Reply { code: 3000, message: "bad token".into(), data: vec![] });
        let out = Enc::default().uint(1, 5).uint(6, 30_000).finish();
        assert_eq!(heartbeat_interval_ms(&out), 30_000);
        let msg = Enc::default().uint(1, 77).uint(2, 12).uint(6, 3).bytes(10, b"t=5").finish();
        let push = Enc::default().bytes(1, &msg).uint(2, 1).finish();
        assert_eq!(pushed_message(&push), Some((12, b"t=5".to_vec())));
        assert_eq!(kick_code(&Enc::default().uint(1, 3004).finish()), 3004);
    }
}
