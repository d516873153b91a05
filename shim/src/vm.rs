//! VM mode: a container in a lightweight VM of its own, driven through the in-guest agent.
//!
//! Create mounts containerd's snapshot on the host as namespace mode does, shares it into the
//! guest with virtiofsd (virtio-fs, no copy), boots QEMU (`runtime::vm`), waits for the agent
//! and asks it to create the container from a guest copy of the spec. Process stdio travels as
//! frames on the VM's stdio channel (`StdioPlane`) between containerd's FIFOs / log driver /
//! files and the guest process. Exits come from the agent's WaitProcess (or, when the VM dies,
//! as 137 for every process). The Task service keeps its process records (`Proc`) as in
//! namespace mode; this module holds what differs.
//!
//! Not yet: several containers per VM (CRI pods: every container gets its own VM and the
//! pause container's namespaces are not shared across them), host bind mounts (skipped with a
//! warning), hooks (host hooks cannot run in the guest; skipped with a warning), networking.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oci_spec::runtime::Spec;
use protocols::agent as pa;
use runtime::aio;
use runtime::vm::{agent, qemu::Qemu, AgentClient, Hypervisor, StdioPlane, Vm};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::error::{Result, ShimError};
use crate::stdio::{self, IoPaths};

/// Debian ships virtiofsd with QEMU.
pub const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
/// Where the agent mounts the container's rootfs share in the guest.
pub const GUEST_ROOT: &str = "/run/janus/rootfs";
const SHARE_TAG: &str = "rootfs";
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
        runtime::vm::Error::Agent(t) => rpc(t),
        _ => ShimError::Internal(e.to_string()),
    }
}

