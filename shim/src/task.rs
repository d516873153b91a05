//! The ttrpc Task service: containerd's view of the pod's containers.
//!
//! It holds the records (containers, their init and exec processes), checks every call's
//! preconditions, and raises the events; what runs the containers sits behind the sandbox
//! seam (`crate::sandbox`), chosen per pod by `crate::node`. No call here knows the mode.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::ExitSignal;
use containerd_shim_protos::api::{self, *};
use containerd_shim_protos::events::task::*;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::{EnumOrUnknown, Message, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics::*;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use runtime::linux::spec as rtspec;

use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::node::Sandboxes;
use crate::process::{timestamp, Proc, Status};
use crate::sandbox::{ContainerOps, Sandbox};
use crate::stdio::IoPaths;

/// CRI's annotations naming a container's pod and role.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// How long Delete of a created (never started) init waits for its SIGKILL to land.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The pod sandbox a CRI container (not the sandbox itself) belongs to.
pub fn pod_sandbox_id<'a>(spec: &'a Spec, id: &str) -> Option<&'a String> {
    let ann = spec.annotations().as_ref()?;
    ann.get(CONTAINER_TYPE_ANNOTATION)
        .filter(|t| t.as_str() == "container")
        .and_then(|_| ann.get(SANDBOX_ID_ANNOTATION))
        .filter(|sb| sb.as_str() != id)
}

struct Container {
    id: String,
    bundle: PathBuf,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// Paused is the container's own state (in a VM pod, only its guest cgroup is frozen).
    paused: AtomicBool,
    sandbox: Arc<dyn Sandbox>,
    ops: Arc<dyn ContainerOps>,
}

impl Container {
    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Proc>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs().get(exec_id).cloned().ok_or_else(|| {
            ShimError::NotFound(format!("exec {exec_id} not found in container {}", self.id))
        })
    }

    fn require_running(&self) -> Result<()> {
        if self.init.status() != Status::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} is not running",
                self.id
            )));
        }
        Ok(())
    }
}

struct Inner {
    containers: Mutex<HashMap<String, Arc<Container>>>,
    sandboxes: Arc<dyn Sandboxes>,
    events: Events,
    exit: Arc<ExitSignal>,
}

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

fn io_paths(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> IoPaths {
    IoPaths {
        stdin: stdin.to_string(),
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
        terminal,
    }
}

/// After a failed Create leaves the shim without containers, containerd deletes and shuts it
/// down at once; a shim still idle this much later was abandoned (containerd died during the
/// Create, and a restarted containerd 1.6 keeps such a shim without a task it can list or
/// delete) and exits by itself. containerd then sees its connection close and cleans up the
/// bundle (`shim delete`).
const ABANDONED_AFTER: Duration = Duration::from_secs(10);

/// Runs a multi-step call (Create, Delete) on a task of its own and waits for it. ttrpc drops
/// a handler's future when the caller's connection closes (containerd killed or restarted
/// mid-call): a Create cut short that way left a VM's cgroup behind and no task for the
/// restarted containerd to see or delete. Run to completion, the call leaves a task (e.g.
/// CREATED) that containerd lists and deletes after its restart.
async fn run_to_completion<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    match tokio::spawn(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ShimError::Internal(format!("call cancelled: {e}"))),
    }
}

/// What Delete returns for a process: its pid and how it ended.
fn delete_response(p: &Proc) -> DeleteResponse {
    let st = p.lock();
    DeleteResponse {
        pid: st.pid as u32,
        exit_status: st.exit_status,
        exited_at: MessageField::from_option(st.exited_at.map(timestamp)),
        ..Default::default()
    }
}

