//! The QEMU driver against real QEMU and the real guest kernel (TCG on this machine).
//!
//! Guest assets come from `hack/build-guest.sh` (env `JANUS_GUEST_DIR`, default
//! `<workspace>/target/guest`); missing assets fail the tests with a message naming the script.
//! - `testinit_*`: boot `initramfs-testinit.cpio` (the C test init: loads the modules, lists
//!   the virtio ports, writes a hello line into `janus.agent`, powers off). No agent needed.
//! - `agent_*`: boot `initramfs.cpio`, which must hold the vm-agent as /init
//!   (`JANUS_GUEST_INIT=<vm-agent> hack/build-guest.sh`).
//!
//! Boots are serialized (2 host CPUs; parallel TCG boots only make every boot slower).
#![cfg(feature = "vm")]
// The guard serializes boots across test threads (each test has its own runtime); holding it
// across awaits is the point.
#![allow(clippy::await_holding_lock)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocols::agent::Empty;
use runtime::vm::qemu::Qemu;
use runtime::vm::{agent, Accel, Error, Hypervisor, Vm, VmConfig};
use tokio::io::AsyncReadExt;

static BOOT: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    BOOT.lock().unwrap_or_else(|e| e.into_inner())
}

fn guest_dir() -> PathBuf {
    match std::env::var_os("JANUS_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"),
    }
}

fn need(p: PathBuf, what: &str) -> PathBuf {
    assert!(
        p.is_file(),
        "{what} {} is missing: run hack/build-guest.sh (JANUS_GUEST_DIR={})",
        p.display(),
        guest_dir().display()
    );
    p
}

/// Config booting the test init.
fn testinit_config() -> VmConfig {
    let dir = guest_dir();
    let kernel = runtime::vm::find_kernel(&dir).unwrap_or_else(|e| panic!("{e}"));
    VmConfig::new(
        kernel,
        need(dir.join("initramfs-testinit.cpio"), "test init initramfs"),
    )
}

