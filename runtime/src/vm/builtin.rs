//! The `builtin` driver: our own KVM microVM monitor, `janus-vmm` (the `vmm` crate), run as a
//! separate process so that a VMM crash cannot take the shim down.
//!
//! The guest sees what the QEMU driver gives it: a multiport virtio-console whose ports
//! `janus.agent` and `janus.stdio` are unix sockets in the work directory (janus-vmm follows
//! QEMU's `server=on,wait=off` semantics, so the agent and the host side are the same code),
//! virtio-fs through virtiofsd (vhost-user), virtio-net on a tap, ttyS0 into `console.log`,
//! its ACPI S5 power-off ending the process. janus-vmm writes its pidfile (`vmm.pid`) and
//! carries the pidfile's path on its command line, so [`super::cleanup_work_dir`] recognises
//! a leftover one after a crash.
//!
//! KVM only: the builtin VMM has no software emulation. It needs hardware virtualization
//! (vmx/svm) to run a Linux guest; on a host without it (a nested software KVM such as PVM)
//! KVM still opens but a Linux guest cannot boot, which
//! [`hardware_virtualization`](super::hardware_virtualization) tells callers
//! ([`super::driver`] among them) so they can refuse early.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::accel::choose_accel;
use super::vmm_process::{check_config, kernel_cmdline, Launch, ProcessVm};
use super::workdir::{VmmFiles, WorkDir};
use super::{Accel, Error, Hypervisor, Result, Vm, VmConfig, AGENT_PORT, STDIO_PORT};

pub const VMM_BINARY: &str = "janus-vmm";
/// janus-vmm's log and pidfile in the work directory.
pub const VMM_FILES: VmmFiles = VmmFiles {
    log: "vmm.log",
    pidfile: "vmm.pid",
};

/// The builtin driver.
#[derive(Clone, Debug, Default)]
pub struct Builtin;

impl Builtin {
    pub fn new() -> Self {
        Builtin
    }

    /// [`Hypervisor::start`] with the concrete type.
    pub async fn start_vm(&self, config: &VmConfig) -> Result<ProcessVm> {
        start(config).await
    }
}

#[async_trait]
impl Hypervisor for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    async fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>> {
        Ok(Box::new(start(config).await?))
    }
}

/// janus-vmm: `configured`, else next to the running binary (a release build puts the shim
/// and janus-vmm side by side; the shim may be reached through a symlink), else on PATH.
pub fn find_vmm(configured: Option<&Path>) -> Result<PathBuf> {
    let missing = |path: PathBuf| {
        Error::MissingAsset {
        what: VMM_BINARY.into(),
        path,
        hint: "cargo build --release -p vmm (hack/demo.sh builds it); janus-vmm must sit next to the shim or on PATH".into(),
    }
    };
    if let Some(p) = configured {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(missing(p.to_path_buf()))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.canonicalize().ok())
        .and_then(|e| Some(e.parent()?.join(VMM_BINARY)))
        .filter(|p| p.is_file());
    if let Some(p) = beside {
        return Ok(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(VMM_BINARY))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| missing(PathBuf::from(format!("$PATH/{VMM_BINARY}"))))
}

/// janus-vmm's arguments for `cfg`.
pub fn vmm_args(cfg: &VmConfig, wd: &WorkDir, cmdline: &str) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    let mut a = vec![
        "--kernel".into(),
        p(&cfg.kernel),
        "--initrd".into(),
        p(&cfg.initrd),
        "--cmdline".into(),
        cmdline.into(),
        "--mem-mib".into(),
        cfg.memory_mib.to_string(),
        "--vcpus".into(),
        cfg.vcpus.to_string(),
        "--serial-log".into(),
        p(&wd.console_log),
        "--pidfile".into(),
        p(&wd.pidfile),
        "--port".into(),
        format!("{AGENT_PORT}={}", p(&wd.agent_sock)),
        "--port".into(),
        format!("{STDIO_PORT}={}", p(&wd.stdio_sock)),
    ];
    if let Some(name) = &cfg.name {
        a.extend(["--name".into(), name.clone()]);
    }
    if cfg.shared_memory || cfg.fs.is_some() {
        a.push("--shared-memory".into());
    }
    if let Some(fs) = &cfg.fs {
        a.extend(["--fs".into(), format!("{}={}", fs.tag, p(&fs.socket))]);
    }
    for n in &cfg.net {
        a.extend(["--tap".into(), format!("{},mac={}", n.tap, n.mac)]);
    }
    a.extend(cfg.extra_args.iter().cloned());
    a
}

async fn start(cfg: &VmConfig) -> Result<ProcessVm> {
    let vmm = find_vmm(cfg.vmm_binary.as_deref())?;
    check_config(cfg)?;
    if cfg.accel == Accel::Tcg {
        return Err(Error::Config(
            "the builtin hypervisor has no software emulation (accel = tcg): use hypervisor = \"qemu\""
                .into(),
        ));
    }
    let accel = choose_accel(Accel::Kvm)?;
    let cmdline = kernel_cmdline(Accel::Kvm, None, &cfg.kernel_params);
    let launch = Launch {
        vmm: "janus-vmm",
        binary: &vmm,
        accel,
        files: VMM_FILES,
        qmp: false,
    };
    ProcessVm::launch(cfg, launch, |wd| vmm_args(cfg, wd, &cmdline)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{FsShare, NetDevice};

    #[test]
    fn args() {
        let mut cfg = VmConfig::new("/g/vmlinux", "/g/initramfs.cpio");
        cfg.name = Some("c1".into());
        cfg.fs = Some(FsShare {
            tag: "janus".into(),
            socket: "/run/j/vfs.sock".into(),
        });
        cfg.net.push(NetDevice {
            tap: "tap0_janus".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
        });
        let wd = WorkDir::new(Path::new("/run/j/vm"), VMM_FILES);
        let a = vmm_args(&cfg, &wd, "console=ttyS0").join(" ");
        for want in [
            "--kernel /g/vmlinux --initrd /g/initramfs.cpio --cmdline console=ttyS0",
            "--mem-mib 256 --vcpus 1",
            "--port janus.agent=/run/j/vm/agent.sock --port janus.stdio=/run/j/vm/stdio.sock",
            "--name c1 --shared-memory --fs janus=/run/j/vfs.sock",
            "--tap tap0_janus,mac=aa:bb:cc:dd:ee:ff",
        ] {
            assert!(a.contains(want), "{want} in {a}");
        }
    }

    #[test]
    fn missing_vmm_names_the_fix() {
        let e = find_vmm(Some(Path::new("/nonexistent/janus-vmm"))).unwrap_err();
        assert!(
            e.to_string().contains("cargo build --release -p vmm"),
            "{e}"
        );
    }
}
