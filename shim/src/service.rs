//! The ttrpc Task service: containerd's view of the pod's containers.
//!
//! Namespace mode is implemented here on `runtime::linux`; VM mode (`mode = "vm"`, or the
//! `containerd-shim-janus-vm-v2` alias) runs the container in a VM through the agent (`vm`),
//! with the same process records, events and error codes.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
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
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process as OciProcess, Spec};
use runtime::linux::cgroups::{self, Cgroup};
use runtime::linux::spawn;
use runtime::linux::spec::NsPlan;
use runtime::linux::sync::Channel;
use runtime::linux::zygote::{SpawnKind, SpawnRequest, Zygote};
use runtime::linux::{hooks, mounts, spec as rtspec};

use crate::config::{self, Config, Mode, RuntimeName};
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::metrics;
use crate::options;
use crate::process::{now, Proc, Status};
use crate::stdio::{self, IoPaths};
use crate::vm::{self, VmPod};

pub static ZYGOTE: OnceLock<Zygote> = OnceLock::new();

/// A container's hooks with what their state document needs.
type RuntimeHooks = (
    oci_spec::runtime::Hooks,
    PathBuf,
    Option<HashMap<String, String>>,
);

/// Runs runtime-namespace hooks whose failure only warrants a warning (poststart, poststop).
fn run_hooks_warn(c: &Container, phase: &str, pid: i32, status: &str) {
    let Some(h) = c.spec.hooks() else { return };
    let list = match phase {
        "poststart" => h.poststart().clone(),
        _ => h.poststop().clone(),
    }
    .unwrap_or_default();
    if list.is_empty() {
        return;
    }
    let state = hooks::state_json(&c.id, status, pid, &c.bundle, c.spec.annotations().as_ref());
    if let Some(z) = ZYGOTE.get() {
        if let Err(e) = z.run_hooks(list, state, phase) {
            log::warn!("container {}: {e}", c.id);
        }
    }
}

/// VM mode: the runtime-namespace hooks of create (prestart, createRuntime) run on the host,
/// once the guest has created the container (so after its createContainer hooks), with the
/// container's (guest) pid in the state. A failure fails Create, as in namespace mode.
fn vm_runtime_hooks(spec: &Spec, id: &str, bundle: &Path, pid: i32) -> Result<()> {
    let Some(h) = spec.hooks() else { return Ok(()) };
    let state = hooks::state_json(id, "creating", pid, bundle, spec.annotations().as_ref());
    let z = ZYGOTE
        .get()
        .ok_or_else(|| ShimError::Internal("no zygote to run hooks".into()))?;
    z.run_hooks(
        h.prestart().clone().unwrap_or_default(),
        state.clone(),
        "prestart",
    )?;
    z.run_hooks(
        h.create_runtime().clone().unwrap_or_default(),
        state,
        "createRuntime",
    )?;
    Ok(())
}

/// CRI's annotations naming a container's pod and role.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// The pod sandbox a CRI container (not the sandbox itself) belongs to.
fn pod_sandbox_id<'a>(spec: &'a Spec, id: &str) -> Option<&'a String> {
    let ann = spec.annotations().as_ref()?;
    ann.get(CONTAINER_TYPE_ANNOTATION)
        .filter(|t| t.as_str() == "container")
        .and_then(|_| ann.get(SANDBOX_ID_ANNOTATION))
        .filter(|sb| sb.as_str() != id)
}

const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub rootfs_mounted: bool,
    /// The bundle spec, kept for exec processes (seccomp) and hooks.
    pub spec: Spec,
    pub cgroup: Option<Cgroup>,
    pub namespaces: Vec<LinuxNamespaceType>,
    pub own_pidns: bool,
    pub init: Arc<Proc>,
    pub execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// OOM kills already reported (shared with the OOM watcher thread).
    pub oom_seen: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// VM mode: the container's VM.
    pub vm: Option<Arc<VmPod>>,
    /// VM mode: paused through the agent (this container's guest cgroup, not the pod's VM).
    /// Namespace mode reads the freezer instead.
    pub vm_paused: std::sync::atomic::AtomicBool,
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

    fn paused(&self) -> bool {
        if self.vm.is_some() {
            return self.vm_paused.load(std::sync::atomic::Ordering::SeqCst);
        }
        self.cgroup.as_ref().map(|c| c.is_frozen()).unwrap_or(false)
    }
}

#[derive(Default)]
struct PidTable {
    owners: HashMap<i32, (String, String)>,
    /// Exits seen before their pid was registered (bounded).
    early: HashMap<i32, i32>,
}

pub struct Inner {
    namespace: String,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pids: Mutex<PidTable>,
    events: Events,
    exit: Arc<ExitSignal>,
    /// The runtime name we were started as (the janus-vm alias pins VM mode).
    runtime_name: RuntimeName,
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ShimError::Internal(format!("blocking task: {e}")))?
}

/// The network namespace CNI set up for a pod (the sandbox spec's network namespace path).
fn pod_netns(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
        .and_then(|n| n.path().clone())
        .filter(|p| !p.as_os_str().is_empty())
}

/// What Delete returns for a process: its pid and how it ended.
fn delete_response(p: &Proc) -> DeleteResponse {
    let st = p.lock();
    DeleteResponse {
        pid: st.pid as u32,
        exit_status: st.exit_status,
        exited_at: MessageField::from_option(st.exited_at.clone()),
        ..Default::default()
    }
}

fn signal_pid(pid: i32, sig: u32) -> Result<()> {
    // SAFETY: kill(2) has no memory effects.
    if unsafe { libc::kill(pid, sig as i32) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Err(ShimError::NotFound("process already finished".into()));
        }
        return Err(ShimError::Internal(format!("kill {pid}: {e}")));
    }
    Ok(())
}

