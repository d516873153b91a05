//! A child process (the VMM) watched through a pidfd.
//!
//! The pidfd becomes readable when the process exits, whoever reaps it, so a shim whose SIGCHLD
//! handler calls `waitpid(-1)` cannot make us miss the exit (it can only take the status: see
//! [`record_reaped`]). Signals go through `pidfd_send_signal`, so a recycled pid is never hit.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

use super::VmExit;

/// Statuses of our VMM processes that someone else reaped: pid -> exit code (128 + signal
/// for a signal, as the shim's reaper reports them). Only pids of live [`Process`]es are kept.
fn reaped() -> &'static Mutex<HashMap<u32, Option<i32>>> {
    static R: OnceLock<Mutex<HashMap<u32, Option<i32>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// For a process-wide reaper (`waitpid(-1)`, e.g. the shim's SIGCHLD handler): hands over the
/// status of a pid it reaped. `exit_code` is the exit status, or 128 + signal number. Returns
/// true when the pid is a VMM started by this module (then `Vm::wait` reports that status
/// instead of "reaped elsewhere").
pub fn record_reaped(pid: i32, exit_code: i32) -> bool {
    let Ok(pid) = u32::try_from(pid) else {
        return false;
    };
    let mut map = reaped().lock().unwrap_or_else(|e| e.into_inner());
    match map.get_mut(&pid) {
        Some(slot) => {
            *slot = Some(exit_code);
            true
        }
        None => false,
    }
}

#[derive(Debug)]
pub(crate) struct Process {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    exit: Mutex<Option<VmExit>>,
    killed: std::sync::atomic::AtomicBool,
}

