//! A connection's byte stream: its socket, spoken in plaintext or through a
//! rustls [`ServerConnection`] driven sans-IO. Everything above this module
//! (framing, the session, the event loop) sees plaintext only and is the
//! same for both.
//!
//! # Reading
//!
//! [`Link::read`] makes one `read` call on the socket into the loop's
//! scratch buffer and returns how many bytes came off the wire (ciphertext
//! under TLS: that is what the event loop's read budget counts). Plaintext
//! is handed to a callback at once; under TLS the bytes are fed to rustls
//! ([`ServerConnection::read_tls`] from the buffer, at most a few KiB at a
//! time), each batch processed ([`ServerConnection::process_new_packets`]),
//! and every decrypted byte taken out of rustls before the next batch.
//!
//! # Writing
//!
//! Encoded frames go to [`Link::queue`], a plaintext queue that the session
//! bounds ([`SessionConfig::send_queue_limit`](crate::SessionConfig::send_queue_limit)).
//! [`Link::flush`] writes it: straight to the socket in plaintext; under
//! TLS one record's worth ([`TLS_RECORD`]) at a time through
//! [`ServerConnection::writer`] and then [`ServerConnection::write_tls`]
//! until rustls has nothing left, and only then the next record. Its return
//! value is what the session is told was written
//! ([`Session::on_written`](crate::Session::on_written)): bytes the socket
//! took in plaintext; under TLS the plaintext of records that left whole.
//!
//! # Invariants
//!
//! * **No plaintext is held inside rustls across a wait**: every batch of
//!   ciphertext fed to rustls is processed and its plaintext delivered
//!   before the next batch and before [`Link::read`] returns. What rustls
//!   may keep is the start of a record whose remaining bytes have not
//!   arrived yet: they come with a new readiness edge. So edge-triggered
//!   readiness never strands input, and rustls's received-plaintext limit
//!   (which would make [`ServerConnection::read_tls`] fail) is never hit.
//! * **rustls buffers at most one record of ours**: plaintext is handed over
//!   only when rustls's outgoing buffer is empty, at most [`TLS_RECORD`]
//!   bytes at once, and never before the handshake completed (rustls would
//!   buffer it). Its buffers are also capped ([`TLS_BUFFER_LIMIT`]). So
//!   what a connection holds for a slow reader is the session-bounded
//!   queue plus one record, as in plaintext it is the queue plus the
//!   kernel's socket buffer.
//! * **Bytes are reported written no later than the peer can read them**,
//!   and no earlier than their record left: a TLS peer can decrypt nothing
//!   of a record before all of it arrived, so crediting a record once it
//!   left whole never keeps counted as queued a byte the client may already
//!   have answered, and a client that stops reading still fills the queue.
//! * A TLS error (an alert from the peer, a record that does not decrypt,
//!   garbage instead of a handshake) is an error of [`Link::read`]: rustls's
//!   own alert is sent if the socket takes it, and the event loop ends that
//!   connection only.
//! * The peer's `close_notify` ends the stream like a TCP end of stream;
//!   ours is sent after the last queued frame when the connection closes
//!   ([`Link::flush`] with `closing`), or, best effort, when it is dropped
//!   ([`Link::shutdown`]).

use std::io::{self, BufRead as _, Read as _, Write as _};
use std::net::Shutdown;
use std::sync::Arc;

use bytes::{Buf as _, BytesMut};
use mio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

/// Plaintext handed to rustls at once: the largest TLS record's payload, so
/// that one hand-over is one record.
pub const TLS_RECORD: usize = 16 * 1024;
/// Cap of rustls's own buffers of one connection (encrypted records waiting
/// for the socket; plaintext written before the handshake completed, which
/// this module never does). Never reached: see the module's invariants.
pub const TLS_BUFFER_LIMIT: usize = 64 * 1024;
/// An idle outbound queue above this capacity is released.
const KEEP_OUT_CAPACITY: usize = 64 * 1024;

/// A connection's socket, plain or TLS, with its outbound plaintext queue.
pub(super) struct Link {
    socket: TcpStream,
    tls: Option<Box<Tls>>,
    /// Encoded frames not yet written (or handed to rustls).
    out: BytesMut,
}

