//! One container in a VM pod and its processes: every call goes to the guest agent.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::MessageField;
use oci_spec::runtime::{LinuxResources, Spec};
use protocols::agent as pa;
use runtime::linux::cgroups;
use tokio::task::JoinHandle;

use super::pod::VmPod;
use super::stdio::{self, ProcIo};
use super::{blocking, share, VmSandbox};
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::hooks::{self, Phase};
use crate::metrics;
use crate::process::{Proc, ProcessOps};
use crate::sandbox::ContainerOps;

/// Long enough for any agent call; the VM dying ends calls at once.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long an exit waits for the process's output to reach containerd.
const DRAIN: Duration = Duration::from_secs(5);

pub fn creq(id: &str) -> pa::ContainerRequest {
    pa::ContainerRequest {
        container_id: id.to_string(),
        ..Default::default()
    }
}

/// A guest process: the agent names it by container and exec id.
pub struct VmProcess {
    pod: Arc<VmPod>,
    container_id: String,
    exec_id: String,
    terminal: bool,
    /// The stdin side of its stdio (the output copies belong to the exit watcher).
    io: Mutex<ProcIo>,
}

impl VmProcess {
    /// Attaches the process's ops to its record and watches for its exit.
    pub fn attach(
        pod: &Arc<VmPod>,
        container_id: &str,
        p: &Arc<Proc>,
        mut io: ProcIo,
        events: &Events,
    ) -> Result<()> {
        let outs = std::mem::take(&mut io.outs);
        p.attach(Arc::new(VmProcess {
            pod: pod.clone(),
            container_id: container_id.to_string(),
            exec_id: p.exec_id.clone(),
            terminal: p.io.terminal,
            io: Mutex::new(io),
        }))?;
        let (pod, id, p, events) = (
            pod.clone(),
            container_id.to_string(),
            p.clone(),
            events.clone(),
        );
        tokio::spawn(async move {
            let (code, oom) = wait_exit(&pod, &id, &p.exec_id, outs).await;
            events.exited(&id, &p, code, oom).await;
        });
        Ok(())
    }

    fn io(&self) -> std::sync::MutexGuard<'_, ProcIo> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn preq(&self) -> pa::ProcessRequest {
        pa::ProcessRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        }
    }
}

/// Waits for a guest process's exit: its status from the agent (and whether the agent saw an
/// OOM kill with it), 137 when the VM is gone. Output is drained (bounded) first so
/// containerd has it all before TaskExit.
async fn wait_exit(pod: &VmPod, id: &str, exec_id: &str, outs: Vec<JoinHandle<()>>) -> (i32, bool) {
    let req = pa::ProcessRequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    let ctx = runtime::vm::agent::ctx(FOREVER);
    let (code, oom) = match pod.agent.wait_process(ctx, &req).await {
        Ok(w) => (w.exit_status as i32, w.oom_killed),
        Err(e) => {
            log::warn!("container {id} {exec_id}: wait: {e}; the VM is gone");
            (128 + libc::SIGKILL, false)
        }
    };
    let deadline = Instant::now() + DRAIN;
    for h in outs {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, h).await;
    }
    (code, oom)
}

#[async_trait]
impl ProcessOps for VmProcess {
    async fn signal(&self, sig: u32, all: bool) -> Result<()> {
        let req = pa::SignalRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            signal: sig,
            all,
            ..Default::default()
        };
        self.pod
            .call(
                "signal_process",
                self.pod.agent.signal_process(self.pod.ctx(), &req),
            )
            .await?;
        Ok(())
    }

    async fn resize_pty(&self, width: u32, height: u32) -> Result<()> {
        let req = pa::ResizeRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            width,
            height,
            ..Default::default()
        };
        self.pod
            .call(
                "resize_pty",
                self.pod.agent.resize_pty(self.pod.ctx(), &req),
            )
            .await?;
        Ok(())
    }

    fn exited(&self) {
        self.io().stdin_close.take();
    }

    async fn close_stdin(&self) -> Result<()> {
        // Without a terminal the copy from containerd's FIFO ends (EOF frame follows); a
        // terminal's stdin copy is ours alone: stop it and end the guest side too.
        let tty_copy = {
            let mut io = self.io();
            io.stdin_close.take();
            if self.terminal {
                io.stdin_task.take()
            } else {
                None
            }
        };
        if let Some(t) = tty_copy {
            t.abort();
            self.pod
                .call(
                    "close_stdin",
                    self.pod.agent.close_stdin(self.pod.ctx(), &self.preq()),
                )
                .await?;
        }
        Ok(())
    }
}

