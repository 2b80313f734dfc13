use rim_proto::store::{GroupChanged, GroupMembersChanged};

use super::*;

const ME: UserId = UserId(7);
const G: GroupId = GroupId(500);
const DELAY: Duration = Duration::from_millis(100);

fn entry(group: GroupId, seq: u64) -> Message {
    Message {
        conversation_kind: ConversationKind::SuperGroup as i32,
        conversation_id: group.0,
        seq,
        group_seq: seq,
        message_id: 1000 + seq,
        ..Default::default()
    }
}

fn room_entry(room: GroupId, seq: u64) -> Message {
    Message { conversation_kind: ConversationKind::Room as i32, ..entry(room, seq) }
}

fn notice(group: GroupId, seq: u64, event: Notice) -> Message {
    Message {
        content_type: ContentType::Notification as i32,
        content: Notification { event: Some(event) }.encode_to_vec().into(),
        ..entry(group, seq)
    }
}

fn members(group: GroupId, kind: GroupKind, users: Vec<UserId>, group_seq: u64) -> GroupMembersChanged {
    GroupMembersChanged {
        group_id: group.0,
        kind: kind as i32,
        user_ids: users.iter().map(|u| u.0).collect(),
        group_seq,
        ..Default::default()
    }
}

fn head(group: GroupId, last: u64, joined: u64) -> GroupHead {
    GroupHead { group_id: group.0, last_group_seq: last, joined_group_seq: joined }
}

fn events(f: &mut Feeds) -> Vec<Event> {
    std::iter::from_fn(|| f.pop_ready()).collect()
}

fn group_seqs(f: &mut Feeds) -> Vec<u64> {
    events(f)
        .into_iter()
        .map(|e| match e {
            Event::GroupMessage(m) | Event::RoomMessage(m) => m.seq,
            other => panic!("not a group entry: {other:?}"),
        })
        .collect()
}

fn page(group: GroupId, range: std::ops::RangeInclusive<u64>, has_more: bool, first: u64) -> SyncGroupOutput {
    SyncGroupOutput {
        messages: range.clone().map(|s| entry(group, s)).collect(),
        has_more,
        last_group_seq: *range.end(),
        first_group_seq: first,
    }
}

/// Feeds signed in with super group G (joined at `joined`), subscribed.
fn subscribed(joined: u64, last: u64) -> (Feeds, Instant) {
    let now = Instant::now();
    let mut f = Feeds::new(8, DELAY);
    f.signed_in(ME, &[head(G, last, joined)], &HashMap::new(), now);
    let (g, after, generation) = f.poll_subscribe(now).expect("subscribes G");
    assert_eq!((g, after), (G, Seq(joined)));
    f.subscribe_ok(G, generation, SubscribeRoomOutput { last_seq: last, first_seq: joined + 1 }, now);
    (f, now)
}

fn server(code: rim_proto::ErrorCode) -> ClientError {
    ClientError::server(code, "refused")
}

#[test]
fn notifications_tell_joins_and_leaves() {
    let added = Notice::GroupMembersAdded(members(G, GroupKind::Super, vec![ME, UserId(8)], 4));
    assert_eq!(
        change_of(ME, &notice(G, 5, added.clone())),
        Some(Change::Join { group_id: G, after: Seq(5) })
    );
    assert_eq!(change_of(UserId(9), &notice(G, 5, added)), None, "others joined");
    let small = Notice::GroupMembersAdded(members(G, GroupKind::Small, vec![ME], 4));
    assert_eq!(change_of(ME, &notice(G, 5, small)), None, "small groups come in the own list");
    let converted = Notice::GroupConverted(GroupChanged {
        group_id: G.0,
        kind: GroupKind::Super as i32,
        ..Default::default()
    });
    assert_eq!(change_of(ME, &notice(G, 9, converted)), Some(Change::Join { group_id: G, after: Seq(9) }));
    let removed = Notice::GroupMembersRemoved(members(G, GroupKind::Super, vec![ME], 0));
    assert_eq!(
        change_of(ME, &notice(G, 6, removed.clone())),
        Some(Change::Leave { group_id: G, code: ErrorCode::ErrorNotGroupMember })
    );
    assert_eq!(change_of(UserId(8), &notice(G, 6, removed)), None);
    let dissolved = Notice::GroupDissolved(GroupChanged { group_id: G.0, ..Default::default() });
    assert_eq!(
        change_of(UserId(8), &notice(G, 7, dissolved)),
        Some(Change::Leave { group_id: G, code: ErrorCode::ErrorGroupNotFound })
    );
    assert_eq!(change_of(ME, &entry(G, 3)), None, "not a notification");
}

