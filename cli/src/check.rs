//! `janus check`: what this node needs for Janus, and whether it is there.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use runtime::linux::cgroups;

pub const DEFAULT_CONFIG: &str = "/etc/janus/config.toml";
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
const SHIM: &str = "containerd-shim-janus-v2";

#[derive(PartialEq, Eq, Clone, Copy)]
enum Level {
    Ok,
    Warn,
    Fail,
}

struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, level: Level, what: &str, detail: impl AsRef<str>) {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => {
                self.failed = true;
                "FAIL"
            }
        };
        println!("[{tag}] {what:<22} {}", detail.as_ref());
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

pub fn default_guest_dir() -> PathBuf {
    runtime::vm::default_guest_dir()
}

/// VM mode prerequisites and a throwaway boot to agent-ready. Problems are failures when the
/// config selects VM mode, warnings otherwise (namespace mode needs none of it, but the
/// `containerd-shim-janus-vm-v2` alias does).
/// Returns whether everything VM mode needs is in place.
fn vm_checks(r: &mut Report, guest_dir: &Path, required: bool, builtin: bool) -> bool {
    use runtime::vm::{qemu, VmConfig};
    let bad = if required { Level::Fail } else { Level::Warn };
    match qemu::find_qemu(None) {
        Ok(q) => r.line(Level::Ok, "qemu", q.display().to_string()),
        Err(e) => {
            r.line(bad, "qemu", e.to_string());
            return false;
        }
    }
    match runtime::vm::virtiofsd::find(None) {
        Ok(vfs) => r.line(Level::Ok, "virtiofsd", vfs.display().to_string()),
        Err(e) => {
            r.line(bad, "virtiofsd", e.to_string());
            return false;
        }
    }
    // QEMU runs in its own work dir: give it absolute paths.
    let guest_dir = std::fs::canonicalize(guest_dir).unwrap_or_else(|_| guest_dir.to_path_buf());
    let cfg = match VmConfig::from_guest_dir(&guest_dir) {
        Ok(c) => c,
        Err(e) => {
            r.line(bad, "guest image", format!("{e}"));
            return false;
        }
    };
    r.line(
        Level::Ok,
        "guest image",
        format!("{} + {}", cfg.kernel.display(), cfg.initrd.display()),
    );
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            r.line(bad, "test boot", format!("no async runtime: {e}"));
            return false;
        }
    };
    // The driver the config selects (builtin only gets here with vmx/svm present).
    let driver = match runtime::vm::driver(if builtin { "builtin" } else { "qemu" }) {
        Ok(d) => d,
        Err(e) => {
            r.line(bad, "test boot", e.to_string());
            return false;
        }
    };
    let vmm = if builtin { "janus-vmm" } else { "QEMU" };
    let res = rt.block_on(async {
        let vm = driver.start(&cfg).await?;
        let conn = vm.connect_agent(None).await;
        let elapsed = vm.started_at().elapsed();
        let accel = vm.accel();
        let _ = vm.shutdown(std::time::Duration::from_secs(20)).await;
        conn.map(|c| (elapsed, accel, c.health.version))
    });
    match res {
        Ok((t, accel, version)) => r.line(
            Level::Ok,
            "test boot",
            format!(
                "agent {version} ready {} ms after {vmm} start ({accel})",
                t.as_millis()
            ),
        ),
        Err(e) => {
            r.line(bad, "test boot", format!("{e}"));
            return false;
        }
    }
    r.line(
        Level::Ok,
        "VM mode",
        "one VM per pod (RuntimeClass janus-vm) or per ctr container \
         (io.containerd.janus-vm.v2); pod networking needs iproute2 (ip, tc)",
    );
    true
}