/// One VM and what serves it.
pub struct VmPod {
    pub vm: Arc<dyn Vm>,
    pub agent: AgentClient,
    pub plane: StdioPlane,
    virtiofsd: u32,
    vfs_sock: PathBuf,
    /// Records what to clean up if the shim dies (`shim delete` reads it).
    state_file: PathBuf,
    /// Every agent call ends by then (DeadlineExceeded), so a hung guest never hangs a call.
    call_timeout: Duration,
    pub paused: AtomicBool,
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
    /// Boots the VM for a container whose rootfs is mounted at `rootfs`.
    pub async fn boot(
        config: &Config,
        ns: &str,
        id: &str,
        bundle: &Path,
        rootfs: &Path,
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
        if let Some(h) = config.vm.hypervisor.as_deref() {
            if h != "qemu" {
                return Err(ShimError::InvalidArgument(format!(
                    "vm.hypervisor = {h:?}: only \"qemu\" is available in this build"
                )));
            }
        }
        if !Path::new(VIRTIOFSD).is_file() {
            return Err(ShimError::FailedPrecondition(format!(
                "virtiofsd not found at {VIRTIOFSD}: apt-get install qemu-system-x86 (Debian ships it with QEMU)"
            )));
        }
        cfg.vcpus = config.vm.vcpus.unwrap_or(1);
        cfg.memory_mib = config.vm.memory_mib.unwrap_or(256);
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
        let log = std::fs::File::create(bundle.join("virtiofsd.log"))
            .map_err(|e| ShimError::Internal(format!("virtiofsd log: {e}")))?;
        let child = std::process::Command::new(VIRTIOFSD)
            .arg(format!("--socket-path={}", vfs_sock.display()))
            .args([
                "-o",
                &format!("source={}", rootfs.display()),
                "-o",
                "cache=none",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| ShimError::FailedPrecondition(format!("start {VIRTIOFSD}: {e}")))?;
        let virtiofsd = child.id();
        // The shim's reaper collects it; the handle is not waited on here.
        drop(child);
        let kill_vfs = || {
            // SAFETY: kill(2) has no memory effects; the pid is our child until reaped.
            unsafe { libc::kill(virtiofsd as i32, libc::SIGKILL) };
            let _ = std::fs::remove_file(&vfs_sock);
        };
        let t = Instant::now();
        while !vfs_sock.exists() {
            if t.elapsed() > Duration::from_secs(10) {
                kill_vfs();
                return Err(ShimError::Internal(format!(
                    "virtiofsd did not create {} within 10 s (see {})",
                    vfs_sock.display(),
                    bundle.join("virtiofsd.log").display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cfg.extra_args = vec![
            // `ps` names the container on the QEMU command line.
            "-name".into(),
            id.to_string(),
            "-chardev".into(),
            format!("socket,id=vfs,path={}", vfs_sock.display()),
            "-device".into(),
            format!("vhost-user-fs-device,chardev=vfs,tag={SHARE_TAG}"),
        ];
        let vm: Arc<dyn Vm> = match Qemu::new().start(&cfg).await {
            Ok(v) => Arc::from(v),
            Err(e) => {
                kill_vfs();
                return Err(vm_err(e));
            }
        };
        let state_file = bundle.join(STATE_FILE);
        let record = serde_json::json!({
            "work_dir": vm.work_dir(),
            "vfs_sock": vfs_sock,
            "virtiofsd": virtiofsd,
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
                storages: vec![pa::Storage {
                    driver: "virtiofs".into(),
                    source: SHARE_TAG.into(),
                    mount_point: GUEST_ROOT.into(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            agent
                .create_sandbox(agent::ctx(call_timeout), &sb)
                .await
                .map_err(rpc)?;
            Ok::<_, ShimError>((plane, agent))
        };
        match up.await {
            Ok((plane, agent)) => {
                log::info!(
                    "container {id}: VM up ({} ms after spawn, accel {})",
                    vm.started_at().elapsed().as_millis(),
                    vm.accel()
                );
                Ok(VmPod {
                    vm,
                    agent,
                    plane,
                    virtiofsd,
                    vfs_sock,
                    state_file,
                    call_timeout,
                    paused: AtomicBool::new(false),
                })
            }
            Err(e) => {
                let _ = vm.kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), vm.wait()).await;
                kill_vfs();
                let _ = std::fs::remove_file(&state_file);
                Err(e)
            }
        }
    }

    /// Powers the VM off (forced after a timeout) and stops virtiofsd.
    pub async fn teardown(&self) {
        if self.vm.try_wait().ok().flatten().is_none() {
            if let Err(e) = self.vm.shutdown(Duration::from_secs(10)).await {
                log::warn!("VM shutdown: {e}");
            }
        }
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(self.virtiofsd as i32, libc::SIGKILL) };
        let _ = std::fs::remove_file(&self.vfs_sock);
        let _ = std::fs::remove_dir_all(self.vm.work_dir());
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
        if let Err(e) = runtime::vm::qemu::cleanup_work_dir(Path::new(wd)) {
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
    let _ = std::fs::remove_file(&path);
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

/// The spec as the guest runs it: root on the share, no host namespace paths, no host bind
/// mounts, no hooks (each dropped with a warning).
pub fn guest_spec(id: &str, spec: &Spec) -> Result<Vec<u8>> {
    let mut v = serde_json::to_value(spec)
        .map_err(|e| ShimError::Internal(format!("spec to JSON: {e}")))?;
    v["root"]["path"] = serde_json::Value::String(GUEST_ROOT.into());
    if let Some(o) = v.as_object_mut() {
        if o.remove("hooks").is_some() {
            log::warn!("container {id}: OCI hooks are not run in VM mode");
        }
    }
    if let Some(ns) = v["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| {
            let joined = n["path"].as_str().is_some_and(|p| !p.is_empty());
            if joined {
                log::warn!(
                    "container {id}: namespace {} at a host path is not joined in the VM",
                    n["type"]
                );
            }
            !joined
        });
    }
    if let Some(ms) = v["mounts"].as_array_mut() {
        ms.retain(|m| {
            let bind = m["type"].as_str() == Some("bind")
                || m["options"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
            if bind {
                log::warn!(
                    "container {id}: bind mount of host {} on {} is not shared into the VM yet",
                    m["source"],
                    m["destination"]
                );
            }
            !bind
        });
    }
    serde_json::to_vec(&v).map_err(|e| ShimError::Internal(format!("spec to JSON: {e}")))
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

pub fn set_paused(pod: &VmPod, p: bool) {
    pod.paused.store(p, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_spec_rewrites_root_and_drops_host_things() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "hooks": {"prestart": [{"path": "/bin/true"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]},
                {"destination": "/data", "source": "/srv", "options": ["rbind", "ro"]}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}]}
        }))
        .unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&guest_spec("c", &spec).unwrap()).unwrap();
        assert_eq!(v["root"]["path"], GUEST_ROOT);
        assert!(v.get("hooks").is_none());
        assert_eq!(v["mounts"].as_array().unwrap().len(), 1);
        assert_eq!(
            v["linux"]["namespaces"],
            serde_json::json!([{"type": "pid"}])
        );
    }
}
