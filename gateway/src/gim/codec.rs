//! gim's TCP framing, and the byte accounting of translated frames.
//!
//! A gim TCP frame is an unsigned LEB128 varint length followed by that many
//! bytes of a `connect.Packet`, both ways (gim's `pkg/codec/uvarint.go`):
//! the same framing as rim's, so the length prefix is read by
//! [`rim_proto::codec::decode_length_prefix`] and the same rules hold (at
//! most 10 prefix bytes, a maximum body checked before the body is awaited,
//! partial reads buffered; gim itself had no maximum and dropped split
//! frames). What differs is the body: a gim `Packet` (string
//! `request_id`) that rim's decoder would refuse, so [`RawFrames`] hands out
//! the body's bytes and the translator decodes them.
//!
//! [`Credit`] converts bytes written to the socket (gim frames) back into
//! the bytes the session counted for them (rim frames), so the session's
//! send-queue limit keeps working on a gim connection.

use bytes::{Buf as _, Bytes, BytesMut};
use rim_proto::CodecError;
use rim_proto::codec::decode_length_prefix;

/// A fatal framing error, remembered so it is repeated.
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

/// Push-based decoder of varint-length-delimited frames, yielding each
/// frame's body undecoded.
#[derive(Debug)]
pub(crate) struct RawFrames {
    buf: BytesMut,
    max_frame: usize,
    fatal: Option<Fatal>,
}

impl RawFrames {
    /// A decoder refusing bodies longer than `max_frame` bytes.
    pub(crate) fn new(max_frame: usize) -> RawFrames {
        RawFrames { buf: BytesMut::new(), max_frame, fatal: None }
    }

    /// The current maximum body length.
    pub(crate) fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the maximum for frames not yet decoded.
    pub(crate) fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Appends received bytes (ignored after a fatal error).
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.fatal.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete body, `Ok(None)` if more bytes are needed, or a
    /// fatal error ([`CodecError::FrameTooLarge`], [`CodecError::BadVarint`]),
    /// repeated on every later call.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Bytes>, CodecError> {
        if let Some(fatal) = self.fatal {
            return Err(fatal.into());
        }
        let (len, prefix) = match decode_length_prefix(&self.buf) {
            Ok(Some(found)) => found,
            Ok(None) => return Ok(None),
            Err(_) => return Err(self.fail(Fatal::BadVarint)),
        };
        let body = match usize::try_from(len) {
            Ok(body) if body <= self.max_frame => body,
            _ => return Err(self.fail(Fatal::TooLarge { len, max: self.max_frame })),
        };
        let needed = prefix.saturating_add(body);
        if self.buf.len() < needed {
            self.buf.reserve(needed - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(prefix);
        Ok(Some(self.buf.split_to(body).freeze()))
    }

    fn fail(&mut self, fatal: Fatal) -> CodecError {
        self.fatal = Some(fatal);
        self.buf = BytesMut::new();
        fatal.into()
    }
}

/// Appends `body` to `dst` as one frame (varint length, then the body).
pub(crate) fn encode_frame(body: &[u8], dst: &mut BytesMut) {
    let mut len = body.len() as u64;
    dst.reserve(prost::length_delimiter_len(body.len()) + body.len());
    while len >= 0x80 {
        dst.extend_from_slice(&[(len as u8) | 0x80]);
        len >>= 7;
    }
    dst.extend_from_slice(&[len as u8]);
    dst.extend_from_slice(body);
}

/// Length of `body`'s frame.
pub(crate) fn frame_len(body: &[u8]) -> usize {
    prost::length_delimiter_len(body.len()) + body.len()
}

/// Bytes queued for the socket in gim frames, and what the session counted
/// for them in rim frames.
///
/// Bytes written are credited in proportion until the queue is empty,
/// then exactly: whatever the ratio of the two sizes, everything the
/// session counted is credited once the socket took everything queued, so
/// the session's count never drifts. O(1) memory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Credit {
    wire: usize,
    counted: usize,
}

impl Credit {
    /// A frame of `wire` bytes was queued for a packet the session counted
    /// as `counted` bytes.
    pub(crate) fn queued(&mut self, wire: usize, counted: usize) {
        self.wire = self.wire.saturating_add(wire);
        self.counted = self.counted.saturating_add(counted);
    }

