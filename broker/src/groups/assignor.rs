//! The server-side assignors: given the members, their subscriptions and the topics' sizes,
//! the target assignment of every partition to one subscribed member.
//!
//! - `uniform` (the default): balanced and sticky. Every member keeps the partitions of its
//!   previous target that it still subscribes to, as long as that keeps the balance; the
//!   rest go to the subscribed member with the fewest, and then partitions move from the
//!   fullest members to the emptiest, one at a time, only while the counts differ by more
//!   than one. With equal subscriptions the counts end within one of each other, and a join
//!   or leave moves only the partitions the balance needs.
//! - `range`: per topic, the subscribed members sorted by id get contiguous ranges of
//!   partitions, the first ones one more when the count does not divide evenly. Not sticky.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// Partitions by topic.
pub type Partitions = BTreeMap<String, BTreeSet<u32>>;

/// Which assignor a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Assignor {
    /// Balanced and sticky (the default).
    #[default]
    Uniform,
    /// Contiguous ranges per topic.
    Range,
}

impl fmt::Display for Assignor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Assignor::Uniform => "uniform",
            Assignor::Range => "range",
        })
    }
}

impl FromStr for Assignor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uniform" => Ok(Assignor::Uniform),
            "range" => Ok(Assignor::Range),
            other => Err(format!(
                "unknown assignor {other:?}: expected `uniform` or `range`"
            )),
        }
    }
}

/// What an assignor knows about a member: its subscription and its previous target.
#[derive(Debug, Clone, Default)]
pub struct MemberSpec {
    /// The topics it subscribes to.
    pub subscribed: BTreeSet<String>,
    /// Its previous target assignment (the sticky assignor keeps what it can).
    pub previous: Partitions,
}

/// The most balancing moves one assignment makes: a bound, so a pathological input cannot
/// spin; ordinary inputs need far fewer.
const MAX_MOVES: usize = 1 << 20;

impl Assignor {
    /// The target assignment: every partition of every subscribed topic that exists
    /// (`topics`: name → partition count) to exactly one member subscribed to it. Every
    /// member has an entry, empty when it gets nothing.
    pub fn assign(
        &self,
        members: &BTreeMap<String, MemberSpec>,
        topics: &BTreeMap<String, u32>,
    ) -> BTreeMap<String, Partitions> {
        let mut out: BTreeMap<String, Partitions> = members
            .keys()
            .map(|m| (m.clone(), Partitions::new()))
            .collect();
        match self {
            Assignor::Range => range(members, topics, &mut out),
            Assignor::Uniform => uniform(members, topics, &mut out),
        }
        for partitions in out.values_mut() {
            partitions.retain(|_, set| !set.is_empty());
        }
        out
    }
}

fn subscribers<'a>(members: &'a BTreeMap<String, MemberSpec>, topic: &str) -> Vec<&'a String> {
    members
        .iter()
        .filter(|(_, m)| m.subscribed.contains(topic))
        .map(|(id, _)| id)
        .collect()
}

fn range(
    members: &BTreeMap<String, MemberSpec>,
    topics: &BTreeMap<String, u32>,
    out: &mut BTreeMap<String, Partitions>,
) {
    for (topic, &count) in topics {
        let subs = subscribers(members, topic);
        if subs.is_empty() {
            continue;
        }
        let n = subs.len() as u32;
        let (each, extra) = (count / n, count % n);
        let mut next = 0;
        for (i, id) in subs.into_iter().enumerate() {
            let take = each + u32::from((i as u32) < extra);
            let set: BTreeSet<u32> = (next..next + take).collect();
            next += take;
            if let Some(assigned) = out.get_mut(id) {
                assigned.insert(topic.clone(), set);
            }
        }
    }
}

