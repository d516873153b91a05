//! One VM and what serves it: virtiofsd on the pod's share, the pod's network mirrored to a
//! tap, the VMM (`runtime::vm`), the agent. A pod's sandbox container boots it, the pod's
//! other containers run in it; a plain container has one of its own.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use protocols::agent as pa;
use runtime::linux::cgroups::Cgroup;
use runtime::vm::virtiofsd::{self, VirtiofsdConfig};
use runtime::vm::{agent, AgentClient, FsShare, StdioPlane, Vm, VmConfig};

use super::net::{self, PodNet};
use super::portfwd::PortForward;
use super::share::{mkdir, remove_share};
use super::spec::{vm_size, GUEST_SHARED, GUEST_SHM};
use crate::config::Config;
use crate::error::{Result, ShimError};

const SHARE_TAG: &str = "janus-share";
/// How long one agent call may take unless `vm.agent_timeout_ms` says otherwise.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// ttrpc's deadline on a call, after ours.
const CTX_MARGIN: Duration = Duration::from_secs(1);
/// Name of the leftovers record in the bundle.
const STATE_FILE: &str = "janus-vm.json";

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

/// virtiofsd serving the pod's share; the shim's reaper collects it.
struct Virtiofsd {
    pid: u32,
    /// Its pidfd, opened before the reaper can collect it: [`watch_virtiofsd`] takes it.
    pidfd: std::sync::Mutex<Option<OwnedFd>>,
    /// Set before the shim stops it itself (its exit is then no failure).
    stopping: Arc<std::sync::atomic::AtomicBool>,
    sock: PathBuf,
    shared: PathBuf,
}

/// A pidfd for `pid` (pidfd_open(2)).
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open with a pid and no flags; a non-negative result is a new descriptor
    // that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// virtiofsd serves the guest's root file system: when it dies while the VM runs, the guest
/// cannot go on (every file access fails or hangs). The VM is then killed, so its containers'
/// processes end (137, TaskExit) instead of running on without their files.
fn watch_virtiofsd(
    pidfd: OwnedFd,
    pid: u32,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    vm: std::sync::Weak<dyn Vm>,
    id: String,
) {
    tokio::spawn(async move {
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open and unchanged until the
        // AsyncFd is dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        };
        let fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!(
                    "container {id}: cannot watch virtiofsd {pid}: {}",
                    e.into_parts().1
                );
                return;
            }
        };
        // A pidfd becomes readable when its process exits.
        let _ = fd.readable().await;
        if stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Some(vm) = vm.upgrade() else { return };
        if vm.try_wait().ok().flatten().is_some() {
            return;
        }
        log::error!(
            "container {id}: virtiofsd (pid {pid}) exited while the VM runs: the guest lost its \
             file system; stopping the VM"
        );
        if let Err(e) = vm.kill() {
            log::warn!("container {id}: kill VM: {e}");
        }
    });
}

impl Virtiofsd {
    /// Starts it (`runtime::vm::virtiofsd`, as the tests do) on a fresh, empty `shared`
    /// directory next to the VM's work dir, in the pod's cgroup.
    async fn start(
        work_dir: &Path,
        bundle: &Path,
        cgroup: Option<&Cgroup>,
        binary: Option<&Path>,
    ) -> Result<Virtiofsd> {
        virtiofsd::find(binary).map_err(vm_err)?;
        // Next to the work dir, which the VMM driver owns (and recreates).
        let sock = work_dir.with_extension("vfs.sock");
        let _ = std::fs::remove_file(&sock);
        let shared = work_dir.with_extension("shared");
        remove_share(&shared);
        mkdir(&shared)?;
        let mut cfg = VirtiofsdConfig::new(&shared, &sock, bundle.join("virtiofsd.log"));
        cfg.cgroup = cgroup.cloned();
        cfg.binary = binary.map(Path::to_path_buf);
        match runtime::vm::virtiofsd::Virtiofsd::start(&cfg).await {
            // The shim's reaper collects it.
            Ok(v) => {
                // (A virtiofsd that died already is a failed start: dropping `v` reaps it.)
                let pidfd = match pidfd_open(v.pid()) {
                    Ok(fd) => fd,
                    Err(e) => {
                        drop(v);
                        remove_share(&shared);
                        return Err(ShimError::failed("virtiofsd exited at start", e));
                    }
                };
                Ok(Virtiofsd {
                    pid: v.detach(),
                    pidfd: std::sync::Mutex::new(Some(pidfd)),
                    stopping: Arc::default(),
                    sock,
                    shared,
                })
            }
            Err(e) => {
                remove_share(&shared);
                Err(vm_err(e))
            }
        }
    }

    fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let _ = std::fs::remove_file(&self.sock);
        remove_share(&self.shared);
    }
}

pub struct VmPod {
    pub vm: Arc<dyn Vm>,
    /// The container whose Create booted the VM; its Delete ends the VM.
    pub owner: String,
    /// Host directory virtiofsd shares (`<work dir>.shared`): `<container>/rootfs` and
    /// `<container>/mounts/*` are bind mounts of the container's snapshot and host binds.
    pub shared: PathBuf,
    pub agent: AgentClient,
    pub plane: StdioPlane,
    /// The pod's network as the guest got it (tap + redirects in the pod's namespace).
    net: Option<PodNet>,
    virtiofsd: Virtiofsd,
    /// Records what to clean up if the shim dies (`shim delete` reads it).
    state_file: PathBuf,
    /// Every agent call ends by then (DeadlineExceeded), so a hung guest never hangs a call.
    call_timeout: Duration,
    /// The host cgroup the VMM and virtiofsd run in (the booting container's): the VM is
    /// charged to the pod. Removed with the VM.
    cgroup: Option<Cgroup>,
    /// CRI port-forward from the pod's namespace on the host to the guest's loopback.
    portfwd: Option<PortForward>,
}

/// What the boot of one VM is given.
pub struct BootRequest<'a> {
    pub config: &'a Config,
    pub namespace: &'a str,
    pub id: &'a str,
    pub bundle: &'a Path,
    pub annotations: &'a std::collections::HashMap<String, String>,
    pub netns: Option<PathBuf>,
    pub cgroup: Option<Cgroup>,
}

/// The VM's config from the Janus config: guest assets (checked), size, timeouts.
fn vm_config(
    config: &Config,
    annotations: &std::collections::HashMap<String, String>,
) -> Result<VmConfig> {
    let mut cfg = match (&config.vm.kernel, &config.vm.initrd) {
        (Some(k), Some(i)) => VmConfig::new(k, i),
        _ => VmConfig::from_guest_dir(&runtime::vm::default_guest_dir()).map_err(vm_err)?,
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
                "{what} not found at {}: {}",
                p.display(),
                runtime::vm::GUEST_HINT
            )));
        }
    }
    let (vcpus, memory_mib) = vm_size(
        config.vm.vcpus.unwrap_or(1),
        config.vm.memory_mib.unwrap_or(256),
        annotations,
    );
    cfg.vcpus = vcpus;
    cfg.memory_mib = memory_mib;
    cfg.tcg_tb_mib = config.vm.tcg_tb_mib;
    cfg.kernel_params = config.vm.kernel_params.clone();
    cfg.shared_memory = true;
    // `vm.qemu` names QEMU only: the builtin driver finds janus-vmm next to the shim.
    if config
        .vm
        .hypervisor
        .as_deref()
        .unwrap_or(runtime::vm::DEFAULT_DRIVER)
        == "qemu"
    {
        cfg.vmm_binary = config.vm.qemu.clone();
    }
    Ok(cfg)
}

/// Where the console logs of VMs that did not come up are kept, the newest
/// [`KEPT_CONSOLE_LOGS`] of them.
pub const FAILED_BOOT_LOGS: &str = "/var/log/janus/failed-boots";
const KEPT_CONSOLE_LOGS: usize = 16;