/// Config booting the agent initramfs; fails unless `initramfs.cpio` holds the agent.
fn agent_config() -> VmConfig {
    let dir = guest_dir();
    let kernel = runtime::vm::find_kernel(&dir).unwrap_or_else(|e| panic!("{e}"));
    let initrd = need(dir.join("initramfs.cpio"), "agent initramfs");
    let testinit = dir.join("initramfs-testinit.cpio");
    if testinit.is_file() {
        let a = std::fs::read(&initrd).unwrap();
        let b = std::fs::read(&testinit).unwrap();
        assert!(
            a != b,
            "{} is a copy of the test init, not the vm-agent: build it with \
             JANUS_GUEST_INIT=<path to the static vm-agent> hack/build-guest.sh",
            initrd.display()
        );
    }
    VmConfig::new(kernel, initrd)
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

async fn start(cfg: &VmConfig) -> Arc<dyn Vm> {
    let vm = Qemu::new()
        .start(cfg)
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    Arc::from(vm)
}

#[tokio::test]
async fn testinit_boots_and_powers_off() {
    let _g = serial();
    let qvm = Qemu::new().start_vm(&testinit_config()).await.unwrap();
    // QMP works, and QEMU wrote its pidfile.
    let status = qvm.qmp("query-status", None).await.unwrap();
    assert_eq!(status["status"], "running", "{status}");
    let pidfile = std::fs::read_to_string(qvm.work_dir().join("qemu.pid")).unwrap();
    assert_eq!(pidfile.trim(), qvm.pid().to_string());
    let vm: Arc<dyn Vm> = Arc::new(qvm);
    let (pid, dir) = (vm.pid(), vm.work_dir().to_path_buf());
    assert!(dir.is_dir());
    assert!(vm.agent_socket().starts_with(&dir) && vm.console_log().starts_with(&dir));
    if runtime::vm::hardware_virtualization().is_none() {
        assert_eq!(vm.accel(), Accel::Tcg, "no vmx/svm: TCG");
    }

    // The host end of janus.agent was connected during start, so the guest did not see
    // POLLHUP and wrote its hello line.
    let mut s = vm.take_agent_stream().expect("agent stream");
    assert!(vm.take_agent_stream().is_none());
    assert!(vm.take_stdio_stream().is_some());
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 256];
        while !got.ends_with(b"\n") {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(90), read)
        .await
        .expect("no hello from the guest within 90 s");
    let hello_ms = vm.started_at().elapsed().as_millis();
    assert_eq!(String::from_utf8_lossy(&got), "hello from janus testinit\n");

    let exit = tokio::time::timeout(Duration::from_secs(60), vm.wait())
        .await
        .expect("guest did not power off")
        .unwrap();
    let exit_ms = vm.started_at().elapsed().as_millis();
    assert!(exit.success(), "qemu: {exit}");
    assert!(vm.try_wait().unwrap() == Some(exit));

    let console = std::fs::read_to_string(vm.console_log())
        .unwrap()
        .replace('\r', "");
    let line = console
        .lines()
        .find(|l| l.starts_with("JANUS-TESTINIT: kernel="))
        .unwrap_or_else(|| panic!("no testinit line in console:\n{console}"));
    let mods = line.split("modules=").nth(1).unwrap();
    let (loaded, listed) = mods.split_once('/').unwrap();
    assert_eq!(loaded, listed, "{line}");
    assert!(
        console.contains("JANUS-TESTINIT: clocksource=tsc"),
        "{console}"
    );
    assert!(console.contains("name=janus.agent"), "{console}");
    assert!(console.contains("name=janus.stdio"), "{console}");
    assert!(console.contains("wrote 26 bytes to"), "{console}");
    assert!(console.contains("reboot: Power down"), "{console}");
    eprintln!(
        "vm_qemu: testinit: hello on janus.agent {hello_ms} ms after spawn, qemu exit {exit_ms} ms"
    );

    drop(s);
    drop(vm);
    assert!(gone(pid));
    assert!(!dir.exists(), "work dir {} left behind", dir.display());
}

/// QEMU exits (the test init powers off) while we wait for an agent that never comes: the
/// wait ends right away with the console tail, instead of running into its timeout.
#[tokio::test]
async fn testinit_dead_vm_ends_agent_wait() {
    let _g = serial();
    let vm = start(&testinit_config()).await;
    let t = Instant::now();
    let e = vm
        .connect_agent(Some(Duration::from_secs(300)))
        .await
        .expect_err("the test init is no agent");
    let waited = t.elapsed();
    let exit = vm.try_wait().unwrap().expect("qemu has exited");
    assert!(exit.success());
    assert!(matches!(e, Error::Boot { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("QEMU exited before the agent was ready"),
        "{msg}"
    );
    assert!(
        msg.contains("JANUS-TESTINIT: done"),
        "console tail missing: {msg}"
    );
    assert!(waited < Duration::from_secs(120), "{waited:?}");
    eprintln!("vm_qemu: dead VM ended the agent wait after {waited:?}");
}

/// QEMU SIGKILLed from outside while the guest boots: connect_agent and wait() return promptly.
#[tokio::test]
async fn testinit_sigkill_during_boot() {
    let _g = serial();
    let vm = start(&testinit_config()).await;
    let (pid, dir) = (vm.pid(), vm.work_dir().to_path_buf());
    let waiter = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.connect_agent(None).await })
    };
    // Mid-boot: the guest kernel has started printing, the agent cannot be up yet.
    let t = Instant::now();
    while std::fs::metadata(vm.console_log()).map_or(0, |m| m.len()) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the guest never printed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SAFETY: kill(2) on the QEMU we started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("connect_agent hung after SIGKILL")
        .unwrap();
    assert!(matches!(r, Err(Error::Boot { .. })), "{r:?}");
    let exit = tokio::time::timeout(Duration::from_secs(5), vm.wait())
        .await
        .expect("wait hung")
        .unwrap();
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit}");
    assert!(!exit.forced, "killed from outside");
    eprintln!("vm_qemu: SIGKILL seen after {:?}", t.elapsed());
    drop(vm);
    assert!(gone(pid));
    assert!(!dir.exists());
}

