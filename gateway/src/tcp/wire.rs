//! What a TCP connection's plaintext means: rim frames, or gim frames
//! translated at the edge ([`crate::gim`]). The event loop pushes bytes
//! in, lets the wire feed the session, and hands it the session's packets to
//! queue; the rest of the loop is the same for both protocols.
//!
//! Invariants: before the session signed in, frames are bounded by
//! [`MAX_FRAME_BEFORE_SIGN_IN`], then by the session's maximum frame, in
//! both protocols; bytes reported written to the session are in the units
//! the session counted them in (rim frame lengths).

use std::time::Instant;

use bytes::BytesMut;
use rim_proto::codec::{FrameDecoder, encode_frame, encoded_frame_len};
use rim_proto::v1::Packet;

use crate::Protocol;
use crate::gim::{self, Credit, RawFrames, Translator};
use crate::session::{MAX_FRAME_BEFORE_SIGN_IN, Session, SessionConfig};

/// A connection's framing and protocol.
#[derive(Debug)]
pub(super) enum Wire {
    /// rim frames.
    Rim(FrameDecoder),
    /// gim frames.
    Gim(Box<GimWire>),
}

/// The gim side of a TCP connection.
#[derive(Debug)]
pub(super) struct GimWire {
    frames: RawFrames,
    translator: Translator,
    credit: Credit,
}

impl Wire {
    /// A fresh connection's wire (frame limit of a connection not signed in).
    pub(super) fn new(protocol: Protocol, config: &SessionConfig) -> Wire {
        let max = config.max_frame.min(MAX_FRAME_BEFORE_SIGN_IN);
        match protocol {
            Protocol::Rim => Wire::Rim(FrameDecoder::new(max)),
            Protocol::Gim => Wire::Gim(Box::new(GimWire {
                frames: RawFrames::new(max),
                translator: Translator::new(config.max_frame),
                credit: Credit::default(),
            })),
        }
    }

    /// Plaintext received.
    pub(super) fn push(&mut self, bytes: &[u8]) {
        match self {
            Wire::Rim(d) => d.push(bytes),
            Wire::Gim(g) => g.frames.push(bytes),
        }
    }

    /// Hands every complete frame to `session` (a decode error ends it),
    /// raising the frame limit once the session signed in.
    pub(super) fn feed(&mut self, session: &mut Session, now: Instant) {
        while !session.is_closed() {
            self.fit(session);
            let done = match self {
                Wire::Rim(d) => match d.next_frame() {
                    Ok(Some(packet)) => {
                        session.on_packet(now, packet);
                        false
                    }
                    Ok(None) => true,
                    Err(e) => {
                        session.on_decode_error(now, &e);
                        true
                    }
                },
                Wire::Gim(g) => match g.frames.next_frame() {
                    Ok(Some(body)) => {
                        g.translator.on_frame(session, now, body);
                        false
                    }
                    Ok(None) => true,
                    Err(e) => {
                        session.on_decode_error(now, &e);
                        true
                    }
                },
            };
            if done {
                return;
            }
        }
    }

    fn fit(&mut self, session: &Session) {
        let max = session.config().max_frame;
        if !session.is_signed_in() {
            return;
        }
        match self {
            Wire::Rim(d) if d.max_frame() < max => d.set_max_frame(max),
            Wire::Gim(g) if g.frames.max_frame() < max => g.frames.set_max_frame(max),
            _ => {}
        }
    }

    /// Queues the session's `packet` in `out` (gim: its translation, or
    /// nothing, whose bytes are then reported written at once).
    pub(super) fn encode(&mut self, session: &mut Session, packet: &Packet, out: &mut BytesMut) {
        match self {
            Wire::Rim(_) => encode_frame(packet, out),
            Wire::Gim(g) => {
                let counted = encoded_frame_len(packet);
                match g.translator.outbound(packet) {
                    Some(body) => {
                        gim::encode_frame(&body, out);
                        g.credit.queued(gim::frame_len(&body), counted);
                    }
                    None => session.on_written(counted),
                }
            }
        }
    }

    /// Of `n` queued bytes written, how many the session counted.
    pub(super) fn written(&mut self, n: usize) -> usize {
        match self {
            Wire::Rim(_) => n,
            Wire::Gim(g) => g.credit.written(n),
        }
    }
}