/// Copies a failed VM's console log to [`FAILED_BOOT_LOGS`] (oldest beyond the limit removed).
fn keep_console_log(log: &Path, id: &str) -> Option<PathBuf> {
    let dir = Path::new(FAILED_BOOT_LOGS);
    std::fs::create_dir_all(dir).ok()?;
    let to = dir.join(format!("{id}.console.log"));
    std::fs::copy(log, &to)
        .map_err(|e| log::warn!("container {id}: keep console log {}: {e}", log.display()))
        .ok()?;
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    logs.sort();
    let excess = logs.len().saturating_sub(KEPT_CONSOLE_LOGS);
    for (_, old) in logs.into_iter().take(excess) {
        let _ = std::fs::remove_file(old);
    }
    Some(to)
}

/// What a boot has made so far, undone if a later step fails.
struct Parts {
    virtiofsd: Virtiofsd,
    net: Option<PodNet>,
    state_file: PathBuf,
}

impl Parts {
    fn undo(&self) {
        self.virtiofsd.stop();
        if let Some(n) = &self.net {
            net::teardown(&n.netns, &n.host_if);
        }
        let _ = std::fs::remove_file(&self.state_file);
    }

    /// The leftovers record `shim delete` reads after a crash: without it a crashed shim
    /// would leak the VM, so failing to write it fails the boot.
    fn record(&self, vm: &dyn Vm) -> Result<()> {
        let record = serde_json::json!({
            "work_dir": vm.work_dir(),
            "vfs_sock": self.virtiofsd.sock,
            "virtiofsd": self.virtiofsd.pid,
            "shared": self.virtiofsd.shared,
            "netns": self.net.as_ref().map(|n| n.netns.clone()),
            "host_if": self.net.as_ref().map(|n| n.host_if.clone()),
        });
        std::fs::write(&self.state_file, record.to_string())
            .map_err(|e| ShimError::failed(format!("write {}", self.state_file.display()), e))
    }
}

/// The agent's side of a new VM: the stdio plane, the sandbox's storages (the share and the
/// pod's /dev/shm), the pod's interface and routes.
async fn agent_up(
    vm: &dyn Vm,
    id: &str,
    net: Option<&PodNet>,
    timeout: Duration,
    boot_timeout: Option<Duration>,
) -> Result<(StdioPlane, AgentClient)> {
    let stream = vm
        .take_stdio_stream()
        .ok_or_else(|| ShimError::Internal("VM has no stdio channel".into()))?;
    let plane = StdioPlane::new(stream);
    vm.connect_agent(boot_timeout).await.map_err(vm_err)?;
    let agent = vm
        .agent()
        .ok_or_else(|| ShimError::Internal("agent client missing".into()))?;
    let storage = |driver: &str, source: &str, mount_point: &str, options: &[&str]| pa::Storage {
        driver: driver.into(),
        source: source.into(),
        mount_point: mount_point.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    };
    let sb = pa::CreateSandboxRequest {
        sandbox_id: id.to_string(),
        storages: vec![
            storage("virtiofs", SHARE_TAG, GUEST_SHARED, &[]),
            // Kubernetes' default /dev/shm size.
            storage("tmpfs", "shm", GUEST_SHM, &["mode=1777", "size=65536k"]),
        ],
        ..Default::default()
    };
    let ctx = || agent::ctx(timeout);
    agent.create_sandbox(ctx(), &sb).await.map_err(rpc)?;
    if let Some(n) = net {
        agent.update_interface(ctx(), &n.iface).await.map_err(rpc)?;
        let routes = pa::Routes {
            routes: n.routes.clone(),
            ..Default::default()
        };
        agent.add_routes(ctx(), &routes).await.map_err(rpc)?;
    }
    Ok((plane, agent))
}

