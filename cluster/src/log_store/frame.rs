//! The Raft log's frame: `len: u32 LE`, `crc32: u32 LE` (of the payload), then `len` bytes
//! of bincode (an [`Op`] in the log file, the vote in the vote file). Encoding, parsing a
//! frame in memory, and reading the next one from a stream at replay.

use std::io::{self, Read};

use serde::Serialize;

use super::Op;

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
