//! VM mode, host side: a [`Hypervisor`] boots a guest ([`Vm`]) from a [`VmConfig`], and the
//! [`agent`] module talks ttrpc to the in-guest agent (`vm-agent`) over the VM's agent channel.
//!
//! Drivers, chosen by name with [`driver`]: [`qemu::Qemu`] (`qemu-system-x86_64 -M microvm`,
//! KVM when the CPU has vmx/svm and /dev/kvm opens, TCG otherwise) and [`builtin::Builtin`]
//! (our own `janus-vmm`, KVM only). Both run the VMM as a process and give the guest the same
//! devices: two named console ports for the agent and stdio, virtio-fs through virtiofsd
//! ([`virtiofsd`]), virtio-net on a tap, the serial console in a log file. So both return the
//! same [`ProcessVm`]; a driver only chooses the binary and its arguments.
//!
//! Layout, each module depending only on those below it: the drivers (`qemu`, `builtin`) ->
//! `vmm_process` (the VM of a VMM process: spawn, channels, agent, shutdown) -> `workdir`,
//! `accel`, `qmp`, `agent`, `process` (a child watched through a pidfd).
//!
//! Every VM owns a work directory (sockets, console log, the VMM's log and pidfile). Dropping
//! the [`Vm`] kills a still-running VMM with SIGKILL, reaps it and removes that directory; a
//! crashed host process leaves the pidfile behind for [`cleanup_work_dir`].
//!
//! Exit statuses: the VMM process is watched through a pidfd, so its exit is seen even when
//! another part of the process (the shim's SIGCHLD reaper calling `waitpid(-1)`) reaps it first.
//! A reaper that does so can hand the status over with [`record_reaped`].

mod accel;
pub mod agent;
pub mod builtin;
mod error;
mod process;
pub mod qemu;
mod qmp;
pub mod stdio;
pub mod virtiofsd;
mod vmm_process;
mod workdir;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::UnixStream;

pub use accel::{choose_accel, hardware_virtualization, AccelChoice};
pub use agent::AgentConnection;
pub use error::{Error, Result};
pub use process::record_reaped;
pub use protocols::AgentClient;
pub use stdio::StdioPlane;
pub use vmm_process::ProcessVm;
pub use workdir::{cleanup_work_dir, find_vms, FoundVm, VmmFiles, WorkDir, RUN_DIR};

/// Name of the guest's virtio-serial port that carries the agent's ttrpc API.
pub const AGENT_PORT: &str = "janus.agent";
/// Name of the guest's virtio-serial port that carries the framed stdio streams
/// (`protocols::stdio_frame`).
pub const STDIO_PORT: &str = "janus.stdio";

/// Hint given whenever the guest kernel or initramfs is missing.
pub const GUEST_HINT: &str = "install the guest image in /usr/share/janus/guest (the installer \
     DaemonSet and `janus install` do; from a source checkout: hack/build-guest.sh), or name \
     it with vm.kernel and vm.initrd in the Janus config";

/// Which accelerator the VMM should use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Accel {
    /// KVM when the CPU shows vmx/svm and /dev/kvm opens, TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualization (fails when /dev/kvm cannot be opened).
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(Error::Config(format!(
                "unknown accelerator {other:?} (auto, kvm or tcg)"
            ))),
        }
    }
}

/// What to boot and how.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest kernel: the uncompressed `vmlinux` (PVH entry, ~15 % faster under TCG) or the
    /// bzImage `vmlinuz`.
    pub kernel: PathBuf,
    /// Initramfs (uncompressed cpio) with the agent as `/init`.
    pub initrd: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// QEMU under TCG: the translated-code cache (`-accel tcg,tb-size=`) in MiB. `None`:
    /// QEMU's default, 1 GiB reserved and filled as guest code is translated (~40 MiB by the
    /// time a pod is idle); a smaller cache is flushed and refilled, trading boot time for
    /// memory (docs/guest.md, "Memory"). Ignored with KVM and by the builtin driver.
    pub tcg_tb_mib: Option<u32>,
    /// Appended to the driver's kernel command line (later parameters win, so `loglevel=7`
    /// overrides `quiet`).
    pub kernel_params: Vec<String>,
    /// The VM's own directory (sockets, console log, pidfile). Created if missing and removed
    /// when the VM is shut down or dropped. `None`: a fresh directory under
    /// `$TMPDIR/janus-vm/`. Keep it short: unix socket paths are limited to 107 bytes.
    pub work_dir: Option<PathBuf>,
    pub accel: Accel,
    /// The VMM binary; `None` looks `qemu-system-x86_64` up on PATH.
    pub vmm_binary: Option<PathBuf>,
    /// Back guest RAM with a shared memfd (`memory-backend-memfd,share=on`), which
    /// vhost-user devices such as virtio-fs need.
    pub shared_memory: bool,
    /// Extra VMM arguments appended verbatim (e.g. `-chardev socket,...` +
    /// `-device vhost-user-fs-device,...` for virtio-fs).
    pub extra_args: Vec<String>,
    /// Leave the work directory in place after the VM ends (debugging).
    pub keep_work_dir: bool,
    /// Run the VMM in this network namespace (a pod's, given as a path such as CNI's netns
    /// file), so its tap devices are the pod's.
    pub netns: Option<PathBuf>,
    /// A name for the VM on the VMM's command line (`ps` shows which container it runs).
    pub name: Option<String>,
    /// virtio-fs through a vhost-user backend (virtiofsd); needs `shared_memory`.
    pub fs: Option<FsShare>,
    /// virtio-net devices, each on an existing tap (in `netns`).
    pub net: Vec<NetDevice>,
    /// The cgroup the VMM starts in (the pod's sandbox cgroup), so the VM's memory and CPU
    /// are charged to the pod.
    pub cgroup: Option<crate::linux::cgroups::Cgroup>,
}

