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
//! [`cri`] adds the CRI variant: containerd's CRI plugin enabled, CNI bridge networking, a local
//! pause image, and a gRPC CRI client (as kubelet uses it) with the streaming (Exec/Attach) client.
//! [`kube_api`] and [`kind_config`] serve the offline checks of deploy/ (tests/deploy.rs):
//! kubectl's validation against a fake API server, and kind's config types.

pub mod cri;
pub mod kind_config;
pub mod kube_api;
pub mod systemd_node;

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

// ---------------------------------------------------------------------------------------------
// Running commands

/// Output of a finished command.
#[derive(Debug, Clone)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Command line, for messages.
    pub cmdline: String,
}

impl Out {
    /// Exit code; a death by signal N is reported as 128+N (like a shell).
    pub fn code(&self) -> i32 {
        exit_code(&self.status)
    }
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\n[exit {}]\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.code(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Exit code with signal deaths mapped to 128+N.
pub fn exit_code(s: &ExitStatus) -> i32 {
    match (s.code(), s.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => -1,
    }
}

fn cmdline_of(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$;|&<>()".contains(c)) {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Run `cmd`, feeding `stdin` (or /dev/null), collecting output, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Out> {
    let cmdline = cmdline_of(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmdline}"))?;
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let out_rx = spawn_reader(child.stdout.take().unwrap());
    let err_rx = spawn_reader(child.stderr.take().unwrap());
    let status = wait_timeout(&mut child, timeout)?;
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_rx
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_default();
            let stderr = err_rx
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_default();
            bail!(
                "timed out after {:?}: {cmdline}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                timeout,
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    // A grandchild may keep the pipes open; do not wait forever for EOF.
    let stdout = out_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    let stderr = err_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    Ok(Out {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        cmdline,
    })
}

/// Wait for `child` up to `timeout`; `None` when it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut sleep = Duration::from_millis(2);
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(50));
    }
}

/// Poll `f` until it returns `Some`, or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Background processes (ctr events, a foreground `ctr run` we signal from elsewhere...)

/// A process running in the background whose stdout/stderr lines are collected.
pub struct Background {
    child: Child,
    cmdline: String,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn line_reader<R: Read + Send + 'static>(
    r: R,
    sink: Arc<Mutex<Vec<String>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    sink.lock().unwrap().push(line);
                }
            }
        }
    })
}

impl Background {
    /// Spawn `cmd` with stdin from /dev/null.
    pub fn spawn(cmd: Command) -> Result<Self> {
        Self::spawn_with_stdin(cmd, Stdio::null())
    }

    fn spawn_with_stdin(mut cmd: Command, stdin: Stdio) -> Result<Self> {
        let cmdline = cmdline_of(&cmd);
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmdline}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            line_reader(child.stdout.take().unwrap(), stdout.clone()),
            line_reader(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Ok(Background {
            child,
            cmdline,
            stdout,
            stderr,
            readers,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stdin pipe, when spawned with one.
    pub fn stdin(&mut self) -> Option<&mut std::process::ChildStdin> {
        self.child.stdin.as_mut()
    }

    /// Close stdin (EOF for the process).
    pub fn close_stdin(&mut self) {
        self.child.stdin.take();
    }

    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait until a stdout line satisfies `pred`; returns it.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        poll(timeout, || {
            self.stdout
                .lock()
                .unwrap()
                .iter()
                .find(|l| pred(l))
                .cloned()
        })
    }

    /// Has it exited? (non-blocking)
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Wait for exit (up to `timeout`), then return everything it printed.
    pub fn wait(&mut self, timeout: Duration) -> Result<Out> {
        let status = match self.status {
            Some(s) => s,
            None => match wait_timeout(&mut self.child, timeout)? {
                Some(s) => s,
                None => bail!(
                    "still running after {timeout:?}: {}\n--- stdout so far ---\n{}\n--- stderr so far ---\n{}",
                    self.cmdline,
                    self.lines().join("\n"),
                    self.stderr_lines().join("\n")
                ),
            },
        };
        self.status = Some(status);
        for h in self.readers.drain(..) {
            // Readers end at EOF; a leaked grandchild could hold the pipe: don't hang.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !h.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        Ok(Out {
            status,
            stdout: join_lines(&self.lines()),
            stderr: join_lines(&self.stderr_lines()),
            cmdline: self.cmdline.clone(),
        })
    }

    /// SIGKILL it (if still running) and reap it.
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            if let Ok(s) = self.child.wait() {
                self.status = Some(s);
            }
        }
    }
}

