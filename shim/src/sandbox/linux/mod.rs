//! Namespace mode: containers as namespaces and cgroups on the host, set up by the zygote
//! (`runtime::linux`), their exits seen by the shim's reaper.

mod container;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::CreateTaskRequest;
use oci_spec::runtime::{LinuxIdMapping, LinuxResources, Spec};
use runtime::linux::cgroups::{self, Cgroup};
use runtime::linux::spawn;
use runtime::linux::spec::NsPlan;
use runtime::linux::sync::Channel;
use runtime::linux::zygote::{SpawnKind, SpawnRequest};
use runtime::linux::{mounts, spec as rtspec};

pub use container::signal_pid;
use container::{ExitScope, LinuxContainer, LinuxProcess};
use runtime::linux::lifecycle::{ExitTable, OomMonitor};

use super::host::{blocking, mount_rootfs, rootfs_path};
use super::{ContainerOps, Isolation, Sandbox};
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::hooks;
use crate::process::Proc;
use crate::stdio::{self, IoPaths, Tty};

/// The init's pid in the bundle, for `shim delete` after a crash.
const INIT_PID: &str = "init.pid";
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The shim's namespace-mode sandbox (one per shim: a pod's containers share it).
pub struct LinuxSandbox {
    /// Itself, for the containers it makes (they spawn execs through it).
    me: Weak<LinuxSandbox>,
    namespace: String,
    events: Events,
    exits: ExitTable<Owner>,
}

/// Who a pid is: its container's exit handling and its process record.
#[derive(Clone)]
struct Owner {
    container: Arc<ExitScope>,
    proc: Arc<Proc>,
}

/// A process set up by the zygote, waiting for Start.
struct Spawned {
    pid: i32,
    sync: Channel,
    master: Option<OwnedFd>,
    /// Write end of the stdin pipe (the shim keeps it until CloseIO).
    stdin: Option<OwnedFd>,
}

impl Spawned {
    fn tty(&mut self, io: &IoPaths) -> Result<Option<Tty>> {
        self.master
            .take()
            .map(|m| stdio::start_tty(m, io))
            .transpose()
    }
}

/// The shim's part of the zygote's setup handshake: the pid table and the create hooks.
struct Setup<'a> {
    exits: &'a ExitTable<Owner>,
    owner: Owner,
    hooks: Option<(&'a Spec, &'a str, &'a Path)>,
}

impl spawn::SetupHooks for Setup<'_> {
    fn register(&mut self, pid: i32) -> Option<i32> {
        self.owner.proc.set_pid(pid);
        self.exits.register(pid, self.owner.clone())
    }

    fn unregister(&mut self, pid: i32) {
        self.exits.unregister(pid);
    }

    fn runtime_hooks(&mut self, pid: i32) -> runtime::linux::Result<()> {
        let Some((spec, id, bundle)) = self.hooks else {
            return Ok(());
        };
        hooks::run_create(spec, id, bundle, pid)
    }
}

impl LinuxSandbox {
    pub fn new(namespace: String, events: Events) -> Arc<LinuxSandbox> {
        Arc::new_cyclic(|me| LinuxSandbox {
            me: me.clone(),
            namespace,
            events,
            exits: ExitTable::default(),
        })
    }

    fn self_arc(&self) -> Result<Arc<LinuxSandbox>> {
        self.me
            .upgrade()
            .ok_or_else(|| ShimError::Internal("namespace sandbox is gone".into()))
    }