/// A container in a VM pod.
pub struct VmContainer {
    pub sandbox: Arc<VmSandbox>,
    pub id: String,
    pub bundle: PathBuf,
    /// The bundle spec, for the host's hooks.
    pub spec: Spec,
    pub rootfs: PathBuf,
    pub rootfs_mounted: bool,
}

impl VmContainer {
    fn pod(&self) -> &Arc<VmPod> {
        &self.sandbox.pod
    }
}

#[async_trait]
impl ContainerOps for VmContainer {
    async fn start(&self) -> Result<u32> {
        let pod = self.pod();
        let req = pa::ProcessRequest {
            container_id: self.id.clone(),
            ..Default::default()
        };
        let pid = pod
            .call("start_process", pod.agent.start_process(pod.ctx(), &req))
            .await?
            .pid;
        let (spec, id, bundle) = (self.spec.clone(), self.id.clone(), self.bundle.clone());
        blocking(move || {
            hooks::run_warn(&spec, &id, &bundle, Phase::Poststart, pid as i32, "running");
            Ok(())
        })
        .await?;
        Ok(pid)
    }

    async fn exec(&self, p: &Arc<Proc>) -> Result<u32> {
        let pod = self.pod();
        let process = serde_json::to_vec(&p.spec.clone().unwrap_or_default())
            .map_err(|e| ShimError::failed("exec spec", e))?;
        let (streams, mut pio) =
            stdio::wire(&pod.plane, &p.io, &self.sandbox.namespace, &self.id).await?;
        let req = pa::ExecProcessRequest {
            container_id: self.id.clone(),
            exec_id: p.exec_id.clone(),
            process,
            stdio: MessageField::some(streams),
            ..Default::default()
        };
        let exec = pod.call("exec_process", pod.agent.exec_process(pod.ctx(), &req));
        let pid = match exec.await {
            Ok(r) => r.pid,
            Err(e) => {
                pio.abort();
                return Err(e);
            }
        };
        p.set_pid(pid as i32);
        pio.start_input(&pod.plane);
        VmProcess::attach(pod, &self.id, p, pio, &self.sandbox.events)?;
        Ok(pid)
    }

    async fn pause(&self) -> Result<()> {
        let pod = self.pod();
        pod.call("pause", pod.agent.pause(pod.ctx(), &creq(&self.id)))
            .await?;
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let pod = self.pod();
        pod.call("resume", pod.agent.resume(pod.ctx(), &creq(&self.id)))
            .await?;
        Ok(())
    }

    async fn update(&self, _res: LinuxResources, raw: Vec<u8>) -> Result<()> {
        let pod = self.pod();
        let u = pa::UpdateRequest {
            container_id: self.id.clone(),
            linux_resources: raw,
            ..Default::default()
        };
        pod.call("update", pod.agent.update(pod.ctx(), &u)).await?;
        Ok(())
    }

    async fn stats(&self) -> Result<Any> {
        let pod = self.pod();
        let r = pod
            .call("stats", pod.agent.stats(pod.ctx(), &creq(&self.id)))
            .await?;
        let s = cgroups::Stats::from_proto(&r.stats.unwrap_or_default());
        // The guest is cgroup v2.
        metrics::to_any(cgroups::Mode::V2, &s)
    }

    async fn pids(&self) -> Result<Vec<i32>> {
        // The guest's processes, as the agent sees them in the container's cgroup.
        let pod = self.pod();
        let r = pod
            .call("pids", pod.agent.pids(pod.ctx(), &creq(&self.id)))
            .await?;
        Ok(r.processes.iter().map(|p| p.pid as i32).collect())
    }

    async fn delete(&self) -> Result<()> {
        let pod = self.pod();
        let pid = self.sandbox.members().remove(&self.id).unwrap_or(0);
        if pod.alive() {
            let rm = creq(&self.id);
            let call = pod.agent.remove_container(pod.ctx(), &rm);
            if let Err(e) = pod.call("remove_container", call).await {
                log::warn!("container {}: remove in the guest: {e}", self.id);
            }
        }
        if self.id == pod.owner {
            // The pod's sandbox (or a plain container) takes the VM with it.
            pod.teardown().await;
        } else {
            let (shared, id) = (pod.shared.clone(), self.id.clone());
            blocking(move || {
                share::unshare_container(&shared, &id);
                Ok(())
            })
            .await?;
        }
        let (spec, id, bundle) = (self.spec.clone(), self.id.clone(), self.bundle.clone());
        let (rootfs, mounted) = (self.rootfs.clone(), self.rootfs_mounted);
        blocking(move || {
            hooks::run_warn(&spec, &id, &bundle, Phase::Poststop, pid, "stopped");
            if mounted {
                runtime::linux::mounts::unmount_all(&rootfs)?;
            }
            Ok(())
        })
        .await
    }
}
