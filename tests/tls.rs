//! TLS from the command line, with real processes: `rim cert` writes a CA
//! and a certificate, three `rim node`s serve and dial each other over
//! mutual TLS (`--tls-*`), `rim admin` reaches them only with the CA and a
//! client certificate, and a `rim gateway` whose links to the nodes use TLS
//! (`--upstream-*`) carries a conversation.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use prost::Message as _;
use rim_cluster::{LinkTls, LinkTlsConfig};
use rim_proto::v1::{Command, ContentType, ConversationKind, SendInput, SendOutput};
use support::*;

/// `rim admin ... status` with `tls` flags: (succeeded, stdout, stderr).
async fn admin_status(addr: &str, tls: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(rim_bin())
            .args(["admin", "--addr", addr, "--cluster-secret", SECRET])
            .args(tls)
            .arg("status")
            .output(),
    )
    .await
    .expect("rim admin finishes within 30 s")
    .expect("run rim admin");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_from_the_command_line() {
    let _g = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("tls");
    let cert_cmd = |extra: &[&str]| {
        rim_command()
            .args(["cert", "--out", out_dir.to_str().unwrap(), "--name", "127.0.0.1,localhost"])
            .args(extra)
            .output()
            .expect("run rim cert")
    };
    let made = cert_cmd(&[]);
    assert!(made.status.success(), "rim cert: {}", String::from_utf8_lossy(&made.stderr));
    let [ca, cert, key] = ["ca.pem", "cert.pem", "key.pem"].map(|f| out_dir.join(f));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the private key is readable by its owner only");
    let again = cert_cmd(&[]);
    assert!(!again.status.success(), "rim cert replaced existing files without --force");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let (ca, cert, key) = (ca.to_str().unwrap(), cert.to_str().unwrap(), key.to_str().unwrap());
    let node_tls = ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key, "--tls-require-client-cert"];
    let mut c = ProcCluster::start_with(3, 2, &node_tls).await;
    let internal = c.nodes[&1].internal.clone();

    // The admin CLI: in with the CA and a client certificate, out without.
    let admin_tls = ["--ca", ca, "--cert", cert, "--key", key];
    let (ok, stdout, stderr) = eventually(Duration::from_secs(30), "rim admin status over TLS", || async {
        let r = admin_status(&internal, &admin_tls).await;
        r.1.contains("groups, as their leaders report them").then_some(r)
    })
    .await;
    assert!(ok, "rim admin status: {stderr}");
    assert!(stdout.contains("groups, as their leaders report them"));
    let (ok, _, _) = admin_status(&internal, &[]).await;
    assert!(!ok, "rim admin reached a TLS node in plaintext");
    let (ok, _, _) = admin_status(&internal, &["--ca", ca]).await;
    assert!(!ok, "rim admin reached a node requiring client certificates without one");

    // Clients of the node's client listener (TLS) and a gateway whose
    // links to the nodes are TLS: a conversation goes through.
    let tls = LinkTls::load(&LinkTlsConfig {
        ca: ca.into(),
        cert: Some(cert.into()),
        key: Some(key.into()),
        ..Default::default()
    })
    .unwrap();
    let client = Client::connect_with(&c.nodes[&1].client, Some(&tls));
    let alice = client.register_and_sign_in("tls_cli_a").await;
    let bob = client.register_and_sign_in("tls_cli_b").await;
    let upstream = ["--upstream-ca", ca, "--upstream-cert", cert, "--upstream-key", key];
    let gw = GatewayProc::start_with("tls-gw", &c.internal_addrs(), &upstream).await;
    let (mut a, _) = Conn::sign_in(&gw.tcp, &alice).await;
    let (mut b, _) = Conn::sign_in(&gw.tcp, &bob).await;
    let send = SendInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: bob.user.0,
        client_msg_id: "tls-1".into(),
        content_type: ContentType::Text as i32,
        content: b"through a TLS upstream".to_vec().into(),
        ..Default::default()
    };
    let sent = SendOutput::decode(a.call(Command::Send, &send).await.expect("send").as_slice()).unwrap();
    assert!(sent.seq > 0);
    let got =
        b.messages_until(Duration::from_secs(20), |m| m.iter().any(|m| m.client_msg_id == "tls-1")).await;
    assert!(
        got.iter().any(|m| m.client_msg_id == "tls-1" && m.content.as_ref() == b"through a TLS upstream"),
        "bob got {got:?}; gateway log:\n{}",
        gw.log_tail(30)
    );
    c.kill_all();
}
