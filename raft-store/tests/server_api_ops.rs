//! The server API's operations: `RemoveDeadLetter` (a replayed letter
//! leaves, only for its endpoint, idempotently) and `ClaimIdempotency`
//! (the first claim of a key holds; the same request gets it back; another
//! request is refused).

mod common;

use common::*;
use rim_proto::ErrorCode;
use rim_proto::store::{self, op::Op as O};

const A: u64 = 101;
const B: u64 = 202;

#[tokio::test]
async fn a_dead_letter_is_removed_only_for_its_endpoint_and_once() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await; // index 1
    n.apply1(1, send(A, B, "m1", "hello")).await; // index 2: the event
    let dead =
        store::DeadLetterEvent { endpoint: "crm".into(), index: 2, ordinal: 0, reason: "HTTP 500".into() };
    n.apply1(1, op(O::DeadLetterEvent(dead))).await;
    let letters = n.reader(1).dead_letters(0, 10).unwrap();
    assert_eq!(letters.len(), 1);
    let number = letters[0].0;
    let list = n.reader(1).dead_letters_of("crm", 0, 10, 100).unwrap();
    assert_eq!(list.letters.len(), 1);
    assert!(n.reader(1).dead_letters_of("other", 0, 10, 100).unwrap().letters.is_empty());
    let remove = |endpoint: &str| {
        op(O::RemoveDeadLetter(store::RemoveDeadLetter { endpoint: endpoint.into(), number }))
    };
    assert_eq!(code(&n.apply1(1, remove("other")).await), ErrorCode::Ok);
    assert_eq!(n.reader(1).dead_letters(0, 10).unwrap().len(), 1, "another endpoint's removal leaves it");
    assert_eq!(code(&n.apply1(1, remove("crm")).await), ErrorCode::Ok);
    assert!(n.reader(1).dead_letters(0, 10).unwrap().is_empty());
    assert_eq!(code(&n.apply1(1, remove("crm")).await), ErrorCode::Ok, "a repeat changes nothing");
    assert_eq!(code(&n.apply1(1, remove("")).await), ErrorCode::ErrorBadRequest);
}

#[tokio::test]
async fn an_idempotency_key_holds_its_first_request() {
    let mut n = Node::new(&[1]);
    let claim = |digest: &[u8], value: u64| {
        op(O::ClaimIdempotency(store::ClaimIdempotency {
            key: "create-1".into(),
            request_digest: digest.to_vec().into(),
            value,
        }))
    };
    let first = sent(&n.apply1(1, claim(b"digest-a", 7)).await);
    assert_eq!(first.message_id, 7);
    let retry = sent(&n.apply1(1, claim(b"digest-a", 8)).await);
    assert_eq!(retry.message_id, 7, "a retry gets the first claim's value");
    let other = n.apply1(1, claim(b"digest-b", 9)).await;
    assert_eq!(code(&other), ErrorCode::ErrorAlreadyExists);
    assert_eq!(code(&n.apply1(1, claim(b"", 9)).await), ErrorCode::ErrorBadRequest, "a digest is required");
    assert_eq!(code(&n.apply1(1, claim(&[1; 33], 9)).await), ErrorCode::ErrorBadRequest, "digest bound");
}
