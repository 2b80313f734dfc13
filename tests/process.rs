//! Real-process tests: 3 `rim node` processes on loopback, SIGKILLed and
//! restarted from their data dirs, checked through the client gRPC API.
//!
//! Logs of every process go to `node.log` in its temp dir; their tails are
//! printed when a test fails.

mod support;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

/// Registers `prefix`a, then users until one lands on another shard than a's.
async fn two_users_on_different_shards(
    c: &ProcCluster,
    client: &Client,
    prefix: &str,
) -> (Session, Session, rim_cluster::Placement) {
    let placement = c.placement(1).await;
    let a = client.register_and_sign_in(&format!("{prefix}a")).await;
    for i in 0..40 {
        let b = client.register_and_sign_in(&format!("{prefix}b{i}")).await;
        if placement.shard_of_user(b.user) != placement.shard_of_user(a.user) {
            return (a, b, placement);
        }
    }
    panic!("no user landed on another shard than user {}", a.user);
}

/// Checks a recipient's list: exactly `want` (client_msg_ids in send order),
/// each once, at seqs 1..=n.
fn assert_exactly(list: &[rim_proto::v1::Message], want: &[String], what: &str) {
    let ids: Vec<&str> = list.iter().map(|m| m.client_msg_id.as_str()).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "{what}: duplicates in {ids:?}");
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>(), "{what}: ids");
    assert_eq!(
        list.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=list.len() as u64).collect::<Vec<_>>(),
        "{what}: gap-free seqs"
    );
}