/// The TLS state of a [`Link`].
struct Tls {
    conn: ServerConnection,
    /// Plaintext bytes handed to rustls whose record has not left whole.
    in_flight: usize,
    /// Our `close_notify` is queued (or was sent).
    notified: bool,
    /// The peer sent `close_notify`: nothing more is read.
    peer_closed: bool,
}

/// What one [`Link::read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    /// Bytes came off the socket (ciphertext under TLS); their plaintext,
    /// if any, went to the callback.
    Bytes(usize),
    /// The peer ended the stream: a TCP end of stream, or `close_notify`.
    End,
}

impl Link {
    /// A link over `socket`; with `tls`, the connection is a TLS server
    /// side whose handshake is still to come.
    pub(super) fn new(socket: TcpStream, tls: Option<&Arc<ServerConfig>>) -> Result<Link, rustls::Error> {
        let tls = match tls {
            None => None,
            Some(config) => {
                let mut conn = ServerConnection::new(config.clone())?;
                conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
                Some(Box::new(Tls { conn, in_flight: 0, notified: false, peer_closed: false }))
            }
        };
        Ok(Link { socket, tls, out: BytesMut::new() })
    }

    /// The socket, to register it with the poll.
    pub(super) fn socket(&mut self) -> &mut TcpStream {
        &mut self.socket
    }

