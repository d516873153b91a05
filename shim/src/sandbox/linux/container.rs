//! One namespace-mode container and its processes: signals, the cgroup (pause, update,
//! stats, pids), the terminal, and the exit handling the reaper calls into.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Spec};
use runtime::linux::cgroups::Cgroup;
use runtime::linux::lifecycle::OomMonitor;
use runtime::linux::mounts;
use runtime::linux::spawn;
use runtime::linux::sync::Channel;
use runtime::linux::zygote::{SpawnKind, SpawnRequest};
use tokio::sync::oneshot;

use super::LinuxSandbox;
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::hooks::{self, Phase};
use crate::metrics;
use crate::process::{Proc, ProcessOps};
use crate::sandbox::host::blocking;
use crate::sandbox::ContainerOps;
use crate::stdio::{self, Tty};

/// What an exit of one of the container's processes needs (shared with the pid table).
pub struct ExitScope {
    pub id: String,
    pub cgroup: Cgroup,
    /// Started once the cgroup exists (after the init's spawn).
    pub oom: OnceLock<OomMonitor>,
    pub own_pidns: bool,
    pub events: Events,
}

impl ExitScope {
    pub async fn exited(&self, p: &Proc, code: i32) {
        let is_init = p.exec_id.is_empty();
        // An OOM kill the watcher thread has not reported yet must still reach containerd,
        // and before the exit.
        let oom = is_init && self.oom.get().is_some_and(|m| m.claim_unreported());
        if is_init && !self.own_pidns {
            // Without its own pid namespace nothing reaps the container's other processes
            // when init dies: do what the kernel would.
            let cg = self.cgroup.clone();
            std::thread::spawn(move || {
                if let Err(e) = cg.kill_all(libc::SIGKILL) {
                    log::warn!("cgroup {}: kill the rest: {e}", cg.rel());
                }
            });
        }
        self.events.exited(&self.id, p, code, oom).await;
    }
}

/// The host side of one process: its pid, the setup channel until Start, stdin and terminal.
pub struct LinuxProcess {
    pid: i32,
    /// The setup channel of a created, not yet started, process.
    pub sync: Mutex<Option<Channel>>,
    /// Closing (or dropping) it ends the stdin copy: the process sees EOF.
    stdin_close: Mutex<Option<oneshot::Sender<()>>>,
    tty: Mutex<Option<Tty>>,
    /// The init's cgroup, for signals to all of the container.
    cgroup: Option<Cgroup>,
}

