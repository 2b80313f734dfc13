//! Real `rim node` / `rim gateway` processes under `rim_jepsen::control`.
//!
//! Needs the built binary (`cargo build -p rim`, or `RIM_BIN`); without it
//! the tests fail with a message saying so. Cluster tests run one at a time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rim_jepsen::control::{Cluster, ClusterOptions, GroupGauges, NodeProcess, parse_raft_gauges, rim_bin};

/// Start-up and recovery bound on a loaded 2-core machine.
const SLOW: Duration = Duration::from_secs(60);

/// The cluster tests start real processes: one at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn bin() -> std::path::PathBuf {
    rim_bin().unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `probe` until it returns `Some`, or panics after `timeout`.
async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn healthy(n: &NodeProcess) -> bool {
    matches!(n.healthz().await, Ok((200, _)))
}

async fn gauges(n: &NodeProcess) -> Option<BTreeMap<u32, GroupGauges>> {
    n.raft().await.ok().filter(|g| !g.is_empty())
}

#[test]
fn finds_the_binary_and_parses_gauges() {
    let b = bin();
    assert!(b.is_file(), "{}", b.display());
    let text = "# TYPE rim_raft_term gauge\nrim_raft_term{group=\"0\"} 3\nrim_raft_is_leader{group=\"0\"} 1\n\
                rim_raft_applied_index{group=\"2\"} 17\nrim_raft_last_log_index{group=\"2\"} 18\nother 1\n";
    let g = parse_raft_gauges(text);
    assert_eq!(g[&0], GroupGauges { is_leader: true, term: 3, ..Default::default() });
    assert_eq!(g[&2], GroupGauges { applied_index: 17, last_log_index: 18, ..Default::default() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_pause_resume_restart_and_gateway() {
    let _serial = serial().await;
    let mut c = Cluster::start(ClusterOptions::new(bin(), 3)).await.unwrap();
    c.wait_healthy(SLOW).await.unwrap();
    assert!(c.mesh().is_none());

    // Pause: the process stops answering (but runs), resume: it answers.
    c.pause(2).unwrap();
    assert!(c.node_mut(2).is_running() && c.node_mut(2).proc().is_paused());
    let e = c.node(2).healthz().await.expect_err("a paused node does not answer");
    assert!(e.contains("timeout"), "{e}");
    c.resume(2).unwrap();
    c.node_mut(2).wait_healthy(SLOW).await.unwrap();

    // Kill: gone at once; restart from its data dir.
    let pgid = c.node_mut(3).proc().pgid().unwrap();
    c.kill(3);
    assert!(!c.node_mut(3).is_running());
    assert!(c.node(3).healthz().await.is_err(), "a killed node does not answer");
    assert!(
        !std::path::Path::new(&format!("/proc/{pgid}")).exists(),
        "the killed process group leader is reaped"
    );
    c.restart(3).unwrap();
    c.node_mut(3).wait_healthy(SLOW).await.unwrap();
    // A paused node can be killed too.
    c.pause(1).unwrap();
    c.restart(1).unwrap();
    c.wait_healthy(SLOW).await.unwrap();
    let log = std::fs::read_to_string(c.node(1).log_path()).unwrap();
    assert!(log.contains("===== run 2 of node 1"), "the log is appended across runs");

    // A gateway seeded with the real addresses; SIGTERM drains it.
    let mut gw = c.start_gateway().unwrap();
    gw.wait_healthy(SLOW).await.unwrap();
    let status = gw.stop(Duration::from_secs(15));
    assert!(status.is_some(), "the gateway stopped on SIGTERM within the grace period");
    assert!(!gw.proc().is_running());

    // Drop kills every node: their HTTP listeners go away.
    let https: Vec<_> = c.nodes().map(|n| n.http).collect();
    drop(c);
    for h in https {
        assert!(
            rim_jepsen::control::http_get(h, "/healthz", Duration::from_secs(2)).await.is_err(),
            "{h} still answers after drop"
        );
    }
}

/// Raft traffic really flows through the per-link proxies: isolating a node
/// with them deposes it and stops it from committing; healing lets it catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_isolation_deposes_and_heal_catches_up() {
    let _serial = serial().await;
    let mut opts = ClusterOptions::new(bin(), 3);
    opts.proxied = true;
    let mut c = Cluster::start(opts).await.unwrap();
    c.wait_healthy(SLOW).await.unwrap();
    let ids = c.ids();
    let nodes: Vec<&NodeProcess> = ids.iter().map(|id| c.node(*id)).collect();
    // Every node dials its peers through its own links (`--peer-via`),
    // whatever membership entry it ended up with (a node that hears from a
    // leader before its own `initialize` adopts the leader's entry, which
    // holds the same real addresses).
    for n in &nodes {
        let log = std::fs::read_to_string(n.log_path()).unwrap();
        assert!(log.contains("--peer-via"), "node {} was not started with --peer-via", n.id);
    }

    // The leader of the meta group (0), as every node reports it.
    let leader = eventually(SLOW, "an agreed leader of group 0", || async {
        let mut leaders = Vec::new();
        for n in &nodes {
            if gauges(n).await?.get(&0)?.is_leader {
                leaders.push(n.id);
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await;
    let mesh = c.mesh().unwrap();
    // Its Raft RPCs (heartbeats at least) went through its outgoing proxies.
    for &to in ids.iter().filter(|&&i| i != leader) {
        let st = mesh.link(leader, to).stats();
        assert!(st.forward_bytes > 0 && st.backward_bytes > 0, "link {leader}→{to}: {st:?}");
    }
    let others: Vec<&NodeProcess> = nodes.iter().copied().filter(|n| n.id != leader).collect();
    let isolated = c.node(leader);

    mesh.isolate(leader);
    // The majority elects a new leader of group 0 and commits (at least
    // the new term's blank entry) past what the isolated node has applied.
    let (new_leader, majority_applied) =
        eventually(SLOW, "a new leader of group 0 in the majority", || async {
            let mut new = None;
            let mut applied = BTreeMap::new();
            for n in &others {
                if !healthy(n).await {
                    return None;
                }
                let g = gauges(n).await?;
                if g.get(&0)?.is_leader {
                    new = Some(n.id);
                }
                for (group, gg) in g {
                    let a = applied.entry(group).or_insert(gg.applied_index);
                    *a = (*a).min(gg.applied_index);
                }
            }
            Some((new?, applied))
        })
        .await;
    // The deposed leader cannot commit: it reports itself unhealthy (no
    // quorum), and its meta group stays behind the majority.
    eventually(SLOW, "the isolated node reports no quorum", || async {
        (!healthy(isolated).await).then_some(())
    })
    .await;
    let cut = gauges(isolated).await.expect("the isolated node answers /metrics");
    assert!(
        cut[&0].applied_index < majority_applied[&0],
        "isolated node applied {} of group 0, the majority {}",
        cut[&0].applied_index,
        majority_applied[&0]
    );
    // Nothing reaches it: a while later it has still applied nothing new.
    let before = mesh.link(new_leader, leader).stats();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gauges(isolated).await.unwrap()[&0].applied_index, cut[&0].applied_index);
    let after = mesh.link(new_leader, leader).stats();
    assert_eq!(before.forward_bytes, after.forward_bytes, "the held link forwarded bytes");

    mesh.heal();
    eventually(SLOW, "the healed node catches up", || async {
        if !healthy(isolated).await {
            return None;
        }
        let g = gauges(isolated).await?;
        majority_applied
            .iter()
            .all(|(group, a)| g.get(group).is_some_and(|x| x.applied_index >= *a))
            .then_some(())
    })
    .await;
    c.wait_healthy(SLOW).await.unwrap();
}

/// The `Date` header of a `GET /healthz` (hyper stamps it from the wall
/// clock, so it shows a faked clock).
async fn http_date(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("date: ").or_else(|| l.strip_prefix("Date: ")).map(str::to_string))
}

/// Hours field of an HTTP date (`Sun, 29 Nov 2026 23:34:53 GMT`).
fn hour_of(date: &str) -> Option<u32> {
    date.split(' ').nth(4)?.split(':').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_offsets_shift_a_nodes_wall_clock_only() {
    let Some(lib) = rim_jepsen::control::find_faketime() else {
        eprintln!("skipped: libfaketime is not installed (apt-get install faketime)");
        return;
    };
    let _serial = serial().await;
    let mut opts = ClusterOptions::new(bin(), 1);
    opts.faketime = Some(lib);
    let mut c = Cluster::start(opts).await.unwrap();
    c.wait_healthy(SLOW).await.unwrap();
    let http = c.node(1).http;
    let real = hour_of(&http_date(http).await.expect("a Date header")).unwrap();
    // Forward steps only: hyper caches the Date header until the clock
    // passes its next second, so a step back would not show for hours.
    for hours in [2, 5] {
        c.set_clock_offset(1, hours * 3600).unwrap();
        eventually(SLOW, &format!("the node's clock moves {hours} hours ahead"), || async {
            let h = hour_of(&http_date(http).await?)?;
            let ahead = (h + 24 - real) % 24;
            (ahead == hours as u32 || ahead == hours as u32 + 1).then_some(())
        })
        .await;
    }
    // Monotonic time is untouched: timers still fire, the node stays healthy.
    c.wait_healthy(SLOW).await.unwrap();
    c.set_clock_offset(1, 0).unwrap();
    let file = std::fs::read_to_string(c.node(1).dir.join(rim_jepsen::control::FAKETIME_FILE)).unwrap();
    assert_eq!(file.trim(), "+0");
}