fn join_lines(l: &[String]) -> String {
    let mut s = l.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// PTY

/// Run `cmd` with a new pseudo-terminal as its controlling terminal and stdin/stdout/stderr,
/// as an interactive user would (needed by `ctr run -t`). `input` is written to the terminal
/// first. Returns the exit status and everything read from the terminal (with `\r\n`s).
pub fn run_in_pty(mut cmd: Command, input: &[u8], timeout: Duration) -> Result<Out> {
    use nix::pty::{openpty, Winsize};
    let cmdline = cmdline_of(&cmd);
    let ws = Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&ws), None).context("openpty")?;
    let slave: OwnedFd = pty.slave;
    let master: OwnedFd = pty.master;
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    cmd.env("TERM", "xterm");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmdline}"))?;
    // The Command keeps its Stdio (slave fds) until dropped: without this the master never
    // sees EOF/EIO.
    drop(cmd);
    drop(slave);
    let mut master_file = fs::File::from(master);
    if !input.is_empty() {
        master_file.write_all(input)?;
    }
    let (tx, rx) = mpsc::channel();
    let reader = master_file.try_clone()?;
    thread::spawn(move || {
        let mut r = reader;
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break, // EIO once every slave fd is closed
            }
        }
        let _ = tx.send(all);
    });
    let status = match wait_timeout(&mut child, timeout)? {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {timeout:?} (in a pty): {cmdline}");
        }
    };
    let data = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    drop(master_file);
    Ok(Out {
        status,
        stdout: String::from_utf8_lossy(&data).into_owned(),
        stderr: String::new(),
        cmdline,
    })
}

// ---------------------------------------------------------------------------------------------
// Concurrency limit across the tests of one process

struct Permits {
    used: Mutex<usize>,
    cv: Condvar,
}

static PERMITS: Permits = Permits {
    used: Mutex::new(0),
    cv: Condvar::new(),
};

fn max_parallel() -> usize {
    std::env::var("JANUS_TEST_PARALLEL")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(2)
}

struct Permit;

impl Permit {
    fn acquire() -> Permit {
        let max = max_parallel();
        let mut used = PERMITS.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= max {
            used = PERMITS.cv.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        Permit
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut used = PERMITS.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= 1;
        PERMITS.cv.notify_one();
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn next_seq() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A container id unique on this machine (name, test process pid, sequence number).
pub fn unique_id(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), next_seq())
}

// ---------------------------------------------------------------------------------------------
// Private containerd

/// A private containerd, stopped and cleaned up on drop.
pub struct Containerd {
    /// Instance directory (config, sockets, root, state, bin, logs).
    pub dir: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    /// gRPC socket.
    pub address: PathBuf,
    /// The containerd namespace all helpers use (unique per instance; `k8s.io` with CRI).
    pub namespace: String,
    /// Unique name of this instance (`jt-<pid>-<seq>`): log file names, CRI cgroup root.
    pub name: String,
    /// CRI set-up (CNI network, cgroup root...), when started with [`Options::cri`].
    pub cri_env: Option<cri::CriEnv>,
    /// Janus runtime config file (`mode = "namespace"`).
    pub janus_config: PathBuf,
    /// The shim binary linked into containerd's PATH, when one was found.
    pub shim: Option<PathBuf>,
    child: Option<Child>,
    /// containerd's command line (launcher first) and PATH: [`Self::restart`] runs it again.
    launch: Vec<std::ffi::OsString>,
    path_env: String,
    log: PathBuf,
    /// Container ids handed out or removed through this instance (for socket cleanup).
    ids: Mutex<Vec<String>>,
    _permit: Permit,
}

/// What [`Containerd::start`] needs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Fail unless the Janus shim binary is found.
    pub require_janus: bool,
    /// Enable the CRI plugin (namespace `k8s.io`, CNI bridge network, pause image): see [`cri`].
    pub cri: bool,
    /// CRI pods get an IPv6 address too (dual-stack).
    pub dual_stack: bool,
    /// With `cri`: Janus's handlers come from this deploy/ drop-in, imported the way a node
    /// imports it (see [`cri::import_dropin`]), instead of from the harness's own CRI config.
    pub dropin: Option<PathBuf>,
    /// A command prefix containerd runs under (e.g. [`systemd_node::SystemdNode::launcher`]);
    /// empty: containerd is our child.
    pub launcher: Vec<std::ffi::OsString>,
    /// With `cri`: a node's root (a directory standing for `/`). containerd reads its config
    /// from `<root>/etc/containerd/config.toml`, which the harness writes without Janus's
    /// handlers (version 3 for containerd 2.x) and then hands to `prepare` (e.g. `janus
    /// install`); the shim comes from `<root>/usr/local/bin` on containerd's PATH.
    pub node_root: Option<PathBuf>,
    pub prepare: Option<Prepare>,
}

/// A step run on a node root before containerd starts ([`Options::prepare`]).
#[derive(Clone)]
pub struct Prepare(pub std::sync::Arc<PrepareFn>);

