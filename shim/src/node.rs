//! Which sandbox a new container runs in: the one place where the modes split.
//!
//! A container of a pod whose sandbox container is in this shim joins that pod's sandbox (a
//! pod is one isolation unit: a member never runs outside the pod's VM, and one that asks for
//! a VM is refused in a pod that has none). Any other container gets the sandbox of its mode
//! (`config::resolve`): the shim's one [`LinuxSandbox`], or a [`VmSandbox`] booted for it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::CreateTaskRequest;
use oci_spec::runtime::Spec;

use crate::config::{self, Mode, RuntimeName};
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::options;
use crate::sandbox::linux::{self, LinuxSandbox};
use crate::sandbox::vm::{self, VmSandbox};
use crate::sandbox::{Isolation, Sandbox};

/// Picks the sandbox for a container (the Task service's only view of modes).
#[async_trait]
pub trait Sandboxes: Send + Sync {
    /// `pod`: the sandbox of the container's pod, when the pod's sandbox container is here.
    async fn open(
        &self,
        req: &CreateTaskRequest,
        spec: &Spec,
        pod: Option<Arc<dyn Sandbox>>,
    ) -> Result<Arc<dyn Sandbox>>;
}

/// The node's sandboxes, as this shim was started (runtime name, namespace).
pub struct Node {
    pub runtime_name: RuntimeName,
    pub namespace: String,
    pub linux: Arc<LinuxSandbox>,
    pub events: Events,
}

/// The runtime options' `ConfigPath` (containerd's per-handler options).
fn config_path(req: &CreateTaskRequest) -> Result<Option<PathBuf>> {
    let Some(any) = req.options.as_ref() else {
        return Ok(None);
    };
    let o = options::decode(any).map_err(ShimError::InvalidArgument)?;
    Ok(o.filter(|o| !o.config_path.is_empty())
        .map(|o| PathBuf::from(o.config_path)))
}

#[async_trait]
impl Sandboxes for Node {
    async fn open(
        &self,
        req: &CreateTaskRequest,
        spec: &Spec,
        pod: Option<Arc<dyn Sandbox>>,
    ) -> Result<Arc<dyn Sandbox>> {
        let explicit = config_path(req)?;
        let (mode, source, config) = config::resolve(self.runtime_name, explicit.as_deref())?;
        if let Some(pod) = pod {
            if mode == Mode::Vm && pod.isolation() != Isolation::Vm {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {}: asks for VM mode, but its pod sandbox runs without a VM",
                    req.id
                )));
            }
            log::info!("container {}: joins its pod's sandbox", req.id);
            return Ok(pod);
        }
        log::info!(
            "container {}: {mode} mode ({source:?}; runtime {})",
            req.id,
            self.runtime_name.runtime_id()
        );
        match mode {
            Mode::Namespace => Ok(self.linux.clone()),
            Mode::Vm => {
                let sb = VmSandbox::boot(config, &self.namespace, req, spec, self.events.clone());
                Ok(sb.await?)
            }
        }
    }
}

/// `containerd-shim-janus-v2 delete` after the shim is gone, in the bundle: whatever either
/// mode left (VM processes and shares, processes, cgroup, rootfs mounts). Idempotent.
pub fn cleanup_bundle(bundle: &Path, id: &str) -> (u32, u32) {
    vm::cleanup_leftovers(bundle);
    linux::cleanup_bundle(bundle, id)
}
