//! A VM run by a VMM process, whichever driver started it: QEMU or janus-vmm. Both give the
//! guest the same channels (console ports `janus.agent` and `janus.stdio` on unix sockets in
//! the work directory, ttyS0 into `console.log`), so everything after the spawn is shared:
//! connecting the host ends, waiting for the agent, shutdown, exit through the pidfd, the
//! work directory going with the VM. The drivers only choose the binary and its arguments.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use protocols::agent::Empty;
use protocols::AgentClient;
use tokio::net::UnixStream;

use super::accel::AccelChoice;
use super::error::IoContext;
use super::process::Process;
use super::qmp::Qmp;
use super::workdir::{prepare_work_dir, VmmFiles, WorkDir};
use super::{
    agent, tail_lines, Accel, AgentConnection, Error, Result, Vm, VmConfig, VmExit, GUEST_HINT,
};
use crate::linux::cgroups::Cgroup;

/// How long a VMM may take to create its sockets after spawn.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// A VM run by a VMM process (QEMU, or janus-vmm for the builtin driver): its work directory,
/// the host ends of the guest channels, the agent client, and QEMU's QMP connection when the
/// VMM is QEMU.
pub struct ProcessVm {
    /// Who runs it, for messages ("QEMU", "janus-vmm").
    vmm: &'static str,
    proc: Arc<Process>,
    accel: AccelChoice,
    wd: WorkDir,
    started: Instant,
    keep_dir: bool,
    agent_stream: Mutex<Option<UnixStream>>,
    stdio_stream: Mutex<Option<UnixStream>>,
    agent: Mutex<Option<AgentClient>>,
    qmp: tokio::sync::Mutex<Option<Qmp>>,
    removed: AtomicBool,
}

impl std::fmt::Debug for ProcessVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessVm")
            .field("vmm", &self.vmm)
            .field("pid", &self.proc.pid())
            .field("accel", &self.accel)
            .field("work_dir", &self.wd.dir)
            .finish()
    }
}

/// Checks what every driver needs before spawning: kernel, initramfs, sizes.
pub(super) fn check_config(cfg: &VmConfig) -> Result<()> {
    for (what, p) in [
        ("guest kernel", &cfg.kernel),
        ("guest initramfs", &cfg.initrd),
    ] {
        if !p.is_file() {
            return Err(Error::MissingAsset {
                what: what.into(),
                path: p.clone(),
                hint: GUEST_HINT.into(),
            });
        }
    }
    if cfg.vcpus == 0 || cfg.vcpus > 255 {
        return Err(Error::Config(format!("vcpus = {} (1..=255)", cfg.vcpus)));
    }
    if cfg.memory_mib < 64 {
        return Err(Error::Config(format!(
            "memory = {} MiB (at least 64)",
            cfg.memory_mib
        )));
    }
    Ok(())
}