/// What [`Prepare`] runs, given the node root.
pub type PrepareFn = dyn Fn(&Path) -> Result<()> + Send + Sync;

impl std::fmt::Debug for Prepare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepare(..)")
    }
}

impl Options {
    /// Options for tests of `runtime` (requires the Janus shim for Janus runtimes).
    pub fn for_runtime(runtime: &str) -> Self {
        Options {
            require_janus: runtime.contains("janus"),
            cri: false,
            dual_stack: false,
            dropin: None,
            launcher: Vec::new(),
            node_root: None,
            prepare: None,
        }
    }
}

impl Containerd {
    /// Start a private containerd suited to tests of `runtime` and import [`IMAGE`].
    /// Panics with a clear message on failure.
    pub fn for_runtime(runtime: &str) -> Containerd {
        match Self::start(Options::for_runtime(runtime)) {
            Ok(c) => c,
            Err(e) => panic!("starting a private containerd for {runtime}: {e:#}"),
        }
    }

    pub fn start(opts: Options) -> Result<Containerd> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the integration tests need root (they run containerd, mount and use cgroups)");
        }
        for bin in [
            containerd_binary(),
            ctr_binary(),
            PathBuf::from("/usr/sbin/runc"),
        ] {
            if !is_executable(&bin) {
                bail!(
                    "{} is missing: install Debian's containerd and runc \
                     (hack/test.sh does), e.g. `apt-get install -y containerd runc`",
                    bin.display()
                );
            }
        }
        let shim = match shim_binary() {
            Ok(p) => Some(p),
            Err(e) if opts.require_janus => return Err(e),
            Err(_) => None,
        };
        let image = ensure_image()?;
        if opts.cri {
            ensure_pause_image()?;
        }
        let permit = Permit::acquire();

        let dir = tempfile::Builder::new()
            .prefix("janus-ctd-")
            .tempdir()
            .context("creating instance dir")?
            .keep();
        let name = format!("jt-{}-{}", std::process::id(), next_seq());
        // CRI works in containerd's `k8s.io` namespace; its isolation comes from the cgroup
        // root, runc root, CNI network and bridge of the instance instead (see `cri::CriEnv`).
        let namespace = if opts.cri {
            cri::CRI_NAMESPACE.to_string()
        } else {
            name.clone()
        };
        let root = dir.join("root");
        let state = dir.join("state");
        let bin = dir.join("bin");
        let address = dir.join("containerd.sock");
        let log = dir.join("containerd.log");
        for d in [&root, &state, &bin] {
            fs::create_dir_all(d)?;
        }
        if let (Some(shim), None) = (&shim, &opts.node_root) {
            symlink(shim, bin.join(JANUS_SHIM_NAME))?;
            symlink(shim, bin.join(JANUS_VM_SHIM_NAME))?;
        }
        let janus_config = dir.join("janus.toml");
        fs::write(&janus_config, "mode = \"namespace\"\n")?;
        let config = match &opts.node_root {
            Some(r) => r.join("etc/containerd/config.toml"),
            None => dir.join("config.toml"),
        };
        let mut config_text = containerd_config(&dir, &root, &state, &address, opts.cri);
        let cri_env = if opts.cri {
            let env = cri::CriEnv::setup(&dir, &name, opts.dual_stack)?;
            let handlers = opts.dropin.is_none() && opts.node_root.is_none();
            let cri_text = env.containerd_config(&janus_config, handlers);
            if let Some(dropin) = &opts.dropin {
                config_text = cri::import_dropin(&dir, config_text, &cri_text, dropin)?;
            } else if opts.node_root.is_some() && containerd_major() >= 2 {
                config_text = cri::migrate_v3(&dir, &format!("{config_text}{cri_text}"))?;
            } else {
                config_text.push_str(&cri_text);
            }
            Some(env)
        } else {
            None
        };
        if let Some(parent) = config.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&config, config_text)?;
        if let (Some(r), Some(prepare)) = (&opts.node_root, &opts.prepare) {
            (prepare.0)(r)?;
        }
        let node_bin = opts
            .node_root
            .as_ref()
            .map(|r| format!("{}:", r.join("usr/local/bin").display()))
            .unwrap_or_default();

        let mut launch: Vec<std::ffi::OsString> = opts.launcher.clone();
        launch.push(containerd_binary().into_os_string());
        launch.push("--config".into());
        launch.push(config.clone().into_os_string());
        let path_env = format!(
            "{node_bin}{}:{}:{SYS_PATH}",
            bin.display(),
            containerd_bin_dir().display()
        );
        fs::File::create(&log)?;
        let child = spawn_containerd(&launch, &path_env, &log)?;

        let mut ctd = Containerd {
            dir,
            root,
            state,
            address,
            namespace,
            name,
            cri_env,
            janus_config,
            shim,
            child: Some(child),
            launch,
            path_env,
            log,
            ids: Mutex::new(Vec::new()),
            _permit: permit,
        };
        ctd.wait_ready()?;
        if !opts.cri {
            // (CRI instances import once the CRI plugin is ready: `cri::Cri::start`.)
            ctd.import_image(&image, IMAGE)?;
        }
        Ok(ctd)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(st) = child.try_wait()? {
                    bail!(
                        "containerd exited during startup ({st}); log:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            if self.address.exists() {
                let mut cmd = Command::new(ctr_binary());
                cmd.arg("--address").arg(&self.address).arg("version");
                if let Ok(o) = run_with_timeout(cmd, None, Duration::from_secs(5)) {
                    if o.success() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not answer on {} within 30s; log:\n{}",
                    self.address.display(),
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    fn import_image(&self, tar: &Path, image: &str) -> Result<()> {
        let base = image.rsplit_once(':').map(|(b, _)| b).unwrap_or(image);
        let o = self.ctr(&[
            "images",
            "import",
            "--base-name",
            base,
            tar.to_str().unwrap(),
        ]);
        if !o.success() {
            bail!("importing {}:\n{o}", tar.display());
        }
        let ls = self.ctr(&["images", "ls", "-q"]);
        if !ls.stdout.lines().any(|l| l.trim() == image) {
            bail!("{image} missing after import:\n{ls}");
        }
        Ok(())
    }

    /// Last `n` lines of containerd's log (shim logs end up there too), minus plugin loading.
    pub fn log_tail(&self, n: usize) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s
            .lines()
            .filter(|l| !l.contains("loading plugin"))
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Path of containerd's log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// PID of containerd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` to containerd and waits (up to 30 s) until it has exited. Its shims keep
    /// running (they are in process groups of their own). [`Self::start_again`] brings it back.
    pub fn stop_daemon(&mut self, signal: nix::sys::signal::Signal) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("containerd is not running")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).context("signalling containerd")?;
        let status = wait_timeout(child, Duration::from_secs(30))?
            .ok_or_else(|| anyhow!("containerd still running 30 s after {signal}"))?;
        self.child = None;
        Ok(status)
    }

    /// Starts containerd again on the same config, root, state and sockets (after
    /// [`Self::stop_daemon`]) and waits until it answers. Its log goes on in the same file.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("containerd is still running");
        }
        let child = spawn_containerd(&self.launch, &self.path_env, &self.log)?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// [`Self::stop_daemon`] with SIGTERM, then [`Self::start_again`]: a containerd restart.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_daemon(nix::sys::signal::Signal::SIGTERM)?;
        self.start_again()
    }

    /// A `ctr --address SOCK -n NS ARGS` command.
    pub fn ctr_cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(ctr_binary());
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        cmd
    }

    /// Run ctr (stdin /dev/null, default timeout). Panics only if it can't run or times out.
    pub fn ctr<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        self.ctr_timeout(args, cmd_timeout())
    }

    /// Run ctr with an explicit timeout.
    pub fn ctr_timeout<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> Out {
        match run_with_timeout(self.ctr_cmd(args), None, timeout) {
            Ok(o) => o,
            Err(e) => panic!("{e:#}\n--- containerd log ---\n{}", self.log_tail(30)),
        }
    }

    /// Run ctr, panic unless it exits 0; returns stdout.
    pub fn ctr_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let o = self.ctr(args);
        if !o.success() {
            panic!(
                "ctr failed:\n{o}\n--- containerd log ---\n{}",
                self.log_tail(30)
            );
        }
        o.stdout
    }

    /// Run ctr with `input` on a stdin pipe. ctr 1.6 only forwards EOF (CloseIO) once the task
    /// exists (a fast EOF is lost: ctr sets its stdin closer after NewTask returns), so the pipe
    /// is kept open until task `id` is RUNNING (or ctr exits), then closed.
    pub fn ctr_stdin<S: AsRef<OsStr>>(&self, args: &[S], input: &[u8], id: &str) -> Out {
        let r = (|| -> Result<Out> {
            let mut bg = Background::spawn_with_stdin(self.ctr_cmd(args), Stdio::piped())?;
            bg.stdin().unwrap().write_all(input)?;
            poll(cmd_timeout(), || {
                if bg.try_status().is_some() {
                    return Some(());
                }
                (self.task_status(id).as_deref() == Some("RUNNING")).then_some(())
            });
            bg.close_stdin();
            bg.wait(cmd_timeout())
        })();
        match r {
            Ok(o) => o,
            Err(e) => panic!("{e:#}\n--- containerd log ---\n{}", self.log_tail(30)),
        }
    }

    /// Run ctr in a pseudo-terminal (for `-t`).
    pub fn ctr_tty<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        match run_in_pty(self.ctr_cmd(args), b"", cmd_timeout()) {
            Ok(o) => o,
            Err(e) => panic!("{e:#}\n--- containerd log ---\n{}", self.log_tail(30)),
        }
    }

    /// Start ctr in the background (output collected line by line).
    pub fn ctr_background<S: AsRef<OsStr>>(&self, args: &[S]) -> Background {
        Background::spawn(self.ctr_cmd(args)).expect("spawning ctr")
    }

    /// Start `ctr events` and return once it is subscribed (a namespace label change was seen).
    pub fn events(&self) -> Background {
        let mut bg = self.ctr_background(&["events"]);
        let token = format!("janus.sync={}", next_seq());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.ctr_ok(&["namespaces", "label", &self.namespace, &token]);
            let want = token.replace('=', "\":\"");
            if bg
                .wait_for_line(Duration::from_millis(300), |l| {
                    l.contains("/namespaces/update") && l.contains(&want)
                })
                .is_some()
            {
                return bg;
            }
            if bg.try_status().is_some() || Instant::now() > deadline {
                let o = bg.wait(Duration::from_secs(1));
                panic!("ctr events did not start: {o:?}");
            }
        }
    }

    /// `ctr run` arguments: `run [--runtime RT] EXTRA... IMAGE ID CMD...`.
    pub fn run_args(&self, runtime: &str, extra: &[&str], id: &str, cmd: &[&str]) -> Vec<String> {
        let mut v = vec!["run".to_string(), "--runtime".into(), runtime.into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(IMAGE.into());
        v.push(id.into());
        v.extend(cmd.iter().map(|s| s.to_string()));
        v
    }

    /// `ctr run --rm` (foreground) of `cmd` in a new container `id`.
    pub fn run_rm(&self, runtime: &str, id: &str, cmd: &[&str]) -> Out {
        self.ctr(&self.run_args(runtime, &["--rm"], id, cmd))
    }

    /// `ctr run -d`: start `cmd` detached, panic on failure; waits until RUNNING.
    pub fn run_detached(&self, runtime: &str, extra: &[&str], id: &str, cmd: &[&str]) {
        let mut e = vec!["-d"];
        e.extend_from_slice(extra);
        self.ctr_ok(&self.run_args(runtime, &e, id, cmd));
        self.wait_status(id, "RUNNING", Duration::from_secs(20));
    }

    /// Write the Janus runtime config file (default content: `mode = "namespace"`).
    pub fn write_janus_config(&self, contents: &str) -> PathBuf {
        fs::write(&self.janus_config, contents).expect("writing janus.toml");
        self.janus_config.clone()
    }

    /// `ctr run --rm --runtime RT --runtime-config-path <janus.toml> IMAGE ID CMD...`.
    pub fn run_rm_with_config(&self, runtime: &str, id: &str, cmd: &[&str]) -> Out {
        let cfg = self.janus_config.to_str().unwrap().to_string();
        self.ctr(&self.run_args(runtime, &["--rm", "--runtime-config-path", &cfg], id, cmd))
    }

    /// Tasks as (id, pid, status) from `ctr task ls`.
    pub fn tasks(&self) -> Vec<(String, u32, String)> {
        let o = self.ctr(&["task", "ls"]);
        o.stdout
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3).then(|| (f[0].to_string(), f[1].parse().unwrap_or(0), f[2].into()))
            })
            .collect()
    }

    /// Status column of `ctr task ls` for `id`.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.tasks().into_iter().find(|t| t.0 == id).map(|t| t.2)
    }

    /// PID column of `ctr task ls` for `id`.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        self.tasks().into_iter().find(|t| t.0 == id).map(|t| t.1)
    }

    /// Wait until `ctr task ls` shows `status` for `id`; panics otherwise.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) {
        let mut last = None;
        let ok = poll(timeout, || {
            last = self.task_status(id);
            (last.as_deref() == Some(status)).then_some(())
        });
        if ok.is_none() {
            panic!(
                "task {id} did not become {status} within {timeout:?} (last: {last:?})\n--- containerd log ---\n{}",
                self.log_tail(30)
            );
        }
    }

    /// Best-effort removal of container `id` and its task, whatever state they are in.
    pub fn force_remove(&self, id: &str) {
        self.remember(id);
        let t = Duration::from_secs(10);
        let ctr = |args: &[&str]| run_with_timeout(self.ctr_cmd(args), None, t).ok();
        if let Some(st) = self.task_status(id) {
            if st == "PAUSED" || st == "PAUSING" {
                ctr(&["task", "resume", id]);
            }
            if st != "STOPPED" {
                ctr(&["task", "kill", "-a", "-s", "SIGKILL", id]);
                poll(Duration::from_secs(5), || {
                    matches!(self.task_status(id).as_deref(), None | Some("STOPPED")).then_some(())
                });
            }
            // Plain delete once stopped; `-f` (kill + wait, then delete) only if that fails.
            if !ctr(&["task", "rm", id]).is_some_and(|o| o.success()) {
                ctr(&["task", "rm", "-f", id]);
            }
        }
        ctr(&["containers", "rm", id]);
    }

    /// A guard that force-removes container `name-<unique>` when dropped (also on panic).
    pub fn container(&self, name: &str) -> ContainerGuard<'_> {
        let id = unique_id(name);
        self.remember(&id);
        ContainerGuard { ctd: self, id }
    }

    fn remember(&self, id: &str) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if !ids.iter().any(|i| i == id) {
            ids.push(id.to_string());
        }
    }

    /// Bundle dir the runtime v2 manager makes for `id`.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state
            .join("io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }

    /// Socket containerd 1.6 assigns to the shim of `id` (`/run/containerd/s/<sha256>`).
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        use sha2::{Digest, Sha256};
        let key = format!("{}/{}/{}", self.address.display(), self.namespace, id);
        let d = Sha256::digest(key.as_bytes());
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        PathBuf::from("/run/containerd/s").join(hex)
    }

    /// Everything container `id` left behind: mounts, cgroups, processes, shims, bundle, socket.
    pub fn leaks(&self, id: &str) -> Vec<String> {
        let mut v = Vec::new();
        let bundle = self.bundle_dir(id);
        if let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") {
            for l in mi.lines() {
                let mp = l.split(' ').nth(4).unwrap_or("");
                if contains_token(l, id) || Path::new(mp).starts_with(&bundle) {
                    v.push(format!("mount: {l}"));
                }
            }
        }
        for d in find_cgroups(id) {
            v.push(format!("cgroup: {}", d.display()));
        }
        for p in processes() {
            if p.pid == std::process::id() {
                continue;
            }
            let under = |x: &Option<PathBuf>| x.as_ref().is_some_and(|x| x.starts_with(&bundle));
            // Container processes: in a cgroup named after the container (/proc/PID/root and
            // cwd read as "/" from here once they pivot_root into another mount namespace).
            if contains_token(&p.cmdline, id)
                || contains_token(&p.cgroup, id)
                || under(&p.cwd)
                || under(&p.root)
            {
                let what = if p.cmdline.contains("containerd-shim") {
                    "shim process"
                } else {
                    "process"
                };
                v.push(format!("{what} {}: {}", p.pid, p.cmdline));
            }
        }
        if bundle.exists() {
            v.push(format!("bundle dir: {}", bundle.display()));
        }
        let sock = self.shim_socket(id);
        if sock.exists() {
            v.push(format!("shim socket: {}", sock.display()));
        }
        v
    }

    /// Wait (up to `timeout`) until [`Self::leaks`] is empty; panic listing what is left.
    pub fn assert_no_leaks(&self, id: &str, timeout: Duration) {
        let mut last = Vec::new();
        if poll(timeout, || {
            last = self.leaks(id);
            last.is_empty().then_some(())
        })
        .is_none()
        {
            panic!(
                "container {id} left things behind after delete:\n  {}\n--- containerd log ---\n{}",
                last.join("\n  "),
                self.log_tail(30)
            );
        }
    }

    /// Tasks.Update over containerd's gRPC API (ctr 1.6 has no `task update`): `resources`
    /// is an OCI `LinuxResources` JSON object, e.g. `{"memory":{"limit":67108864}}`.
    pub fn update_task(&self, id: &str, resources: &serde_json::Value) -> Result<()> {
        grpc::update_task(&self.address, &self.namespace, id, resources)
    }

    fn shutdown(&mut self) {
        let alive = self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none());
        if alive {
            // Containers first, while containerd and the shims can still clean up properly.
            let t = Duration::from_secs(10);
            let ids: Vec<String> = run_with_timeout(self.ctr_cmd(&["c", "ls", "-q"]), None, t)
                .map(|o| o.stdout.lines().map(|s| s.trim().to_string()).collect())
                .unwrap_or_default();
            for id in ids.iter().filter(|s| !s.is_empty()) {
                self.force_remove(id);
            }
        }
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if !matches!(
                wait_timeout(&mut child, Duration::from_secs(10)),
                Ok(Some(_))
            ) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Leftover shims (their command line names our socket) and container processes
        // (their root or cwd is under our state dir, or their cgroup is ours: named after our
        // namespace, or under our CRI cgroup root).
        let addr = self.address.display().to_string();
        let cg_token = match &self.cri_env {
            Some(env) => env.cgroup_root.clone(),
            None => self.namespace.clone(),
        };
        for _ in 0..3 {
            let mut killed = 0;
            for p in processes() {
                if p.pid == std::process::id() {
                    continue;
                }
                let ours = contains_token_path(&p.cmdline, &addr)
                    || contains_token(&p.cgroup, &cg_token)
                    || p.root.as_ref().is_some_and(|r| r.starts_with(&self.dir))
                    || p.cwd.as_ref().is_some_and(|r| r.starts_with(&self.dir));
                if ours {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p.pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    killed += 1;
                }
            }
            if killed == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        // Sockets of the shims killed above (shims normally remove their own).
        for id in self.ids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = fs::remove_file(self.shim_socket(id));
        }
        // Mounts under our dir, deepest first.
        let mut mounts: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(unescape_mountinfo))
            .filter(|p| p.starts_with(&self.dir))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in &mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        // cgroups of our namespace (runc: /sys/fs/cgroup/<ctrl>/<ns>/<id>), or our CRI cgroup
        // root (/sys/fs/cgroup/<ctrl>/<root>/<pod>/<id>).
        if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
            for c in rd.flatten() {
                let p = c.path().join(&cg_token);
                if p.is_dir() {
                    rmdir_tree(&p);
                }
            }
        }
        if self.cri_env.is_none() {
            // (CRI instances give runc a root of their own under `dir`: `k8s.io` is shared.)
            let _ = fs::remove_dir_all(Path::new("/run/containerd/runc").join(&self.namespace));
        }
        if let Some(env) = &self.cri_env {
            env.teardown();
        }
        let still_mounted = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(unescape_mountinfo))
            .any(|p| p.starts_with(&self.dir));
        if thread::panicking() {
            let keep = workspace_target()
                .join("janus-test")
                .join("logs")
                .join(format!("{}.containerd.log", self.name));
            if fs::create_dir_all(keep.parent().unwrap()).is_ok()
                && fs::copy(&self.log, &keep).is_ok()
            {
                eprintln!("containerd log kept: {}", keep.display());
            }
        }
        if std::env::var_os("JANUS_TEST_KEEP").is_some() {
            eprintln!("JANUS_TEST_KEEP: keeping {}", self.dir.display());
        } else if still_mounted {
            eprintln!(
                "not removing {}: mounts remain under it",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Force-removes its container on drop.
pub struct ContainerGuard<'a> {
    ctd: &'a Containerd,
    pub id: String,
}

impl ContainerGuard<'_> {
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::ops::Deref for ContainerGuard<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.id
    }
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        self.ctd.force_remove(&self.id);
    }
}

