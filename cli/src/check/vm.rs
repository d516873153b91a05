//! VM mode: the hypervisor driver, QEMU, virtiofsd, the guest image and a throwaway test boot
//! to agent-ready, with the VM settings of the node default config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use janus_config::Config;
use runtime::vm::{self, VmConfig};

use super::report::Report;

/// What the VM checks are given.
pub struct VmChecks<'a> {
    /// The node default config and where it was read from.
    pub config: &'a Config,
    pub config_path: &'a Path,
    /// Where the guest image is when the config names no vm.kernel / vm.initrd.
    pub guest_dir: &'a Path,
    /// VM pods are expected: problems are failures, else warnings.
    pub required: bool,
}

/// Runs the VM checks; returns whether the test VM booted to agent-ready.
pub fn vm_checks(r: &mut Report, c: &VmChecks) -> bool {
    r.vm = true;
    let booted = driver_line(r, c).is_some_and(|builtin| boot_checks(r, c, builtin));
    r.vm = false;
    booted
}

/// The virtualization line and the driver the config selects (`vm.hypervisor`). Returns
/// whether it is the builtin one, or `None` where it cannot run here.
fn driver_line(r: &mut Report, c: &VmChecks) -> Option<bool> {
    let hw = vm::hardware_virtualization().is_some();
    let kvm = Path::new("/dev/kvm").exists();
    r.ok(
        "virtualization",
        match (hw, kvm) {
            (true, true) => "KVM usable (vmx/svm present, /dev/kvm exists)",
            (false, true) => {
                "/dev/kvm exists but the CPU shows no vmx/svm: VMs would use TCG (software \
                 emulation)"
            }
            (_, false) => "no /dev/kvm: VMs would use TCG (software emulation)",
        },
    );
    // Our own VMM (janus-vmm, vm.hypervisor = "builtin") runs Linux only on hardware
    // virtualization: a software KVM (no vmx/svm, e.g. nested PVM) emulates guest kernel code
    // one instruction at a time and cannot run all of it.
    let vmm = vm::builtin::find_vmm(None);
    let vmm_at = match &vmm {
        Ok(p) => format!("janus-vmm at {}", p.display()),
        Err(e) => e.to_string(),
    };
    let what = "hypervisor driver";
    let from = format!("vm.hypervisor in {}", c.config_path.display());
    match (
        c.config.vm.hypervisor.as_deref().unwrap_or("qemu"),
        hw && kvm,
        &vmm,
    ) {
        ("builtin", true, Ok(_)) => r.ok(what, format!("builtin ({vmm_at}) with KVM")),
        ("builtin", true, Err(_)) => {
            let fix = "cargo build --release -p vmm; install -m 0755 target/release/janus-vmm \
                       /usr/local/bin/";
            r.problem(c.required, what, format!("builtin, but {vmm_at}"), fix);
            return None;
        }
        ("builtin", false, _) => {
            r.problem(
                c.required,
                what,
                "vm.hypervisor = \"builtin\" needs vmx/svm, which this CPU lacks: VM containers \
                 would fail",
                format!("use hypervisor = \"qemu\" (TCG) here ({from})"),
            );
            return None;
        }
        ("qemu", true, _) => r.ok(
            what,
            format!("qemu with KVM (vm.hypervisor = \"builtin\" would use {vmm_at})"),
        ),
        ("qemu", false, _) => r.ok(
            what,
            "qemu with TCG; the builtin driver (janus-vmm) needs vmx/svm to run Linux guests",
        ),
        // The config's rules refuse other names at load; kept for a driver added there only.
        (other, _, _) => {
            r.fail(
                what,
                format!("vm.hypervisor = {other:?} is not a driver of this janus"),
                format!("set \"qemu\" or \"builtin\" ({from})"),
            );
            return None;
        }
    }
    Some(c.config.vm.hypervisor.as_deref() == Some("builtin"))
}

/// QEMU (for the qemu driver), virtiofsd, the guest image, and the test boot.
fn boot_checks(r: &mut Report, c: &VmChecks, builtin: bool) -> bool {
    // The binaries the shim will use: the config's `vm.qemu` / `vm.virtiofsd`, else its search.
    let qemu = vm::qemu::find_qemu(c.config.vm.qemu.as_deref());
    if !builtin && !found(r, c.required, "qemu", qemu) {
        return false;
    }
    let virtiofsd = vm::virtiofsd::find(c.config.vm.virtiofsd.as_deref());
    if !found(r, c.required, "virtiofsd", virtiofsd) {
        return false;
    }
    let Some(cfg) = guest_image(r, c) else {
        return false;
    };
    test_boot(r, c.required, cfg, builtin)
}