    /// Create's blocking part: rootfs, cgroup, the init set up by the zygote, its pid
    /// recorded in the bundle. Undone on failure.
    #[allow(clippy::too_many_arguments)] // the parts of one Create, moved to a blocking thread
    fn setup_init(
        &self,
        req: &CreateTaskRequest,
        spec: &Spec,
        rootfs: &Path,
        bundle: &Path,
        cg: Cgroup,
        init: &Arc<Proc>,
        plan: &NsPlan,
    ) -> Result<(Spawned, Arc<ExitScope>, bool)> {
        let mounted = mount_rootfs(req, rootfs)?;
        let undo = |cg: Option<&Cgroup>| {
            if let Some(cg) = cg {
                if let Err(e) = cg.destroy() {
                    log::warn!("container {}: remove cgroup: {e}", req.id);
                }
            }
            if mounted {
                let _ = mounts::unmount_all(rootfs);
            }
        };
        let linux = spec.linux().clone().unwrap_or_default();
        let made = (|| -> Result<(Spawned, Arc<ExitScope>)> {
            cg.create()?;
            let scope = Arc::new(ExitScope {
                id: req.id.clone(),
                cgroup: cg.clone(),
                oom: OnceLock::new(),
                own_pidns: plan.new_pid(),
                events: self.events.clone(),
            });
            let sreq = SpawnRequest {
                kind: SpawnKind::Init {
                    id: req.id.clone(),
                    bundle: bundle.to_path_buf(),
                    spec: Box::new(spec.clone()),
                    rootfs: rootfs.to_path_buf(),
                    cgroup_dirs: cg.dirs(),
                },
                process: spec.process().clone().unwrap_or_default(),
                terminal: init.io.terminal,
                seccomp: linux.seccomp().clone(),
            };
            let none = LinuxResources::default();
            let place = spawn::Placement {
                cgroup: Some(&cg),
                // Applied once the init is in the cgroup: a systemd scope starts with it.
                resources: Some(linux.resources().as_ref().unwrap_or(&none)),
                id_maps: plan.new_user().then(|| id_maps(&linux)),
            };
            let hooks = Some((spec, req.id.as_str(), bundle));
            let s = self.spawn_setup(sreq, init, scope.clone(), place, hooks)?;
            // The cgroup exists now (a systemd scope from the spawn on); the init runs no
            // code of the container's before Start.
            if let Some(m) = self.watch_oom(&req.id, &cg) {
                let _ = scope.oom.set(m);
            }
            // `shim delete` kills it by this record after a crash: not having it is an error.
            if let Err(e) = std::fs::write(bundle.join(INIT_PID), s.pid.to_string()) {
                self.exits.unregister(s.pid);
                let _ = signal_pid(s.pid, libc::SIGKILL as u32);
                return Err(ShimError::failed(format!("write {INIT_PID}"), e));
            }
            Ok((s, scope))
        })();
        match made {
            Ok((s, scope)) => Ok((s, scope, mounted)),
            Err(e) => {
                undo(Some(&cg));
                Err(e)
            }
        }
    }

    /// The reaper's report of a child's exit.
    pub async fn on_exit(&self, pid: i32, code: i32) {
        if let Some(o) = self.exits.exited(pid, code) {
            o.container.exited(&o.proc, code).await;
        }
    }

    /// Spawns a process through the zygote up to the point where it waits for Start
    /// (blocking).
    fn spawn_setup(
        &self,
        req: SpawnRequest,
        p: &Arc<Proc>,
        scope: Arc<ExitScope>,
        place: spawn::Placement<'_>,
        hooks: Option<(&Spec, &str, &Path)>,
    ) -> Result<Spawned> {
        let zygote = hooks::zygote()?;
        let prepared = stdio::prepare(&p.io, &self.namespace, &scope.id)?;
        let fds: Vec<_> = prepared.child.iter().map(|f| f.as_raw_fd()).collect();
        let mut steps = Setup {
            exits: &self.exits,
            owner: Owner {
                container: scope,
                proc: p.clone(),
            },
            hooks,
        };
        let s = spawn::spawn(zygote, &req, &fds, place, SETUP_TIMEOUT, &mut steps)?;
        drop(prepared.child);
        Ok(Spawned {
            pid: s.pid,
            sync: s.sync,
            master: s.pty_master,
            stdin: prepared.stdin_pipe,
        })
    }

