//! Early boot as PID 1: pseudo filesystems, kernel modules, reaping, power-off.

use std::sync::OnceLock;

use nix::mount::{mount, MsFlags};

/// Modules loaded at boot, for GuestDetails.
pub static MODULES: OnceLock<Vec<String>> = OnceLock::new();

fn mnt(src: &str, dst: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(dst);
    if let Err(e) = mount(Some(src), dst, Some(fstype), flags, data) {
        if e != nix::errno::Errno::EBUSY {
            crate::log_line(&format!("mount {fstype} on {dst}: {e}"));
        }
    }
}

pub fn early() {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", "proc", nodev, None);
    mnt("sysfs", "/sys", "sysfs", nodev, None);
    mnt(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );
    mnt("shm", "/dev/shm", "tmpfs", nodev, Some("mode=1777"));
    mnt(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    mnt(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None);
    // Containers need the memory, cpu, pids, io controllers in the subtree.
    let _ = std::fs::write(
        "/sys/fs/cgroup/cgroup.subtree_control",
        "+cpu +cpuset +memory +pids +io",
    );
    MODULES.get_or_init(load_modules);
    // SAFETY: prctl with integer arguments: we reap orphans as init must anyway.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

fn load_modules() -> Vec<String> {
    let dir = crate::modprobe::module_dir();
    let order = std::fs::read_to_string(dir.join("modules.order")).unwrap_or_default();
    let mut loaded = Vec::new();
    for rel in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match crate::modprobe::load_file(&dir.join(rel)) {
            Ok(()) => loaded.push(crate::modprobe::module_name(rel)),
            Err(e) => crate::log_line(&e.to_string()),
        }
    }
    loaded
}

/// Ends the VM (as PID 1) or the process (when run outside a VM, e.g. in tests).
pub fn power_off(pid1: bool) -> ! {
    if pid1 {
        // SAFETY: sync and reboot(2) have no memory-safety preconditions.
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_POWER_OFF);
        }
    }
    std::process::exit(0)
}
