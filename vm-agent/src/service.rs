//! The agent API implementation. This first version answers health, guest details and
//! shutdown; container calls arrive with the VM sandbox (the default trait methods answer
//! them with an error naming the method).

use std::sync::Arc;
use std::time::Instant;

use crate::containers::{AgentError, Containers};
use crate::stdio::Mux;

use async_trait::async_trait;
use protocols::agent::*;
use ttrpc::r#async::TtrpcContext;

pub struct AgentService {
    started: Instant,
    containers: Arc<Containers>,
    mux: Mux,
}

impl AgentService {
    pub fn new(mux: Mux) -> Self {
        AgentService {
            started: Instant::now(),
            containers: Arc::new(Containers::default()),
            mux,
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
            return Err(
                AgentError::InvalidArgument("exec processes are not supported yet".into()).into(),
            );
        }
        let pid = self.containers.start(&req.container_id).await?;
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
        let c = self.containers.get(&req.container_id)?;
        c.init.wait().await;
        let (_, _, code, at) = c.init.snapshot();
        Ok(WaitResponse {
            exit_status: code,
            exited_at_unix_nanos: at,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .signal(&req.container_id, req.signal, req.all)?;
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

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        // Answer first, then power off.
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            crate::init::power_off(std::process::id() == 1);
        });
        Ok(Empty::default())
    }
}
