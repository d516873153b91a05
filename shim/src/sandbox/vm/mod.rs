//! VM mode: a pod (or a plain container) in a lightweight VM of its own, driven through the
//! in-guest agent.
//!
//! The first container of a pod (CRI's sandbox container, or a container outside any pod)
//! boots the VM ([`pod::VmPod`]). Every container of the pod (the first one included) is
//! then: containerd's snapshot mounted on the host as in namespace mode and bind-mounted into
//! the pod's share with the spec's host binds (virtio-fs, no copy), and an agent
//! CreateContainer with a guest copy of the spec ([`spec::guest_spec`]) whose namespace paths
//! point at the sandbox container's in the guest. Process stdio travels as frames on the VM's
//! stdio channel ([`stdio`]). Exits come from the agent's WaitProcess (or, when the VM dies,
//! as 137 for every process).

mod container;
mod net;
mod pod;
mod portfwd;
mod share;
mod spec;
mod stdio;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::CreateTaskRequest;
use containerd_shim_protos::protobuf::MessageField;
use oci_spec::runtime::LinuxNamespaceType;
use oci_spec::runtime::Spec;
use runtime::linux::spec::NsPlan;

use container::{VmContainer, VmProcess};
pub use pod::cleanup_leftovers;
use pod::{BootRequest, VmPod};
use spec::{check_host_namespaces, guest_spec, HostBind, PodNs};

use super::host::{blocking, mount_rootfs, rootfs_path};
use super::{ContainerOps, Isolation, Sandbox};
use crate::config::Config;
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::hooks;
use crate::process::Proc;

/// One VM pod: the VM, and the guest pids of its containers (which the pod's later containers
/// join by namespace path).
pub struct VmSandbox {
    me: Weak<VmSandbox>,
    pod: Arc<VmPod>,
    namespace: String,
    events: Events,
    allow_host_namespaces: bool,
    members: Mutex<HashMap<String, i32>>,
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

/// What a VM cannot run, refused before anything is made.
fn validate(
    id: &str,
    spec: &Spec,
    allow_host_namespaces: bool,
    pod: &PodNs,
) -> Result<(Vec<u8>, Vec<HostBind>)> {
    NsPlan::from_spec(spec)?;
    check_host_namespaces(id, spec, allow_host_namespaces)?;
    guest_spec(id, spec, pod)
}

impl VmSandbox {
    /// Boots the VM for container `req.id` (whose Create follows), in its own cgroup: the VM
    /// is charged to the pod.
    pub async fn boot(
        config: Config,
        namespace: &str,
        req: &CreateTaskRequest,
        spec: &Spec,
        events: Events,
    ) -> Result<Arc<VmSandbox>> {
        let allow = config.vm.allow_host_namespaces;
        validate(&req.id, spec, allow, &PodNs::default())?;
        let cgroup = pod::vm_cgroup(spec, &req.id)?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let bundle = PathBuf::from(&req.bundle);
        let boot = VmPod::boot(BootRequest {
            config: &config,
            namespace,
            id: &req.id,
            bundle: &bundle,
            annotations: &annotations,
            netns: pod_netns(spec),
            cgroup: Some(cgroup.clone()),
        });
        let pod = match boot.await {
            Ok(p) => Arc::new(p),
            Err(e) => {
                pod::destroy_cgroup(Some(cgroup)).await;
                return Err(e);
            }
        };
        tokio::spawn(report_ooms(pod.clone(), events.clone()));
        Ok(Arc::new_cyclic(|me| VmSandbox {
            me: me.clone(),
            pod,
            namespace: namespace.to_string(),
            events,
            allow_host_namespaces: allow,
            members: Mutex::new(HashMap::new()),
        }))
    }

    fn members(&self) -> std::sync::MutexGuard<'_, HashMap<String, i32>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where container `id` joins the pod in the guest.
    fn pod_ns(&self, id: &str) -> PodNs {
        let m = self.members();
        PodNs {
            sandbox_pid: m
                .get(&self.pod.owner)
                .copied()
                .filter(|_| id != self.pod.owner),
            known_pids: m.values().copied().filter(|p| *p > 0).collect(),
        }
    }

