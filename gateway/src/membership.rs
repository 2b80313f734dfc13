//! Group notifications that end a connection's reading of a group list.
//!
//! Membership changes are `CONTENT_TYPE_NOTIFICATION` entries whose content
//! is a [`rim_proto::store::Notification`]. For the gateway only two
//! matter: `group_members_removed` naming the connection's user, and
//! `group_dissolved`. Either is the last entry of the group list the user
//! gets (see the session's `groups` module).

use prost::Message as _;
use rim_proto::ids::{GroupId, UserId};
use rim_proto::store::Notification;
use rim_proto::store::notification::Event;
use rim_proto::v1::{ContentType, Message};

/// Whether `message`, an entry of group `group_id`'s list, ends `user_id`'s
/// reading of it: it removes the user from the group, or dissolves the
/// group. Undecodable notifications end nothing.
pub(crate) fn ends(message: &Message, group_id: GroupId, user_id: UserId) -> bool {
    if message.content_type != ContentType::Notification as i32 {
        return false;
    }
    let Ok(notification) = Notification::decode(message.content.as_ref()) else {
        return false;
    };
    match notification.event {
        Some(Event::GroupMembersRemoved(e)) => e.group_id == group_id.0 && e.user_ids.contains(&user_id.0),
        Some(Event::GroupDissolved(e)) => e.group_id == group_id.0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use rim_proto::store::{GroupChanged, GroupKind, GroupMembersChanged};

    use super::*;

    fn notice(event: Event) -> Message {
        Message {
            content_type: ContentType::Notification as i32,
            content: Notification { event: Some(event) }.encode_to_vec().into(),
            ..Default::default()
        }
    }

    fn changed(group_id: u64, user_ids: Vec<u64>) -> GroupMembersChanged {
        GroupMembersChanged { group_id, kind: GroupKind::Super as i32, user_ids, ..Default::default() }
    }

    #[test]
    fn removal_of_the_user_and_dissolution_end_it() {
        assert!(ends(&notice(Event::GroupMembersRemoved(changed(5, vec![1, 2]))), GroupId(5), UserId(2)));
        assert!(!ends(&notice(Event::GroupMembersRemoved(changed(5, vec![1, 2]))), GroupId(5), UserId(3)));
        assert!(!ends(&notice(Event::GroupMembersRemoved(changed(6, vec![2]))), GroupId(5), UserId(2)));
        assert!(!ends(&notice(Event::GroupMembersAdded(changed(5, vec![2]))), GroupId(5), UserId(2)));
        let dissolved = Event::GroupDissolved(GroupChanged { group_id: 5, ..Default::default() });
        assert!(ends(&notice(dissolved), GroupId(5), UserId(9)));
        let mut text = notice(Event::GroupMembersRemoved(changed(5, vec![2])));
        text.content_type = ContentType::Text as i32;
        assert!(!ends(&text, GroupId(5), UserId(2)));
        let garbage = Message {
            content_type: ContentType::Notification as i32,
            content: vec![0xff, 0xff].into(),
            ..Default::default()
        };
        assert!(!ends(&garbage, GroupId(5), UserId(2)));
    }
}
