//! `janus install --stay`: install, wait for SIGTERM or SIGINT, uninstall. The installer
//! DaemonSet's container runs this: its pod installs Janus when it starts and takes it off the
//! node again when it is deleted (kubelet sends SIGTERM and waits the grace period).

use std::path::Path;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::install::{install, uninstall, Target};

/// SIGTERM and SIGINT, caught from the moment this is made: one that arrives while the
/// install runs is kept, and [`StopSignals::wait`] then returns at once. Only handlers are
/// installed (no signal is blocked), so the commands the install runs get the default
/// dispositions back when they exec.
pub struct StopSignals {
    rt: tokio::runtime::Runtime,
    term: Signal,
    int: Signal,
}

impl StopSignals {
    pub fn catch() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .context("tokio runtime")?;
        let (term, int) = rt
            .block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::terminate())?,
                    signal(SignalKind::interrupt())?,
                ))
            })
            .context("catching SIGTERM and SIGINT")?;
        Ok(Self { rt, term, int })
    }

    /// Blocks (no polling) until one of them arrives; returns its name.
    pub fn wait(self) -> &'static str {
        let Self {
            rt,
            mut term,
            mut int,
        } = self;
        rt.block_on(async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        })
    }
}

/// Installs, calls `wait` (which returns when it is time to go, naming why), uninstalls the
/// same target. A failed install is returned as is: its manifest lets the next install (the
/// restarted container) or an uninstall undo what it did.
pub fn install_and_stay(
    t: &Target,
    payload: &Path,
    wait: impl FnOnce() -> &'static str,
) -> Result<()> {
    install(t, payload)?;
    eprintln!("janus install: installed; uninstalling on SIGTERM or SIGINT");
    let why = wait();
    eprintln!("janus install: {why}: uninstalling");
    uninstall(t).context("uninstall after the signal")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    /// Every path under `root` with its bytes (directories: empty).
    fn tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                if p.is_dir() {
                    todo.push(p);
                    out.push((rel, Vec::new()));
                } else {
                    out.push((rel, fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    /// A payload as the installer image has it under /opt/janus.
    fn payload(dir: &Path) {
        for (p, text) in [
            ("bin/containerd-shim-janus-v2", "shim"),
            ("bin/janus", "janus"),
            ("guest/vmlinux", "kernel"),
            ("guest/initramfs.cpio", "initrd"),
            ("etc/config.toml", "mode = \"namespace\"\n"),
            ("etc/vm.toml", "mode = \"vm\"\n"),
        ] {
            fs::create_dir_all(dir.join(p).parent().unwrap()).unwrap();
            fs::write(dir.join(p), text).unwrap();
        }
    }

    fn target(root: &Path) -> Target {
        Target {
            host_root: root.to_path_buf(),
            node_root: root.to_path_buf(),
            containerd_config: PathBuf::from("/etc/containerd/config.toml"),
            containerd_major: Some(1),
            restart: None,
            node: None,
        }
    }

    #[test]
    fn stays_installed_until_told_then_restores_the_node() {
        let (root, from) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        payload(from.path());
        fs::create_dir_all(root.path().join("etc/containerd")).unwrap();
        fs::write(
            root.path().join("etc/containerd/config.toml"),
            "version = 2\n# the node's own\n",
        )
        .unwrap();
        let before = tree(root.path());
        let t = target(root.path());
        install_and_stay(&t, from.path(), || {
            // Installed while waiting.
            assert!(root
                .path()
                .join("usr/local/bin/containerd-shim-janus-v2")
                .is_file());
            assert!(root
                .path()
                .join("var/lib/janus/install/manifest.json")
                .is_file());
            "test"
        })
        .unwrap();
        assert_eq!(tree(root.path()), before);
    }

    #[test]
    fn failed_install_does_not_wait() {
        let (root, from) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // No payload: the install fails.
        let r = install_and_stay(&target(root.path()), from.path(), || {
            panic!("waited after a failed install")
        });
        assert!(r.is_err());
    }

    /// A signal that arrives before `wait` (during the install) is not lost.
    #[test]
    fn signal_before_wait_is_kept() {
        let s = StopSignals::catch().unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        assert_eq!(s.wait(), "SIGTERM");
    }
}
