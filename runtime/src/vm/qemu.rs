//! The `qemu` driver: `qemu-system-x86_64 -M microvm`.
//!
//! - Accelerator: KVM only when /proc/cpuinfo shows vmx or svm *and* /dev/kvm opens; TCG
//!   otherwise (this is logged, and [`Vm::accel`] reports it). Under TCG the CPU is `-cpu max`
//!   (`host` needs KVM) and the kernel gets `tsc_early_khz=<host TSC kHz> tsc=reliable`:
//!   without it microvm under TCG hangs in ~1 boot of 6 (TSC calibration fails, no fallback
//!   timer), and the clocksource watchdog may demote the TSC to jiffies on a busy host.
//! - Devices: microvm's virtio-mmio, described by ACPI (Debian's kernel has no
//!   `VIRTIO_MMIO_CMDLINE_DEVICES`). One `virtio-serial-device` with two ports, `janus.agent`
//!   and `janus.stdio`, each a unix socket served by QEMU in the work directory. QEMU keeps
//!   guest writes to a port until a host side is connected, and the guest sees POLLHUP/EOF on a
//!   port without a host side, so [`Qemu::start`] connects to both as soon as QEMU made them.
//! - Console: ttyS0 into `<work dir>/console.log`; QEMU's own stderr into `qemu.log`.
//! - QMP on `qmp.sock`: start() completes a `qmp_capabilities` handshake, which QEMU answers
//!   from its main loop, i.e. after every device was created; [`QemuVm::qmp`] runs commands
//!   (hotplug, query-status) later.
//! - `-no-reboot` + `panic=-1`: a guest power-off, reboot, panic or dying PID 1 ends QEMU.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use protocols::agent::Empty;
use protocols::AgentClient;
use tokio::net::UnixStream;

use super::error::IoContext;
use super::process::Process;
use super::{
    agent, tail_lines, Accel, AgentConnection, Error, Hypervisor, Result, Vm, VmConfig, VmExit,
};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";
pub const AGENT_SOCK: &str = "agent.sock";
pub const STDIO_SOCK: &str = "stdio.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const QEMU_LOG: &str = "qemu.log";
pub const PIDFILE: &str = "qemu.pid";
pub const QMP_SOCK: &str = "qmp.sock";

/// Longest unix socket path (sun_path is 108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;
/// How long QEMU may take to create its sockets after spawn.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// The QEMU driver.
#[derive(Clone, Debug, Default)]
pub struct Qemu;

impl Qemu {
    pub fn new() -> Self {
        Qemu
    }

    /// [`Hypervisor::start`] with the concrete type.
    pub async fn start_vm(&self, config: &VmConfig) -> Result<QemuVm> {
        QemuVm::start(config).await
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>> {
        Ok(Box::new(QemuVm::start(config).await?))
    }
}

/// The accelerator chosen for a VM and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Resolves `wanted` on this host: `Auto` becomes KVM only when the CPU shows vmx/svm and
/// /dev/kvm opens. `Kvm` fails when /dev/kvm cannot be opened (and warns without vmx/svm).
pub fn choose_accel(wanted: Accel) -> Result<AccelChoice> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = cpu_virt_flag(&cpuinfo);
    let kvm = open_kvm();
    decide_accel(wanted, virt, kvm)
}

fn decide_accel(
    wanted: Accel,
    virt: Option<&str>,
    kvm: std::result::Result<(), String>,
) -> Result<AccelChoice> {
    let choice = |accel, reason: String| Ok(AccelChoice { accel, reason });
    match (wanted, virt, kvm) {
        (Accel::Tcg, _, _) => choice(Accel::Tcg, "tcg requested by the configuration".into()),
        (Accel::Kvm, _, Err(e)) => Err(Error::Config(format!(
            "accel = kvm, but /dev/kvm is not usable: {e}"
        ))),
        (Accel::Kvm, None, Ok(())) => {
            log::warn!("vm: accel = kvm requested although the CPU shows neither vmx nor svm");
            choice(
                Accel::Kvm,
                "kvm requested by the configuration (no vmx/svm flag)".into(),
            )
        }
        (Accel::Kvm, Some(f), Ok(())) => choice(Accel::Kvm, format!("kvm requested; CPU has {f}")),
        (Accel::Auto, Some(f), Ok(())) => {
            choice(Accel::Kvm, format!("CPU has {f} and /dev/kvm opens"))
        }
        (Accel::Auto, Some(f), Err(e)) => choice(
            Accel::Tcg,
            format!("CPU has {f} but /dev/kvm is not usable ({e})"),
        ),
        (Accel::Auto, None, _) => choice(
            Accel::Tcg,
            "no vmx/svm flag in /proc/cpuinfo (a nested or software KVM cannot boot Linux)".into(),
        ),
    }
}

