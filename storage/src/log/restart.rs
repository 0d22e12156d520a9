//! Restarting a log empty at a later offset: what a replica does when the records it lacks
//! are gone everywhere else (deleted by retention), so it can only continue from the other
//! replicas' log start.
//!
//! The restart commits with one file: the restart marker, written atomically before any
//! segment is touched. Without it on disk, an open finds the old log as it was; with it, an
//! open deletes every segment below its offset and starts the log there (see
//! `recovery::finish_restart`). So a crash at any point reopens either the old log or the
//! new empty one, never a mix and never a hole.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::PartitionLog;
use crate::error::{Result, StorageError};
use crate::fsutil::fsync_dir;
use crate::producers::{self, ProducerStates, BASE_FILE, SNAPSHOT_FILE};
use crate::recovery;
use crate::segment::Segment;

impl PartitionLog {
    /// Discards every record and makes the log empty from `offset`: afterwards the log start
    /// and the high watermark are both `offset`, and the next append gets base offset
    /// `offset`. Only for an `offset` past the high watermark (anything else is
    /// [`StorageError::OffsetOutOfRange`] and changes nothing), so no offset is ever reused.
    /// The idempotent producers' state is cleared with the records it described, and the log
    /// reports it missing ([`PartitionLog::producer_state_missing`]) until another replica's
    /// is adopted ([`PartitionLog::restore_producers`]). The caller
    /// must be the log's only writer meanwhile (a replica's apply): an append that races it
    /// past `offset` fences the partition.
    ///
    /// Crash-safe: the restart marker commits it (see the module notes). A failure before the
    /// marker is on disk changes nothing; one between the marker and the in-memory switch
    /// fences the partition (a reopen completes the restart); a failure to delete the old
    /// files afterwards is logged, leaves the marker for the next open to finish, and is
    /// retried by the next retention pass. Blocking: file work, none of it under the writer
    /// lock.
    pub fn restart_at(&self, offset: u64) -> Result<()> {
        let inner = &*self.inner;
        // Retention and restarts both cut the segment list: one at a time.
        let _pass = inner.retention_lock.lock();
        self.check_writable()?;
        {
            let _w = inner.writer.lock();
            self.check_nothing_staged()?;
        }
        let high_watermark = self.high_watermark();
        if offset <= high_watermark {
            return Err(self.out_of_range(offset, self.log_start_offset(), high_watermark));
        }
        // Before the marker: a crash after it must not find a clean-shutdown marker that
        // describes the old files.
        self.remove_clean_marker()?;
        tracing::info!(
            topic = %inner.id.topic, partition = inner.id.partition,
            high_watermark, offset, "restarting the log empty at a later offset"
        );
        let committed = (|| {
            recovery::write_restart_marker(&inner.dir, offset)?;
            // After the marker: without it the old log stays, and its state is whole.
            producers::write_missing_marker(&inner.dir)?;
            let segment = Segment::create(
                Arc::clone(&inner.id),
                &inner.dir,
                offset,
                inner.options.segment_bytes,
                super::now_ms(),
            )?;
            fsync_dir(&inner.dir)?;
            Ok::<_, StorageError>(segment)
        })();
        let segment = match committed {
            Ok(segment) => segment,
            Err(e) => {
                // The marker may be on disk: the files and memory may now disagree until a
                // reopen completes the restart, so nothing more may be written here.
                self.fence(format!("restart at offset {offset} failed: {e}"));
                return Err(e);
            }
        };
        let old = {
            let _w = inner.writer.lock();
            if inner.closed.load(Ordering::Acquire) {
                // Close ran meanwhile; the marker completes the restart at the next open.
                return Err(StorageError::Closed);
            }
            let now = inner.high_watermark.load(Ordering::Acquire);
            if now >= offset {
                // An append raced past the offset meanwhile: its records are not to be
                // discarded, and the marker on disk says otherwise. Stop writes until a
                // reopen settles it.
                let e = self.out_of_range(offset, self.log_start_offset(), now);
                self.fence(format!("restart at offset {offset} raced an append: {e}"));
                return Err(e);
            }
            let old = inner.segments.load_full();
            inner.segments.store(Arc::new(vec![Arc::new(segment)]));
            inner.high_watermark.store(offset, Ordering::Release);
            *inner.producers.lock() = ProducerStates::default();
            inner.producers_missing.store(true, Ordering::Release);
            let mut sync = inner.sync.lock();
            // Nothing below `offset` exists, and the empty log at `offset` is durable.
            sync.durable_offset = offset;
            inner.durable_offset.store(offset, Ordering::Release);
            old
        };
        if let Err(e) = self.remove_restarted(&old) {
            tracing::warn!(
                topic = %inner.id.topic, partition = inner.id.partition, offset, error = %e,
                "could not delete the files before a restart; the next open or retention pass does"
            );
        }
        Ok(())
    }

