//! One signed-in connection: the sign-in handshake, the writer task, the
//! table of requests in flight and the connection's timers.
//!
//! [`sign_in`] opens a link and signs in. [`Link`] then owns the writer
//! task (fed through a bounded queue, each write under a timeout) and the
//! requests waiting for replies, each with its own deadline. The
//! connection driver (`driver` module) decides what to send and what to do
//! with replies; this module only does the bookkeeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use rim_proto::error::ErrorClass;
use rim_proto::ids::{GroupId, Seq};
use rim_proto::v1::{Command, Packet, Reply, SignInInput, SignInOutput};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::{ClientConfig, Credentials};
use crate::error::{ClientError, Result};
use crate::transport::{self, Endpoint, LinkReader, LinkWriter};

/// Request id of the sign-in; later requests count up from 2.
const SIGN_IN_REQUEST: u64 = 1;
/// Packets that may arrive before the sign-in reply and are kept.
const MAX_EARLY_PACKETS: usize = 64;
/// Packets the writer batches into one write.
const WRITE_BATCH: usize = 64;
/// How long a closing link waits for its writer to flush.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// A successful sign-in: the open link and what the server said.
#[derive(Debug)]
pub(crate) struct SignedIn {
    pub(crate) reader: LinkReader,
    pub(crate) writer: LinkWriter,
    pub(crate) output: SignInOutput,
    /// Packets that arrived before the sign-in reply (not expected, but
    /// handled rather than lost).
    pub(crate) early: Vec<Packet>,
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub(crate) enum SignInFailure {
    /// Try again later, maybe elsewhere (network, timeout, busy cluster).
    Retry(ClientError),
    /// Stop: the server refused this device's sign-in for good.
    Fatal(ClientError),
}

/// Connects to `endpoint` and signs in with `credentials`.
pub(crate) async fn sign_in(
    config: &ClientConfig,
    credentials: &Credentials,
    endpoint: &Endpoint,
) -> Result<SignedIn, SignInFailure> {
    let opened =
        transport::connect(endpoint, config.connect_timeout, config.max_frame, config.tls.as_ref()).await;
    // A network failure is worth another try; a configuration error is not.
    let (mut reader, mut writer) = opened
        .map_err(|e| if e.is_retryable() { SignInFailure::Retry(e) } else { SignInFailure::Fatal(e) })?;
    let input = SignInInput {
        user_id: credentials.user_id.0,
        device_id: credentials.device_id.0,
        token: credentials.token.clone(),
    };
    let packet = Packet {
        request_id: SIGN_IN_REQUEST,
        command: Command::SignIn as i32,
        content: input.encode_to_vec().into(),
        seq: 0,
    };
    let handshake = async {
        writer.send(&[packet]).await?;
        let mut early = Vec::new();
        loop {
            let packet = reader
                .recv()
                .await?
                .ok_or_else(|| ClientError::ConnectionLost("closed during sign-in".into()))?;
            if packet.request_id != SIGN_IN_REQUEST {
                if early.len() >= MAX_EARLY_PACKETS {
                    return Err(ClientError::Overloaded("packets before the sign-in reply"));
                }
                early.push(packet);
                continue;
            }
            let reply = Reply::decode(packet.content)?;
            if reply.code != 0 {
                return Err(ClientError::from_reply(&reply));
            }
            return Ok((SignInOutput::decode(reply.data)?, early));
        }
    };
    let timeout = config.request_timeout;
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok((output, early))) => Ok(SignedIn { reader, writer, output, early }),
        Ok(Err(e)) if is_fatal_sign_in_error(&e) => Err(SignInFailure::Fatal(e)),
        Ok(Err(e)) => Err(SignInFailure::Retry(e)),
        Err(_) => Err(SignInFailure::Retry(ClientError::Timeout(timeout))),
    }
}

/// Sign-in errors that reconnecting cannot fix: the server's codes of the
/// bad-request, auth and conflict classes. Retry-class and server-fault
/// codes, and every local failure, are retried.
fn is_fatal_sign_in_error(error: &ClientError) -> bool {
    match error {
        ClientError::Server { number, .. } => {
            matches!(
                ErrorClass::of(*number),
                ErrorClass::BadRequest | ErrorClass::Auth | ErrorClass::Conflict
            )
        }
        _ => false,
    }
}

/// What a request in flight is for.
#[derive(Debug)]
pub(crate) enum Purpose {
    /// An application request: its reply data (or error) goes back.
    Caller { command: Command, reply: oneshot::Sender<Result<Bytes>> },
    /// The timeline's sync.
    Sync,
    /// A `SUBSCRIBE_ROOM` of a feed (see `groups`); `reply` for the
    /// application's [`Client::subscribe_room`](crate::Client::subscribe_room).
    Subscribe { group_id: GroupId, generation: u64, reply: Option<oneshot::Sender<Result<Bytes>>> },
    /// A feed's `SYNC_GROUP`.
    GroupSync { group_id: GroupId },
    /// A request whose outcome does not matter (an `UNSUBSCRIBE_ROOM` after
    /// the user left a group).
    Ignore,
    /// An automatic ACK of `seq`.
    Ack(Seq),
    /// A heartbeat.
    Heartbeat,
}

