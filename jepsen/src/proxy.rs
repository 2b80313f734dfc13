//! Per-link TCP proxies: network faults without root (`reference/jepsen.md`
//! §4 (a), §6.2 "ProxyNet").
//!
//! A [`LinkProxy`] listens on a loopback port and forwards every accepted
//! connection to one target address. Each direction of the link has a
//! [`Mode`], switchable at runtime, and a switch affects connections that
//! are already open:
//!
//! * [`Mode::Pass`]: forward bytes as they come;
//! * [`Mode::Delay`]: forward each chunk no earlier than `d` after it was
//!   read (chunks are pipelined, so throughput is kept; a new connection
//!   reaches the target `d` late);
//! * [`Mode::Hold`]: a black hole. Connections are accepted and kept, but
//!   nothing is forwarded and the proxy stops reading, so data stays queued
//!   in the kernel (and in at most a few bounded chunks here); a new
//!   connection is not opened to the target until the hold ends. Switching
//!   back delivers everything that was held, in order;
//! * [`Mode::Reset`]: open connections are aborted (RST to both ends) and
//!   new ones are accepted and reset at once. Reset on either direction
//!   resets the whole link.
//!
//! The "forward" direction carries bytes from the connecting side to the
//! target ("requests"), "backward" the bytes coming back ("responses").
//!
//! A [`ProxyMesh`] holds one proxy per ordered pair of nodes: link `i→j`
//! carries the connections node `i` opens to node `j`, so node `i` must be
//! told to dial peer `j` at [`ProxyMesh::addr`]`(i, j)` (see
//! [`ProxyMesh::via_arg`], `rim node --peer-via`). Partitions are expressed as Jepsen grudges
//! ([`Grudge`]: destination → sources it drops) and applied per direction,
//! which is exactly what `iptables -A INPUT -s src -j DROP` on the
//! destination does to TCP: requests `src→dst` stop on link `src→dst`, and
//! replies `src→dst` to requests `dst` made stop on link `dst→src`.
//!
//! Limits: a proxy cannot drop single packets (TCP stays reliable), so it
//! holds, delays or cuts; clients (the harness) are never proxied.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rim_proto::ids::NodeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes read per chunk.
const CHUNK: usize = 16 * 1024;
/// Chunks queued per direction between reading and writing (so at most
/// `CHUNK * QUEUE` bytes per direction sit in the proxy).
const QUEUE: usize = 16;
/// Longest wait to open the connection to the target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a half-close to go out.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a link does to the bytes of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    #[default]
    Pass,
    /// Forward each chunk no earlier than this long after it was read.
    Delay(Duration),
    /// Black hole: keep connections, forward nothing, stop reading.
    Hold,
    /// Abort every connection of the link and refuse new ones.
    Reset,
}

/// One direction of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the connecting side to the target.
    Forward,
    /// From the target back to the connecting side.
    Backward,
}

/// The modes of both directions of a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkModes {
    /// Connecting side → target.
    pub forward: Mode,
    /// Target → connecting side.
    pub backward: Mode,
}

impl LinkModes {
    /// The same mode both ways.
    pub fn both(m: Mode) -> LinkModes {
        LinkModes { forward: m, backward: m }
    }

    /// The mode of `dir`.
    pub fn get(&self, dir: Dir) -> Mode {
        match dir {
            Dir::Forward => self.forward,
            Dir::Backward => self.backward,
        }
    }

    fn reset(&self) -> bool {
        self.forward == Mode::Reset || self.backward == Mode::Reset
    }
}

/// Counters of one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Bytes delivered to the target.
    pub forward_bytes: u64,
    /// Bytes delivered back to the connecting side.
    pub backward_bytes: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections currently open (accepted and not yet finished).
    pub open: u64,
    /// Connections aborted by [`Mode::Reset`] (open ones and refused new ones).
    pub resets: u64,
}

#[derive(Default)]
struct Counters {
    forward_bytes: AtomicU64,
    backward_bytes: AtomicU64,
    accepted: AtomicU64,
    finished: AtomicU64,
    resets: AtomicU64,
}

/// A TCP proxy for one link, listening on loopback. Dropping it aborts
/// every connection it carries and closes the listener (both happen on the
/// runtime's threads, shortly after the drop).
pub struct LinkProxy {
    addr: SocketAddr,
    target: SocketAddr,
    modes: watch::Sender<LinkModes>,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for LinkProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkProxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("modes", &*self.modes.borrow())
            .finish()
    }
}

