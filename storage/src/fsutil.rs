//! Crash-safe file helpers: atomic replacement, folder syncs, and real preallocation.
//!
//! Small metadata files (topic configs, group offsets, checkpoints) are replaced atomically:
//! write a temp file, fsync it, rename it over the old one, fsync the folder. A crash leaves
//! either the old file or the new one, never a torn mix. The temp name ends in `.tmp`, which
//! openers delete as leftovers.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Result, StorageError};

/// The suffix of temp files written by [`atomic_write`]; leftovers are deleted on open.
pub const TMP_SUFFIX: &str = ".tmp";

/// Fsyncs a folder, so that files created, renamed or deleted in it survive a power loss.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| StorageError::io("open folder", dir, e))?;
    f.sync_all()
        .map_err(|e| StorageError::io("fsync folder", dir, e))
}

/// Replaces `path` with `contents` atomically and durably (temp file, fsync, rename, fsync of
/// the folder).
pub fn atomic_write(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().ok_or_else(|| {
        StorageError::io(
            "atomic write",
            path,
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(TMP_SUFFIX);
    let tmp = Path::new(&tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(|e| StorageError::io("create", tmp, e))?;
        f.write_all(contents)
            .map_err(|e| StorageError::io("write", tmp, e))?;
        f.sync_all()
            .map_err(|e| StorageError::io("fsync", tmp, e))?;
        fs::rename(tmp, path).map_err(|e| StorageError::io("rename", path, e))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        // Best effort: a leftover temp file is harmless (openers delete it), so its removal
        // failing must not hide the original error.
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Reserves real disk blocks for `[offset, offset + len)` of `file`, extending its size.
///
/// Unlike `set_len`, which makes a sparse file, this fails up front with `ENOSPC` when the
/// disk is full, instead of a later write through a mapping killing the process with SIGBUS.
pub fn preallocate(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    #[cfg(test)]
    if inject::take_failure() {
        return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
    }
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    loop {
        // fallocate_errno wraps the one unsafe FFI call.
        let rc = fallocate_errno(file.as_raw_fd(), off, len);
        match rc {
            0 => return Ok(()),
            libc::EINTR => continue,
            // Filesystems without fallocate support: posix_fallocate emulates it by writing
            // zeros, which still reserves the blocks.
            libc::EOPNOTSUPP => return posix_fallocate(file, off, len),
            err => return Err(std::io::Error::from_raw_os_error(err)),
        }
    }
}

/// Calls `fallocate(2)` in its default mode and returns 0 or the errno.
fn fallocate_errno(fd: libc::c_int, offset: libc::off_t, len: libc::off_t) -> libc::c_int {
    // SAFETY: fallocate takes a file descriptor and two integers; it reads no memory of ours,
    // so any values are memory-safe. An invalid descriptor yields EBADF, not UB.
    let rc = unsafe { libc::fallocate(fd, 0, offset, len) };
    if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    }
}

fn posix_fallocate(file: &File, offset: libc::off_t, len: libc::off_t) -> std::io::Result<()> {
    // SAFETY: as above, posix_fallocate reads no memory of ours; it returns the errno.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Deletes leftover `.tmp` files in `dir` from an interrupted [`atomic_write`].
pub fn remove_leftover_tmp_files(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| StorageError::io("list folder", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list folder", dir, e))?;
        let path = entry.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(TMP_SUFFIX))
        {
            fs::remove_file(&path).map_err(|e| StorageError::io("remove temp file", &path, e))?;
        }
    }
    Ok(())
}

/// Test-only failure injection for [`preallocate`], per thread (so parallel tests don't see
/// each other's failures). Used where a real full filesystem cannot be mounted.
/// Creates `dir` and any missing ancestors, syncing each new folder's parent so the new
/// entries survive a power loss. Does nothing when `dir` exists.
pub fn create_dir_durable(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut current = dir;
    loop {
        match fs::symlink_metadata(current) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(current),
            Err(e) => return Err(StorageError::io("check folder", current, e)),
        }
        match current.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => current = parent,
            _ => break,
        }
    }
    for new in missing.into_iter().rev() {
        match fs::create_dir(new) {
            Ok(()) => {}
            // Another process or thread made it meanwhile: fine, it exists.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StorageError::io("create folder", new, e)),
        }
        let parent = new
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fsync_dir(parent)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod inject {
    use std::cell::Cell;

    thread_local! {
        static FAIL_AFTER: Cell<Option<u32>> = const { Cell::new(None) };
    }

    /// Makes the calling thread's next preallocation after `n` successful ones fail once
    /// with ENOSPC (as if space ran out, then was freed).
    pub fn fail_preallocate_after(n: Option<u32>) {
        FAIL_AFTER.with(|f| f.set(n));
    }

    pub(super) fn take_failure() -> bool {
        FAIL_AFTER.with(|f| match f.get() {
            Some(0) => {
                f.set(None);
                true
            }
            Some(n) => {
                f.set(Some(n - 1));
                false
            }
            None => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        atomic_write(&p, b"one").expect("write");
        atomic_write(&p, b"two").expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn preallocate_extends_with_real_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let f = File::create(&p).expect("create");
        preallocate(&f, 0, 1 << 20).expect("fallocate");
        let md = f.metadata().expect("metadata");
        assert_eq!(md.len(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            md.blocks() * 512 >= 1 << 20,
            "blocks are reserved, not sparse"
        );
    }
}