/// A request in flight.
#[derive(Debug)]
struct InFlight {
    purpose: Purpose,
    deadline: Instant,
    timeout: Duration,
}

/// What the writer task is asked to do.
#[derive(Debug)]
enum Outgoing {
    Packet(Packet),
    /// Flush what was queued before, close the link, stop.
    Close,
}

/// An open, signed-in connection (without its reader, which the driver
/// polls directly).
#[derive(Debug)]
pub(crate) struct Link {
    out: mpsc::Sender<Outgoing>,
    writer: JoinHandle<()>,
    in_flight: HashMap<u64, InFlight>,
    next_request: u64,
    /// When the next heartbeat is due, and the interval.
    pub(crate) next_heartbeat: Instant,
    pub(crate) heartbeat_interval: Duration,
    /// Last time a packet came from the server.
    pub(crate) last_heard: Instant,
}

impl Link {
    /// Starts the writer task for `writer`.
    pub(crate) fn start(
        config: &ClientConfig,
        writer: LinkWriter,
        heartbeat_interval: Duration,
        now: Instant,
    ) -> Link {
        let (out, rx) = mpsc::channel(config.write_queue.max(1));
        let write_timeout = config.request_timeout;
        let writer = tokio::spawn(write_loop(writer, rx, write_timeout));
        Link {
            out,
            writer,
            in_flight: HashMap::new(),
            next_request: SIGN_IN_REQUEST + 1,
            next_heartbeat: now + heartbeat_interval,
            heartbeat_interval,
            last_heard: now,
        }
    }

    /// Queues a request; it fails after `timeout` without a reply. On a full
    /// write queue the request is not sent and its purpose is returned.
    pub(crate) fn request(
        &mut self,
        command: Command,
        content: Bytes,
        purpose: Purpose,
        timeout: Duration,
        now: Instant,
    ) -> Result<u64, (ClientError, Purpose)> {
        let request_id = self.next_request;
        let packet = Packet { request_id, command: command as i32, content, seq: 0 };
        match self.out.try_send(Outgoing::Packet(packet)) {
            Ok(()) => {
                self.next_request += 1;
                self.in_flight.insert(request_id, InFlight { purpose, deadline: now + timeout, timeout });
                Ok(request_id)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err((ClientError::Overloaded("write queue"), purpose)),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err((ClientError::ConnectionLost("writer stopped".into()), purpose))
            }
        }
    }

    /// The request `request_id` was answered: its purpose, if it was still
    /// waiting.
    pub(crate) fn answered(&mut self, request_id: u64) -> Option<Purpose> {
        self.in_flight.remove(&request_id).map(|f| f.purpose)
    }

    /// Removes the requests whose deadline passed, with their timeouts.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<(Purpose, Duration)> {
        let ids: Vec<u64> =
            self.in_flight.iter().filter(|(_, f)| f.deadline <= now).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| self.in_flight.remove(&id)).map(|f| (f.purpose, f.timeout)).collect()
    }

    /// The earliest request deadline.
    pub(crate) fn next_request_deadline(&self) -> Option<Instant> {
        self.in_flight.values().map(|f| f.deadline).min()
    }

    /// Whether an automatic ACK is in flight.
    pub(crate) fn ack_in_flight(&self) -> bool {
        self.in_flight.values().any(|f| matches!(f.purpose, Purpose::Ack(_)))
    }

    /// Resolves when the writer task stopped (a write failed or timed out).
    pub(crate) async fn writer_stopped(&self) {
        self.out.closed().await;
    }

    /// Takes every request still in flight (the link is ending).
    pub(crate) fn drain(&mut self) -> Vec<Purpose> {
        self.in_flight.drain().map(|(_, f)| f.purpose).collect()
    }

    /// Ends the link at once.
    pub(crate) fn abort(self) {
        self.writer.abort();
    }

    /// Ends the link cleanly: flushes what is queued, then closes (a
    /// WebSocket close frame or a TCP shutdown), within [`CLOSE_LINGER`].
    pub(crate) async fn close(mut self) {
        if self.out.try_send(Outgoing::Close).is_ok()
            && tokio::time::timeout(CLOSE_LINGER, &mut self.writer).await.is_ok()
        {
            return;
        }
        self.writer.abort();
    }
}

/// The writer task: batches queued packets into writes, each within
/// `timeout`; stops on the first failure (which the driver notices through
/// [`Link::writer_stopped`]).
async fn write_loop(mut writer: LinkWriter, mut rx: mpsc::Receiver<Outgoing>, timeout: Duration) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        let mut close = false;
        match first {
            Outgoing::Packet(p) => batch.push(p),
            Outgoing::Close => close = true,
        }
        while !close && batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(Outgoing::Packet(p)) => batch.push(p),
                Ok(Outgoing::Close) => close = true,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            match tokio::time::timeout(timeout, writer.send(&batch)).await {
                Ok(Ok(())) => batch.clear(),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "write failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(?timeout, "write timed out");
                    return;
                }
            }
        }
        if close {
            let _ = tokio::time::timeout(CLOSE_LINGER, writer.close()).await;
            return;
        }
    }
}
