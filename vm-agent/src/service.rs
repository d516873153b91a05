//! The agent API implementation. Every call validates its input and answers bad requests
//! with a status code (InvalidArgument, NotFound, ...); nothing here panics on input.
//! Network calls configure IPv4 interfaces (found by MAC) and routes (`net`).

use std::sync::Arc;
use std::time::Instant;

use crate::containers::Containers;
use crate::error::AgentError;
use crate::stdio::Mux;

use async_trait::async_trait;
use protocols::agent::*;
use runtime::aio::blocking;
use ttrpc::r#async::TtrpcContext;

pub struct AgentService {
    started: Instant,
    containers: Arc<Containers>,
    mux: Mux,
    sandbox_mounts: std::sync::Mutex<Vec<std::path::PathBuf>>,
}

impl AgentService {
    pub fn new(mux: Mux) -> Self {
        AgentService {
            started: Instant::now(),
            containers: Arc::new(Containers::default()),
            mux,
            sandbox_mounts: Default::default(),
        }
    }

    pub fn containers(&self) -> Arc<Containers> {
        self.containers.clone()
    }
}

fn meminfo_total_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[async_trait]
impl protocols::Agent for AgentService {
    async fn health(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<HealthResponse> {
        Ok(HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            ..Default::default()
        })
    }

    async fn guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: Empty,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        let mode = match runtime::linux::cgroups::host_mode() {
            runtime::linux::cgroups::Mode::V2 => "v2",
            runtime::linux::cgroups::Mode::V1 => "v1",
        };
        Ok(GuestDetailsResponse {
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            cgroup_mode: mode.to_string(),
            modules_loaded: crate::init::MODULES.get().cloned().unwrap_or_default(),
            memory_total_kb: meminfo_total_kb(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            ..Default::default()
        })
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let pid = self.containers.create(&self.mux, req).await?;
        Ok(CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<StartResponse> {
        if !req.exec_id.is_empty() {
            return Err(AgentError::InvalidArgument(
                "exec processes start with ExecProcess".into(),
            )
            .into());
        }
        let pid = self.containers.start(&req.container_id).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<StartResponse> {
        let pid = self.containers.exec(&self.mux, req).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitResponse> {
        let p = self
            .containers
            .get(&req.container_id)?
            .process(&req.exec_id)?;
        Ok(p.wait().await)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)?;
        Ok(Empty::default())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.remove(&req.container_id).await?;
        Ok(Empty::default())
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.containers
            .close_stdin(&self.mux, &req.container_id, &req.exec_id)?;
        Ok(Empty::default())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizeRequest) -> ttrpc::Result<Empty> {
        self.containers
            .resize(&req.container_id, &req.exec_id, req.width, req.height)?;
        Ok(Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsResponse> {
        let stats = self.containers.stats(&req.container_id).await?;
        Ok(StatsResponse {
            stats: protobuf::MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateRequest) -> ttrpc::Result<Empty> {
        self.containers
            .update(&req.container_id, &req.linux_resources)
            .await?;
        Ok(Empty::default())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id, true).await?;
        Ok(Empty::default())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id, false).await?;
        Ok(Empty::default())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<PidsResponse> {
        Ok(self.containers.pids(&req.container_id)?)
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OOMEvent> {
        let mut rx = self.containers.oom_rx.lock().await;
        match rx.recv().await {
            Some(id) => Ok(OOMEvent {
                container_id: id,
                ..Default::default()
            }),
            None => Err(AgentError::Internal("agent shutting down".into()).into()),
        }
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname).map_err(|e| {
                AgentError::InvalidArgument(format!("hostname {:?}: {e}", req.hostname))
            })?;
        }
        if !req.storages.is_empty() {
            let mut held = self
                .sandbox_mounts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !held.is_empty() {
                return Err(AgentError::AlreadyExists("sandbox already created".into()).into());
            }
            *held = crate::storage::mount_storages("sandbox", &req.storages)?;
        }
        if !req.dns.is_empty() {
            let text: String = req
                .dns
                .iter()
                .map(|d| format!("nameserver {d}\n"))
                .collect();
            std::fs::create_dir_all("/etc")
                .and_then(|_| std::fs::write("/etc/resolv.conf", text))
                .map_err(|e| AgentError::Internal(format!("/etc/resolv.conf: {e}")))?;
        }
        Ok(Empty::default())
    }

    async fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        for id in self.containers.ids() {
            let _ = self.containers.signal(&id, "", libc::SIGKILL as u32, true);
            if let Ok(c) = self.containers.get(&id) {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(5), c.init.wait()).await;
            }
            self.containers.remove(&id).await?;
        }
        let held = std::mem::take(
            &mut *self
                .sandbox_mounts
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        crate::storage::unmount_all(&held);
        Ok(Empty::default())
    }

    async fn update_interface(&self, _ctx: &TtrpcContext, req: Interface) -> ttrpc::Result<Empty> {
        blocking(move || crate::net::update_interface(&req)).await?;
        Ok(Empty::default())
    }

    async fn add_routes(&self, _ctx: &TtrpcContext, req: Routes) -> ttrpc::Result<Empty> {
        blocking(move || crate::net::add_routes(&req.routes)).await?;
        Ok(Empty::default())
    }

    async fn forward_port(
        &self,
        _ctx: &TtrpcContext,
        req: ForwardPortRequest,
    ) -> ttrpc::Result<Empty> {
        let port = crate::requests::forward_port(req.port)?;
        // The pod's network namespace in the guest is the agent's own (the root one).
        let conn = tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|e| {
                AgentError::FailedPrecondition(format!("127.0.0.1:{port} in the pod: {e}"))
            })?;
        let fd = conn
            .into_std()
            .map_err(|e| AgentError::Internal(format!("socket: {e}")))?;
        let streams = req.streams.into_option().unwrap_or_default();
        self.mux
            .start(crate::stdio::Wiring::socket(fd.into(), &streams)?);
        Ok(Empty::default())
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        // Answer first, then power off.
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            crate::init::power_off(std::process::id() == 1);
        });
        Ok(Empty::default())
    }
}
