//! The stub a placed entry's Raft log frame holds instead of its command (see
//! `placement.rs`): where its batch lies in the partition log, and for an idempotent
//! producer's batch what its apply needs when the records are gone (deleted by retention):
//! the leader's clock and the batch header.
//!
//! - A plain batch's stub, 29 bytes: `[ack code | STUB_FLAG][token: u64 LE][base offset: u64
//!   LE][record count: u32 LE][length: u32 LE][crc: u32 LE]`.
//! - An idempotent batch's stub, 109 bytes: the ack code has `CLOCK_FLAG` set too, and
//!   `[clock: i64 LE][cutoff: i64 LE][the batch's 64-byte header, as the producer sent it]`
//!   follows. The clock moves the producer state on every replica, and the header names the
//!   producer, whatever became of the records.

use rill_storage::batch::{BatchHeader, HEADER_LEN};
use rill_storage::producers::ProducerClock;
use rill_storage::StagedBatch;

use super::state_machine::CLOCK_FLAG;
use crate::types::Command;

/// The ack code's bit that marks a stub (the clock's is `0x80`).
pub(super) const STUB_FLAG: u8 = 0x40;
/// A plain batch's stub: the ack code, the token, then the staged batch's base offset,
/// record count, length and checksum.
const STUB_BYTES: usize = 1 + 8 + 8 + 4 + 4 + 4;
/// An idempotent batch's stub: a plain one's bytes, the clock and cutoff, the batch header.
const PRODUCER_STUB_BYTES: usize = STUB_BYTES + 16 + HEADER_LEN;

/// What an idempotent batch's stub carries besides a plain one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StubProducer {
    /// The leader's producer clock in the entry.
    pub(super) clock: ProducerClock,
    /// The batch's header bytes, as the producer sent them.
    pub(super) header: [u8; HEADER_LEN],
}

impl StubProducer {
    /// The batch header (`None`: damaged bytes, which a stub this code wrote never holds).
    pub(super) fn header(&self) -> Option<BatchHeader> {
        BatchHeader::parse(&self.header).ok()
    }
}

/// A stub taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stub {
    /// The ack code of the command it stands for.
    pub(super) ack_code: u8,
    /// Its writer's token.
    pub(super) token: u64,
    /// Where and what its batch is.
    pub(super) batch: StagedBatch,
    /// The clock and header of an idempotent producer's batch.
    pub(super) producer: Option<StubProducer>,
}

/// The stub of a command with `ack_code` and `token` whose batch is `batch`; `producer`
/// for an idempotent producer's batch (its entry's clock, and the batch's bytes, of which
/// the header is kept; a batch shorter than a header is not one, and gets a plain stub).
pub(super) fn encode_stub(
    ack_code: u8,
    token: u64,
    batch: &StagedBatch,
    producer: Option<(ProducerClock, &[u8])>,
) -> Command {
    let producer =
        producer.and_then(|(clock, bytes)| Some((clock, bytes.first_chunk::<HEADER_LEN>()?)));
    let mut bytes = Vec::with_capacity(PRODUCER_STUB_BYTES);
    let flags = STUB_FLAG | if producer.is_some() { CLOCK_FLAG } else { 0 };
    bytes.push(ack_code | flags);
    bytes.extend_from_slice(&token.to_le_bytes());
    bytes.extend_from_slice(&batch.base_offset.to_le_bytes());
    bytes.extend_from_slice(&batch.record_count.to_le_bytes());
    bytes.extend_from_slice(&batch.len.to_le_bytes());
    bytes.extend_from_slice(&batch.crc.to_le_bytes());
    if let Some((clock, header)) = producer {
        bytes.extend_from_slice(&clock.now_ms.to_le_bytes());
        bytes.extend_from_slice(&clock.cutoff_ms.to_le_bytes());
        bytes.extend_from_slice(header);
    }
    Command(bytes.into())
}

/// The stub `command` is, if it is one.
pub(super) fn parse_stub(command: &Command) -> Option<Stub> {
    let bytes = command.0.as_ref();
    let first = *bytes.first()?;
    if first & STUB_FLAG == 0 {
        return None;
    }
    let with_producer = first & CLOCK_FLAG != 0;
    let want = if with_producer {
        PRODUCER_STUB_BYTES
    } else {
        STUB_BYTES
    };
    if bytes.len() != want {
        return None;
    }
    let u64_at = |at: usize| bytes[at..at + 8].try_into().ok().map(u64::from_le_bytes);
    let u32_at = |at: usize| bytes[at..at + 4].try_into().ok().map(u32::from_le_bytes);
    let producer = if with_producer {
        Some(StubProducer {
            clock: ProducerClock {
                now_ms: u64_at(STUB_BYTES)? as i64,
                cutoff_ms: u64_at(STUB_BYTES + 8)? as i64,
            },
            header: bytes[STUB_BYTES + 16..].try_into().ok()?,
        })
    } else {
        None
    };
    Some(Stub {
        ack_code: first & !(STUB_FLAG | CLOCK_FLAG),
        token: u64_at(1)?,
        batch: StagedBatch {
            base_offset: u64_at(9)?,
            record_count: u32_at(17)?,
            len: u32_at(21)?,
            crc: u32_at(25)?,
        },
        producer,
    })
}