/// A virtio-fs device served by a vhost-user backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsShare {
    /// What the guest mounts (`mount -t virtiofs <tag> ...`).
    pub tag: String,
    /// The backend's (virtiofsd's) socket.
    pub socket: PathBuf,
}

/// A virtio-net device on a tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDevice {
    pub tap: String,
    /// `aa:bb:cc:dd:ee:ff`, the guest interface's address.
    pub mac: String,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: initrd.into(),
            vcpus: 1,
            memory_mib: 256,
            tcg_tb_mib: None,
            kernel_params: Vec::new(),
            work_dir: None,
            accel: Accel::Auto,
            vmm_binary: None,
            shared_memory: false,
            extra_args: Vec::new(),
            keep_work_dir: false,
            netns: None,
            name: None,
            fs: None,
            net: Vec::new(),
            cgroup: None,
        }
    }

    /// Kernel and initramfs from a `hack/build-guest.sh` output directory: `vmlinux` (else
    /// `vmlinuz`) and `initramfs.cpio`. Fails with [`Error::MissingAsset`] naming the script.
    pub fn from_guest_dir(dir: &Path) -> Result<Self> {
        Ok(Self::new(
            find_kernel(dir)?,
            find_file(dir, "initramfs.cpio", "guest initramfs")?,
        ))
    }
}

/// Where the guest kernel and initramfs are looked for by default: `$JANUS_GUEST_DIR`,
/// `/usr/share/janus/guest`, or `guest/` in the cargo target dir the running binary was built
/// in (a source checkout: `target/release/x` -> `target/guest`).
pub fn default_guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("JANUS_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let installed = PathBuf::from("/usr/share/janus/guest");
    if installed.is_dir() {
        return installed;
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("guest")))
        .filter(|d| d.is_dir())
        .unwrap_or(installed)
}

/// The guest kernel in a `hack/build-guest.sh` output directory: `vmlinux`, else `vmlinuz`.
pub fn find_kernel(dir: &Path) -> Result<PathBuf> {
    let vmlinux = dir.join("vmlinux");
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        return Ok(vmlinuz);
    }
    Err(Error::MissingAsset {
        what: "guest kernel (vmlinux or vmlinuz)".into(),
        path: vmlinux,
        hint: GUEST_HINT.into(),
    })
}

fn find_file(dir: &Path, name: &str, what: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::MissingAsset {
            what: what.into(),
            path: p,
            hint: GUEST_HINT.into(),
        })
    }
}

/// How a VMM process ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmExit {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Terminating signal when it was killed.
    pub signal: Option<i32>,
    /// We had to SIGKILL it (shutdown timed out, or `kill()`).
    pub forced: bool,
}

impl VmExit {
    /// Exited by itself with status 0 (a guest power-off).
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}")?,
            (None, Some(s)) => write!(f, "killed by signal {s}")?,
            (None, None) => write!(f, "exited (status reaped elsewhere)")?,
        }
        if self.forced {
            write!(f, " (forced)")?;
        }
        Ok(())
    }
}

/// The driver the configuration names when it names none.
pub const DEFAULT_DRIVER: &str = "qemu";

/// The names [`driver`] knows (the config's `vm.hypervisor` values).
pub const DRIVERS: &[&str] = &["qemu", "builtin"];

/// The hypervisor driver called `name`: "qemu" or "builtin" (janus-vmm). The builtin driver
/// needs hardware virtualization: without vmx/svm a Linux guest cannot boot under it, so it is
/// refused here ([`Error::Config`]) instead of hanging in boot. An unknown name is
/// [`Error::UnknownDriver`].
pub fn driver(name: &str) -> Result<Box<dyn Hypervisor>> {
    match name {
        "qemu" => Ok(Box::new(qemu::Qemu::new())),
        "builtin" => match hardware_virtualization() {
            Some(_) => Ok(Box::new(builtin::Builtin::new())),
            None => Err(Error::Config(
                "vm.hypervisor = \"builtin\" needs hardware virtualization, but this CPU shows \
                 neither vmx nor svm (a nested software KVM cannot boot Linux): use \
                 hypervisor = \"qemu\", which falls back to software emulation"
                    .into(),
            )),
        },
        other => Err(Error::UnknownDriver(other.to_string())),
    }
}