    /// Where encoded frames are queued for [`flush`](Self::flush).
    pub(super) fn queue(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Reads once from the socket into `scratch`, handing the plaintext to
    /// `deliver` (under TLS, possibly none: handshake records, a partial
    /// record). Errors are the socket's (`WouldBlock` included) and TLS
    /// failures; after one, the connection is to be dropped.
    pub(super) fn read(&mut self, scratch: &mut [u8], mut deliver: impl FnMut(&[u8])) -> io::Result<Read> {
        if self.tls.as_ref().is_some_and(|t| t.peer_closed) {
            return Ok(Read::End);
        }
        let n = self.socket.read(scratch)?;
        if n == 0 {
            return Ok(Read::End);
        }
        match &mut self.tls {
            None => deliver(&scratch[..n]),
            Some(tls) => {
                if let Err(e) = tls.decrypt(&scratch[..n], &mut deliver) {
                    // rustls queued an alert telling the peer why.
                    let _ = tls.conn.write_tls(&mut self.socket);
                    return Err(e);
                }
            }
        }
        Ok(Read::Bytes(n))
    }

    /// Writes what is queued until all of it left or the socket would
    /// block; with `closing`, a TLS link then queues and writes its
    /// `close_notify`. Returns the plaintext bytes to report written.
    pub(super) fn flush(&mut self, closing: bool) -> io::Result<usize> {
        let written = match &mut self.tls {
            None => write_plain(&mut self.socket, &mut self.out)?,
            Some(tls) => tls.flush(&mut self.socket, &mut self.out, closing)?,
        };
        if self.out.is_empty() && self.out.capacity() > KEEP_OUT_CAPACITY {
            self.out = BytesMut::new();
        }
        Ok(written)
    }

    /// Whether a writable socket would let [`flush`](Self::flush) make
    /// progress (interest in `WRITABLE`).
    pub(super) fn wants_write(&self) -> bool {
        match &self.tls {
            None => !self.out.is_empty(),
            Some(tls) => tls.conn.wants_write() || (!self.out.is_empty() && !tls.conn.is_handshaking()),
        }
    }

    /// Whether a closing connection has nothing more to say: its queue and,
    /// under TLS, its `close_notify` left. A TLS connection still in its
    /// handshake can deliver nothing and is done at once.
    pub(super) fn closed_cleanly(&self) -> bool {
        match &self.tls {
            None => self.out.is_empty(),
            Some(tls) => {
                tls.conn.is_handshaking() || (self.out.is_empty() && tls.notified && !tls.conn.wants_write())
            }
        }
    }

    /// Ends the stream without blocking: `close_notify` if not sent yet
    /// (best effort), unread input dropped (so that the close is a FIN
    /// rather than a reset that could discard the last frames written), the
    /// write side shut.
    pub(super) fn shutdown(&mut self) {
        if let Some(tls) = &mut self.tls
            && !tls.notified
            && !tls.conn.is_handshaking()
        {
            tls.conn.send_close_notify();
            tls.notified = true;
            let _ = tls.conn.write_tls(&mut self.socket);
        }
        let mut sink = [0u8; 4096];
        while matches!(self.socket.read(&mut sink), Ok(n) if n > 0) {}
        let _ = self.socket.shutdown(Shutdown::Write);
    }
}

impl Tls {
    /// Feeds `wire` to rustls, delivering every byte of plaintext it yields
    /// before feeding more.
    fn decrypt(&mut self, mut wire: &[u8], deliver: &mut impl FnMut(&[u8])) -> io::Result<()> {
        while !wire.is_empty() && !self.peer_closed {
            // Takes a few KiB at most; 0 only after the peer's close_notify.
            if self.conn.read_tls(&mut wire)? == 0 {
                self.peer_closed = true;
                break;
            }
            let state =
                self.conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let mut reader = self.conn.reader();
            loop {
                match reader.fill_buf() {
                    Ok([]) => break, // close_notify, once all was read
                    Ok(chunk) => {
                        let len = chunk.len();
                        deliver(chunk);
                        reader.consume(len);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if state.peer_has_closed() {
                self.peer_closed = true;
            }
        }
        Ok(())
    }

    /// Writes rustls's records, handing it the next record's plaintext
    /// each time it has none left; see [`Link::flush`].
    fn flush(&mut self, socket: &mut TcpStream, out: &mut BytesMut, closing: bool) -> io::Result<usize> {
        let mut credited = 0;
        loop {
            while self.conn.wants_write() {
                match self.conn.write_tls(socket) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(credited),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            // Everything rustls had left: the record in flight, whole.
            credited += std::mem::take(&mut self.in_flight);
            if self.conn.is_handshaking() {
                // Frames wait for the handshake (rustls would buffer them).
                return Ok(credited);
            }
            if out.is_empty() {
                if closing && !self.notified {
                    self.conn.send_close_notify();
                    self.notified = true;
                    continue;
                }
                return Ok(credited);
            }
            let n = self.conn.writer().write(&out[..out.len().min(TLS_RECORD)])?;
            if n == 0 {
                // rustls's buffer is empty here, so this cannot happen; do
                // not spin if it does.
                return Ok(credited);
            }
            out.advance(n);
            self.in_flight = n;
        }
    }
}

/// Writes `out` to `socket` until it is empty or the socket would block;
/// returns the bytes written.
fn write_plain(socket: &mut TcpStream, out: &mut BytesMut) -> io::Result<usize> {
    let mut written = 0;
    while !out.is_empty() {
        match socket.write(out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                out.advance(n);
                written += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rim_testkit::tls::TestPki;

    use super::*;

    /// A TLS [`Link`] on one end of a loopback connection and a rustls
    /// client on the other, both non-blocking, driven by hand.
    struct Pair {
        link: Link,
        client: rustls::ClientConnection,
        sock: std::net::TcpStream,
        /// Plaintext the client decrypted.
        got: Vec<u8>,
        /// The server's close_notify reached the client.
        client_saw_close: bool,
        _pki: TestPki,
    }

    impl Pair {
        fn new() -> Pair {
            let pki = TestPki::new();
            let server = rim_cluster::tls::server_config(&pki.cert, &pki.key).unwrap();
            let client_config = rim_cluster::tls::client_config(&pki.ca).unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let sock = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            accepted.set_nonblocking(true).unwrap();
            sock.set_nonblocking(true).unwrap();
            let link = Link::new(TcpStream::from_std(accepted), Some(&server)).unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let client = rustls::ClientConnection::new(client_config, name).unwrap();
            let mut pair = Pair { link, client, sock, got: Vec::new(), client_saw_close: false, _pki: pki };
            pair.until("the handshake", |p| {
                !p.client.is_handshaking() && !p.link.tls.as_ref().unwrap().conn.is_handshaking()
            });
            pair
        }

        /// Rounds of client I/O, link reads and link flushes until `done`.
        fn until(&mut self, what: &str, mut done: impl FnMut(&mut Pair) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !done(self) {
                assert!(Instant::now() < deadline, "no {what} in time");
                self.client_io();
                let mut scratch = [0u8; 4096];
                match self.link.read(&mut scratch, |_| {}) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("link read: {e}"),
                }
                self.link.flush(false).unwrap();
                std::thread::yield_now();
            }
        }

        /// Writes what the client has to say and reads what came.
        fn client_io(&mut self) {
            while self.client.wants_write() {
                match self.client.write_tls(&mut self.sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client write: {e}"),
                }
            }
            loop {
                match self.client.read_tls(&mut self.sock) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => panic!("client read: {e}"),
                }
                self.client.process_new_packets().unwrap();
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match self.client.reader().read(&mut buf) {
                        Ok(0) => {
                            self.client_saw_close = true;
                            break;
                        }
                        Ok(n) => self.got.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("client plaintext: {e}"),
                    }
                }
            }
        }

        /// Plaintext handed to rustls and not reported written yet.
        fn uncredited(&self) -> usize {
            self.link.tls.as_ref().unwrap().in_flight
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// A peer that does not read leaves everything but one record in the
    /// session's queue; as it reads, every byte it decrypted was reported
    /// written before, and in the end all of it is, intact.
    #[test]
    fn a_slow_peer_leaves_at_most_one_record_inside_rustls_and_reads_only_credited_bytes() {
        let mut p = Pair::new();
        // More than loopback's socket buffers hold, so that the socket blocks.
        let total = 32 << 20;
        let data = pattern(total);
        p.link.queue().extend_from_slice(&data);
        let mut credited = p.link.flush(false).unwrap();
        assert!(!p.link.out.is_empty(), "the socket took {total} bytes without blocking");
        assert!(p.link.wants_write(), "blocked: a WRITABLE edge is wanted");
        let handed = total - p.link.out.len();
        assert_eq!(handed - credited, p.uncredited());
        assert!(p.uncredited() <= TLS_RECORD, "{} bytes inside rustls", p.uncredited());

        let deadline = Instant::now() + Duration::from_secs(60);
        while p.got.len() < total {
            assert!(Instant::now() < deadline, "only {} of {total} bytes arrived", p.got.len());
            p.client_io();
            assert!(p.got.len() <= credited, "the peer read {} bytes, {credited} reported", p.got.len());
            credited += p.link.flush(false).unwrap();
            assert!(p.uncredited() <= TLS_RECORD);
            assert_eq!(total - p.link.out.len() - p.uncredited(), credited);
        }
        assert_eq!(credited, total);
        assert!(p.got == data, "the plaintext arrived changed");
        assert!(!p.link.wants_write());
    }

    /// Closing sends what is queued, then close_notify; the peer's
    /// close_notify ends the stream; garbage is an error.
    #[test]
    fn close_notify_both_ways_and_garbage_is_an_error() {
        let mut p = Pair::new();
        p.link.queue().extend_from_slice(b"last words");
        p.link.flush(true).unwrap();
        assert!(p.link.closed_cleanly());
        p.until("the close_notify", |p| p.client_saw_close);
        assert_eq!(p.got, b"last words");

        let mut p = Pair::new();
        p.client.writer().write_all(b"bye").unwrap();
        p.client.send_close_notify();
        p.client_io();
        let mut plain = Vec::new();
        let mut scratch = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no end of stream");
            match p.link.read(&mut scratch, |b| plain.extend_from_slice(b)) {
                Ok(Read::End) => break,
                Ok(Read::Bytes(_)) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("link read: {e}"),
            }
        }
        assert_eq!(plain, b"bye");

        let mut p = Pair::new();
        p.sock.write_all(b"\x05not a TLS record").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let err = loop {
            assert!(Instant::now() < deadline, "garbage was not refused");
            match p.link.read(&mut scratch, |_| panic!("plaintext from garbage")) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => break e,
                Ok(r) => panic!("garbage read as {r:?}"),
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }
}
