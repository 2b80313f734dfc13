//! TCP framing of the client long-connection protocol.
//!
//! # Wire format
//!
//! A TCP stream (in both directions) is a sequence of frames. Each frame is an
//! unsigned LEB128 varint holding the body length, followed by that many bytes
//! of one protobuf-encoded [`Packet`]. This is protobuf's standard
//! length-delimited format (`writeDelimitedTo`, Go's `binary.PutUvarint` +
//! marshal), the framing gim uses. WebSocket carries one `Packet` per binary
//! message with no prefix ([`decode_unframed`]).
//!
//! # Invariants
//!
//! * **Split-invariance.** The decoders buffer partial input: feeding a byte
//!   stream in any number of pieces, cut at any byte boundaries, yields the
//!   same packets and the same errors as feeding it at once.
//! * **Bounded memory.** A frame whose declared length exceeds `max_frame`
//!   (default [`DEFAULT_MAX_FRAME`], 1 MiB) is rejected as soon as its length
//!   prefix has been read, before any of its body is awaited, buffered or
//!   allocated for. A length prefix longer than [`MAX_VARINT_LEN`] bytes, or
//!   one whose value overflows `u64`, is rejected as soon as that is certain.
//!   So the decoder never holds more than one frame plus what the caller
//!   pushed beyond it.
//! * **No panics.** Any input gives packets, "need more bytes" or a
//!   [`CodecError`]; this is what the property tests and the `cargo fuzz`
//!   target in `proto/fuzz` check.
//! * **Fatal errors are sticky.** After [`CodecError::FrameTooLarge`] or
//!   [`CodecError::BadVarint`] the stream has lost its frame boundaries: the
//!   decoder discards its buffer and all later input and keeps returning the
//!   same error. The connection must be closed (after an error reply).
//!   [`CodecError::BadPacket`] is not fatal: the frame's bytes were consumed,
//!   the next frame decodes normally, and the server decides whether to
//!   continue.
//!
//! Every error maps to a stable [`ErrorCode`] ([`CodecError::code`]) for the
//! reply sent before closing.
//!
//! # API
//!
//! * [`FrameDecoder`]: push-based, owns its buffer (`push` then drain
//!   `next_frame` until `Ok(None)`); for the mio/epoll transport.
//! * [`PacketCodec`]: the same decoder (and an encoder) as
//!   `tokio_util::codec::{Decoder, Encoder}` for `Framed` streams.
//! * [`encode_frame`], [`decode_length_prefix`], [`decode_unframed`]: the
//!   pieces on their own.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message as _;
use tokio_util::codec::{Decoder, Encoder};

use crate::v1::{ErrorCode, Packet};

/// Default maximum body length of one frame: 1 MiB (design section 7).
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// Longest valid length prefix: a `u64` needs at most 10 LEB128 bytes.
pub const MAX_VARINT_LEN: usize = 10;

/// Why a byte stream could not be decoded into packets (or a packet not
/// encoded into a frame).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The frame's declared length (or an outgoing packet's encoded length)
    /// is above the maximum. Fatal for the stream.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Declared (or encoded) body length.
        len: u64,
        /// The configured maximum.
        max: usize,
    },
    /// The length prefix is longer than 10 bytes or overflows `u64`. Fatal
    /// for the stream.
    #[error("malformed frame length prefix")]
    BadVarint,
    /// The frame body is not a valid `Packet`. The frame was consumed; the
    /// stream stays in sync.
    #[error("frame does not hold a valid Packet: {0}")]
    BadPacket(#[from] prost::DecodeError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete frame (prefix included).
        buffered: usize,
    },
    /// Reading or writing the underlying transport failed (only produced by
    /// `tokio_util` framing around [`PacketCodec`]).
    #[error("transport error: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The stable error code to put in the `Reply` sent before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            CodecError::FrameTooLarge { .. } => ErrorCode::ErrorFrameTooLarge,
            CodecError::BadVarint | CodecError::BadPacket(_) | CodecError::Truncated { .. } => {
                ErrorCode::ErrorMalformedFrame
            }
            CodecError::Io(_) => ErrorCode::ErrorUnavailable,
        }
    }

    /// Whether the stream lost its frame boundaries (or ended): no further
    /// packet can be read from it and the connection must be closed.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, CodecError::BadPacket(_))
    }
}

