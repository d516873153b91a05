//! Integration-test harness: a private containerd per test, driven with `ctr`.
//!
//! Every [`Containerd`] is fully independent: its own root, state, sockets, config file and a
//! unique containerd namespace (so runc state under `/run/containerd/runc/<ns>` and cgroups under
//! `/sys/fs/cgroup/<ctrl>/<ns>/<id>` never collide with another test or another containerd on the
//! machine). The busybox image is built once per machine by `hack/build-image.sh` (cached, file
//! locked) and imported into each instance as [`IMAGE`].
//!
//! Environment knobs:
//! - `JANUS_SHIM`: path of the shim binary (default: `$CARGO_TARGET_DIR` or `<workspace>/target`,
//!   `release/` first, then `debug/`).
//! - `JANUS_TEST_IMAGE_TAR`: where the image archive is cached (default
//!   `<workspace>/target/janus-test/busybox.tar`).
//! - `JANUS_TEST_PARALLEL`: how many containerd instances may run at once (default 2).
//! - `JANUS_TEST_TIMEOUT`: seconds a single ctr command may take (default 60).
//! - `JANUS_TEST_LOG_LEVEL`: containerd log level (default `info`).
//! - `JANUS_TEST_KEEP`: keep the instance directory after the test.
//!
//! The harness itself: [`containerd`] (the private containerd, the gRPC calls ctr lacks),
//! [`process`] (commands with timeouts, background processes, a pty), [`host`] (what a test left
//! behind: processes, mounts, cgroups); this file holds the paths, prerequisites and node config.
//! [`cri`] adds the CRI variant: containerd's CRI plugin enabled, CNI bridge networking, a local
//! pause image, and a gRPC CRI client (as kubelet uses it) with the streaming (Exec/Attach) client.
//! [`kube_api`] and [`kind_config`] serve the offline checks of deploy/ (tests/deploy.rs):
//! kubectl's validation against a fake API server, and kind's config types.

pub mod cri;
pub mod kind_config;
pub mod kube_api;
pub mod systemd_node;

pub mod containerd;
pub mod host;
pub mod process;
pub use containerd::*;
pub use host::*;
pub use process::*;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::symlink;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The test image, imported into every instance.
pub const IMAGE: &str = "janus.test/busybox:latest";
/// The CRI sandbox ("pause") image, imported into CRI instances (`sandbox_image`).
pub const PAUSE_IMAGE: &str = "janus.test/pause:latest";
/// containerd's Go runc shim: proves the harness.
pub const RUNC: &str = "io.containerd.runc.v2";
/// Our shim.
pub const JANUS: &str = "io.containerd.janus.v2";
/// Our shim's VM-mode alias (the same binary; VM mode without a config file).
pub const JANUS_VM: &str = "io.containerd.janus-vm.v2";
/// The shim binary name containerd derives from [`JANUS`].
pub const JANUS_SHIM_NAME: &str = "containerd-shim-janus-v2";
/// Alias name of the same binary (VM mode by default).
pub const JANUS_VM_SHIM_NAME: &str = "containerd-shim-janus-vm-v2";

const SYS_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the containerd under test comes from: `$JANUS_CONTAINERD_ROOT` (a Debian containerd
/// package extracted by `hack/lib.sh`'s `ensure_containerd`: its `usr/bin` holds containerd,
/// ctr and its Go runc shim), else the system's.
pub fn containerd_bin_dir() -> PathBuf {
    match std::env::var_os("JANUS_CONTAINERD_ROOT") {
        Some(r) => PathBuf::from(r).join("usr/bin"),
        None => PathBuf::from("/usr/bin"),
    }
}

pub(crate) fn containerd_binary() -> PathBuf {
    containerd_bin_dir().join("containerd")
}

fn ctr_binary() -> PathBuf {
    containerd_bin_dir().join("ctr")
}

/// Whether a failed `ctr` command's stderr carries the gRPC code `code_text` ("invalid
/// argument"...). ctr 1.x appends it to the message; ctr 2.x prints the message alone, so there
/// the code is checked where a client sees it: the CRI suite's gRPC statuses (the same cases
/// run there, e.g. `vm_refuses_host_network`).
pub fn ctr_error_has_code(stderr: &str, code_text: &str) -> bool {
    containerd_major() >= 2 || stderr.contains(code_text)
}

/// containerd's major version (1 or 2: their configs and CRI plugin ids differ).
pub fn containerd_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = Command::new(containerd_binary()).arg("--version").output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        // "containerd github.com/containerd/containerd/v2 2.1.9+unknown" / "... 1.6.20~ds1"
        text.split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(1)
    })
}