/// A hypervisor driver.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    fn name(&self) -> &'static str;

    /// Starts a VM. Returns once the VMM has created its devices and the host ends of the
    /// guest channels are connected (the guest is still booting); then call
    /// [`Vm::connect_agent`]. A VMM that refuses its configuration is an [`Error::Boot`]
    /// quoting the VMM's own error output.
    async fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>>;
}

/// A running (or ended) VM.
#[async_trait]
pub trait Vm: Send + Sync + fmt::Debug {
    /// The VMM process id.
    fn pid(&self) -> u32;
    /// The accelerator actually used (never `Auto`).
    fn accel(&self) -> Accel;
    /// When the VMM was spawned.
    fn started_at(&self) -> Instant;
    fn work_dir(&self) -> &Path;
    /// Host end of the agent channel (a unix socket served by the VMM).
    fn agent_socket(&self) -> &Path;
    /// Host end of the stdio channel.
    fn stdio_socket(&self) -> &Path;
    /// The guest serial console, as a file.
    fn console_log(&self) -> &Path;
    /// The last `lines` lines of the console log (`\r` stripped).
    fn console_tail(&self, lines: usize) -> String {
        tail_lines(self.console_log(), lines)
    }
    /// How long [`connect_agent`](Vm::connect_agent) waits by default: 30 s under TCG,
    /// 10 s with KVM.
    fn default_agent_timeout(&self) -> Duration {
        agent::default_timeout(self.accel())
    }

    /// Waits for the agent: polls Health until it answers or `timeout` (`None`: the default)
    /// elapses. Ends at once with [`Error::Boot`] (and the console tail) when the VMM exits.
    /// The client is kept for [`shutdown`](Vm::shutdown) and [`agent`](Vm::agent).
    async fn connect_agent(&self, timeout: Option<Duration>) -> Result<AgentConnection>;
    /// The agent client, once [`connect_agent`](Vm::connect_agent) succeeded.
    fn agent(&self) -> Option<AgentClient>;
    /// The raw host end of the agent channel, connected during start, for callers that speak
    /// something other than ttrpc on it (tests with a non-agent init). `None` once taken or
    /// once [`connect_agent`](Vm::connect_agent) used it.
    fn take_agent_stream(&self) -> Option<UnixStream>;
    /// The host end of the stdio channel, connected during start. `None` once taken.
    fn take_stdio_stream(&self) -> Option<UnixStream>;

    /// Stops the VM: asks the agent to power off (SIGTERM to the VMM when no agent is
    /// connected), waits for the VMM to exit until `timeout`, then SIGKILLs it. Removes the
    /// work directory.
    async fn shutdown(&self, timeout: Duration) -> Result<VmExit>;
    /// Sends SIGKILL to the VMM (no wait; see [`wait`](Vm::wait)). A no-op once it exited.
    fn kill(&self) -> Result<()>;
    /// Waits for the VMM to exit. Any number of callers may wait.
    async fn wait(&self) -> Result<VmExit>;
    /// The exit, if the VMM has exited (does not block).
    fn try_wait(&self) -> Result<Option<VmExit>>;
}

/// The last `lines` lines of a (console) log file, `\r` stripped; reads at most the last 64 KiB.
pub fn tail_lines(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX: u64 = 64 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).replace('\r', "");
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        all.remove(0); // partial first line
    }
    let from = all.len().saturating_sub(lines);
    let mut out = all[from..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_parse() {
        assert_eq!("KVM".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!("".parse::<Accel>().unwrap(), Accel::Auto);
        assert!("hvf".parse::<Accel>().is_err());
    }

    #[test]
    fn missing_guest_names_build_script() {
        let d = tempfile::tempdir().unwrap();
        let e = VmConfig::from_guest_dir(d.path()).unwrap_err();
        assert!(matches!(e, Error::MissingAsset { .. }));
        assert!(
            e.to_string().contains("janus install") && e.to_string().contains("vm.kernel"),
            "{e}"
        );
        std::fs::write(d.path().join("vmlinuz"), b"x").unwrap();
        let e = VmConfig::from_guest_dir(d.path()).unwrap_err();
        assert!(e.to_string().contains("initramfs.cpio"), "{e}");
        std::fs::write(d.path().join("initramfs.cpio"), b"x").unwrap();
        let c = VmConfig::from_guest_dir(d.path()).unwrap();
        assert!(c.kernel.ends_with("vmlinuz"));
        std::fs::write(d.path().join("vmlinux"), b"x").unwrap();
        let c = VmConfig::from_guest_dir(d.path()).unwrap();
        assert!(c.kernel.ends_with("vmlinux"), "vmlinux preferred");
    }

    #[test]
    fn tail() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        assert_eq!(tail_lines(&p, 3), "");
        std::fs::write(&p, "a\r\nb\r\nc\r\nd\r\n").unwrap();
        assert_eq!(tail_lines(&p, 2), "c\nd\n");
        let big: String = (0..20000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, big).unwrap();
        assert_eq!(tail_lines(&p, 1), "line 19999\n");
    }
}