/// The shim's part of the setup handshake: pid bookkeeping and runtime-namespace hooks.
struct ShimSetup<'a> {
    svc: &'a Service,
    zygote: &'a Zygote,
    id: &'a str,
    exec_id: &'a str,
    runtime_hooks: Option<RuntimeHooks>,
}

impl spawn::SetupHooks for ShimSetup<'_> {
    fn register(&mut self, pid: i32) -> Option<i32> {
        self.svc.register(pid, self.id, self.exec_id)
    }

    fn unregister(&mut self, pid: i32) {
        self.svc.unregister(pid)
    }

    fn runtime_hooks(&mut self, pid: i32) -> runtime::linux::Result<()> {
        let Some((hooks, bundle, annotations)) = &self.runtime_hooks else {
            return Ok(());
        };
        let state = hooks::state_json(self.id, "creating", pid, bundle, annotations.as_ref());
        let prestart = hooks.prestart().clone().unwrap_or_default();
        let create_runtime = hooks.create_runtime().clone().unwrap_or_default();
        self.zygote.run_hooks(prestart, state.clone(), "prestart")?;
        self.zygote
            .run_hooks(create_runtime, state, "createRuntime")
    }
}

impl Service {
    pub fn new(
        namespace: String,
        events: Events,
        exit: Arc<ExitSignal>,
        runtime_name: RuntimeName,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace,
                containers: Mutex::new(HashMap::new()),
                pids: Mutex::new(PidTable::default()),
                events,
                exit,
                runtime_name,
            }),
        }
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn pids(&self) -> std::sync::MutexGuard<'_, PidTable> {
        self.inner.pids.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Called by the reaper for every child that exited.
    pub fn on_exit(&self, pid: i32, code: i32) {
        if runtime::vm::record_reaped(pid, code) || crate::command::record_exit(pid, code) {
            return;
        }
        let owner = {
            let mut t = self.pids();
            match t.owners.remove(&pid) {
                Some(o) => o,
                None => {
                    if t.early.len() > 1024 {
                        t.early.clear();
                    }
                    t.early.insert(pid, code);
                    return;
                }
            }
        };
        let Ok(c) = self.get(&owner.0) else { return };
        let Ok(p) = c.process(&owner.1) else { return };
        self.finish(&c, &p, code);
    }

    fn finish(&self, c: &Arc<Container>, p: &Arc<Proc>, code: i32) {
        if !p.set_exited(code) {
            return;
        }
        let is_init = p.exec_id.is_empty();
        if is_init {
            // An OOM kill the watcher thread has not reported yet must still reach
            // containerd, and before the exit (CRI derives the OOMKilled reason from it).
            if let (Some(cg), Some(seen)) = (&c.cgroup, &c.oom_seen) {
                if let Some(k) = cg.oom_kill_count() {
                    if cgroups::claim(seen, k) {
                        self.inner.events.send(
                            TASK_OOM_EVENT_TOPIC,
                            TaskOOM {
                                container_id: c.id.clone(),
                                ..Default::default()
                            },
                        );
                    }
                }
            }
        }
        if is_init && !c.own_pidns {
            // Without its own pid namespace nothing reaps the container's other processes
            // when init dies: do what the kernel would.
            if let Some(cg) = c.cgroup.clone() {
                std::thread::spawn(move || {
                    let _ = cg.kill_all(libc::SIGKILL);
                });
            }
        }
        let st = p.lock();
        self.inner.events.send(
            TASK_EXIT_EVENT_TOPIC,
            TaskExit {
                container_id: c.id.clone(),
                id: if is_init {
                    c.id.clone()
                } else {
                    p.exec_id.clone()
                },
                pid: st.pid as u32,
                exit_status: st.exit_status,
                exited_at: MessageField::from_option(st.exited_at.clone()),
                ..Default::default()
            },
        );
    }

    fn register(&self, pid: i32, id: &str, exec_id: &str) -> Option<i32> {
        let mut t = self.pids();
        if let Some(code) = t.early.remove(&pid) {
            return Some(code);
        }
        t.owners.insert(pid, (id.to_string(), exec_id.to_string()));
        None
    }

    fn unregister(&self, pid: i32) {
        self.pids().owners.remove(&pid);
    }

    /// Spawns a process through the zygote up to the point where it waits for Start.
    /// Returns its pid, the channel to release it, the pty master and the stdin pipe, if any.
    // Each argument is a distinct part of one setup handshake; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn spawn_blocking_setup(
        &self,
        req: SpawnRequest,
        io: &IoPaths,
        id: &str,
        exec_id: &str,
        cgroup: Option<&Cgroup>,
        id_maps: Option<(String, String)>,
        runtime_hooks: Option<RuntimeHooks>,
    ) -> Result<(i32, Channel, Option<OwnedFd>, Option<OwnedFd>)> {
        let zygote = ZYGOTE
            .get()
            .ok_or_else(|| ShimError::Internal("zygote not running".into()))?;
        let prepared = stdio::prepare(io, &self.inner.namespace, id)?;
        let fds: Vec<_> = prepared.child.iter().map(|f| f.as_raw_fd()).collect();
        let mut steps = ShimSetup {
            svc: self,
            zygote,
            id,
            exec_id,
            runtime_hooks,
        };
        let place = spawn::Placement { cgroup, id_maps };
        let spawned = spawn::spawn(zygote, &req, &fds, place, SETUP_TIMEOUT, &mut steps)?;
        drop(prepared.child);
        Ok((
            spawned.pid,
            spawned.sync,
            spawned.pty_master,
            prepared.stdin_pipe,
        ))
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
        let mut config_path = None;
        if let Some(any) = req.options.as_ref() {
            let o = options::decode(any).map_err(ShimError::InvalidArgument)?;
            if let Some(o) = o.filter(|o| !o.config_path.is_empty()) {
                config_path = Some(PathBuf::from(o.config_path));
            }
        }
        let (mut mode, source, config) =
            config::resolve(self.inner.runtime_name, config_path.as_deref())?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = rtspec::load(&bundle)?;
        // A pod is one isolation unit: a container of a pod whose sandbox runs in a VM here
        // runs in that VM, whatever its own config would say.
        let in_vm_pod = || {
            pod_sandbox_id(&spec, &req.id)
                .is_some_and(|sb| self.containers().get(sb).is_some_and(|c| c.vm.is_some()))
        };
        if mode == Mode::Namespace && in_vm_pod() {
            mode = Mode::Vm;
        }
        log::info!(
            "container {}: {mode} mode ({source:?}; runtime {})",
            req.id,
            self.inner.runtime_name.runtime_id()
        );
        if mode == Mode::Vm {
            return self.create_vm_container(req, config, spec).await;
        }
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_default();
        let rootfs = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        let plan = NsPlan::from_spec(&spec)?;
        let new_user = plan.new_user();
        lsm_warnings(&req.id, &spec);
        let linux = spec.linux().clone().unwrap_or_default();
        let rel = cgroups::spec_path(&spec, &req.id)?;
        let io = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let terminal_spec = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        if terminal_spec != req.terminal {
            log::debug!(
                "terminal in request ({}) differs from spec ({terminal_spec})",
                req.terminal
            );
        }
        let mounts: Vec<(String, String, Vec<String>)> = req
            .rootfs
            .iter()
            .map(|m| (m.type_.clone(), m.source.clone(), m.options.clone()))
            .collect();
        let id = req.id.clone();
        let me = self.clone();
        let spec2 = spec.clone();
        let rootfs2 = rootfs.clone();
        let bundle2 = bundle.clone();
        let (pid, sync, master, keeper, cgroup, mounted) = blocking(move || {
            let mut mounted = false;
            let cleanup = |cg: Option<&Cgroup>, mounted: bool| {
                if let Some(cg) = cg {
                    let _ = cg.destroy();
                }
                if mounted {
                    let _ = mounts::unmount_all(&rootfs2);
                }
            };
            for (typ, src, opts) in &mounts {
                if let Err(e) = mounts::mount_rootfs_layer(typ, src, opts, &rootfs2) {
                    cleanup(None, mounted);
                    return Err(e.into());
                }
                mounted = true;
            }
            let cg = Cgroup::new(&rel)?;
            let setup = (|| -> Result<()> {
                cg.create()?;
                if let Some(res) = linux.resources() {
                    cg.apply(res, false)?;
                } else {
                    cg.apply(&LinuxResources::default(), false)?;
                }
                Ok(())
            })();
            if let Err(e) = setup {
                cleanup(Some(&cg), mounted);
                return Err(e);
            }
            let maps = new_user.then(|| {
                let fmt = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
                    m.iter()
                        .flatten()
                        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
                        .collect::<String>()
                };
                (fmt(linux.uid_mappings()), fmt(linux.gid_mappings()))
            });
            let process = spec2.process().clone().unwrap_or_default();
            let seccomp = linux.seccomp().clone();
            let spec_hooks = spec2.hooks().clone();
            let annotations = spec2.annotations().clone();
            let req = SpawnRequest {
                kind: SpawnKind::Init {
                    id: id.clone(),
                    bundle: bundle2.clone(),
                    spec: Box::new(spec2),
                    rootfs: rootfs2.clone(),
                    cgroup_dirs: cg.dirs(),
                },
                process,
                terminal: io.terminal,
                seccomp,
            };
            let rh = spec_hooks.map(|h| (h, bundle2.clone(), annotations));
            match me.spawn_blocking_setup(req, &io, &id, "", Some(&cg), maps, rh) {
                Ok((pid, sync, master, keeper)) => Ok((pid, sync, master, keeper, cg, mounted)),
                Err(e) => {
                    cleanup(Some(&cg), mounted);
                    Err(e)
                }
            }
        })
        .await?;
        let _ = std::fs::write(bundle.join("init.pid"), pid.to_string());
        let init = Proc::new(
            "",
            IoPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            None,
        );
        {
            let mut st = init.lock();
            st.pid = pid;
            st.sync = Some(sync);
            if let Some(w) = keeper {
                st.stdin_close = Some(stdio::copy_stdin(init.io.stdin.clone(), w));
            }
            if let Some(m) = master {
                st.tty = Some(stdio::start_tty(m, &init.io)?);
            }
        }
        let c = Arc::new(Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            rootfs,
            rootfs_mounted: mounted,
            namespaces: plan.types(),
            own_pidns: plan.new_pid(),
            spec,
            cgroup: Some(cgroup.clone()),
            init,
            execs: Mutex::new(HashMap::new()),
            oom_seen: self.watch_oom(&req.id, &cgroup),
            vm: None,
            vm_paused: Default::default(),
        });
        self.containers().insert(req.id.clone(), c);
        self.send_create(req, pid);
        Ok(pid as u32)
    }

    fn send_create(&self, req: &CreateTaskRequest, pid: i32) {
        self.inner.events.send(
            TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
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
            },
        );
    }

    /// VM mode Create: mount the snapshot, boot the VM with it shared, create the container
    /// in the guest. Everything made here is undone on failure.
    async fn create_vm_container(
        &self,
        req: &CreateTaskRequest,
        config: Config,
        spec: Spec,
    ) -> Result<u32> {
        let bundle = PathBuf::from(&req.bundle);
        NsPlan::from_spec(&spec)?;
        vm::check_host_namespaces(&req.id, &spec, config.vm.allow_host_namespaces)?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_default();
        let rootfs = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        // A CRI pod's containers run in the VM its sandbox container booted.
        let ann = spec.annotations().clone().unwrap_or_default();
        let (existing, podns) = match pod_sandbox_id(&spec, &req.id) {
            Some(sb) => {
                let pod = self
                    .containers()
                    .get(sb)
                    .and_then(|c| c.vm.clone())
                    .ok_or_else(|| {
                        ShimError::FailedPrecondition(format!(
                            "container {}: its pod sandbox {sb} has no VM in this shim",
                            req.id
                        ))
                    })?;
                let known_pids = self
                    .containers()
                    .values()
                    .filter(|c| c.vm.as_ref().is_some_and(|v| Arc::ptr_eq(v, &pod)))
                    .map(|c| c.init.pid())
                    .filter(|p| *p > 0)
                    .collect();
                let owner = pod.owner_pid.load(std::sync::atomic::Ordering::SeqCst);
                let ns = vm::PodNs {
                    sandbox_pid: (owner > 0).then_some(owner),
                    known_pids,
                };
                (Some(pod), ns)
            }
            None => (None, vm::PodNs::default()),
        };
        let (guest_spec, binds) = vm::guest_spec(&req.id, &spec, &podns)?;
        // A new VM runs in the booting container's cgroup: it is charged to the pod.
        let vm_cg = match existing {
            None => Some(vm::vm_cgroup(&spec, &req.id)?),
            Some(_) => None,
        };
        let layers: Vec<(String, String, Vec<String>)> = req
            .rootfs
            .iter()
            .map(|m| (m.type_.clone(), m.source.clone(), m.options.clone()))
            .collect();
        let r2 = rootfs.clone();
        let mounted = blocking(move || {
            let mut mounted = false;
            for (typ, src, opts) in &layers {
                if let Err(e) = mounts::mount_rootfs_layer(typ, src, opts, &r2) {
                    if mounted {
                        let _ = mounts::unmount_all(&r2);
                    }
                    return Err(e.into());
                }
                mounted = true;
            }
            Ok(mounted)
        })
        .await;
        let mounted = match mounted {
            Ok(m) => m,
            Err(e) => {
                vm::destroy_cgroup(vm_cg).await;
                return Err(e);
            }
        };
        let unmount = |rootfs: PathBuf| async move {
            if mounted {
                let _ = blocking(move || Ok(mounts::unmount_all(&rootfs)?)).await;
            }
        };
        let booted = existing.is_none();
        let pod = match existing {
            Some(p) => p,
            None => match VmPod::boot(
                &config,
                &self.inner.namespace,
                &req.id,
                &bundle,
                &ann,
                pod_netns(&spec),
                vm_cg.clone(),
            )
            .await
            {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    vm::destroy_cgroup(vm_cg).await;
                    unmount(rootfs).await;
                    return Err(e);
                }
            },
        };
        let undo = |rootfs: PathBuf| {
            let pod = pod.clone();
            let id = req.id.clone();
            async move {
                let shared = pod.shared.clone();
                let _ = blocking(move || {
                    vm::unshare_container(&shared, &id);
                    Ok(())
                })
                .await;
                if booted {
                    pod.teardown().await;
                }
                unmount(rootfs).await;
            }
        };
        let (shared, id2, r2) = (pod.shared.clone(), req.id.clone(), rootfs.clone());
        if let Err(e) = blocking(move || vm::share_container(&shared, &id2, &r2, &binds)).await {
            undo(rootfs).await;
            return Err(e);
        }
        let io = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = async {
            let (streams, pio, stdin_close) =
                pod.wire_stdio(&io, &self.inner.namespace, &req.id).await?;
            let creq = protocols::agent::CreateContainerRequest {
                container_id: req.id.clone(),
                oci_spec: guest_spec,
                stdio: MessageField::some(streams),
                ..Default::default()
            };
            let pid = pod
                .agent
                .create_container(pod.ctx(), &creq)
                .await
                .map_err(vm::rpc)?
                .pid as i32;
            let (spec2, id2, bundle2) = (spec.clone(), req.id.clone(), bundle.clone());
            if let Err(e) = blocking(move || vm_runtime_hooks(&spec2, &id2, &bundle2, pid)).await {
                let rm = protocols::agent::ContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                };
                let _ = pod.agent.remove_container(pod.ctx(), &rm).await;
                return Err(e);
            }
            Ok::<_, ShimError>((pid, pio, stdin_close))
        };
        let (pid, mut pio, stdin_close) = match created.await {
            Ok(v) => v,
            Err(e) => {
                undo(rootfs).await;
                return Err(e);
            }
        };
        if booted {
            pod.owner_pid
                .store(pid, std::sync::atomic::Ordering::SeqCst);
        }
        pio.start_input(&pod.plane);
        let init = Proc::new("", io, None);
        {
            let mut st = init.lock();
            st.pid = pid;
            st.stdin_close = stdin_close;
            st.vm_io = Some(pio);
        }
        let c = Arc::new(Container {
            id: req.id.clone(),
            bundle,
            rootfs,
            rootfs_mounted: mounted,
            namespaces: Vec::new(),
            own_pidns: true,
            spec,
            cgroup: None,
            init: init.clone(),
            execs: Mutex::new(HashMap::new()),
            oom_seen: None,
            vm: Some(pod.clone()),
            vm_paused: Default::default(),
        });
        self.containers().insert(req.id.clone(), c.clone());
        self.vm_watch_exit(c, init);
        if !booted {
            self.send_create(req, pid);
            return Ok(pid as u32);
        }
        // OOM kills in the guest (any of the pod's containers), as they happen.
        let events = self.inner.events.clone();
        tokio::spawn(async move {
            while let Ok(ev) = pod
                .agent
                .get_oom_event(
                    runtime::vm::agent::ctx(Duration::from_secs(365 * 24 * 3600)),
                    &protocols::agent::Empty::new(),
                )
                .await
            {
                events.send(
                    TASK_OOM_EVENT_TOPIC,
                    TaskOOM {
                        container_id: ev.container_id,
                        ..Default::default()
                    },
                );
            }
        });
        self.send_create(req, pid);
        Ok(pid as u32)
    }

    /// Reports a guest process's exit (TaskOOM first when the agent claimed one with it).
    fn vm_watch_exit(&self, c: Arc<Container>, p: Arc<Proc>) {
        let me = self.clone();
        tokio::spawn(async move {
            let Some(pod) = c.vm.clone() else { return };
            let outs = p
                .lock()
                .vm_io
                .as_mut()
                .map(|io| std::mem::take(&mut io.outs))
                .unwrap_or_default();
            let (code, oom) = vm::wait_exit(&pod, &c.id, &p.exec_id, outs).await;
            if oom {
                me.inner.events.send(
                    TASK_OOM_EVENT_TOPIC,
                    TaskOOM {
                        container_id: c.id.clone(),
                        ..Default::default()
                    },
                );
            }
            me.finish(&c, &p, code);
        });
    }

    /// VM mode Start of the init or of an exec.
    async fn vm_start_process(
        &self,
        c: Arc<Container>,
        p: Arc<Proc>,
        pod: Arc<VmPod>,
    ) -> Result<u32> {
        if p.exec_id.is_empty() {
            if p.status() != Status::Created {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is not in created state",
                    c.id
                )));
            }
            let req = protocols::agent::ProcessRequest {
                container_id: c.id.clone(),
                ..Default::default()
            };
            let pid = pod
                .agent
                .start_process(pod.ctx(), &req)
                .await
                .map_err(vm::rpc)?
                .pid;
            {
                let mut st = p.lock();
                if st.status == Status::Created {
                    st.status = Status::Running;
                }
            }
            let c2 = c.clone();
            blocking(move || {
                run_hooks_warn(&c2, "poststart", pid as i32, "running");
                Ok(())
            })
            .await?;
            self.inner.events.send(
                TASK_START_EVENT_TOPIC,
                TaskStart {
                    container_id: c.id.clone(),
                    pid,
                    ..Default::default()
                },
            );
            return Ok(pid);
        }
        if p.status() != Status::Created || p.pid() != 0 {
            return Err(ShimError::FailedPrecondition(format!(
                "exec {} already started",
                p.exec_id
            )));
        }
        if c.init.status() != Status::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        let process = serde_json::to_vec(&p.spec.clone().unwrap_or_default())
            .map_err(|e| ShimError::Internal(format!("exec spec: {e}")))?;
        let (streams, mut pio, stdin_close) =
            pod.wire_stdio(&p.io, &self.inner.namespace, &c.id).await?;
        let req = protocols::agent::ExecProcessRequest {
            container_id: c.id.clone(),
            exec_id: p.exec_id.clone(),
            process,
            stdio: MessageField::some(streams),
            ..Default::default()
        };
        let pid = match pod.agent.exec_process(pod.ctx(), &req).await {
            Ok(r) => r.pid,
            Err(e) => {
                for h in pio.outs {
                    h.abort();
                }
                if let Some(t) = pio.stdin_task {
                    t.abort();
                }
                return Err(vm::rpc(e));
            }
        };
        pio.start_input(&pod.plane);
        {
            let mut st = p.lock();
            st.pid = pid as i32;
            st.stdin_close = stdin_close;
            st.vm_io = Some(pio);
            if st.status == Status::Created {
                st.status = Status::Running;
            }
        }
        self.vm_watch_exit(c.clone(), p.clone());
        self.inner.events.send(
            TASK_EXEC_STARTED_EVENT_TOPIC,
            TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: p.exec_id.clone(),
                pid,
                ..Default::default()
            },
        );
        Ok(pid)
    }

    /// VM mode Delete of the init: remove it in the guest, stop the VM, unmount the rootfs.
    async fn vm_delete_init(
        &self,
        c: Arc<Container>,
        p: Arc<Proc>,
        pod: Arc<VmPod>,
    ) -> Result<DeleteResponse> {
        match p.status() {
            Status::Running => {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is running: kill it first",
                    c.id
                )))
            }
            Status::Created => {
                let sig = protocols::agent::SignalRequest {
                    container_id: c.id.clone(),
                    signal: libc::SIGKILL as u32,
                    ..Default::default()
                };
                let _ = pod.agent.signal_process(pod.ctx(), &sig).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), p.wait()).await;
                p.set_exited(128 + libc::SIGKILL);
            }
            Status::Stopped => {}
        }
        if pod.alive() {
            let req = protocols::agent::ContainerRequest {
                container_id: c.id.clone(),
                ..Default::default()
            };
            if let Err(e) = pod.agent.remove_container(pod.ctx(), &req).await {
                log::warn!("container {}: remove in the guest: {e}", c.id);
            }
        }
        if c.id == pod.owner {
            // The pod's sandbox (or a plain container) takes the VM with it.
            pod.teardown().await;
        } else {
            let (shared, id) = (pod.shared.clone(), c.id.clone());
            blocking(move || {
                vm::unshare_container(&shared, &id);
                Ok(())
            })
            .await?;
        }
        let c2 = c.clone();
        blocking(move || {
            run_hooks_warn(&c2, "poststop", c2.init.pid(), "stopped");
            if c2.rootfs_mounted {
                mounts::unmount_all(&c2.rootfs)?;
            }
            Ok(())
        })
        .await?;
        Ok(self.forget(&c, &p))
    }

    fn watch_oom(&self, id: &str, cg: &Cgroup) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        let mut w = match cg.oom_watcher() {
            Ok(w) => w,
            Err(e) => {
                log::warn!("no OOM events for {id}: {e}");
                return None;
            }
        };
        let seen = w.counter();
        let events = self.inner.events.clone();
        let id = id.to_string();
        let _ = std::thread::Builder::new()
            .name("oom".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                while w.wait() {
                    events.send(
                        TASK_OOM_EVENT_TOPIC,
                        TaskOOM {
                            container_id: id.clone(),
                            ..Default::default()
                        },
                    );
                }
            });
        Some(seen)
    }

    async fn start_process(&self, c: Arc<Container>, p: Arc<Proc>) -> Result<u32> {
        if let Some(pod) = c.vm.clone() {
            return self.vm_start_process(c, p, pod).await;
        }
        if p.exec_id.is_empty() {
            let sync = {
                let mut st = p.lock();
                if st.status != Status::Created {
                    return Err(ShimError::FailedPrecondition(format!(
                        "container {} is not in created state",
                        c.id
                    )));
                }
                st.sync.take()
            };
            let sync = sync
                .ok_or_else(|| ShimError::FailedPrecondition("container already started".into()))?;
            blocking(move || spawn::release(&sync).map_err(ShimError::from)).await?;
            let c2 = c.clone();
            let pid0 = p.pid();
            blocking(move || {
                run_hooks_warn(&c2, "poststart", pid0, "running");
                Ok(())
            })
            .await?;
            let pid = {
                let mut st = p.lock();
                if st.status == Status::Created {
                    st.status = Status::Running;
                }
                st.pid
            };
            self.inner.events.send(
                TASK_START_EVENT_TOPIC,
                TaskStart {
                    container_id: c.id.clone(),
                    pid: pid as u32,
                    ..Default::default()
                },
            );
            return Ok(pid as u32);
        }
        if p.status() != Status::Created || p.pid() != 0 {
            return Err(ShimError::FailedPrecondition(format!(
                "exec {} already started",
                p.exec_id
            )));
        }
        if c.init.status() != Status::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        let spec = p.spec.clone().unwrap_or_default();
        let req = SpawnRequest {
            kind: SpawnKind::Exec {
                init_pid: c.init.pid(),
                namespaces: c.namespaces.clone(),
            },
            process: spec,
            terminal: p.io.terminal,
            seccomp: c.spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
        };
        let me = self.clone();
        let io = p.io.clone();
        let id = c.id.clone();
        let exec_id = p.exec_id.clone();
        let cg = c.cgroup.clone();
        let (pid, master, keeper) = blocking(move || {
            let (pid, sync, master, keeper) =
                me.spawn_blocking_setup(req, &io, &id, &exec_id, cg.as_ref(), None, None)?;
            if let Err(e) = spawn::release(&sync).map_err(ShimError::from) {
                me.unregister(pid);
                // SAFETY: kill(2) has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return Err(e);
            }
            Ok((pid, master, keeper))
        })
        .await?;
        {
            let mut st = p.lock();
            st.pid = pid;
            if let Some(w) = keeper {
                st.stdin_close = Some(stdio::copy_stdin(p.io.stdin.clone(), w));
            }
            if let Some(m) = master {
                st.tty = Some(stdio::start_tty(m, &p.io)?);
            }
            if st.status == Status::Created {
                st.status = Status::Running;
            }
        }
        self.inner.events.send(
            TASK_EXEC_STARTED_EVENT_TOPIC,
            TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: p.exec_id.clone(),
                pid: pid as u32,
                ..Default::default()
            },
        );
        Ok(pid as u32)
    }

    /// The last step of deleting a container (either mode): drop it and tell containerd.
    fn forget(&self, c: &Container, init: &Proc) -> DeleteResponse {
        self.containers().remove(&c.id);
        let r = delete_response(init);
        self.inner.events.send(
            TASK_DELETE_EVENT_TOPIC,
            TaskDelete {
                container_id: c.id.clone(),
                pid: r.pid,
                exit_status: r.exit_status,
                exited_at: r.exited_at.clone(),
                id: c.id.clone(),
                ..Default::default()
            },
        );
        r
    }

    async fn delete_process(&self, c: Arc<Container>, p: Arc<Proc>) -> Result<DeleteResponse> {
        if let (Some(pod), true) = (c.vm.clone(), p.exec_id.is_empty()) {
            return self.vm_delete_init(c, p, pod).await;
        }
        if !p.exec_id.is_empty() {
            if p.status() == Status::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "exec {} is still running",
                    p.exec_id
                )));
            }
            wait_tty(&p).await;
            c.execs().remove(&p.exec_id);
            return Ok(delete_response(&p));
        }
        match p.status() {
            Status::Running => {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is running: kill it first",
                    c.id
                )))
            }
            Status::Created => {
                let pid = p.pid();
                if pid > 0 {
                    // SAFETY: kill(2) has no memory effects.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    let _ = tokio::time::timeout(Duration::from_secs(5), p.wait()).await;
                }
                if p.status() != Status::Stopped {
                    self.unregister(pid);
                    p.set_exited(128 + libc::SIGKILL);
                }
            }
            Status::Stopped => {}
        }
        wait_tty(&p).await;
        let c2 = c.clone();
        blocking(move || {
            if let Some(cg) = &c2.cgroup {
                cg.destroy()?;
            }
            run_hooks_warn(&c2, "poststop", c2.init.pid(), "stopped");
            if c2.rootfs_mounted {
                mounts::unmount_all(&c2.rootfs)?;
            }
            let _ = std::fs::remove_file(c2.bundle.join("init.pid"));
            Ok(())
        })
        .await?;
        Ok(self.forget(&c, &p))
    }
}

