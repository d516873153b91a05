//! Containers in the guest, created with runtime::linux through the agent's zygote, exactly
//! as namespace mode does on the host (the same setup handshake, `runtime::linux::spawn`).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, LinuxSeccomp};
use runtime::aio::blocking;
use runtime::linux::cgroups::Cgroup;
use runtime::linux::lifecycle::{ExitTable, OomMonitor, ProcessStatus as Status};
use runtime::linux::spawn::{self, Placement, SetupHooks, Spawned};
use runtime::linux::zygote::{SpawnKind, SpawnRequest, Zygote};
use tokio::sync::mpsc;

use crate::error::{AgentError, Result};
use crate::process::GProc;
use crate::requests::{self, CreatePlan, ExecPlan};
use crate::stdio::{Mux, Wiring};
use crate::storage::{mount_storages, unmount_all};

pub static ZYGOTE: OnceLock<Zygote> = OnceLock::new();

const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// OOM events queued for GetOOMEvent. Bounded: while the host does not ask, the watcher
/// threads wait (their kills stay counted and are reported once it does) instead of
/// piling events up in guest memory.
const OOM_EVENTS: usize = 64;

pub struct Ctr {
    pub id: String,
    pub cgroup: Cgroup,
    mounts: Vec<PathBuf>,
    pub init: Arc<GProc>,
    execs: Mutex<HashMap<String, Arc<GProc>>>,
    namespaces: Vec<LinuxNamespaceType>,
    seccomp: Option<LinuxSeccomp>,
}

impl Ctr {
    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<GProc>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn process(&self, exec_id: &str) -> Result<Arc<GProc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("exec {exec_id} not found in {}", self.id)))
    }
}

pub struct Containers {
    map: Mutex<HashMap<String, Arc<Ctr>>>,
    /// Reaped pids -> their process records.
    exits: ExitTable<Arc<GProc>>,
    oom_tx: mpsc::Sender<String>,
    pub oom_rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
}

impl Default for Containers {
    fn default() -> Self {
        let (oom_tx, oom_rx) = mpsc::channel(OOM_EVENTS);
        Containers {
            map: Mutex::default(),
            exits: ExitTable::default(),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
        }
    }
}

/// The agent's part of the setup handshake: pid bookkeeping for the reaper.
struct AgentSetup<'a> {
    containers: &'a Containers,
    proc: &'a Arc<GProc>,
}

impl SetupHooks for AgentSetup<'_> {
    fn register(&mut self, pid: i32) -> Option<i32> {
        // The pid goes in first: the exit may be reaped the moment the table has it.
        self.proc.st().pid = pid;
        self.containers.exits.register(pid, self.proc.clone())
    }

    fn unregister(&mut self, pid: i32) {
        self.containers.exits.unregister(pid);
    }
}

