//! The parent's side of the setup handshake with a process forked by the zygote, shared by
//! the shim (host containers) and the agent (guest containers):
//!
//! zygote request → `Pid` → (cgroup placement, id maps) `Go` → [`Hooks` → `Go`]* → [`Pty`] →
//! `Ready`; later `Start` → EOF (exec'd) or `Error`.

use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use super::cgroups::Cgroup;
use super::error::{Error, Result};
use super::request::SpawnRequest;
use super::sync::{Channel, Msg};
use super::zygote::Zygote;

/// What the caller does at the handshake's steps.
pub trait SetupHooks {
    /// The process exists: record it where the reaper looks for it. Returns its exit status
    /// if the reaper already saw it exit.
    fn register(&mut self, pid: i32) -> Option<i32>;
    /// Setup failed after `register`; the process is being killed.
    fn unregister(&mut self, _pid: i32) {}
    /// The container is ready for its prestart/createRuntime hooks (runtime namespaces).
    fn runtime_hooks(&mut self, _pid: i32) -> Result<()> {
        Ok(())
    }
}

/// Placement done between `Pid` and `Go`.
#[derive(Default)]
pub struct Placement<'a> {
    pub cgroup: Option<&'a Cgroup>,
    /// Resources to apply to `cgroup` once the process is in it: a systemd scope's cgroup
    /// only exists from then on (and takes them as unit properties too).
    pub resources: Option<&'a LinuxResources>,
    /// uid_map and gid_map contents for a new user namespace.
    pub id_maps: Option<(String, String)>,
}

/// A process set up and waiting for `Start`.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub sync: Channel,
    pub pty_master: Option<OwnedFd>,
}

fn from_child(message: String, invalid: bool) -> Error {
    if invalid {
        Error::ChildRejected(message)
    } else {
        Error::Child(message)
    }
}

/// Spawns `req` through the zygote (child stdio `fds`) and runs the handshake up to `Ready`.
/// On failure after the pid is known, the process is killed and unregistered.
pub fn spawn(
    zygote: &Zygote,
    req: &SpawnRequest,
    fds: &[RawFd],
    place: Placement<'_>,
    timeout: Duration,
    hooks: &mut dyn SetupHooks,
) -> Result<Spawned> {
    let (ours, theirs) = Channel::pair()?;
    ours.set_timeout(Some(timeout))?;
    zygote.spawn(req, &theirs, fds)?;
    drop(theirs);
    let pid = match ours.recv::<Msg>()? {
        Some((Msg::Pid(pid), _)) => pid,
        Some((Msg::Error { message, invalid }, _)) => return Err(from_child(message, invalid)),
        Some((m, _)) => return Err(Error::Child(format!("unexpected setup message {m:?}"))),
        None => {
            return Err(Error::Child(
                "container process setup failed before it started".into(),
            ))
        }
    };
    if let Some(code) = hooks.register(pid) {
        return Err(Error::Child(format!(
            "process exited during setup with status {code}"
        )));
    }
    match handshake(pid, &ours, place, hooks) {
        Ok(pty_master) => Ok(Spawned {
            pid,
            sync: ours,
            pty_master,
        }),
        Err(e) => {
            hooks.unregister(pid);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            Err(e)
        }
    }
}

fn handshake(
    pid: i32,
    ours: &Channel,
    place: Placement<'_>,
    hooks: &mut dyn SetupHooks,
) -> Result<Option<OwnedFd>> {
    if let Some(cg) = place.cgroup {
        cg.enter(pid, place.resources)?;
        if let Some(res) = place.resources {
            cg.apply(res, false)?;
        }
    }
    if let Some((uid, gid)) = place.id_maps {
        std::fs::write(format!("/proc/{pid}/uid_map"), uid)
            .map_err(|e| Error::InvalidSpec(format!("linux.uidMappings: {e}")))?;
        std::fs::write(format!("/proc/{pid}/gid_map"), gid)
            .map_err(|e| Error::InvalidSpec(format!("linux.gidMappings: {e}")))?;
    }
    ours.send(&Msg::Go, &[])?;
    let mut master = None;
    loop {
        match ours.recv::<Msg>()? {
            Some((Msg::Pty, mut fds)) if !fds.is_empty() => master = Some(fds.remove(0)),
            Some((Msg::Hooks, _)) => {
                hooks.runtime_hooks(pid)?;
                ours.send(&Msg::Go, &[])?;
            }
            Some((Msg::Ready, _)) => return Ok(master),
            Some((Msg::Error { message, invalid }, _)) => return Err(from_child(message, invalid)),
            Some((m, _)) => return Err(Error::Child(format!("unexpected setup message {m:?}"))),
            None => return Err(Error::Child("container process died during setup".into())),
        }
    }
}

/// Lets a set-up process exec and waits until it has (EOF) or failed.
pub fn release(sync: &Channel) -> Result<()> {
    sync.send(&Msg::Start, &[])?;
    match sync.recv::<Msg>()? {
        None => Ok(()),
        Some((Msg::Error { message, invalid }, _)) => Err(from_child(message, invalid)),
        Some((m, _)) => Err(Error::Child(format!("unexpected message {m:?}"))),
    }
}