/// kill(), shutdown without an agent (SIGTERM), and a VM with shared (memfd) guest RAM.
#[tokio::test]
async fn testinit_kill_shutdown_shared_memory() {
    let _g = serial();
    let vm = start(&testinit_config()).await;
    let (pid, dir) = (vm.pid(), vm.work_dir().to_path_buf());
    vm.kill().unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), vm.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(exit.forced);
    vm.kill().unwrap(); // no-op once exited
    drop(vm);
    assert!(gone(pid) && !dir.exists());

    let vm = start(&testinit_config()).await;
    let (pid, dir) = (vm.pid(), vm.work_dir().to_path_buf());
    let exit = vm.shutdown(Duration::from_secs(10)).await.unwrap();
    assert!(gone(pid));
    assert!(!dir.exists(), "shutdown removes the work dir");
    assert!(!exit.forced, "{exit}");

    let mut cfg = testinit_config();
    cfg.shared_memory = true;
    cfg.memory_mib = 192;
    let wd = std::env::temp_dir().join(format!("janus-vm-test-{}", std::process::id()));
    cfg.work_dir = Some(wd.clone());
    let vm = start(&cfg).await;
    assert_eq!(vm.work_dir(), wd);
    let exit = tokio::time::timeout(Duration::from_secs(90), vm.wait())
        .await
        .expect("shared-memory guest did not power off")
        .unwrap();
    let console = vm.console_tail(100);
    assert!(exit.success(), "{exit}\n{console}");
    assert!(console.contains("JANUS-TESTINIT: done"), "{console}");
    drop(vm);
    assert!(!wd.exists());
}

#[tokio::test]
async fn missing_assets_say_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    let cfg = VmConfig::new(d.path().join("vmlinux"), d.path().join("initramfs.cpio"));
    let e = Qemu::new().start(&cfg).await.unwrap_err();
    assert!(matches!(e, Error::MissingAsset { .. }), "{e}");
    assert!(e.to_string().contains("hack/build-guest.sh"), "{e}");

    let mut cfg = testinit_config();
    cfg.vmm_binary = Some(d.path().join("qemu-system-x86_64"));
    let e = Qemu::new().start(&cfg).await.unwrap_err();
    assert!(
        e.to_string().contains("apt-get install qemu-system-x86"),
        "{e}"
    );

    // Socket paths longer than sun_path are refused up front.
    let mut cfg = testinit_config();
    cfg.work_dir = Some(d.path().join("x".repeat(120)));
    let e = Qemu::new().start(&cfg).await.unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");

    // QEMU refusing its arguments is a Boot error quoting QEMU.
    let mut cfg = testinit_config();
    cfg.extra_args = vec!["-device".into(), "no-such-device".into()];
    let e = Qemu::new().start(&cfg).await.unwrap_err();
    assert!(matches!(e, Error::Boot { .. }), "{e}");
    assert!(e.to_string().contains("no-such-device"), "{e}");
}

