//! A test client of the gateway's TCP transport: the varint framing over a
//! plain tokio socket, with helpers for requests, pushes and sign-in.
#![allow(dead_code, missing_docs)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::codec::{FrameDecoder, encode_frame};
use rim_proto::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cluster::Device;

/// How long any single wait may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// Whether `p` answers a request (not a push).
pub fn is_reply(p: &Packet) -> bool {
    p.command != Command::Message as i32 && p.command != Command::Kick as i32
}

/// A client speaking the framing over a plain tokio socket.
pub struct Client {
    pub stream: TcpStream,
    pub decoder: FrameDecoder,
    /// Packets received while waiting for something else.
    pub unread: VecDeque<Packet>,
    pub next_request: u64,
}

impl Client {
    pub async fn connect(addr: std::net::SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Client { stream, decoder: FrameDecoder::default(), unread: VecDeque::new(), next_request: 0 }
    }

    pub fn frame(packet: &Packet) -> BytesMut {
        let mut wire = BytesMut::new();
        encode_frame(packet, &mut wire);
        wire
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends a request; returns its request id.
    pub async fn send(&mut self, command: Command, content: Vec<u8>) -> u64 {
        self.next_request += 1;
        let packet = Packet {
            request_id: self.next_request,
            command: command as i32,
            content: content.into(),
            seq: 0,
        };
        self.write(&Self::frame(&packet)).await;
        self.next_request
    }

    /// The next packet from the wire; `None` at end of stream (or a reset).
    pub async fn read_packet(&mut self, deadline: Instant) -> Option<Packet> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(p) = self.decoder.next_frame().expect("well-formed frames from the gateway") {
                return Some(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Err(_) => panic!("no packet from the gateway in time"),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    assert_eq!(self.decoder.buffered(), 0, "the stream ended inside a frame");
                    return None;
                }
                Ok(Ok(n)) => self.decoder.push(&buf[..n]),
            }
        }
    }

    /// The next packet, unread ones first; panics at end of stream.
    pub async fn next(&mut self) -> Packet {
        if let Some(p) = self.unread.pop_front() {
            return p;
        }
        let deadline = Instant::now() + WAIT;
        self.read_packet(deadline).await.expect("a packet, not the end of the stream")
    }

    /// Waits for the reply to `request_id`, keeping other packets.
    pub async fn reply(&mut self, request_id: u64) -> Reply {
        if let Some(i) = self.unread.iter().position(|p| p.request_id == request_id && is_reply(p)) {
            let p = self.unread.remove(i).unwrap();
            return Reply::decode(p.content).unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let p = self.read_packet(deadline).await.expect("a reply, not the end of the stream");
            if p.request_id == request_id && is_reply(&p) {
                return Reply::decode(p.content).unwrap();
            }
            self.unread.push_back(p);
        }
    }

    pub async fn request(&mut self, command: Command, content: Vec<u8>) -> Reply {
        let id = self.send(command, content).await;
        self.reply(id).await
    }

    /// Waits for a `MESSAGE` push of `seq`, keeping other packets.
    pub async fn push(&mut self, seq: u64) -> MessagePush {
        if let Some(i) = self.unread.iter().position(|p| p.command == Command::Message as i32 && p.seq == seq)
        {
            let p = self.unread.remove(i).unwrap();
            return MessagePush::decode(p.content).unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let p = self.read_packet(deadline).await.expect("a push, not the end of the stream");
            if p.command == Command::Message as i32 && p.seq == seq {
                return MessagePush::decode(p.content).unwrap();
            }
            self.unread.push_back(p);
        }
    }

    /// Expects the end of the stream (after any packets already read).
    pub async fn eof(&mut self) {
        let deadline = Instant::now() + WAIT;
        if let Some(p) = self.read_packet(deadline).await {
            panic!("expected the end of the stream, got {p:?}");
        }
    }

    pub async fn sign_in(&mut self, d: &Device) -> SignInOutput {
        self.sign_in_as(d.user, d.device, &d.token).await
    }

    /// Signs in with raw ids and a token; panics unless it succeeds.
    pub async fn sign_in_as(&mut self, user: u64, device: u64, token: &str) -> SignInOutput {
        let input = SignInInput { user_id: user, device_id: device, token: token.into() };
        let reply = self.request(Command::SignIn, input.encode_to_vec()).await;
        assert_eq!(reply.code, ErrorCode::Ok as i32, "sign-in: {}", reply.message);
        SignInOutput::decode(reply.data).unwrap()
    }

    /// Sends a text to `to`, retrying retryable errors with the same
    /// client_msg_id.
    pub async fn send_text(&mut self, to: u64, cmid: &str) -> SendOutput {
        let deadline = Instant::now() + WAIT;
        loop {
            let input = SendInput {
                conversation_kind: ConversationKind::User as i32,
                conversation_id: to,
                client_msg_id: cmid.into(),
                content_type: ContentType::Text as i32,
                content: cmid.as_bytes().to_vec().into(),
                ..Default::default()
            };
            let reply = self.request(Command::Send, input.encode_to_vec()).await;
            if reply.code == ErrorCode::Ok as i32 {
                return SendOutput::decode(reply.data).unwrap();
            }
            let code = ErrorCode::try_from(reply.code).unwrap();
            assert!(code.is_retryable(), "send {cmid}: {} {}", code.as_str_name(), reply.message);
            assert!(Instant::now() < deadline, "send {cmid} never acknowledged: {}", reply.message);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
