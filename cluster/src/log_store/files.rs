//! The files of a group's Raft log: `log`, then `log.1`, `log.2`, ... in order of writing.
//!
//! Frames are appended to the newest file; once it reaches its size limit the writer seals
//! it (fsynced) and starts the next, whose first frame is the purge point of the moment (so
//! each file can be replayed without those before it). A sealed file is deleted once every
//! entry it appended is purged, after that purge is fsynced. Opening replays the files in
//! order; only the newest may end in a torn frame (the others were fsynced when sealed).
//!
//! Why files and not one file rewritten: the single file had to be compacted (the live
//! entries copied into a new file) once purged frames dominated it, and under a full produce
//! load the live tail was a thousand batches, 100 MB and more, copied and fsynced on the
//! writer thread while every append waited: a stall of 0.3-0.6 s every few seconds on each
//! replica (BENCHMARKS.md, "RF 3: the Raft log in files"). Deleting a file copies nothing.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::RaftLogId;

use super::resident::{Mem, Pos};
use super::{next_frame, Op, LOG_FILE};

/// The path of file `seq` of the log in `dir`: `log` for the first, `log.N` after it.
pub(super) fn path(dir: &Path, seq: u64) -> PathBuf {
    match seq {
        0 => dir.join(LOG_FILE),
        n => dir.join(format!("{LOG_FILE}.{n}")),
    }
}

/// The sequence numbers of the log files in `dir`, in order.
fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let name = item?.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == LOG_FILE {
            seqs.push(0);
        } else if let Some(n) = name
            .strip_prefix(LOG_FILE)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|n| n.parse::<u64>().ok())
        {
            seqs.push(n);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// A sealed file: written whole and fsynced, no longer appended to.
pub(super) struct Sealed {
    pub(super) seq: u64,
    /// The highest index an entry appended in this file had (`None`: no entries).
    pub(super) max_index: Option<u64>,
}

/// What a replay found: the newest file, open for appends, and the sealed ones before it.
pub(super) struct Replayed {
    pub(super) file: File,
    pub(super) reader: Arc<File>,
    pub(super) seq: u64,
    pub(super) file_bytes: u64,
    pub(super) max_index: Option<u64>,
    pub(super) sealed: VecDeque<Sealed>,
}

/// Replays the log files in `dir` into `mem`, in order, and opens the last one kept for
/// appends (creating `log` in an empty folder). The log ends at the first torn frame (short,
/// or a bad CRC), as a crash mid-append leaves it, whichever file it is in: the file is cut
/// there and any later ones deleted. A sealed file can end torn only when nothing after it
/// was reported durable (any fsync the writer waits for syncs the sealed files first), so
/// this is the single file's rule: what follows a tear was never promised.
pub(super) fn replay(dir: &Path, mem: &mut Mem) -> io::Result<Replayed> {
    // A rewrite by an earlier version, interrupted before its rename: never part of the log.
    match std::fs::remove_file(dir.join(format!("{LOG_FILE}.tmp"))) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut seqs = list(dir)?;
    if seqs.is_empty() {
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(path(dir, 0))?;
        seqs.push(0);
    }
    let mut sealed = VecDeque::new();
    for (i, &seq) in seqs.iter().enumerate() {
        let (reader, len) = open_reader(dir, seq)?;
        let (kept, max_index) = replay_file(&reader, mem)?;
        let later = &seqs[i + 1..];
        if kept == len && !later.is_empty() {
            sealed.push_back(Sealed { seq, max_index });
            continue;
        }
        let file = OpenOptions::new().append(true).open(path(dir, seq))?;
        if kept < len {
            tracing::warn!(
                path = %path(dir, seq).display(),
                kept,
                cut = len - kept,
                later_files = later.len(),
                "cutting a torn tail off the Raft log"
            );
            file.set_len(kept)?;
            file.sync_all()?;
            for &gone in later {
                std::fs::remove_file(path(dir, gone))?;
            }
        }
        return Ok(Replayed {
            file,
            reader,
            seq,
            file_bytes: kept,
            max_index,
            sealed,
        });
    }
    Err(io::Error::other(format!(
        "no Raft log file in {}",
        dir.display()
    )))
}

fn open_reader(dir: &Path, seq: u64) -> io::Result<(Arc<File>, u64)> {
    let reader = File::open(path(dir, seq))?;
    let len = reader.metadata()?.len();
    Ok((Arc::new(reader), len))
}

/// Replays one file's frames into `mem`: how many bytes held whole frames, and the highest
/// index appended. Streamed frame by frame (evicting as it goes): no copy of the file in
/// memory.
fn replay_file(reader: &Arc<File>, mem: &mut Mem) -> io::Result<(u64, Option<u64>)> {
    let mut stream = BufReader::with_capacity(1 << 20, &**reader);
    let mut pos = 0u64;
    let mut max_index = None;
    while let Some((op, len)) = next_frame(&mut stream)? {
        if let Op::Append(entries) = &op {
            max_index = entries
                .iter()
                .map(|e| e.get_log_id().index)
                .chain(max_index)
                .max();
        }
        let at = Pos {
            file: reader.clone(),
            offset: pos,
            len,
        };
        mem.apply(op, Some(at));
        pos += u64::from(len);
    }
    Ok((pos, max_index))
}

/// Fsyncs a folder, so a created or renamed file in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `dir/name` atomically and durably.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}