/// Reads the varint length prefix at the start of `buf`.
///
/// Returns `Ok(Some((length, prefix_len)))`, `Ok(None)` if `buf` ends inside
/// the prefix, or [`CodecError::BadVarint`] as soon as the prefix is certain to
/// be longer than [`MAX_VARINT_LEN`] bytes or to overflow `u64`. Non-minimal
/// encodings (e.g. `80 00` for 0) are accepted, as protobuf does.
pub fn decode_length_prefix(buf: &[u8]) -> Result<Option<(u64, usize)>, CodecError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        // The 10th byte holds bit 63 only: anything above 1 (including a
        // continuation bit) overflows u64 or makes the prefix too long.
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(CodecError::BadVarint);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Ok(None)
}

/// Appends `packet` to `dst` as one frame (length prefix + body).
///
/// Does not check a maximum; [`PacketCodec`]'s encoder does.
pub fn encode_frame(packet: &Packet, dst: &mut BytesMut) {
    dst.reserve(encoded_frame_len(packet));
    // A BytesMut grows on demand, so encoding cannot run out of space and the
    // result is always Ok.
    let _ = packet.encode_length_delimited(dst);
}

/// Length of `packet`'s frame: prefix plus body.
pub fn encoded_frame_len(packet: &Packet) -> usize {
    let len = packet.encoded_len();
    prost::length_delimiter_len(len) + len
}

/// Appends already encoded `body` to `dst` as one frame (length prefix +
/// body): the same framing for a message that is not rim's `Packet` (gim's).
pub fn encode_raw_frame(body: &[u8], dst: &mut BytesMut) {
    dst.reserve(raw_frame_len(body));
    // A BytesMut grows on demand: encoding the prefix cannot fail.
    let _ = prost::encode_length_delimiter(body.len(), dst);
    dst.extend_from_slice(body);
}

/// Length of the frame of `body`: prefix plus body.
pub fn raw_frame_len(body: &[u8]) -> usize {
    prost::length_delimiter_len(body.len()) + body.len()
}

/// Decodes one `Packet` that arrived without a length prefix (a WebSocket
/// binary message), enforcing the same maximum as the TCP framing.
pub fn decode_unframed(data: Bytes, max_frame: usize) -> Result<Packet, CodecError> {
    if data.len() > max_frame {
        return Err(CodecError::FrameTooLarge { len: data.len() as u64, max: max_frame });
    }
    Ok(Packet::decode(data)?)
}

/// A fatal error remembered so it can be repeated (CodecError is not Clone
/// because of `Io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fatal {
    TooLarge { len: u64, max: usize },
    BadVarint,
}

impl From<Fatal> for CodecError {
    fn from(f: Fatal) -> Self {
        match f {
            Fatal::TooLarge { len, max } => CodecError::FrameTooLarge { len, max },
            Fatal::BadVarint => CodecError::BadVarint,
        }
    }
}

/// The frame state machine shared by [`FrameDecoder`] and [`PacketCodec`].
#[derive(Debug, Clone)]
struct Framing {
    max_frame: usize,
    fatal: Option<Fatal>,
}

impl Framing {
    fn new(max_frame: usize) -> Self {
        Framing { max_frame, fatal: None }
    }

