//! Containers in the guest, created with runtime::linux through the agent's zygote, exactly
//! as namespace mode does on the host.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use nix::mount::{mount, MsFlags};
use runtime::linux::cgroups::{self, Cgroup};
use runtime::linux::spec::{self as rtspec, NsPlan};
use runtime::linux::sync::{Channel, Msg};
use runtime::linux::zygote::{SpawnKind, SpawnRequest, Zygote};
use tokio::sync::watch;

use crate::stdio::Mux;

pub static ZYGOTE: OnceLock<Zygote> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl From<runtime::linux::Error> for AgentError {
    fn from(e: runtime::linux::Error) -> Self {
        match e {
            runtime::linux::Error::InvalidSpec(_) => AgentError::InvalidArgument(e.to_string()),
            runtime::linux::Error::NotFound(_) => AgentError::NotFound(e.to_string()),
            _ => AgentError::Internal(e.to_string()),
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        let code = match e {
            AgentError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            AgentError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            AgentError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            AgentError::Internal(_) => ttrpc::Code::UNKNOWN,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

pub struct GProc {
    pub status: Mutex<(Status, i32, u32, i64)>, // status, pid, exit status, exited_at (ns)
    pub sync: Mutex<Option<Channel>>,
    exited: watch::Sender<bool>,
}

impl GProc {
    fn new() -> Arc<GProc> {
        let (tx, _) = watch::channel(false);
        Arc::new(GProc {
            status: Mutex::new((Status::Created, 0, 0, 0)),
            sync: Mutex::new(None),
            exited: tx,
        })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, (Status, i32, u32, i64)> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> (Status, i32, u32, i64) {
        *self.st()
    }

    fn set_exited(&self, code: i32) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        {
            let mut s = self.st();
            if s.0 == Status::Stopped {
                return;
            }
            *s = (Status::Stopped, s.1, code as u32, now);
        }
        *self.sync.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.exited.send_replace(true);
    }

    pub async fn wait(&self) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }
}

pub struct Ctr {
    pub cgroup: Cgroup,
    pub mounts: Vec<PathBuf>,
    pub init: Arc<GProc>,
}

#[derive(Default)]
pub struct Containers {
    map: Mutex<HashMap<String, Arc<Ctr>>>,
    pids: Mutex<HashMap<i32, Arc<GProc>>>,
    early: Mutex<HashMap<i32, i32>>,
}

fn blocking_err(e: tokio::task::JoinError) -> AgentError {
    AgentError::Internal(format!("blocking task: {e}"))
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

    /// Reaper callback.
    pub fn on_exit(&self, pid: i32, code: i32) {
        let p = self
            .pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
        match p {
            Some(p) => p.set_exited(code),
            None => {
                let mut e = self.early.lock().unwrap_or_else(|e| e.into_inner());
                if e.len() > 1024 {
                    e.clear();
                }
                e.insert(pid, code);
            }
        }
    }

    fn register(&self, pid: i32, p: &Arc<GProc>) -> Option<i32> {
        if let Some(code) = self
            .early
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid)
        {
            return Some(code);
        }
        self.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, p.clone());
        None
    }

    pub async fn create(
        self: &Arc<Self>,
        mux: &Mux,
        req: protocols::agent::CreateContainerRequest,
    ) -> Result<u32> {
        let id = req.container_id.clone();
        if id.is_empty() || id.contains('/') {
            return Err(AgentError::InvalidArgument(format!(
                "bad container id {id:?}"
            )));
        }
        if self.map().contains_key(&id) {
            return Err(AgentError::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        let text = String::from_utf8(req.oci_spec.clone())
            .map_err(|_| AgentError::InvalidArgument("oci_spec is not UTF-8".into()))?;
        let spec = rtspec::parse(&text)?;
        if req.stdio.terminal {
            return Err(AgentError::InvalidArgument(
                "terminals are not supported by this agent version".into(),
            ));
        }
        // Guest-side mounts (virtio-fs shares, bind sources).
        let mut mounted = Vec::new();
        for s in &req.storages {
            let mp = PathBuf::from(&s.mount_point);
            std::fs::create_dir_all(&mp)
                .map_err(|e| AgentError::Internal(format!("create {}: {e}", mp.display())))?;
            let (src, fstype) = match s.driver.as_str() {
                "virtiofs" => (s.source.clone(), "virtiofs".to_string()),
                "bind" => (s.source.clone(), String::new()),
                other => {
                    return Err(AgentError::InvalidArgument(format!(
                        "storage driver {other:?} is not supported"
                    )))
                }
            };
            crate::log_line(&format!(
                "container {id}: mount {} {src} on {}",
                s.driver,
                mp.display()
            ));
            let flags = if fstype.is_empty() {
                MsFlags::MS_BIND
            } else {
                MsFlags::empty()
            };
            let fst = (!fstype.is_empty()).then_some(fstype.as_str());
            mount(Some(src.as_str()), &mp, fst, flags, None::<&str>).map_err(|e| {
                AgentError::Internal(format!("mount {} {src} on {}: {e}", s.driver, mp.display()))
            })?;
            mounted.push(mp);
        }
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_default();
        if !root.is_absolute() {
            return Err(AgentError::InvalidArgument(
                "root.path must be an absolute guest path".into(),
            ));
        }
        let linux = spec.linux().clone().unwrap_or_default();
        let rel = cgroups::normalize_path(
            &linux
                .cgroups_path()
                .as_ref()
                .map(|p| p.to_string_lossy().to_string())
                .unwrap_or_default(),
            &id,
        )?;
        NsPlan::from_spec(&spec)?;
        let stdio = req.stdio.clone().unwrap_or_default();
        let (child_fds, out_streams, in_stream) = mux.prepare(&stdio)?;
        let gp = GProc::new();
        let me = self.clone();
        let gp2 = gp.clone();
        let id2 = id.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<(i32, Cgroup)> {
            let cg = Cgroup::new(&rel)?;
            cg.create()?;
            if let Some(r) = linux.resources() {
                cg.apply(r, false)?;
            }
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
                terminal: false,
                seccomp: linux.seccomp().clone(),
            };
            match me.spawn(&sreq, &child_fds, &gp2, Some(&cg)) {
                Ok(pid) => Ok((pid, cg)),
                Err(e) => {
                    let _ = cg.destroy();
                    Err(e)
                }
            }
        })
        .await
        .map_err(blocking_err)?;
        let (pid, cg) = match res {
            Ok(v) => v,
            Err(e) => {
                for m in mounted.iter().rev() {
                    let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
                }
                return Err(e);
            }
        };
        crate::log_line(&format!("container {id}: created, pid {pid}"));
        mux.start(out_streams, in_stream);
        self.map().insert(
            id,
            Arc::new(Ctr {
                cgroup: cg,
                mounts: mounted,
                init: gp,
            }),
        );
        Ok(pid as u32)
    }

    /// Zygote spawn up to Ready (same handshake as the shim's).
    fn spawn(
        &self,
        req: &SpawnRequest,
        fds: &[OwnedFd],
        gp: &Arc<GProc>,
        cg: Option<&Cgroup>,
    ) -> Result<i32> {
        let z = ZYGOTE
            .get()
            .ok_or_else(|| AgentError::Internal("zygote not running".into()))?;
        let (ours, theirs) = Channel::pair()?;
        ours.set_timeout(Some(Duration::from_secs(60)))?;
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        z.spawn(req, &theirs, &raw)?;
        drop(theirs);
        let pid = match ours.recv::<Msg>()? {
            Some((Msg::Pid(p), _)) => p,
            Some((Msg::Error { message, invalid }, _)) => return Err(child_err(message, invalid)),
            _ => {
                return Err(AgentError::Internal(
                    "container setup failed before it started".into(),
                ))
            }
        };
        let kill = |e: AgentError| {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            e
        };
        if let Some(code) = self.register(pid, gp) {
            return Err(AgentError::Internal(format!(
                "process exited during setup ({code})"
            )));
        }
        gp.st().1 = pid;
        if let Some(cg) = cg {
            cg.add_proc(pid).map_err(|e| kill(e.into()))?;
        }
        ours.send(&Msg::Go, &[]).map_err(|e| kill(e.into()))?;
        loop {
            match ours.recv::<Msg>().map_err(|e| kill(e.into()))? {
                Some((Msg::Ready, _)) => break,
                Some((Msg::Hooks, _)) => ours.send(&Msg::Go, &[]).map_err(|e| kill(e.into()))?,
                Some((Msg::Error { message, invalid }, _)) => {
                    return Err(kill(child_err(message, invalid)))
                }
                _ => {
                    return Err(kill(AgentError::Internal(
                        "container process died during setup".into(),
                    )))
                }
            }
        }
        *gp.sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(ours);
        Ok(pid)
    }

    pub async fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        let sync = c
            .init
            .sync
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                AgentError::FailedPrecondition(format!("container {id} already started"))
            })?;
        tokio::task::spawn_blocking(move || -> Result<()> {
            sync.send(&Msg::Start, &[])?;
            match sync.recv::<Msg>()? {
                None => Ok(()),
                Some((Msg::Error { message, invalid }, _)) => Err(child_err(message, invalid)),
                Some((m, _)) => Err(AgentError::Internal(format!("unexpected {m:?}"))),
            }
        })
        .await
        .map_err(blocking_err)??;
        let mut s = c.init.st();
        if s.0 == Status::Created {
            s.0 = Status::Running;
        }
        Ok(s.1 as u32)
    }

    pub fn signal(&self, id: &str, sig: u32, all: bool) -> Result<()> {
        let c = self.get(id)?;
        if all {
            c.cgroup.kill_all(sig as i32)?;
            return Ok(());
        }
        let (status, pid, ..) = c.init.snapshot();
        if status == Status::Stopped {
            return Err(AgentError::NotFound("process already finished".into()));
        }
        // SAFETY: kill(2) has no memory effects.
        if unsafe { libc::kill(pid, sig as i32) } != 0 {
            return Err(AgentError::NotFound("process already finished".into()));
        }
        Ok(())
    }

    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let (status, pid, ..) = c.init.snapshot();
        if status == Status::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} is running"
            )));
        }
        if status == Status::Created && pid > 0 {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = tokio::time::timeout(Duration::from_secs(5), c.init.wait()).await;
        }
        let c2 = c.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            c2.cgroup.destroy()?;
            for m in c2.mounts.iter().rev() {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
            Ok(())
        })
        .await
        .map_err(blocking_err)??;
        self.map().remove(id);
        Ok(())
    }
}

fn child_err(message: String, invalid: bool) -> AgentError {
    if invalid {
        AgentError::InvalidArgument(message)
    } else {
        AgentError::Internal(message)
    }
}
