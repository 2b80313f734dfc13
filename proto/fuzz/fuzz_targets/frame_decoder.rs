//! Fuzzes the TCP frame decoder with arbitrary bytes.
//!
//! The first input byte picks the maximum frame size (small, so the
//! too-large path is hit often, or the default 1 MiB) and the second picks
//! where the rest is split in two. The rest is decoded whole and split: both
//! must give the same outcomes, nothing may panic, a fatal error must stay
//! fatal, and the tokio codec and the unframed (WebSocket) decoder must not
//! panic on the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rim_proto::codec::{DEFAULT_MAX_FRAME, FrameDecoder, PacketCodec, decode_length_prefix, decode_unframed};
use tokio_util::codec::Decoder as _;

/// Packets and error texts, in order, until the decoder needs more input or
/// fails fatally.
fn run(max_frame: usize, pieces: &[&[u8]]) -> Vec<Result<rim_proto::v1::Packet, String>> {
    let mut decoder = FrameDecoder::new(max_frame);
    let mut out = Vec::new();
    for piece in pieces {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(packet)) => out.push(Ok(packet)),
                Ok(None) => break,
                Err(err) => {
                    out.push(Err(err.to_string()));
                    if err.is_fatal() {
                        assert!(decoder.is_poisoned());
                        assert_eq!(decoder.buffered(), 0);
                        decoder.push(piece);
                        assert_eq!(decoder.buffered(), 0);
                        assert!(decoder.next_frame().is_err());
                        return out;
                    }
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [limit, cut, rest @ ..] = data else {
        return;
    };
    let max_frame = if *limit == 0xff { DEFAULT_MAX_FRAME } else { usize::from(*limit) };
    let at = usize::from(*cut).min(rest.len());

    let whole = run(max_frame, &[rest]);
    let split = run(max_frame, &[&rest[..at], &rest[at..]]);
    assert_eq!(whole, split);

    let _ = decode_length_prefix(rest);
    let _ = decode_unframed(bytes::Bytes::copy_from_slice(rest), max_frame);
    let mut codec = PacketCodec::new(max_frame);
    let mut buf = bytes::BytesMut::from(rest);
    while let Ok(Some(_)) = codec.decode_eof(&mut buf) {}
});
