//! `LinkProxy` and `ProxyMesh` against plain TCP echo servers on loopback.
//!
//! Every wait has a deadline; the only fixed-length waits are "nothing
//! arrives within this window" checks, which cannot be written otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rim_jepsen::proxy::{Dir, Grudge, LinkProxy, Mode, ProxyMesh, grudge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for anything that should happen (loaded 2-core machine).
const DEADLINE: Duration = Duration::from_secs(10);
/// Window in which something must *not* happen.
const QUIET: Duration = Duration::from_millis(300);

/// An echo server counting the bytes and connections it received.
struct Echo {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    conns: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo() -> Echo {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let conns = Arc::new(AtomicU64::new(0));
    let (r, c) = (received.clone(), conns.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            r.fetch_add(n as u64, Ordering::SeqCst);
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Echo { addr, received, conns, task }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(DEADLINE, TcpStream::connect(addr)).await.expect("connect timed out").unwrap()
}

/// Reads exactly `n` bytes within the deadline.
async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("bytes did not arrive in time")
        .expect("read failed");
    buf
}

/// Asserts that nothing arrives within [`QUIET`].
async fn assert_quiet(s: &mut TcpStream) {
    let mut b = [0u8; 1];
    match tokio::time::timeout(QUIET, s.read(&mut b)).await {
        Err(_) => {}
        Ok(r) => panic!("expected silence, got {r:?}"),
    }
}

/// Asserts that the connection breaks (reset or EOF) within the deadline.
async fn assert_broken(s: &mut TcpStream) {
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) => return "eof".to_string(),
                Err(e) => return format!("{:?}", e.kind()),
                Ok(_) => continue,
            }
        }
    })
    .await
    .expect("the connection was not broken in time");
    assert!(r == "eof" || r.contains("Reset") || r.contains("Aborted"), "{r}");
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects through a link that resets: either the connect itself or the
/// first read must fail.
async fn assert_refused(addr: SocketAddr) {
    match tokio::time::timeout(DEADLINE, TcpStream::connect(addr)).await.expect("connect in time") {
        Ok(mut s) => assert_broken(&mut s).await,
        Err(e) => assert!(
            matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused),
            "{e:?}"
        ),
    }
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    assert_eq!(read_n(s, msg.len()).await, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_forwards_both_ways() {
    let e = echo().await;
    let p = LinkProxy::start(e.addr).await.unwrap();
    assert_eq!(p.target(), e.addr);
    let mut s = connect(p.addr()).await;
    // More than the proxy's buffering, so flow control is exercised.
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = s.split();
    let send = async {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, rd.read_to_end(&mut got)).await.expect("echo in time").unwrap();
        got
    };
    let ((), got) = tokio::join!(send, recv);
    assert!(got == data, "echoed {} bytes, sent {}", got.len(), data.len());
    let st = p.stats();
    assert_eq!((st.forward_bytes, st.backward_bytes, st.accepted), (1_000_000, 1_000_000, 1));
    drop(s);
    until("connection finished", || p.stats().open == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_stops_bytes_then_heal_delivers_them() {
    let e = echo().await;
    let p = LinkProxy::start(e.addr).await.unwrap();
    let mut s = connect(p.addr()).await;
    round_trip(&mut s, b"hello").await;

    p.set_mode(Mode::Hold);
    s.write_all(b"held-1").await.unwrap();
    assert_quiet(&mut s).await;
    s.write_all(b"held-2").await.unwrap();
    assert_quiet(&mut s).await;
    assert_eq!(e.received.load(Ordering::SeqCst), 5, "nothing reached the target");
    // A new connection is accepted but not opened to the target.
    let mut s2 = connect(p.addr()).await;
    s2.write_all(b"new").await.unwrap();
    assert_quiet(&mut s2).await;
    assert_eq!(e.conns.load(Ordering::SeqCst), 1);

    p.set_mode(Mode::Pass);
    assert_eq!(read_n(&mut s, 12).await, b"held-1held-2", "held bytes arrive in order");
    assert_eq!(read_n(&mut s2, 3).await, b"new");
    round_trip(&mut s, b"after").await;
    assert_eq!(p.stats().resets, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_one_direction() {
    let e = echo().await;
    let p = LinkProxy::start(e.addr).await.unwrap();
    let mut s = connect(p.addr()).await;
    round_trip(&mut s, b"x").await;
    // Requests pass, replies are held: the target sees the bytes, the
    // client hears nothing.
    p.set_dir_mode(Dir::Backward, Mode::Hold);
    s.write_all(b"ping").await.unwrap();
    until("target received the request", || e.received.load(Ordering::SeqCst) == 5).await;
    assert_quiet(&mut s).await;
    p.set_dir_mode(Dir::Backward, Mode::Pass);
    assert_eq!(read_n(&mut s, 4).await, b"ping");
    // And the other way round.
    p.set_dir_mode(Dir::Forward, Mode::Hold);
    s.write_all(b"pong").await.unwrap();
    assert_quiet(&mut s).await;
    assert_eq!(e.received.load(Ordering::SeqCst), 5);
    p.set_dir_mode(Dir::Forward, Mode::Pass);
    assert_eq!(read_n(&mut s, 4).await, b"pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_breaks_existing_connections_and_refuses_new_ones() {
    let e = echo().await;
    let p = LinkProxy::start(e.addr).await.unwrap();
    let mut s = connect(p.addr()).await;
    round_trip(&mut s, b"hello").await;
    // A held connection is reset too.
    let mut held = connect(p.addr()).await;
    round_trip(&mut held, b"h").await;
    p.set_mode(Mode::Hold);
    held.write_all(b"stuck").await.unwrap();

    p.set_mode(Mode::Reset);
    assert_broken(&mut s).await;
    assert_broken(&mut held).await;
    assert_refused(p.addr()).await;
    until("resets counted", || p.stats().resets >= 3).await;
    until("connections closed", || p.stats().open == 0).await;

    p.set_mode(Mode::Pass);
    let mut s3 = connect(p.addr()).await;
    round_trip(&mut s3, b"again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_adds_at_least_d_per_direction() {
    let d = Duration::from_millis(200);
    let e = echo().await;
    let p = LinkProxy::start(e.addr).await.unwrap();
    let mut s = connect(p.addr()).await;
    round_trip(&mut s, b"warm").await;

    p.set_mode(Mode::Delay(d));
    let t = Instant::now();
    round_trip(&mut s, b"both").await;
    let rtt = t.elapsed();
    assert!(rtt >= 2 * d, "round trip {rtt:?} < 2×{d:?}");

    p.set_dir_mode(Dir::Backward, Mode::Pass);
    let t = Instant::now();
    round_trip(&mut s, b"fwd").await;
    let rtt = t.elapsed();
    assert!(rtt >= d, "round trip {rtt:?} < {d:?}");

    // A new connection under delay: the first byte back takes ≥ d as well.
    p.set_mode(Mode::Delay(d));
    let t = Instant::now();
    let mut s2 = connect(p.addr()).await;
    round_trip(&mut s2, b"new").await;
    assert!(t.elapsed() >= 2 * d, "{:?}", t.elapsed());

    // Healing releases delayed data at once: a long delay, then Pass.
    p.set_mode(Mode::Delay(Duration::from_secs(60)));
    s.write_all(b"late").await.unwrap();
    assert_quiet(&mut s).await;
    p.set_mode(Mode::Pass);
    assert_eq!(read_n(&mut s, 4).await, b"late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_ends_its_connections() {
    let e = echo().await;
    let p = LinkProxy::start(e.addr).await.unwrap();
    let addr = p.addr();
    let mut s = connect(addr).await;
    round_trip(&mut s, b"x").await;
    drop(p);
    assert_broken(&mut s).await;
    // The listener closes once its task is dropped on a worker thread.
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener is still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_down_resets_the_client() {
    // A port with nothing listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let p = LinkProxy::start(dead).await.unwrap();
    assert_refused(p.addr()).await;
}

fn set(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

#[test]
fn grudge_shapes() {
    let n3 = [1, 2, 3];
    let n5 = [1, 2, 3, 4, 5];
    let g = grudge::isolate(&n3, 2);
    assert_eq!(g, Grudge::from([(1, set(&[2])), (2, set(&[1, 3])), (3, set(&[2]))]));
    let g = grudge::halves(&n5);
    assert_eq!(g[&1], set(&[3, 4, 5]));
    assert_eq!(g[&5], set(&[1, 2]));
    let g = grudge::bridge(&n5);
    assert_eq!(g, Grudge::from([(1, set(&[4, 5])), (2, set(&[4, 5])), (4, set(&[1, 2])), (5, set(&[1, 2]))]));
    assert!(!g.contains_key(&3), "the bridge hears everyone");
    // 7 nodes: 3 against 4; two sides of 3 joined by node 4.
    let n7 = [1, 2, 3, 4, 5, 6, 7];
    let g = grudge::halves(&n7);
    assert_eq!(g[&1], set(&[4, 5, 6, 7]));
    assert_eq!(g[&7], set(&[1, 2, 3]));
    let g = grudge::bridge(&n7);
    assert_eq!(g[&1], set(&[5, 6, 7]));
    assert_eq!(g[&7], set(&[1, 2, 3]));
    assert!(!g.contains_key(&4), "the bridge hears everyone");
    // A side against the rest (the shard-majority shape).
    let g = grudge::split(&n5, &[1, 4]);
    assert_eq!(
        g,
        Grudge::from([
            (1, set(&[2, 3, 5])),
            (4, set(&[2, 3, 5])),
            (2, set(&[1, 4])),
            (3, set(&[1, 4])),
            (5, set(&[1, 4]))
        ])
    );
    assert_eq!(grudge::split(&n3, &[2]), grudge::isolate(&n3, 2));

    for nodes in [&n3[..], &n5[..], &[1, 2, 3, 4][..], &[1, 2, 3, 4, 5, 6, 7][..]] {
        let g = grudge::majorities_ring(nodes);
        let m = nodes.len() / 2 + 1;
        let mut seen_sets = BTreeSet::new();
        for n in nodes {
            let dropped = g.get(n).cloned().unwrap_or_default();
            let seen: BTreeSet<u64> = nodes.iter().copied().filter(|x| !dropped.contains(x)).collect();
            assert!(seen.contains(n), "{n} hears itself");
            assert_eq!(seen.len(), m, "{n} hears exactly a majority in {nodes:?}: {seen:?}");
            assert!(seen_sets.insert(seen), "two nodes see the same majority in {nodes:?}");
        }
    }
    // 5 nodes: a ring of neighbours, symmetric.
    let g = grudge::majorities_ring(&n5);
    assert_eq!(g[&1], set(&[3, 4]));
    assert_eq!(g[&3], set(&[1, 5]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_applies_grudges_per_link_and_direction() {
    let echoes = [echo().await, echo().await, echo().await];
    let targets: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, echoes[i as usize - 1].addr)).collect();
    let mesh = ProxyMesh::start(&targets).await.unwrap();
    assert_eq!(mesh.nodes(), vec![1, 2, 3]);
    assert_eq!(mesh.links().count(), 6);
    let peers = mesh.peers_for(2);
    assert_eq!(peers[&2], targets[&2], "a node dials itself directly");
    assert_eq!(peers[&1], mesh.link(2, 1).addr());
    assert_eq!(mesh.via_arg(2), format!("1={},3={}", peers[&1], peers[&3]), "never via itself");

    // One open connection per ordered pair, as a node's peer channels are.
    let mut conns = BTreeMap::new();
    for (&(from, to), l) in mesh.links() {
        assert_eq!(l.target(), targets[&to]);
        let mut s = connect(mesh.addr(from, to)).await;
        round_trip(&mut s, b"hi").await;
        conns.insert((from, to), s);
    }

    mesh.isolate(1);
    assert_eq!(mesh.blocked(), grudge::isolate(&[1, 2, 3], 1));
    for (&(from, to), s) in conns.iter_mut() {
        if from == 1 || to == 1 {
            s.write_all(b"cut").await.unwrap();
        } else {
            round_trip(s, b"ok").await;
        }
    }
    for (&(from, to), s) in conns.iter_mut() {
        if from == 1 || to == 1 {
            assert_quiet(s).await;
        }
    }
    mesh.heal();
    assert!(mesh.blocked().is_empty());
    for (&(from, to), s) in conns.iter_mut() {
        if from == 1 || to == 1 {
            assert_eq!(read_n(s, 3).await, b"cut");
        }
    }

    // The asymmetric 3-node ring: 1 drops 2, 2 drops 3, 3 drops 1.
    let ring = grudge::majorities_ring(&[1, 2, 3]);
    mesh.majorities_ring();
    assert_eq!(mesh.blocked(), ring);
    for (dst, srcs) in &ring {
        for src in srcs {
            // Requests src→dst are held on link src→dst...
            assert_eq!(mesh.link(*src, *dst).modes().forward, Mode::Hold);
            // ...and so are src's replies on link dst→src.
            assert_eq!(mesh.link(*dst, *src).modes().backward, Mode::Hold);
        }
    }
    // 1 drops 2: 1 still reaches 2 (requests pass) but hears no reply.
    let before = echoes[1].received.load(Ordering::SeqCst);
    let s = conns.get_mut(&(1, 2)).unwrap();
    s.write_all(b"req").await.unwrap();
    until("2 received 1's request", || echoes[1].received.load(Ordering::SeqCst) == before + 3).await;
    assert_quiet(s).await;

    mesh.halves();
    assert_eq!(mesh.blocked(), grudge::halves(&[1, 2, 3]), "a new grudge replaces the old one");
    mesh.heal();
    assert_eq!(read_n(conns.get_mut(&(1, 2)).unwrap(), 3).await, b"req");
    for s in conns.values_mut() {
        round_trip(s, b"end").await;
    }
}
