//! `janus check`: what this node needs for Janus, and whether it is there. Configs are read
//! through `janus_config`, as the shim reads them, so the check fails where the shim would.

mod containerd;
mod node;
mod report;
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::Duration;

use runtime::linux::cgroups;

use report::Report;

pub const DEFAULT_CONFIG: &str = janus_config::DEFAULT_PATH;
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// A command that should answer at once (`--version`, `ctr version`): longer means a hung
/// containerd, which the check reports instead of waiting for.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// What `janus check` is told on its command line.
pub struct Options {
    /// containerd's gRPC socket.
    pub address: String,
    /// The node default Janus config.
    pub config: PathBuf,
    /// The shim binary (default: on PATH).
    pub shim: Option<PathBuf>,
    /// Where the guest image is when the config names none.
    pub guest_dir: PathBuf,
    /// containerd's config file and binary (a name is looked up on PATH).
    pub containerd_config: PathBuf,
    pub containerd: String,
    /// One JSON document instead of text.
    pub json: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            address: DEFAULT_ADDRESS.into(),
            config: DEFAULT_CONFIG.into(),
            shim: None,
            guest_dir: runtime::vm::default_guest_dir(),
            containerd_config: DEFAULT_CONTAINERD_CONFIG.into(),
            containerd: "containerd".into(),
            json: false,
        }
    }
}

pub fn check(o: &Options) -> ExitCode {
    let mut r = Report::new(o.json);
    host(&mut r);
    cgroup_checks(&mut r);
    kernel_features(&mut r);
    containerd_service(&mut r, &o.containerd, &o.address);
    let config = node::node_config(&mut r, &o.config);
    let vm_handler = containerd::handlers(&mut r, &o.containerd, &o.containerd_config);
    let vm_wanted = vm_handler || node::wants_vm(&config);
    node::binaries(&mut r, o.shim.clone(), vm_wanted);
    let booted = vm::vm_checks(
        &mut r,
        &vm::VmChecks {
            config: &config,
            config_path: &o.config,
            guest_dir: &o.guest_dir,
            required: vm_wanted,
        },
    );
    r.finish(booted)
}

fn host(r: &mut Report) {
    if nix::unistd::geteuid().is_root() {
        r.ok("privileges", "running as root");
    } else {
        r.fail(
            "privileges",
            "not root: the shim needs root (namespaces, mounts, cgroups), and so do some checks",
            "run janus check as root",
        );
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    r.ok("host kernel", kernel.trim());
}

fn cgroup_checks(r: &mut Report) {
    match cgroups::host_mode() {
        cgroups::Mode::V2 => r.ok("cgroups", "v2 (unified)"),
        cgroups::Mode::V1 => {
            let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let ctrls: Vec<String> = cgroups::v1_mounts(&mi).into_keys().collect();
            let need = [
                "memory", "cpu", "cpuacct", "pids", "freezer", "devices", "cpuset",
            ];
            let missing: Vec<&str> = need
                .into_iter()
                .filter(|c| !ctrls.iter().any(|x| x == c))
                .collect();
            let hybrid = Path::new("/sys/fs/cgroup/unified").exists();
            if missing.is_empty() {
                let layout = if hybrid { " (hybrid)" } else { "" };
                r.ok("cgroups", format!("v1{layout} with {}", ctrls.join(",")));
            } else {
                r.fail(
                    "cgroups",
                    format!("v1 controllers missing: {}", missing.join(",")),
                    "mount them under /sys/fs/cgroup",
                );
            }
        }
    }
    cgroup_driver(r);
}

/// The cgroup driver the shim uses for systemd-form cgroupsPaths (kubelet's systemd driver).
fn cgroup_driver(r: &mut Report) {
    if !runtime::linux::systemd::host_runs_systemd() {
        r.ok(
            "cgroup driver",
            "cgroupfs (no systemd): slice:prefix:name cgroupsPaths get the directories \
             systemd would make",
        );
        return;
    }
    let bus = runtime::linux::systemd::SYSTEM_BUS_SOCKET;
    if Path::new(bus).exists() {
        r.ok(
            "cgroup driver",
            "systemd: containers with a slice:prefix:name cgroupsPath run in transient \
             scopes (D-Bus)",
        );
    } else {
        r.fail(
            "cgroup driver",
            format!("systemd runs this host but {bus} is missing: the shim cannot start scopes"),
            "install and start dbus",
        );
    }
}

fn kernel_features(r: &mut Report) {
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if fs.contains("overlay") {
        r.ok("overlayfs", "available (containerd's default snapshotter)");
    } else {
        r.warn(
            "overlayfs",
            "not loaded: containerd's overlayfs snapshotter needs it",
            "modprobe overlay",
        );
    }
    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if userns > 0 {
        r.ok("user namespaces", format!("enabled (max {userns})"));
    } else {
        r.warn(
            "user namespaces",
            "disabled: specs with a user namespace will fail",
            "sysctl -w user.max_user_namespaces=15000",
        );
    }
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.contains("Seccomp:"))
        .unwrap_or(false);
    if seccomp {
        r.ok("seccomp", "supported by the kernel");
    } else {
        r.warn(
            "seccomp",
            "not supported: seccomp profiles will fail",
            "boot a kernel built with CONFIG_SECCOMP",
        );
    }
}

/// The containerd binary and the daemon's socket.
fn containerd_service(r: &mut Report, containerd: &str, address: &str) {
    match run(containerd, &["--version"]) {
        Ok(v) => r.ok("containerd", v),
        Err(e) => r.fail(
            "containerd",
            format!("{containerd}: {e}"),
            "apt-get install containerd (or pass --containerd BIN)",
        ),
    }
    if !Path::new(address).exists() {
        r.warn(
            "containerd socket",
            format!("{address} not found"),
            "start containerd, or pass --address SOCKET",
        );
        return;
    }
    match run("ctr", &["--address", address, "version"]) {
        Ok(_) => r.ok("containerd socket", format!("{address} answers")),
        Err(e) => r.fail(
            "containerd socket",
            format!("{address} exists but does not answer: ctr version: {e}"),
            "start containerd (or restart it: its log says why it is stuck)",
        ),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}

/// A binary given as a path, or as a name on PATH.
fn find_binary(bin: &str) -> Option<PathBuf> {
    if bin.contains('/') {
        Some(PathBuf::from(bin)).filter(|p| p.is_file())
    } else {
        find_in_path(bin)
    }
}

/// Runs `cmd`, killed after `timeout`. Err: it could not be started, or did not end in time.
fn run_timeout(cmd: Command, timeout: Duration) -> Result<Output, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("no async runtime: {e}"))?;
    let mut cmd = tokio::process::Command::from(cmd);
    // kill_on_drop: a command that outlives the timeout is killed when its future is dropped.
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    rt.block_on(async {
        match tokio::time::timeout(timeout, cmd.output()).await {
            Ok(res) => res.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
        }
    })
}

/// `cmd args`: its trimmed stdout when it succeeds, else what went wrong.
fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let mut c = Command::new(cmd);
    c.args(args);
    let o = run_timeout(c, COMMAND_TIMEOUT)?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        let err = String::from_utf8_lossy(&o.stderr);
        Err(format!("{} ({})", err.trim(), o.status))
    }
}