impl Process {
    /// Spawns `cmd` and opens its pidfd. When called on the process's main thread the child
    /// also gets `PR_SET_PDEATHSIG(SIGKILL)`: it dies with us even if we are SIGKILLed. (The
    /// parent-death signal follows the *thread* that forked, so it is not set from other
    /// threads, e.g. tokio's blocking pool, whose exit would kill the VM.)
    pub(crate) fn spawn(cmd: &mut Command) -> io::Result<Process> {
        use std::os::unix::process::CommandExt;
        // SAFETY: getpid/gettid have no preconditions.
        let (ppid, on_main) = unsafe {
            let pid = libc::getpid();
            (pid, libc::gettid() == pid)
        };
        if on_main {
            // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::getppid() != ppid {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        // The std Child is dropped without waiting: the pidfd does that job.
        drop(child);
        reaped()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, None);
        let fd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // ESRCH: it already exited and someone reaped it; anything else: we cannot
                // watch it, so do not leave it running.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                reaped()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&pid);
                return Err(io::Error::new(e.kind(), format!("pidfd_open({pid}): {e}")));
            }
        };
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open and unchanged until the
        // AsyncFd is dropped.
        let pidfd =
            match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
                Ok(a) => a,
                Err(e) => {
                    let (fd, e) = e.into_parts();
                    // SAFETY: pidfd_send_signal/waitid on our valid pidfd, null siginfo.
                    unsafe {
                        libc::syscall(
                            libc::SYS_pidfd_send_signal,
                            fd.as_raw_fd(),
                            libc::SIGKILL,
                            std::ptr::null::<libc::siginfo_t>(),
                            0,
                        );
                        let mut info: libc::siginfo_t = std::mem::zeroed();
                        libc::waitid(
                            libc::P_PIDFD,
                            fd.as_raw_fd() as libc::id_t,
                            &mut info,
                            libc::WEXITED,
                        );
                    }
                    reaped()
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&pid);
                    return Err(e);
                }
            };
        Ok(Process {
            pid,
            pidfd,
            exit: Mutex::new(None),
            killed: Default::default(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    fn raw(&self) -> RawFd {
        self.pidfd.get_ref().as_raw_fd()
    }

    /// Sends a signal unless the process has already exited.
    pub(crate) fn signal(&self, sig: i32) -> io::Result<()> {
        if sig == libc::SIGKILL {
            self.killed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        // SAFETY: pidfd_send_signal with a valid pidfd and a null siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.raw(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(()) // already exited
        } else {
            Err(e)
        }
    }

    /// The exit, if the process has exited; reaps it if it is still a zombie.
    pub(crate) fn try_wait(&self) -> io::Result<Option<VmExit>> {
        let mut slot = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = *slot {
            return Ok(Some(e));
        }
        // SAFETY: zeroed siginfo is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our pidfd with a valid siginfo pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.raw() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        let forced = self.killed.load(std::sync::atomic::Ordering::SeqCst);
        let exit = if r == 0 {
            // SAFETY: waitid filled in a SIGCHLD siginfo (or left it zeroed: si_pid 0).
            let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
            if pid == 0 {
                return Ok(None); // still running
            }
            if info.si_code == libc::CLD_EXITED {
                VmExit {
                    code: Some(status),
                    signal: None,
                    forced,
                }
            } else {
                VmExit {
                    code: None,
                    signal: Some(status),
                    forced,
                }
            }
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ECHILD) {
                return Err(e);
            }
            // Someone else reaped it. It has exited only if the pidfd says so.
            if !poll_readable(self.raw(), 0)? {
                return Ok(None);
            }
            let recorded = reaped()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&self.pid)
                .copied()
                .flatten();
            match recorded {
                Some(c) if c > 128 => VmExit {
                    code: None,
                    signal: Some(c - 128),
                    forced,
                },
                Some(c) => VmExit {
                    code: Some(c),
                    signal: None,
                    forced,
                },
                None => VmExit {
                    code: None,
                    signal: None,
                    forced,
                },
            }
        };
        *slot = Some(exit);
        Ok(Some(exit))
    }

    /// Waits for the exit.
    pub(crate) async fn wait(&self) -> io::Result<VmExit> {
        loop {
            if let Some(e) = self.try_wait()? {
                return Ok(e);
            }
            let mut guard = self.pidfd.readable().await?;
            match self.try_wait()? {
                Some(e) => return Ok(e),
                None => guard.clear_ready(),
            }
        }
    }

    /// Blocking wait with a timeout (for Drop, where no runtime may be available).
    pub(crate) fn wait_blocking(&self, timeout: Duration) -> io::Result<Option<VmExit>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_wait()? {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            poll_readable(
                self.raw(),
                left.as_millis().clamp(1, i32::MAX as u128) as i32,
            )?;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !matches!(self.try_wait(), Ok(Some(_))) {
            let _ = self.signal(libc::SIGKILL);
            if !matches!(self.wait_blocking(Duration::from_secs(5)), Ok(Some(_))) {
                log::error!("vm: process {} did not exit after SIGKILL", self.pid);
            }
        }
        reaped()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pid);
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with flags 0; a non-negative return is a new fd we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: r is a fresh descriptor returned by the kernel (pidfds are O_CLOEXEC).
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

fn poll_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_code_and_kill() {
        let p = Process::spawn(Command::new("sh").args(["-c", "exit 7"])).unwrap();
        let e = p.wait().await.unwrap();
        assert_eq!(e.code, Some(7));
        assert!(!e.forced);
        // A second wait returns the same status.
        assert_eq!(p.wait().await.unwrap(), e);

        let p = Process::spawn(Command::new("sleep").arg("100")).unwrap();
        assert!(p.try_wait().unwrap().is_none());
        p.signal(libc::SIGKILL).unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), p.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.signal, Some(libc::SIGKILL));
        assert!(e.forced);
        // Signalling an exited process is not an error.
        p.signal(libc::SIGTERM).unwrap();
    }

    #[tokio::test]
    async fn reaped_elsewhere() {
        let p = Process::spawn(Command::new("sh").args(["-c", "exit 3"])).unwrap();
        let pid = p.pid() as i32;
        // Play the shim's reaper.
        let mut st = 0;
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        assert_eq!(r, pid);
        assert!(record_reaped(pid, libc::WEXITSTATUS(st)));
        let e = tokio::time::timeout(Duration::from_secs(5), p.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.code, Some(3));
        assert!(!record_reaped(999_999_999, 0));
    }

    #[test]
    fn drop_kills() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pid = rt.block_on(async {
            let p = Process::spawn(Command::new("sleep").arg("100")).unwrap();
            let pid = p.pid();
            drop(p);
            pid
        });
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