impl VmPod {
    /// Boots the VM for container `r.id` (a pod's sandbox or a plain container), in named
    /// steps: config, share (virtiofsd), network, hypervisor, leftovers record, agent. What a
    /// failed step leaves is undone (the cgroup is the caller's).
    pub async fn boot(r: BootRequest<'_>) -> Result<VmPod> {
        let mut cfg = vm_config(r.config, r.annotations)?;
        // "builtin" without vmx/svm is refused here (FailedPrecondition) instead of hanging
        // in a boot that cannot finish.
        let name = r.config.vm.hypervisor.as_deref();
        let hypervisor =
            runtime::vm::driver(name.unwrap_or(runtime::vm::DEFAULT_DRIVER)).map_err(vm_err)?;
        let call_timeout = r
            .config
            .vm
            .agent_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(CALL_TIMEOUT);
        // The VM's own directory (sockets, logs, pidfile) is named after the container when
        // the name fits: unix socket paths are limited to 108 bytes, so not in the bundle.
        let work_dir = vm_work_dir(r.namespace, r.id, r.bundle);
        let parent = work_dir.parent().unwrap_or(Path::new("/run/janus"));
        std::fs::create_dir_all(parent)
            .map_err(|e| ShimError::failed(format!("{}", parent.display()), e))?;
        cfg.work_dir = Some(work_dir.clone());
        let mut parts = Parts {
            virtiofsd: Virtiofsd::start(
                &work_dir,
                r.bundle,
                r.cgroup.as_ref(),
                r.config.vm.virtiofsd.as_deref(),
            )
            .await?,
            net: None,
            state_file: r.bundle.join(STATE_FILE),
        };
        if let Some(ns) = r.netns {
            match super::blocking(move || net::setup(&ns)).await {
                Ok(n) => parts.net = n,
                Err(e) => {
                    parts.undo();
                    return Err(e);
                }
            }
        }
        // `ps` names the container on the VMM's command line.
        cfg.name = Some(r.id.to_string());
        cfg.fs = Some(FsShare {
            tag: SHARE_TAG.into(),
            socket: parts.virtiofsd.sock.clone(),
        });
        if let Some(n) = &parts.net {
            cfg.netns = Some(n.netns.clone());
            cfg.net.push(n.device());
        }
        cfg.cgroup = r.cgroup.clone();
        let vm: Arc<dyn Vm> = match hypervisor.start(&cfg).await {
            Ok(v) => Arc::from(v),
            Err(e) => {
                parts.undo();
                return Err(vm_err(e));
            }
        };
        let up = async {
            parts.record(&*vm)?;
            let boot = r.config.vm.boot_timeout_ms.map(Duration::from_millis);
            agent_up(&*vm, r.id, parts.net.as_ref(), call_timeout, boot).await
        };
        let (plane, agent) = match up.await {
            Ok(v) => v,
            Err(e) => {
                // The work directory goes with the VM: keep what its console said.
                let e = match keep_console_log(vm.console_log(), r.id) {
                    Some(p) => e.with_note(&format!("(guest console log: {})", p.display())),
                    None => e,
                };
                let _ = vm.kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), vm.wait()).await;
                parts.undo();
                return Err(e);
            }
        };
        // Without it only port-forward is missing: the pod runs.
        let portfwd = parts.net.as_ref().and_then(|n| {
            PortForward::start(&n.netns, agent.clone(), plane.clone(), call_timeout)
                .map_err(|e| log::warn!("container {}: no port-forward: {e}", r.id))
                .ok()
        });
        log::info!(
            "container {}: VM up ({} ms after spawn, accel {}, {} vCPU, {} MiB)",
            r.id,
            vm.started_at().elapsed().as_millis(),
            vm.accel(),
            cfg.vcpus,
            cfg.memory_mib
        );
        let pidfd = parts
            .virtiofsd
            .pidfd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(fd) = pidfd {
            watch_virtiofsd(
                fd,
                parts.virtiofsd.pid,
                parts.virtiofsd.stopping.clone(),
                Arc::downgrade(&vm),
                r.id.to_string(),
            );
        }
        Ok(VmPod {
            vm,
            owner: r.id.to_string(),
            shared: parts.virtiofsd.shared.clone(),
            agent,
            plane,
            net: parts.net,
            virtiofsd: parts.virtiofsd,
            state_file: parts.state_file,
            call_timeout,
            cgroup: r.cgroup,
            portfwd,
        })
    }

    /// Powers the VM off (forced after a timeout), stops virtiofsd, removes the share, the
    /// network redirects, the work dir, the cgroup and the leftovers record.
    pub async fn teardown(&self) {
        if let Some(p) = &self.portfwd {
            p.stop();
        }
        if self.vm.try_wait().ok().flatten().is_none() {
            if let Err(e) = self.vm.shutdown(Duration::from_secs(10)).await {
                log::warn!("VM shutdown: {e}");
            }
        }
        self.virtiofsd
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = kill(Pid::from_raw(self.virtiofsd.pid as i32), Signal::SIGKILL);
        let _ = std::fs::remove_file(&self.virtiofsd.sock);
        let shared = self.shared.clone();
        let pod_net = self.net.clone();
        let _ = super::blocking(move || {
            remove_share(&shared);
            if let Some(n) = pod_net {
                net::teardown(&n.netns, &n.host_if);
            }
            Ok(())
        })
        .await;
        let _ = std::fs::remove_dir_all(self.vm.work_dir());
        destroy_cgroup(self.cgroup.clone()).await;
        let _ = std::fs::remove_file(&self.state_file);
    }

    /// The context of an agent call: ttrpc's own deadline is only a backstop behind
    /// [`VmPod::call`]'s.
    pub fn ctx(&self) -> ttrpc::context::Context {
        agent::ctx(self.call_timeout + CTX_MARGIN)
    }

    /// One agent call, bounded by `vm.agent_timeout_ms`: a guest that does not answer is
    /// DeadlineExceeded, so a hung guest never hangs containerd.
    pub async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.call_timeout, fut).await {
            Ok(r) => r.map_err(rpc),
            Err(_) => Err(ShimError::DeadlineExceeded(format!(
                "agent {what}: no answer within {} ms",
                self.call_timeout.as_millis()
            ))),
        }
    }

    pub fn alive(&self) -> bool {
        matches!(self.vm.try_wait(), Ok(None))
    }
}

