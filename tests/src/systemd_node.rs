//! A node whose cgroups systemd manages, on a host without systemd: a container with systemd
//! as its PID 1 and dbus (tests/systemd-node.sh, as kind's node containers), in which a
//! containerd runs the way a kubeadm node runs it (in a scope of its own, with the shim
//! talking to that systemd over the system bus).

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{poll, run_with_timeout, unique_id, wait_timeout, workspace_root, Out};

/// What a node needs from this host; `Err` says what is missing.
pub fn available() -> std::result::Result<(), String> {
    for bin in [
        "/lib/systemd/systemd",
        "/usr/bin/systemd-run",
        "/usr/bin/dbus-daemon",
        "/usr/bin/unshare",
        "/usr/bin/nsenter",
    ] {
        if !Path::new(bin).exists() {
            return Err(format!(
                "{bin} is missing (Debian's systemd, dbus and util-linux packages)"
            ));
        }
    }
    if !Path::new("/sys/fs/cgroup/systemd").is_dir() || !Path::new("/sys/fs/cgroup/memory").is_dir()
    {
        return Err(
            "the node container mounts a hybrid cgroup layout (v1 controllers plus \
                    name=systemd); this host has another"
                .into(),
        );
    }
    Ok(())
}

/// A running node; dropped, everything in it dies and its cgroups go.
pub struct SystemdNode {
    /// Shared with the node at the same path (containerd's instance lives under it).
    pub dir: PathBuf,
    /// The node's cgroup in every hierarchy (host view: `/sys/fs/cgroup/<ctrl>/<cgroup>`).
    pub cgroup: String,
    /// systemd's pid on the host.
    pub pid: u32,
    unshare: Child,
}

impl SystemdNode {
    /// Boots a node under `dir` and waits until systemd says it is running.
    pub fn boot(dir: &Path) -> Result<SystemdNode> {
        let cgroup = format!("janus-node-{}", unique_id("n"));
        let script = workspace_root().join("tests/systemd-node.sh");
        let log = fs::File::create(dir.join("node.log"))?;
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg(dir)
            .arg(&cgroup)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let unshare = cmd.spawn().context("starting tests/systemd-node.sh")?;
        let mut node = SystemdNode {
            dir: dir.to_path_buf(),
            cgroup,
            pid: 0,
            unshare,
        };
        // systemd is the child of unshare (--fork); before the script execs unshare, its
        // children are the set-up commands.
        let children = format!("/proc/{0}/task/{0}/children", node.unshare.id());
        node.pid = poll(Duration::from_secs(10), || {
            let text = fs::read_to_string(&children).ok()?;
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .find(|p| {
                    fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "systemd")
                })
        })
        .with_context(|| format!("no systemd process; {}", node.logs()))?;
        let state = poll(Duration::from_secs(60), || {
            let o = node.exec(&["systemctl", "is-system-running"]).ok()?;
            let s = o.stdout.trim().to_string();
            matches!(s.as_str(), "running" | "degraded").then_some(s)
        });
        if state.is_none() {
            bail!("systemd did not reach running within 60 s; {}", node.logs());
        }
        Ok(node)
    }

    /// `args` run in the node (all its namespaces, its root).
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid.to_string(), "-a", "-r", "-w", "--"]);
        cmd.args(args);
        cmd
    }

    /// `args` run in the node, with their output.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<Out> {
        run_with_timeout(self.command(args), None, Duration::from_secs(30))
    }

    /// The prefix that runs a command in the node in a scope `unit` of its own (as a node's
    /// containerd.service would run it: not in a container's cgroup).
    pub fn launcher(&self, unit: &str) -> Vec<OsString> {
        [
            "nsenter",
            "-t",
            &self.pid.to_string(),
            "-a",
            "-r",
            "-w",
            "--",
            "systemd-run",
            "--quiet",
            "--scope",
            &format!("--unit={unit}"),
            "-p",
            "Delegate=yes",
            "--",
        ]
        .iter()
        .map(OsString::from)
        .collect()
    }

    /// The /proc directory of the node's process `pid` (a pid as the node sees it).
    pub fn proc_dir(&self, pid: u32) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/proc/{pid}", self.pid))
    }

    /// A unit's properties (`systemctl show -p ...`), as `Key=Value` lines.
    pub fn show(&self, unit: &str, props: &[&str]) -> Result<String> {
        let o = self.exec(&["systemctl", "show", unit, "-p", &props.join(",")])?;
        if !o.success() {
            bail!("systemctl show {unit}: {o}");
        }
        Ok(o.stdout)
    }

    /// The node's and its systemd's logs.
    pub fn logs(&self) -> String {
        let read = |f: &str| fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!(
            "--- node.log ---\n{}\n--- systemd (console.log) ---\n{}",
            read("node.log"),
            read("console.log")
        )
    }
}

impl Drop for SystemdNode {
    fn drop(&mut self) {
        // PID 1 of the namespace: its death kills every process in the node.
        if self.pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !matches!(
            wait_timeout(&mut self.unshare, Duration::from_secs(10)),
            Ok(Some(_))
        ) {
            let _ = self.unshare.kill();
            let _ = self.unshare.wait();
        }
        // The node's cgroups, deepest first (their processes are gone with the namespace).
        if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                remove_tree(&h.path().join(&self.cgroup));
            }
        }
    }
}

/// Removes a cgroup directory tree bottom-up (cgroupfs allows only rmdir of empty groups).
fn remove_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    // Processes killed with the node may hold a group for a moment.
    let _ = poll(Duration::from_secs(5), || match fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => None,
        _ => Some(()),
    });
}
