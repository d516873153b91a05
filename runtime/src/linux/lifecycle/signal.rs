//! Signals to container processes, as the shim and the agent send them: any signal number a
//! user may ask for, real-time ones included, with the codes containerd expects.

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::Status;

/// kill(2): nix for the signals it names; real-time signals (SIGRTMIN..SIGRTMAX), which nix's
/// `Signal` cannot express, through libc.
pub fn send(pid: i32, sig: i32) -> nix::Result<()> {
    match Signal::try_from(sig) {
        Ok(s) => kill(Pid::from_raw(pid), s),
        // SAFETY: kill(2) has no memory effects.
        Err(_) => Errno::result(unsafe { libc::kill(pid, sig) }).map(drop),
    }
}

/// Sends `sig` to `pid`: NotFound once it has exited, InvalidArgument for a bad signal.
pub fn signal(pid: i32, sig: u32) -> Result<(), Status> {
    match send(pid, sig as i32) {
        Ok(()) => Ok(()),
        Err(Errno::ESRCH) => Err(Status::NotFound("process already finished".into())),
        Err(Errno::EINVAL) => Err(Status::InvalidArgument(format!("bad signal {sig}"))),
        Err(e) => Err(Status::failed(format!("kill {pid}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_time_signals_and_errors() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // SIGRTMIN+3: nix has no name for it; the default action ends the process.
        signal(pid, (libc::SIGRTMIN() + 3) as u32).unwrap();
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGRTMIN() + 3));
        assert!(matches!(signal(pid, 9), Err(Status::NotFound(_))));
        assert!(matches!(
            signal(std::process::id() as i32, 99),
            Err(Status::InvalidArgument(_))
        ));
    }
}
