//! TLS on every internal gRPC link (the hostile-clients issue §2), against
//! real nodes: Raft, forwarding and relays between nodes, a gateway and
//! gRPC clients all run over (mutual) TLS, and whoever lacks the right CA,
//! or a client certificate where one is required, is refused while the
//! cluster keeps serving.

use std::time::Duration;

use rim_cluster::{LinkTls, LinkTlsConfig};
use rim_proto::ids::ShardId;
use rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY;
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::{ClusterStatusReply, ClusterStatusRequest};
use rim_testkit::cluster::{Cluster, users_on_two_shards};
use rim_testkit::grpc::{Client, SECRET, endpoint, endpoint_with};
use rim_testkit::tls::TestPki;
use rim_testkit::wait::{WAIT, eventually, serial};

/// `ClusterStatus` on the internal listener at `addr`, as a caller with
/// `tls` (plaintext without), holding the cluster secret.
async fn status(addr: &str, tls: Option<&LinkTls>) -> Result<ClusterStatusReply, tonic::Status> {
    let ep = match tls {
        Some(t) => endpoint_with(addr, Some(t)),
        None => endpoint(addr),
    };
    let ch = ep.timeout(Duration::from_secs(5)).connect_lazy();
    let mut req = tonic::Request::new(ClusterStatusRequest::default());
    req.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, SECRET.parse().unwrap());
    AdminServiceClient::new(ch).cluster_status(req).await.map(|r| r.into_inner())
}

/// Whether `e` is a refusal by the transport (the handshake failed, or,
/// with TLS 1.3, the server closed the connection after the client had
/// finished its side), not an answer of the service.
fn refused_by_tls(e: &tonic::Status) -> bool {
    let transport = std::error::Error::source(e).is_some_and(|s| s.is::<tonic::transport::Error>());
    transport && matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown)
}

fn load(c: LinkTlsConfig) -> LinkTls {
    LinkTls::load(&c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_over_mutual_tls_and_refuses_strangers() {
    let _g = serial().await;
    let pki = TestPki::new();
    let c = Cluster::start_with(3, 2, |cfg| cfg.tls = Some(pki.link_config(true))).await;
    // Ready means every group elected a leader: Raft ran over the links.
    for shard in [0, 1, 2] {
        c.leader(ShardId(shard)).await;
    }

    // Clients of the client listener (TLS, no client certificate needed:
    // mutual TLS is for the internal listener) and a gateway (TLS upstream)
    // work; a message crosses shards (a relay between nodes) and reaches
    // its recipient.
    let anonymous = load(LinkTlsConfig { ca: pki.ca.clone(), ..Default::default() });
    let client = Client::connect_with(&c.configs[&1].client_listen, Some(&anonymous));
    let (alice, bob) = users_on_two_shards(&c, &client, "tls").await;
    client.send_acked(&alice, bob.user, "m1", "over tls").await;
    let got = eventually(WAIT, "bob syncs m1", || async {
        c.client(2).sync_all(&bob).await.ok().filter(|l| l.iter().any(|m| m.client_msg_id == "m1"))
    })
    .await;
    assert_eq!(got.iter().filter(|m| m.client_msg_id == "m1").count(), 1);
    let gw = c.gateway("tls-gw").await;
    drop(gw);

    let internal = c.configs[&1].listen.clone();
    let member = pki.link(true);
    assert!(status(&internal, Some(&member)).await.is_ok(), "a member with its certificate gets in");

    // Plaintext, a client that trusts another CA, one without a client
    // certificate, and one whose certificate another CA signed: all refused.
    let plaintext = status(&internal, None).await;
    assert!(plaintext.is_err(), "plaintext was served: {plaintext:?}");
    let wrong_ca = load(LinkTlsConfig { ca: pki.other_ca.clone(), ..pki.link_config(false) });
    let e = status(&internal, Some(&wrong_ca)).await.expect_err("a server certificate of an untrusted CA");
    assert!(refused_by_tls(&e), "{e:?}");
    let e = status(&internal, Some(&anonymous)).await.expect_err("mutual TLS without a client certificate");
    assert!(refused_by_tls(&e), "{e:?}");
    let forged = load(LinkTlsConfig {
        ca: pki.ca.clone(),
        cert: Some(pki.other_cert.clone()),
        key: Some(pki.other_key.clone()),
        ..Default::default()
    });
    let e = status(&internal, Some(&forged)).await.expect_err("a client certificate of an untrusted CA");
    assert!(refused_by_tls(&e), "{e:?}");

    // The refusals broke nothing: the cluster still takes writes.
    client.send_acked(&alice, bob.user, "m2", "still over tls").await;
    eventually(WAIT, "bob syncs m2", || async {
        c.client(2).sync_all(&bob).await.ok().filter(|l| l.iter().any(|m| m.client_msg_id == "m2"))
    })
    .await;
    c.shutdown().await;
}

/// A node whose certificate another CA signed cannot take part: its peers
/// refuse its calls and it refuses theirs, so the two good nodes lead and
/// commit alone, and the odd one never learns a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_ca_is_kept_out() {
    let _g = serial().await;
    let pki = TestPki::new();
    let mut c = Cluster::start_with(3, 1, |cfg| cfg.tls = Some(pki.link_config(true))).await;
    c.stop_node(3).await;
    let odd = c.configs.get_mut(&3).unwrap();
    odd.tls = Some(LinkTlsConfig {
        ca: pki.other_ca.clone(),
        cert: Some(pki.other_cert.clone()),
        key: Some(pki.other_key.clone()),
        require_client_cert: true,
        server_name: None,
    });
    let addr = odd.listen.clone();
    c.start_node(3).await;

    // Writes commit on the two good nodes meanwhile.
    let client = c.client(1);
    let alice = client.register_and_sign_in("kept_out_a").await;
    let bob = client.register_and_sign_in("kept_out_b").await;
    client.send_acked(&alice, bob.user, "m1", "between good nodes").await;

    // The odd node's listener refuses members of the cluster's CA...
    let e = status(&addr, Some(&pki.link(true))).await.expect_err("the odd node trusts another CA");
    assert!(refused_by_tls(&e), "{e:?}");
    // ...and none of what the others committed since its restart reaches
    // its replica.
    let applied = |id: u64| {
        let g = c.node(id).core.group(ShardId(1)).expect("every node hosts shard 1");
        g.raft.metrics().borrow().last_applied.map_or(0, |l| l.index)
    };
    let (good, odd) = (applied(1).max(applied(2)), applied(3));
    assert!(odd < good, "the odd node applied {odd} of {good}");
    c.shutdown().await;
}
