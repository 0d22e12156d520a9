//! The Raft log's frame: `len: u32 LE`, `crc32: u32 LE` (of the payload), then `len` bytes
//! of bincode (an [`Op`] in the log file, the vote in the vote file). Encoding (an append's
//! in pieces, so that its commands are written from their own buffers), parsing a
//! frame in memory, and reading the next one from a stream at replay.

use std::io::{self, IoSlice, Read, Write};

use bytes::Bytes;
use openraft::EntryPayload;
use serde::Serialize;

use super::Op;
use crate::types::{Command, Entry};

/// The largest frame accepted at open; a larger length is damage, not data.
pub(super) const MAX_FRAME_BYTES: u32 = 256 << 20;

/// The next op of a log being replayed and its frame's whole length, or `None` at the end or
/// at a torn or damaged frame (the tail to cut). Only a read error is an error.
pub(super) fn next_frame(stream: &mut impl Read) -> io::Result<Option<(Op, u32)>> {
    let mut head = [0u8; 8];
    if !read_full(stream, &mut head)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if len > MAX_FRAME_BYTES {
        return Ok(None);
    }
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let mut payload = vec![0u8; len as usize];
    if !read_full(stream, &mut payload)? || crc32fast::hash(&payload) != crc {
        return Ok(None);
    }
    Ok(bincode::deserialize::<Op>(&payload)
        .ok()
        .map(|op| (op, len + 8)))
}