#[test]
fn a_super_group_is_gap_free_and_repaired_by_syncing_from_its_cursor() {
    let (mut f, now) = subscribed(0, 2);
    for seq in [1, 2, 2, 1, 3] {
        f.push(entry(G, seq), now);
    }
    assert_eq!(group_seqs(&mut f), [1, 2, 3]);
    assert_eq!(f.poll_sync(now), None);
    f.push(entry(G, 6), now);
    assert!(group_seqs(&mut f).is_empty(), "held behind the gap");
    assert_eq!(f.poll_sync(now), Some((G, Seq(3))));
    assert_eq!(f.poll_sync(now), None, "one sync at a time");
    f.push(entry(G, 7), now);
    f.sync_ok(G, page(G, 4..=5, true, 1), now);
    assert_eq!(group_seqs(&mut f), [4, 5, 6, 7], "the held pushes continue the page");
    assert_eq!(f.poll_sync(now), Some((G, Seq(7))), "has_more pages on");
    f.sync_ok(G, page(G, 8..=8, false, 1), now);
    assert_eq!(group_seqs(&mut f), [8]);
    assert_eq!(f.cursors()[&G], Seq(8));
    assert_eq!(f.next_deadline(), None);
}

#[test]
fn what_the_member_may_not_read_is_skipped() {
    // Joined after 10: subscribing from 10, the gateway's backlog starts at 11.
    let (mut f, now) = subscribed(10, 12);
    f.push(entry(G, 11), now);
    assert_eq!(group_seqs(&mut f), [11]);
    // Trimmed by retention while away: a sync starting later is skipped to.
    f.push(entry(G, 20), now);
    assert_eq!(f.poll_sync(now), Some((G, Seq(11))));
    f.sync_ok(G, page(G, 15..=20, false, 15), now);
    assert_eq!(group_seqs(&mut f), [15, 16, 17, 18, 19, 20]);
}

#[test]
fn sign_ins_keep_cursors_resume_from_the_application_and_end_groups_no_longer_listed() {
    let now = Instant::now();
    let mut f = Feeds::new(8, DELAY);
    let g1 = GroupId(G.0 + 1);
    let resume = HashMap::from([(G, Seq(30)), (g1, Seq(2))]);
    // G from the application's cursor; G+1's cursor is before its join point.
    f.signed_in(ME, &[head(G, 40, 5), head(g1, 9, 6)], &resume, now);
    let mut subs = vec![f.poll_subscribe(now).unwrap(), f.poll_subscribe(now).unwrap()];
    subs.sort();
    assert_eq!(subs.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(), [(G, Seq(30)), (g1, Seq(6))]);
    for (g, _, generation) in &subs {
        f.subscribe_ok(*g, *generation, SubscribeRoomOutput { last_seq: 40, first_seq: 1 }, now);
    }
    f.push(entry(G, 31), now);
    assert_eq!(group_seqs(&mut f), [31]);

    // A reconnect: the feed's own cursor rules; G+1 is no longer listed.
    f.disconnected();
    f.signed_in(ME, &[head(G, 41, 5)], &resume, now);
    let evs = events(&mut f);
    assert!(
        matches!(&evs[..], [Event::Unsubscribed { group_id, code: ErrorCode::ErrorNotGroupMember, .. }] if *group_id == g1),
        "{evs:?}"
    );
    let (g, after, _) = f.poll_subscribe(now).unwrap();
    assert_eq!((g, after), (G, Seq(31)));
    assert_eq!(f.poll_subscribe(now), None);
    assert!(!f.contains(g1));
}

#[test]
fn a_removal_in_the_groups_list_is_delivered_then_ends_the_feed() {
    let (mut f, now) = subscribed(0, 0);
    let others = Notice::GroupMembersRemoved(members(G, GroupKind::Super, vec![UserId(8)], 0));
    f.push(notice(G, 1, others), now);
    assert_eq!(events(&mut f).len(), 1);
    let me = Notice::GroupMembersRemoved(members(G, GroupKind::Super, vec![ME], 0));
    f.push(notice(G, 2, me), now);
    f.push(entry(G, 3), now);
    let evs = events(&mut f);
    assert!(matches!(&evs[0], Event::GroupMessage(m) if m.seq == 2));
    assert!(matches!(&evs[1], Event::Unsubscribed { group_id: G, code: ErrorCode::ErrorNotGroupMember, .. }));
    assert_eq!(evs.len(), 2, "nothing after the removal: {evs:?}");
    assert!(!f.contains(G));
    assert!(!f.push(entry(G, 4), now), "no feed any more");
}