    /// `n` queued bytes were written; returns the bytes to report to the
    /// session ([`Session::on_written`](crate::Session::on_written)).
    pub(crate) fn written(&mut self, n: usize) -> usize {
        if n >= self.wire {
            return std::mem::take(self).counted;
        }
        let credit = (self.counted as u128 * n as u128 / self.wire as u128) as usize;
        self.wire -= n;
        self.counted -= credit;
        credit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode_frame(body, &mut out);
        out
    }

    #[test]
    fn frames_round_trip_at_varint_boundaries_and_split_anywhere() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = framed(&body);
            assert_eq!(wire.len(), frame_len(&body));
            assert_eq!(wire.len(), prost::length_delimiter_len(len) + len, "prefix of {len}");
            // Byte by byte: nothing before the last byte, the body after it.
            let mut d = RawFrames::new(1 << 20);
            for (i, b) in wire.iter().enumerate() {
                assert_eq!(d.next_frame().unwrap(), None, "len {len}: a frame after {i} bytes");
                d.push(&[*b]);
            }
            assert_eq!(d.next_frame().unwrap().as_deref(), Some(&body[..]));
            assert_eq!(d.next_frame().unwrap(), None);
        }
        // Many frames in one push.
        let mut wire = framed(b"a");
        wire.extend_from_slice(&framed(b""));
        wire.extend_from_slice(&framed(b"ccc"));
        let mut d = RawFrames::new(16);
        d.push(&wire);
        assert_eq!(d.next_frame().unwrap().as_deref(), Some(&b"a"[..]));
        assert_eq!(d.next_frame().unwrap().as_deref(), Some(&b""[..]));
        assert_eq!(d.next_frame().unwrap().as_deref(), Some(&b"ccc"[..]));
        assert_eq!(d.next_frame().unwrap(), None);
    }

    #[test]
    fn bounds_are_checked_before_the_body_and_errors_stick() {
        // Exactly the maximum is fine; one more is refused from the prefix alone.
        let mut d = RawFrames::new(300);
        d.push(&framed(&[7u8; 300]));
        assert_eq!(d.next_frame().unwrap().map(|b| b.len()), Some(300));
        let mut d = RawFrames::new(300);
        d.push(&[0xad, 0x02]); // 301, no body yet
        assert!(matches!(d.next_frame(), Err(CodecError::FrameTooLarge { len: 301, max: 300 })));
        d.push(b"more");
        assert!(matches!(d.next_frame(), Err(CodecError::FrameTooLarge { .. })), "sticky");
        // A prefix of 11 bytes, or one overflowing u64, is malformed.
        let mut d = RawFrames::new(300);
        d.push(&[0xff; 11]);
        assert!(matches!(d.next_frame(), Err(CodecError::BadVarint)));
        let mut d = RawFrames::new(300);
        d.push(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]);
        assert!(matches!(d.next_frame(), Err(CodecError::BadVarint)));
        // A 10-byte prefix holding a huge (valid) length is too large.
        let mut d = RawFrames::new(300);
        d.push(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(d.next_frame(), Err(CodecError::FrameTooLarge { len: u64::MAX, .. })));
        // Raising the maximum lets a waiting larger frame through.
        let mut d = RawFrames::new(4);
        d.push(&framed(b"abc"));
        assert_eq!(d.next_frame().unwrap().as_deref(), Some(&b"abc"[..]));
        d.set_max_frame(8);
        assert_eq!(d.max_frame(), 8);
        d.push(&framed(b"abcdefg"));
        assert_eq!(d.next_frame().unwrap().as_deref(), Some(&b"abcdefg"[..]));
    }

    #[test]
    fn credit_never_drifts() {
        let mut c = Credit::default();
        c.queued(10, 20);
        c.queued(30, 20);
        let mut total = c.written(20);
        assert!(total <= 40);
        total += c.written(5);
        total += c.written(15);
        assert_eq!(total, 40, "all counted bytes are credited once all left");
        assert_eq!(c, Credit::default());
        // Smaller wire frames than counted ones, and the reverse.
        c.queued(3, 100);
        assert_eq!(c.written(3), 100);
        c.queued(100, 3);
        assert_eq!(c.written(50), 1);
        assert_eq!(c.written(1000), 2);
        assert_eq!(c.written(0), 0);
    }
}