/// The host cgroup for a VM: the booting container's `cgroupsPath` (for a CRI pod, the sandbox
/// container's, under kubelet's pod cgroup), created here. Its limits stay the pod's (kubelet
/// sizes the pod cgroup with the RuntimeClass overhead); this only makes the VM count there.
/// `shim delete` removes it after a crash like any container cgroup. Where systemd runs the
/// host and the path has its form, this is the sandbox's scope, which starts with virtiofsd.
pub fn vm_cgroup(spec: &oci_spec::runtime::Spec, id: &str) -> Result<Cgroup> {
    let cg = runtime::linux::cgroups::spec_cgroup(spec, id)?;
    cg.create()?;
    Ok(cg)
}

/// Removes a VM's cgroup (killing whatever is left in it) off the async threads.
pub async fn destroy_cgroup(cg: Option<Cgroup>) {
    let Some(cg) = cg else { return };
    let rel = cg.rel().to_string();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cg.destroy()).await {
        log::warn!("VM cgroup {rel}: {e}");
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
        // virtiofsd inherits its socket (no path in its arguments): it names its share.
        let source = format!("source={}", v["shared"].as_str().unwrap_or(sock));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|a| a == source.as_bytes()) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = std::fs::remove_file(sock);
    }
    if let Some(shared) = v["shared"].as_str() {
        remove_share(Path::new(shared));
    }
    if let (Some(ns), Some(dev)) = (v["netns"].as_str(), v["host_if"].as_str()) {
        net::teardown(Path::new(ns), dev);
    }
    let _ = std::fs::remove_file(&path);
}

/// `/run/janus/vm/<namespace>_<id>`, or a hash of the bundle path for names that are long
/// or unusual.
pub fn vm_work_dir(ns: &str, id: &str, bundle: &Path) -> PathBuf {
    let base = Path::new(runtime::vm::RUN_DIR);
    let name = format!("{ns}_{id}");
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if plain && !ns.is_empty() && !id.is_empty() && name.len() <= 48 && !name.starts_with('.') {
        base.join(name)
    } else {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bundle.hash(&mut h);
        base.join(format!("{:016x}", h.finish()))
    }
}