    /// Deletes the old segments' files (oldest first), the producer snapshot and adopted
    /// state that described them, and then the restart marker. Stops at the first failure,
    /// keeping the marker. Called with the retention lock held; with no `old` segments, it
    /// finishes what an earlier call left.
    pub(super) fn remove_restarted(&self, old: &[Arc<Segment>]) -> Result<()> {
        let inner = &*self.inner;
        let mut retired = inner.retired.lock();
        retired.extend(
            old.iter()
                .map(|s| super::retention::Retired::new(Arc::clone(s))),
        );
        drop(retired);
        self.remove_retired_files()?;
        producers::remove_file(&inner.dir, SNAPSHOT_FILE)?;
        producers::remove_file(&inner.dir, BASE_FILE)?;
        fsync_dir(&inner.dir)?;
        recovery::remove_restart_marker(&inner.dir)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::batch::{encode_batch, Record};
    use crate::config::TopicConfig;
    use crate::log::LogOptions;
    use crate::recovery::RESTART_MARKER_FILE;

    fn record(value: &'static [u8]) -> Bytes {
        encode_batch(&[Record {
            key: None,
            value: Bytes::from_static(value),
            headers: vec![],
            timestamp_ms: 1,
        }])
    }

    /// Small segments, so a few appends make several of them.
    fn open(dir: &std::path::Path) -> PartitionLog {
        let config = TopicConfig::default().segment_bytes(4096);
        PartitionLog::open(dir, LogOptions::new("t", 0, &config)).expect("open")
    }

    /// A log with `n` records of 1 KiB, spread over several segments.
    fn filled(dir: &std::path::Path, n: usize) -> PartitionLog {
        let log = open(dir);
        for _ in 0..n {
            log.append(&record(&[7u8; 1024])).expect("append");
        }
        assert!(log.stats().segments > 2, "{:?}", log.stats());
        log
    }

    fn segment_files(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".log"))
            .collect();
        names.sort();
        names
    }

    /// The value of the one record at `offset`.
    fn value_at(log: &PartitionLog, offset: u64) -> Bytes {
        let read = log.read(offset, 1 << 20).expect("read");
        let view = crate::batch::batches(&read.chunks[0])
            .next()
            .expect("a batch")
            .expect("valid");
        assert_eq!(view.header().base_offset, offset);
        let first = view.records().next().expect("a record").expect("valid");
        Bytes::copy_from_slice(first.value)
    }

    fn assert_empty_at(log: &PartitionLog, offset: u64) {
        assert_eq!(log.log_start_offset(), offset);
        assert_eq!(log.high_watermark(), offset);
        assert!(log.read(offset, 1024).expect("read").chunks.is_empty());
        assert!(matches!(
            log.read(offset - 1, 1024),
            Err(StorageError::OffsetOutOfRange { .. })
        ));
    }

    #[test]
    fn restart_empties_the_log_and_appends_continue_from_the_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = filled(dir.path(), 10);
        log.restart_at(100).expect("restart");
        assert_empty_at(&log, 100);
        assert_eq!(log.durable_offset(), 100);
        assert_eq!(
            segment_files(dir.path()),
            vec![format!("{:020}.log", 100)],
            "the old segments are deleted"
        );
        assert!(!dir.path().join(RESTART_MARKER_FILE).exists());
        let info = log.append(&record(b"after")).expect("append");
        assert_eq!(info.base_offset, 100);
        assert_eq!(value_at(&log, 100), Bytes::from_static(b"after"));
        log.close().expect("close");
        drop(log);

        let log = open(dir.path());
        assert!(log.recovery_report().clean);
        assert_eq!(log.log_start_offset(), 100);
        assert_eq!(log.high_watermark(), 101);
        assert_eq!(value_at(&log, 100), Bytes::from_static(b"after"));
    }

    #[test]
    fn a_restart_survives_a_crash_right_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = filled(dir.path(), 10);
        log.restart_at(50).expect("restart");
        log.append(&record(b"a")).expect("append");
        log.flush().expect("flush");
        drop(log); // a crash: no clean close
        let log = open(dir.path());
        assert!(!log.recovery_report().clean);
        assert_eq!(log.log_start_offset(), 50);
        assert_eq!(log.high_watermark(), 51);
        assert_eq!(value_at(&log, 50), Bytes::from_static(b"a"));
        assert_eq!(log.append(&record(b"b")).expect("append").base_offset, 51);
    }

    #[test]
    fn a_restart_at_or_below_the_high_watermark_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = filled(dir.path(), 10);
        let before = log.stats();
        for offset in [0, 5, 10] {
            assert!(matches!(
                log.restart_at(offset),
                Err(StorageError::OffsetOutOfRange { offset: o, .. }) if o == offset
            ));
        }
        assert_eq!(log.stats(), before);
        assert!(!dir.path().join(RESTART_MARKER_FILE).exists());
        assert_eq!(log.append(&record(b"x")).expect("append").base_offset, 10);
    }

    /// A crash after the marker was written and before anything else: the next open
    /// completes the restart (deletes the old segments, creates the one at the offset).
    #[test]
    fn an_open_completes_a_restart_cut_short_after_its_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = filled(dir.path(), 10);
        log.flush().expect("flush");
        drop(log);
        recovery::write_restart_marker(dir.path(), 70).expect("marker");
        let log = open(dir.path());
        assert_empty_at(&log, 70);
        assert_eq!(segment_files(dir.path()), vec![format!("{:020}.log", 70)]);
        assert!(!dir.path().join(RESTART_MARKER_FILE).exists());
        assert_eq!(log.append(&record(b"x")).expect("append").base_offset, 70);
    }

    /// A crash with the marker, the new segment and part of the old ones deleted (oldest
    /// first) reopens as the new log, not as the old log's remaining suffix.
    #[test]
    fn an_open_completes_a_restart_cut_short_while_deleting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = filled(dir.path(), 10);
        log.append(&record(b"z")).expect("append");
        log.close().expect("close"); // even a clean-shutdown marker must not win
        drop(log);
        recovery::write_restart_marker(dir.path(), 70).expect("marker");
        let id = Arc::new(crate::segment::LogId {
            topic: "t".to_string(),
            partition: 0,
        });
        drop(Segment::create(id, dir.path(), 70, 4096, 0).expect("segment"));
        recovery::remove_segment_files(dir.path(), 0).expect("delete the first");
        let log = open(dir.path());
        assert_empty_at(&log, 70);
        assert_eq!(segment_files(dir.path()), vec![format!("{:020}.log", 70)]);
    }

    /// Without the marker (a crash before it reached the disk) the old log is untouched.
    #[test]
    fn without_its_marker_the_old_log_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = filled(dir.path(), 10);
        log.flush().expect("flush");
        drop(log);
        let log = open(dir.path());
        assert_eq!(log.log_start_offset(), 0);
        assert_eq!(log.high_watermark(), 10);
    }

    #[test]
    fn a_damaged_marker_is_refused_not_guessed_at() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = filled(dir.path(), 10);
        log.close().expect("close");
        drop(log);
        std::fs::write(dir.path().join(RESTART_MARKER_FILE), b"garbage").expect("write");
        match PartitionLog::open(
            dir.path(),
            LogOptions::new("t", 0, &TopicConfig::default().segment_bytes(4096)),
        ) {
            Err(StorageError::Corrupt { path, .. }) => {
                assert!(path.ends_with(RESTART_MARKER_FILE))
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(segment_files(dir.path()).len() > 2, "nothing was deleted");
    }

    /// Idempotent producers' state describes the discarded records: it goes with them, in
    /// memory and on disk (a stale snapshot would be read back at the next open).
    #[test]
    fn a_restart_clears_the_producers_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        let mut builder =
            crate::batch::BatchBuilder::new(bytes::BytesMut::new()).with_producer(9, 0, 0);
        builder.push(None, b"p", &[], 1);
        let batch = builder.finish();
        log.append(&batch).expect("append");
        log.close().expect("close");
        drop(log);
        let log = open(dir.path());
        assert!(dir.path().join(SNAPSHOT_FILE).exists());
        log.restart_at(20).expect("restart");
        assert!(!dir.path().join(SNAPSHOT_FILE).exists());
        // Sequence 0 again is a new batch now, not a duplicate of the discarded one.
        let info = log.append(&batch).expect("append");
        assert_eq!(info.base_offset, 20);
    }

    /// A replica that restarted its log at another's log start copies that replica's
    /// batches, whose producers' earlier batches were deleted: a copy is not refused as a
    /// sequence gap, and it is remembered (a retry of it is a duplicate, the next follows).
    #[test]
    fn a_copied_idempotent_batch_lands_on_a_restarted_log_and_its_producer_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        log.restart_at(20).expect("restart");
        let from = |sequence| {
            let mut builder = crate::batch::BatchBuilder::new(bytes::BytesMut::new())
                .with_producer(9, 0, sequence);
            builder.push(None, b"p", &[], 1);
            builder.finish()
        };
        assert!(
            matches!(
                log.append(&from(7)),
                Err(StorageError::ProducerRefused { .. })
            ),
            "an ordinary append checks the sequence"
        );
        assert_eq!(log.append_copy(&from(7)).expect("copy").base_offset, 20);
        assert_eq!(log.append(&from(7)).expect("a retry").base_offset, 20);
        assert_eq!(log.append(&from(8)).expect("the next").base_offset, 21);
        assert_eq!(log.high_watermark(), 22);
    }
}
