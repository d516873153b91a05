//! The `qemu` driver: `qemu-system-x86_64 -M microvm`.
//!
//! - Accelerator: KVM only when /proc/cpuinfo shows vmx or svm *and* /dev/kvm opens; TCG
//!   otherwise (this is logged, and [`Vm::accel`] reports it). Under TCG the CPU is
//!   [`TCG_CPU`] (`host` needs KVM) and the kernel gets `tsc_early_khz=<host TSC kHz> tsc=reliable`:
//!   without it microvm under TCG hangs in ~1 boot of 6 (TSC calibration fails, no fallback
//!   timer), and the clocksource watchdog may demote the TSC to jiffies on a busy host.
//! - Devices: microvm's virtio-mmio, described by ACPI (Debian's kernel has no
//!   `VIRTIO_MMIO_CMDLINE_DEVICES`). One `virtio-serial-device` with two ports, `janus.agent`
//!   and `janus.stdio`, each a unix socket served by QEMU in the work directory. QEMU keeps
//!   guest writes to a port until a host side is connected, and the guest sees POLLHUP/EOF on a
//!   port without a host side, so [`Qemu::start`] connects to both as soon as QEMU made them.
//! - Console: ttyS0 into `<work dir>/console.log`; QEMU's own stderr into `qemu.log`.
//! - QMP on `qmp.sock`: start() completes a `qmp_capabilities` handshake, which QEMU answers
//!   from its main loop, i.e. after every device was created; [`ProcessVm::qmp`] runs commands
//!   (hotplug, query-status) later.
//! - `-no-reboot` + `panic=-1`: a guest power-off, reboot, panic or dying PID 1 ends QEMU.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use async_trait::async_trait;

use super::accel::choose_accel;
use super::vmm_process::{check_config, kernel_cmdline, Launch, ProcessVm};
use super::workdir::{VmmFiles, WorkDir};
use super::{Accel, Error, Hypervisor, Result, Vm, VmConfig, AGENT_PORT, STDIO_PORT};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// QEMU's log and pidfile in the work directory.
pub const QEMU_FILES: VmmFiles = VmmFiles {
    log: "qemu.log",
    pidfile: "qemu.pid",
};

/// The QEMU driver.
#[derive(Clone, Debug, Default)]
pub struct Qemu;

impl Qemu {
    pub fn new() -> Self {
        Qemu
    }

    /// [`Hypervisor::start`] with the concrete type (for [`ProcessVm::qmp`]).
    pub async fn start_vm(&self, config: &VmConfig) -> Result<ProcessVm> {
        start(config).await
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>> {
        Ok(Box::new(start(config).await?))
    }
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

/// QEMU's option syntax: a comma inside a value is written twice.
fn opt_path(p: &Path) -> String {
    String::from_utf8_lossy(p.as_os_str().as_bytes()).replace(',', ",,")
}

/// The CPU model under TCG: everything QEMU emulates, less the fast-string features. With
/// ERMS/FSRM the guest kernel and libc copy with `rep movsb`, which TCG runs one byte per
/// step; without them they use wider moves: stdio out of a guest ~2x faster (112-139 ->
/// 200-262 MB/s), boot CPU ~8 % less.
pub const TCG_CPU: &str = "max,-erms,-fsrm";

/// The QEMU arguments (without the binary) for `cfg` with the resolved accelerator.
pub fn qemu_args(cfg: &VmConfig, wd: &WorkDir, accel: Accel, cmdline: &str) -> Vec<String> {
    let accel_opt = match (accel, cfg.tcg_tb_mib) {
        (Accel::Kvm, _) => "kvm".to_string(),
        (_, Some(mib)) => format!("tcg,tb-size={mib}"),
        (_, None) => "tcg".to_string(),
    };
    let mut machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on".to_string();
    if cfg.shared_memory {
        machine.push_str(",memory-backend=mem");
    }
    let mut a: Vec<String> = vec![
        // -accel, not -M accel=: only -accel takes the accelerator's own options (tb-size).
        "-accel".into(),
        accel_opt,
        "-M".into(),
        machine,
        // microvm's virtio-mmio defaults to the legacy (v1) interface, which vhost-user
        // backends (virtiofsd) refuse; the guest kernel drives v2 fine.
        "-global".into(),
        "virtio-mmio.force-legacy=false".into(),
        "-cpu".into(),
        if accel == Accel::Kvm { "host" } else { TCG_CPU }.into(),
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
        format!("virtserialport,chardev=agent,name={}", AGENT_PORT),
        "-chardev".into(),
        format!(
            "socket,id=stdio,path={},server=on,wait=off",
            opt_path(&wd.stdio_sock)
        ),
        "-device".into(),
        format!("virtserialport,chardev=stdio,name={}", STDIO_PORT),
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

/// Boots a VM with QEMU.
async fn start(cfg: &VmConfig) -> Result<ProcessVm> {
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
    let cmdline = kernel_cmdline(accel.accel, tsc, &cfg.kernel_params);
    let resolved = accel.accel;
    let launch = Launch {
        vmm: "QEMU",
        binary: &qemu,
        accel,
        files: QEMU_FILES,
        qmp: true,
    };
    ProcessVm::launch(cfg, launch, |wd| qemu_args(cfg, wd, resolved, &cmdline)).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "console=ttyS0 panic=-1 quiet cgroup_no_v1=all tsc_early_khz=2596146 tsc=reliable \
             mitigations=off loglevel=7"
        );
        let kvm = kernel_cmdline(Accel::Kvm, Some(1), &[]);
        assert_eq!(kvm, "console=ttyS0 panic=-1 quiet cgroup_no_v1=all");

        let mut cfg = VmConfig::new("/k/vmlinux", "/k/initramfs.cpio");
        cfg.vcpus = 2;
        cfg.memory_mib = 512;
        let wd = WorkDir::new(Path::new("/run/j,vm"), QEMU_FILES);
        let a = qemu_args(&cfg, &wd, Accel::Tcg, "console=ttyS0");
        let s = a.join(" ");
        assert!(
            s.starts_with(
                "-accel tcg -M microvm,x-option-roms=off,isa-serial=on,rtc=on \
                 -global virtio-mmio.force-legacy=false -cpu max,-erms,-fsrm -m 512M -smp 2"
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
                "-accel kvm -M microvm,x-option-roms=off,isa-serial=on,rtc=on,memory-backend=mem \
                 -global virtio-mmio.force-legacy=false -cpu host"
            ),
            "{s}"
        );
        assert!(s.contains("-object memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(s.ends_with("-device x"));
        // The TCG cache size reaches QEMU under TCG only.
        cfg.tcg_tb_mib = Some(24);
        assert!(qemu_args(&cfg, &wd, Accel::Tcg, "c")
            .join(" ")
            .starts_with("-accel tcg,tb-size=24 -M microvm,"));
        assert!(qemu_args(&cfg, &wd, Accel::Kvm, "c")
            .join(" ")
            .starts_with("-accel kvm -M microvm,"));
    }

    #[test]
    fn missing_qemu() {
        let e = find_qemu(Some(Path::new("/nonexistent/qemu"))).unwrap_err();
        assert!(
            e.to_string().contains("apt-get install qemu-system-x86"),
            "{e}"
        );
    }
}
