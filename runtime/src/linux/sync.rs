//! Framed messages with file descriptors over a `SOCK_SEQPACKET` socket pair.
//!
//! Used between the shim and the zygote (spawn requests) and between the shim and each
//! container process (pid, setup done, start, errors, pty master).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::time::TimeVal;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::error::{Error, IoContext, Result};

/// Largest message we accept: a spawn request carries a whole OCI spec.
const MAX_MSG: usize = 1 << 20;

/// Messages between the shim and a container process.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Msg {
    /// Intermediate -> shim: the container process exists with this (host) pid.
    Pid(i32),
    /// Shim -> child: cgroup placement and id mappings are done, continue setup.
    Go,
    /// Child -> shim: namespaces and mounts are ready: run prestart/createRuntime hooks,
    /// then answer `Go`.
    Hooks,
    /// Child -> shim: the pty master follows as an fd.
    Pty,
    /// Child -> shim: setup finished, waiting for `Start`.
    Ready,
    /// Shim -> child: exec the process now.
    Start,
    /// Child -> shim: setup or exec failed. `invalid` marks a spec problem.
    Error { message: String, invalid: bool },
}

impl Msg {
    /// A setup failure as the child reports it; a spec problem is marked so the parent
    /// answers InvalidArgument, not Internal.
    pub fn failure(e: &Error) -> Msg {
        Msg::Error {
            message: e.to_string(),
            invalid: matches!(e, Error::InvalidSpec(_)),
        }
    }
}

/// One end of a seqpacket socket pair.
#[derive(Debug)]
pub struct Channel(OwnedFd);

impl Channel {
    pub fn pair() -> Result<(Channel, Channel)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .ctx(|| "socketpair".into())?;
        for fd in [&a, &b] {
            // Spawn requests carry a whole spec; the default buffer may be too small.
            let _ = setsockopt(fd, sockopt::SndBuf, &MAX_MSG);
            let _ = setsockopt(fd, sockopt::RcvBuf, &MAX_MSG);
        }
        Ok((Channel(a), Channel(b)))
    }

    /// # Safety
    /// `fd` must be an open seqpacket socket owned by the caller.
    pub unsafe fn from_raw(fd: RawFd) -> Channel {
        // SAFETY: guaranteed by the caller.
        Channel(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Wraps a received end (the zygote gets its children's ends as fds).
    pub(crate) fn from_owned(fd: OwnedFd) -> Channel {
        Channel(fd)
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.0
    }

    pub fn set_timeout(&self, d: Option<Duration>) -> Result<()> {
        let tv = match d {
            Some(d) => TimeVal::new(d.as_secs() as _, d.subsec_micros() as _),
            None => TimeVal::new(0, 0),
        };
        setsockopt(&self.0, sockopt::ReceiveTimeout, &tv).ctx(|| "set socket timeout".into())
    }

    pub fn send<T: Serialize>(&self, msg: &T, fds: &[RawFd]) -> Result<()> {
        let buf = serde_json::to_vec(msg)
            .map_err(|e| super::Error::Child(format!("encode message: {e}")))?;
        let iov = [IoSlice::new(&buf)];
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
        loop {
            match sendmsg::<()>(
                self.0.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => {
                    r.ctx(|| "send message".into())?;
                    return Ok(());
                }
            }
        }
    }

    /// Receives one message. `Ok(None)` means the peer closed its end.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<Option<(T, Vec<OwnedFd>)>> {
        // Size the buffer to the message: a fixed 1 MiB buffer per call stayed resident in
        // the malloc heap of every shim and zygote.
        let size = loop {
            let mut probe = [0u8; 1];
            // SAFETY: recv(2) into a live 1-byte buffer; MSG_PEEK|MSG_TRUNC returns the
            // full length of the next packet without consuming it.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    probe.as_mut_ptr().cast(),
                    probe.len(),
                    libc::MSG_PEEK | libc::MSG_TRUNC,
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(super::Error::io("receive message", e));
            }
        };
        let mut buf = vec![0u8; size.clamp(1, MAX_MSG)];
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let (n, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(super::Error::sys("receive message", e)),
                Ok(msg) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(raw) = c {
                                for fd in raw {
                                    // SAFETY: the kernel just installed these descriptors
                                    // in our table; nobody else owns them.
                                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                                }
                            }
                        }
                    }
                    break (msg.bytes, fds);
                }
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let msg = serde_json::from_slice(&buf[..n])
            .map_err(|e| super::Error::Child(format!("decode message: {e}")))?;
        Ok(Some((msg, fds)))
    }
}

/// Sets a terminal's window size (through its pty master).
pub fn resize_pty(master: &impl AsRawFd, width: u32, height: u32) -> Result<()> {
    let ws = libc::winsize {
        ws_row: height.min(u16::MAX as u32) as u16,
        ws_col: width.min(u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize struct we pass.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(Error::io("resize pty", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_fd() {
        let (a, b) = Channel::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        a.send(&Msg::Pid(42), &[file.as_raw_fd()]).unwrap();
        let (m, fds) = b.recv::<Msg>().unwrap().unwrap();
        assert_eq!(m, Msg::Pid(42));
        assert_eq!(fds.len(), 1);
        drop(a);
        assert!(b.recv::<Msg>().unwrap().is_none());
    }

    #[test]
    fn timeout_is_an_error_not_a_hang() {
        let (_a, b) = Channel::pair().unwrap();
        b.set_timeout(Some(Duration::from_millis(20))).unwrap();
        assert!(b.recv::<Msg>().is_err());
    }
}