/// AppArmor and SELinux settings are accepted; on a host without the LSM they cannot apply,
/// which deserves a warning rather than a refusal (kubelet sets them by default).
fn lsm_warnings(id: &str, spec: &Spec) {
    let apparmor = spec
        .process()
        .as_ref()
        .and_then(|p| p.apparmor_profile().clone())
        .filter(|p| !p.is_empty() && p != "unconfined");
    if let Some(p) = apparmor {
        if !Path::new("/sys/kernel/security/apparmor").exists() {
            log::warn!("container {id}: apparmorProfile {p:?} ignored: AppArmor is not enabled on this host");
        } else {
            log::warn!(
                "container {id}: apparmorProfile {p:?} is not applied by this Janus version"
            );
        }
    }
    let selinux = spec
        .process()
        .as_ref()
        .and_then(|p| p.selinux_label().clone())
        .filter(|l| !l.is_empty());
    if let Some(l) = selinux {
        if !Path::new("/sys/fs/selinux/enforce").exists() {
            log::warn!(
                "container {id}: selinuxLabel {l:?} ignored: SELinux is not enabled on this host"
            );
        } else {
            log::warn!("container {id}: selinuxLabel {l:?} is not applied by this Janus version");
        }
    }
}

async fn wait_tty(p: &Proc) {
    let done = p.lock().tty.as_ref().map(|t| t.done.clone());
    if let Some(d) = done {
        stdio::wait_done(d, Duration::from_secs(5)).await;
    }
}