pub fn check(address: &str, config: &Path, shim: Option<PathBuf>, guest_dir: &Path) -> ExitCode {
    let mut r = Report { failed: false };
    let root = nix::unistd::geteuid().is_root();
    r.line(
        if root { Level::Ok } else { Level::Fail },
        "privileges",
        if root {
            "running as root"
        } else {
            "not root: the shim needs root (namespaces, mounts, cgroups)"
        },
    );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    r.line(Level::Ok, "host kernel", kernel.trim());

    // cgroups
    match cgroups::host_mode() {
        cgroups::Mode::V2 => r.line(Level::Ok, "cgroups", "v2 (unified)"),
        cgroups::Mode::V1 => {
            let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let ctrls: Vec<String> = cgroups::v1_mounts(&mi).into_keys().collect();
            let need = [
                "memory", "cpu", "cpuacct", "pids", "freezer", "devices", "cpuset",
            ];
            let missing: Vec<&str> = need
                .iter()
                .copied()
                .filter(|c| !ctrls.iter().any(|x| x == c))
                .collect();
            let hybrid = Path::new("/sys/fs/cgroup/unified").exists();
            if missing.is_empty() {
                r.line(
                    Level::Ok,
                    "cgroups",
                    format!(
                        "v1{} with {}",
                        if hybrid { " (hybrid)" } else { "" },
                        ctrls.join(",")
                    ),
                );
            } else {
                r.line(
                    Level::Fail,
                    "cgroups",
                    format!(
                        "v1 controllers missing: {} (mount them under /sys/fs/cgroup)",
                        missing.join(",")
                    ),
                );
            }
        }
    }
    // The cgroup driver the shim uses for systemd-form cgroupsPaths (kubelet's systemd driver).
    if runtime::linux::systemd::host_runs_systemd() {
        let bus = runtime::linux::systemd::SYSTEM_BUS_SOCKET;
        if Path::new(bus).exists() {
            r.line(
                Level::Ok,
                "cgroup driver",
                "systemd: containers with a slice:prefix:name cgroupsPath run in transient \
                 scopes (D-Bus)",
            );
        } else {
            r.line(
                Level::Fail,
                "cgroup driver",
                format!(
                    "systemd runs this host but {bus} is missing: the shim cannot start \
                     scopes (install and start dbus)"
                ),
            );
        }
    } else {
        r.line(
            Level::Ok,
            "cgroup driver",
            "cgroupfs (no systemd): slice:prefix:name cgroupsPaths get the directories \
             systemd would make",
        );
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    r.line(
        if fs.contains("overlay") {
            Level::Ok
        } else {
            Level::Warn
        },
        "overlayfs",
        if fs.contains("overlay") {
            "available (containerd's default snapshotter)"
        } else {
            "not loaded: `modprobe overlay` (containerd's overlayfs snapshotter needs it)"
        },
    );
    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    r.line(
        if userns > 0 { Level::Ok } else { Level::Warn },
        "user namespaces",
        if userns > 0 {
            format!("enabled (max {userns})")
        } else {
            "disabled: specs with a user namespace will fail".to_string()
        },
    );
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.contains("Seccomp:"))
        .unwrap_or(false);
    r.line(
        if seccomp { Level::Ok } else { Level::Warn },
        "seccomp",
        if seccomp {
            "supported by the kernel"
        } else {
            "not supported: seccomp profiles will fail"
        },
    );

    // containerd and the shim
    match run("containerd", &["--version"]) {
        Some(v) => r.line(Level::Ok, "containerd", v),
        None => r.line(
            Level::Fail,
            "containerd",
            "not found on PATH: `apt-get install containerd`",
        ),
    }
    if Path::new(address).exists() {
        match run("ctr", &["--address", address, "version"]) {
            Some(_) => r.line(Level::Ok, "containerd socket", format!("{address} answers")),
            None => r.line(
                Level::Fail,
                "containerd socket",
                format!("{address} exists but does not answer (is containerd running?)"),
            ),
        }
    } else {
        r.line(
            Level::Warn,
            "containerd socket",
            format!("{address} not found (containerd not running, or pass --address)"),
        );
    }
    let shim = shim.or_else(|| find_in_path(SHIM));
    match shim {
        Some(p) => match run(p.to_str().unwrap_or(SHIM), &["-v"]) {
            Some(v) => r.line(Level::Ok, "shim", format!("{} ({})", p.display(), v.lines().nth(1).unwrap_or("").trim())),
            None => r.line(Level::Fail, "shim", format!("{} does not run", p.display())),
        },
        None => r.line(
            Level::Fail,
            "shim",
            format!("{SHIM} not on PATH: install it where containerd finds it (containerd 1.6 ignores runtime_path)"),
        ),
    }

    // config
    let mut vm_mode = false;
    let mut hypervisor = "qemu".to_string();
    match std::fs::read_to_string(config) {
        Ok(text) => match text.parse::<toml::Table>() {
            Ok(t) => {
                let mode = t
                    .get("mode")
                    .and_then(|m| m.as_str())
                    .unwrap_or("namespace");
                vm_mode = mode == "vm";
                if let Some(h) = t
                    .get("vm")
                    .and_then(|v| v.get("hypervisor"))
                    .and_then(|h| h.as_str())
                {
                    hypervisor = h.to_string();
                }
                r.line(
                    Level::Ok,
                    "config",
                    format!(
                        "{}: mode = {mode} (runtime janus; janus-vm always runs VMs)",
                        config.display()
                    ),
                );
            }
            Err(e) => r.line(
                Level::Fail,
                "config",
                format!("{}: {}", config.display(), e.to_string().replace('\n', " ")),
            ),
        },
        Err(_) => r.line(
            Level::Ok,
            "config",
            format!(
                "{} absent: defaults (runtime janus: namespace mode; janus-vm: VM mode)",
                config.display()
            ),
        ),
    }

    // VM mode prerequisites
    let hw = runtime::vm::hardware_virtualization().is_some();
    let kvm = Path::new("/dev/kvm").exists();
    let accel = match (hw, kvm) {
        (true, true) => "KVM usable (vmx/svm present, /dev/kvm exists)".to_string(),
        (false, true) => {
            "/dev/kvm exists but the CPU shows no vmx/svm: VMs would use TCG (software emulation)"
                .to_string()
        }
        (_, false) => "no /dev/kvm: VMs would use TCG (software emulation)".to_string(),
    };
    r.line(Level::Ok, "virtualization", accel);
    // Which VMM a VM would get. Our own (janus-vmm, vm.hypervisor = "builtin") runs Linux
    // only on hardware virtualization: a software KVM (no vmx/svm, e.g. nested PVM) emulates
    // guest kernel code one instruction at a time and cannot run all of it.
    let vmm = runtime::vm::builtin::find_vmm(None);
    let vmm_at = match &vmm {
        Ok(p) => format!("janus-vmm at {}", p.display()),
        Err(e) => e.to_string(),
    };
    let (level, driver) = match (hypervisor.as_str(), hw && kvm, &vmm) {
        ("builtin", true, Ok(_)) => (Level::Ok, format!("builtin ({vmm_at}) with KVM")),
        ("builtin", true, Err(_)) => (Level::Fail, format!("builtin, but {vmm_at}")),
        ("builtin", false, _) => (
            if vm_mode { Level::Fail } else { Level::Warn },
            "vm.hypervisor = \"builtin\" needs vmx/svm, which this CPU lacks: VM containers \
             would fail; use hypervisor = \"qemu\" (TCG) here"
                .to_string(),
        ),
        ("qemu", true, _) => (
            Level::Ok,
            format!("qemu with KVM (vm.hypervisor = \"builtin\" would use {vmm_at})"),
        ),
        ("qemu", false, _) => (
            Level::Ok,
            "qemu with TCG; the builtin driver (janus-vmm) needs vmx/svm to run Linux guests"
                .to_string(),
        ),
        (other, _, _) => (
            Level::Fail,
            format!("vm.hypervisor = {other:?}: \"qemu\" or \"builtin\""),
        ),
    };
    r.line(level, "hypervisor driver", driver);
    let builtin_ok = hypervisor == "builtin" && level == Level::Ok;
    let vm_ready = vm_checks(&mut r, guest_dir, vm_mode, builtin_ok) && level != Level::Fail;

    println!();
    if r.failed {
        println!("janus check: problems found (see FAIL lines)");
        ExitCode::from(1)
    } else {
        if vm_ready {
            println!("janus check: ready for namespace mode and VM mode");
        } else {
            println!("janus check: ready for namespace mode (VM mode: see the warnings)");
        }
        ExitCode::SUCCESS
    }
}