impl TaskService {
    pub fn new(sandboxes: Arc<dyn Sandboxes>, events: Events, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                containers: Mutex::new(HashMap::new()),
                sandboxes,
                events,
                exit,
            }),
        }
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))
    }

    pub fn is_empty(&self) -> bool {
        self.containers().is_empty()
    }

    /// See [`ABANDONED_AFTER`].
    fn exit_if_abandoned(&self) {
        if !self.containers().is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ABANDONED_AFTER).await;
            if this.containers().is_empty() {
                log::warn!(
                    "no container {:?} after a failed create and nobody shut the shim down: \
                     exiting",
                    ABANDONED_AFTER
                );
                this.inner.exit.signal();
            }
        });
    }

    async fn create_container(&self, req: &CreateTaskRequest) -> Result<u32> {
        if req.id.is_empty() {
            return Err(ShimError::InvalidArgument("container id is empty".into()));
        }
        if self.containers().contains_key(&req.id) {
            return Err(ShimError::AlreadyExists(format!(
                "container {} already exists",
                req.id
            )));
        }
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(
                "checkpoint/restore is not supported by Janus".into(),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = rtspec::load(&bundle)?;
        let pod = pod_sandbox_id(&spec, &req.id)
            .and_then(|sb| self.containers().get(sb).map(|c| c.sandbox.clone()));
        let sandbox = self.inner.sandboxes.open(req, &spec, pod).await?;
        let init = Proc::new(
            "",
            io_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            None,
        );
        let ops = sandbox.create(req, spec, init.clone()).await?;
        let pid = init.pid();
        let c = Arc::new(Container {
            id: req.id.clone(),
            bundle,
            init,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            sandbox,
            ops,
        });
        self.containers().insert(req.id.clone(), c);
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            // The event's Mount type is private to containerd-shim-protos; containerd
            // does not read the rootfs of this event.
            rootfs: Vec::new(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid: pid as u32,
            ..Default::default()
        };
        self.inner.events.send(TASK_CREATE_EVENT_TOPIC, ev).await;
        Ok(pid as u32)
    }

    async fn start_process(&self, c: &Container, p: &Arc<Proc>) -> Result<u32> {
        if p.exec_id.is_empty() {
            if p.status() != Status::Created {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is not in created state",
                    c.id
                )));
            }
            let pid = c.ops.start().await?;
            p.set_running(pid as i32);
            let ev = TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            };
            self.inner.events.send(TASK_START_EVENT_TOPIC, ev).await;
            return Ok(pid);
        }
        if p.status() != Status::Created || p.has_ops() {
            return Err(ShimError::FailedPrecondition(format!(
                "exec {} already started",
                p.exec_id
            )));
        }
        c.require_running()?;
        let pid = c.ops.exec(p).await?;
        p.set_running(pid as i32);
        let ev = TaskExecStarted {
            container_id: c.id.clone(),
            exec_id: p.exec_id.clone(),
            pid,
            ..Default::default()
        };
        self.inner
            .events
            .send(TASK_EXEC_STARTED_EVENT_TOPIC, ev)
            .await;
        Ok(pid)
    }

    async fn delete_process(&self, c: &Container, p: &Arc<Proc>) -> Result<DeleteResponse> {
        if !p.exec_id.is_empty() {
            if p.status() == Status::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "exec {} is still running",
                    p.exec_id
                )));
            }
            if let Ok(ops) = p.ops() {
                ops.drain().await;
            }
            c.execs().remove(&p.exec_id);
            return Ok(delete_response(p));
        }
        match p.status() {
            Status::Running => {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is running: kill it first",
                    c.id
                )))
            }
            Status::Created => {
                // Never started: it dies here, and Delete reports it killed.
                if let Err(e) = p.ops()?.signal(libc::SIGKILL as u32, false).await {
                    log::warn!("container {}: kill the created init: {e}", c.id);
                }
                let _ = tokio::time::timeout(KILL_WAIT, p.wait()).await;
                p.set_exited(128 + libc::SIGKILL);
            }
            Status::Stopped => {}
        }
        p.ops()?.drain().await;
        c.ops.delete().await?;
        self.containers().remove(&c.id);
        let r = delete_response(p);
        let ev = TaskDelete {
            container_id: c.id.clone(),
            pid: r.pid,
            exit_status: r.exit_status,
            exited_at: r.exited_at.clone(),
            id: c.id.clone(),
            ..Default::default()
        };
        self.inner.events.send(TASK_DELETE_EVENT_TOPIC, ev).await;
        Ok(r)
    }

    /// Pids with their exec ids (containerd's ProcessDetails) where a record knows them.
    fn process_infos(c: &Container, pids: Vec<i32>) -> Vec<ProcessInfo> {
        let execs: HashMap<i32, String> = c
            .execs()
            .values()
            .map(|p| (p.pid(), p.exec_id.clone()))
            .filter(|(pid, _)| *pid > 0)
            .collect();
        pids.into_iter()
            .map(|pid| {
                let info = execs.get(&pid).and_then(|exec_id| {
                    let d = containerd_shim_protos::shim::oci::ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    Some(Any {
                        type_url: "containerd.runc.v1.ProcessDetails".into(),
                        value: d.write_to_bytes().ok()?,
                        ..Default::default()
                    })
                });
                ProcessInfo {
                    pid: pid as u32,
                    info: MessageField::from_option(info),
                    ..Default::default()
                }
            })
            .collect()
    }
}

