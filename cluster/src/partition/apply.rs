//! The apply of one partition command: the placed batch published, a stub applied as the
//! records it names, or the batch appended (inline when that is one `pwrite`).

use super::*;

impl PartitionMachine {
    /// Applies entry `log_id` (see [`Machine::apply`]).
    pub(super) fn apply_entry(&mut self, log_id: LogId, command: &Command) -> io::Result<Reply> {
        if let Some(reply) = self.apply_placed(log_id)? {
            return Ok(reply);
        }
        if let Some(stub) = parse_stub(command) {
            return self.apply_stub(log_id, &stub);
        }
        let Some(Parts { clock, batch, .. }) = split_command(command) else {
            return Self::reply(&Err(Refusal::Invalid(format!(
                "topic {} partition {}: a replicated command of {} bytes is too short",
                self.topic,
                self.partition,
                command.0.len()
            ))));
        };
        let header = match BatchHeader::parse(batch) {
            Ok(h) => h,
            Err(e) => {
                return Self::reply(&Err(Refusal::Invalid(format!(
                    "topic {} partition {}: invalid batch: {e}",
                    self.topic, self.partition
                ))))
            }
        };
        if let Some(reply) = self.below_log_start(log_id.index, header.producer_id)? {
            return Ok(reply);
        }
        let count = u64::from(header.record_count);
        let end = self.log.high_watermark();
        if end < self.next_offset {
            return Err(io::Error::other(format!(
                "topic {} partition {}: the local log ends at {end} but this replica applied up to {}; it lost acknowledged data and must be rebuilt",
                self.topic, self.partition, self.next_offset
            )));
        }
        if self.next_offset + count <= end {
            // Replaying entries applied before a restart: their records are in the log
            // already. An idempotent producer's retry (or a refused batch) appended nothing
            // the first time; it must not move the applied end now, or every later entry
            // would be taken for another and a plain batch after it appended twice.
            if header.producer_id >= 0 && !self.holds_at(self.next_offset, &header)? {
                // Its clock moved the producer state the first time all the same.
                self.log.replay_entry(&header, None, clock);
                return Self::reply(&Err(Refusal::Invalid(format!(
                    "topic {} partition {}: a replayed idempotent batch (producer {}, sequence {}) appended nothing when first applied",
                    self.topic, self.partition, header.producer_id, header.base_sequence
                ))));
            }
            let base = self.next_offset;
            self.log.replay_entry(&header, Some(base), clock);
            self.next_offset += count;
            return Self::reply(&Ok((base, header.record_count)));
        }
        let outcome = self.log.append_verified_at(batch, clock);
        self.appended(outcome)
    }

    /// [`PartitionMachine::apply_entry`] when it needs no blocking work (see
    /// [`Machine::try_apply_inline`]).
    pub(super) fn try_apply_entry_inline(
        &mut self,
        log_id: LogId,
        command: &Command,
    ) -> Option<io::Result<Reply>> {
        match self.apply_placed(log_id) {
            Ok(Some(reply)) => return Some(Ok(reply)),
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        if self.log.options().flush == FlushPolicy::Always {
            return None; // every append syncs: blocking
        }
        let Parts { clock, batch, .. } = split_command(command)?;
        let count = BatchHeader::parse(batch)
            .map(|h| u64::from(h.record_count))
            .ok()?;
        let end = self.log.high_watermark();
        if end < self.next_offset
            || self.next_offset + count <= end
            || self.next_offset < self.log.log_start_offset()
        {
            return None; // a replay (it may read the log or learn), or a lost tail
        }
        let checked = match self.log.check_verified_batch(command.0.slice_ref(batch)) {
            Ok(c) => c,
            Err(e) => return Some(self.appended(Err(e))),
        };
        match self.log.try_append_at(&checked, Ack::Leader, clock) {
            Ok(None) => None,
            Ok(Some(unsettled)) => Some(self.appended(Ok(*unsettled.info()))),
            Err(e) => Some(self.appended(Err(e))),
        }
    }

    /// Publishes entry `log_id`'s batch if it was placed at its Raft append (see
    /// `placement.rs`): it lies right at the applied end, staged. `None`: not placed.
    fn apply_placed(&mut self, log_id: LogId) -> io::Result<Option<Reply>> {
        let Some(staged) = self.placement.take_placed(log_id) else {
            return Ok(None);
        };
        if staged.base_offset != self.next_offset {
            return Err(io::Error::other(format!(
                "topic {} partition {}: Raft entry {log_id} was placed at offset {} but the applied end is {}; this replica must be rebuilt",
                self.topic, self.partition, staged.base_offset, self.next_offset
            )));
        }
        self.log
            .publish_staged(staged.next_offset())
            .map_err(io::Error::other)?;
        self.next_offset = staged.next_offset();
        self.local
            .appended(&self.topic, self.partition, self.next_offset);
        Self::reply(&Ok((staged.base_offset, staged.record_count))).map(Some)
    }

    /// Applies a stub that came whole: the leader could not read its batch back because
    /// retention deleted it there. Its records are held here already (a replay), lie below
    /// this log's start, or are missing here too and gone for good: then the log restarts
    /// after them, as a catch-up does when retention deleted the records it needs. A placed
    /// batch was always appended (an idempotent one only when its producer state said so),
    /// so its records count in every case; an idempotent one's clock moves the producer
    /// state, as its apply did on the replicas that had its records.
    fn apply_stub(&mut self, log_id: LogId, stub: &Stub) -> io::Result<Reply> {
        let producer = match stub.producer {
            Some(p) => Some((
                p.header().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "topic {} partition {}: the stub of Raft entry {log_id} holds a damaged batch header",
                            self.topic, self.partition
                        ),
                    )
                })?,
                p.clock,
            )),
            None => None,
        };
        // The clock moves, and a batch whose records are held here counts as active at it.
        let replay = |log: &PartitionLog, held_at: Option<u64>| {
            if let Some((header, clock)) = &producer {
                log.replay_entry(header, held_at, Some(*clock));
            }
        };
        if let Some(reply) = self.below_log_start(log_id.index, -1)? {
            replay(&self.log, None);
            return Ok(reply);
        }
        let count = u64::from(stub.batch.record_count);
        let end = self.log.high_watermark();
        let base = self.next_offset;
        let gone = format!(
            "topic {} partition {}: the records of Raft entry {log_id} (offsets {base}..{}) were deleted by retention",
            self.topic,
            self.partition,
            base + count
        );
        if base + count <= end || base < self.log.log_start_offset() {
            // Held, or below the log's start: counted, as a plain batch's replay is.
            let held = base >= self.log.log_start_offset();
            replay(&self.log, held.then_some(base));
            self.next_offset = base + count;
            return Self::reply(&Err(Refusal::Invalid(gone)));
        }
        if end != base {
            return Err(io::Error::other(format!(
                "{gone}, and the local log ends at {end}, not at the applied end {base}"
            )));
        }
        self.log
            .restart_at(base + count)
            .map_err(io::Error::other)?;
        replay(&self.log, None);
        self.next_offset = base + count;
        self.local
            .appended(&self.topic, self.partition, self.next_offset);
        Self::reply(&Err(Refusal::Invalid(gone)))
    }
}
