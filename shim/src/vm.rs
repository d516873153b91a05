//! VM mode: a pod (or a plain container) in a lightweight VM of its own, driven through the
//! in-guest agent.
//!
//! The first container of a pod (CRI's sandbox container, or a container outside any pod)
//! boots the VM: virtiofsd on an empty per-VM share directory, the pod's CNI interface
//! mirrored to a tap (`vmnet`), the VMM (`runtime::vm`: QEMU, or janus-vmm with
//! `vm.hypervisor = "builtin"`), then the agent. Every container of the
//! pod (the first one included) is then: containerd's snapshot mounted on the host as in
//! namespace mode and bind-mounted into the share with the spec's host binds (virtio-fs, no
//! copy), and an agent CreateContainer with a guest copy of the spec whose namespace paths
//! point at the sandbox container's in the guest. Process stdio travels as
//! frames on the VM's stdio channel (`StdioPlane`) between containerd's FIFOs / log driver /
//! files and the guest process. Exits come from the agent's WaitProcess (or, when the VM dies,
//! as 137 for every process). The Task service keeps its process records (`Proc`) as in
//! namespace mode; this module holds what differs.
//!
//! Not done: OCI hooks (host hooks cannot run in the guest; skipped with a warning), IPv6 in
//! the guest, block-device rootfs.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oci_spec::runtime::Spec;
use protocols::agent as pa;
use runtime::aio;
use runtime::linux::cgroups::Cgroup;
use runtime::vm::virtiofsd::{self, Virtiofsd, VirtiofsdConfig};
use runtime::vm::{agent, AgentClient, FsShare, StdioPlane, Vm};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::error::{Result, ShimError};
use crate::stdio::{self, IoPaths};

/// Where the agent mounts the pod's share in the guest: one directory per container, with its
/// rootfs and host binds.
pub const GUEST_SHARED: &str = "/run/janus/shared";
/// The pod's /dev/shm in the guest: a tmpfs made at sandbox creation, bound into every
/// container that CRI gives a /dev/shm bind.
pub const GUEST_SHM: &str = "/run/janus/shm";
const SHARE_TAG: &str = "janus-share";
/// Long enough for any agent call; the VM dying ends calls at once.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long one agent call may take unless `vm.agent_timeout_ms` says otherwise.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// An agent error as the same status namespace mode would give.
pub fn rpc(e: ttrpc::Error) -> ShimError {
    runtime::Status::from_rpc(e)
}

fn vm_err(e: runtime::vm::Error) -> ShimError {
    match e {
        runtime::vm::Error::MissingAsset { .. } | runtime::vm::Error::Config(_) => {
            ShimError::FailedPrecondition(e.to_string())
        }
        runtime::vm::Error::AgentTimeout { .. } => ShimError::DeadlineExceeded(e.to_string()),
        runtime::vm::Error::UnknownDriver(_) => ShimError::InvalidArgument(e.to_string()),
        runtime::vm::Error::Agent(t) => rpc(t),
        _ => ShimError::Internal(e.to_string()),
    }
}

/// One VM and what serves it: a pod's sandbox container booted it, the pod's other
/// containers run in it; a plain container has one of its own.
pub struct VmPod {
    pub vm: Arc<dyn Vm>,
    /// The container whose Create booted the VM; its Delete ends the VM.
    pub owner: String,
    /// The owner's guest pid, whose namespaces the pod's containers join.
    pub owner_pid: std::sync::atomic::AtomicI32,
    /// Host directory virtiofsd shares (`<work dir>.shared`): `<container>/rootfs` and
    /// `<container>/mounts/*` are bind mounts of the container's snapshot and host binds.
    pub shared: PathBuf,
    /// The pod's network as the guest got it (tap + redirects in the pod's namespace).
    net: Option<crate::vmnet::PodNet>,
    pub agent: AgentClient,
    pub plane: StdioPlane,
    virtiofsd: u32,
    vfs_sock: PathBuf,
    /// Records what to clean up if the shim dies (`shim delete` reads it).
    state_file: PathBuf,
    /// Every agent call ends by then (DeadlineExceeded), so a hung guest never hangs a call.
    call_timeout: Duration,
    /// The host cgroup the VMM and virtiofsd run in (the pod sandbox's): the VM is charged to
    /// the pod. Removed with the VM.
    cgroup: Option<Cgroup>,
    /// CRI port-forward from the pod's namespace on the host to the guest's loopback.
    portfwd: Option<crate::portfwd::PortForward>,
}

/// The host cgroup for a VM: the booting container's `cgroupsPath` (for a CRI pod, the sandbox
/// container's, under kubelet's pod cgroup), created here. Its limits stay the pod's (kubelet
/// sizes the pod cgroup with the RuntimeClass overhead); this only makes the VM count there.
/// `shim delete` removes it after a crash like any container cgroup (`cleanup_bundle`).
pub fn vm_cgroup(spec: &Spec, id: &str) -> Result<Cgroup> {
    let cg = Cgroup::new(&runtime::linux::cgroups::spec_path(spec, id)?)?;
    cg.create()?;
    Ok(cg)
}