/// "vmx" or "svm" when a `flags` line of /proc/cpuinfo lists it.
pub(super) fn cpu_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for f in value.split_whitespace() {
            match f {
                "vmx" => return Some("vmx"),
                "svm" => return Some("svm"),
                _ => {}
            }
        }
    }
    None
}

fn open_kvm() -> std::result::Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The host TSC frequency in kHz, for the guest's `tsc_early_khz=` (the method of
/// `host_tsc_khz` in hack/lib.sh): the kernel log's "tsc: Refined TSC clocksource
/// calibration" line, else its "tsc: Detected ... MHz processor" line, else /proc/cpuinfo's
/// "cpu MHz" (the TSC rate where the TSC is constant, as in VMs). Computed once.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let klog = read_kernel_log();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        tsc_khz_from(&klog, &cpuinfo)
    })
}

fn tsc_khz_from(klog: &str, cpuinfo: &str) -> Option<u64> {
    let last_mhz = |pre: &str, post: &str| {
        klog.lines()
            .filter_map(|l| {
                let rest = &l[l.find(pre)? + pre.len()..];
                let end = rest.find(post)?;
                rest[..end].trim().parse::<f64>().ok()
            })
            .next_back()
    };
    let mhz = last_mhz("tsc: Refined TSC clocksource calibration:", "MHz")
        .or_else(|| last_mhz("tsc: Detected", "MHz processor"))
        .or_else(|| {
            cpuinfo.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "cpu MHz").then(|| v.trim().parse::<f64>().ok())?
            })
        })?;
    (mhz > 0.0).then_some((mhz * 1000.0 + 0.5) as u64)
}