    /// Decodes the first complete frame of `buf`, consuming it.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        match self.body(buf)? {
            Some(frame) => Ok(Some(Packet::decode(frame)?)),
            None => Ok(None),
        }
    }

    /// The body of the first complete frame of `buf`, consumed, undecoded.
    fn body(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        if let Some(fatal) = self.fatal {
            buf.clear();
            return Err(fatal.into());
        }
        let (len, prefix) = match decode_length_prefix(buf) {
            Ok(Some(found)) => found,
            Ok(None) => return Ok(None),
            Err(_) => return Err(self.fail(buf, Fatal::BadVarint)),
        };
        let body = match usize::try_from(len) {
            Ok(body) if body <= self.max_frame => body,
            _ => {
                let max = self.max_frame;
                return Err(self.fail(buf, Fatal::TooLarge { len, max }));
            }
        };
        // Cannot overflow: body <= max_frame and prefix <= 10; saturate anyway.
        let needed = prefix.saturating_add(body);
        if buf.len() < needed {
            // The body is within the maximum: make room for it once.
            buf.reserve(needed - buf.len());
            return Ok(None);
        }
        buf.advance(prefix);
        Ok(Some(buf.split_to(body).freeze()))
    }

    fn fail(&mut self, buf: &mut BytesMut, fatal: Fatal) -> CodecError {
        self.fatal = Some(fatal);
        buf.clear();
        fatal.into()
    }
}

/// Incremental, push-based frame decoder owning its input buffer.
///
/// ```
/// use rim_proto::codec::{encode_frame, FrameDecoder};
/// use rim_proto::v1::{Command, Packet};
///
/// let packet = Packet { request_id: 7, command: Command::Heartbeat as i32, ..Default::default() };
/// let mut wire = bytes::BytesMut::new();
/// encode_frame(&packet, &mut wire);
///
/// let mut decoder = FrameDecoder::default();
/// decoder.push(&wire[..1]);
/// assert_eq!(decoder.next_frame().unwrap(), None); // needs more bytes
/// decoder.push(&wire[1..]);
/// assert_eq!(decoder.next_frame().unwrap(), Some(packet));
/// ```
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    framing: Framing,
    buf: BytesMut,
}

impl FrameDecoder {
    /// A decoder refusing frames whose body is longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder { framing: Framing::new(max_frame), buf: BytesMut::new() }
    }

    /// The maximum frame body length.
    pub fn max_frame(&self) -> usize {
        self.framing.max_frame
    }

    /// Changes the maximum frame body length for the frames not yet
    /// decoded (a transport raises it once a connection signed in).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.framing.max_frame = max_frame;
    }

    /// Appends received bytes. Ignored once a fatal error was returned.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.framing.fatal.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete packet, `Ok(None)` if more bytes are needed, or an
    /// error. Call it until it returns `Ok(None)` after every [`push`].
    ///
    /// [`push`]: FrameDecoder::push
    pub fn next_frame(&mut self) -> Result<Option<Packet>, CodecError> {
        self.framing.decode(&mut self.buf)
    }

    /// Bytes received but not yet decoded (an incomplete frame, or frames not
    /// yet taken).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether a fatal error was returned; the decoder then accepts nothing.
    pub fn is_poisoned(&self) -> bool {
        self.framing.fatal.is_some()
    }

    /// At end of stream: `Ok` if no partial frame is left, otherwise
    /// [`CodecError::Truncated`] (or the sticky fatal error).
    pub fn finish(&self) -> Result<(), CodecError> {
        match self.framing.fatal {
            Some(fatal) => Err(fatal.into()),
            None if self.buf.is_empty() => Ok(()),
            None => Err(CodecError::Truncated { buffered: self.buf.len() }),
        }
    }
}

/// [`FrameDecoder`] for frames whose bodies are not rim's `Packet`: the
/// same framing rules (bounded prefix, maximum checked before the body is
/// awaited, sticky fatal errors), each body handed out undecoded. Gateways
/// use it for gim's `Packet`s, which share rim's framing.
#[derive(Debug, Clone)]
pub struct RawFrameDecoder {
    framing: Framing,
    buf: BytesMut,
}

