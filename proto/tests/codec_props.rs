//! Property tests of the TCP framing codec and of the message envelope.
//!
//! * frames round-trip: any sequence of packets, encoded back to back, decodes
//!   to the same sequence;
//! * split-invariance: cutting the byte stream at arbitrary points and pushing
//!   the pieces one by one gives the same packets;
//! * robustness: arbitrary bytes (whole or split, any maximum) never panic and
//!   a fatal error stays fatal;
//! * `rim.v1.Message` round-trips through prost.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message as _;
use rim_proto::codec::{
    CodecError, FrameDecoder, PacketCodec, decode_length_prefix, decode_unframed, encode_frame,
};
use rim_proto::v1::{Message, Packet};
use tokio_util::codec::Decoder as _;

fn arb_packet() -> impl Strategy<Value = Packet> {
    (any::<u64>(), any::<i32>(), vec(any::<u8>(), 0..300), any::<u64>()).prop_map(
        |(request_id, command, content, seq)| Packet {
            request_id,
            command,
            content: Bytes::from(content),
            seq,
        },
    )
}

fn arb_message() -> impl Strategy<Value = Message> {
    (
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<i32>()),
        (any::<u64>(), any::<u64>(), ".{0,40}", any::<i64>()),
        (any::<i32>(), vec(any::<u8>(), 0..200), any::<i32>()),
        (any::<u64>(), any::<u64>(), vec(any::<u64>(), 0..8)),
    )
        .prop_map(
            |(
                (message_id, sender_user_id, sender_device_id, conversation_kind),
                (conversation_id, seq, client_msg_id, send_time_ms),
                (content_type, content, status),
                (group_seq, refers_to, mentions),
            )| Message {
                message_id,
                sender_user_id,
                sender_device_id,
                conversation_kind,
                conversation_id,
                seq,
                client_msg_id,
                send_time_ms,
                content_type,
                content: Bytes::from(content),
                status,
                group_seq,
                refers_to,
                mentions,
            },
        )
}

fn encode_all(packets: &[Packet]) -> BytesMut {
    let mut wire = BytesMut::new();
    for p in packets {
        encode_frame(p, &mut wire);
    }
    wire
}