/// Boot to agent-ready, Health, GuestDetails, Shutdown: QEMU and the work dir are gone.
#[tokio::test]
async fn agent_boot_health_details_shutdown() {
    let _g = serial();
    let dir = guest_dir();
    let cfg = agent_config();
    let vm = start(&cfg).await;
    let (pid, wd) = (vm.pid(), vm.work_dir().to_path_buf());
    let conn = vm
        .connect_agent(None)
        .await
        .unwrap_or_else(|e| panic!("agent not ready: {e}"));
    let spawn_to_ready = vm.started_at().elapsed();
    eprintln!(
        "vm_qemu: agent ready: {} ms after spawn ({} ms in connect_agent, {} Health attempts), \
         accel {}, agent {}",
        spawn_to_ready.as_millis(),
        conn.ready_after.as_millis(),
        conn.attempts,
        vm.accel(),
        conn.health.version
    );
    let c = vm.agent().expect("client kept");
    let h = c
        .health(agent::ctx(Duration::from_secs(10)), &Empty::new())
        .await
        .unwrap();
    assert!(!h.version.is_empty());
    let d = c
        .guest_details(agent::ctx(Duration::from_secs(10)), &Empty::new())
        .await
        .unwrap();
    let release = std::fs::read_to_string(dir.join("kernel.release")).unwrap_or_default();
    if !release.trim().is_empty() {
        assert_eq!(d.kernel_release, release.trim());
    }
    assert_eq!(d.cgroup_mode, "v2");
    assert_eq!(d.cpus, cfg.vcpus);
    let mem_kb = u64::from(cfg.memory_mib) * 1024;
    assert!(
        d.memory_total_kb > mem_kb / 2 && d.memory_total_kb <= mem_kb,
        "{d:?}"
    );
    eprintln!("vm_qemu: guest details: {d:?}");

    let t = Instant::now();
    let exit = vm.shutdown(Duration::from_secs(30)).await.unwrap();
    eprintln!("vm_qemu: shutdown took {:?}: {exit}", t.elapsed());
    assert!(
        exit.success() && !exit.forced,
        "agent Shutdown should power off: {exit}"
    );
    assert!(gone(pid), "qemu {pid} still there");
    assert!(!wd.exists(), "work dir left behind");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.health(agent::ctx(Duration::from_secs(30)), &Empty::new()),
    )
    .await
    .expect("agent call after shutdown hung");
    assert!(r.is_err());
}

/// QEMU killed with SIGKILL under a connected agent: wait() returns promptly, calls in flight
/// and new calls fail promptly.
#[tokio::test]
async fn agent_qemu_sigkill_no_hang() {
    let _g = serial();
    let vm = start(&agent_config()).await;
    let (pid, wd) = (vm.pid(), vm.work_dir().to_path_buf());
    let conn = vm
        .connect_agent(None)
        .await
        .unwrap_or_else(|e| panic!("agent not ready: {e}"));
    eprintln!(
        "vm_qemu: agent ready {} ms after spawn",
        vm.started_at().elapsed().as_millis()
    );
    let c = conn.client.clone();
    // A call that blocks in the agent until there is an OOM kill. Polled once, it is queued
    // on the connection ahead of the Health call below; Health's answer then shows the agent
    // has read it (one connection carries both, in order).
    let mut in_flight = Box::pin(async move {
        c.get_oom_event(agent::ctx(Duration::from_secs(600)), &Empty::new())
            .await
    });
    tokio::select! {
        biased;
        r = &mut in_flight => panic!("GetOOMEvent returned without an OOM kill: {r:?}"),
        _ = std::future::ready(()) => {}
    }
    let in_flight = tokio::spawn(in_flight);
    conn.client
        .health(agent::ctx(Duration::from_secs(60)), &Empty::new())
        .await
        .expect("Health");
    // SAFETY: kill(2) on the QEMU we started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let t = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(5), vm.wait())
        .await
        .expect("wait() hung after SIGKILL")
        .unwrap();
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    let r = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("in-flight agent call hung after SIGKILL")
        .unwrap();
    // The connection's end, not an answer from the agent.
    assert!(
        matches!(
            r,
            Err(ttrpc::Error::RemoteClosed | ttrpc::Error::LocalClosed | ttrpc::Error::Socket(_))
        ),
        "{r:?}"
    );
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        conn.client
            .health(agent::ctx(Duration::from_secs(60)), &Empty::new()),
    )
    .await
    .expect("new agent call hung after SIGKILL");
    assert!(r.is_err());
    eprintln!(
        "vm_qemu: after SIGKILL everything returned within {:?}",
        t.elapsed()
    );
    drop(vm);
    assert!(gone(pid));
    assert!(!wd.exists());
}
