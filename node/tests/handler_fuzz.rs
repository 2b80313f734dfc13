//! Fuzzing the client gRPC handlers (the hostile-clients issue §6): every
//! method of every client service, read from `client_api.proto` so a new
//! method is covered the day it is added, gets hundreds of random request
//! bodies (well-formed protobuf with random field numbers, wire types and
//! values: zero, huge and real ids, empty and oversized strings, plus
//! undecodable bytes), signed in as a real user or with a forged token.
//!
//! Every answer must be a success or an error carrying a `rim-code` that is
//! not `ERROR_INTERNAL` (a server fault); nothing may panic; and the node
//! must serve an honest send and sync afterwards. The seed is fixed (set
//! `RIM_FUZZ_SEED` and `RIM_FUZZ_CASES` to explore further).

use bytes::{Buf, BufMut};
use prost::encoding::{WireType, encode_key, encode_varint};
use rim_proto::ErrorCode;
use rim_proto::error::CODE_METADATA_KEY;
use rim_proto::v1::GroupKind;
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::{Client, Session, code};
use rim_testkit::wait::serial;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Status};

/// A codec passing request and reply bodies through as bytes.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// `/rim.v1.<Service>/<Method>` of every client method in the `.proto`.
fn methods() -> Vec<String> {
    let text = include_str!("../../proto/proto/rim/v1/client_api.proto");
    let mut service = None;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.split_whitespace().next().map(str::to_string);
        } else if let (Some(s), Some(rest)) = (&service, line.strip_prefix("rpc ")) {
            let name = rest.split('(').next().unwrap_or_default().trim();
            out.push(format!("/rim.v1.{s}/{name}"));
        }
    }
    out
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A request body: random fields, or (one time in ten) raw garbage.
    fn body(&mut self, ids: &[u64]) -> Vec<u8> {
        let mut buf = Vec::new();
        if self.below(10) == 0 {
            let n = self.below(64) as usize;
            return (0..n).map(|_| self.next() as u8).collect();
        }
        for _ in 0..self.below(6) {
            let tag = 1 + self.below(8) as u32;
            match self.below(3) {
                0 => {
                    encode_key(tag, WireType::Varint, &mut buf);
                    let v = match self.below(5) {
                        0 => 0,
                        1 => u64::MAX,
                        2 => ids[self.below(ids.len() as u64) as usize],
                        3 => self.below(10),
                        _ => self.next(),
                    };
                    encode_varint(v, &mut buf);
                }
                1 => {
                    encode_key(tag, WireType::LengthDelimited, &mut buf);
                    let len = [0, 1, 7, 65, 300, 70_000][self.below(6) as usize];
                    encode_varint(len as u64, &mut buf);
                    let byte = [b'a', b'7', 0xff, 0][self.below(4) as usize];
                    buf.put_bytes(byte, len);
                }
                _ => {
                    encode_key(tag, WireType::SixtyFourBit, &mut buf);
                    buf.put_u64_le(self.next());
                }
            }
        }
        buf
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_to_every_client_method_get_coded_answers() {
    let _g = serial().await;
    let panics = rim_testkit::panics::PanicCounter::install();

    let c = Cluster::start(1, 1).await;
    let client = c.client(1);
    let a = client.register_and_sign_in("fuzz_a").await;
    let b = client.register_and_sign_in("fuzz_b").await;
    let group = client.create_group(&a, GroupKind::Small, &[b.user]).await;
    let ids = [a.user.0, b.user.0, a.device.0, group.group_id, 1];
    let forged = Session { token: "v1.1.1.9999999999999.0.00".into(), ..a.clone() };

    let methods = methods();
    assert!(methods.len() >= 30, "the .proto was not read: {methods:?}");
    let seed = std::env::var("RIM_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_2026);
    let cases: usize = std::env::var("RIM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let mut rng = Rng(seed);
    let mut grpc = tonic::client::Grpc::new(client.channel.clone());
    let (mut ok, mut refused) = (0, 0);
    for method in &methods {
        // Signing out would only make the rest shallower.
        if method.ends_with("/Logout") {
            continue;
        }
        for case in 0..cases {
            let body = rng.body(&ids);
            let who = if case % 4 == 3 { &forged } else { &a };
            let req: Request<Vec<u8>> = Client::authed(who, body.clone());
            grpc.ready().await.expect("the node accepts calls");
            let path = http::uri::PathAndQuery::from_maybe_shared(method.clone()).unwrap();
            match grpc.unary(req, path, Raw).await {
                Ok(_) => ok += 1,
                Err(status) => {
                    refused += 1;
                    assert!(
                        status.metadata().get(CODE_METADATA_KEY).is_some(),
                        "{method} {body:?}: no rim-code on {status:?}"
                    );
                    assert_ne!(code(&status), ErrorCode::ErrorInternal, "{method} {body:?}: {status:?}");
                }
            }
        }
    }
    println!("handler fuzz: {} methods, {ok} answered, {refused} refused with a code", methods.len());
    assert!(ok > 0 && refused > 0, "{ok} answered, {refused} refused");

    // The node still serves honest users, and nothing panicked. (The fuzz
    // may have revoked the devices of `a` it was signed in with.)
    let a = client.sign_in("fuzz_a").await;
    client.send_acked(&b, a.user, "after-fuzz", "still here").await;
    let list = client.sync_all_retry(&a).await;
    assert!(list.iter().any(|m| m.client_msg_id == "after-fuzz"));
    assert_eq!(panics.count(), 0, "a handler panicked");
    c.shutdown().await;
}
