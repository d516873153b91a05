//! The fork server. Forked by the shim before its async runtime starts, it stays
//! single-threaded, so forking from it is safe; see the module docs in `linux`.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;

use nix::sched::CloneFlags;
use nix::unistd::{fork, ForkResult, Pid};
use oci_spec::runtime::{LinuxNamespaceType, Process};

use super::error::{Error, IoContext, Result};
// Callers name the request types through the zygote that carries them.
pub use super::request::{SpawnKind, SpawnRequest};
use super::spec::{ns_flag, ns_proc_name, NsPlan};
use super::sync::{Channel, Msg};

/// Handle to the zygote process.
#[derive(Debug)]
pub struct Zygote {
    chan: Mutex<Channel>,
    pid: Pid,
}

impl Zygote {
    /// Forks the zygote.
    ///
    /// # Safety
    /// The calling process must be single-threaded: the child continues to run Rust code
    /// (allocating, locking) after fork.
    pub unsafe fn start() -> Result<Zygote> {
        let (ours, theirs) = Channel::pair()?;
        // SAFETY: the caller guarantees we are single-threaded, so the child inherits no
        // lock held by another thread.
        match unsafe { fork() }.ctx(|| "fork zygote".into())? {
            ForkResult::Child => {
                drop(ours);
                zygote_main(theirs)
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                Ok(Zygote {
                    chan: Mutex::new(ours),
                    pid: child,
                })
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Stops the zygote and reaps it; the shim calls this on its way out.
    pub fn stop(&self) {
        let chan = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let _ = nix::sys::socket::shutdown(chan.fd(), nix::sys::socket::Shutdown::Both);
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }

    /// Runs hooks from a zygote child (in the runtime's namespaces) and waits for them.
    pub fn run_hooks(
        &self,
        hooks: Vec<oci_spec::runtime::Hook>,
        state: String,
        phase: &str,
    ) -> Result<()> {
        if hooks.is_empty() {
            return Ok(());
        }
        let (ours, theirs) = Channel::pair()?;
        let req = SpawnRequest {
            kind: SpawnKind::Hooks {
                hooks,
                state,
                phase: phase.to_string(),
            },
            process: Process::default(),
            terminal: false,
            seccomp: None,
        };
        self.spawn(&req, &theirs, &[])?;
        drop(theirs);
        match ours.recv::<Msg>()? {
            Some((Msg::Ready, _)) => Ok(()),
            Some((Msg::Error { message, .. }, _)) => Err(Error::Child(message)),
            _ => Err(Error::Child(format!("{phase} hooks: runner died"))),
        }
    }

    /// Hands a spawn request to the zygote. The result arrives on `sync`'s peer.
    pub fn spawn(&self, req: &SpawnRequest, child_sync: &Channel, stdio: &[RawFd]) -> Result<()> {
        let mut fds = vec![child_sync.fd()];
        fds.extend_from_slice(stdio);
        let chan = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        chan.send(req, &fds)
    }
}

fn zygote_main(chan: Channel) -> ! {
    // SAFETY: plain syscalls on our own process; no memory is shared with anyone.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        // Nothing of the shim's (its stdout pipe to `shim start` above all) may stay open
        // here, or containerd would wait for an EOF that never comes.
        let keep = chan.fd() as u32;
        if keep > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, keep - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32);
        libc::prctl(libc::PR_SET_NAME, c"janus-zygote".as_ptr());
        // Intermediates are reaped by the kernel: the zygote never waits, so a slow hook
        // in one request does not hold up the next.
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    loop {
        let (req, mut fds) = match chan.recv::<SpawnRequest>() {
            Ok(Some(r)) => r,
            Ok(None) => std::process::exit(0),
            Err(_) => continue,
        };
        if fds.is_empty() {
            continue;
        }
        // SAFETY: single-threaded process.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // SAFETY: restoring the default disposition; our children must be waitable.
                unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
                let sync = Channel::from_owned(fds.remove(0));
                drop(chan);
                intermediate(req, sync, fds)
            }
            Ok(ForkResult::Parent { .. }) => {
                drop(fds);
            }
            Err(e) => {
                let sync = Channel::from_owned(fds.remove(0));
                let _ = sync.send(
                    &Msg::Error {
                        message: format!("fork: {e}"),
                        invalid: false,
                    },
                    &[],
                );
            }
        }
    }
}

