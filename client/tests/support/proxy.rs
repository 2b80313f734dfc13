//! A packet-level proxy between a client and a gateway (TCP or WebSocket)
//! that can hold back the gateway's packets, so that a test can make a
//! request's reply "late" and watch the client retry.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{Sink, SinkExt as _, Stream, StreamExt as _};
use prost::Message as _;
use rim_client::Endpoint;
use rim_proto::PacketCodec;
use rim_proto::v1::{Command, Packet};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::codec::Framed;

use super::Kind;

type PacketStream = Pin<Box<dyn Stream<Item = Packet> + Send>>;
type PacketSink = Pin<Box<dyn Sink<Packet, Error = ()> + Send>>;

/// See the module documentation.
pub struct PacketProxy {
    addr: SocketAddr,
    kind: Kind,
    hold: watch::Sender<bool>,
    counts: Counts,
    task: JoinHandle<()>,
}

/// Packets forwarded from clients, per command number (0..16).
type Counts = Arc<[AtomicUsize; 16]>;

impl PacketProxy {
    /// A proxy for `kind` in front of the gateway listening at `upstream`
    /// (its TCP or WebSocket address).
    pub async fn start(kind: Kind, upstream: SocketAddr) -> PacketProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hold, hold_rx) = watch::channel(false);
        let counts: Counts = Arc::new(std::array::from_fn(|_| AtomicUsize::new(0)));
        let counter = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (hold_rx, counter) = (hold_rx.clone(), counter.clone());
                tokio::spawn(async move {
                    let Some(((client_rx, client_tx), (server_rx, server_tx))) =
                        open(kind, tcp, upstream).await
                    else {
                        return;
                    };
                    let up = forward(client_rx, server_tx, None, Some(counter));
                    let down = forward(server_rx, client_tx, Some(hold_rx), None);
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                    }
                });
            }
        });
        PacketProxy { addr, kind, hold, counts, task }
    }

    /// The endpoint clients use.
    pub fn endpoint(&self) -> Endpoint {
        match self.kind {
            Kind::Tcp => Endpoint::tcp(self.addr),
            Kind::Ws => Endpoint::ws(self.addr),
        }
    }

    /// Holds back (`true`) or releases (`false`) the gateway's packets.
    pub fn hold_replies(&self, hold: bool) {
        self.hold.send_replace(hold);
    }

    /// `SEND` packets forwarded from clients so far.
    pub fn sends(&self) -> usize {
        self.count(Command::Send)
    }

    /// Packets of `command` forwarded from clients so far.
    pub fn count(&self, command: Command) -> usize {
        self.counts[command as usize % 16].load(Ordering::SeqCst)
    }
}

impl Drop for PacketProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    mut from: PacketStream,
    mut to: PacketSink,
    mut hold: Option<watch::Receiver<bool>>,
    counts: Option<Counts>,
) {
    while let Some(packet) = from.next().await {
        if let Some(hold) = &mut hold
            && hold.wait_for(|h| !*h).await.is_err()
        {
            return;
        }
        if let Some(counts) = &counts
            && let Ok(i) = usize::try_from(packet.command)
            && i < 16
        {
            counts[i].fetch_add(1, Ordering::SeqCst);
        }
        if to.send(packet).await.is_err() {
            return;
        }
    }
}

type Halves = (PacketStream, PacketSink);

/// The client's and the gateway's packet halves.
async fn open(kind: Kind, client: TcpStream, upstream: SocketAddr) -> Option<(Halves, Halves)> {
    match kind {
        Kind::Tcp => {
            let server = TcpStream::connect(upstream).await.ok()?;
            Some((framed(client), framed(server)))
        }
        Kind::Ws => {
            let client = tokio_tungstenite::accept_async(client).await.ok()?;
            let (server, _) = tokio_tungstenite::connect_async(format!("ws://{upstream}/ws")).await.ok()?;
            Some((ws_halves(client), ws_halves(server)))
        }
    }
}

fn framed(tcp: TcpStream) -> Halves {
    let (sink, stream) = Framed::new(tcp, PacketCodec::default()).split();
    let stream =
        stream.take_while(|r| std::future::ready(r.is_ok())).filter_map(|r| std::future::ready(r.ok()));
    let sink = sink.sink_map_err(|_| ()).with(|p: Packet| std::future::ready(Ok::<_, ()>(p)));
    (Box::pin(stream), Box::pin(sink))
}

fn ws_halves<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> Halves
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let stream = stream.take_while(|r| std::future::ready(r.is_ok())).filter_map(|r| {
        std::future::ready(match r {
            Ok(WsMessage::Binary(b)) => Packet::decode(b).ok(),
            _ => None,
        })
    });
    let sink = sink
        .sink_map_err(|_| ())
        .with(|p: Packet| std::future::ready(Ok::<_, ()>(WsMessage::Binary(p.encode_to_vec().into()))));
    (Box::pin(stream), Box::pin(sink))
}