/// Spawns containerd (`launch`: launcher and containerd's command line) in a process group of
/// its own, its output appended to `log`.
fn spawn_containerd(launch: &[std::ffi::OsString], path_env: &str, log: &Path) -> Result<Child> {
    let (first, rest) = launch.split_first().context("empty containerd command")?;
    let log_file = fs::OpenOptions::new().append(true).create(true).open(log)?;
    let mut cmd = Command::new(first);
    cmd.args(rest)
        .env("PATH", path_env)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0);
    cmd.spawn().context("spawning containerd")
}

fn containerd_config(dir: &Path, root: &Path, state: &Path, address: &Path, cri: bool) -> String {
    let level = std::env::var("JANUS_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    format!(
        r#"# Private containerd for Janus integration tests.
version = 2
root = "{root}"
state = "{state}"
oom_score = 0
# CRI only where asked for (see below); the snapshotters that can't work here only add noise
# and start time.
disabled_plugins = [
  {cri_plugin}
  # NRI listens on one fixed socket (/var/run/nri/nri.sock): containerd 2.x enables it, and two
  # instances side by side collide. Janus's tests do not use it.
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  address = "{dir}/debug.sock"
  level = "{level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

# Runtimes: ctr passes the runtime type (--runtime) straight to the v2 task manager, which
# runs `containerd-shim-runc-v2` / `containerd-shim-janus-v2` found on containerd's PATH
# (the instance's bin/ dir comes first). No per-runtime tables are needed without CRI.
[plugins."io.containerd.runtime.v2.task"]
  platforms = ["linux/amd64"]
"#,
        root = root.display(),
        state = state.display(),
        address = address.display(),
        dir = dir.display(),
        cri_plugin = if cri {
            ""
        } else {
            "\"io.containerd.grpc.v1.cri\","
        },
    )
}

// ---------------------------------------------------------------------------------------------
// /proc and /sys helpers

/// Does `hay` contain `id` delimited by characters that can't be part of an id?
pub fn contains_token(hay: &str, id: &str) -> bool {
    let is_id = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    let mut start = 0;
    while let Some(i) = hay[start..].find(id) {
        let a = start + i;
        let b = a + id.len();
        let before = hay[..a].chars().next_back();
        let after = hay[b..].chars().next();
        if !before.is_some_and(is_id) && !after.is_some_and(is_id) {
            return true;
        }
        start = a + 1;
    }
    false
}

fn contains_token_path(hay: &str, path: &str) -> bool {
    hay.split([' ', '=']).any(|t| {
        t == path || t.strip_prefix("unix://") == Some(path) || t.starts_with(&format!("{path}/"))
    })
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// A process seen in /proc.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    /// Arguments joined with spaces.
    pub cmdline: String,
    pub cwd: Option<PathBuf>,
    pub root: Option<PathBuf>,
    /// Contents of /proc/PID/cgroup (host view: the test runs in the root cgroup namespace).
    pub cgroup: String,
}

/// All processes (kernel threads have an empty cmdline).
pub fn processes() -> Vec<ProcInfo> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let Ok(raw) = fs::read(p.join("cmdline")) else {
            continue;
        };
        let cmdline = raw
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        v.push(ProcInfo {
            pid,
            cmdline,
            cwd: fs::read_link(p.join("cwd")).ok(),
            root: fs::read_link(p.join("root")).ok(),
            cgroup: fs::read_to_string(p.join("cgroup")).unwrap_or_default(),
        });
    }
    v
}

