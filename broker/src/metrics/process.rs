//! The process's resident memory and open files, read from `/proc/self` at scrape time
//! (Linux; elsewhere the figures are absent).

use std::fs;

/// What `/proc/self` says about this process now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessFigures {
    /// Resident set size in bytes (`VmRSS`), if readable.
    pub resident_bytes: Option<u64>,
    /// Open file descriptors (entries of `/proc/self/fd`), if readable.
    pub open_fds: Option<u64>,
}

/// Reads the figures; a figure that cannot be read is `None`, never an error. Blocking file
/// reads: call from a blocking thread.
pub fn read() -> ProcessFigures {
    ProcessFigures {
        resident_bytes: fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| vm_rss_bytes(&s)),
        open_fds: fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64),
    }
}

/// The `VmRSS:  1234 kB` line of `/proc/self/status`, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\trill\nVmPeak:\t  9 kB\nVmRSS:\t   2048 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_bytes(status), Some(2048 * 1024));
        assert_eq!(vm_rss_bytes("Name: x\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let figures = read();
        assert!(figures.resident_bytes.is_some_and(|b| b > 0));
        assert!(figures.open_fds.is_some_and(|n| n > 0));
    }
}