impl RawFrameDecoder {
    /// A decoder refusing bodies longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        RawFrameDecoder { framing: Framing::new(max_frame), buf: BytesMut::new() }
    }

    /// The maximum body length.
    pub fn max_frame(&self) -> usize {
        self.framing.max_frame
    }

    /// Changes the maximum body length for the frames not yet decoded.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.framing.max_frame = max_frame;
    }

    /// Appends received bytes. Ignored once a fatal error was returned.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.framing.fatal.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete body, `Ok(None)` if more bytes are needed, or a
    /// fatal error ([`CodecError::FrameTooLarge`], [`CodecError::BadVarint`]),
    /// repeated on every later call.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, CodecError> {
        self.framing.body(&mut self.buf)
    }
}

impl Default for FrameDecoder {
    /// A decoder with the default 1 MiB maximum.
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_FRAME)
    }
}

/// [`Packet`] framing as a `tokio_util` codec, for `Framed` transports.
///
/// Decoding follows the same rules as [`FrameDecoder`] (the buffer belongs to
/// the `Framed`); at end of stream a partial frame is
/// [`CodecError::Truncated`]. Encoding refuses a packet whose body exceeds the
/// maximum, since the peer would refuse it.
#[derive(Debug, Clone)]
pub struct PacketCodec {
    framing: Framing,
}

impl PacketCodec {
    /// A codec refusing frames whose body is longer than `max_frame` bytes,
    /// in both directions.
    pub fn new(max_frame: usize) -> Self {
        PacketCodec { framing: Framing::new(max_frame) }
    }

    /// The maximum frame body length.
    pub fn max_frame(&self) -> usize {
        self.framing.max_frame
    }
}

impl Default for PacketCodec {
    /// A codec with the default 1 MiB maximum.
    fn default() -> Self {
        PacketCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for PacketCodec {
    type Item = Packet;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        self.framing.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        match self.framing.decode(src)? {
            Some(packet) => Ok(Some(packet)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated { buffered: src.len() }),
        }
    }
}

impl Encoder<&Packet> for PacketCodec {
    type Error = CodecError;

    fn encode(&mut self, packet: &Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = packet.encoded_len();
        if len > self.framing.max_frame {
            return Err(CodecError::FrameTooLarge { len: len as u64, max: self.framing.max_frame });
        }
        encode_frame(packet, dst);
        Ok(())
    }
}

impl Encoder<Packet> for PacketCodec {
    type Error = CodecError;

    fn encode(&mut self, packet: Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&packet, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Command, SignInInput};

    fn frame(packet: &Packet) -> BytesMut {
        let mut out = BytesMut::new();
        encode_frame(packet, &mut out);
        out
    }

    /// A packet whose body is exactly `len` bytes (len >= 5 and < 2^21).
    fn packet_with_body_len(len: usize) -> Packet {
        // Body = tag(1) + varint(content len) + content.
        let mut n = len - 2;
        while 1 + prost::length_delimiter_len(n) + n > len {
            n -= 1;
        }
        let packet = Packet { content: Bytes::from(vec![0xAB; n]), ..Default::default() };
        assert_eq!(packet.encoded_len(), len);
        packet
    }

    fn drain(decoder: &mut FrameDecoder) -> Result<Vec<Packet>, CodecError> {
        let mut out = Vec::new();
        while let Some(p) = decoder.next_frame()? {
            out.push(p);
        }
        Ok(out)
    }

    #[test]
    fn empty_packet_is_a_zero_length_frame() {
        assert_eq!(&frame(&Packet::default())[..], &[0x00]);
        let mut d = FrameDecoder::default();
        d.push(&[0x00]);
        assert_eq!(d.next_frame().unwrap(), Some(Packet::default()));
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.buffered(), 0);
        d.finish().unwrap();
    }