impl LinuxProcess {
    pub fn new(
        pid: i32,
        sync: Option<Channel>,
        stdin: Option<(String, OwnedFd)>,
        tty: Option<Tty>,
        cgroup: Option<Cgroup>,
    ) -> LinuxProcess {
        LinuxProcess {
            pid,
            sync: Mutex::new(sync),
            stdin_close: Mutex::new(stdin.map(|(path, w)| stdio::copy_stdin(path, w))),
            tty: Mutex::new(tty),
            cgroup,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn signal_pid(pid: i32, sig: u32) -> Result<()> {
    runtime::linux::lifecycle::signal::signal(pid, sig)
}

#[async_trait]
impl ProcessOps for LinuxProcess {
    async fn signal(&self, sig: u32, all: bool) -> Result<()> {
        if let (true, Some(cg)) = (all, self.cgroup.clone()) {
            return blocking(move || Ok(cg.kill_all(sig as i32)?)).await;
        }
        signal_pid(self.pid, sig)
    }

    async fn resize_pty(&self, width: u32, height: u32) -> Result<()> {
        let tty = lock(&self.tty);
        let tty = tty
            .as_ref()
            .ok_or_else(|| ShimError::FailedPrecondition("process has no terminal".into()))?;
        runtime::linux::sync::resize_pty(&tty.master, width, height).map_err(ShimError::from)
    }

    async fn close_stdin(&self) -> Result<()> {
        lock(&self.stdin_close).take();
        if let Some(t) = lock(&self.tty).as_mut().and_then(|t| t.stdin_task.take()) {
            t.abort();
        }
        Ok(())
    }

    fn exited(&self) {
        lock(&self.stdin_close).take();
        lock(&self.sync).take();
    }

    async fn drain(&self) {
        let done = lock(&self.tty).as_ref().map(|t| t.done.clone());
        if let Some(d) = done {
            stdio::wait_done(d, Duration::from_secs(5)).await;
        }
    }
}

/// A namespace-mode container.
pub struct LinuxContainer {
    pub sandbox: Arc<LinuxSandbox>,
    pub scope: Arc<ExitScope>,
    pub init: Arc<LinuxProcess>,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub rootfs_mounted: bool,
    /// The bundle spec, kept for exec processes (seccomp) and hooks.
    pub spec: Spec,
    pub namespaces: Vec<LinuxNamespaceType>,
}

#[async_trait]
impl ContainerOps for LinuxContainer {
    async fn start(&self) -> Result<u32> {
        let sync = lock(&self.init.sync)
            .take()
            .ok_or_else(|| ShimError::FailedPrecondition("container already started".into()))?;
        blocking(move || Ok(spawn::release(&sync)?)).await?;
        let (spec, id, bundle, pid) = (
            self.spec.clone(),
            self.scope.id.clone(),
            self.bundle.clone(),
            self.init.pid,
        );
        blocking(move || {
            hooks::run_warn(&spec, &id, &bundle, Phase::Poststart, pid, "running");
            Ok(())
        })
        .await?;
        Ok(pid as u32)
    }

    async fn exec(&self, p: &Arc<Proc>) -> Result<u32> {
        let req = SpawnRequest {
            kind: SpawnKind::Exec {
                init_pid: self.init.pid,
                namespaces: self.namespaces.clone(),
            },
            process: p.spec.clone().unwrap_or_default(),
            terminal: p.io.terminal,
            seccomp: self.spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
        };
        let (sb, scope, cg, p2) = (
            self.sandbox.clone(),
            self.scope.clone(),
            self.scope.cgroup.clone(),
            p.clone(),
        );
        let mut spawned = blocking(move || {
            let place = spawn::Placement {
                cgroup: Some(&cg),
                ..spawn::Placement::default()
            };
            let s = sb.spawn_setup(req, &p2, scope, place, None)?;
            if let Err(e) = spawn::release(&s.sync) {
                sb.exits.unregister(s.pid);
                let _ = signal_pid(s.pid, libc::SIGKILL as u32);
                return Err(e.into());
            }
            Ok(s)
        })
        .await?;
        let pid = spawned.pid;
        let tty = spawned.tty(&p.io)?;
        let stdin = spawned.stdin.map(|w| (p.io.stdin.clone(), w));
        p.attach(Arc::new(LinuxProcess::new(pid, None, stdin, tty, None)))?;
        Ok(pid as u32)
    }

    async fn pause(&self) -> Result<()> {
        let cg = self.scope.cgroup.clone();
        blocking(move || Ok(cg.freeze()?)).await
    }

    async fn resume(&self) -> Result<()> {
        let cg = self.scope.cgroup.clone();
        blocking(move || Ok(cg.thaw()?)).await
    }

    async fn update(&self, res: LinuxResources, _raw: Vec<u8>) -> Result<()> {
        let cg = self.scope.cgroup.clone();
        blocking(move || Ok(cg.apply(&res, true)?)).await
    }

    async fn stats(&self) -> Result<Any> {
        let cg = self.scope.cgroup.clone();
        blocking(move || metrics::to_any(cg.mode(), &cg.stats()?)).await
    }

    async fn pids(&self) -> Result<Vec<i32>> {
        let cg = self.scope.cgroup.clone();
        blocking(move || Ok(cg.procs().unwrap_or_default())).await
    }

    async fn delete(&self) -> Result<()> {
        self.sandbox.exits.unregister(self.init.pid);
        let (cg, spec, id, bundle) = (
            self.scope.cgroup.clone(),
            self.spec.clone(),
            self.scope.id.clone(),
            self.bundle.clone(),
        );
        let (rootfs, mounted, pid) = (self.rootfs.clone(), self.rootfs_mounted, self.init.pid);
        blocking(move || {
            cg.destroy()?;
            hooks::run_warn(&spec, &id, &bundle, Phase::Poststop, pid, "stopped");
            if mounted {
                mounts::unmount_all(&rootfs)?;
            }
            match std::fs::remove_file(bundle.join(super::INIT_PID)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ShimError::Internal(
                    format!("remove {}: {e}", super::INIT_PID),
                )),
                _ => Ok(()),
            }
        })
        .await
    }
}