/// Waits until `s`'s list seen through `client` holds at least `n` entries.
async fn list_with_at_least(
    client: &Client,
    s: &Session,
    n: usize,
    what: &str,
) -> Vec<rim_proto::v1::Message> {
    eventually(Duration::from_secs(30), what, || async {
        match client.sync_all(s).await {
            Ok(l) if l.len() >= n => Some(l),
            Ok(_) => None,
            Err(e) => {
                assert!(code(&e).is_retryable(), "{what}: sync failed: {e:?}");
                None
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_node_and_nothing_acked_is_lost() {
    let _g = serial().await;
    let t0 = Instant::now();
    let mut c = ProcCluster::start(3, 4).await;
    let first = c.client(1);
    let (alice, bob, placement) = two_users_on_different_shards(&c, &first, "k").await;
    let shard = placement.shard_of_user(alice.user);
    let victim = c.leader(shard, Duration::from_secs(20)).await;
    let via_id = c.ids().into_iter().find(|i| *i != victim).expect("a survivor");
    let via = c.client(via_id);
    eprintln!("alice {} on shard {shard}, led by node {victim}; sending through node {via_id}", alice.user);

    let mut acked: Vec<(u64, String)> = Vec::new();
    for i in 0..60 {
        if i == 30 {
            c.kill(victim);
            eprintln!("SIGKILLed node {victim} after 30 acked sends ({:?})", t0.elapsed());
        }
        let cmid = format!("k{i}");
        let out = via.send_acked(&alice, bob.user, &cmid, &format!("payload {i}")).await;
        acked.push((out.seq, cmid));
    }
    assert_eq!(
        acked.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=60).collect::<Vec<u64>>(),
        "acked seqs of alice's own list"
    );
    let new_leader = c.leader(shard, Duration::from_secs(20)).await;
    assert_ne!(new_leader, victim, "shard {shard} elected a new leader");
    eprintln!("60 sends acked, node {new_leader} leads shard {shard} ({:?})", t0.elapsed());

    c.node(victim).spawn();
    c.node(victim).wait_healthy(Duration::from_secs(40)).await;
    eprintln!("node {victim} restarted and healthy ({:?})", t0.elapsed());

    // Every node serves alice's list with exactly the acked sends at their acked seqs.
    for id in c.ids() {
        let list = c.client(id).sync_all_retry(&alice).await;
        assert_eq!(list.len(), 60, "alice's list through node {id}: {:?}", texts(&list));
        assert_eq!(texts(&list), acked, "alice's list through node {id}");
    }
    // Bob eventually holds every acked send exactly once, in send order.
    let want: Vec<String> = acked.iter().map(|(_, c)| c.clone()).collect();
    for id in c.ids() {
        let list =
            list_with_at_least(&c.client(id), &bob, 60, &format!("bob's list through node {id}")).await;
        assert_exactly(&list, &want, &format!("bob's list through node {id}"));
    }
    eprintln!("kill_a_node_and_nothing_acked_is_lost: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_whole_cluster_keeps_data() {
    let _g = serial().await;
    let t0 = Instant::now();
    let mut c = ProcCluster::start(3, 4).await;
    let first = c.client(1);
    let (alice, bob, _) = two_users_on_different_shards(&c, &first, "r").await;

    let mut acked: Vec<(u64, String)> = Vec::new();
    for i in 0..20u64 {
        let cmid = format!("r{i}");
        let out = c.client(i % 3 + 1).send_acked(&alice, bob.user, &cmid, "before").await;
        acked.push((out.seq, cmid));
    }
    let bob_before = list_with_at_least(&first, &bob, 20, "bob's list before the restart").await;
    let want: Vec<String> = acked.iter().map(|(_, c)| c.clone()).collect();
    assert_exactly(&bob_before, &want, "bob's list before the restart");

    c.kill_all();
    eprintln!("SIGKILLed all nodes ({:?})", t0.elapsed());
    for id in c.ids() {
        c.node(id).spawn();
    }
    c.wait_all_healthy(Duration::from_secs(40)).await;
    eprintln!("all nodes restarted and healthy ({:?})", t0.elapsed());

    for id in c.ids() {
        let client = c.client(id);
        let list = client.sync_all_retry(&alice).await;
        assert_eq!(texts(&list), acked, "alice's list through node {id} after the restart");
        let list = client.sync_all_retry(&bob).await;
        assert_exactly(&list, &want, &format!("bob's list through node {id} after the restart"));
    }

    // New sends continue the seqs without gaps.
    let last = acked.last().map(|(s, _)| *s).unwrap_or(0);
    for i in 20..30u64 {
        let cmid = format!("r{i}");
        let out = c.client(i % 3 + 1).send_acked(&alice, bob.user, &cmid, "after").await;
        assert_eq!(out.seq, last + (i - 19), "seq of {cmid}");
        acked.push((out.seq, cmid));
    }
    let want: Vec<String> = acked.iter().map(|(_, c)| c.clone()).collect();
    for id in c.ids() {
        let client = c.client(id);
        assert_eq!(texts(&client.sync_all_retry(&alice).await), acked, "alice's list through node {id}");
        let list = list_with_at_least(&client, &bob, 30, &format!("bob's list through node {id}")).await;
        assert_exactly(&list, &want, &format!("bob's list through node {id}"));
    }

    // The admin CLI reads the restarted cluster.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(rim_bin())
            .args(["admin", "--addr", &c.nodes[&1].internal, "--cluster-secret", SECRET, "status"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("rim admin status finishes within 20 s")
    .expect("run rim admin");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rim admin status: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("groups, as their leaders report them"), "rim admin status output:\n{stdout}");
    eprintln!("restart_whole_cluster_keeps_data: {:?}", t0.elapsed());
}

/// Runs `rim node` with `args` (and extra environment) and returns its exit
/// status and stderr, failing if it does not exit within 15 s.
async fn run_node_expecting_exit(
    args: &[String],
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let err_path = dir.path().join("stderr.log");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut cmd = rim_command();
    cmd.arg("node").args(args).stdout(Stdio::null()).stderr(Stdio::from(err));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn rim node");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (status, std::fs::read_to_string(&err_path).unwrap_or_default());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rim node {args:?} {env:?} still running after 15 s; stderr:\n{}", tail(&err_path, 40));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_is_refused_with_a_clear_error() {
    let _g = serial().await;
    let t0 = Instant::now();
    let data = tempfile::tempdir().expect("tempdir");
    let (listen, client, http) = (free_addr(), free_addr(), free_addr());
    let base = |id: &str, peers: Option<&str>, secret: &str, bootstrap: bool| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--id".into(),
            id.into(),
            "--data".into(),
            data.path().join("data").display().to_string(),
            "--listen".into(),
            listen.clone(),
            "--client-listen".into(),
            client.clone(),
            "--http-listen".into(),
            http.clone(),
            "--cluster-secret".into(),
            secret.into(),
        ];
        if bootstrap {
            a.push("--bootstrap".into());
        }
        if let Some(p) = peers {
            a.extend(["--peers".into(), p.into()]);
        }
        a
    };
    let peers = format!("1={listen}");
    let bad_peers = format!("1={listen},x=127.0.0.1:1");
    type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("id 0", base("0", Some(&peers), SECRET, true), vec![], "id must be ≥ 1"),
        ("bootstrap without peers", base("1", None, SECRET, true), vec![], "bootstrap needs peers"),
        (
            "short secret",
            base("1", Some(&peers), "short", true),
            vec![],
            "cluster_secret must be at least 16 characters",
        ),
        (
            "short secret from the environment over a good flag",
            base("1", Some(&peers), SECRET, true),
            vec![("RIM_CLUSTER_SECRET", "short")],
            "cluster_secret must be at least 16 characters",
        ),
        ("malformed peers", base("1", Some(&bad_peers), SECRET, true), vec![], "bad node id"),
        (
            "this node missing from peers",
            base("2", Some(&peers), SECRET, true),
            vec![],
            "peers must include this node",
        ),
        (
            "empty data dir, neither bootstrap nor join",
            base("1", None, SECRET, false),
            vec![],
            "holds no cluster yet",
        ),
    ];
    for (name, args, env, want) in cases {
        let started = Instant::now();
        let (status, stderr) = run_node_expecting_exit(&args, &env).await;
        assert!(!status.success(), "{name}: rim node exited with {status}; stderr:\n{stderr}");
        assert!(stderr.contains(want), "{name}: stderr should name the problem ({want:?}):\n{stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "{name}: took {:?}", started.elapsed());
    }
    eprintln!("bad_config_is_refused_with_a_clear_error: {:?}", t0.elapsed());
}
