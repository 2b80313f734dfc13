//! gim's TCP framing, and the byte accounting of translated frames.
//!
//! A gim TCP frame is an unsigned LEB128 varint length followed by that many
//! bytes of a `connect.Packet`, both ways (gim's `pkg/codec/uvarint.go`):
//! the same framing as rim's, so rim's codec frames it
//! ([`rim_proto::codec::RawFrameDecoder`], here `RawFrames`) and the same
//! rules hold (at most 10 prefix bytes, a maximum body checked before the
//! body is awaited, partial reads buffered; gim itself had no maximum and
//! dropped split frames). What differs is the body: a gim `Packet` (string
//! `request_id`) that rim's decoder would refuse, so the raw decoder hands
//! out the body's bytes and the translator decodes them.
//!
//! [`Credit`] converts bytes written to the socket (gim frames) back into
//! the bytes the session counted for them (rim frames), so the session's
//! send-queue limit keeps working on a gim connection.

pub(crate) use rim_proto::codec::{
    RawFrameDecoder as RawFrames, encode_raw_frame as encode_frame, raw_frame_len as frame_len,
};

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
    use bytes::BytesMut;
    use rim_proto::CodecError;

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