type TResult<T> = ttrpc::Result<T>;

#[async_trait]
impl Task for Service {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TResult<StateResponse> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let st = p.lock();
        let status = match st.status {
            Status::Created => api::Status::CREATED,
            Status::Running if c.paused() => api::Status::PAUSED,
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
            exited_at: MessageField::from_option(st.exited_at.clone()),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TResult<CreateTaskResponse> {
        let pid = self.create_container(&req).await.map_err(|e| {
            log::warn!("create {}: {e}", req.id);
            e
        })?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TResult<StartResponse> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let pid = self.start_process(c, p).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TResult<DeleteResponse> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        Ok(self.delete_process(c, p).await?)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TResult<PidsResponse> {
        let c = self.get(&req.id)?;
        let (pids, execs): (Vec<i32>, HashMap<i32, String>) = if let Some(pod) = &c.vm {
            // The guest's processes, as the agent sees them in the container's cgroup.
            let r = pod
                .agent
                .pids(pod.ctx(), &vm::creq(&c.id))
                .await
                .map_err(vm::rpc)?;
            let execs = r
                .processes
                .iter()
                .filter(|p| !p.exec_id.is_empty())
                .map(|p| (p.pid as i32, p.exec_id.clone()))
                .collect();
            (r.processes.iter().map(|p| p.pid as i32).collect(), execs)
        } else {
            let pids = match &c.cgroup {
                Some(cg) => cg.procs().unwrap_or_default(),
                None => vec![c.init.pid()],
            };
            let execs = c
                .execs()
                .values()
                .map(|p| (p.pid(), p.exec_id.clone()))
                .collect();
            (pids, execs)
        };
        let processes = pids
            .into_iter()
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
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        if c.init.status() != Status::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            ))
            .into());
        }
        if let Some(pod) = &c.vm {
            pod.agent
                .pause(pod.ctx(), &vm::creq(&c.id))
                .await
                .map_err(vm::rpc)?;
            c.vm_paused.store(true, std::sync::atomic::Ordering::SeqCst);
        } else {
            let cg = c
                .cgroup
                .clone()
                .ok_or_else(|| ShimError::FailedPrecondition("no cgroup".into()))?;
            blocking(move || Ok(cg.freeze()?)).await?;
        }
        self.inner.events.send(
            TASK_PAUSED_EVENT_TOPIC,
            TaskPaused {
                container_id: c.id.clone(),
                ..Default::default()
            },
        );
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        if !c.paused() {
            return Err(
                ShimError::FailedPrecondition(format!("container {} is not paused", c.id)).into(),
            );
        }
        if let Some(pod) = &c.vm {
            pod.agent
                .resume(pod.ctx(), &vm::creq(&c.id))
                .await
                .map_err(vm::rpc)?;
            c.vm_paused
                .store(false, std::sync::atomic::Ordering::SeqCst);
        } else {
            let cg = c
                .cgroup
                .clone()
                .ok_or_else(|| ShimError::FailedPrecondition("no cgroup".into()))?;
            blocking(move || Ok(cg.thaw()?)).await?;
        }
        self.inner.events.send(
            TASK_RESUMED_EVENT_TOPIC,
            TaskResumed {
                container_id: c.id.clone(),
                ..Default::default()
            },
        );
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
        if let Some(pod) = &c.vm {
            if p.status() == Status::Stopped {
                return Err(ShimError::NotFound("process already finished".into()).into());
            }
            if p.status() == Status::Created && !p.exec_id.is_empty() {
                return Err(ShimError::FailedPrecondition(format!(
                    "exec {} is not started",
                    p.exec_id
                ))
                .into());
            }
            let sreq = protocols::agent::SignalRequest {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                signal: req.signal,
                all: req.all,
                ..Default::default()
            };
            pod.agent
                .signal_process(pod.ctx(), &sreq)
                .await
                .map_err(vm::rpc)?;
            return Ok(Empty::new());
        }
        if req.all && req.exec_id.is_empty() {
            if let Some(cg) = c.cgroup.clone() {
                let sig = req.signal as i32;
                blocking(move || Ok(cg.kill_all(sig)?)).await?;
                return Ok(Empty::new());
            }
        }
        let (status, pid) = {
            let st = p.lock();
            (st.status, st.pid)
        };
        match status {
            Status::Stopped => {
                return Err(ShimError::NotFound("process already finished".into()).into())
            }
            Status::Created if pid == 0 => {
                return Err(ShimError::FailedPrecondition(format!(
                    "exec {} is not started",
                    p.exec_id
                ))
                .into())
            }
            _ => {}
        }
        signal_pid(pid, req.signal)?;
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
        if c.init.status() != Status::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            ))
            .into());
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let process: OciProcess = serde_json::from_slice(&spec)
            .map_err(|e| ShimError::InvalidArgument(format!("exec process spec: {e}")))?;
        rtspec::validate_process(&process, "exec process").map_err(ShimError::from)?;
        let io = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.execs().insert(
            req.exec_id.clone(),
            Proc::new(&req.exec_id, io, Some(process)),
        );
        self.inner.events.send(
            TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskExecAdded {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        );
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if let Some(pod) = &c.vm {
            let r = protocols::agent::ResizeRequest {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                width: req.width,
                height: req.height,
                ..Default::default()
            };
            pod.agent.resize_pty(pod.ctx(), &r).await.map_err(vm::rpc)?;
            return Ok(Empty::new());
        }
        let st = p.lock();
        let tty = st
            .tty
            .as_ref()
            .ok_or_else(|| ShimError::FailedPrecondition("process has no terminal".into()))?;
        runtime::linux::sync::resize_pty(&tty.master, req.width, req.height)
            .map_err(ShimError::from)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TResult<Empty> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if !req.stdin {
            return Ok(Empty::new());
        }
        let vm_tty_copy = {
            let mut st = p.lock();
            st.stdin_close = None;
            if let Some(t) = st.tty.as_mut().and_then(|t| t.stdin_task.take()) {
                t.abort();
            }
            // A VM terminal's stdin copy is ours: stop it and end the guest side too.
            if p.io.terminal {
                st.vm_io.as_mut().and_then(|io| io.stdin_task.take())
            } else {
                None
            }
        };
        if let (Some(t), Some(pod)) = (vm_tty_copy, &c.vm) {
            t.abort();
            let r = protocols::agent::ProcessRequest {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            };
            pod.agent
                .close_stdin(pod.ctx(), &r)
                .await
                .map_err(vm::rpc)?;
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
        if let Some(pod) = &c.vm {
            let u = protocols::agent::UpdateRequest {
                container_id: c.id.clone(),
                linux_resources: raw,
                ..Default::default()
            };
            drop(res);
            pod.agent.update(pod.ctx(), &u).await.map_err(vm::rpc)?;
            return Ok(Empty::new());
        }
        let cg = c
            .cgroup
            .clone()
            .ok_or_else(|| ShimError::FailedPrecondition("no cgroup".into()))?;
        blocking(move || Ok(cg.apply(&res, true)?)).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TResult<WaitResponse> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        p.wait().await;
        let st = p.lock();
        Ok(WaitResponse {
            exit_status: st.exit_status,
            exited_at: MessageField::from_option(st.exited_at.clone()),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TResult<StatsResponse> {
        let c = self.get(&req.id)?;
        if let Some(pod) = &c.vm {
            let r = pod
                .agent
                .stats(pod.ctx(), &vm::creq(&c.id))
                .await
                .map_err(vm::rpc)?;
            let s = runtime::vm::agent::stats_from_proto(&r.stats.unwrap_or_default());
            // The guest is cgroup v2.
            let any = metrics::to_any(cgroups::Mode::V2, &s)?;
            return Ok(StatsResponse {
                stats: MessageField::some(any),
                ..Default::default()
            });
        }
        let cg = c
            .cgroup
            .clone()
            .ok_or_else(|| ShimError::FailedPrecondition("no cgroup".into()))?;
        let any = blocking(move || {
            let s = cg.stats()?;
            metrics::to_any(cg.mode(), &s)
        })
        .await?;
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

/// Cleanup for `containerd-shim-janus-v2 delete`, run in the bundle directory after the
/// shim is gone: kill what is left, remove the cgroup, unmount the rootfs. Idempotent.
pub fn cleanup_bundle(bundle: &Path, id: &str) -> (u32, u32) {
    vm::cleanup_leftovers(bundle);
    let pid: i32 = std::fs::read_to_string(bundle.join("init.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if pid > 0 {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Ok(spec) = rtspec::load(bundle) {
        // Namespace mode's container cgroup, or VM mode's (the VMM's) cgroup.
        if let Ok(rel) = cgroups::spec_path(&spec, id) {
            if let Ok(cg) = Cgroup::new(&rel) {
                if cg.exists() {
                    let _ = cg.destroy();
                }
            }
        }
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_default();
        let rootfs = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        let _ = mounts::unmount_all(&rootfs);
    } else {
        let _ = mounts::unmount_all(&bundle.join("rootfs"));
    }
    let _ = std::fs::remove_file(bundle.join("init.pid"));
    (pid.max(0) as u32, 128 + libc::SIGKILL as u32)
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send + Sync>() {}
    is_send::<Service>();
    let _ = now;
}