#[test]
fn entries_of_a_converted_group_before_its_conversion_are_skipped() {
    let (mut f, now) = subscribed(0, 3);
    let mut old = entry(G, 1);
    old.conversation_kind = ConversationKind::Group as i32;
    f.push(old, now);
    f.push(entry(G, 2), now);
    assert_eq!(group_seqs(&mut f), [2]);
    assert_eq!(f.cursors()[&G], Seq(2));
}

#[test]
fn rooms_keep_their_order_only_and_start_from_the_end() {
    let now = Instant::now();
    let mut f = Feeds::new(8, DELAY);
    f.signed_in(ME, &[], &HashMap::new(), now);
    f.add_room(G, Seq::ZERO);
    let (_, after, generation) = f.begin_subscribe(G).unwrap();
    assert_eq!(after, Seq::ZERO);
    f.subscribe_ok(G, generation, SubscribeRoomOutput { last_seq: 10, first_seq: 3 }, now);
    assert_eq!(f.cursors()[&G], Seq(10), "live only");
    for seq in [9, 11, 13, 12, 14] {
        f.push(room_entry(G, seq), now);
    }
    assert_eq!(group_seqs(&mut f), [11, 13, 14], "gaps are fine, the order is kept");
    assert_eq!(f.poll_sync(now), None, "rooms are never synced");
    // After a reconnect it is subscribed again after its last seq.
    f.disconnected();
    f.signed_in(ME, &[], &HashMap::new(), now);
    assert!(events(&mut f).is_empty(), "rooms are not ended by a sign-in");
    assert_eq!(f.poll_subscribe(now).map(|s| (s.0, s.1)), Some((G, Seq(14))));
}

#[test]
fn refusals_end_a_feed_and_failures_retry_later_with_bounded_concurrency() {
    let now = Instant::now();
    let mut f = Feeds::new(8, DELAY);
    let heads: Vec<GroupHead> = (1..=20).map(|g| head(GroupId(g), 1, 0)).collect();
    f.signed_in(ME, &heads, &HashMap::new(), now);
    let mut sent = Vec::new();
    while let Some(s) = f.poll_subscribe(now) {
        sent.push(s);
    }
    assert_eq!(sent.len(), MAX_SUBSCRIBING);
    let (g1, _, gen1) = sent[0];
    let (g2, _, gen2) = sent[1];
    assert!(f.subscribe_failed(g1, gen1, &server(ErrorCode::ErrorBadRequest), now), "a refusal ends it");
    assert!(matches!(&events(&mut f)[..], [Event::Unsubscribed { code: ErrorCode::ErrorBadRequest, .. }]));
    assert!(!f.subscribe_failed(g2, gen2, &ClientError::Timeout(DELAY), now), "a timeout is retried");
    // Two slots are free: one goes to a new group, the timed-out one waits.
    let next: Vec<GroupId> = std::iter::from_fn(|| f.poll_subscribe(now)).map(|s| s.0).collect();
    assert_eq!(next.len(), 2);
    assert!(!next.contains(&g2));
    assert_eq!(f.next_deadline(), Some(now + DELAY));
    // A stale reply (an older generation) changes nothing.
    f.subscribe_ok(g2, gen2, SubscribeRoomOutput::default(), now);
    assert_eq!(f.poll_sync(now), None);
}

#[test]
fn a_sync_refused_for_good_ends_the_feed() {
    let (mut f, now) = subscribed(0, 5);
    f.push(entry(G, 3), now);
    assert_eq!(f.poll_sync(now), Some((G, Seq::ZERO)));
    f.sync_failed(G, &ClientError::ConnectionLost("x".into()), now);
    assert!(f.contains(G), "retried");
    assert_eq!(f.poll_sync(now + DELAY), Some((G, Seq::ZERO)));
    f.sync_failed(G, &server(ErrorCode::ErrorNotGroupMember), now);
    assert!(!f.contains(G));
    assert!(matches!(
        &events(&mut f)[..],
        [Event::Unsubscribed { code: ErrorCode::ErrorNotGroupMember, .. }]
    ));
}
