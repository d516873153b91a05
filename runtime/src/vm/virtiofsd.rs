//! virtiofsd, the vhost-user backend behind the guest's virtio-fs: the one way it is started,
//! by the shim and by the tests alike, so both run it with the same options.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::error::IoContext;
use super::{Error, Result};
use crate::linux::cgroups::Cgroup;

/// Where distributions put virtiofsd, in the order they are tried: the Rust virtiofsd's
/// package (Debian 13+, Fedora, Ubuntu 24.04+), QEMU's former C daemon (Debian 12's QEMU 7.2
/// ships it), `cargo install virtiofsd`'s usual places.
pub const SEARCH: &[&str] = &[
    "/usr/libexec/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
    "/usr/local/bin/virtiofsd",
    "/root/.cargo/bin/virtiofsd",
];
/// The descriptor number virtiofsd gets its listening socket on (`--fd`).
const LISTEN_FD: i32 = 3;

/// virtiofsd's binary: `configured` (the Janus config's `vm.virtiofsd`), else the first of
/// [`SEARCH`], else `virtiofsd` on PATH; or [`Error::MissingAsset`] saying how to get it.
pub fn find(configured: Option<&Path>) -> Result<PathBuf> {
    let hint = "apt-get install virtiofsd (Debian 13+) or qemu-system-x86 (Debian 12's QEMU \
                ships /usr/lib/qemu/virtiofsd), or `cargo install virtiofsd`; or name it with \
                vm.virtiofsd in the Janus config";
    let missing = |path: PathBuf| Error::MissingAsset {
        what: "virtiofsd".into(),
        path,
        hint: hint.into(),
    };
    if let Some(p) = configured {
        return p
            .is_file()
            .then(|| p.to_path_buf())
            .ok_or_else(|| missing(p.into()));
    }
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .collect()
        })
        .unwrap_or_default();
    SEARCH
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| missing(PathBuf::from(SEARCH[0])))
}

/// In a forked child: makes `fd` available as `target`, without close-on-exec.
fn inherit_as(fd: i32, target: i32) -> std::io::Result<()> {
    // SAFETY: plain descriptor syscalls on descriptors of this (child) process.
    let r = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            // dup2 leaves the new descriptor without FD_CLOEXEC.
            libc::dup2(fd, target)
        }
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What to share and where.
#[derive(Clone, Debug)]
pub struct VirtiofsdConfig {
    /// The host directory the guest mounts.
    pub source: PathBuf,
    /// The vhost-user socket the VMM connects to ([`FsShare::socket`](super::FsShare)).
    pub socket: PathBuf,
    /// virtiofsd's stderr goes here.
    pub log: PathBuf,
    /// Start it in this cgroup (the pod's, as the VMM), so its memory is charged to the pod.
    pub cgroup: Option<Cgroup>,
    /// Log every FUSE request (tests read the log to see what the guest asked for).
    pub debug_log: bool,
    /// The binary (`None`: [`find`]'s search).
    pub binary: Option<PathBuf>,
}

impl VirtiofsdConfig {
    pub fn new(
        source: impl Into<PathBuf>,
        socket: impl Into<PathBuf>,
        log: impl Into<PathBuf>,
    ) -> Self {
        VirtiofsdConfig {
            source: source.into(),
            socket: socket.into(),
            log: log.into(),
            cgroup: None,
            debug_log: false,
            binary: None,
        }
    }

    /// virtiofsd's arguments: it serves the listening socket it inherits on [`LISTEN_FD`].
    fn args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--fd={LISTEN_FD}"),
            "-o".into(),
            format!("source={}", self.source.display()),
            "-o".into(),
            "cache=none".into(),
            // chroot, not a mount namespace of its own: containers added to a pod later are
            // bind mounts under the share made after virtiofsd starts, and it must see them
            // (and chroot works as root inside a container, where namespaces may not).
            "-o".into(),
            "sandbox=chroot".into(),
        ];
        if self.debug_log {
            a.extend(["-o".into(), "log_level=debug".into()]);
        }
        a
    }
}

/// A running virtiofsd. Dropping it kills and reaps it, unless it was [`detach`]ed.
///
/// [`detach`]: Virtiofsd::detach
#[derive(Debug)]
pub struct Virtiofsd {
    child: Option<Child>,
    pid: u32,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Starts virtiofsd on a socket the caller's VMM can connect to at once: the socket is
    /// bound and listening before virtiofsd starts (virtiofsd inherits it, `--fd`), so a
    /// connection waits in its backlog until virtiofsd accepts, and nobody polls for the
    /// socket to appear. (Both the C daemon and the Rust virtiofsd take `--fd`.)
    pub async fn start(cfg: &VirtiofsdConfig) -> Result<Virtiofsd> {
        let bin = find(cfg.binary.as_deref())?;
        let log =
            std::fs::File::create(&cfg.log).ctx(|| format!("create {}", cfg.log.display()))?;
        let listener = UnixListener::bind(&cfg.socket)
            .ctx(|| format!("listen on {}", cfg.socket.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.args(cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let fd = listener.as_raw_fd();
        // SAFETY: only async-signal-safe fcntl/dup2 run between fork and exec.
        unsafe {
            cmd.pre_exec(move || inherit_as(fd, LISTEN_FD));
        }
        if let Some(cg) = &cfg.cgroup {
            cg.place_child(&mut cmd).map_err(Error::Cgroup)?;
        }
        let child = cmd.spawn().ctx(|| format!("start {}", bin.display()))?;
        // virtiofsd has its own copy; ours would only keep the socket alive after it exits.
        drop(listener);
        let vfs = Virtiofsd {
            pid: child.id(),
            child: Some(child),
            socket: cfg.socket.clone(),
        };
        if let Some(cg) = &cfg.cgroup {
            // (On error `vfs` is dropped, which kills it.)
            super::vmm_process::enter_cgroup(cg, vfs.pid).await?;
        }
        Ok(vfs)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Leaves the process running and unwatched, for a caller whose own reaper collects it
    /// (the shim's SIGCHLD handler reaps every child); returns its pid.
    pub fn detach(mut self) -> u32 {
        self.child = None;
        self.pid
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(c) => c.try_wait().ctx(|| "wait for virtiofsd"),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for it to exit (it ends when its VMM closes the session).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if t.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Nothing to report to from a drop: an exited child makes kill fail, which is fine.
            let _ = c.kill();
            if let Err(e) = c.wait() {
                log::warn!("vm: wait for virtiofsd {}: {e}", self.pid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let mut cfg = VirtiofsdConfig::new("/s", "/r/vfs.sock", "/r/log");
        assert_eq!(
            cfg.args().join(" "),
            "--fd=3 -o source=/s -o cache=none -o sandbox=chroot"
        );
        cfg.debug_log = true;
        assert!(cfg.args().join(" ").ends_with("-o log_level=debug"));
    }
}
