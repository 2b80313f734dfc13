//! In-process cluster tests: 3 nodes, 4 shards, real gRPC on loopback.

use std::collections::BTreeSet;
use std::time::Duration;

use rim_proto::ErrorCode;
use rim_proto::ids::{Seq, UserId};
use rim_testkit::cluster::*;
use rim_testkit::grpc::*;
use rim_testkit::wait::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_shards_exchange_messages_exactly_once() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "x").await;

    let other = c.client(2); // any node accepts writes
    let mut acked = Vec::new();
    for i in 0..20 {
        let from = if i % 2 == 0 { &alice } else { &bob };
        let to = if i % 2 == 0 { bob.user } else { alice.user };
        let via = if i % 3 == 0 { &client } else { &other };
        acked.push(via.send(from, to, &format!("m{i}"), "hello").await.unwrap());
    }
    // Own copies are there at ack time (read-your-writes), with gap-free seqs.
    let alice_list = client.sync_all(&alice).await.unwrap();
    assert_eq!(
        alice_list.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=alice_list.len() as u64).collect::<Vec<_>>()
    );

    // Deliveries are eventual: wait until both lists hold all 20, then check exactly once.
    for s in [&alice, &bob] {
        let list = eventually(
            Duration::from_secs(20),
            &format!("20 messages in the list of user {}", s.user),
            || async { Some(client.sync_all(s).await.unwrap()).filter(|l| l.len() >= 20) },
        )
        .await;
        let ids: Vec<&str> = list.iter().map(|m| m.client_msg_id.as_str()).collect();
        let unique: BTreeSet<&str> = ids.iter().copied().collect();
        assert_eq!(ids.len(), 20, "user {}: {ids:?}", s.user);
        assert_eq!(unique.len(), 20, "no duplicates for user {}", s.user);
        assert_eq!(list.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>(), "gap-free");
    }
    // Per-sender order is kept in the recipient's list.
    let bob_list = client.sync_all(&bob).await.unwrap();
    let from_alice: Vec<&str> = bob_list
        .iter()
        .filter(|m| m.sender_user_id == alice.user.0)
        .map(|m| m.client_msg_id.as_str())
        .collect();
    let expected: Vec<String> = (0..20).step_by(2).map(|i| format!("m{i}")).collect();
    assert_eq!(from_alice, expected);

    // A second device of the sender sees the messages by sync.
    let alice2 = client.sign_in("xa").await;
    assert_ne!(alice2.device, alice.device);
    assert_eq!(client.sync_all(&alice2).await.unwrap().len(), 20);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_documented_codes() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    client.register("carol").await;
    client.register("dave").await;
    let carol = client.sign_in("carol").await;
    let dave = client.sign_in("dave").await;

    let last = if carol.token.ends_with('0') { '1' } else { '0' };
    let bad_sig =
        Session { token: format!("{}{last}", &carol.token[..carol.token.len() - 1]), ..carol.clone() };
    let err = client.send(&bad_sig, dave.user, "b1", "x").await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorUnauthenticated, "{err:?}");

    let garbage = Session { token: "not-a-token".into(), ..carol.clone() };
    assert_eq!(
        code(&client.send(&garbage, dave.user, "b2", "x").await.unwrap_err()),
        ErrorCode::ErrorUnauthenticated
    );

    let key = rim_cluster::TokenKey::from_secret(SECRET).unwrap();
    let expired = key.sign(&rim_cluster::Claims {
        user_id: carol.user,
        device_id: carol.device,
        expires_at_ms: 1,
        token_version: 0,
    });
    let err =
        client.send(&Session { token: expired, ..carol.clone() }, dave.user, "b3", "x").await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorTokenExpired);

    let someone_else = Session { user: dave.user, ..carol.clone() };
    assert_eq!(
        code(&client.send(&someone_else, carol.user, "b4", "x").await.unwrap_err()),
        ErrorCode::ErrorUnauthenticated
    );

    assert_eq!(
        code(&client.send(&carol, UserId(0), "b5", "x").await.unwrap_err()),
        ErrorCode::ErrorInvalidId
    );
    assert_eq!(
        code(&client.send(&carol, UserId(999_999), "b6", "x").await.unwrap_err()),
        ErrorCode::ErrorUserNotFound
    );
    let big = "x".repeat(65 * 1024);
    assert_eq!(
        code(&client.send(&carol, dave.user, "b7", &big).await.unwrap_err()),
        ErrorCode::ErrorContentTooLarge
    );
    assert_eq!(code(&client.send(&carol, dave.user, "", "x").await.unwrap_err()), ErrorCode::ErrorBadRequest);

    // A revoked device's token stops working; a fresh sign-in works.
    client.send(&carol, dave.user, "ok-before", "x").await.unwrap();
    let mut auth = rim_proto::v1::auth_service_client::AuthServiceClient::new(client.channel.clone());
    auth.logout(Client::authed(&carol, rim_proto::v1::LogoutRequest {})).await.unwrap();
    // Each node refuses the token once its replica applied the logout
    // (milliseconds; gateway sign-in checks linearizably).
    let mut attempt = 0;
    let err = loop {
        attempt += 1;
        match client.send(&carol, dave.user, &format!("after-logout-{attempt}"), "x").await {
            Err(e) => break e,
            Ok(_) => {
                assert!(attempt < 200, "revoked token still accepted");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(code(&err), ErrorCode::ErrorTokenRevoked);
    let again = client.sign_in("carol").await;
    client.send(&again, dave.user, "after-sign-in", "x").await.unwrap();

    // Wrong password and unknown usernames look the same.
    let mut auth2 = rim_proto::v1::auth_service_client::AuthServiceClient::new(client.channel.clone());
    let wrong = rim_proto::v1::SignInRequest {
        username: "carol".into(),
        password: "nope-nope".into(),
        ..Default::default()
    };
    assert_eq!(code(&auth2.sign_in(wrong).await.unwrap_err()), ErrorCode::ErrorUnauthenticated);
    let nobody = rim_proto::v1::SignInRequest {
        username: "nobody".into(),
        password: "whatever".into(),
        ..Default::default()
    };
    assert_eq!(code(&auth2.sign_in(nobody).await.unwrap_err()), ErrorCode::ErrorUnauthenticated);
    let dup = rim_proto::v1::RegisterRequest {
        username: "carol".into(),
        password: "secret-pw".into(),
        ..Default::default()
    };
    assert_eq!(code(&auth2.register(dup).await.unwrap_err()), ErrorCode::ErrorAlreadyExists);

    // Users are found by login name; unknown and malformed names are not found.
    let mut users = rim_proto::v1::user_service_client::UserServiceClient::new(client.channel.clone());
    let find = |name: &str| Client::authed(&dave, rim_proto::v1::FindUserRequest { username: name.into() });
    let found = users.find_user(find("carol")).await.unwrap().into_inner().user.unwrap();
    assert_eq!((found.user_id, found.username.as_str()), (carol.user.0, "carol"));
    assert_eq!(code(&users.find_user(find("nobody")).await.unwrap_err()), ErrorCode::ErrorUserNotFound);
    assert_eq!(code(&users.find_user(find("bad name!")).await.unwrap_err()), ErrorCode::ErrorUserNotFound);
    let me =
        users.get_user(Client::authed(&dave, rim_proto::v1::GetUserRequest { user_id: 0 })).await.unwrap();
    assert_eq!(me.into_inner().user.unwrap().user_id, dave.user.0, "user_id 0 means the caller");
    let many = rim_proto::v1::GetUsersRequest { user_ids: (1..=101).collect() };
    let err = users.get_users(Client::authed(&dave, many)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorBadRequest, "at most 100 ids per GetUsers");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_during_sends_loses_nothing_acked() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "k").await;
    let shard = c.shard_of_user(alice.user);
    let victim = c.leader(shard).await;
    // Send through a node that survives.
    let via_id = (1..=3).find(|i| *i != victim).unwrap();
    let via = c.client(via_id);

    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut killed = false;
    for i in 0..60 {
        if i == 20 {
            c.stop_node(victim).await;
            killed = true;
        }
        let cmid = format!("s{i}");
        // Retry with the same id until acknowledged: never a duplicate.
        let out = via.send_acked(&alice, bob.user, &cmid, "payload").await;
        acked.push((cmid, out.seq));
    }
    assert!(killed);
    let new_leader = c.leader(shard).await;
    assert_ne!(new_leader, victim);

    // Every acked send is present, exactly once, at its acked seq, on every live replica.
    for (id, node) in &c.nodes {
        let g = node.core.group(shard).unwrap();
        let applied = c.nodes[&new_leader].core.group(shard).unwrap().raft.metrics().borrow().last_applied;
        g.wait_applied(applied.map(|l| l.index).unwrap_or(0), Duration::from_secs(20)).await.unwrap();
        let list = g.reader.sync(alice.user, Seq(0), 1000).unwrap().messages;
        let got = texts(&list);
        let want: Vec<(u64, String)> = acked.iter().map(|(c, s)| (*s, c.clone())).collect();
        assert_eq!(got, want, "replica on node {id}");
    }
    // The killed node comes back and catches up.
    c.start_node(victim).await;
    let g = c.nodes[&victim].core.group(shard).unwrap();
    let target =
        c.nodes[&new_leader].core.group(shard).unwrap().raft.metrics().borrow().last_applied.unwrap().index;
    g.wait_applied(target, Duration::from_secs(30)).await.unwrap();
    assert_eq!(texts(&g.reader.sync(alice.user, Seq(0), 1000).unwrap().messages).len(), 60);
    // Bob got each message exactly once.
    let bob_list = eventually(Duration::from_secs(30), "60 messages in bob's list", || async {
        Some(client.sync_all(&bob).await.unwrap()).filter(|l| l.len() >= 60)
    })
    .await;
    let ids: BTreeSet<String> = bob_list.iter().map(|m| m.client_msg_id.clone()).collect();
    assert_eq!((bob_list.len(), ids.len()), (60, 60));
    c.shutdown().await;
}