impl Containers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Ctr>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Arc<Ctr>> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("container {id} not found")))
    }

    pub fn ids(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    /// Reaper callback.
    pub fn on_exit(&self, pid: i32, code: i32) {
        if let Some(p) = self.exits.exited(pid, code) {
            p.set_exited(code);
        }
    }

    /// Zygote spawn up to Ready, then the process's stdio is wired to the mux.
    fn spawn(
        &self,
        mux: &Mux,
        sreq: &SpawnRequest,
        stdio: &protocols::agent::StdioStreams,
        proc: &Arc<GProc>,
        cg: Option<&Cgroup>,
    ) -> Result<(Spawned, Wiring)> {
        let z = ZYGOTE
            .get()
            .ok_or_else(|| AgentError::Internal("zygote not running".into()))?;
        let prepared = mux.prepare(stdio)?;
        let raw: Vec<_> = prepared.child.iter().map(|f| f.as_raw_fd()).collect();
        let mut steps = AgentSetup {
            containers: self,
            proc,
        };
        // Resources are applied before the spawn here (no systemd in the guest).
        let place = Placement {
            cgroup: cg,
            ..Placement::default()
        };
        let spawned = spawn::spawn(z, sreq, &raw, place, SETUP_TIMEOUT, &mut steps)?;
        let wiring = prepared.wiring(spawned.pty_master.as_ref())?;
        Ok((spawned, wiring))
    }

    pub async fn create(
        self: &Arc<Self>,
        mux: &Mux,
        req: protocols::agent::CreateContainerRequest,
    ) -> Result<u32> {
        let CreatePlan {
            id,
            spec,
            stdio,
            terminal,
            root,
            linux,
            cgroup: rel,
            namespaces: plan,
        } = requests::create_plan(&req)?;
        if self.map().contains_key(&id) {
            return Err(AgentError::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        let mounted = mount_storages(&id, &req.storages)?;
        let me = self.clone();
        let mux2 = mux.clone();
        let id2 = id.clone();
        let res = blocking(move || {
            let cg = Cgroup::new(&rel)?;
            cg.create()?;
            let undo = |e: AgentError| {
                let _ = cg.destroy();
                e
            };
            if let Some(r) = linux.resources() {
                cg.apply(r, false).map_err(|e| undo(e.into()))?;
            }
            let tx = me.oom_tx.clone();
            let oom_id = id2.clone();
            let oom = OomMonitor::start(&cg, move || {
                crate::log_line(&format!("container {oom_id}: OOM kill"));
                tx.blocking_send(oom_id.clone()).is_ok()
            })
            .ok();
            let gp = GProc::new("", stdio.stdin, oom);
            let process = spec.process().clone().unwrap_or_default();
            let sreq = SpawnRequest {
                kind: SpawnKind::Init {
                    id: id2.clone(),
                    bundle: PathBuf::from("/run/janus"),
                    rootfs: root.clone(),
                    cgroup_dirs: cg.dirs(),
                    spec: Box::new(spec.clone()),
                },
                process,
                terminal,
                seccomp: linux.seccomp().clone(),
            };
            let (spawned, wiring) = me
                .spawn(&mux2, &sreq, &stdio, &gp, Some(&cg))
                .map_err(undo)?;
            let ctr = Ctr {
                id: id2,
                cgroup: cg,
                mounts: Vec::new(),
                init: gp,
                execs: Mutex::default(),
                namespaces: plan.types(),
                seccomp: linux.seccomp().clone(),
            };
            Ok((ctr, spawned, wiring))
        })
        .await;
        let (mut ctr, spawned, wiring) = match res {
            Ok(v) => v,
            Err(e) => {
                unmount_all(&mounted);
                return Err(e);
            }
        };
        ctr.mounts = mounted;
        {
            let mut s = ctr.init.st();
            s.sync = Some(spawned.sync);
            s.pty = spawned.pty_master.map(Arc::new);
        }
        crate::log_line(&format!("container {id}: created, pid {}", spawned.pid));
        mux.start(wiring);
        self.map().insert(id, Arc::new(ctr));
        Ok(spawned.pid as u32)
    }

    pub async fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        let sync = {
            let mut s = c.init.st();
            if s.status != Status::Created {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {id} is not in created state"
                )));
            }
            s.sync.take()
        }
        .ok_or_else(|| AgentError::FailedPrecondition(format!("container {id} already started")))?;
        blocking(move || spawn::release(&sync).map_err(AgentError::from)).await?;
        let mut s = c.init.st();
        s.started();
        Ok(s.pid as u32)
    }

    pub async fn exec(
        self: &Arc<Self>,
        mux: &Mux,
        req: protocols::agent::ExecProcessRequest,
    ) -> Result<u32> {
        let c = self.get(&req.container_id)?;
        let ExecPlan {
            process,
            stdio,
            terminal,
        } = requests::exec_plan(&req)?;
        if c.init.status() != Status::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        let gp = {
            let mut execs = c.execs();
            // A finished exec's id may be reused (the host forgets it at its Delete).
            if execs
                .get(&req.exec_id)
                .is_some_and(|p| p.status() != Status::Stopped)
            {
                return Err(AgentError::AlreadyExists(format!(
                    "exec {} already exists",
                    req.exec_id
                )));
            }
            let gp = GProc::new(&req.exec_id, stdio.stdin, None);
            execs.insert(req.exec_id.clone(), gp.clone());
            gp
        };
        let sreq = SpawnRequest {
            kind: SpawnKind::Exec {
                init_pid: c.init.pid(),
                namespaces: c.namespaces.clone(),
            },
            process,
            terminal,
            seccomp: c.seccomp.clone(),
        };
        let me = self.clone();
        let mux2 = mux.clone();
        let (c2, gp2) = (c.clone(), gp.clone());
        let res = blocking(move || {
            let (spawned, wiring) = me.spawn(&mux2, &sreq, &stdio, &gp2, Some(&c2.cgroup))?;
            if let Err(e) = spawn::release(&spawned.sync) {
                me.exits.unregister(spawned.pid);
                let _ = kill(Pid::from_raw(spawned.pid), Signal::SIGKILL);
                return Err(e.into());
            }
            Ok((spawned, wiring))
        })
        .await;
        let (spawned, wiring) = match res {
            Ok(v) => v,
            Err(e) => {
                c.execs().remove(&req.exec_id);
                return Err(e);
            }
        };
        {
            let mut s = gp.st();
            s.pty = spawned.pty_master.map(Arc::new);
            s.started();
        }
        mux.start(wiring);
        Ok(spawned.pid as u32)
    }

    pub fn signal(&self, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
        requests::check_signal(sig)?;
        let c = self.get(id)?;
        if all && exec_id.is_empty() {
            c.cgroup.kill_all(sig as i32)?;
            return Ok(());
        }
        c.process(exec_id)?.signal(sig)
    }

    pub fn resize(&self, id: &str, exec_id: &str, w: u32, h: u32) -> Result<()> {
        let p = self.get(id)?.process(exec_id)?;
        let pty = p.st().pty.clone().ok_or_else(|| {
            AgentError::FailedPrecondition(format!("process {id}/{exec_id} has no terminal"))
        })?;
        runtime::linux::sync::resize_pty(&*pty, w, h)?;
        Ok(())
    }

    pub fn close_stdin(&self, mux: &Mux, id: &str, exec_id: &str) -> Result<()> {
        let p = self.get(id)?.process(exec_id)?;
        if p.stdin_stream != 0 {
            mux.close_input(p.stdin_stream);
        }
        Ok(())
    }

    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let status = c.init.status();
        if status == Status::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is running"
            )));
        }
        let c2 = c.clone();
        blocking(move || -> Result<()> {
            // Leftovers (a created init, execs outside a pid namespace) die with it.
            if c2.cgroup.procs().map(|p| !p.is_empty()).unwrap_or(false) {
                let _ = c2.cgroup.kill_all(libc::SIGKILL);
            }
            if c2.init.status() == Status::Created && c2.init.pid() > 0 {
                let _ = kill(Pid::from_raw(c2.init.pid()), Signal::SIGKILL);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match c2.cgroup.destroy() {
                    Ok(()) => break,
                    Err(e) if std::time::Instant::now() > deadline => return Err(e.into()),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            unmount_all(&c2.mounts);
            Ok(())
        })
        .await?;
        self.map().remove(id);
        crate::log_line(&format!("container {id}: removed"));
        Ok(())
    }

    pub fn pids(&self, id: &str) -> Result<protocols::agent::PidsResponse> {
        let c = self.get(id)?;
        let by_pid: HashMap<i32, String> = c
            .execs()
            .values()
            .map(|p| (p.pid(), p.exec_id.clone()))
            .collect();
        let procs = c.cgroup.procs()?;
        Ok(protocols::agent::PidsResponse {
            processes: procs
                .into_iter()
                .map(|pid| protocols::agent::ProcessPid {
                    pid: pid as u32,
                    exec_id: by_pid.get(&pid).cloned().unwrap_or_default(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    pub async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        let c = self.get(id)?;
        let r = requests::parse_resources(resources)?;
        blocking(move || c.cgroup.apply(&r, true).map_err(AgentError::from)).await
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.get(id)?;
        if c.init.status() != Status::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        blocking(move || {
            if pause {
                c.cgroup.freeze()?;
            } else {
                c.cgroup.thaw()?;
            }
            Ok(())
        })
        .await
    }

    pub async fn stats(&self, id: &str) -> Result<protocols::agent::CgroupStats> {
        let c = self.get(id)?;
        let s = blocking(move || c.cgroup.stats().map_err(AgentError::from)).await?;
        Ok(s.into_proto())
    }
}
