//! AppendEntries with their commands beside the envelope.
//!
//! A produce batch is an entry's command, and it is nearly all of an AppendEntries' bytes.
//! Serialised inside the bincode envelope it is copied twice on the leader (into bincode's
//! buffer, then into tonic's) and once more on the follower (out of bincode into a fresh
//! buffer). On a stream whose server says it understands them (the [`COMMANDS_HEADER`]
//! response header), the leader moves each normal entry's command into
//! `RaftMessage.commands` instead, in entry order, and leaves an empty command in the
//! envelope: prost copies the batch into tonic's buffer once, and the follower takes it out
//! of the received frame as a slice of it, without a copy. A server that does not send the
//! header (a broker from before this) gets whole envelopes, as before.

use bytes::Bytes;
use openraft::raft::AppendEntriesRequest;
use openraft::EntryPayload;

use crate::types::TypeConfig;

/// The response header of an `AppendStream` whose server takes commands beside the envelope.
pub(crate) const COMMANDS_HEADER: &str = "rill-raft-commands";

/// Moves every normal entry's command out of `request`, in entry order, leaving empty ones.
pub(crate) fn detach(request: &mut AppendEntriesRequest<TypeConfig>) -> Vec<Bytes> {
    request
        .entries
        .iter_mut()
        .filter_map(|entry| match &mut entry.payload {
            EntryPayload::Normal(command) => Some(std::mem::take(&mut command.0)),
            _ => None,
        })
        .collect()
}

/// Why a message's commands do not fit its envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AttachError {
    /// The message carries a different number of commands than its normal entries.
    #[error("{commands} commands beside an AppendEntries with {entries} normal entries")]
    Count {
        /// Commands beside the envelope.
        commands: usize,
        /// Normal entries in the envelope.
        entries: usize,
    },
    /// An entry's command is both in the envelope and beside it.
    #[error("the entry at index {index} has a command both in the envelope and beside it")]
    Twice {
        /// The entry's Raft index.
        index: u64,
    },
}

/// Puts `commands` back into `request`'s normal entries, in order. No commands: the
/// envelope is whole, as a sender that does not detach them sends it.
pub(crate) fn attach(
    request: &mut AppendEntriesRequest<TypeConfig>,
    commands: Vec<Bytes>,
) -> Result<(), AttachError> {
    if commands.is_empty() {
        return Ok(());
    }
    let entries = request
        .entries
        .iter()
        .filter(|e| matches!(e.payload, EntryPayload::Normal(_)))
        .count();
    if entries != commands.len() {
        return Err(AttachError::Count {
            commands: commands.len(),
            entries,
        });
    }
    let mut commands = commands.into_iter();
    for entry in &mut request.entries {
        if let EntryPayload::Normal(command) = &mut entry.payload {
            if !command.0.is_empty() {
                return Err(AttachError::Twice {
                    index: entry.log_id.index,
                });
            }
            command.0 = commands.next().unwrap_or_default();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Command, Entry, LogId, Vote};
    use openraft::{CommittedLeaderId, Membership};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// An entry of each kind, by a selector: 0 blank, 1 membership, else normal with `bytes`.
    fn entry(index: u64, kind: u8, bytes: Vec<u8>) -> Entry {
        let payload = match kind {
            0 => EntryPayload::Blank,
            1 => EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1, 2, 3])], None)),
            _ => EntryPayload::Normal(Command(Bytes::from(bytes))),
        };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), index),
            payload,
        }
    }

    fn request(entries: Vec<Entry>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 9)),
            leader_commit: Some(LogId::new(CommittedLeaderId::new(2, 1), 8)),
            entries,
        }
    }

    proptest! {
        /// Detached, sent as bincode plus commands, and attached again, a request is the one
        /// sent; and its envelope carries none of the commands' bytes.
        #[test]
        fn a_request_survives_detach_encode_decode_attach(
            kinds in proptest::collection::vec((0u8..4, proptest::collection::vec(any::<u8>(), 0..300)), 0..12)
        ) {
            let entries: Vec<Entry> = kinds
                .into_iter()
                .enumerate()
                .map(|(i, (k, b))| entry(10 + i as u64, k, b))
                .collect();
            let sent = request(entries);
            let mut stripped = sent.clone();
            let commands = detach(&mut stripped);
            let envelope = bincode::serialize(&stripped).expect("encode");
            let whole = bincode::serialize(&sent).expect("encode");
            let command_bytes: usize = commands.iter().map(Bytes::len).sum();
            prop_assert_eq!(envelope.len() + command_bytes, whole.len());
            let mut received: AppendEntriesRequest<TypeConfig> =
                bincode::deserialize(&envelope).expect("decode");
            attach(&mut received, commands).expect("attach");
            prop_assert_eq!(format!("{received:?}"), format!("{sent:?}"));
            for (r, s) in received.entries.iter().zip(&sent.entries) {
                if let (EntryPayload::Normal(r), EntryPayload::Normal(s)) = (&r.payload, &s.payload) {
                    prop_assert_eq!(&r.0, &s.0);
                }
            }
        }
    }

    #[test]
    fn a_whole_envelope_needs_no_commands() {
        let sent = request(vec![entry(10, 2, b"batch".to_vec()), entry(11, 0, vec![])]);
        let mut received = sent.clone();
        attach(&mut received, Vec::new()).expect("whole");
        assert_eq!(format!("{received:?}"), format!("{sent:?}"));
    }

    #[test]
    fn too_few_or_too_many_commands_are_refused() {
        let mut stripped = request(vec![
            entry(10, 2, b"a".to_vec()),
            entry(11, 2, b"b".to_vec()),
        ]);
        let commands = detach(&mut stripped);
        let err = attach(&mut stripped.clone(), commands[..1].to_vec()).expect_err("one short");
        assert_eq!(
            err,
            AttachError::Count {
                commands: 1,
                entries: 2
            }
        );
        let mut three = commands.clone();
        three.push(Bytes::from_static(b"c"));
        assert!(attach(&mut stripped, three).is_err());
    }

    #[test]
    fn a_command_in_the_envelope_and_beside_it_is_refused() {
        let mut whole = request(vec![entry(10, 2, b"a".to_vec())]);
        let err = attach(&mut whole, vec![Bytes::from_static(b"a")]).expect_err("twice");
        assert_eq!(err, AttachError::Twice { index: 10 });
    }
}
