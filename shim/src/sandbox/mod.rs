//! The seam between the Task service and the two ways Janus runs a pod.
//!
//! A [`Sandbox`] is chosen once per pod (`crate::node`): [`linux::LinuxSandbox`] runs
//! containers as namespaces and cgroups on the host, [`vm::VmSandbox`] in the pod's VM through
//! the guest agent. A sandbox creates containers; each container is a [`ContainerOps`] and
//! each of its processes a [`crate::process::ProcessOps`]. The Task service (`crate::task`)
//! keeps the records (ids, states, exits, events) and checks preconditions; everything below
//! this line does the work of one mode.

pub mod host;
pub mod linux;
pub mod vm;

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::CreateTaskRequest;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use oci_spec::runtime::{LinuxResources, Spec};

use crate::error::Result;
use crate::process::Proc;

/// Which way a sandbox isolates its pod (what a pod member may ask for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    Namespaces,
    Vm,
}

/// One pod's way of running containers.
#[async_trait]
pub trait Sandbox: Send + Sync {
    fn isolation(&self) -> Isolation;

    /// Creates container `req.id` from its bundle spec, up to the point where it waits for
    /// Start. Attaches the init's [`crate::process::ProcessOps`] to `init` and sets its pid.
    /// Everything made here is undone on failure.
    async fn create(
        &self,
        req: &CreateTaskRequest,
        spec: Spec,
        init: Arc<Proc>,
    ) -> Result<Arc<dyn ContainerOps>>;
}

/// What the Task service does to one container, whatever runs it. Preconditions (states,
/// ids) are the Task service's; these only act.
#[async_trait]
pub trait ContainerOps: Send + Sync {
    /// Releases the created init; returns its pid.
    async fn start(&self) -> Result<u32>;
    /// Spawns and starts the exec process `p` (its record exists); attaches its ops.
    async fn exec(&self, p: &Arc<Proc>) -> Result<u32>;
    async fn pause(&self) -> Result<()>;
    async fn resume(&self) -> Result<()>;
    /// `raw` is the resources' JSON as containerd sent it (already validated as `res`).
    async fn update(&self, res: LinuxResources, raw: Vec<u8>) -> Result<()>;
    /// containerd's cgroups metrics (v1 or v2) as an Any.
    async fn stats(&self) -> Result<Any>;
    /// Every pid in the container (as containerd knows them).
    async fn pids(&self) -> Result<Vec<i32>>;
    /// After the init stopped: releases everything the container holds (rootfs, cgroup, its
    /// part of the VM, poststop hooks).
    async fn delete(&self) -> Result<()>;
}
