//! containerd 2.x's sandbox API (`sandboxer = "shim"` on a CRI runtime: the
//! `containerd.runtime.sandbox.v1.Sandbox` ttrpc service instead of a pause container).
//!
//! Janus does not implement it yet (docs/architecture.md, "containerd's sandbox API": what
//! containerd 2.1 sends, and what a VM pod without a sandbox container would take). The service
//! is still served, for two things: containerd gets Unimplemented with a fix instead of
//! "service does not exist", and the ShutdownSandbox of containerd's cleanup ends this shim
//! server (no Task Shutdown ever comes in that flow, so it would otherwise outlive the pod).

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::ExitSignal;
use containerd_shim_protos::sandbox_api::{
    CreateSandboxRequest, CreateSandboxResponse, ShutdownSandboxRequest, ShutdownSandboxResponse,
};
use containerd_shim_protos::sandbox_async::Sandbox;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};

use crate::task::TaskService;

/// The sandbox API's answer: not implemented, and what to configure instead.
pub struct SandboxApi {
    pub tasks: TaskService,
    pub exit: Arc<ExitSignal>,
}

/// Why CreateSandbox is refused, with the fix (containerd shows it in RunPodSandbox's error).
pub const NOT_IMPLEMENTED: &str = "Janus does not implement containerd's sandbox API \
     (sandboxer = \"shim\"): remove `sandboxer` from this runtime handler's config so that \
     containerd uses its default (podsandbox: a pause container, which Janus runs in the pod's \
     VM)";

#[async_trait]
impl Sandbox for SandboxApi {
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        log::warn!("sandbox {}: {NOT_IMPLEMENTED}", req.sandbox_id);
        Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::UNIMPLEMENTED,
            NOT_IMPLEMENTED,
        )))
    }

    async fn shutdown_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: ShutdownSandboxRequest,
    ) -> ttrpc::Result<ShutdownSandboxResponse> {
        if self.tasks.is_empty() {
            self.exit.signal();
        }
        Ok(ShutdownSandboxResponse::default())
    }
}