/// Name of the leftovers record in the bundle.
const STATE_FILE: &str = "janus-vm.json";

/// Host side of one guest process's stdio.
#[derive(Default)]
pub struct ProcIo {
    /// Output copies; they end at the stream's EOF frame (or when the VM goes).
    pub outs: Vec<JoinHandle<()>>,
    pub stdin_task: Option<JoinHandle<()>>,
    /// Input waiting for the guest process to exist (the agent drops frames for streams it
    /// does not know yet, and ctr writes stdin before Create).
    pending_in: Option<(Input, u32)>,
}

enum Input {
    Fd(OwnedFd),
    /// A terminal's stdin FIFO, opened when the copy starts.
    Fifo(String),
}

impl ProcIo {
    /// Starts the stdin copy; call once the agent has created the process.
    pub fn start_input(&mut self, plane: &StdioPlane) {
        let Some((input, sid)) = self.pending_in.take() else {
            return;
        };
        let plane = plane.clone();
        self.stdin_task = Some(tokio::spawn(async move {
            let fd = match input {
                Input::Fd(fd) => fd,
                Input::Fifo(path) => {
                    match std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                    {
                        Ok(f) => f.into(),
                        Err(_) => return,
                    }
                }
            };
            copy_in(fd, plane, sid).await
        }));
    }
}