fn intermediate(req: SpawnRequest, sync: Channel, stdio: Vec<OwnedFd>) -> ! {
    if let SpawnKind::Hooks {
        hooks,
        state,
        phase,
    } = &req.kind
    {
        let msg = match super::hooks::run_all(hooks, state, phase) {
            Ok(()) => Msg::Ready,
            Err(e) => Msg::Error {
                message: e.to_string(),
                invalid: false,
            },
        };
        let _ = sync.send(&msg, &[]);
        std::process::exit(0)
    }
    match run_intermediate(req, &sync, stdio) {
        Ok(pid) => {
            let _ = sync.send(&Msg::Pid(pid), &[]);
            std::process::exit(0)
        }
        Err(e) => {
            let _ = sync.send(&Msg::failure(&e), &[]);
            std::process::exit(1)
        }
    }
}

fn open_ns(path: &std::path::Path) -> Result<OwnedFd> {
    let f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::InvalidSpec(format!(
            "linux.namespaces: {} does not exist",
            path.display()
        )),
        _ => Error::io(format!("open namespace {}", path.display()), e),
    })?;
    Ok(f.into())
}

fn setns(fd: &OwnedFd, t: LinuxNamespaceType) -> Result<()> {
    nix::sched::setns(fd, ns_flag(t)).ctx(|| format!("setns {}", ns_proc_name(t)))
}

/// Clones like fork(2), with namespace flags. Returns 0 in the child.
fn clone_process(flags: CloneFlags) -> Result<i32> {
    // SAFETY: with a NULL stack, clone(2) behaves as fork(2): the child gets a copy-on-write
    // copy of this single-threaded process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags.bits() | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r < 0 {
        return Err(Error::io("clone", std::io::Error::last_os_error()));
    }
    Ok(r as i32)
}

fn run_intermediate(req: SpawnRequest, sync: &Channel, stdio: Vec<OwnedFd>) -> Result<i32> {
    match &req.kind {
        SpawnKind::Init { spec, .. } => {
            let plan = NsPlan::from_spec(spec)?;
            let mut joins = Vec::new();
            for (t, p) in &plan.join {
                joins.push((*t, open_ns(p)?));
            }
            // user and pid must be entered before the clone: pid only applies to children,
            // and the user namespace owns the namespaces created after it.
            for (t, fd) in &joins {
                if *t == LinuxNamespaceType::User {
                    setns(fd, *t)?;
                }
            }
            for (t, fd) in &joins {
                if *t == LinuxNamespaceType::Pid {
                    setns(fd, *t)?;
                }
            }
            let rest: Vec<_> = joins
                .into_iter()
                .filter(|(t, _)| !matches!(t, LinuxNamespaceType::User | LinuxNamespaceType::Pid))
                .collect();
            let pid = clone_process(plan.clone_flags())?;
            if pid == 0 {
                super::init::run_init(req, sync, stdio, rest, plan);
            }
            Ok(pid)
        }
        SpawnKind::Hooks { .. } => Err(Error::Child("hooks are not a process".into())),
        SpawnKind::Exec {
            init_pid,
            namespaces,
        } => {
            let mut fds = Vec::new();
            for t in namespaces {
                let p = PathBuf::from(format!("/proc/{init_pid}/ns/{}", ns_proc_name(*t)));
                fds.push((
                    *t,
                    open_ns(&p).map_err(|_| {
                        Error::NotFound(format!("container process {init_pid} is gone"))
                    })?,
                ));
            }
            let same = |t: &str| {
                let a = std::fs::metadata(format!("/proc/self/ns/{t}"));
                let b = std::fs::metadata(format!("/proc/{init_pid}/ns/{t}"));
                use std::os::unix::fs::MetadataExt;
                matches!((a, b), (Ok(a), Ok(b)) if a.ino() == b.ino())
            };
            // Order matters: the user namespace first (it grants the rights for the rest),
            // the mount namespace last (it changes how /proc paths resolve).
            let order = [
                LinuxNamespaceType::User,
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Uts,
                LinuxNamespaceType::Network,
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Cgroup,
                LinuxNamespaceType::Mount,
            ];
            for t in order {
                if let Some((_, fd)) = fds.iter().find(|(x, _)| *x == t) {
                    if same(ns_proc_name(t)) {
                        continue;
                    }
                    setns(fd, t)?;
                }
            }
            drop(fds);
            let pid = clone_process(CloneFlags::empty())?;
            if pid == 0 {
                super::init::run_exec(req, sync, stdio);
            }
            Ok(pid)
        }
    }
}
