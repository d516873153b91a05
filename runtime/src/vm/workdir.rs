//! A VM's work directory: the host ends of the guest channels, the console log, the VMM's own
//! log and pidfile (and QEMU's QMP socket). Made before the VMM starts, removed with the VM,
//! and found again by [`cleanup_work_dir`] after a crashed host process left it behind.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::error::IoContext;
use super::{Error, Result, VmConfig};

pub const AGENT_SOCK: &str = "agent.sock";
pub const STDIO_SOCK: &str = "stdio.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const QMP_SOCK: &str = "qmp.sock";
/// What every VMM's pidfile name ends with: [`cleanup_work_dir`] looks for these, so it
/// cleans the directory of any driver, whatever name that driver's VMM used.
const PIDFILE_SUFFIX: &str = ".pid";

/// Longest unix socket path (sun_path is 108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// The names of a VMM's own files in the work directory. Each driver keeps the names its VMM
/// has always had (`qemu.log`/`qemu.pid`, `vmm.log`/`vmm.pid`), so directories left by
/// earlier versions are still recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmmFiles {
    /// The VMM's stdout and stderr.
    pub log: &'static str,
    /// The VMM's pidfile; must end in `.pid`.
    pub pidfile: &'static str,
}

/// Paths inside a VM's work directory.
#[derive(Clone, Debug)]
pub struct WorkDir {
    pub dir: PathBuf,
    pub agent_sock: PathBuf,
    pub stdio_sock: PathBuf,
    pub console_log: PathBuf,
    /// The VMM's own output (QEMU's or janus-vmm's stderr).
    pub vmm_log: PathBuf,
    pub pidfile: PathBuf,
    pub qmp_sock: PathBuf,
}

impl WorkDir {
    pub fn new(dir: &Path, files: VmmFiles) -> Self {
        debug_assert!(files.pidfile.ends_with(PIDFILE_SUFFIX));
        WorkDir {
            dir: dir.to_path_buf(),
            agent_sock: dir.join(AGENT_SOCK),
            stdio_sock: dir.join(STDIO_SOCK),
            console_log: dir.join(CONSOLE_LOG),
            vmm_log: dir.join(files.log),
            pidfile: dir.join(files.pidfile),
            qmp_sock: dir.join(QMP_SOCK),
        }
    }
}

/// Kills the VMM recorded in any pidfile of `dir` (only if that process's command line names
/// the pidfile, so a recycled pid is left alone) and removes `dir`. For the shim's `delete`
/// after a crash. Returns whether a VMM was killed.
pub fn cleanup_work_dir(dir: &Path) -> Result<bool> {
    let mut killed = false;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.ctx(|| format!("read {}", dir.display()))?;
        if entry
            .file_name()
            .as_bytes()
            .ends_with(PIDFILE_SUFFIX.as_bytes())
        {
            killed |= kill_recorded(&entry.path());
        }
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("remove {}", dir.display()), e)),
    }
    Ok(killed)
}

/// The running process `pidfile` records, if its command line names the pidfile (a recycled
/// pid does not), with that command line's arguments.
fn recorded(pidfile: &Path) -> Option<(i32, Vec<String>)> {
    let pid = fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = pidfile.as_os_str().as_bytes();
    if !cmdline.windows(needle.len()).any(|w| w == needle) {
        return None;
    }
    let args = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some((pid, args))
}

/// Where the shim keeps its VMs' work directories (`janus vm` reads them).
pub const RUN_DIR: &str = "/run/janus/vm";

/// A VM's work directory as found on the host.
#[derive(Debug, Clone)]
pub struct FoundVm {
    pub dir: PathBuf,
    /// The VMM's pid, if it still runs.
    pub vmm_pid: Option<i32>,
    /// The name on its command line (the container that booted it).
    pub name: Option<String>,
    pub console_log: PathBuf,
}

/// The VM work directories under `base` ([`RUN_DIR`] for the shim's), sorted by path.
pub fn find_vms(base: &Path) -> Vec<FoundVm> {
    let mut found: Vec<FoundVm> = fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let dir = e.path();
            let running = fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|f| {
                    f.file_name()
                        .as_bytes()
                        .ends_with(PIDFILE_SUFFIX.as_bytes())
                })
                .find_map(|f| recorded(&f.path()));
            let name = running.as_ref().and_then(|(_, args)| {
                let i = args.iter().position(|a| a == "-name" || a == "--name")?;
                args.get(i + 1).cloned()
            });
            FoundVm {
                console_log: dir.join(CONSOLE_LOG),
                vmm_pid: running.map(|(pid, _)| pid),
                name,
                dir,
            }
        })
        .collect();
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    found
}

