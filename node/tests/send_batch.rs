//! `GatewayService.SendBatch`: each item answered exactly as the unary
//! `Send` answers it (output, or code, message and leader hint), in the
//! items' order, with sends for shards the called node does not lead
//! forwarded like unary ones; every accepted send in the lists once.

use std::collections::HashMap;
use std::time::Duration;

use rim_proto::ErrorCode;
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::*;
use rim_testkit::cluster::*;
use rim_testkit::grpc::*;
use rim_testkit::wait::*;
use tonic::transport::Channel;

fn gateway(c: &Cluster, node: u64) -> GatewayServiceClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.configs[&node].listen))
        .unwrap()
        .connect_lazy();
    GatewayServiceClient::new(ch)
}

fn secret<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(20));
    r.metadata_mut().insert(rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY, SECRET.parse().unwrap());
    r
}

fn conn(s: &Session) -> Option<ConnContext> {
    Some(ConnContext {
        user_id: s.user.0,
        device_id: s.device.0,
        gateway_id: "gw-batch".into(),
        ..Default::default()
    })
}

/// A 1:1 text from `from` to `to`.
fn text(from: &Session, to: u64, cmid: &str) -> ConnSendRequest {
    ConnSendRequest {
        conn: conn(from),
        input: Some(SendInput {
            conversation_kind: ConversationKind::User as i32,
            conversation_id: to,
            client_msg_id: cmid.into(),
            content_type: ContentType::Text as i32,
            content: cmid.as_bytes().to_vec().into(),
            ..Default::default()
        }),
        group: false,
    }
}

/// The unary `Send`'s answer, as a batch result.
async fn unary(gw: &mut GatewayServiceClient<Channel>, req: ConnSendRequest) -> ConnSendResult {
    match gw.send(secret(req)).await {
        Ok(r) => ConnSendResult { output: Some(r.into_inner()), ..Default::default() },
        Err(s) => ConnSendResult {
            output: None,
            code: code(&s) as i32,
            message: s.message().to_string(),
            leader_addr: rim_proto::error::leader_of_status(&s).unwrap_or_default().to_string(),
            retry_after_ms: 0,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_batch_answers_each_item_as_a_unary_send_would() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (a, b) = users_on_two_shards(&c, &client, "sb").await;
    let (shard_a, shard_b) = (c.shard_of_user(a.user), c.shard_of_user(b.user));
    let (leader_a, leader_b) = (c.leader(shard_a).await, c.leader(shard_b).await);
    // The called node leads at most one of the two shards: the sends of
    // the other one (of both, if one node leads both) are forwarded.
    let target = if leader_a != leader_b { leader_a } else { (1..=3).find(|n| *n != leader_a).unwrap() };
    assert!(target != leader_a || target != leader_b, "some items are for a shard the node does not lead");
    let mut gw = gateway(&c, target);

    let mut items = Vec::new();
    for i in 1..=5 {
        items.push(text(&a, b.user.0, &format!("a-{i}")));
        items.push(text(&b, a.user.0, &format!("b-{i}")));
    }
    // A retry inside the same batch: the same message, once in the lists.
    items.push(text(&a, b.user.0, "a-1"));
    // To a user that does not exist.
    items.push(text(&a, 9_999_999_999, "to-nobody"));
    // Empty, no connection context, no user, no conversation, no idempotency key.
    items.push(ConnSendRequest::default());
    items.push(ConnSendRequest { conn: Some(ConnContext::default()), ..text(&a, b.user.0, "no-user") });
    items.push(text(&a, 0, "no-conversation"));
    items.push(text(&a, b.user.0, ""));
    // A group that does not exist (SEND_GROUP: the kind comes from `group`).
    let mut to_group = text(&b, 9_999_999_999, "no-group");
    to_group.group = true;
    to_group.input.as_mut().unwrap().conversation_kind = ConversationKind::Unspecified as i32;
    items.push(to_group);

    let reply =
        gw.send_batch(secret(ConnSendBatchRequest { items: items.clone() })).await.unwrap().into_inner();
    assert_eq!(reply.results.len(), items.len(), "one result per item");

    let want_codes: Vec<ErrorCode> = [vec![ErrorCode::Ok; 11], vec![ErrorCode::ErrorUserNotFound]]
        .concat()
        .into_iter()
        .chain([
            ErrorCode::ErrorBadRequest,
            ErrorCode::ErrorInvalidId,
            ErrorCode::ErrorInvalidId,
            ErrorCode::ErrorBadRequest,
            ErrorCode::ErrorGroupNotFound,
        ])
        .collect();
    let got_codes: Vec<ErrorCode> =
        reply.results.iter().map(|r| rim_proto::error::code_from_number(r.code)).collect();
    assert_eq!(got_codes, want_codes, "{:?}", reply.results);

    // The accepted sends: seqs 1..=5 in each sender's list, the retry
    // answered with the first answer.
    let out = |i: usize| reply.results[i].output.expect("an output");
    let a_seqs: Vec<u64> = (0..5).map(|i| out(2 * i).seq).collect();
    let b_seqs: Vec<u64> = (0..5).map(|i| out(2 * i + 1).seq).collect();
    for seqs in [&a_seqs, &b_seqs] {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 5, "distinct seqs: {seqs:?}");
    }
    assert_eq!(out(10), out(0), "a retry in the batch gets the first answer");
    for r in &reply.results[11..] {
        assert!(r.output.is_none() && !r.message.is_empty(), "{r:?}");
    }

    // Every item again as a unary Send, after the batch: the same answers
    // (accepted sends are retries now, answered from the idempotency record).
    for (i, item) in items.iter().enumerate() {
        assert_eq!(unary(&mut gw, item.clone()).await, reply.results[i], "item {i}: {item:?}");
    }

    // Each accepted message is in both lists exactly once, under the seq
    // its sender was told.
    let sent: HashMap<String, (u64, &Session)> = (0..10)
        .map(|i| {
            let (from, cmid) =
                if i % 2 == 0 { (&a, format!("a-{}", i / 2 + 1)) } else { (&b, format!("b-{}", i / 2 + 1)) };
            (cmid, (out(i).seq, from))
        })
        .collect();
    for s in [&a, &b] {
        let list = eventually(
            Duration::from_secs(20),
            &format!("10 texts in the list of user {}", s.user),
            || async {
                let list = texts(&client.sync_all(s).await.unwrap());
                (list.len() >= 10).then_some(list)
            },
        )
        .await;
        let mut cmids: Vec<&str> = list.iter().map(|(_, cmid)| cmid.as_str()).collect();
        cmids.sort_unstable();
        let mut want: Vec<&str> = sent.keys().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(cmids, want, "user {}: each accepted send once, nothing else", s.user);
        for (seq, cmid) in &list {
            let (told, from) = sent[cmid];
            if from.user.0 == s.user.0 {
                assert_eq!(*seq, told, "{cmid}: the seq its sender was told");
            }
        }
    }

    // An empty batch is answered with no results; one above the limit is
    // refused as a whole, as a bad request.
    let empty = gw.send_batch(secret(ConnSendBatchRequest::default())).await.unwrap().into_inner();
    assert!(empty.results.is_empty());
    // (The limit is `MAX_SEND_BATCH` of node/src/service/gateway.rs: 1,024.)
    let over = vec![ConnSendRequest::default(); 1_025];
    let err = gw.send_batch(secret(ConnSendBatchRequest { items: over })).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorBadRequest);
    // Without the cluster secret nothing is served.
    let err = gw.send_batch(ConnSendBatchRequest { items: vec![text(&a, b.user.0, "x")] }).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorPermissionDenied);
    c.shutdown().await;
}