type TResult<T> = ttrpc::Result<T>;

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TResult<StateResponse> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let st = p.lock();
        let status = match st.status {
            Status::Created => api::Status::CREATED,
            Status::Running if c.paused.load(Ordering::SeqCst) => api::Status::PAUSED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        Ok(StateResponse {
            id: if req.exec_id.is_empty() {
                c.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.display().to_string(),
            pid: st.pid as u32,
            status: EnumOrUnknown::new(status),
            stdin: p.io.stdin.clone(),
            stdout: p.io.stdout.clone(),
            stderr: p.io.stderr.clone(),
            terminal: p.io.terminal,
            exit_status: st.exit_status,
            exited_at: MessageField::from_option(st.exited_at.map(timestamp)),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TResult<CreateTaskResponse> {
        let this = self.clone();
        let pid = run_to_completion(async move {
            this.create_container(&req).await.map_err(|e| {
                log::warn!("create {}: {e}", req.id);
                this.exit_if_abandoned();
                e
            })
        })
        .await?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TResult<StartResponse> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let pid = self.start_process(&c, &p).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TResult<DeleteResponse> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let this = self.clone();
        Ok(run_to_completion(async move { this.delete_process(&c, &p).await }).await?)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TResult<PidsResponse> {
        let c = self.get(&req.id)?;
        let pids = c.ops.pids().await?;
        Ok(PidsResponse {
            processes: Self::process_infos(&c, pids),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        c.require_running()?;
        c.ops.pause().await?;
        c.paused.store(true, Ordering::SeqCst);
        let ev = TaskPaused {
            container_id: c.id.clone(),
            ..Default::default()
        };
        self.inner.events.send(TASK_PAUSED_EVENT_TOPIC, ev).await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        if !c.paused.load(Ordering::SeqCst) {
            return Err(
                ShimError::FailedPrecondition(format!("container {} is not paused", c.id)).into(),
            );
        }
        c.ops.resume().await?;
        c.paused.store(false, Ordering::SeqCst);
        let ev = TaskResumed {
            container_id: c.id.clone(),
            ..Default::default()
        };
        self.inner.events.send(TASK_RESUMED_EVENT_TOPIC, ev).await;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: CheckpointTaskRequest) -> TResult<Empty> {
        Err(ShimError::Unimplemented(
            "checkpoint is not supported by Janus (no CRIU integration)".into(),
        )
        .into())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        // Killing all of a container's processes is valid after its init exited (containerd
        // does it for containers without a pid namespace of their own).
        let all = req.all && req.exec_id.is_empty();
        if p.status() == Status::Stopped && !all {
            return Err(ShimError::NotFound("process already finished".into()).into());
        }
        p.ops()?.signal(req.signal, all).await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        if req.exec_id.is_empty() {
            return Err(ShimError::InvalidArgument("exec id is empty".into()).into());
        }
        if c.execs().contains_key(&req.exec_id) {
            return Err(
                ShimError::AlreadyExists(format!("exec {} already exists", req.exec_id)).into(),
            );
        }
        c.require_running()?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let process: OciProcess = serde_json::from_slice(&spec)
            .map_err(|e| ShimError::InvalidArgument(format!("exec process spec: {e}")))?;
        rtspec::validate_process(&process, "exec process").map_err(ShimError::from)?;
        let io = io_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        c.execs().insert(
            req.exec_id.clone(),
            Proc::new(&req.exec_id, io, Some(process)),
        );
        let ev = TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.inner
            .events
            .send(TASK_EXEC_ADDED_EVENT_TOPIC, ev)
            .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        p.ops()?.resize_pty(req.width, req.height).await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        // Before Start there is no copy to end yet.
        if let (true, Ok(ops)) = (req.stdin, p.ops()) {
            ops.close_stdin().await?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        let raw = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let res: LinuxResources = serde_json::from_slice(&raw)
            .map_err(|e| ShimError::InvalidArgument(format!("update resources: {e}")))?;
        c.ops.update(res, raw).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TResult<WaitResponse> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        p.wait().await;
        let st = p.lock();
        Ok(WaitResponse {
            exit_status: st.exit_status,
            exited_at: MessageField::from_option(st.exited_at.map(timestamp)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TResult<StatsResponse> {
        let c = self.get(&req.id)?;
        let any = c.ops.stats().await?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TResult<ConnectResponse> {
        let task_pid = self.get(&req.id).map(|c| c.init.pid() as u32).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TResult<Empty> {
        if self.containers().is_empty() {
            self.inner.exit.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests;