/// Directories under /sys/fs/cgroup (any controller, any depth up to 8) named `id` or containing
/// it as a token (e.g. `janus-<id>`, `<id>.scope`).
pub fn find_cgroups(id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, id: &str, depth: usize, out: &mut Vec<PathBuf>) {
        if depth > 8 {
            return;
        }
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let name = e.file_name();
            let name = name.to_string_lossy();
            if contains_token(&name, id) {
                out.push(e.path());
            }
            walk(&e.path(), id, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), id, 0, &mut out);
    out
}

fn rmdir_tree(p: &Path) {
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(p);
}

/// The host path of the cgroup (v1 controller `controller`, or the v2 unified hierarchy when
/// `controller` is empty) of process `pid`.
pub fn cgroup_dir(pid: u32, controller: &str) -> Result<PathBuf> {
    cgroup_dir_of(&Path::new("/proc").join(pid.to_string()), controller)
}

/// [`cgroup_dir`] of the process whose /proc directory is `proc` (e.g. one seen through another
/// pid namespace's /proc: the paths are still the host's, as this process reads them).
pub fn cgroup_dir_of(proc: &Path, controller: &str) -> Result<PathBuf> {
    let pid = proc.display();
    let s =
        fs::read_to_string(proc.join("cgroup")).with_context(|| format!("reading {pid}/cgroup"))?;
    for l in s.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        if hit {
            let base = if controller.is_empty() {
                let unified = Path::new("/sys/fs/cgroup/unified");
                if unified.is_dir() {
                    unified.to_path_buf()
                } else {
                    PathBuf::from("/sys/fs/cgroup")
                }
            } else {
                Path::new("/sys/fs/cgroup").join(ctrls)
            };
            return Ok(base.join(path.trim_start_matches('/')));
        }
    }
    bail!("no {controller:?} cgroup for {pid} in:\n{s}")
}