/// The kernel command line for `accel`: `console=ttyS0 panic=-1 quiet cgroup_no_v1=all`, under
/// TCG `tsc_early_khz=<tsc_khz> tsc=reliable mitigations=off`, then `extra`.
pub(super) fn kernel_cmdline(accel: Accel, tsc_khz: Option<u64>, extra: &[String]) -> String {
    let mut p: Vec<String> = ["console=ttyS0", "panic=-1", "quiet", "cgroup_no_v1=all"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if accel != Accel::Kvm {
        if let Some(khz) = tsc_khz {
            p.push(format!("tsc_early_khz={khz}"));
        }
        p.push("tsc=reliable".into());
        // The guest's CPU vulnerability mitigations guard against speculation in the CPU it
        // runs on; under TCG guest code is translated and guest page tables are walked in
        // software, so they would cost time (PTI's page-table switches flush QEMU's TLB on
        // every syscall) and protect nothing. With KVM the kernel decides, as on a host.
        p.push("mitigations=off".into());
    }
    p.extend(extra.iter().cloned());
    p.join(" ")
}

/// Keeps a process spawned into `cg` there: a systemd scope starts with it (its
/// [`Cgroup::place_child`] had no directory to write into); on cgroupfs it is there already.
/// The D-Bus calls run off the async threads.
pub(crate) async fn enter_cgroup(cg: &Cgroup, pid: u32) -> Result<()> {
    if cg.unit().is_none() {
        return Ok(());
    }
    let cg = cg.clone();
    tokio::task::spawn_blocking(move || cg.enter(pid as i32, None))
        .await
        .map_err(|e| Error::io("cgroup task", std::io::Error::other(e)))?
        .map_err(Error::Cgroup)
}

/// Spawns the VMM with its output into the work directory's log, in `cfg.netns` if set.
fn spawn_vmm(binary: &Path, args: &[String], wd: &WorkDir, cfg: &VmConfig) -> Result<Process> {
    let log_file =
        fs::File::create(&wd.vmm_log).ctx(|| format!("create {}", wd.vmm_log.display()))?;
    let log_err = log_file.try_clone().ctx(|| "dup vmm log")?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .current_dir(&wd.dir);
    if let Some(ns) = &cfg.netns {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let f = fs::File::open(ns).ctx(|| format!("open network namespace {}", ns.display()))?;
        // SAFETY: setns(2) is async-signal-safe; `f` outlives the spawn (the closure owns
        // it) and is CLOEXEC, so the VMM does not inherit it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if let Some(cg) = &cfg.cgroup {
        cg.place_child(&mut cmd).map_err(Error::Cgroup)?;
    }
    log::debug!("vm: {} {}", binary.display(), args.join(" "));
    Process::spawn(&mut cmd).ctx(|| format!("spawn {}", binary.display()))
}

/// Connects the host ends of the agent and stdio ports (plus whatever `more` does) while
/// watching the VMM: its exit, or nothing within [`SOCKET_WAIT`], is a boot error.
async fn connect_channels<T>(
    vmm: &str,
    proc: &Process,
    wd: &WorkDir,
    more: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<(UnixStream, UnixStream, T)> {
    let connect = async {
        let mut last = String::new();
        let a = agent::connect_socket(&wd.agent_sock, &mut last).await;
        let s = agent::connect_socket(&wd.stdio_sock, &mut last).await;
        more.await.map(|m| (a, s, m))
    };
    tokio::select! {
        r = tokio::time::timeout(SOCKET_WAIT, connect) => match r {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => {
                // The handshake broke: most likely the VMM is exiting. Prefer its status.
                let exit = tokio::time::timeout(Duration::from_secs(2), proc.wait()).await;
                let why = match exit {
                    Ok(Ok(exit)) => format!("{vmm} exited at start ({exit})"),
                    _ => format!("{vmm} handshake failed: {e}"),
                };
                Err(boot_error(wd, why))
            }
            Err(_) => Err(boot_error(
                wd,
                format!("{vmm} did not come up within {SOCKET_WAIT:?}"),
            )),
        },
        exit = proc.wait() => {
            let exit = exit.ctx(|| format!("wait for {vmm}"))?;
            Err(boot_error(wd, format!("{vmm} exited at start ({exit})")))
        }
    }
}

/// What a driver decided about its VMM; [`ProcessVm::launch`] does the rest.
pub(super) struct Launch<'a> {
    /// Who runs it, for messages ("QEMU", "janus-vmm").
    pub vmm: &'static str,
    pub binary: &'a Path,
    pub accel: AccelChoice,
    /// The names of the VMM's log and pidfile in the work directory.
    pub files: VmmFiles,
    /// The VMM serves QMP on the work directory's `qmp.sock` (QEMU): a `qmp_capabilities`
    /// handshake completes the start. QEMU answers it from its main loop, i.e. once every
    /// device was created (a bad `-device` makes QEMU exit after the chardev sockets already
    /// exist). Without it, the channel sockets are the sign: janus-vmm binds them during
    /// setup, before its first KVM_RUN, after refusing any bad option.
    pub qmp: bool,
}

impl ProcessVm {
    /// Makes the work directory, spawns the VMM with the arguments `args` gives for it, and
    /// connects the host ends of the guest channels right away (the guest sees POLLHUP on a
    /// port without one). On error the VMM is killed and the directory removed.
    pub(super) async fn launch(
        cfg: &VmConfig,
        l: Launch<'_>,
        args: impl FnOnce(&WorkDir) -> Vec<String>,
    ) -> Result<ProcessVm> {
        let (wd, mut dir_guard) = prepare_work_dir(cfg, l.files)?;
        let args = args(&wd);
        let started = Instant::now();
        let proc = spawn_vmm(l.binary, &args, &wd, cfg)?;
        if let Some(cg) = &cfg.cgroup {
            // (On error `proc` is dropped, which kills the VMM.)
            enter_cgroup(cg, proc.pid()).await?;
        }
        log::info!(
            "vm: {} pid {} accel={} ({}), {} vCPU, {} MiB, kernel {}, work dir {}",
            l.vmm,
            proc.pid(),
            l.accel.accel,
            l.accel.reason,
            cfg.vcpus,
            cfg.memory_mib,
            cfg.kernel.display(),
            wd.dir.display()
        );
        let qmp = async {
            if !l.qmp {
                return Ok(None);
            }
            let mut last = String::new();
            let mut qmp = Qmp::new(agent::connect_socket(&wd.qmp_sock, &mut last).await);
            qmp.execute("qmp_capabilities", None)
                .await
                .map(|_| Some(qmp))
        };
        // On error, dropping `proc` kills the VMM; the guard removes the directory.
        let (agent_stream, stdio_stream, qmp) = connect_channels(l.vmm, &proc, &wd, qmp).await?;
        log::debug!(
            "vm: {} {} channels connected after {} ms",
            l.vmm,
            proc.pid(),
            started.elapsed().as_millis()
        );
        dir_guard.disarm();
        Ok(ProcessVm {
            vmm: l.vmm,
            proc: Arc::new(proc),
            accel: l.accel,
            wd,
            started,
            keep_dir: cfg.keep_work_dir,
            agent_stream: Mutex::new(Some(agent_stream)),
            stdio_stream: Mutex::new(Some(stdio_stream)),
            agent: Mutex::new(None),
            qmp: tokio::sync::Mutex::new(qmp),
            removed: AtomicBool::new(false),
        })
    }

    /// Runs a QMP command (`query-status`, `system_powerdown`, `device_add`...) and returns
    /// its `return` value. Only QEMU has a QMP monitor: for janus-vmm this is a NotConnected
    /// error.
    pub async fn qmp(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut q = self.qmp.lock().await;
        let Some(conn) = q.as_mut() else {
            return Err(Error::io("qmp", std::io::ErrorKind::NotConnected.into()));
        };
        let r = tokio::select! {
            r = conn.execute(command, arguments) => r,
            e = self.proc.wait() => Err(std::io::Error::other(format!(
                "{} exited ({})",
                self.vmm,
                e.map(|e| e.to_string()).unwrap_or_else(|e| e.to_string())
            ))),
        };
        if r.is_err() {
            *q = None;
        }
        r.map_err(|e| Error::io(format!("qmp {command}"), e))
    }

    /// Why this accelerator was chosen.
    pub fn accel_choice(&self) -> &AccelChoice {
        &self.accel
    }

    /// The VMM's own output (QEMU's or janus-vmm's stderr).
    pub fn vmm_log(&self) -> &Path {
        &self.wd.vmm_log
    }

    fn remove_dir(&self) {
        if self.keep_dir || self.removed.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.wd.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("vm: remove {}: {e}", self.wd.dir.display());
            }
        }
    }

    fn died_error(&self, exit: std::io::Result<VmExit>) -> Error {
        let what = match exit {
            Ok(e) => e.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        boot_error(
            &self.wd,
            format!("{} exited before the agent was ready ({what})", self.vmm),
        )
    }
}