impl VmPod {
    /// Boots the VM for container `id` (a pod's sandbox or a plain container), sized by the
    /// config and the spec's CRI sandbox annotations, with an empty pod share.
    pub async fn boot(
        config: &Config,
        ns: &str,
        id: &str,
        bundle: &Path,
        annotations: &std::collections::HashMap<String, String>,
        netns: Option<PathBuf>,
        cgroup: Option<Cgroup>,
    ) -> Result<VmPod> {
        let guest_dir = runtime::vm::default_guest_dir();
        let mut cfg = match (&config.vm.kernel, &config.vm.initrd) {
            (Some(k), Some(i)) => runtime::vm::VmConfig::new(k, i),
            _ => runtime::vm::VmConfig::from_guest_dir(&guest_dir).map_err(vm_err)?,
        };
        if let Some(k) = &config.vm.kernel {
            cfg.kernel = k.clone();
        }
        if let Some(i) = &config.vm.initrd {
            cfg.initrd = i.clone();
        }
        for (what, p) in [
            ("guest kernel", &cfg.kernel),
            ("guest initramfs", &cfg.initrd),
        ] {
            if !p.is_file() {
                return Err(ShimError::FailedPrecondition(format!(
                    "{what} not found at {}: {} (or set vm.kernel / vm.initrd in the Janus config)",
                    p.display(),
                    runtime::vm::GUEST_HINT
                )));
            }
        }
        // "builtin" without vmx/svm is refused here (FailedPrecondition) instead of hanging
        // in a boot that cannot finish.
        let hypervisor = runtime::vm::driver(
            config
                .vm
                .hypervisor
                .as_deref()
                .unwrap_or(runtime::vm::DEFAULT_DRIVER),
        )
        .map_err(vm_err)?;
        virtiofsd::find().map_err(vm_err)?;
        let (vcpus, memory_mib) = vm_size(
            config.vm.vcpus.unwrap_or(1),
            config.vm.memory_mib.unwrap_or(256),
            annotations,
        );
        cfg.vcpus = vcpus;
        cfg.memory_mib = memory_mib;
        cfg.kernel_params = config.vm.kernel_params.clone();
        cfg.shared_memory = true;
        let call_timeout = config
            .vm
            .agent_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(CALL_TIMEOUT);

        // The VM's own directory (QEMU's sockets, logs, pidfile) and virtiofsd's socket are
        // named after the container when the name fits: unix socket paths are limited to 108
        // bytes, so not in the bundle. They go with the VM.
        let work_dir = vm_work_dir(ns, id, bundle);
        let parent = work_dir.parent().unwrap_or(Path::new("/run/janus"));
        std::fs::create_dir_all(parent)
            .map_err(|e| ShimError::Internal(format!("{}: {e}", parent.display())))?;
        cfg.work_dir = Some(work_dir.clone());
        // Next to the work dir, which the QEMU driver owns (and recreates).
        let vfs_sock = work_dir.with_extension("vfs.sock");
        let _ = std::fs::remove_file(&vfs_sock);
        let shared = work_dir.with_extension("shared");
        remove_share(&shared);
        mkdir(&shared)?;
        let mut vfs_cfg = VirtiofsdConfig::new(&shared, &vfs_sock, bundle.join("virtiofsd.log"));
        vfs_cfg.cgroup = cgroup.clone();
        let virtiofsd = match Virtiofsd::start(&vfs_cfg).await {
            // The shim's reaper collects it.
            Ok(v) => v.detach(),
            Err(e) => {
                remove_share(&shared);
                return Err(vm_err(e));
            }
        };
        let kill_vfs = || {
            // SAFETY: kill(2) has no memory effects; the pid is our child until reaped.
            unsafe { libc::kill(virtiofsd as i32, libc::SIGKILL) };
            let _ = std::fs::remove_file(&vfs_sock);
            remove_share(&shared);
        };
        let net = match netns {
            Some(ns) => {
                let r = tokio::task::spawn_blocking(move || crate::vmnet::setup(&ns))
                    .await
                    .map_err(|e| ShimError::Internal(format!("blocking task: {e}")))
                    .and_then(|r| r);
                match r {
                    Ok(n) => n,
                    Err(e) => {
                        kill_vfs();
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let drop_net = || {
            if let Some(n) = &net {
                crate::vmnet::teardown(&n.netns, &n.host_if);
            }
        };
        // `ps` names the container on the VMM's command line.
        cfg.name = Some(id.to_string());
        cfg.fs = Some(FsShare {
            tag: SHARE_TAG.into(),
            socket: vfs_sock.clone(),
        });
        if let Some(n) = &net {
            cfg.netns = Some(n.netns.clone());
            cfg.net.push(n.device());
        }
        cfg.cgroup = cgroup.clone();
        let vm: Arc<dyn Vm> = match hypervisor.start(&cfg).await {
            Ok(v) => Arc::from(v),
            Err(e) => {
                kill_vfs();
                drop_net();
                return Err(vm_err(e));
            }
        };
        let state_file = bundle.join(STATE_FILE);
        let record = serde_json::json!({
            "work_dir": vm.work_dir(),
            "vfs_sock": vfs_sock,
            "virtiofsd": virtiofsd,
            "shared": shared,
            "netns": net.as_ref().map(|n| n.netns.clone()),
            "host_if": net.as_ref().map(|n| n.host_if.clone()),
        });
        let _ = std::fs::write(&state_file, record.to_string());
        let up = async {
            let plane = StdioPlane::new(
                vm.take_stdio_stream()
                    .ok_or_else(|| ShimError::Internal("VM has no stdio channel".into()))?,
            );
            vm.connect_agent(None).await.map_err(vm_err)?;
            let agent = vm
                .agent()
                .ok_or_else(|| ShimError::Internal("agent client missing".into()))?;
            let sb = pa::CreateSandboxRequest {
                sandbox_id: id.to_string(),
                storages: vec![
                    pa::Storage {
                        driver: "virtiofs".into(),
                        source: SHARE_TAG.into(),
                        mount_point: GUEST_SHARED.into(),
                        ..Default::default()
                    },
                    pa::Storage {
                        driver: "tmpfs".into(),
                        source: "shm".into(),
                        mount_point: GUEST_SHM.into(),
                        // Kubernetes' default /dev/shm size.
                        options: vec!["mode=1777".into(), "size=65536k".into()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            };
            agent
                .create_sandbox(agent::ctx(call_timeout), &sb)
                .await
                .map_err(rpc)?;
            if let Some(n) = &net {
                agent
                    .update_interface(agent::ctx(call_timeout), &n.iface)
                    .await
                    .map_err(rpc)?;
                let routes = pa::Routes {
                    routes: n.routes.clone(),
                    ..Default::default()
                };
                agent
                    .add_routes(agent::ctx(call_timeout), &routes)
                    .await
                    .map_err(rpc)?;
            }
            Ok::<_, ShimError>((plane, agent))
        };
        match up.await {
            Ok((plane, agent)) => {
                // Without it only port-forward is missing: the pod runs.
                let portfwd = net.as_ref().and_then(|n| {
                    crate::portfwd::PortForward::start(
                        &n.netns,
                        agent.clone(),
                        plane.clone(),
                        call_timeout,
                    )
                    .map_err(|e| log::warn!("container {id}: no port-forward: {e}"))
                    .ok()
                });
                log::info!(
                    "container {id}: VM up ({} ms after spawn, accel {}, {vcpus} vCPU, {memory_mib} MiB)",
                    vm.started_at().elapsed().as_millis(),
                    vm.accel()
                );
                Ok(VmPod {
                    vm,
                    owner: id.to_string(),
                    owner_pid: Default::default(),
                    shared,
                    net,
                    agent,
                    plane,
                    virtiofsd,
                    vfs_sock,
                    state_file,
                    call_timeout,
                    cgroup,
                    portfwd,
                })
            }
            Err(e) => {
                let _ = vm.kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), vm.wait()).await;
                kill_vfs();
                drop_net();
                let _ = std::fs::remove_file(&state_file);
                Err(e)
            }
        }
    }

    /// Powers the VM off (forced after a timeout) and stops virtiofsd.
    pub async fn teardown(&self) {
        if let Some(p) = &self.portfwd {
            p.stop();
        }
        if self.vm.try_wait().ok().flatten().is_none() {
            if let Err(e) = self.vm.shutdown(Duration::from_secs(10)).await {
                log::warn!("VM shutdown: {e}");
            }
        }
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(self.virtiofsd as i32, libc::SIGKILL) };
        let _ = std::fs::remove_file(&self.vfs_sock);
        let shared = self.shared.clone();
        let net = self.net.clone();
        let _ = tokio::task::spawn_blocking(move || {
            remove_share(&shared);
            if let Some(n) = net {
                crate::vmnet::teardown(&n.netns, &n.host_if);
            }
        })
        .await;
        let _ = std::fs::remove_dir_all(self.vm.work_dir());
        destroy_cgroup(self.cgroup.clone()).await;
        let _ = std::fs::remove_file(&self.state_file);
    }

    pub fn ctx(&self) -> ttrpc::context::Context {
        agent::ctx(self.call_timeout)
    }

    pub fn alive(&self) -> bool {
        matches!(self.vm.try_wait(), Ok(None))
    }

    /// Wires a process's stdio (FIFOs, `binary://`, `file://`, or a terminal) to fresh
    /// streams on the plane; subscribed before the process exists.
    pub async fn wire_stdio(
        &self,
        io: &IoPaths,
        ns: &str,
        id: &str,
    ) -> Result<(
        pa::StdioStreams,
        ProcIo,
        Option<tokio::sync::oneshot::Sender<()>>,
    )> {
        let mut s = pa::StdioStreams {
            terminal: io.terminal,
            ..Default::default()
        };
        let mut pio = ProcIo::default();
        if io.terminal {
            if !io.stdout.is_empty() {
                s.stdout = self.plane.alloc();
                let rx = self.plane.subscribe(s.stdout);
                let path = io.stdout.clone();
                pio.outs.push(tokio::spawn(async move {
                    let Ok(f) = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                    else {
                        return;
                    };
                    copy_out(rx, f.into()).await
                }));
            }
            if !io.stdin.is_empty() {
                s.stdin = self.plane.alloc();
                pio.pending_in = Some((Input::Fifo(io.stdin.clone()), s.stdin));
            }
            return Ok((s, pio, None));
        }
        let (io2, ns2, id2) = (io.clone(), ns.to_string(), id.to_string());
        let prepared = tokio::task::spawn_blocking(move || stdio::prepare(&io2, &ns2, &id2))
            .await
            .map_err(|e| ShimError::Internal(format!("blocking task: {e}")))??;
        let mut child = prepared.child.into_iter();
        let (Some(stdin_r), Some(out), Some(err)) = (child.next(), child.next(), child.next())
        else {
            return Err(ShimError::Internal("stdio: missing descriptors".into()));
        };
        let mut stdin_close = None;
        if let Some(w) = prepared.stdin_pipe {
            // containerd's FIFO -> pipe (CloseIO ends it) -> our reader -> frames.
            stdin_close = Some(stdio::copy_stdin(io.stdin.clone(), w));
            s.stdin = self.plane.alloc();
            pio.pending_in = Some((Input::Fd(stdin_r), s.stdin));
        }
        for (path, fd, slot) in [
            (&io.stdout, out, &mut s.stdout),
            (&io.stderr, err, &mut s.stderr),
        ] {
            if path.is_empty() {
                continue;
            }
            *slot = self.plane.alloc();
            let rx = self.plane.subscribe(*slot);
            pio.outs.push(tokio::spawn(copy_out(rx, fd)));
        }
        Ok((s, pio, stdin_close))
    }
}

/// `shim delete` after a crashed shim: kill the VM and virtiofsd it left (each only if its
/// command line still names what we recorded, so a recycled pid is left alone), remove their
/// sockets and work dir.
pub fn cleanup_leftovers(bundle: &Path) {
    let path = bundle.join(STATE_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if let Some(wd) = v["work_dir"].as_str() {
        if let Err(e) = runtime::vm::cleanup_work_dir(Path::new(wd)) {
            log::warn!("VM leftovers in {wd}: {e}");
        }
    }
    if let (Some(pid), Some(sock)) = (v["virtiofsd"].as_u64(), v["vfs_sock"].as_str()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.windows(sock.len()).any(|w| w == sock.as_bytes()) {
            // SAFETY: kill(2) on a pid whose command line we just checked.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(sock);
    }
    if let Some(shared) = v["shared"].as_str() {
        remove_share(Path::new(shared));
    }
    if let (Some(ns), Some(dev)) = (v["netns"].as_str(), v["host_if"].as_str()) {
        crate::vmnet::teardown(Path::new(ns), dev);
    }
    let _ = std::fs::remove_file(&path);
}

/// Removes a VM's cgroup (killing whatever is left in it) off the async threads.
pub async fn destroy_cgroup(cg: Option<Cgroup>) {
    let Some(cg) = cg else { return };
    let rel = cg.rel().to_string();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cg.destroy()).await {
        log::warn!("VM cgroup {rel}: {e}");
    }
}

/// `/run/janus/vm/<namespace>_<id>`, or a hash of the bundle path for names that are long
/// or unusual.
pub fn vm_work_dir(ns: &str, id: &str, bundle: &Path) -> PathBuf {
    let base = Path::new("/run/janus/vm");
    let name = format!("{ns}_{id}");
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if plain && !ns.is_empty() && !id.is_empty() && name.len() <= 48 && !name.starts_with('.') {
        base.join(name)
    } else {
        base.join(format!("{:016x}", hash(bundle)))
    }
}

fn hash(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.hash(&mut h);
    h.finish()
}

/// Frames of one stream -> a host descriptor (FIFO, pipe to a log driver, or a file, which
/// epoll cannot watch: then a plain thread writes it).
async fn copy_out(mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>, fd: OwnedFd) {
    let spare = fd.try_clone().ok();
    match aio::register(fd) {
        Ok(afd) => {
            while let Some(d) = rx.recv().await {
                if aio::write_all(&afd, &d).await.is_err() {
                    break;
                }
            }
        }
        Err(_) => {
            let Some(spare) = spare else { return };
            let _ = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut f = std::fs::File::from(spare);
                while let Some(d) = rx.blocking_recv() {
                    if f.write_all(&d).is_err() {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

/// A host descriptor (stdin pipe or terminal FIFO) -> frames; EOF becomes an EOF frame.
async fn copy_in(fd: OwnedFd, plane: StdioPlane, stream: u32) {
    if let Ok(afd) = aio::register(fd) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match aio::read(&afd, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if plane.write(stream, &buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = plane.close(stream).await;
}

/// A host path the guest sees through the pod's share: bind-mounted at
/// `<shared>/<container>/mounts/<name>` on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBind {
    pub source: PathBuf,
    pub name: String,
    pub readonly: bool,
}

/// Where one of a container's host binds appears in the guest.
fn guest_bind_path(id: &str, name: &str) -> String {
    format!("{GUEST_SHARED}/{id}/mounts/{name}")
}

/// The container's root in the guest (its snapshot, bind-mounted into the pod's share).
pub fn guest_root(id: &str) -> String {
    format!("{GUEST_SHARED}/{id}/rootfs")
}

/// The namespace file name under /proc/<pid>/ns for an OCI namespace type.
fn ns_file(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "network" => "net",
        "ipc" => "ipc",
        "uts" => "uts",
        "pid" => "pid",
        "mount" => "mnt",
        "cgroup" => "cgroup",
        "user" => "user",
        _ => return None,
    })
}

/// The pod a container joins in the guest: the sandbox container's guest pid and every pid
/// containerd knows for the pod's containers (containerd only ever saw guest pids, so
/// `/proc/<pid>/ns/...` paths naming them are guest paths already).
#[derive(Debug, Default, Clone)]
pub struct PodNs {
    pub sandbox_pid: Option<i32>,
    pub known_pids: Vec<i32>,
}

/// The host namespaces a spec asks to share (the OCI way: no entry of that type), among those
/// a VM cannot give it, named as Kubernetes users know them.
pub fn host_namespaces(spec: &Spec) -> Vec<&'static str> {
    use oci_spec::runtime::LinuxNamespaceType as T;
    let have: Vec<T> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
        .iter()
        .map(|n| n.typ())
        .collect();
    [
        (T::Network, "network (hostNetwork)"),
        (T::Ipc, "IPC (hostIPC)"),
        (T::Pid, "PID (hostPID)"),
    ]
    .into_iter()
    .filter(|(t, _)| !have.contains(t))
    .map(|(_, name)| name)
    .collect()
}

/// Refuses a container that asks for host namespaces a VM cannot share, unless the node config
/// allows giving it the guest's own instead (`vm.allow_host_namespaces`).
pub fn check_host_namespaces(id: &str, spec: &Spec, allow: bool) -> Result<()> {
    let host = host_namespaces(spec);
    if host.is_empty() {
        return Ok(());
    }
    let what = host.join(", ");
    if allow {
        log::warn!("container {id}: asks for the host's {what} namespace: gets the VM's own (vm.allow_host_namespaces)");
        return Ok(());
    }
    Err(ShimError::InvalidArgument(format!(
        "container {id} asks for the host's {what} namespace, which a VM cannot share: use \
         RuntimeClass janus (namespace mode) for such pods, or set vm.allow_host_namespaces = \
         true in the Janus config to give them the VM's own"
    )))
}

/// The spec as the guest runs it, and the host paths to share for it:
/// - root on the pod share (`/run/janus/shared/<id>/rootfs`);
/// - bind mounts of host paths go through the share; a bind on /dev/shm becomes the pod's
///   guest tmpfs (shared by the pod's containers, as CRI's shm bind is on the host); binds of
///   host /dev, /proc or /sys paths are dropped (the guest has its own);
/// - namespace paths join the pod's sandbox container in the guest; with no sandbox (the
///   sandbox itself, or a plain container) they are dropped and the guest makes new ones;
/// - hooks: only createContainer and startContainer stay (the guest runs them in the
///   container's namespaces, their paths looked up in the guest); the runtime-namespace phases
///   (prestart, createRuntime, poststart, poststop) run on the host (`service.rs`).
pub fn guest_spec(id: &str, spec: &Spec, pod: &PodNs) -> Result<(Vec<u8>, Vec<HostBind>)> {
    let mut v = serde_json::to_value(spec)
        .map_err(|e| ShimError::Internal(format!("spec to JSON: {e}")))?;
    v["root"]["path"] = serde_json::Value::String(guest_root(id));
    if let Some(h) = v.get_mut("hooks").and_then(|h| h.as_object_mut()) {
        h.retain(|phase, _| phase == "createContainer" || phase == "startContainer");
    }
    if let Some(ns) = v["linux"]["namespaces"].as_array_mut() {
        ns.retain_mut(|n| {
            let Some(path) = n["path"].as_str().filter(|p| !p.is_empty()) else {
                return true;
            };
            let typ = n["type"].as_str().unwrap_or_default();
            let named_pid = path
                .strip_prefix("/proc/")
                .and_then(|r| r.split('/').next())
                .and_then(|p| p.parse::<i32>().ok());
            if named_pid.is_some_and(|p| pod.known_pids.contains(&p)) {
                return true;
            }
            match (pod.sandbox_pid, ns_file(typ)) {
                (Some(sb), Some(f)) => {
                    n["path"] = serde_json::Value::String(format!("/proc/{sb}/ns/{f}"));
                    true
                }
                _ => {
                    log::info!("container {id}: {typ} namespace at host path {path}: the VM's own");
                    false
                }
            }
        });
    }
    let mut binds = Vec::new();
    if let Some(ms) = v["mounts"].as_array_mut() {
        let mut out = Vec::with_capacity(ms.len());
        for mut m in std::mem::take(ms) {
            let opts: Vec<String> = m["options"]
                .as_array()
                .map(|o| {
                    o.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let bind = m["type"].as_str() == Some("bind")
                || opts.iter().any(|x| x == "bind" || x == "rbind");
            if !bind {
                out.push(m);
                continue;
            }
            let dest = m["destination"].as_str().unwrap_or_default().to_string();
            let src = m["source"].as_str().unwrap_or_default().to_string();
            if dest == "/dev/shm" {
                m["source"] = serde_json::Value::String(GUEST_SHM.into());
                m["type"] = serde_json::Value::String("bind".into());
                m["options"] = serde_json::json!(["rbind", "nosuid", "nodev", "noexec"]);
                out.push(m);
                continue;
            }
            let host_kernel = ["/dev", "/proc", "/sys"]
                .iter()
                .any(|k| Path::new(&src).starts_with(k));
            if !src.starts_with('/') || host_kernel {
                log::warn!(
                    "container {id}: bind mount of host {src:?} on {dest} is not shared into the VM \
                     (the guest has its own /dev, /proc and /sys)"
                );
                continue;
            }
            if opts.iter().any(|o| o == "rshared" || o == "shared") {
                return Err(ShimError::InvalidArgument(format!(
                    "container {id}: bind mount of host {src:?} on {dest} asks for shared \
                     (Bidirectional) propagation: mounts made in a VM cannot reach the host \
                     through virtio-fs; use HostToContainer (rslave) propagation, or \
                     RuntimeClass janus (namespace mode)"
                )));
            }
            let base = Path::new(&src)
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            let name = format!("{}-{}", binds.len(), base);
            m["source"] = serde_json::Value::String(guest_bind_path(id, &name));
            binds.push(HostBind {
                source: PathBuf::from(&src),
                name,
                readonly: opts.iter().any(|o| o == "ro"),
            });
            out.push(m);
        }
        *ms = out;
    }
    let text =
        serde_json::to_vec(&v).map_err(|e| ShimError::Internal(format!("spec to JSON: {e}")))?;
    Ok((text, binds))
}

/// Makes a container's rootfs and host binds visible in the pod's share (blocking). Undone by
/// [`unshare_container`], also on failure here.
pub fn share_container(shared: &Path, id: &str, rootfs: &Path, binds: &[HostBind]) -> Result<()> {
    let res = (|| {
        let dir = shared.join(id);
        let root = dir.join("rootfs");
        mkdir(&root)?;
        bind(rootfs, &root, false)?;
        for b in binds {
            let meta = std::fs::metadata(&b.source).map_err(|e| {
                ShimError::InvalidArgument(format!(
                    "container {id}: bind mount source {}: {e}",
                    b.source.display()
                ))
            })?;
            let target = dir.join("mounts").join(&b.name);
            if meta.is_dir() {
                mkdir(&target)?;
            } else {
                mkdir(&dir.join("mounts"))?;
                std::fs::File::create(&target).map_err(|e| {
                    ShimError::Internal(format!("create {}: {e}", target.display()))
                })?;
            }
            bind(&b.source, &target, b.readonly)?;
        }
        Ok(())
    })();
    if res.is_err() {
        unshare_container(shared, id);
    }
    res
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p)
        .map_err(|e| ShimError::Internal(format!("create {}: {e}", p.display())))
}

/// A recursive bind, remounted read-only on the host too when asked (the guest's own ro bind
/// alone would leave the host file system writable to a guest that ignores it).
fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(src), dst, None::<&str>, flags, None::<&str>).map_err(|e| {
        ShimError::Internal(format!("bind {} on {}: {e}", src.display(), dst.display()))
    })?;
    if readonly {
        mount(
            None::<&str>,
            dst,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| ShimError::Internal(format!("remount {} ro: {e}", dst.display())))?;
    }
    Ok(())
}

/// Removes a container's part of the pod's share (blocking, idempotent).
pub fn unshare_container(shared: &Path, id: &str) {
    remove_share(&shared.join(id));
}

/// Unmounts everything under `dir`, then deletes it, but only once nothing is mounted there
/// any more: deleting through a live bind would delete the user's data.
fn remove_share(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Err(e) = runtime::linux::mounts::unmount_all(dir) {
        log::warn!("unmount {}: {e}", dir.display());
    }
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let busy = mi
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|m| Path::new(m).starts_with(dir));
    if busy {
        log::warn!("{} still has mounts: left in place", dir.display());
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// CRI's pod resource annotations (containerd >= 1.6 sets them from the pod's requests and
/// limits).
const ANN_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const ANN_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
const ANN_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The VM's size: the config's (or the defaults) for the guest kernel and agent, plus the
/// pod's CPU and memory limits from CRI's sandbox annotations when present, so the pod's
/// containers get what the pod asked for on top of the guest's own needs.
pub fn vm_size(
    base_vcpus: u32,
    base_mib: u32,
    annotations: &std::collections::HashMap<String, String>,
) -> (u32, u32) {
    let num = |k: &str| {
        annotations
            .get(k)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|v| *v > 0)
    };
    let mut vcpus = base_vcpus;
    if let (Some(q), Some(p)) = (num(ANN_CPU_QUOTA), num(ANN_CPU_PERIOD)) {
        let host = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let extra = ((q + p - 1) / p) as u32;
        vcpus = (base_vcpus + extra).min(host.max(base_vcpus));
    }
    let mut mib = base_mib;
    if let Some(m) = num(ANN_MEMORY) {
        mib = base_mib.saturating_add(((m + (1 << 20) - 1) >> 20) as u32);
    }
    (vcpus, mib)
}

/// Waits for a guest process's exit: its status from the agent, 137 when the VM is gone.
/// Output is drained (bounded) first so containerd has it all before TaskExit.
pub async fn wait_exit(
    pod: &VmPod,
    id: &str,
    exec_id: &str,
    outs: Vec<JoinHandle<()>>,
) -> (i32, bool) {
    let req = pa::ProcessRequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    let (code, oom) = match pod.agent.wait_process(agent::ctx(FOREVER), &req).await {
        Ok(w) => (w.exit_status as i32, w.oom_killed),
        Err(e) => {
            log::warn!("container {id} {exec_id}: wait: {e}; the VM is gone");
            (128 + libc::SIGKILL, false)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    for h in outs {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, h).await;
    }
    (code, oom)
}

pub fn creq(id: &str) -> pa::ContainerRequest {
    pa::ContainerRequest {
        container_id: id.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> Spec {
        let mut base = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        });
        for (k, x) in v.as_object().unwrap() {
            base[k] = x.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn host_namespaces_are_refused_unless_allowed() {
        let all = spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
        ]}}));
        assert!(host_namespaces(&all).is_empty());
        assert!(check_host_namespaces("c", &all, false).is_ok());
        let host = spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "mount"}
        ]}}));
        assert_eq!(
            host_namespaces(&host),
            vec!["network (hostNetwork)", "IPC (hostIPC)"]
        );
        let e = check_host_namespaces("c", &host, false).unwrap_err();
        assert!(matches!(e, ShimError::InvalidArgument(_)));
        let m = e.to_string();
        assert!(m.contains("network (hostNetwork), IPC (hostIPC)"), "{m}");
        assert!(
            m.contains("RuntimeClass janus") && m.contains("allow_host_namespaces"),
            "{m}"
        );
        assert!(check_host_namespaces("c", &host, true).is_ok());
        let nopid = spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "network"}, {"type": "ipc"}
        ]}}));
        assert!(check_host_namespaces("c", &nopid, false)
            .unwrap_err()
            .to_string()
            .contains("PID (hostPID)"));
    }

    #[test]
    fn bidirectional_binds_are_refused() {
        let s = spec(serde_json::json!({"mounts": [
            {"destination": "/vol", "type": "bind", "source": "/var/lib/x",
             "options": ["rbind", "rshared", "rw"]}
        ]}));
        let e = guest_spec("c", &s, &PodNs::default()).unwrap_err();
        assert!(matches!(e, ShimError::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("Bidirectional"), "{e}");
        let s = spec(serde_json::json!({"mounts": [
            {"destination": "/vol", "type": "bind", "source": "/var/lib/x",
             "options": ["rbind", "rslave", "rw"]}
        ]}));
        assert!(guest_spec("c", &s, &PodNs::default()).is_ok());
    }

    #[test]
    fn guest_spec_shares_binds_and_drops_host_things() {
        let s = spec(serde_json::json!({
            "hooks": {"prestart": [{"path": "/bin/true"}], "startContainer": [{"path": "/bin/true"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "source": "/srv", "options": ["rbind"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/ctd/sandboxes/p/shm", "options": ["rbind"]},
                {"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse", "options": ["bind"]},
                {"destination": "/run", "type": "tmpfs", "source": "tmpfs"}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}]}
        }));
        let (text, binds) = guest_spec("c", &s, &PodNs::default()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["root"]["path"], "/run/janus/shared/c/rootfs");
        // Runtime-namespace phases stay on the host; the container's go to the guest.
        assert_eq!(
            v["hooks"],
            serde_json::json!({"startContainer": [{"path": "/bin/true"}]})
        );
        let dests: Vec<_> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["destination"].as_str().unwrap(),
                    m["source"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            dests,
            [
                ("/proc", "proc"),
                ("/etc/hosts", "/run/janus/shared/c/mounts/0-hosts"),
                ("/data", "/run/janus/shared/c/mounts/1-srv"),
                ("/dev/shm", GUEST_SHM),
                ("/run", "tmpfs"),
            ]
        );
        assert_eq!(
            binds,
            [
                HostBind {
                    source: "/var/lib/x/hosts".into(),
                    name: "0-hosts".into(),
                    readonly: true
                },
                HostBind {
                    source: "/srv".into(),
                    name: "1-srv".into(),
                    readonly: false
                },
            ]
        );
        assert_eq!(
            v["linux"]["namespaces"],
            serde_json::json!([{"type": "pid"}])
        );
    }

    #[test]
    fn pod_members_join_the_sandbox_in_the_guest() {
        let s = spec(serde_json::json!({
            "linux": {"namespaces": [
                {"type": "pid", "path": "/proc/77/ns/pid"},
                {"type": "network", "path": "/proc/55/ns/net"},
                {"type": "ipc", "path": "/proc/55/ns/ipc"},
                {"type": "uts", "path": "/var/run/netns/x"},
                {"type": "mount"}
            ]}
        }));
        let pod = PodNs {
            sandbox_pid: Some(12),
            known_pids: vec![12, 77],
        };
        let (text, _) = guest_spec("c", &s, &pod).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(
            v["linux"]["namespaces"],
            serde_json::json!([
                {"type": "pid", "path": "/proc/77/ns/pid"},
                {"type": "network", "path": "/proc/12/ns/net"},
                {"type": "ipc", "path": "/proc/12/ns/ipc"},
                {"type": "uts", "path": "/proc/12/ns/uts"},
                {"type": "mount"}
            ])
        );
    }

    #[test]
    fn vm_size_adds_the_pods_resources() {
        let mut a = std::collections::HashMap::new();
        assert_eq!(vm_size(1, 256, &a), (1, 256));
        a.insert(ANN_MEMORY.to_string(), (100u64 << 20).to_string());
        a.insert(ANN_CPU_QUOTA.to_string(), "50000".to_string());
        a.insert(ANN_CPU_PERIOD.to_string(), "100000".to_string());
        assert_eq!(vm_size(1, 256, &a), (2.min(host_cpus().max(1)), 356));
        a.insert(ANN_MEMORY.to_string(), "junk".to_string());
        a.insert(ANN_CPU_QUOTA.to_string(), "-1".to_string());
        assert_eq!(vm_size(1, 256, &a), (1, 256));
    }

    fn host_cpus() -> u32 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    }
}