    #[test]
    fn exactly_max_size_is_accepted() {
        let packet = packet_with_body_len(DEFAULT_MAX_FRAME);
        let wire = frame(&packet);
        assert_eq!(wire.len(), DEFAULT_MAX_FRAME + 3);
        let mut d = FrameDecoder::default();
        d.push(&wire);
        assert_eq!(d.next_frame().unwrap(), Some(packet));

        // Small maximum too, and through the tokio codec.
        let small = packet_with_body_len(40);
        let mut codec = PacketCodec::new(40);
        let mut buf = BytesMut::new();
        codec.encode(&small, &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(small));
    }

    #[test]
    fn max_plus_one_is_rejected_from_the_prefix_alone() {
        let mut prefix = BytesMut::new();
        prost::encoding::encode_varint(DEFAULT_MAX_FRAME as u64 + 1, &mut prefix);
        let mut d = FrameDecoder::default();
        d.push(&prefix);
        // No body pushed: the error comes before any of it is awaited.
        match d.next_frame() {
            Err(CodecError::FrameTooLarge { len, max }) => {
                assert_eq!(len, DEFAULT_MAX_FRAME as u64 + 1);
                assert_eq!(max, DEFAULT_MAX_FRAME);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(d.buffered(), 0);
        assert!(d.is_poisoned());
        // Sticky: later input is discarded and the error repeats.
        d.push(&[0u8; 4096]);
        assert_eq!(d.buffered(), 0);
        let err = d.next_frame().unwrap_err();
        assert!(matches!(err, CodecError::FrameTooLarge { .. }));
        assert_eq!(err.code(), ErrorCode::ErrorFrameTooLarge);
        assert!(err.is_fatal());

        // The tokio codec neither reserves nor waits for the body.
        let mut codec = PacketCodec::new(100);
        let mut buf = BytesMut::from(&[101u8, 1, 2, 3][..]);
        assert!(matches!(codec.decode(&mut buf), Err(CodecError::FrameTooLarge { len: 101, max: 100 })));
        assert!(buf.is_empty());
    }

    #[test]
    fn huge_declared_length_does_not_allocate() {
        let mut d = FrameDecoder::new(16);
        d.push(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(d.next_frame(), Err(CodecError::FrameTooLarge { len: u64::MAX, max: 16 })));
    }

    #[test]
    fn varint_length_limits() {
        // Ten bytes is the longest valid prefix (non-minimal zero here).
        let mut ten = vec![0x80u8; 9];
        ten.push(0x00);
        assert_eq!(decode_length_prefix(&ten).unwrap(), Some((0, 10)));
        let mut d = FrameDecoder::default();
        d.push(&ten);
        assert_eq!(d.next_frame().unwrap(), Some(Packet::default()));

        // Nine continuation bytes: still incomplete, not an error.
        assert_eq!(decode_length_prefix(&[0x80; 9]).unwrap(), None);
        let mut d = FrameDecoder::default();
        d.push(&[0x80; 9]);
        assert_eq!(d.next_frame().unwrap(), None);

        // An 11th byte would be needed: rejected.
        assert!(matches!(decode_length_prefix(&[0x80; 10]), Err(CodecError::BadVarint)));
        // The 10th byte may only carry bit 63.
        let mut overflow = vec![0xffu8; 9];
        overflow.push(0x02);
        assert!(matches!(decode_length_prefix(&overflow), Err(CodecError::BadVarint)));
        let mut d = FrameDecoder::default();
        d.push(&[0x80; 10]);
        let err = d.next_frame().unwrap_err();
        assert!(matches!(err, CodecError::BadVarint));
        assert_eq!(err.code(), ErrorCode::ErrorMalformedFrame);
        assert!(d.is_poisoned());
        assert!(matches!(d.finish(), Err(CodecError::BadVarint)));

        // u64::MAX itself is a valid prefix.
        let mut max = BytesMut::new();
        prost::encoding::encode_varint(u64::MAX, &mut max);
        assert_eq!(max.len(), 10);
        assert_eq!(decode_length_prefix(&max).unwrap(), Some((u64::MAX, 10)));
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let packets: Vec<Packet> = (0..5u64)
            .map(|i| Packet {
                request_id: i + 1,
                command: Command::Sync as i32,
                content: Bytes::from(vec![i as u8; i as usize * 100]),
                seq: i * 7,
            })
            .collect();
        let mut wire = BytesMut::new();
        for p in &packets {
            encode_frame(p, &mut wire);
        }
        // Plus half of another frame.
        let extra = frame(&packets[4]);
        wire.extend_from_slice(&extra[..extra.len() / 2]);

        let mut d = FrameDecoder::default();
        d.push(&wire);
        assert_eq!(drain(&mut d).unwrap(), packets);
        assert_eq!(d.buffered(), extra.len() / 2);
        assert!(matches!(d.finish(), Err(CodecError::Truncated { .. })));
        d.push(&extra[extra.len() / 2..]);
        assert_eq!(drain(&mut d).unwrap(), vec![packets[4].clone()]);
        d.finish().unwrap();
    }

    #[test]
    fn bad_packet_is_skipped_and_the_stream_continues() {
        let good = Packet { request_id: 9, command: Command::Heartbeat as i32, ..Default::default() };
        let mut wire = BytesMut::from(&[0x01u8, 0xff][..]); // truncated tag varint
        encode_frame(&good, &mut wire);
        let mut d = FrameDecoder::default();
        d.push(&wire);
        let err = d.next_frame().unwrap_err();
        assert!(matches!(err, CodecError::BadPacket(_)));
        assert!(!err.is_fatal());
        assert_eq!(err.code(), ErrorCode::ErrorMalformedFrame);
        assert!(!d.is_poisoned());
        assert_eq!(d.next_frame().unwrap(), Some(good));
    }

    #[test]
    fn byte_by_byte_feeding() {
        let packet = packet_with_body_len(300);
        let wire = frame(&packet);
        let mut d = FrameDecoder::default();
        for (i, b) in wire.iter().enumerate() {
            d.push(&[*b]);
            let got = d.next_frame().unwrap();
            assert_eq!(got.is_some(), i == wire.len() - 1);
            if let Some(p) = got {
                assert_eq!(p, packet);
            }
        }
    }

    #[test]
    fn tokio_codec_eof_and_encoder_limit() {
        let mut codec = PacketCodec::default();
        let mut buf = BytesMut::from(&[0x05u8, 0x08][..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(matches!(codec.decode_eof(&mut buf), Err(CodecError::Truncated { buffered: 2 })));
        assert_eq!(codec.decode_eof(&mut BytesMut::new()).unwrap(), None);

        let mut small = PacketCodec::new(10);
        let err = small.encode(packet_with_body_len(11), &mut BytesMut::new()).unwrap_err();
        assert!(matches!(err, CodecError::FrameTooLarge { len: 11, max: 10 }));
    }

    #[test]
    fn unframed_decoding_checks_the_maximum() {
        let packet = packet_with_body_len(20);
        let body = Bytes::from(packet.encode_to_vec());
        assert_eq!(decode_unframed(body.clone(), 20).unwrap(), packet);
        assert!(matches!(decode_unframed(body, 19), Err(CodecError::FrameTooLarge { len: 20, max: 19 })));
    }

    /// The example frame printed in docs/protocol.md.
    #[test]
    fn documented_sign_in_frame() {
        let input = SignInInput { user_id: 10001, device_id: 20001, token: "tk".into() };
        let packet = Packet {
            request_id: 1,
            command: Command::SignIn as i32,
            content: Bytes::from(input.encode_to_vec()),
            seq: 0,
        };
        let hex: Vec<String> = frame(&packet).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex.join(" "), "11 08 01 10 01 1a 0b 08 91 4e 10 a1 9c 01 1a 02 74 6b");
    }
}