/// containerd 2.x's binary for tests that need one next to the system's 1.6:
/// `$JANUS_CONTAINERD2_ROOT`, else where `hack/lib.sh`'s `ensure_containerd sid` extracts it.
pub fn containerd2_binary() -> Option<PathBuf> {
    let root = std::env::var_os("JANUS_CONTAINERD2_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/janus/containerd/sid/root"));
    let bin = root.join("usr/bin/containerd");
    bin.is_file().then_some(bin)
}

/// Every path under `root` with its bytes (a link: its target; a directory: nothing), sorted:
/// compare a node before and after.
pub fn file_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let ft = e.file_type().unwrap();
            let bytes = if ft.is_symlink() {
                fs::read_link(&p).unwrap().into_os_string().into_vec()
            } else if ft.is_dir() {
                stack.push(p.clone());
                Vec::new()
            } else {
                fs::read(&p).unwrap()
            };
            out.push((rel, bytes));
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// Tests that cannot run here

/// A prerequisite a test can lack on some hosts. `JANUS_REQUIRE` (comma-separated names, or
/// `all`) turns its absence into a failure on hosts that should have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prereq {
    /// vmx/svm (hardware virtualization).
    Vmx,
    /// A CPU without vmx/svm (what the refusal of the builtin driver needs).
    NoVmx,
    /// An openable /dev/kvm.
    Kvm,
    /// containerd 2.x (Debian sid's, fetched by hack/test.sh).
    Containerd2,
    /// containerd 1.x as the system's (Debian 12's).
    Containerd1,
    /// The VM guest image (hack/build-guest.sh).
    GuestImage,
    /// kind and a container engine (the live e2e cluster).
    Kind,
    /// systemd and dbus for the systemd node container.
    Systemd,
    /// virtiofsd.
    Virtiofsd,
    /// The host runs cgroup v1 (some checks read v1 files).
    CgroupV1,
    /// The host runs cgroup v2.
    CgroupV2,
    /// kubectl (the offline validation of deploy/'s manifests).
    Kubectl,
}

impl Prereq {
    fn name(self) -> &'static str {
        match self {
            Prereq::Vmx => "vmx",
            Prereq::NoVmx => "no-vmx",
            Prereq::Kvm => "kvm",
            Prereq::Containerd2 => "containerd2",
            Prereq::Containerd1 => "containerd1",
            Prereq::GuestImage => "guest-image",
            Prereq::Kind => "kind",
            Prereq::Systemd => "systemd",
            Prereq::Virtiofsd => "virtiofsd",
            Prereq::CgroupV1 => "cgroup-v1",
            Prereq::CgroupV2 => "cgroup-v2",
            Prereq::Kubectl => "kubectl",
        }
    }
}