fn uniform(
    members: &BTreeMap<String, MemberSpec>,
    topics: &BTreeMap<String, u32>,
    out: &mut BTreeMap<String, Partitions>,
) {
    let total: usize = topics
        .iter()
        .filter(|(t, _)| members.values().any(|m| m.subscribed.contains(*t)))
        .map(|(_, &c)| c as usize)
        .sum();
    // A member keeps at most the fair share rounded up; the balancing pass evens the rest.
    let cap = total.div_ceil(members.len().max(1));
    let mut owner: BTreeMap<(String, u32), String> = BTreeMap::new();
    let mut counts: BTreeMap<&String, usize> = members.keys().map(|m| (m, 0)).collect();
    // 1. Keep what each member had, while it still subscribes and the partition exists.
    for (id, spec) in members {
        for (topic, partitions) in &spec.previous {
            let Some(&count) = topics.get(topic) else {
                continue;
            };
            if !spec.subscribed.contains(topic) {
                continue;
            }
            for &p in partitions {
                let n = counts.get(id).copied().unwrap_or(0);
                if p < count && n < cap && !owner.contains_key(&(topic.clone(), p)) {
                    owner.insert((topic.clone(), p), id.clone());
                    counts.insert(id, n + 1);
                }
            }
        }
    }
    // 2. Give every unowned partition to the subscribed member with the fewest.
    for (topic, &count) in topics {
        let subs = subscribers(members, topic);
        for p in 0..count {
            if owner.contains_key(&(topic.clone(), p)) {
                continue;
            }
            let least = subs
                .iter()
                .min_by_key(|id| (counts.get(**id).copied().unwrap_or(0), **id));
            if let Some(&id) = least {
                owner.insert((topic.clone(), p), id.clone());
                *counts.entry(id).or_insert(0) += 1;
            }
        }
    }
    // 3. Move from the fullest to the emptiest while they differ by more than one and the
    //    emptiest may take one of the fullest's partitions.
    for _ in 0..MAX_MOVES {
        let mut by_count: Vec<(&String, usize)> = counts.iter().map(|(m, c)| (*m, *c)).collect();
        by_count.sort_by_key(|(m, c)| (*c, *m));
        let mut moved = false;
        'search: for &(low, low_n) in &by_count {
            for &(high, high_n) in by_count.iter().rev() {
                if high_n <= low_n + 1 {
                    break;
                }
                let subscribed = &members[low].subscribed;
                let candidate = owner
                    .iter()
                    .find(|((t, _), o)| *o == high && subscribed.contains(t))
                    .map(|(k, _)| k.clone());
                if let Some(key) = candidate {
                    owner.insert(key, low.clone());
                    *counts.entry(low).or_insert(0) += 1;
                    *counts.entry(high).or_insert(0) -= 1;
                    moved = true;
                    break 'search;
                }
            }
        }
        if !moved {
            break;
        }
    }
    for ((topic, p), id) in owner {
        if let Some(assigned) = out.get_mut(&id) {
            assigned.entry(topic).or_default().insert(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(topics: &[&str]) -> MemberSpec {
        MemberSpec {
            subscribed: topics.iter().map(|t| t.to_string()).collect(),
            previous: Partitions::new(),
        }
    }

    fn count(p: &Partitions) -> usize {
        p.values().map(BTreeSet::len).sum()
    }

    /// Every partition of a subscribed, existing topic is assigned exactly once, to a
    /// subscriber; nothing else is assigned.
    fn check_complete(
        members: &BTreeMap<String, MemberSpec>,
        topics: &BTreeMap<String, u32>,
        out: &BTreeMap<String, Partitions>,
    ) {
        let mut seen = BTreeSet::new();
        for (id, assigned) in out {
            for (topic, partitions) in assigned {
                assert!(members[id].subscribed.contains(topic), "{id} got {topic}");
                for &p in partitions {
                    assert!(p < topics[topic], "{topic}/{p} does not exist");
                    assert!(seen.insert((topic.clone(), p)), "{topic}/{p} twice");
                }
            }
        }
        for (topic, &n) in topics {
            if members.values().any(|m| m.subscribed.contains(topic)) {
                for p in 0..n {
                    assert!(seen.contains(&(topic.clone(), p)), "{topic}/{p} unassigned");
                }
            }
        }
    }

    #[test]
    fn three_members_six_partitions_get_two_each_with_both_assignors() {
        let members: BTreeMap<String, MemberSpec> = ["a", "b", "c"]
            .iter()
            .map(|m| (m.to_string(), spec(&["t"])))
            .collect();
        let topics = BTreeMap::from([("t".to_string(), 6)]);
        for assignor in [Assignor::Uniform, Assignor::Range] {
            let out = assignor.assign(&members, &topics);
            check_complete(&members, &topics, &out);
            for (id, p) in &out {
                assert_eq!(count(p), 2, "{assignor}: {id} got {p:?}");
            }
        }
        let range = Assignor::Range.assign(&members, &topics);
        assert_eq!(
            range["a"]["t"],
            BTreeSet::from([0, 1]),
            "contiguous ranges by id"
        );
        assert_eq!(range["c"]["t"], BTreeSet::from([4, 5]));
    }

    #[test]
    fn a_join_moves_only_what_the_balance_needs() {
        let topics = BTreeMap::from([("t".to_string(), 6)]);
        let mut members: BTreeMap<String, MemberSpec> = ["a", "b", "c"]
            .iter()
            .map(|m| (m.to_string(), spec(&["t"])))
            .collect();
        let before = Assignor::Uniform.assign(&members, &topics);
        for (id, m) in members.iter_mut() {
            m.previous = before[id].clone();
        }
        members.insert("d".to_string(), spec(&["t"]));
        let after = Assignor::Uniform.assign(&members, &topics);
        check_complete(&members, &topics, &after);
        let mut moved = 0;
        for id in ["a", "b", "c"] {
            let kept = before[id]["t"]
                .intersection(after[id].get("t").unwrap_or(&BTreeSet::new()))
                .count();
            moved += 2 - kept;
        }
        let counts: Vec<usize> = after.values().map(count).collect();
        assert!(
            counts.iter().max() <= Some(&2) && counts.iter().min() >= Some(&1),
            "{after:?}"
        );
        assert_eq!(
            moved,
            count(&after["d"]),
            "only the new member's share moves: {after:?}"
        );
    }

    #[test]
    fn more_members_than_partitions_leaves_some_with_nothing() {
        let members: BTreeMap<String, MemberSpec> =
            (0..5).map(|i| (format!("m{i}"), spec(&["t"]))).collect();
        let topics = BTreeMap::from([("t".to_string(), 2)]);
        for assignor in [Assignor::Uniform, Assignor::Range] {
            let out = assignor.assign(&members, &topics);
            check_complete(&members, &topics, &out);
            assert_eq!(out.len(), 5, "every member has an entry");
            assert_eq!(out.values().filter(|p| p.is_empty()).count(), 3);
        }
    }

    #[test]
    fn missing_topics_and_unsubscribed_topics_are_not_assigned() {
        let members = BTreeMap::from([("a".to_string(), spec(&["t", "later"]))]);
        let topics = BTreeMap::from([("t".to_string(), 2), ("other".to_string(), 3)]);
        let out = Assignor::Uniform.assign(&members, &topics);
        assert_eq!(out["a"].keys().collect::<Vec<_>>(), vec!["t"]);
    }

    #[test]
    fn assignor_names_parse_and_print() {
        for name in ["uniform", "range"] {
            assert_eq!(name.parse::<Assignor>().expect("known").to_string(), name);
        }
        assert!("sticky".parse::<Assignor>().is_err());
    }

    fn arb_case() -> impl Strategy<Value = (BTreeMap<String, MemberSpec>, BTreeMap<String, u32>)> {
        let topics = proptest::collection::btree_map("t[0-3]", 1u32..12, 1..4);
        let members = proptest::collection::btree_map(
            "m[0-9]",
            proptest::collection::btree_set("t[0-3]", 1..4),
            1..8,
        );
        (members, topics).prop_map(|(members, topics)| {
            let members = members
                .into_iter()
                .map(|(id, subscribed)| {
                    (
                        id,
                        MemberSpec {
                            subscribed,
                            previous: Partitions::new(),
                        },
                    )
                })
                .collect();
            (members, topics)
        })
    }

    proptest! {
        /// Both assignors cover every partition once. With equal subscriptions, uniform is
        /// balanced within one and stable: rerun on its own output, nothing moves.
        #[test]
        fn assignments_are_complete_balanced_and_stable((members, topics) in arb_case()) {
            for assignor in [Assignor::Uniform, Assignor::Range] {
                let out = assignor.assign(&members, &topics);
                check_complete(&members, &topics, &out);
            }
            let out = Assignor::Uniform.assign(&members, &topics);
            let same = members.values().all(|m| m.subscribed == members.values().next().map(|f| f.subscribed.clone()).unwrap_or_default());
            if same {
                let counts: Vec<usize> = out.values().map(count).collect();
                let (lo, hi) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
                prop_assert!(hi - lo <= 1, "unbalanced: {out:?}");
            }
            if same {
                let mut again = members.clone();
                for (id, m) in again.iter_mut() {
                    m.previous = out[id].clone();
                }
                prop_assert_eq!(Assignor::Uniform.assign(&again, &topics), out);
            }
        }
    }
}
