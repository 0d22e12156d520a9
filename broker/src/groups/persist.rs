//! A group's membership state as stored in the groups topic (the protobuf
//! `GroupMetadataRecord`), and the partition-set conversions the wire messages share.
//!
//! What is stored: the epochs, the assignor, the timeouts, and every member with its epochs,
//! instance id, subscription, assigned, revoking and target partitions, and client address.
//! What is not: the times members were last heard from. A broker that restarts gives every
//! member a full session timeout from its start to come back.

use prost::Message;
use rill_proto::v1::{GroupMetadataRecord, MemberRecord, PartitionSet, TopicPartitions, TopicSize};

use super::assignor::Partitions;
use super::state::{Group, Member, MAX_ID_LEN};

/// Partitions as the wire message.
pub fn to_set(partitions: &Partitions) -> PartitionSet {
    PartitionSet {
        topics: partitions
            .iter()
            .map(|(topic, ps)| TopicPartitions {
                topic: topic.clone(),
                partitions: ps.iter().copied().collect(),
            })
            .collect(),
    }
}

/// The wire message as partitions (topics repeated are merged; empty ones dropped).
pub fn from_set(set: &PartitionSet) -> Partitions {
    let mut out = Partitions::new();
    for tp in &set.topics {
        if !tp.partitions.is_empty() {
            out.entry(tp.topic.clone())
                .or_default()
                .extend(tp.partitions.iter().copied());
        }
    }
    out
}

/// The stored form of `group`.
pub fn encode(group: &Group) -> Vec<u8> {
    GroupMetadataRecord {
        group_epoch: group.epoch,
        assignment_epoch: group.assignment_epoch,
        assignor: group.assignor.to_string(),
        session_timeout_ms: group.session_timeout_ms,
        rebalance_timeout_ms: group.rebalance_timeout_ms,
        members: group
            .members
            .values()
            .map(|m| MemberRecord {
                member_id: m.id.clone(),
                instance_id: m.instance_id.clone(),
                member_epoch: m.epoch,
                previous_epoch: m.previous_epoch,
                subscribed_topics: m.subscribed.iter().cloned().collect(),
                assigned: Some(to_set(&m.assigned)),
                revoking: Some(to_set(&m.revoking)),
                target: Some(to_set(&m.target)),
                client_address: m.client_address.clone(),
                left_static: m.left_static,
            })
            .collect(),
        topic_sizes: group
            .topic_sizes
            .iter()
            .map(|(t, n)| TopicSize {
                topic: t.clone(),
                partitions: *n,
            })
            .collect(),
    }
    .encode_to_vec()
}

/// Rebuilds group `name` from its stored form, every member last heard from at `now_ms`.
/// Damage is an error with the reason, never a guess.
pub fn decode(name: &str, bytes: &[u8], now_ms: u64) -> Result<Group, String> {
    let record = GroupMetadataRecord::decode(bytes).map_err(|e| format!("cannot decode: {e}"))?;
    let mut group = Group::new(name);
    group.epoch = record.group_epoch;
    group.assignment_epoch = record.assignment_epoch;
    group.assignor = record.assignor.parse()?;
    group.session_timeout_ms = record.session_timeout_ms;
    group.rebalance_timeout_ms = record.rebalance_timeout_ms;
    for m in record.members {
        if m.member_id.is_empty() || m.member_id.len() > MAX_ID_LEN {
            return Err(format!("bad member id {:?}", m.member_id));
        }
        let revoking = m.revoking.as_ref().map(from_set).unwrap_or_default();
        let member = Member {
            id: m.member_id.clone(),
            instance_id: m.instance_id,
            epoch: m.member_epoch,
            previous_epoch: m.previous_epoch,
            subscribed: m.subscribed_topics.into_iter().collect(),
            assigned: m.assigned.as_ref().map(from_set).unwrap_or_default(),
            revoking_since_ms: (!revoking.is_empty()).then_some(now_ms),
            revoking,
            target: m.target.as_ref().map(from_set).unwrap_or_default(),
            client_address: m.client_address,
            last_seen_ms: now_ms,
            left_static: m.left_static,
        };
        group.members.insert(m.member_id, member);
    }
    group.topic_sizes = record
        .topic_sizes
        .into_iter()
        .map(|t| (t.topic, t.partitions))
        .collect();
    Ok(group)
}

/// Whether `a` and `b` store the same (they may differ in what is not stored: when members
/// were last heard from).
pub fn same_stored(a: &Group, b: &Group) -> bool {
    let key = |g: &Group| {
        (
            g.epoch,
            g.assignment_epoch,
            g.assignor,
            g.session_timeout_ms,
            g.rebalance_timeout_ms,
            g.topic_sizes.clone(),
        )
    };
    let member = |m: &Member| {
        (
            m.instance_id.clone(),
            m.epoch,
            m.previous_epoch,
            m.subscribed.clone(),
            m.assigned.clone(),
            m.revoking.clone(),
            m.target.clone(),
            m.client_address.clone(),
            m.left_static,
        )
    };
    key(a) == key(b)
        && a.members.len() == b.members.len()
        && a.members
            .iter()
            .zip(b.members.iter())
            .all(|((ia, ma), (ib, mb))| ia == ib && member(ma) == member(mb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::state::Heartbeat;
    use std::collections::BTreeSet;

    #[test]
    fn a_group_round_trips_through_its_stored_form() {
        let mut g = Group::new("g");
        let mut n = 0;
        let mut new_id = || {
            n += 1;
            format!("m{n}")
        };
        let sizes = |t: &str| (t == "t").then_some(5);
        for instance in [None, Some("host".to_string())] {
            g.heartbeat(
                Heartbeat {
                    member_epoch: 0,
                    instance_id: instance,
                    subscribed: Some(BTreeSet::from(["t".to_string(), "later".to_string()])),
                    client_address: "10.0.0.1:5".into(),
                    ..Heartbeat::default()
                },
                7,
                &sizes,
                &mut new_id,
            )
            .expect("join");
        }
        let back = decode("g", &encode(&g), 7).expect("decode");
        assert!(same_stored(&g, &back), "{g:?}\n{back:?}");
        assert_eq!(back, g, "last-seen times are the load time, here the same");
        assert!(decode("g", b"\xff\xff garbage", 0).is_err());
    }
}