/// Fills `buf`; false if the stream ends first.
fn read_full(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match stream.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The frame of `value`, serialised in place after its header (one buffer, one copy of an
/// entry's bytes).
pub(super) fn encode_frame<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let size = bincode::serialized_size(value).map_err(invalid)?;
    let len = u32::try_from(size)
        .ok()
        .filter(|l| *l <= MAX_FRAME_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a Raft frame over 256 MiB"))?;
    let mut frame = Vec::with_capacity(8 + len as usize);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&[0; 4]);
    bincode::serialize_into(&mut frame, value).map_err(invalid)?;
    let crc = crc32fast::hash(&frame[8..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(frame)
}

/// A frame ready to be written, in pieces that follow each other in the file: the header and
/// the bincode around each command, and each command's bytes as they are (shared with the
/// entry, not copied). The pieces together are exactly [`encode_frame`]'s bytes.
pub(super) struct Frame {
    parts: Vec<Bytes>,
    len: usize,
}

impl Frame {
    /// The frame's whole length in bytes.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The frame's pieces, to write in order.
    pub(super) fn parts(&self) -> &[Bytes] {
        &self.parts
    }
}

impl From<Vec<u8>> for Frame {
    fn from(bytes: Vec<u8>) -> Frame {
        let len = bytes.len();
        Frame {
            parts: vec![Bytes::from(bytes)],
            len,
        }
    }
}

/// The frame of `Op::Append(entries)`, byte for byte [`encode_frame`]'s, without copying a
/// normal entry's command into it: a produce batch goes from the entry to the file in the
/// write itself. Bincode writes a command last in its entry, as its length then its bytes,
/// so each entry is serialised with an empty command, whose length (0) is then set to the
/// real one, and the command's bytes follow as a piece of their own.
pub(super) fn encode_append_frame(entries: &[Entry]) -> io::Result<Frame> {
    // The first piece holds the header, filled in last; the others are final as pushed.
    let mut first: Option<Vec<u8>> = None;
    let mut rest: Vec<Bytes> = Vec::new();
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(&[0; 8]);
    bincode::serialize_into(&mut head, &Op::Append(Vec::new())).map_err(invalid)?;
    // An empty list ends in its length, 0: the real count goes there.
    let count_at = head.len() - 8;
    head[count_at..].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    for entry in entries {
        let command = match &entry.payload {
            EntryPayload::Normal(c) if !c.0.is_empty() => c,
            _ => {
                bincode::serialize_into(&mut head, entry).map_err(invalid)?;
                continue;
            }
        };
        let stripped = Entry {
            log_id: entry.log_id,
            payload: EntryPayload::Normal(Command(Bytes::new())),
        };
        bincode::serialize_into(&mut head, &stripped).map_err(invalid)?;
        let len_at = head.len() - 8;
        if head[len_at..] != [0; 8] {
            // Not the layout described above: encode it whole instead.
            return encode_frame(&Op::Append(entries.to_vec())).map(Frame::from);
        }
        head[len_at..].copy_from_slice(&(command.0.len() as u64).to_le_bytes());
        let done = std::mem::replace(&mut head, Vec::with_capacity(64));
        match first {
            None => first = Some(done),
            Some(_) => rest.push(Bytes::from(done)),
        }
        rest.push(command.0.clone());
    }
    let mut first = match first {
        None => head,
        Some(f) => {
            rest.push(Bytes::from(head));
            f
        }
    };
    let total = first.len() + rest.iter().map(Bytes::len).sum::<usize>();
    let len = u32::try_from(total - 8)
        .ok()
        .filter(|l| *l <= MAX_FRAME_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a Raft frame over 256 MiB"))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&first[8..]);
    for piece in &rest {
        crc.update(piece);
    }
    first[0..4].copy_from_slice(&len.to_le_bytes());
    first[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
    let mut parts = Vec::with_capacity(1 + rest.len());
    parts.push(Bytes::from(first));
    parts.extend(rest.into_iter().filter(|p| !p.is_empty()));
    Ok(Frame { parts, len: total })
}

/// Writes every piece of `frames`, in order, with as few `writev` calls as the system allows.
pub(super) fn write_frames(out: &mut impl Write, frames: &[&Frame]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = frames
        .iter()
        .flat_map(|f| f.parts().iter())
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match out.write_vectored(rest) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the Raft log file took no more bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The payload of the frame at the start of `bytes` and the frame's whole length, or `None`
/// if the frame is short or damaged.
pub(super) fn parse_frame(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    if len > MAX_FRAME_BYTES {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let payload = bytes.get(8..8 + len as usize)?;
    (crc32fast::hash(payload) == crc).then_some((payload, 8 + len as usize))
}

pub(super) fn invalid(e: bincode::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::LogId;
    use openraft::{CommittedLeaderId, Membership};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// An entry by a selector: 0 blank, 1 membership, else normal with `bytes` (maybe empty).
    fn entry(index: u64, kind: u8, bytes: Vec<u8>) -> Entry {
        let payload = match kind {
            0 => EntryPayload::Blank,
            1 => EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1, 2])], None)),
            _ => EntryPayload::Normal(Command(Bytes::from(bytes))),
        };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(index % 5, 2), index),
            payload,
        }
    }

    proptest! {
        /// The pieces of an append's frame, written one after another, are the frame of the
        /// whole op: the file format does not change, and replay and read-back parse it.
        #[test]
        fn an_append_frame_in_pieces_is_the_whole_frame(
            kinds in proptest::collection::vec((0u8..4, proptest::collection::vec(any::<u8>(), 0..200)), 0..10)
        ) {
            let entries: Vec<Entry> = kinds
                .into_iter()
                .enumerate()
                .map(|(i, (k, b))| entry(1 + i as u64, k, b))
                .collect();
            let frame = encode_append_frame(&entries).expect("pieces");
            let mut written = Vec::new();
            write_frames(&mut written, &[&frame]).expect("write");
            let whole = encode_frame(&Op::Append(entries.clone())).expect("whole");
            prop_assert_eq!(frame.len(), whole.len());
            prop_assert_eq!(&written, &whole);
            let (payload, len) = parse_frame(&written).expect("a good frame");
            prop_assert_eq!(len, whole.len());
            let Ok(Op::Append(back)) = bincode::deserialize::<Op>(payload) else {
                return Err(TestCaseError::fail("not an append"));
            };
            prop_assert_eq!(format!("{back:?}"), format!("{entries:?}"));
        }
    }

    #[test]
    fn a_command_is_a_piece_of_its_own_not_a_copy() {
        let batch = Bytes::from(vec![7u8; 4096]);
        let entries = vec![
            entry(1, 0, Vec::new()),
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 2), 2),
                payload: EntryPayload::Normal(Command(batch.clone())),
            },
        ];
        let frame = encode_append_frame(&entries).expect("pieces");
        assert!(
            frame
                .parts()
                .iter()
                .any(|p| p.as_ptr() == batch.as_ptr() && p.len() == batch.len()),
            "the batch's own buffer is a piece of the frame"
        );
    }

    /// Takes at most 7 bytes per call, as a file may take part of a `writev`.
    struct Dribble(Vec<u8>);

    impl Write for Dribble {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_written_a_little_at_a_time_arrive_whole_and_in_order() {
        let frames: Vec<Frame> = (1..4u64)
            .map(|i| encode_append_frame(&[entry(i, 2, vec![i as u8; 50])]).expect("frame"))
            .collect();
        let mut out = Dribble(Vec::new());
        write_frames(&mut out, &frames.iter().collect::<Vec<_>>()).expect("write");
        let mut whole = Vec::new();
        for i in 1..4u64 {
            whole.extend(
                encode_frame(&Op::Append(vec![entry(i, 2, vec![i as u8; 50])])).expect("whole"),
            );
        }
        assert_eq!(out.0, whole);
    }
}
