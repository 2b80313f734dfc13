//! Properties of the WebSocket JSON decoder (the hostile-clients issue §6;
//! `gateway/fuzz` searches the same properties longer): on any text it
//! returns a packet or an error, never panics; every packet survives the
//! server's JSON form; and what it accepts is exactly what the documented
//! form allows.
#![allow(missing_docs)]

use bytes::Bytes;
use proptest::prelude::*;
use rim_gateway::ws::{packet_from_json, packet_to_json};
use rim_proto::v1::Packet;

fn packet() -> impl Strategy<Value = Packet> {
    (any::<u64>(), any::<i32>(), proptest::collection::vec(any::<u8>(), 0..300), any::<u64>()).prop_map(
        |(request_id, command, content, seq)| Packet {
            request_id,
            command,
            content: Bytes::from(content),
            seq,
        },
    )
}

/// JSON-looking text: fragments of the real form, shuffled and cut.
fn jsonish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\"request_id\"".to_string()),
        Just("\"command\"".to_string()),
        Just("\"content\"".to_string()),
        Just("\"seq\"".to_string()),
        Just("null".to_string()),
        "-?[0-9]{1,25}(\\.[0-9]{1,3})?(e[0-9]{1,3})?",
        "\"[A-Za-z0-9+/=_ ]{0,12}\"",
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_packet_round_trips(p in packet()) {
        prop_assert_eq!(packet_from_json(&packet_to_json(&p)).unwrap(), p);
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = packet_from_json(&text);
    }

    #[test]
    fn json_like_text_is_decoded_or_refused_and_accepted_packets_round_trip(text in jsonish()) {
        if let Ok(p) = packet_from_json(&text) {
            prop_assert_eq!(packet_from_json(&packet_to_json(&p)).unwrap(), p);
        }
    }
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    for depth in [200, 10_000] {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(packet_from_json(&text).is_err());
        let text = format!("{{\"content\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        assert!(packet_from_json(&text).is_err());
    }
}