/// The kernel ring buffer (syslog(2) READ_ALL; needs CAP_SYSLOG when dmesg_restrict=1).
fn read_kernel_log() -> String {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: size query, no buffer.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    if size <= 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buf is writable for `size` bytes.
    let n = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), size) };
    if n <= 0 {
        return String::new();
    }
    buf.truncate(n as usize);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Finds the QEMU binary: the configured path, else `qemu-system-x86_64` on PATH (and in
/// /usr/bin, /usr/local/bin).
pub fn find_qemu(configured: Option<&Path>) -> Result<PathBuf> {
    let missing = |path: PathBuf| Error::MissingAsset {
        what: QEMU_BINARY.into(),
        path,
        hint: "apt-get install qemu-system-x86".into(),
    };
    if let Some(p) = configured {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(missing(p.to_path_buf()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(QEMU_BINARY))
        .find(|p| is_executable(p))
        .ok_or_else(|| missing(PathBuf::from(format!("$PATH/{QEMU_BINARY}"))))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Paths inside a VM's work directory.
#[derive(Clone, Debug)]
pub struct WorkDir {
    pub dir: PathBuf,
    pub agent_sock: PathBuf,
    pub stdio_sock: PathBuf,
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
    pub pidfile: PathBuf,
    pub qmp_sock: PathBuf,
}

impl WorkDir {
    pub fn new(dir: &Path) -> Self {
        WorkDir {
            dir: dir.to_path_buf(),
            agent_sock: dir.join(AGENT_SOCK),
            stdio_sock: dir.join(STDIO_SOCK),
            console_log: dir.join(CONSOLE_LOG),
            qemu_log: dir.join(QEMU_LOG),
            pidfile: dir.join(PIDFILE),
            qmp_sock: dir.join(QMP_SOCK),
        }
    }
}

/// The kernel command line for `accel`: `console=ttyS0 panic=-1 quiet cgroup_no_v1=all`, under
/// TCG `tsc_early_khz=<tsc_khz> tsc=reliable`, then `extra`.
pub fn kernel_cmdline(accel: Accel, tsc_khz: Option<u64>, extra: &[String]) -> String {
    let mut p: Vec<String> = ["console=ttyS0", "panic=-1", "quiet", "cgroup_no_v1=all"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if accel != Accel::Kvm {
        if let Some(khz) = tsc_khz {
            p.push(format!("tsc_early_khz={khz}"));
        }
        p.push("tsc=reliable".into());
    }
    p.extend(extra.iter().cloned());
    p.join(" ")
}

/// QEMU's option syntax: a comma inside a value is written twice.
fn opt_path(p: &Path) -> String {
    String::from_utf8_lossy(p.as_os_str().as_bytes()).replace(',', ",,")
}

/// The QEMU arguments (without the binary) for `cfg` with the resolved accelerator.
pub fn qemu_args(cfg: &VmConfig, wd: &WorkDir, accel: Accel, cmdline: &str) -> Vec<String> {
    let accel_name = if accel == Accel::Kvm { "kvm" } else { "tcg" };
    let mut machine = format!("microvm,accel={accel_name},x-option-roms=off,isa-serial=on,rtc=on");
    if cfg.shared_memory {
        machine.push_str(",memory-backend=mem");
    }
    let mut a: Vec<String> = vec![
        "-M".into(),
        machine,
        // microvm's virtio-mmio defaults to the legacy (v1) interface, which vhost-user
        // backends (virtiofsd) refuse; the guest kernel drives v2 fine.
        "-global".into(),
        "virtio-mmio.force-legacy=false".into(),
        "-cpu".into(),
        if accel == Accel::Kvm { "host" } else { "max" }.into(),
        "-m".into(),
        format!("{}M", cfg.memory_mib),
        "-smp".into(),
        cfg.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-pidfile".into(),
        wd.pidfile.display().to_string(),
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt_path(&wd.qmp_sock)
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        "-chardev".into(),
        format!("file,id=console,path={}", opt_path(&wd.console_log)),
        "-serial".into(),
        "chardev:console".into(),
        "-kernel".into(),
        cfg.kernel.display().to_string(),
        "-initrd".into(),
        cfg.initrd.display().to_string(),
        "-append".into(),
        cmdline.to_string(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            opt_path(&wd.agent_sock)
        ),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={}", super::AGENT_PORT),
        "-chardev".into(),
        format!(
            "socket,id=stdio,path={},server=on,wait=off",
            opt_path(&wd.stdio_sock)
        ),
        "-device".into(),
        format!("virtserialport,chardev=stdio,name={}", super::STDIO_PORT),
    ];
    if cfg.shared_memory {
        a.push("-object".into());
        a.push(format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            cfg.memory_mib
        ));
    }
    if let Some(name) = &cfg.name {
        a.push("-name".into());
        a.push(opt_path(Path::new(name)));
    }
    if let Some(fs) = &cfg.fs {
        a.push("-chardev".into());
        a.push(format!("socket,id=vfs,path={}", opt_path(&fs.socket)));
        a.push("-device".into());
        a.push(format!("vhost-user-fs-device,chardev=vfs,tag={}", fs.tag));
    }
    for (i, n) in cfg.net.iter().enumerate() {
        a.push("-netdev".into());
        a.push(format!(
            "tap,id=net{i},ifname={},script=no,downscript=no",
            n.tap
        ));
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net{i},mac={}", n.mac));
    }
    a.extend(cfg.extra_args.iter().cloned());
    a
}

/// Kills the QEMU recorded in `dir`'s pidfile (only if that process's command line names
/// `dir`, so a recycled pid is left alone) and removes `dir`. For the shim's `delete` after a
/// crash. Returns whether a QEMU was killed.
pub fn cleanup_work_dir(dir: &Path) -> Result<bool> {
    let mut killed = false;
    // QEMU's pidfile, or janus-vmm's (the builtin driver).
    for pidfile in [
        WorkDir::new(dir).pidfile,
        dir.join(super::builtin::VMM_PIDFILE),
    ] {
        killed |= kill_recorded(&pidfile);
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("remove {}", dir.display()), e)),
    }
    Ok(killed)
}

/// SIGKILLs the process recorded in `pidfile` if its command line names the pidfile.
fn kill_recorded(pidfile: &Path) -> bool {
    let mut killed = false;
    if let Some(pid) = fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
    {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let needle = pidfile.as_os_str().as_bytes();
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            log::warn!("vm: killing leftover VMM {pid} of {}", pidfile.display());
            // SAFETY: kill(2) on a pid whose command line we just checked.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
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
        }
    }
    killed
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

/// A VM run by QEMU.
pub type QemuVm = ProcessVm;

/// A VM run by a VMM process (QEMU, or janus-vmm for the builtin driver): its work directory,
/// the host ends of the guest channels, the agent client.
pub struct ProcessVm {
    /// Who runs it, for messages ("QEMU", "janus-vmm").
    vmm: &'static str,
    proc: Arc<Process>,
    accel: AccelChoice,
    wd: WorkDir,
    started: Instant,
    keep_dir: bool,
    agent_stream: Mutex<Option<UnixStream>>,
    stdio_stream: Mutex<Option<UnixStream>>,
    agent: Mutex<Option<AgentClient>>,
    qmp: tokio::sync::Mutex<Option<Qmp>>,
    removed: AtomicBool,
}

/// A QMP (QEMU Machine Protocol) connection: JSON lines.
pub(super) struct Qmp {
    reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    fn new(s: UnixStream) -> Self {
        let (r, w) = s.into_split();
        Qmp {
            reader: tokio::io::BufReader::new(r),
            writer: w,
        }
    }

    /// Sends a command and returns its `return` value; skips the greeting and events.
    async fn execute(
        &mut self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> std::io::Result<serde_json::Value> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut req = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let mut buf = String::new();
            if self.reader.read_line(&mut buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let v: serde_json::Value = serde_json::from_str(&buf).map_err(std::io::Error::other)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(std::io::Error::other(format!("QMP {command}: {e}")));
            }
            // {"QMP": ...} greeting or {"event": ...}: keep reading.
        }
    }
}

impl std::fmt::Debug for ProcessVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessVm")
            .field("vmm", &self.vmm)
            .field("pid", &self.proc.pid())
            .field("accel", &self.accel)
            .field("work_dir", &self.wd.dir)
            .finish()
    }
}