fn boot_error(wd: &WorkDir, reason: String) -> Error {
    Error::Boot {
        reason,
        console_tail: tail_lines(&wd.console_log, 40),
        vmm_log: tail_lines(&wd.vmm_log, 20),
    }
}

#[async_trait]
impl Vm for ProcessVm {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn accel(&self) -> Accel {
        self.accel.accel
    }

    fn started_at(&self) -> Instant {
        self.started
    }

    fn work_dir(&self) -> &Path {
        &self.wd.dir
    }

    fn agent_socket(&self) -> &Path {
        &self.wd.agent_sock
    }

    fn stdio_socket(&self) -> &Path {
        &self.wd.stdio_sock
    }

    fn console_log(&self) -> &Path {
        &self.wd.console_log
    }

    async fn connect_agent(&self, timeout: Option<Duration>) -> Result<AgentConnection> {
        let timeout = timeout.unwrap_or_else(|| self.default_agent_timeout());
        let stream = self
            .agent_stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let proc = self.proc.clone();
        let died = async move { self.died_error(proc.wait().await) };
        // Time the VMM waited for a CPU does not count (a busy host, many VMs booting).
        let pid = self.pid();
        let conn = agent::connect_with(
            &self.wd.agent_sock,
            stream,
            Some(&self.wd.console_log),
            timeout,
            died,
            move || agent::run_delay(pid),
        )
        .await?;
        log::info!(
            "vm: {} {} agent ready {} ms after spawn",
            self.vmm,
            self.pid(),
            self.started.elapsed().as_millis()
        );
        *self.agent.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.client.clone());
        Ok(conn)
    }

    fn agent(&self) -> Option<AgentClient> {
        self.agent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn take_agent_stream(&self) -> Option<UnixStream> {
        self.agent_stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn take_stdio_stream(&self) -> Option<UnixStream> {
        self.stdio_stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    async fn shutdown(&self, timeout: Duration) -> Result<VmExit> {
        let deadline = tokio::time::Instant::now() + timeout;
        if self
            .proc
            .try_wait()
            .ctx(|| format!("wait for {}", self.vmm))?
            .is_none()
        {
            match self.agent() {
                Some(client) => {
                    let empty = Empty::new();
                    // The agent may power off before its answer gets out: an error here is
                    // not a failure, the exit is what counts.
                    let rpc = timeout.min(Duration::from_secs(5));
                    tokio::select! {
                        r = client.shutdown(agent::ctx(rpc), &empty) => {
                            if let Err(e) = r {
                                log::debug!("vm: agent Shutdown: {e}");
                            }
                        }
                        _ = self.proc.wait() => {}
                        _ = tokio::time::sleep(rpc) => {
                            log::warn!("vm: agent Shutdown got no answer in {rpc:?}");
                        }
                    }
                }
                None => {
                    log::debug!(
                        "vm: no agent connected: SIGTERM to {} {}",
                        self.vmm,
                        self.pid()
                    );
                    self.proc
                        .signal(libc::SIGTERM)
                        .ctx(|| format!("signal {}", self.vmm))?;
                }
            }
            if tokio::time::timeout_at(deadline, self.proc.wait())
                .await
                .is_err()
            {
                log::warn!(
                    "vm: {} {} still running {timeout:?} after shutdown: SIGKILL",
                    self.vmm,
                    self.pid()
                );
                self.proc
                    .signal(libc::SIGKILL)
                    .ctx(|| format!("kill {}", self.vmm))?;
            }
        }
        let exit = match tokio::time::timeout(Duration::from_secs(10), self.proc.wait()).await {
            Ok(r) => r.ctx(|| format!("wait for {}", self.vmm))?,
            Err(_) => {
                return Err(Error::io(
                    format!("{} {} did not exit after SIGKILL", self.vmm, self.pid()),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ))
            }
        };
        log::info!("vm: {} {} ended: {exit}", self.vmm, self.pid());
        self.agent.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.remove_dir();
        Ok(exit)
    }

    fn kill(&self) -> Result<()> {
        self.proc
            .signal(libc::SIGKILL)
            .ctx(|| format!("kill {}", self.vmm))
    }

    async fn wait(&self) -> Result<VmExit> {
        self.proc
            .wait()
            .await
            .ctx(|| format!("wait for {}", self.vmm))
    }

    fn try_wait(&self) -> Result<Option<VmExit>> {
        self.proc
            .try_wait()
            .ctx(|| format!("wait for {}", self.vmm))
    }
}

impl Drop for ProcessVm {
    fn drop(&mut self) {
        // Close our channel ends first, then make sure the VMM is gone (Process::drop SIGKILLs
        // and reaps it if we hold the last reference), then remove the directory.
        self.agent_stream.get_mut().map(|s| s.take()).ok();
        self.stdio_stream.get_mut().map(|s| s.take()).ok();
        self.agent.get_mut().map(|s| s.take()).ok();
        if !matches!(self.proc.try_wait(), Ok(Some(_))) {
            let _ = self.proc.signal(libc::SIGKILL);
            let _ = self.proc.wait_blocking(Duration::from_secs(5));
        }
        self.remove_dir();
    }
}
