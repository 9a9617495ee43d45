//! Exclusive locks on the directories a command writes (a stage's run directory, a dataset
//! being preprocessed): an advisory `flock` on `{dir}/.lock`, held for the life of the command.
//!
//! The kernel drops the lock when its process dies, however it dies, so a lock is never
//! stale: a second writer fails at once with the holder's pid, host and start time (written
//! into the lock file), and a lock file left by a dead process is taken over with a warning.
//! `flock` is local to a host's kernel: on a network filesystem shared by several nodes, the
//! file still names the holder, but only runs on one node exclude each other.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The lock's file inside the locked directory.
pub const LOCK_FILE: &str = ".lock";

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    pub path: PathBuf,
}

impl DirLock {
    /// Locks `dir` (created if missing) for `what` (e.g. `sft-warmup`), or fails naming the holder.
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!("{} is in use by another run ({}): wait for it to end, or choose another directory", dir.display(), holder(&path));
            }
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        if !previous.trim().is_empty() {
            eprintln!("warning: taking over the lock of {} left by a process that is gone ({})", dir.display(), describe(&previous));
        }
        let me = format!("pid {}\nhost {}\nstarted {}\ncommand {what}\n", std::process::id(), hostname(), now_utc());
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(me.as_bytes()))
            .and_then(|_| file.sync_data())
            .with_context(|| format!("cannot write the lock file {}", path.display()))?;
        Ok(DirLock { _file: file, path })
    }
}

impl Drop for DirLock {
    /// A clean exit empties the lock file, so the next run does not warn about a dead holder.
    fn drop(&mut self) {
        let _ = self._file.set_len(0);
    }
}

/// Who holds the lock at `path`, as its file says.
fn holder(path: &Path) -> String {
    std::fs::read_to_string(path).map(|t| describe(&t)).unwrap_or_else(|_| "holder unknown".to_string())
}

/// `pid 12 on host h since 2026-12-02T04:00:00Z (sft-warmup)` from a lock file's text.
fn describe(text: &str) -> String {
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string())).unwrap_or_else(|| "?".into());
    format!("pid {} on host {} since {} ({})", field("pid "), field("host "), field("started "), field("command "))
}

fn now_utc() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(|| "?".into(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { "unknown".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holder_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "sft-warmup").unwrap();
        let e = format!("{:#}", DirLock::acquire(dir.path(), "grpo-train").unwrap_err());
        assert!(e.contains("in use by another run") && e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains("sft-warmup") && e.contains("host "), "{e}");
        drop(first);
        // Released: the next writer gets it without a warning about a dead holder.
        let again = DirLock::acquire(dir.path(), "grpo-train").unwrap();
        assert!(std::fs::read_to_string(&again.path).unwrap().contains("grpo-train"));
    }

    #[test]
    fn a_lock_left_by_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // What a killed holder leaves: the file with its details, and no flock (the kernel
        // released it with the process).
        std::fs::write(dir.path().join(LOCK_FILE), "pid 999999\nhost elsewhere\nstarted 2026-01-01T00:00:00Z\ncommand sft-warmup\n")
            .unwrap();
        let lock = DirLock::acquire(dir.path(), "sft-warmup").unwrap();
        let text = std::fs::read_to_string(&lock.path).unwrap();
        assert!(text.contains(&format!("pid {}", std::process::id())) && !text.contains("999999"), "{text}");
    }
}