/// Pushes `wire` cut at `cuts` and drains after every piece.
fn decode_split(wire: &[u8], cuts: &[Index], max_frame: usize) -> Result<Vec<Packet>, String> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
    points.push(0);
    points.push(wire.len());
    points.sort_unstable();
    let mut decoder = FrameDecoder::new(max_frame);
    let mut out = Vec::new();
    for pair in points.windows(2) {
        decoder.push(&wire[pair[0]..pair[1]]);
        loop {
            match decoder.next_frame() {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    decoder.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Feeds arbitrary bytes; returns the outcomes (packets and error
/// descriptions), checking along the way that fatal errors are sticky.
fn outcomes(decoder: &mut FrameDecoder, pieces: &[&[u8]]) -> Vec<Result<Packet, String>> {
    let mut out = Vec::new();
    for piece in pieces {
        decoder.push(piece);
        // Each frame consumes at least one byte, so this loop ends; the
        // bound guards against a regression turning it into a hang.
        for _ in 0..=piece.len() + 1 {
            match decoder.next_frame() {
                Ok(Some(p)) => out.push(Ok(p)),
                Ok(None) => break,
                Err(e) => {
                    let fatal = e.is_fatal();
                    out.push(Err(e.to_string()));
                    if fatal {
                        assert!(decoder.is_poisoned());
                        assert_eq!(decoder.buffered(), 0);
                        let again = decoder.next_frame().unwrap_err();
                        assert_eq!(again.to_string(), e.to_string());
                        return out;
                    }
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_round_trip(packets in vec(arb_packet(), 0..20)) {
        let wire = encode_all(&packets);
        prop_assert_eq!(decode_split(&wire, &[], 1 << 20), Ok(packets.clone()));

        // The tokio codec agrees.
        let mut codec = PacketCodec::default();
        let mut buf = wire.clone();
        let mut got = Vec::new();
        while let Some(p) = codec.decode_eof(&mut buf).unwrap() {
            got.push(p);
        }
        prop_assert_eq!(got, packets);
    }

    #[test]
    fn split_points_do_not_matter(
        packets in vec(arb_packet(), 0..12),
        cuts in vec(any::<Index>(), 0..40),
    ) {
        let wire = encode_all(&packets);
        prop_assert_eq!(decode_split(&wire, &cuts, 1 << 20), Ok(packets));
    }

    #[test]
    fn byte_at_a_time(packets in vec(arb_packet(), 0..4)) {
        let wire = encode_all(&packets);
        let mut decoder = FrameDecoder::default();
        let mut got = Vec::new();
        for b in wire.iter() {
            decoder.push(&[*b]);
            while let Some(p) = decoder.next_frame().unwrap() {
                got.push(p);
            }
        }
        prop_assert_eq!(got, packets);
    }

    #[test]
    fn frame_limit_is_exact(packet in arb_packet()) {
        let body = packet.encoded_len();
        let wire = encode_all(std::slice::from_ref(&packet));
        prop_assert_eq!(decode_split(&wire, &[], body), Ok(vec![packet.clone()]));
        if body > 0 {
            let mut decoder = FrameDecoder::new(body - 1);
            // The prefix alone is enough to reject it.
            let prefix = wire.len() - body;
            decoder.push(&wire[..prefix]);
            let rejected = matches!(
                decoder.next_frame(),
                Err(CodecError::FrameTooLarge { len, max }) if len == body as u64 && max == body - 1
            );
            prop_assert!(rejected);
        }
    }

    #[test]
    fn garbage_never_panics(
        data in vec(any::<u8>(), 0..2048),
        cut in any::<Index>(),
        max_frame in prop_oneof![0usize..64, Just(1usize << 20)],
    ) {
        let whole = outcomes(&mut FrameDecoder::new(max_frame), &[&data]);
        let at = cut.index(data.len() + 1);
        let split = outcomes(&mut FrameDecoder::new(max_frame), &[&data[..at], &data[at..]]);
        prop_assert_eq!(whole, split);

        let _ = decode_length_prefix(&data);
        let _ = decode_unframed(Bytes::from(data.clone()), max_frame);
        let mut codec = PacketCodec::new(max_frame);
        let mut buf = BytesMut::from(&data[..]);
        for _ in 0..=data.len() {
            match codec.decode_eof(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if e.is_fatal() => break,
                Err(_) => {}
            }
        }
    }

    #[test]
    fn garbage_after_valid_frames_keeps_them(
        packets in vec(arb_packet(), 1..5),
        tail in vec(any::<u8>(), 0..64),
    ) {
        let mut wire = encode_all(&packets);
        wire.extend_from_slice(&tail);
        let got = outcomes(&mut FrameDecoder::default(), &[&wire]);
        let prefix: Vec<Packet> = got.iter().take(packets.len()).filter_map(|r| r.clone().ok()).collect();
        prop_assert_eq!(prefix, packets);
    }

    #[test]
    fn message_round_trips(message in arb_message()) {
        let bytes = message.encode_to_vec();
        prop_assert_eq!(bytes.len(), message.encoded_len());
        prop_assert_eq!(Message::decode(&bytes[..]).unwrap(), message.clone());

        // Also inside a packet, inside a frame.
        let packet = Packet {
            request_id: 0,
            command: rim_proto::v1::Command::Message as i32,
            content: Bytes::from(bytes),
            seq: message.seq,
        };
        let wire = encode_all(std::slice::from_ref(&packet));
        let decoded = decode_split(&wire, &[], 1 << 20).unwrap();
        prop_assert_eq!(Message::decode(decoded[0].content.clone()).unwrap(), message);
    }
}