/// An ok line with the path, or a problem with the asset's hint as the fix.
fn found(r: &mut Report, required: bool, what: &str, res: vm::Result<PathBuf>) -> bool {
    match res {
        Ok(p) => {
            r.ok(what, p.display().to_string());
            true
        }
        Err(e) => {
            let (detail, fix) = split_hint(&e);
            r.problem(required, what, detail, fix);
            false
        }
    }
}

/// A missing asset's message and its hint, apart.
fn split_hint(e: &vm::Error) -> (String, String) {
    match e {
        vm::Error::MissingAsset { what, path, hint } => (
            format!("{what} not found at {}", path.display()),
            hint.clone(),
        ),
        other => (other.to_string(), "see docs/guest.md".to_string()),
    }
}

/// The guest kernel and initramfs the shim would boot: the config's vm.kernel / vm.initrd, the
/// guest dir for what it does not name (as the shim's `vm_config` in sandbox/vm/pod.rs), sized
/// as the config says.
fn guest_image(r: &mut Report, c: &VmChecks) -> Option<VmConfig> {
    let v = &c.config.vm;
    // QEMU runs in its own work dir: give it absolute paths.
    let dir = std::fs::canonicalize(c.guest_dir).unwrap_or_else(|_| c.guest_dir.to_path_buf());
    let base = match (&v.kernel, &v.initrd) {
        (Some(k), Some(i)) => Ok(VmConfig::new(k, i)),
        _ => VmConfig::from_guest_dir(&dir),
    };
    let mut cfg = match base {
        Ok(cfg) => cfg,
        Err(e) => {
            let (detail, fix) = split_hint(&e);
            r.problem(c.required, "guest image", detail, fix);
            return None;
        }
    };
    cfg.kernel = v.kernel.clone().unwrap_or(cfg.kernel);
    cfg.initrd = v.initrd.clone().unwrap_or(cfg.initrd);
    for (key, p) in [("vm.kernel", &cfg.kernel), ("vm.initrd", &cfg.initrd)] {
        if !p.is_file() {
            r.problem(
                c.required,
                "guest image",
                format!(
                    "{key} = {:?} in {}: no such file",
                    p.display(),
                    c.config_path.display()
                ),
                format!("{} (or correct {key})", vm::GUEST_HINT),
            );
            return None;
        }
    }
    let named = if v.kernel.is_some() || v.initrd.is_some() {
        format!(" (vm.kernel/vm.initrd of {})", c.config_path.display())
    } else {
        String::new()
    };
    r.ok(
        "guest image",
        format!("{} + {}{named}", cfg.kernel.display(), cfg.initrd.display()),
    );
    cfg.vcpus = v.vcpus.unwrap_or(1);
    cfg.memory_mib = v.memory_mib.unwrap_or(256);
    cfg.tcg_tb_mib = v.tcg_tb_mib;
    cfg.kernel_params = v.kernel_params.clone();
    Some(cfg)
}

/// Boots `cfg` with the selected driver until the agent answers, then shuts it down.
fn test_boot(r: &mut Report, required: bool, cfg: VmConfig, builtin: bool) -> bool {
    // The boot error carries the VMM's output and the guest console's tail.
    let fix = "read the VMM and guest console output in the detail; docs/guest.md";
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            r.problem(required, "test boot", format!("no async runtime: {e}"), fix);
            return false;
        }
    };
    let driver = match vm::driver(if builtin { "builtin" } else { "qemu" }) {
        Ok(d) => d,
        Err(e) => {
            r.problem(required, "test boot", e.to_string(), fix);
            return false;
        }
    };
    let vmm = if builtin { "janus-vmm" } else { "QEMU" };
    let res = rt.block_on(async {
        let vm = driver.start(&cfg).await?;
        let conn = vm.connect_agent(None).await;
        let elapsed = vm.started_at().elapsed();
        let accel = vm.accel();
        let _ = vm.shutdown(Duration::from_secs(20)).await;
        conn.map(|c| (elapsed, accel, c.health.version))
    });
    match res {
        Ok((t, accel, version)) => r.ok(
            "test boot",
            format!(
                "agent {version} ready {} ms after {vmm} start ({accel})",
                t.as_millis()
            ),
        ),
        Err(e) => {
            r.problem(required, "test boot", e.to_string(), fix);
            return false;
        }
    }
    r.ok(
        "VM mode",
        "one VM per pod (RuntimeClass janus-vm) or per ctr container (io.containerd.janus-vm.v2)",
    );
    true
}
