//! Fault injection, per partition: a slow sync, a slow roll, a failing sync. Compiled in for
//! this crate's tests and with the `fault-injection` feature (which only the end-to-end tests
//! enable); otherwise every hook is an empty inline function.

#[cfg(any(test, feature = "fault-injection"))]
mod enabled {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use super::super::PartitionLog;
    use crate::error::{Result, StorageError};

    /// The faults injected into one partition.
    #[derive(Debug, Default)]
    pub(in crate::log) struct Faults {
        sync_delay_ms: AtomicU64,
        roll_delay_ms: AtomicU64,
        fail_next_sync: AtomicBool,
    }

    impl Faults {
        /// Called before every sync the partition makes (group commit, flush, checkpoint, the
        /// clean marker's removal, staged batches).
        pub(in crate::log) fn before_sync(&self) {
            sleep_ms(self.sync_delay_ms.load(Ordering::Acquire));
        }

        /// Called before the next segment's files are created.
        pub(in crate::log) fn before_roll(&self) {
            sleep_ms(self.roll_delay_ms.load(Ordering::Acquire));
        }

        /// Fails the next sync of written data (a group commit, or staged batches) once after
        /// [`PartitionLog::inject_sync_failure`].
        pub(in crate::log) fn take_sync_failure(&self, dir: &Path) -> Result<()> {
            if self.fail_next_sync.swap(false, Ordering::AcqRel) {
                return Err(StorageError::io(
                    "sync segment",
                    dir,
                    std::io::Error::other("injected sync failure"),
                ));
            }
            Ok(())
        }
    }

    fn sleep_ms(ms: u64) {
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    impl PartitionLog {
        /// Makes every sync of this partition (group commit, flush, checkpoint, the removal of
        /// the clean-shutdown marker) take `delay` longer, as a slow disk would. Zero ends it.
        pub fn inject_sync_delay(&self, delay: Duration) {
            let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            self.inner.faults.sync_delay_ms.store(ms, Ordering::Release);
        }

        /// Makes creating each new segment's files take `delay` longer, as a slow disk would.
        /// Zero ends it.
        pub fn inject_roll_delay(&self, delay: Duration) {
            let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            self.inner.faults.roll_delay_ms.store(ms, Ordering::Release);
        }

        /// Makes the next sync of written data (a group commit, or staged batches) fail, as a
        /// disk error would.
        pub fn inject_sync_failure(&self) {
            self.inner
                .faults
                .fail_next_sync
                .store(true, Ordering::Release);
        }
    }
}

#[cfg(not(any(test, feature = "fault-injection")))]
mod disabled {
    use std::path::Path;

    use crate::error::Result;

    /// No faults: every hook does nothing.
    #[derive(Debug, Default)]
    // Braced, not a unit struct, so that both builds construct it with `Faults::default()`.
    pub(in crate::log) struct Faults {}

    impl Faults {
        #[inline(always)]
        pub(in crate::log) fn before_sync(&self) {}

        #[inline(always)]
        pub(in crate::log) fn before_roll(&self) {}

        #[inline(always)]
        pub(in crate::log) fn take_sync_failure(&self, _dir: &Path) -> Result<()> {
            Ok(())
        }
    }
}

#[cfg(any(test, feature = "fault-injection"))]
pub(super) use enabled::Faults;

#[cfg(not(any(test, feature = "fault-injection")))]
pub(super) use disabled::Faults;
