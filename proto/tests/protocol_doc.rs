//! The worked session example of `docs/protocol.md` is what the codec
//! produces: every `C→S` / `S→C` line of the example equals, byte for byte,
//! the frame of the packet it describes.

use bytes::Bytes;
use prost::Message as _;
use rim_proto::codec::encode_frame;
use rim_proto::v1::*;

const T0: i64 = 1_767_225_600_000;

fn packet(request_id: u64, command: Command, content: Vec<u8>, seq: u64) -> Packet {
    Packet { request_id, command: command as i32, content: Bytes::from(content), seq }
}

fn ok(data: impl prost::Message) -> Vec<u8> {
    Reply { code: 0, message: String::new(), data: Bytes::from(data.encode_to_vec()), retry_after_ms: 0 }
        .encode_to_vec()
}

/// The example's packets, in order.
fn session() -> Vec<Packet> {
    let sign_in = SignInInput { user_id: 10001, device_id: 20001, token: "tk".into() };
    let signed_in = SignInOutput {
        user_id: 10001,
        device_id: 20001,
        last_seq: 2,
        ack_seq: 2,
        server_time_ms: T0,
        heartbeat_interval_ms: 30_000,
        super_groups: Vec::new(),
    };
    let send = SendInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: 10002,
        client_msg_id: "m-1".into(),
        content_type: ContentType::Text as i32,
        content: Bytes::from_static(b"hi"),
        ..Default::default()
    };
    let sent = SendOutput { seq: 3, message_id: 9001, send_time_ms: T0 + 1000, group_seq: 0 };
    let pushed = Message {
        message_id: 9002,
        sender_user_id: 10002,
        sender_device_id: 20002,
        conversation_kind: ConversationKind::User as i32,
        conversation_id: 10001,
        seq: 4,
        client_msg_id: "b-1".into(),
        send_time_ms: T0 + 2000,
        content_type: ContentType::Text as i32,
        content: Bytes::from_static(b"yo"),
        ..Default::default()
    };
    let push = MessagePush { message: Some(pushed), persisted: true };
    vec![
        packet(1, Command::SignIn, sign_in.encode_to_vec(), 0),
        packet(1, Command::SignIn, ok(signed_in), 0),
        packet(2, Command::Heartbeat, Vec::new(), 0),
        packet(2, Command::Heartbeat, Vec::new(), 0),
        packet(3, Command::Send, send.encode_to_vec(), 0),
        packet(3, Command::Send, ok(sent), 0),
        packet(0, Command::Message, push.encode_to_vec(), 4),
        packet(4, Command::Ack, AckInput { seq: 4 }.encode_to_vec(), 0),
        packet(4, Command::Ack, ok(AckOutput { ack_seq: 4 }), 0),
    ]
}

/// The hex of every frame line in the doc's worked example, in order.
fn documented_frames() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md");
    let start = doc.find("### Worked example: a session in bytes").expect("the worked example section");
    let block = &doc[start..];
    let block = &block[..block.find("\n```\n").expect("end of the example block")];
    block
        .lines()
        .filter_map(|l| l.strip_prefix("C→S ").or_else(|| l.strip_prefix("S→C ")))
        .map(|hex| hex.trim().to_string())
        .collect()
}

#[test]
fn worked_session_example_matches_the_codec() {
    let documented = documented_frames();
    let packets = session();
    assert_eq!(documented.len(), packets.len(), "one documented line per packet");
    for (i, (p, doc)) in packets.iter().zip(&documented).enumerate() {
        let mut frame = bytes::BytesMut::new();
        encode_frame(p, &mut frame);
        let hex: Vec<String> = frame.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&hex.join(" "), doc, "frame {i} ({:?})", p.command());
    }
}