    /// Watches the cgroup's OOM kills on a thread of its own (TaskOOM as they happen); the
    /// exit handling claims a kill the thread has not reported yet.
    fn watch_oom(&self, id: &str, cg: &Cgroup) -> Option<OomMonitor> {
        let (events, id2) = (self.events.clone(), id.to_string());
        let report = move || {
            events.send_blocking(
                containerd_shim_protos::topics::TASK_OOM_EVENT_TOPIC,
                crate::events::oom_event(&id2),
            );
            true
        };
        OomMonitor::start(cg, report)
            .map_err(|e| log::warn!("no OOM events for {id}: {e}"))
            .ok()
    }
}

/// The uid_map and gid_map contents of a new user namespace.
fn id_maps(linux: &oci_spec::runtime::Linux) -> (String, String) {
    let fmt = |m: &Option<Vec<LinuxIdMapping>>| {
        m.iter()
            .flatten()
            .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
            .collect::<String>()
    };
    (fmt(linux.uid_mappings()), fmt(linux.gid_mappings()))
}

#[async_trait]
impl Sandbox for LinuxSandbox {
    fn isolation(&self) -> Isolation {
        Isolation::Namespaces
    }

    async fn create(
        &self,
        req: &CreateTaskRequest,
        spec: Spec,
        init: Arc<Proc>,
    ) -> Result<Arc<dyn ContainerOps>> {
        let this = self.self_arc()?;
        let bundle = PathBuf::from(&req.bundle);
        let rootfs = rootfs_path(&spec, &bundle);
        let plan = NsPlan::from_spec(&spec)?;
        lsm_warnings(&req.id, &spec);
        let cg = cgroups::spec_cgroup(&spec, &req.id)?;
        let (req2, rootfs2, bundle2, init2, sandbox) = (
            req.clone(),
            rootfs.clone(),
            bundle.clone(),
            init.clone(),
            this.clone(),
        );
        // The spec and the plan go to the blocking thread and come back: no second copy.
        let (spec, plan, (mut spawned, scope, mounted)) = blocking(move || {
            let made = sandbox.setup_init(&req2, &spec, &rootfs2, &bundle2, cg, &init2, &plan)?;
            Ok((spec, plan, made))
        })
        .await?;
        let tty = spawned.tty(&init.io)?;
        let stdin = spawned.stdin.take().map(|w| (init.io.stdin.clone(), w));
        let pid = spawned.pid;
        let process = Arc::new(LinuxProcess::new(
            pid,
            Some(spawned.sync),
            stdin,
            tty,
            Some(scope.cgroup.clone()),
        ));
        init.attach(process.clone())?;
        Ok(Arc::new(LinuxContainer {
            sandbox: this,
            scope,
            init: process,
            bundle,
            rootfs,
            rootfs_mounted: mounted,
            namespaces: plan.types(),
            spec,
        }))
    }
}

/// AppArmor and SELinux settings are accepted; on a host without the LSM they cannot apply,
/// which deserves a warning rather than a refusal (kubelet sets them by default).
fn lsm_warnings(id: &str, spec: &Spec) {
    let process = spec.process().as_ref();
    let apparmor = process
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
    let selinux = process
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

/// `shim delete` after a crash, namespace mode's part: kill the init recorded in the bundle,
/// remove the container's cgroup (VM mode's cgroup is the same path), unmount the rootfs.
pub fn cleanup_bundle(bundle: &Path, id: &str) -> (u32, u32) {
    let pid: i32 = std::fs::read_to_string(bundle.join(INIT_PID))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if pid > 0 {
        let _ = signal_pid(pid, libc::SIGKILL as u32);
    }
    let rootfs = match rtspec::load(bundle) {
        Ok(spec) => {
            if let Ok(cg) = cgroups::spec_cgroup(&spec, id) {
                if cg.exists() {
                    if let Err(e) = cg.destroy() {
                        log::warn!("cgroup {}: {e}", cg.rel());
                    }
                }
            }
            rootfs_path(&spec, bundle)
        }
        Err(_) => bundle.join("rootfs"),
    };
    let _ = mounts::unmount_all(&rootfs);
    let _ = std::fs::remove_file(bundle.join(INIT_PID));
    (pid.max(0) as u32, 128 + libc::SIGKILL as u32)
}