/// Is the host on cgroup v2 only (unified at /sys/fs/cgroup)?
pub fn cgroup_v2_only() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

// ---------------------------------------------------------------------------------------------
// containerd gRPC (only what ctr lacks)

mod grpc {
    use super::*;

    /// google.protobuf.Any
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// containerd.services.tasks.v1.UpdateTaskRequest
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpdateTaskRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(message, optional, tag = "2")]
        pub resources: Option<Any>,
        #[prost(map = "string, string", tag = "3")]
        pub annotations: HashMap<String, String>,
    }

    /// Type URL containerd registers for specs.LinuxResources (JSON-encoded value).
    const LINUX_RESOURCES: &str =
        "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

    pub fn update_task(
        socket: &Path,
        namespace: &str,
        id: &str,
        resources: &serde_json::Value,
    ) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let socket = socket.to_path_buf();
        let req = UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(Any {
                type_url: LINUX_RESOURCES.into(),
                value: serde_json::to_vec(resources)?,
            }),
            annotations: HashMap::new(),
        };
        let ns = namespace.to_string();
        rt.block_on(async move {
            let channel = tonic::transport::Endpoint::try_from("http://containerd.invalid")?
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let socket = socket.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(socket).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .context("connecting to containerd")?;
            let mut client = tonic::client::Grpc::new(channel);
            client.ready().await.context("gRPC channel not ready")?;
            let mut request = tonic::Request::new(req);
            request
                .metadata_mut()
                .insert("containerd-namespace", ns.parse()?);
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/containerd.services.tasks.v1.Tasks/Update",
            );
            let codec = tonic_prost::ProstCodec::<UpdateTaskRequest, ()>::default();
            client
                .unary(request, path, codec)
                .await
                .map_err(|s| anyhow!("Tasks.Update({id}): {:?}: {}", s.code(), s.message()))?;
            Ok(())
        })
    }
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