/// Reports that `test` (or a part of it, `part` = true) does not run here for lack of `what`:
/// on stderr, and as a line in `$JANUS_NOT_RUN_LOG`, which hack/test.sh counts in its summary
/// (`N passed, N failed, N not run`). Panics instead when `JANUS_REQUIRE` names `what`.
pub fn not_run(test: &str, what: Prereq, reason: &str, part: bool) {
    let required = std::env::var("JANUS_REQUIRE").unwrap_or_default();
    if required
        .split(',')
        .any(|r| r.trim() == what.name() || r.trim() == "all")
    {
        panic!(
            "{test}: JANUS_REQUIRE={required} requires {}: {reason}",
            what.name()
        );
    }
    let kind = if part { "PART NOT RUN" } else { "NOT RUN" };
    let line = format!("{kind}: {test}: {reason} (needs {})", what.name());
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("JANUS_NOT_RUN_LOG") {
        use std::io::Write;
        // One append of one line: lines of parallel tests do not interleave.
        if let Ok(mut f) = fs::OpenOptions::new().append(true).create(true).open(log) {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Paths, knobs

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent dir")
        .to_path_buf()
}

fn workspace_target() -> PathBuf {
    workspace_root().join("target")
}

/// The VM guest image (hack/build-guest.sh): `$JANUS_GUEST_DIR`, else `<workspace>/target/guest`
/// (where the shim looks when run from the workspace's target dir).
/// The virtiofsd socket of the VM-mode container (or pod sandbox) `id`, from its QEMU's
/// command line (`-name <id>`, `-chardev socket,id=vfs,path=<socket>`).
pub fn vm_share_socket(id: &str) -> Option<String> {
    processes().into_iter().find_map(|p| {
        let args: Vec<&str> = p.cmdline.split(' ').collect();
        let named = args.windows(2).any(|w| w[0] == "-name" && w[1] == id);
        if !p.cmdline.contains("qemu-system") || !named {
            return None;
        }
        args.iter()
            .find_map(|a| a.strip_prefix("socket,id=vfs,path="))
            .map(str::to_string)
    })
}

/// The QEMU and virtiofsd processes of the VM whose virtiofsd socket is `sock`
/// ([`vm_share_socket`]): QEMU names the socket; virtiofsd inherits it (`--fd`) and names its
/// share (`source=<work dir>.shared`). Debian's virtiofsd forks a sandboxed child: both count.
pub fn vm_pids(sock: &str) -> (Vec<u32>, Vec<u32>) {
    let ps = processes();
    let share = format!("source={}", sock.replace(".vfs.sock", ".shared"));
    let pick = |what: &str, names: &str| -> Vec<u32> {
        ps.iter()
            .filter(|p| p.cmdline.contains(what) && p.cmdline.contains(names))
            .map(|p| p.pid)
            .collect()
    };
    (pick("qemu-system", sock), pick("virtiofsd", &share))
}

pub fn guest_dir() -> PathBuf {
    std::env::var_os("JANUS_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target().join("guest"))
}

/// The shim binary: `$JANUS_SHIM`, else `<target>/release`, else `<target>/debug`, where
/// `<target>` is `$CARGO_TARGET_DIR` and then the workspace's `target/`.
pub fn shim_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("JANUS_SHIM") {
        let p = PathBuf::from(p);
        if !is_executable(&p) {
            bail!("JANUS_SHIM={} is not an executable file", p.display());
        }
        return Ok(p);
    }
    let mut targets = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        targets.push(PathBuf::from(t));
    }
    targets.push(workspace_target());
    let mut tried = Vec::new();
    for t in &targets {
        for profile in ["release", "debug"] {
            let p = t.join(profile).join(JANUS_SHIM_NAME);
            if is_executable(&p) {
                return Ok(p);
            }
            tried.push(p.display().to_string());
        }
    }
    bail!(
        "the Janus shim binary was not found (set JANUS_SHIM, or build it: \
         `cargo build --release --bin {JANUS_SHIM_NAME}`); tried: {}",
        tried.join(", ")
    )
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Default timeout of one ctr command.
pub fn cmd_timeout() -> Duration {
    let secs = std::env::var("JANUS_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// Path of the cached busybox image archive.
pub fn image_tar_path() -> PathBuf {
    std::env::var_os("JANUS_TEST_IMAGE_TAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target().join("janus-test").join("busybox.tar"))
}

/// Path of the cached pause image archive (`JANUS_TEST_PAUSE_TAR`, default
/// `<workspace>/target/janus-test/pause.tar`).
pub fn pause_tar_path() -> PathBuf {
    std::env::var_os("JANUS_TEST_PAUSE_TAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target().join("janus-test").join("pause.tar"))
}

/// Build (once per process; the script itself caches and locks) the busybox image archive.
pub fn ensure_image() -> Result<PathBuf> {
    static IMAGE_TAR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    build_image_once(&IMAGE_TAR, image_tar_path(), "busybox")
}

/// Build (once per process) the pause image archive for CRI sandboxes.
pub fn ensure_pause_image() -> Result<PathBuf> {
    static PAUSE_TAR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    build_image_once(&PAUSE_TAR, pause_tar_path(), "pause")
}

fn build_image_once(
    cell: &OnceLock<std::result::Result<PathBuf, String>>,
    out: PathBuf,
    kind: &str,
) -> Result<PathBuf> {
    cell.get_or_init(|| {
        let script = workspace_root().join("hack").join("build-image.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(&out).arg(kind);
        let o = run_with_timeout(cmd, None, Duration::from_secs(600))
            .map_err(|e| format!("running {}: {e:#}", script.display()))?;
        if !o.status.success() {
            return Err(format!("{} failed:\n{}", script.display(), o));
        }
        Ok(out)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// The node's default Janus config, `/etc/janus/config.toml`, as the deploy/ install steps put
/// it, for the life of the guard: whatever was there before (or nothing) comes back on drop.
/// Guards are taken one at a time within a test binary.
pub struct NodeConfig {
    previous: Option<Vec<u8>>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

pub const NODE_CONFIG: &str = "/etc/janus/config.toml";

impl NodeConfig {
    pub fn install(contents: &str) -> NodeConfig {
        static LOCK: Mutex<()> = Mutex::new(());
        let lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let previous = fs::read(NODE_CONFIG).ok();
        fs::create_dir_all("/etc/janus").expect("create /etc/janus");
        fs::write(NODE_CONFIG, contents).expect("write /etc/janus/config.toml");
        NodeConfig {
            previous,
            _lock: lock,
        }
    }
}

impl Drop for NodeConfig {
    fn drop(&mut self) {
        match &self.previous {
            Some(old) => {
                let _ = fs::write(NODE_CONFIG, old);
            }
            None => {
                let _ = fs::remove_file(NODE_CONFIG);
                let _ = fs::remove_dir("/etc/janus");
            }
        }
    }
}