/// Checks what every driver needs before spawning: kernel, initramfs, sizes.
pub(super) fn check_config(cfg: &VmConfig) -> Result<()> {
    for (what, p) in [
        ("guest kernel", &cfg.kernel),
        ("guest initramfs", &cfg.initrd),
    ] {
        if !p.is_file() {
            return Err(Error::MissingAsset {
                what: what.into(),
                path: p.clone(),
                hint: super::GUEST_HINT.into(),
            });
        }
    }
    if cfg.vcpus == 0 || cfg.vcpus > 255 {
        return Err(Error::Config(format!("vcpus = {} (1..=255)", cfg.vcpus)));
    }
    if cfg.memory_mib < 64 {
        return Err(Error::Config(format!(
            "memory = {} MiB (at least 64)",
            cfg.memory_mib
        )));
    }
    Ok(())
}

/// Creates the VM's work directory (removing a previous VM's of the same name); the guard
/// removes it again unless disarmed.
pub(super) fn prepare_work_dir(cfg: &VmConfig) -> Result<(WorkDir, DirGuard)> {
    let dir = cfg.work_dir.clone().unwrap_or_else(fresh_work_dir);
    let wd = WorkDir::new(&dir);
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

/// Spawns the VMM with its output into the work directory's log, in `cfg.netns` if set.
pub(super) fn spawn_vmm(
    binary: &Path,
    args: &[String],
    wd: &WorkDir,
    cfg: &VmConfig,
) -> Result<Process> {
    let log_file =
        fs::File::create(&wd.qemu_log).ctx(|| format!("create {}", wd.qemu_log.display()))?;
    let log_err = log_file.try_clone().ctx(|| "dup vmm log")?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .current_dir(&wd.dir);
    if let Some(ns) = &cfg.netns {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let f = fs::File::open(ns).ctx(|| format!("open network namespace {}", ns.display()))?;
        // SAFETY: setns(2) is async-signal-safe; `f` outlives the spawn (the closure owns
        // it) and is CLOEXEC, so the VMM does not inherit it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if let Some(cg) = &cfg.cgroup {
        cg.place_child(&mut cmd).map_err(Error::Cgroup)?;
    }
    log::debug!("vm: {} {}", binary.display(), args.join(" "));
    Process::spawn(&mut cmd).ctx(|| format!("spawn {}", binary.display()))
}

/// Connects the host ends of the agent and stdio ports (plus whatever `more` does) while
/// watching the VMM: its exit, or nothing within [`SOCKET_WAIT`], is a boot error.
pub(super) async fn connect_channels<T>(
    vmm: &str,
    proc: &Process,
    wd: &WorkDir,
    more: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<(UnixStream, UnixStream, T)> {
    let connect = async {
        let mut last = String::new();
        let a = agent::connect_socket(&wd.agent_sock, &mut last).await;
        let s = agent::connect_socket(&wd.stdio_sock, &mut last).await;
        more.await.map(|m| (a, s, m))
    };
    tokio::select! {
        r = tokio::time::timeout(SOCKET_WAIT, connect) => match r {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => {
                // The handshake broke: most likely the VMM is exiting. Prefer its status.
                let exit = tokio::time::timeout(Duration::from_secs(2), proc.wait()).await;
                let why = match exit {
                    Ok(Ok(exit)) => format!("{vmm} exited at start ({exit})"),
                    _ => format!("{vmm} handshake failed: {e}"),
                };
                Err(boot_error(wd, why))
            }
            Err(_) => Err(boot_error(
                wd,
                format!("{vmm} did not come up within {SOCKET_WAIT:?}"),
            )),
        },
        exit = proc.wait() => {
            let exit = exit.ctx(|| format!("wait for {vmm}"))?;
            Err(boot_error(wd, format!("{vmm} exited at start ({exit})")))
        }
    }
}

impl ProcessVm {
    /// A VM whose VMM process is up and whose channels are connected.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        vmm: &'static str,
        proc: Process,
        accel: AccelChoice,
        wd: WorkDir,
        started: Instant,
        keep_dir: bool,
        channels: (UnixStream, UnixStream),
        qmp: Option<Qmp>,
    ) -> ProcessVm {
        ProcessVm {
            vmm,
            proc: Arc::new(proc),
            accel,
            wd,
            started,
            keep_dir,
            agent_stream: Mutex::new(Some(channels.0)),
            stdio_stream: Mutex::new(Some(channels.1)),
            agent: Mutex::new(None),
            qmp: tokio::sync::Mutex::new(qmp),
            removed: AtomicBool::new(false),
        }
    }

    /// Boots a VM with QEMU.
    pub async fn start(cfg: &VmConfig) -> Result<ProcessVm> {
        let qemu = find_qemu(cfg.vmm_binary.as_deref())?;
        check_config(cfg)?;
        let accel = choose_accel(cfg.accel)?;
        let tsc = if accel.accel == Accel::Tcg {
            host_tsc_khz()
        } else {
            None
        };
        if accel.accel == Accel::Tcg && tsc.is_none() {
            log::warn!("vm: host TSC frequency unknown: no tsc_early_khz= (microvm under TCG may hang at boot)");
        }
        let (wd, mut dir_guard) = prepare_work_dir(cfg)?;
        let cmdline = kernel_cmdline(accel.accel, tsc, &cfg.kernel_params);
        let args = qemu_args(cfg, &wd, accel.accel, &cmdline);
        let started = Instant::now();
        let proc = spawn_vmm(&qemu, &args, &wd, cfg)?;
        log::info!(
            "vm: qemu pid {} accel={} ({}), {} vCPU, {} MiB, kernel {}, work dir {}",
            proc.pid(),
            accel.accel,
            accel.reason,
            cfg.vcpus,
            cfg.memory_mib,
            cfg.kernel.display(),
            wd.dir.display()
        );
        // Connect the host ends right away: the guest sees POLLHUP on a port without one.
        // Then a QMP handshake: QEMU answers qmp_capabilities from its main loop, i.e. once
        // every device was created (a bad -device makes QEMU exit after the chardev sockets
        // already exist). On error, dropping `proc` kills QEMU; the guard removes the dir.
        let qmp = async {
            let mut last = String::new();
            let q = agent::connect_socket(&wd.qmp_sock, &mut last).await;
            let mut qmp = Qmp::new(q);
            qmp.execute("qmp_capabilities", None).await.map(|_| qmp)
        };
        let (agent_stream, stdio_stream, qmp) = connect_channels("QEMU", &proc, &wd, qmp).await?;
        log::debug!(
            "vm: qemu {} channels connected after {} ms",
            proc.pid(),
            started.elapsed().as_millis()
        );
        dir_guard.disarm();
        Ok(ProcessVm::new(
            "QEMU",
            proc,
            accel,
            wd,
            started,
            cfg.keep_work_dir,
            (agent_stream, stdio_stream),
            Some(qmp),
        ))
    }

    /// Runs a QMP command (`query-status`, `system_powerdown`, `device_add`...) and returns
    /// its `return` value.
    pub async fn qmp(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut q = self.qmp.lock().await;
        let Some(conn) = q.as_mut() else {
            return Err(Error::io("qmp", std::io::ErrorKind::NotConnected.into()));
        };
        let r = tokio::select! {
            r = conn.execute(command, arguments) => r,
            e = self.proc.wait() => Err(std::io::Error::other(format!(
                "{} exited ({})",
                self.vmm,
                e.map(|e| e.to_string()).unwrap_or_else(|e| e.to_string())
            ))),
        };
        if r.is_err() {
            *q = None;
        }
        r.map_err(|e| Error::io(format!("qmp {command}"), e))
    }

    /// Why this accelerator was chosen.
    pub fn accel_choice(&self) -> &AccelChoice {
        &self.accel
    }

    pub fn qemu_log(&self) -> &Path {
        &self.wd.qemu_log
    }

    fn remove_dir(&self) {
        if self.keep_dir || self.removed.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.wd.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("vm: remove {}: {e}", self.wd.dir.display());
            }
        }
    }

    fn died_error(&self, exit: std::io::Result<VmExit>) -> Error {
        let what = match exit {
            Ok(e) => e.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        boot_error(
            &self.wd,
            format!("{} exited before the agent was ready ({what})", self.vmm),
        )
    }
}