impl LinkProxy {
    /// A proxy to `target` on a free port of 127.0.0.1, in [`Mode::Pass`].
    /// Must be called inside a tokio runtime (it spawns its tasks there).
    pub async fn start(target: SocketAddr) -> io::Result<LinkProxy> {
        LinkProxy::bind("127.0.0.1:0".parse().expect("loopback address"), target).await
    }

    /// A proxy to `target` listening on `listen`.
    pub async fn bind(listen: SocketAddr, target: SocketAddr) -> io::Result<LinkProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (modes, rx) = watch::channel(LinkModes::default());
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(listener, target, rx, counters.clone()));
        Ok(LinkProxy { addr, target, modes, counters, accept })
    }

    /// Where the proxy listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Sets both directions to `mode`.
    pub fn set_mode(&self, mode: Mode) {
        self.set_modes(LinkModes::both(mode));
    }

    /// Sets one direction to `mode`, leaving the other as it is.
    pub fn set_dir_mode(&self, dir: Dir, mode: Mode) {
        self.modes.send_modify(|m| match dir {
            Dir::Forward => m.forward = mode,
            Dir::Backward => m.backward = mode,
        });
    }

    /// Sets the modes of both directions.
    pub fn set_modes(&self, modes: LinkModes) {
        self.modes.send_replace(modes);
    }

    /// The current modes.
    pub fn modes(&self) -> LinkModes {
        *self.modes.borrow()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        let accepted = c.accepted.load(Ordering::Relaxed);
        ProxyStats {
            forward_bytes: c.forward_bytes.load(Ordering::Relaxed),
            backward_bytes: c.backward_bytes.load(Ordering::Relaxed),
            accepted,
            open: accepted.saturating_sub(c.finished.load(Ordering::Relaxed)),
            resets: c.resets.load(Ordering::Relaxed),
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Dropping `modes` closes the watch: every connection task sees it
        // and aborts its connection.
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    modes: watch::Receiver<LinkModes>,
    counters: Arc<Counters>,
) {
    loop {
        let (inbound, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let (modes, counters) = (modes.clone(), counters.clone());
        tokio::spawn(async move {
            connection(inbound, target, modes, counters.clone()).await;
            counters.finished.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// Aborts a connection: RST instead of FIN.
fn abort(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Waits until the link lets a new connection through; `false`: reset (or
/// the proxy is gone).
async fn wait_open(modes: &mut watch::Receiver<LinkModes>) -> bool {
    loop {
        let m = *modes.borrow_and_update();
        if m.reset() {
            return false;
        }
        let delay = match (m.forward, m.backward) {
            (Mode::Hold, _) | (_, Mode::Hold) => None,
            (Mode::Delay(d), _) => Some(d),
            _ => Some(Duration::ZERO),
        };
        match delay {
            Some(d) if d.is_zero() => return true,
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => return true,
                    r = modes.changed() => if r.is_err() { return false },
                }
            }
            None => {
                if modes.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn connection(
    inbound: TcpStream,
    target: SocketAddr,
    mut modes: watch::Receiver<LinkModes>,
    counters: Arc<Counters>,
) {
    if !wait_open(&mut modes).await {
        counters.resets.fetch_add(1, Ordering::Relaxed);
        return abort(inbound);
    }
    let outbound = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)) => match r {
            Ok(Ok(s)) => s,
            // The target is down: the connecting side sees a reset, as it
            // would see a refused connection without the proxy.
            _ => return abort(inbound),
        },
        _ = wait_reset(modes.clone()) => {
            counters.resets.fetch_add(1, Ordering::Relaxed);
            return abort(inbound);
        }
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_rd, in_wr) = inbound.into_split();
    let (out_rd, out_wr) = outbound.into_split();
    // A task that fails (or sees Reset) flips `kill`: all others stop and
    // the connection is aborted.
    let kill = Arc::new(watch::channel(false).0);
    let (fwd_tx, fwd_rx) = mpsc::channel(QUEUE);
    let (bwd_tx, bwd_rx) = mpsc::channel(QUEUE);
    let ctx = |dir| Ctx {
        dir,
        modes: modes.clone(),
        kill: kill.clone(),
        killed: kill.subscribe(),
        counters: counters.clone(),
    };
    let (r_in, r_out, w_out, w_in) = tokio::join!(
        tokio::spawn(reader(in_rd, fwd_tx, ctx(Dir::Forward))),
        tokio::spawn(reader(out_rd, bwd_tx, ctx(Dir::Backward))),
        tokio::spawn(writer(out_wr, fwd_rx, ctx(Dir::Forward))),
        tokio::spawn(writer(in_wr, bwd_rx, ctx(Dir::Backward))),
    );
    let (Ok(r_in), Ok(r_out), Ok(w_out), Ok(w_in)) = (r_in, r_out, w_out, w_in) else { return };
    if *kill.borrow() {
        if modes.has_changed().is_err() || modes.borrow().reset() {
            counters.resets.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(s) = r_in.reunite(w_in) {
            abort(s);
        }
        if let Ok(s) = r_out.reunite(w_out) {
            abort(s);
        }
    }
}

/// Per-task view of a connection.
struct Ctx {
    dir: Dir,
    modes: watch::Receiver<LinkModes>,
    kill: Arc<watch::Sender<bool>>,
    killed: watch::Receiver<bool>,
    counters: Arc<Counters>,
}

impl Ctx {
    /// The mode of this direction; `None`: the connection must be aborted
    /// (killed, Reset, or the proxy is gone).
    fn mode(&mut self) -> Option<Mode> {
        if *self.killed.borrow_and_update() || self.modes.has_changed().is_err() {
            return None;
        }
        let m = *self.modes.borrow_and_update();
        if m.reset() { None } else { Some(m.get(self.dir)) }
    }

    /// Resolves when the modes change or the connection is killed.
    async fn changed(&mut self) {
        tokio::select! {
            r = self.modes.changed() => if r.is_err() {
                // The proxy is gone: never resolve this arm again, the
                // next `mode()` reports it.
                self.kill();
            },
            _ = self.killed.changed() => {}
        }
    }

    /// Resolves when the connection must be aborted.
    async fn aborted(&mut self) {
        while self.mode().is_some() {
            self.changed().await;
        }
    }

    fn kill(&self) {
        self.kill.send_replace(true);
    }

    fn count(&self, n: u64) {
        let c = match self.dir {
            Dir::Forward => &self.counters.forward_bytes,
            Dir::Backward => &self.counters.backward_bytes,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Resolves when the link switches to Reset (or the proxy is gone).
async fn wait_reset(mut modes: watch::Receiver<LinkModes>) {
    loop {
        if modes.borrow_and_update().reset() {
            return;
        }
        if modes.changed().await.is_err() {
            return;
        }
    }
}

enum Chunk {
    Data(Instant, Vec<u8>),
    Eof,
}

/// Reads one direction into the queue, stopping while the direction holds.
async fn reader(mut rd: OwnedReadHalf, tx: mpsc::Sender<Chunk>, mut ctx: Ctx) -> OwnedReadHalf {
    loop {
        let Some(mode) = ctx.mode() else {
            ctx.kill();
            return rd;
        };
        if mode == Mode::Hold {
            ctx.changed().await;
            continue;
        }
        let mut buf = vec![0u8; CHUNK];
        let chunk = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) => Chunk::Eof,
                Ok(n) => {
                    buf.truncate(n);
                    Chunk::Data(Instant::now(), buf)
                }
                Err(_) => {
                    ctx.kill();
                    return rd;
                }
            },
            // `read` is cancel-safe: nothing is lost by re-checking the mode.
            _ = ctx.changed() => continue,
        };
        let eof = matches!(chunk, Chunk::Eof);
        tokio::select! {
            r = tx.send(chunk) => if r.is_err() { return rd },
            _ = ctx.aborted() => {
                ctx.kill();
                return rd;
            }
        }
        if eof {
            return rd;
        }
    }
}

/// Writes one direction from the queue, each chunk when its mode allows.
async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Chunk>, mut ctx: Ctx) -> OwnedWriteHalf {
    loop {
        let chunk = tokio::select! {
            c = rx.recv() => c,
            _ = ctx.aborted() => {
                ctx.kill();
                return wr;
            }
        };
        let (at, bytes) = match chunk {
            Some(Chunk::Data(at, bytes)) => (at, bytes),
            Some(Chunk::Eof) => {
                let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, wr.shutdown()).await;
                return wr;
            }
            // The reader died without an EOF: it killed the connection.
            None => return wr,
        };
        // Wait until this direction lets the chunk through.
        loop {
            let Some(mode) = ctx.mode() else {
                ctx.kill();
                return wr;
            };
            let due = match mode {
                Mode::Pass => break,
                Mode::Delay(d) => at + d,
                Mode::Hold | Mode::Reset => {
                    ctx.changed().await;
                    continue;
                }
            };
            if Instant::now() >= due {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due) => break,
                _ = ctx.changed() => {}
            }
        }
        tokio::select! {
            r = wr.write_all(&bytes) => if r.is_err() {
                ctx.kill();
                return wr;
            },
            _ = ctx.aborted() => {
                ctx.kill();
                return wr;
            }
        }
        ctx.count(bytes.len() as u64);
    }
}

/// A Jepsen grudge: each destination node → the source nodes whose traffic
/// it drops. Nodes absent from the map drop nothing.
pub type Grudge = BTreeMap<u64, BTreeSet<u64>>;

/// Grudge builders, ported from `jepsen.nemesis` (deterministic: shuffle
/// the node list first for a random shape).
pub mod grudge {
    use super::Grudge;

    /// Every node drops traffic from every node outside its own component.
    pub fn complete(components: &[Vec<u64>]) -> Grudge {
        let mut g = Grudge::new();
        for (i, comp) in components.iter().enumerate() {
            let others: Vec<u64> =
                components.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, c)| c.clone()).collect();
            for n in comp {
                g.entry(*n).or_default().extend(others.iter().copied());
            }
        }
        g.retain(|_, s| !s.is_empty());
        g
    }

    /// `node` alone on one side, everyone else on the other (`split-one`).
    pub fn isolate(nodes: &[u64], node: u64) -> Grudge {
        split(nodes, &[node])
    }

    /// `side` on one side, every other node of `nodes` on the other.
    pub fn split(nodes: &[u64], side: &[u64]) -> Grudge {
        let rest: Vec<u64> = nodes.iter().copied().filter(|n| !side.contains(n)).collect();
        complete(&[side.to_vec(), rest])
    }

    /// The first ⌊n/2⌋ nodes against the rest (`bisect`: the first half is
    /// the minority).
    pub fn halves(nodes: &[u64]) -> Grudge {
        let (a, b) = nodes.split_at(nodes.len() / 2);
        complete(&[a.to_vec(), b.to_vec()])
    }

    /// Two halves that cannot talk, plus the middle node `nodes[n/2]` that
    /// talks to both (`bridge`). Needs at least 3 nodes.
    pub fn bridge(nodes: &[u64]) -> Grudge {
        let mid = nodes.len() / 2;
        let (a, rest) = nodes.split_at(mid);
        let c = rest.get(1..).unwrap_or_default();
        let mut g = Grudge::new();
        for n in a {
            g.entry(*n).or_default().extend(c.iter().copied());
        }
        for n in c {
            g.entry(*n).or_default().extend(a.iter().copied());
        }
        g.retain(|_, s| !s.is_empty());
        g
    }

    /// Every node sees a majority (itself and its ring neighbours), but no
    /// two nodes see the same majority (`majorities-ring`, the exact shape
    /// Jepsen uses up to 5 nodes): with `m` = ⌊n/2⌋+1, node `p` of the ring
    /// hears from `nodes[p-⌊m/2⌋ .. p-⌊m/2⌋+m]` (mod n) and drops the rest.
    /// For 3 nodes the result is asymmetric (`a` hears `c`, `b` hears `a`,
    /// `c` hears `b`), as in Jepsen.
    pub fn majorities_ring(nodes: &[u64]) -> Grudge {
        let n = nodes.len();
        let m = n / 2 + 1;
        let mut g = Grudge::new();
        for p in 0..n {
            let seen: Vec<u64> = (0..m).map(|t| nodes[(p + n * m + t - m / 2) % n]).collect();
            let dropped: std::collections::BTreeSet<u64> =
                nodes.iter().copied().filter(|x| !seen.contains(x)).collect();
            if !dropped.is_empty() {
                g.insert(nodes[p], dropped);
            }
        }
        g
    }
}

/// One [`LinkProxy`] per ordered pair of nodes: link `i→j` forwards to node
/// `j`'s real address and carries what node `i` sends to `j`.
#[derive(Debug)]
pub struct ProxyMesh {
    targets: BTreeMap<u64, SocketAddr>,
    links: BTreeMap<(u64, u64), LinkProxy>,
}

impl ProxyMesh {
    /// Starts `n·(n−1)` proxies on loopback for the nodes `id → real address`.
    pub async fn start(targets: &BTreeMap<u64, SocketAddr>) -> io::Result<ProxyMesh> {
        let mut links = BTreeMap::new();
        for &from in targets.keys() {
            for (&to, &addr) in targets {
                if from != to {
                    links.insert((from, to), LinkProxy::start(addr).await?);
                }
            }
        }
        Ok(ProxyMesh { targets: targets.clone(), links })
    }

    /// The node ids, ascending.
    pub fn nodes(&self) -> Vec<u64> {
        self.targets.keys().copied().collect()
    }

    /// The proxy of link `from→to` (panics on an unknown pair or `from == to`).
    pub fn link(&self, from: NodeId, to: NodeId) -> &LinkProxy {
        self.links.get(&(from, to)).unwrap_or_else(|| panic!("no link {from}→{to}"))
    }

    /// Every link, by `(from, to)`.
    pub fn links(&self) -> impl Iterator<Item = (&(u64, u64), &LinkProxy)> {
        self.links.iter()
    }

    /// Where node `from` must dial node `to`: the proxy, or for `from == to`
    /// the node's real address.
    pub fn addr(&self, from: NodeId, to: NodeId) -> SocketAddr {
        if from == to { self.targets[&to] } else { self.link(from, to).addr() }
    }

    /// Node `node`'s view of the cluster: its own real address and a proxy
    /// address for every other node.
    pub fn peers_for(&self, node: NodeId) -> BTreeMap<NodeId, SocketAddr> {
        self.targets.keys().map(|&to| (to, self.addr(node, to))).collect()
    }

    /// Node `node`'s `--peer-via` value: `j=<proxy node→j>` for every other
    /// node `j`.
    pub fn via_arg(&self, node: NodeId) -> String {
        self.targets
            .keys()
            .filter(|&&to| to != node)
            .map(|&to| format!("{to}={}", self.addr(node, to)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Sets both directions of link `from→to`.
    pub fn set(&self, from: NodeId, to: NodeId, mode: Mode) {
        self.link(from, to).set_mode(mode);
    }

    /// Sets every link, both directions.
    pub fn set_all(&self, mode: Mode) {
        for l in self.links.values() {
            l.set_mode(mode);
        }
    }

    /// Every link back to [`Mode::Pass`].
    pub fn heal(&self) {
        self.set_all(Mode::Pass);
    }

    /// Applies `grudge` with `fault` (usually [`Mode::Hold`]; [`Mode::Reset`]
    /// is like `REJECT --reject-with tcp-reset`): for `dst` dropping `src`,
    /// the forward direction of `src→dst` and the backward direction of
    /// `dst→src` get `fault`. Every other direction is set to Pass, so
    /// grudges replace each other rather than accumulate.
    pub fn partition(&self, grudge: &Grudge, fault: Mode) {
        let mut modes: BTreeMap<(u64, u64), LinkModes> =
            self.links.keys().map(|k| (*k, LinkModes::default())).collect();
        for (dst, srcs) in grudge {
            for src in srcs {
                if src == dst {
                    continue;
                }
                if let Some(m) = modes.get_mut(&(*src, *dst)) {
                    m.forward = fault;
                }
                if let Some(m) = modes.get_mut(&(*dst, *src)) {
                    m.backward = fault;
                }
            }
        }
        for (k, m) in modes {
            self.links[&k].set_modes(m);
        }
    }

    /// Cuts `node` off from everyone (black hole both ways).
    pub fn isolate(&self, node: NodeId) {
        self.partition(&grudge::isolate(&self.nodes(), node), Mode::Hold);
    }

    /// [`grudge::halves`] of the nodes in id order.
    pub fn halves(&self) {
        self.partition(&grudge::halves(&self.nodes()), Mode::Hold);
    }

    /// [`grudge::majorities_ring`] of the nodes in id order.
    pub fn majorities_ring(&self) {
        self.partition(&grudge::majorities_ring(&self.nodes()), Mode::Hold);
    }

    /// [`grudge::bridge`] of the nodes in id order.
    pub fn bridge(&self) {
        self.partition(&grudge::bridge(&self.nodes()), Mode::Hold);
    }

    /// Which ordered pairs `(src, dst)` currently carry nothing from `src`
    /// to `dst` (a forward or backward direction not in Pass or Delay):
    /// the grudge in effect, for the history.
    pub fn blocked(&self) -> Grudge {
        let mut g = Grudge::new();
        let blocked = |m: Mode| matches!(m, Mode::Hold | Mode::Reset);
        for (&(from, to), l) in &self.links {
            let m = l.modes();
            if blocked(m.forward) || m.reset() {
                g.entry(to).or_default().insert(from);
            }
            if blocked(m.backward) || m.reset() {
                g.entry(from).or_default().insert(to);
            }
        }
        g
    }
}
