//! The run folder's lock (`.lock`): one writer per run folder; a lock whose process is gone is
//! taken over.

use std::io::Write;
use std::path::Path;

use crate::error::{AsaError, Result};

/// Whether a process with this id exists (on this machine).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Who held a run's lock, as its lock file says: (pid, host, start time in Unix seconds).
fn parse_lock_text(text: &str) -> Option<(i32, String, u64)> {
    let mut pid = None;
    let (mut host, mut started) = (String::from("?"), 0u64);
    for line in text.lines() {
        match line.split_once('=') {
            Some(("pid", v)) => pid = v.trim().parse().ok(),
            Some(("host", v)) => host = v.trim().to_string(),
            Some(("started_unix", v)) => started = v.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    pid.map(|p| (p, host, started))
}

fn describe_holder(pid: i32, host: &str, started: u64) -> String {
    let ago = unix_now().saturating_sub(started);
    if started == 0 {
        format!("pid {pid} on host {host}")
    } else {
        format!("pid {pid} on host {host}, started {ago} s ago")
    }
}

/// An exclusive lock on a run folder, held for the life of a training process.
///
/// `<run>/.lock` is locked with `flock(LOCK_EX | LOCK_NB)`: the kernel releases an advisory
/// lock when its process dies, so a crashed or killed run never blocks the next one. The file's
/// text (pid, host, start time) only serves the messages: a second process names the holder, and
/// a process that finds the text of a dead holder says it takes over a stale lock. The file is
/// never removed (removing a locked file lets two processes lock two different files); on drop
/// its text is cleared and the lock released.
pub struct RunLock {
    file: std::fs::File,
}

impl RunLock {
    /// Locks `<dir>/.lock` (creating `dir`). Errors when another process holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek};
        use std::os::unix::io::AsRawFd;
        std::fs::create_dir_all(dir).map_err(|e| AsaError::io(dir, e))?;
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| AsaError::io(&path, e))?;
        // SAFETY: flock on a file descriptor we own; LOCK_NB makes it return at once.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(AsaError::io(&path, err));
            }
            let who = parse_lock_text(&text)
                .map(|(p, h, s)| describe_holder(p, &h, s))
                .unwrap_or_else(|| "another process".into());
            return Err(AsaError::Other(format!(
                "run folder {} is in use by another asa process ({who}); wait for it to finish or stop it (lock file {})",
                dir.display(),
                path.display()
            )));
        }
        if let Some((pid, host, started)) = parse_lock_text(&text) {
            let me = std::process::id() as i32;
            if pid != me {
                let why = if host != host_name() {
                    "it was taken on another host and is not held now"
                } else if pid_alive(pid) {
                    "that pid is alive but does not hold the lock (a reused pid, or a copied run folder)"
                } else {
                    "that process is gone (killed or crashed)"
                };
                eprintln!(
                    "note: {}: taking over the stale lock of {}: {why}",
                    dir.display(),
                    describe_holder(pid, &host, started)
                );
            }
        }
        let text = format!(
            "pid={}\nhost={}\nstarted_unix={}\n",
            std::process::id(),
            host_name(),
            unix_now()
        );
        let written = (|| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(text.as_bytes())?;
            file.sync_data()
        })();
        written.map_err(|e| AsaError::io(&path, e))?;
        Ok(RunLock { file })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // cleared text means "released cleanly"; the flock itself goes with the descriptor
        let _ = self.file.set_len(0);
    }
}