    /// Undoes a container's Create: its share, its rootfs, and the VM if it booted it.
    async fn undo(&self, id: &str, rootfs: PathBuf, mounted: bool) {
        let (shared, id2) = (self.pod.shared.clone(), id.to_string());
        let _ = blocking(move || {
            share::unshare_container(&shared, &id2);
            Ok(())
        })
        .await;
        if id == self.pod.owner {
            self.pod.teardown().await;
        }
        if mounted {
            let _ = blocking(move || Ok(runtime::linux::mounts::unmount_all(&rootfs)?)).await;
        }
    }

    /// The agent's CreateContainer, then the host's create hooks (which need the guest pid).
    async fn create_in_guest(
        &self,
        req: &CreateTaskRequest,
        spec: &Spec,
        guest: Vec<u8>,
        init: &Arc<Proc>,
    ) -> Result<(i32, stdio::ProcIo)> {
        let (streams, pio) =
            stdio::wire(&self.pod.plane, &init.io, &self.namespace, &req.id).await?;
        let creq = protocols::agent::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec: guest,
            stdio: MessageField::some(streams),
            ..Default::default()
        };
        let pod = &self.pod;
        let created = pod.call(
            "create_container",
            pod.agent.create_container(pod.ctx(), &creq),
        );
        let pid = match created.await {
            Ok(r) => r.pid as i32,
            Err(e) => {
                pio.abort();
                return Err(e);
            }
        };
        let (spec2, id2, bundle) = (spec.clone(), req.id.clone(), PathBuf::from(&req.bundle));
        if let Err(e) = blocking(move || Ok(hooks::run_create(&spec2, &id2, &bundle, pid)?)).await {
            let rm = container::creq(&req.id);
            let _ = pod
                .call(
                    "remove_container",
                    pod.agent.remove_container(pod.ctx(), &rm),
                )
                .await;
            pio.abort();
            return Err(e);
        }
        Ok((pid, pio))
    }
}

/// OOM kills in the guest (any of the pod's containers), as they happen.
async fn report_ooms(pod: Arc<VmPod>, events: Events) {
    let forever = runtime::vm::agent::ctx(Duration::from_secs(365 * 24 * 3600));
    let empty = protocols::agent::Empty::new();
    while let Ok(ev) = pod.agent.get_oom_event(forever.clone(), &empty).await {
        events.oom(&ev.container_id).await;
    }
}

#[async_trait]
impl Sandbox for VmSandbox {
    fn isolation(&self) -> Isolation {
        Isolation::Vm
    }

    async fn create(
        &self,
        req: &CreateTaskRequest,
        spec: Spec,
        init: Arc<Proc>,
    ) -> Result<Arc<dyn ContainerOps>> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| ShimError::Internal("VM sandbox is gone".into()))?;
        let bundle = PathBuf::from(&req.bundle);
        let rootfs = rootfs_path(&spec, &bundle);
        let checked = validate(
            &req.id,
            &spec,
            self.allow_host_namespaces,
            &self.pod_ns(&req.id),
        );
        let (guest, binds) = match checked {
            Ok(v) => v,
            Err(e) => {
                self.undo(&req.id, rootfs, false).await;
                return Err(e);
            }
        };
        let (req2, r2) = (req.clone(), rootfs.clone());
        let mounted = match blocking(move || mount_rootfs(&req2, &r2)).await {
            Ok(m) => m,
            Err(e) => {
                self.undo(&req.id, rootfs, false).await;
                return Err(e);
            }
        };
        let (shared, id2, r2) = (self.pod.shared.clone(), req.id.clone(), rootfs.clone());
        let made = async {
            blocking(move || share::share_container(&shared, &id2, &r2, &binds)).await?;
            self.create_in_guest(req, &spec, guest, &init).await
        };
        let (pid, mut pio) = match made.await {
            Ok(v) => v,
            Err(e) => {
                self.undo(&req.id, rootfs, mounted).await;
                return Err(e);
            }
        };
        self.members().insert(req.id.clone(), pid);
        init.set_pid(pid);
        pio.start_input(&self.pod.plane);
        VmProcess::attach(&self.pod, &req.id, &init, pio, &self.events)?;
        Ok(Arc::new(VmContainer {
            sandbox: me,
            id: req.id.clone(),
            bundle,
            spec,
            rootfs,
            rootfs_mounted: mounted,
        }))
    }
}
