//! Helper commands (iproute2's `ip` and `tc`) run from the shim. The shim reaps every child
//! in its SIGCHLD handler (`waitpid(-1)`), so `Command::output` can lose the race for a
//! child's status (ECHILD). Commands run here are registered before the reaper can see them,
//! and the reaper hands their statuses back through [`record_exit`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

fn pending() -> std::sync::MutexGuard<'static, HashMap<u32, Option<i32>>> {
    static P: OnceLock<Mutex<HashMap<u32, Option<i32>>>> = OnceLock::new();
    P.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// For the reaper: the status of a pid it reaped; true when it was one of our commands.
pub fn record_exit(pid: i32, code: i32) -> bool {
    let Ok(pid) = u32::try_from(pid) else {
        return false;
    };
    match pending().get_mut(&pid) {
        Some(slot) => {
            *slot = Some(code);
            true
        }
        None => false,
    }
}

/// Runs `cmd` to completion: (exit code or 128 + signal, stdout, stderr).
pub fn output(cmd: &mut Command) -> io::Result<(i32, Vec<u8>, Vec<u8>)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Registered under the lock the reaper needs to report it: it cannot be missed.
    let mut child = {
        let mut p = pending();
        let child = cmd.spawn()?;
        p.insert(child.id(), None);
        child
    };
    let pid = child.id();
    let res = (|| {
        let mut err_pipe = child.stderr.take();
        let errs = std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(e) = err_pipe.as_mut() {
                let _ = e.read_to_end(&mut v);
            }
            v
        });
        let mut out = Vec::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_end(&mut out)?;
        }
        let err = errs.join().unwrap_or_default();
        let code = match child.wait() {
            Ok(st) => st.code().unwrap_or(128 + st.signal().unwrap_or(0)),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    if let Some(Some(c)) = pending().get(&pid) {
                        break *c;
                    }
                    if Instant::now() > deadline {
                        return Err(io::Error::other(format!(
                            "pid {pid}: reaped elsewhere, status never reported"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Err(e) => return Err(e),
        };
        Ok((code, out, err))
    })();
    pending().remove(&pid);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status() {
        let (code, out, err) =
            output(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"])).unwrap();
        assert_eq!(
            (code, &out[..], &err[..]),
            (3, &b"out\n"[..], &b"err\n"[..])
        );
    }

    #[test]
    fn status_handed_over_by_another_reaper() {
        // A reaper thread that takes the children's statuses first, as the shim's does.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let reaper = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::SeqCst) {
                // Only our commands' children: other tests run in parallel in this process.
                let pids: Vec<u32> = pending().keys().copied().collect();
                for pid in pids {
                    let mut st = 0;
                    // SAFETY: waitpid with a valid status pointer.
                    let pid = unsafe { libc::waitpid(pid as i32, &mut st, libc::WNOHANG) };
                    if pid > 0 {
                        let code = if libc::WIFEXITED(st) {
                            libc::WEXITSTATUS(st)
                        } else {
                            128 + libc::WTERMSIG(st)
                        };
                        record_exit(pid, code);
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        for _ in 0..20 {
            let (code, out, _) = output(Command::new("sh").args(["-c", "echo x; exit 7"])).unwrap();
            assert_eq!((code, &out[..]), (7, &b"x\n"[..]));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        reaper.join().unwrap();
    }
}
