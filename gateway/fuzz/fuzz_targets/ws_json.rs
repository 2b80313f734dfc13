//! The WebSocket JSON decoder on arbitrary text: it never panics, and what
//! it accepts survives the server's own JSON form unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rim_gateway::ws::{packet_from_json, packet_to_json};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(packet) = packet_from_json(text) {
        let again = packet_from_json(&packet_to_json(&packet)).expect("the server's own form parses");
        assert_eq!(again, packet);
    }
});