pub(super) fn boot_error(wd: &WorkDir, reason: String) -> Error {
    Error::Boot {
        reason,
        console_tail: tail_lines(&wd.console_log, 40),
        qemu_log: tail_lines(&wd.qemu_log, 20),
    }
}

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
            let _ = fs::remove_dir_all(d);
        }
    }
}

#[async_trait]
impl Vm for ProcessVm {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn accel(&self) -> Accel {
        self.accel.accel
    }

    fn started_at(&self) -> Instant {
        self.started
    }

    fn work_dir(&self) -> &Path {
        &self.wd.dir
    }

    fn agent_socket(&self) -> &Path {
        &self.wd.agent_sock
    }

    fn stdio_socket(&self) -> &Path {
        &self.wd.stdio_sock
    }

    fn console_log(&self) -> &Path {
        &self.wd.console_log
    }

    async fn connect_agent(&self, timeout: Option<Duration>) -> Result<AgentConnection> {
        let timeout = timeout.unwrap_or_else(|| self.default_agent_timeout());
        let stream = self
            .agent_stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let proc = self.proc.clone();
        let died = async move { self.died_error(proc.wait().await) };
        let conn = agent::connect_with(
            &self.wd.agent_sock,
            stream,
            Some(&self.wd.console_log),
            timeout,
            died,
        )
        .await?;
        log::info!(
            "vm: {} {} agent ready {} ms after spawn",
            self.vmm,
            self.pid(),
            self.started.elapsed().as_millis()
        );
        *self.agent.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.client.clone());
        Ok(conn)
    }

    fn agent(&self) -> Option<AgentClient> {
        self.agent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn take_agent_stream(&self) -> Option<UnixStream> {
        self.agent_stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn take_stdio_stream(&self) -> Option<UnixStream> {
        self.stdio_stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    async fn shutdown(&self, timeout: Duration) -> Result<VmExit> {
        let deadline = tokio::time::Instant::now() + timeout;
        if self
            .proc
            .try_wait()
            .ctx(|| format!("wait for {}", self.vmm))?
            .is_none()
        {
            match self.agent() {
                Some(client) => {
                    let empty = Empty::new();
                    // The agent may power off before its answer gets out: an error here is
                    // not a failure, the exit is what counts.
                    let rpc = timeout.min(Duration::from_secs(5));
                    tokio::select! {
                        r = client.shutdown(agent::ctx(rpc), &empty) => {
                            if let Err(e) = r {
                                log::debug!("vm: agent Shutdown: {e}");
                            }
                        }
                        _ = self.proc.wait() => {}
                        _ = tokio::time::sleep(rpc) => {
                            log::warn!("vm: agent Shutdown got no answer in {rpc:?}");
                        }
                    }
                }
                None => {
                    log::debug!(
                        "vm: no agent connected: SIGTERM to {} {}",
                        self.vmm,
                        self.pid()
                    );
                    self.proc
                        .signal(libc::SIGTERM)
                        .ctx(|| format!("signal {}", self.vmm))?;
                }
            }
            if tokio::time::timeout_at(deadline, self.proc.wait())
                .await
                .is_err()
            {
                log::warn!(
                    "vm: {} {} still running {timeout:?} after shutdown: SIGKILL",
                    self.vmm,
                    self.pid()
                );
                self.proc
                    .signal(libc::SIGKILL)
                    .ctx(|| format!("kill {}", self.vmm))?;
            }
        }
        let exit = match tokio::time::timeout(Duration::from_secs(10), self.proc.wait()).await {
            Ok(r) => r.ctx(|| format!("wait for {}", self.vmm))?,
            Err(_) => {
                return Err(Error::io(
                    format!("{} {} did not exit after SIGKILL", self.vmm, self.pid()),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ))
            }
        };
        log::info!("vm: {} {} ended: {exit}", self.vmm, self.pid());
        self.agent.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.remove_dir();
        Ok(exit)
    }

    fn kill(&self) -> Result<()> {
        self.proc
            .signal(libc::SIGKILL)
            .ctx(|| format!("kill {}", self.vmm))
    }

    async fn wait(&self) -> Result<VmExit> {
        self.proc
            .wait()
            .await
            .ctx(|| format!("wait for {}", self.vmm))
    }

    fn try_wait(&self) -> Result<Option<VmExit>> {
        self.proc
            .try_wait()
            .ctx(|| format!("wait for {}", self.vmm))
    }
}

impl Drop for ProcessVm {
    fn drop(&mut self) {
        // Close our channel ends first, then make sure QEMU is gone (Process::drop SIGKILLs
        // and reaps it if we hold the last reference), then remove the directory.
        self.agent_stream.get_mut().map(|s| s.take()).ok();
        self.stdio_stream.get_mut().map(|s| s.take()).ok();
        self.agent.get_mut().map(|s| s.take()).ok();
        if !matches!(self.proc.try_wait(), Ok(Some(_))) {
            let _ = self.proc.signal(libc::SIGKILL);
            let _ = self.proc.wait_blocking(Duration::from_secs(5));
        }
        self.remove_dir();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_decisions() {
        let ok = || Ok(());
        let no = || Err("Permission denied".to_string());
        let d = |w, v, k| decide_accel(w, v, k).map(|c| c.accel);
        assert_eq!(d(Accel::Auto, Some("vmx"), ok()).unwrap(), Accel::Kvm);
        assert_eq!(d(Accel::Auto, Some("svm"), no()).unwrap(), Accel::Tcg);
        // This machine: PVM's /dev/kvm opens but there is no vmx/svm.
        assert_eq!(d(Accel::Auto, None, ok()).unwrap(), Accel::Tcg);
        assert_eq!(d(Accel::Tcg, Some("vmx"), ok()).unwrap(), Accel::Tcg);
        assert_eq!(d(Accel::Kvm, None, ok()).unwrap(), Accel::Kvm);
        assert!(d(Accel::Kvm, Some("vmx"), no()).is_err());
    }

    #[test]
    fn virt_flags() {
        let ci = "processor\t: 0\nflags\t\t: fpu vme sse2 vmx ept\nbugs\t: x\n";
        assert_eq!(cpu_virt_flag(ci), Some("vmx"));
        assert_eq!(cpu_virt_flag("flags\t: fpu svm\n"), Some("svm"));
        assert_eq!(cpu_virt_flag("flags\t: fpu vmxx\nvmx flags\t: ept\n"), None);
    }

    #[test]
    fn tsc() {
        let ci = "model name\t: X\ncpu MHz\t\t: 2596.146\n";
        assert_eq!(tsc_khz_from("", ci), Some(2596146));
        let klog = "<6>[0.0] tsc: Detected 2596.100 MHz processor\n\
                    <6>[1.2] tsc: Refined TSC clocksource calibration: 2596.993 MHz\n";
        assert_eq!(tsc_khz_from(klog, ci), Some(2596993));
        let klog = "<6>[0.0] tsc: Detected 2596.100 MHz processor\n";
        assert_eq!(tsc_khz_from(klog, ci), Some(2596100));
        assert_eq!(tsc_khz_from("", ""), None);
        // On this host at least the cpuinfo fallback works.
        assert!(host_tsc_khz().is_some());
    }

    #[test]
    fn cmdline_and_args() {
        let tcg = kernel_cmdline(Accel::Tcg, Some(2596146), &["loglevel=7".into()]);
        assert_eq!(
            tcg,
            "console=ttyS0 panic=-1 quiet cgroup_no_v1=all tsc_early_khz=2596146 tsc=reliable loglevel=7"
        );
        let kvm = kernel_cmdline(Accel::Kvm, Some(1), &[]);
        assert_eq!(kvm, "console=ttyS0 panic=-1 quiet cgroup_no_v1=all");

        let mut cfg = VmConfig::new("/k/vmlinux", "/k/initramfs.cpio");
        cfg.vcpus = 2;
        cfg.memory_mib = 512;
        let wd = WorkDir::new(Path::new("/run/j,vm"));
        let a = qemu_args(&cfg, &wd, Accel::Tcg, "console=ttyS0");
        let s = a.join(" ");
        assert!(
            s.starts_with(
                "-M microvm,accel=tcg,x-option-roms=off,isa-serial=on,rtc=on \
                 -global virtio-mmio.force-legacy=false -cpu max -m 512M -smp 2"
            ),
            "{s}"
        );
        assert!(
            s.contains("-chardev socket,id=agent,path=/run/j,,vm/agent.sock,server=on,wait=off"),
            "{s}"
        );
        assert!(s.contains("virtserialport,chardev=agent,name=janus.agent"));
        assert!(s.contains("virtserialport,chardev=stdio,name=janus.stdio"));
        assert!(s.contains("-serial chardev:console"));
        assert!(!s.contains("memory-backend"));
        cfg.shared_memory = true;
        cfg.extra_args = vec!["-device".into(), "x".into()];
        let a = qemu_args(&cfg, &wd, Accel::Kvm, "c");
        let s = a.join(" ");
        assert!(
            s.contains(
                "accel=kvm,x-option-roms=off,isa-serial=on,rtc=on,memory-backend=mem \
                 -global virtio-mmio.force-legacy=false -cpu host"
            ),
            "{s}"
        );
        assert!(s.contains("-object memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(s.ends_with("-device x"));
    }

    #[test]
    fn missing_qemu() {
        let e = find_qemu(Some(Path::new("/nonexistent/qemu"))).unwrap_err();
        assert!(
            e.to_string().contains("apt-get install qemu-system-x86"),
            "{e}"
        );
    }

    #[test]
    fn cleanup_leftover() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("vm");
        fs::create_dir(&dir).unwrap();
        let wd = WorkDir::new(&dir);
        // A process whose command line names the pidfile, like a QEMU would.
        // One process (no shell whose child would outlive it and hold the test's stdout).
        fs::write(&wd.pidfile, "").unwrap();
        let mut child = Command::new("tail")
            .args(["-f", wd.pidfile.to_str().unwrap()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        fs::write(&wd.pidfile, format!("{}\n", child.id())).unwrap();
        // The child must have exec'd (its command line naming the dir) before cleanup looks.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let t = std::time::Instant::now();
        while !fs::read(&cmdline)
            .map(|c| String::from_utf8_lossy(&c).contains(dir.to_str().unwrap()))
            .unwrap_or(false)
        {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "child did not exec"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(cleanup_work_dir(&dir).unwrap());
        assert!(child.wait().unwrap().code().is_none());
        assert!(!dir.exists());
        // A recycled pid (our own) is not killed.
        fs::create_dir(&dir).unwrap();
        fs::write(&wd.pidfile, format!("{}\n", std::process::id())).unwrap();
        assert!(!cleanup_work_dir(&dir).unwrap());
        assert!(!dir.exists());
        assert!(!cleanup_work_dir(&dir).unwrap());
    }
}