/// SIGKILLs the process recorded in `pidfile` if its command line names the pidfile.
fn kill_recorded(pidfile: &Path) -> bool {
    let Some((pid, _)) = recorded(pidfile) else {
        return false;
    };
    log::warn!("vm: killing leftover VMM {pid} of {}", pidfile.display());
    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) => {}
        // It ended between the check and the kill: nothing left to do.
        Err(Errno::ESRCH) => return false,
        Err(e) => {
            log::warn!("vm: kill leftover VMM {pid}: {e}");
            return false;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        // A zombie stays until its parent reaps it; a zombie holds no resources.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .map(|s| s.trim_start().starts_with('Z'))
            == Some(true)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn fresh_work_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join("janus-vm").join(format!(
        "{}-{}-{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    ))
}

/// Creates the VM's work directory (removing a previous VM's of the same name); the guard
/// removes it again unless disarmed.
pub(super) fn prepare_work_dir(cfg: &VmConfig, files: VmmFiles) -> Result<(WorkDir, DirGuard)> {
    let dir = cfg.work_dir.clone().unwrap_or_else(fresh_work_dir);
    let wd = WorkDir::new(&dir, files);
    let longest = [&wd.agent_sock, &wd.stdio_sock, &wd.qmp_sock]
        .iter()
        .map(|p| p.as_os_str().len())
        .max()
        .unwrap_or(0);
    if longest > SUN_PATH_MAX {
        return Err(Error::Config(format!(
            "work dir {} is too long for unix sockets ({longest} > {SUN_PATH_MAX} bytes)",
            dir.display()
        )));
    }
    if dir.exists() {
        // A previous VM of the same name: make sure it is gone.
        cleanup_work_dir(&dir)?;
    }
    fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    Ok((wd, DirGuard(Some(dir), cfg.keep_work_dir)))
}

/// Removes a work directory whose VM did not come up (unless the config keeps it).
pub(super) struct DirGuard(Option<PathBuf>, bool);

impl DirGuard {
    /// The VM is up: its directory now goes with it.
    pub(super) fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let (Some(d), false) = (&self.0, self.1) {
            if let Err(e) = fs::remove_dir_all(d) {
                log::warn!("vm: remove {}: {e}", d.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    const OLD_QEMU: VmmFiles = VmmFiles {
        log: "qemu.log",
        pidfile: "qemu.pid",
    };

    /// A process whose command line names `pidfile`, as a VMM's does, recorded in it.
    /// One process (no shell whose child would outlive it and hold the test's stdout).
    fn fake_vmm(pidfile: &Path) -> std::process::Child {
        fs::write(pidfile, "").unwrap();
        let child = Command::new("tail")
            .args(["-f", pidfile.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        fs::write(pidfile, format!("{}\n", child.id())).unwrap();
        // The child must have exec'd (its command line naming the file) before cleanup looks.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let t = Instant::now();
        while !fs::read(&cmdline)
            .map(|c| String::from_utf8_lossy(&c).contains(pidfile.to_str().unwrap()))
            .unwrap_or(false)
        {
            assert!(t.elapsed() < Duration::from_secs(5), "child did not exec");
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn find_vms_reads_work_dirs() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("k8s.io_abc");
        std::fs::create_dir(&dir).unwrap();
        // A pidfile whose process is not a VMM naming it: not running.
        std::fs::write(dir.join("qemu.pid"), std::process::id().to_string()).unwrap();
        let found = find_vms(base.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].dir, dir);
        assert_eq!(found[0].vmm_pid, None);
        assert_eq!(found[0].console_log, dir.join(CONSOLE_LOG));
        assert!(find_vms(&base.path().join("none")).is_empty());
    }

    #[test]
    fn cleanup_leftover() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("vm");
        // Directories as QEMU and janus-vmm (named by earlier versions too) leave them.
        for pidfile in ["qemu.pid", "vmm.pid"] {
            fs::create_dir(&dir).unwrap();
            let mut child = fake_vmm(&dir.join(pidfile));
            assert!(cleanup_work_dir(&dir).unwrap(), "{pidfile}");
            assert!(child.wait().unwrap().code().is_none());
            assert!(!dir.exists());
        }
        // A recycled pid (our own) is not killed.
        fs::create_dir(&dir).unwrap();
        let wd = WorkDir::new(&dir, OLD_QEMU);
        fs::write(&wd.pidfile, format!("{}\n", std::process::id())).unwrap();
        assert!(!cleanup_work_dir(&dir).unwrap());
        assert!(!dir.exists());
        assert!(!cleanup_work_dir(&dir).unwrap());
    }
}
