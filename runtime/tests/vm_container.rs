//! Containers in a VM (real QEMU, real kernel, real agent): the host's busybox rootfs shared
//! by virtiofsd (virtio-fs, no copy) as the sandbox's storage, containers created by the
//! in-guest agent with runtime::linux, stdio as frames on the stdio port (`StdioPlane`).
//!
//! Each test boots its own VM; boots are serialised (one at a time on a 2-core host).
#![cfg(feature = "vm")]
// One boot at a time; the guard is held across awaits on purpose.
#![allow(clippy::await_holding_lock)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocols::agent::*;
use runtime::vm::virtiofsd::{Virtiofsd, VirtiofsdConfig};
use runtime::vm::{
    agent, qemu::Qemu, Accel, AgentClient, FsShare, Hypervisor, StdioPlane, Vm, VmConfig,
};
use serde_json::json;
use tokio::sync::mpsc::Receiver;

static BOOT: Mutex<()> = Mutex::new(());

const SHARED: &str = "/run/janus/shared";
const ROOT: &str = "/run/janus/shared/rootfs";

fn guest_dir() -> PathBuf {
    match std::env::var_os("JANUS_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"),
    }
}

fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in [
        "sh", "echo", "cat", "uname", "ls", "sleep", "stty", "tty", "kill", "dd", "hostname", "ip",
    ] {
        std::fs::hard_link(root.join("bin/busybox"), root.join("bin").join(a)).unwrap();
    }
    root
}

/// virtiofsd on `source`, as the shim starts it.
async fn virtiofsd(sock: &Path, source: &Path, log: &Path) -> Virtiofsd {
    Virtiofsd::start(&VirtiofsdConfig::new(source, sock, log))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn ctx() -> ttrpc::context::Context {
    agent::ctx(Duration::from_secs(60))
}

/// The gRPC code of a failed call (panics on success: the call should have failed).
fn code<T: std::fmt::Debug>(what: &str, r: ttrpc::Result<T>) -> ttrpc::Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("{what}: expected an error status, got {other:?}"),
    }
}

/// A busybox container spec rooted in the sandbox share; `f` adjusts it.
fn spec(id: &str, args: &[&str], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v = json!({
        "ociVersion": "1.0.2",
        "process": {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0},
                    "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}},
        "root": {"path": ROOT},
        "hostname": "in-vm",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "cgroupsPath": format!("/janus/{id}"),
            "resources": {"memory": {"limit": 67108864}}
        }
    });
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

fn process_json(args: &[&str], terminal: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "args": args, "cwd": "/", "env": ["PATH=/bin"], "terminal": terminal,
        "user": {"uid": 0, "gid": 0}
    }))
    .unwrap()
}

/// A process's streams as the host sees them.
#[derive(Default)]
struct Streams {
    stdio: StdioStreams,
    out: Option<Receiver<Vec<u8>>>,
    err: Option<Receiver<Vec<u8>>>,
}

async fn collect(rx: Option<Receiver<Vec<u8>>>) -> String {
    let Some(mut rx) = rx else {
        return String::new();
    };
    let mut v = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(d) = rx.recv().await {
            v.extend_from_slice(&d);
        }
    })
    .await;
    assert!(r.is_ok(), "stream did not end within 60 s: {v:?}");
    String::from_utf8_lossy(&v).to_string()
}

struct Guest {
    vm: Arc<dyn Vm>,
    c: AgentClient,
    plane: StdioPlane,
    rootfs: PathBuf,
    vfs: Option<Virtiofsd>,
    vfs_log: PathBuf,
    _tmp: tempfile::TempDir,
    _g: MutexGuard<'static, ()>,
}

impl Guest {
    async fn boot() -> Guest {
        Guest::boot_with(|_| {}).await
    }

    /// Boots with `tweak` applied to the VM's config (extra QEMU arguments, kernel parameters).
    async fn boot_with(tweak: impl FnOnce(&mut VmConfig)) -> Guest {
        let g = BOOT.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = busybox_rootfs(tmp.path());
        let vfs_sock = tmp.path().join("vfs.sock");
        let vfs_log = tmp.path().join("virtiofsd.log");
        // The share is the directory holding rootfs/, as a pod's share holds its containers'.
        let vfs = virtiofsd(&vfs_sock, tmp.path(), &vfs_log).await;
        let mut cfg = VmConfig::from_guest_dir(&guest_dir())
            .unwrap_or_else(|e| panic!("{e} (run hack/build-guest.sh)"));
        cfg.shared_memory = true;
        cfg.fs = Some(FsShare {
            tag: "share".into(),
            socket: vfs_sock.clone(),
        });
        tweak(&mut cfg);
        let vm: Arc<dyn Vm> = Arc::from(
            Qemu::new()
                .start(&cfg)
                .await
                .unwrap_or_else(|e| panic!("start: {e}")),
        );
        let plane = StdioPlane::new(vm.take_stdio_stream().expect("stdio stream"));
        vm.connect_agent(None)
            .await
            .unwrap_or_else(|e| panic!("agent: {e}"));
        let c = vm.agent().unwrap();
        let guest = Guest {
            vm,
            c,
            plane,
            rootfs,
            vfs: Some(vfs),
            vfs_log,
            _tmp: tmp,
            _g: g,
        };
        let sb = CreateSandboxRequest {
            sandbox_id: "sb".into(),
            hostname: "sandbox".into(),
            storages: vec![Storage {
                driver: "virtiofs".into(),
                source: "share".into(),
                mount_point: SHARED.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        guest
            .c
            .create_sandbox(ctx(), &sb)
            .await
            .unwrap_or_else(|e| panic!("CreateSandbox: {e}\n{}", guest.diag()));
        guest
    }

    fn diag(&self) -> String {
        format!(
            "--- console ---\n{}\n--- virtiofsd ---\n{}",
            self.vm.console_tail(30),
            std::fs::read_to_string(&self.vfs_log).unwrap_or_default()
        )
    }

    /// Stream ids for the process, subscribed before it exists.
    fn streams(&self, stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> Streams {
        let mut s = Streams::default();
        s.stdio.terminal = terminal;
        if stdin {
            s.stdio.stdin = self.plane.alloc();
        }
        if stdout {
            s.stdio.stdout = self.plane.alloc();
            s.out = Some(self.plane.subscribe(s.stdio.stdout));
        }
        if stderr && !terminal {
            s.stdio.stderr = self.plane.alloc();
            s.err = Some(self.plane.subscribe(s.stdio.stderr));
        }
        s
    }

    async fn create(&self, id: &str, spec: Vec<u8>, s: &Streams) -> u32 {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec: spec,
            stdio: protobuf::MessageField::some(s.stdio.clone()),
            ..Default::default()
        };
        self.c
            .create_container(ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {id}: {e}\n{}", self.diag()))
            .pid
    }

    async fn start(&self, id: &str) -> u32 {
        self.c
            .start_process(ctx(), &preq(id, ""))
            .await
            .unwrap_or_else(|e| panic!("StartProcess {id}: {e}\n{}", self.diag()))
            .pid
    }

    async fn wait(&self, id: &str, exec_id: &str) -> WaitResponse {
        tokio::time::timeout(
            Duration::from_secs(90),
            self.c
                .wait_process(agent::ctx(Duration::from_secs(90)), &preq(id, exec_id)),
        )
        .await
        .unwrap_or_else(|_| panic!("WaitProcess {id}/{exec_id} hung\n{}", self.diag()))
        .unwrap_or_else(|e| panic!("WaitProcess {id}/{exec_id}: {e}"))
    }

    async fn exec(&self, id: &str, exec_id: &str, process: Vec<u8>, s: &Streams) -> u32 {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process,
            stdio: protobuf::MessageField::some(s.stdio.clone()),
            ..Default::default()
        };
        self.c
            .exec_process(ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("ExecProcess {id}/{exec_id}: {e}\n{}", self.diag()))
            .pid
    }

    async fn remove(&self, id: &str) {
        self.c
            .remove_container(ctx(), &creq(id))
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e}"));
    }

    async fn signal(&self, id: &str, exec_id: &str, sig: i32, all: bool) -> ttrpc::Result<Empty> {
        let req = SignalRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: sig as u32,
            all,
            ..Default::default()
        };
        self.c.signal_process(ctx(), &req).await
    }

    async fn stats(&self, id: &str) -> CgroupStats {
        self.c
            .stats(ctx(), &creq(id))
            .await
            .unwrap_or_else(|e| panic!("Stats {id}: {e}"))
            .stats
            .unwrap_or_default()
    }

    /// Shutdown: QEMU, its work dir and virtiofsd (which ends with its VM) are all gone.
    async fn shutdown(mut self) {
        self.c
            .destroy_sandbox(ctx(), &Empty::new())
            .await
            .expect("DestroySandbox");
        let (pid, wd) = (self.vm.pid(), self.vm.work_dir().to_path_buf());
        let exit = self.vm.shutdown(Duration::from_secs(30)).await.unwrap();
        assert!(exit.success() && !exit.forced, "{exit}");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "qemu left");
        assert!(!wd.exists(), "work dir left behind");
        let mut vfs = self.vfs.take().unwrap();
        let t = Instant::now();
        loop {
            if vfs.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "virtiofsd still running 10 s after its VM ended"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn preq(id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

fn creq(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

/// stdout, stderr, exit code, stdin (with EOF), a terminal with a resize; then shutdown
/// leaves no qemu, virtiofsd, socket or temp dir behind.
#[tokio::test]
async fn vm_container_stdio_stdin_tty_shutdown() {
    let g = Guest::boot().await;

    // Output on both streams and the exit code.
    let s = g.streams(false, true, true, false);
    let t = Instant::now();
    let pid = g
        .create(
            "c1",
            spec(
                "c1",
                &[
                    "sh",
                    "-c",
                    "echo hello-from-vm; uname -r; hostname; echo oops >&2; exit 3",
                ],
                |_| {},
            ),
            &s,
        )
        .await;
    assert!(pid > 0);
    g.start("c1").await;
    let (out, err) = tokio::join!(collect(s.out), collect(s.err));
    let w = g.wait("c1", "").await;
    eprintln!("vm_container: create+start+run+wait in {:?}", t.elapsed());
    let release = std::fs::read_to_string(guest_dir().join("kernel.release")).unwrap_or_default();
    assert!(out.starts_with("hello-from-vm\n"), "{out}");
    assert!(
        out.contains(release.trim()),
        "guest kernel release in {out:?}"
    );
    assert!(out.contains("in-vm"), "{out}");
    assert_eq!(err, "oops\n");
    assert_eq!(w.exit_status, 3);
    g.remove("c1").await;

    // stdin: data then EOF through the plane.
    let s = g.streams(true, true, false, false);
    g.create("c2", spec("c2", &["cat"], |_| {}), &s).await;
    g.start("c2").await;
    g.plane.write(s.stdio.stdin, b"line1\n").await.unwrap();
    g.plane.write(s.stdio.stdin, b"line2\n").await.unwrap();
    g.plane.close(s.stdio.stdin).await.unwrap();
    assert_eq!(collect(s.out).await, "line1\nline2\n");
    assert_eq!(g.wait("c2", "").await.exit_status, 0);
    g.remove("c2").await;

    // A terminal: resize, then input through the pty.
    let s = g.streams(true, true, false, true);
    g.create(
        "c3",
        spec("c3", &["sh", "-c", "read l; stty size; echo got-$l"], |v| {
            v["process"]["terminal"] = json!(true)
        }),
        &s,
    )
    .await;
    g.start("c3").await;
    g.c.resize_pty(
        ctx(),
        &ResizeRequest {
            container_id: "c3".into(),
            width: 100,
            height: 40,
            ..Default::default()
        },
    )
    .await
    .expect("ResizePty");
    g.plane.write(s.stdio.stdin, b"go\n").await.unwrap();
    let out = collect(s.out).await;
    assert!(out.contains("40 100"), "stty size after resize: {out:?}");
    assert!(out.contains("got-go"), "{out:?}");
    assert_eq!(g.wait("c3", "").await.exit_status, 0);
    g.remove("c3").await;

    // Output larger than guest RAM (256 MiB), written faster than the port drains: the agent
    // holds the writer back instead of queueing it in guest memory (which once ended in the
    // guest's OOM killer).
    let s = g.streams(false, true, false, false);
    let mib = 384u64;
    let count = format!("count={}", mib * 16);
    g.create(
        "c4",
        spec("c4", &["dd", "if=/dev/zero", "bs=65536", &count], |_| {}),
        &s,
    )
    .await;
    let t = Instant::now();
    g.start("c4").await;
    let mut rx = s.out.expect("stdout stream");
    let mut bytes = 0u64;
    let r = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(d) = rx.recv().await {
            bytes += d.len() as u64;
        }
    })
    .await;
    assert!(r.is_ok(), "stream did not end within 120 s ({bytes} bytes)");
    let w = g.wait("c4", "").await;
    eprintln!(
        "vm_container: {mib} MiB out in {:?} ({:.1} MB/s)",
        t.elapsed(),
        bytes as f64 / 1e6 / t.elapsed().as_secs_f64()
    );
    assert_eq!(
        (bytes, w.exit_status),
        (mib << 20, 0),
        "{}",
        g.vm.console_tail(10)
    );
    g.remove("c4").await;

    g.shutdown().await;
}

/// exec (pipes and a terminal), Pids with exec ids, signals to execs and to the init, stats
/// with numbers, update, pause/resume, and an OOM kill reported to the host.
#[tokio::test]
async fn vm_container_exec_signals_stats_pause_update_oom() {
    let g = Guest::boot().await;
    let s = g.streams(false, true, false, false);
    let tick = g.rootfs.join("tmp/tick-c");
    g.create(
        "c",
        spec(
            "c",
            &[
                "sh",
                "-c",
                "trap 'echo got-term; exit 7' TERM; i=0; \
                 while true; do i=$((i+1)); echo $i > /tmp/tick-c; sleep 0.1; done",
            ],
            |_| {},
        ),
        &s,
    )
    .await;
    let init_pid = g.start("c").await;

    // exec with pipes and its exit code.
    let e = g.streams(false, true, true, false);
    g.exec(
        "c",
        "e1",
        process_json(
            &["sh", "-c", "echo exec-out; echo exec-err >&2; exit 5"],
            false,
        ),
        &e,
    )
    .await;
    let (out, err) = tokio::join!(collect(e.out), collect(e.err));
    assert_eq!((out.as_str(), err.as_str()), ("exec-out\n", "exec-err\n"));
    assert_eq!(g.wait("c", "e1").await.exit_status, 5);

    // exec with a terminal.
    let e = g.streams(false, true, false, true);
    g.exec("c", "e2", process_json(&["tty"], true), &e).await;
    let out = collect(e.out).await;
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(g.wait("c", "e2").await.exit_status, 0);

    // Pids names the exec; a signal to the exec ends it.
    let e = g.streams(false, false, false, false);
    let e3 = g
        .exec("c", "e3", process_json(&["sleep", "1000"], false), &e)
        .await;
    assert_eq!(
        code("id of a running exec reused", g.exec_raw("c", "e3").await),
        ttrpc::Code::ALREADY_EXISTS
    );
    let pids = g.c.pids(ctx(), &creq("c")).await.expect("Pids").processes;
    assert!(
        pids.iter()
            .any(|p| p.pid == init_pid && p.exec_id.is_empty()),
        "{pids:?}"
    );
    assert!(
        pids.iter().any(|p| p.pid == e3 && p.exec_id == "e3"),
        "{pids:?}"
    );
    g.signal("c", "e3", libc::SIGKILL, false)
        .await
        .expect("kill e3");
    assert_eq!(g.wait("c", "e3").await.exit_status, 137);

    // Stats with numbers, then update.
    let st = g.stats("c").await;
    eprintln!(
        "vm_container: stats: memory {} / limit {}, cpu {} ns, pids {}",
        st.memory_usage, st.memory_limit, st.cpu_usage_ns, st.pids_current
    );
    assert!(st.memory_usage > 0, "{st:?}");
    assert!(st.cpu_usage_ns > 0, "{st:?}");
    assert!(st.pids_current >= 1, "{st:?}");
    assert_eq!(st.memory_limit, 64 << 20);
    let upd = UpdateRequest {
        container_id: "c".into(),
        linux_resources: serde_json::to_vec(&json!({"memory": {"limit": 100663296}})).unwrap(),
        ..Default::default()
    };
    g.c.update(ctx(), &upd).await.expect("Update");
    assert_eq!(g.stats("c").await.memory_limit, 96 << 20);

    // Pause: the tick file (on the shared rootfs) stops; resume: it moves again.
    // A missing file fails the test: it must not read as "no progress". Empty (the shell
    // truncates, then writes) reads as None.
    let read_tick = || -> Option<u64> {
        let s = std::fs::read_to_string(&tick).expect("tick file");
        s.trim().parse().ok()
    };
    // Ticking before the pause (every 0.1 s), so a standstill below means something.
    let t = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not ticking: {seen:?}"
        );
        seen.extend(read_tick());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Pause returns once the freezer reports FROZEN: nothing runs after it.
    g.c.pause(ctx(), &creq("c")).await.expect("Pause");
    let a = read_tick();
    // The observation window (15 ticks' worth), not a synchronisation.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = read_tick();
    assert_eq!(a, b, "ticks went on while paused");
    g.c.resume(ctx(), &creq("c")).await.expect("Resume");
    let t = Instant::now();
    let moved = |v: Option<u64>| match (v, b) {
        (Some(v), Some(b)) => v > b,
        (v, None) => v.is_some(),
        (None, Some(_)) => false,
    };
    while !moved(read_tick()) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no ticks after resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM reaches the init's trap.
    g.signal("c", "", libc::SIGTERM, false).await.expect("TERM");
    let out = collect(s.out).await;
    assert!(out.contains("got-term"), "{out:?}");
    assert_eq!(g.wait("c", "").await.exit_status, 7);
    g.remove("c").await;
    assert_eq!(
        code("Pids after remove", g.c.pids(ctx(), &creq("c")).await),
        ttrpc::Code::NOT_FOUND
    );

    // OOM: a 64 MiB buffer under a 16 MiB limit.
    let c = g.c.clone();
    let oom_call = tokio::spawn(async move {
        c.get_oom_event(agent::ctx(Duration::from_secs(90)), &Empty::new())
            .await
    });
    let s = g.streams(false, false, false, false);
    g.create(
        "o1",
        spec(
            "o1",
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            |v| v["linux"]["resources"]["memory"]["limit"] = json!(16777216),
        ),
        &s,
    )
    .await;
    g.start("o1").await;
    let w = g.wait("o1", "").await;
    assert_eq!(w.exit_status, 137, "{w:?}");
    let via_event = if w.oom_killed {
        oom_call.abort();
        false
    } else {
        let ev = tokio::time::timeout(Duration::from_secs(30), oom_call)
            .await
            .expect("no OOM event within 30 s of the kill")
            .unwrap()
            .expect("GetOOMEvent");
        assert_eq!(ev.container_id, "o1");
        true
    };
    eprintln!(
        "vm_container: OOM kill reported {}",
        if via_event {
            "by GetOOMEvent"
        } else {
            "with the exit"
        }
    );
    let st = g.stats("o1").await;
    assert!(st.oom_kills >= 1, "{st:?}");
    g.remove("o1").await;

    g.shutdown().await;
}

impl Guest {
    async fn exec_raw(&self, id: &str, exec_id: &str) -> ttrpc::Result<StartResponse> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process: process_json(&["true"], false),
            ..Default::default()
        };
        self.c.exec_process(ctx(), &req).await
    }
}

/// Every call with bad input gets an error status with the right code, and the agent still
/// answers afterwards.
#[tokio::test]
async fn vm_agent_malformed_requests() {
    use ttrpc::Code;
    let g = Guest::boot().await;
    let c = g.c.clone();
    let create = |id: &str, spec: Vec<u8>, stdio: StdioStreams, storages: Vec<Storage>| {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec: spec,
            stdio: protobuf::MessageField::some(stdio),
            storages,
            ..Default::default()
        };
        let c = c.clone();
        async move { c.create_container(ctx(), &req).await }
    };
    let none = StdioStreams::default;
    let ok_spec = || spec("x", &["sleep", "1000"], |_| {});
    let cases: Vec<(&str, ttrpc::Result<CreateContainerResponse>, Code)> = vec![
        (
            "empty id",
            create("", ok_spec(), none(), vec![]).await,
            Code::INVALID_ARGUMENT,
        ),
        (
            "id with /",
            create("a/b", ok_spec(), none(), vec![]).await,
            Code::INVALID_ARGUMENT,
        ),
        (
            "spec not JSON",
            create("x", b"{not json".to_vec(), none(), vec![]).await,
            Code::INVALID_ARGUMENT,
        ),
        (
            "spec not UTF-8",
            create("x", vec![0xff, 0xfe], none(), vec![]).await,
            Code::INVALID_ARGUMENT,
        ),
        (
            "relative root",
            create(
                "x",
                spec("x", &["true"], |v| v["root"]["path"] = json!("rootfs")),
                none(),
                vec![],
            )
            .await,
            Code::INVALID_ARGUMENT,
        ),
        (
            "bad namespace",
            create(
                "x",
                spec("x", &["true"], |v| {
                    v["linux"]["namespaces"] = json!([{"type": "time"}])
                }),
                none(),
                vec![],
            )
            .await,
            Code::INVALID_ARGUMENT,
        ),
        (
            "terminal mismatch",
            create(
                "x",
                ok_spec(),
                StdioStreams {
                    terminal: true,
                    ..Default::default()
                },
                vec![],
            )
            .await,
            Code::INVALID_ARGUMENT,
        ),
        (
            "unknown storage driver",
            create(
                "x",
                ok_spec(),
                none(),
                vec![Storage {
                    driver: "nfs".into(),
                    source: "a".into(),
                    mount_point: "/run/x".into(),
                    ..Default::default()
                }],
            )
            .await,
            Code::INVALID_ARGUMENT,
        ),
        (
            "relative storage mount point",
            create(
                "x",
                ok_spec(),
                none(),
                vec![Storage {
                    driver: "bind".into(),
                    source: "/".into(),
                    mount_point: "x".into(),
                    ..Default::default()
                }],
            )
            .await,
            Code::INVALID_ARGUMENT,
        ),
        (
            "missing executable",
            create("x", spec("x", &["/bin/nope"], |_| {}), none(), vec![]).await,
            Code::INVALID_ARGUMENT,
        ),
    ];
    for (what, r, want) in cases {
        assert_eq!(code(what, r), want, "{what}");
    }

    // A created container for state errors.
    let s = g.streams(false, false, false, false);
    g.create("x", ok_spec(), &s).await;
    assert_eq!(
        code("duplicate", create("x", ok_spec(), none(), vec![]).await),
        Code::ALREADY_EXISTS
    );
    assert_eq!(
        code("exec before start", g.exec_raw("x", "e").await),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code(
            "start exec id",
            c.start_process(ctx(), &preq("x", "e")).await
        ),
        Code::INVALID_ARGUMENT
    );
    g.start("x").await;
    assert_eq!(
        code("start twice", c.start_process(ctx(), &preq("x", "")).await),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code(
            "remove running",
            c.remove_container(ctx(), &creq("x")).await
        ),
        Code::FAILED_PRECONDITION
    );
    let bad_exec = ExecProcessRequest {
        container_id: "x".into(),
        exec_id: "e".into(),
        process: b"[]".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        code(
            "exec process not an object",
            c.exec_process(ctx(), &bad_exec).await
        ),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code("empty exec id", g.exec_raw("x", "").await),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code("signal 0", g.signal("x", "", 0, false).await),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code("signal 999", g.signal("x", "", 999, false).await),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code("signal unknown exec", g.signal("x", "zz", 9, false).await),
        Code::NOT_FOUND
    );
    let resize = |id: &str| ResizeRequest {
        container_id: id.into(),
        width: 80,
        height: 24,
        ..Default::default()
    };
    assert_eq!(
        code(
            "resize without a terminal",
            c.resize_pty(ctx(), &resize("x")).await
        ),
        Code::FAILED_PRECONDITION
    );
    let upd = UpdateRequest {
        container_id: "x".into(),
        linux_resources: b"{memory".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        code("update bad JSON", c.update(ctx(), &upd).await),
        Code::INVALID_ARGUMENT
    );

    // Unknown container, every call.
    let nf = Code::NOT_FOUND;
    assert_eq!(
        code("start", c.start_process(ctx(), &preq("nope", "")).await),
        nf
    );
    assert_eq!(
        code("wait", c.wait_process(ctx(), &preq("nope", "")).await),
        nf
    );
    assert_eq!(
        code("wait exec", c.wait_process(ctx(), &preq("x", "nope")).await),
        nf
    );
    assert_eq!(code("signal", g.signal("nope", "", 9, false).await), nf);
    assert_eq!(code("exec", g.exec_raw("nope", "e").await), nf);
    assert_eq!(
        code("remove", c.remove_container(ctx(), &creq("nope")).await),
        nf
    );
    assert_eq!(
        code("close stdin", c.close_stdin(ctx(), &preq("nope", "")).await),
        nf
    );
    assert_eq!(
        code("resize", c.resize_pty(ctx(), &resize("nope")).await),
        nf
    );
    assert_eq!(code("stats", c.stats(ctx(), &creq("nope")).await), nf);
    assert_eq!(code("pause", c.pause(ctx(), &creq("nope")).await), nf);
    assert_eq!(code("resume", c.resume(ctx(), &creq("nope")).await), nf);
    assert_eq!(code("pids", c.pids(ctx(), &creq("nope")).await), nf);
    let upd = UpdateRequest {
        container_id: "nope".into(),
        linux_resources: b"{}".to_vec(),
        ..Default::default()
    };
    assert_eq!(code("update", c.update(ctx(), &upd).await), nf);
    assert_eq!(
        code(
            "sandbox twice",
            c.create_sandbox(
                ctx(),
                &CreateSandboxRequest {
                    storages: vec![Storage {
                        driver: "bind".into(),
                        source: "/".into(),
                        mount_point: "/run/y".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            )
            .await
        ),
        Code::ALREADY_EXISTS
    );
    let route = |d: &str, gw: &str| Routes {
        routes: vec![Route {
            destination: d.into(),
            gateway: gw.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(
        code(
            "route IPv6 prefix too long",
            c.add_routes(ctx(), &route("fd00::/129", "")).await
        ),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(
            "route IPv6 bad gateway",
            c.add_routes(ctx(), &route("fd00::/64", "nope")).await
        ),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(
            "route bad gateway",
            c.add_routes(ctx(), &route("", "10.0.2")).await
        ),
        Code::INVALID_ARGUMENT
    );
    let iface = |mac: &str, addr: &str| Interface {
        mac: mac.into(),
        addresses: vec![IPAddress {
            address: addr.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(
        code(
            "interface unknown MAC",
            c.update_interface(ctx(), &iface("02:00:00:00:00:99", "10.0.0.2/24"))
                .await
        ),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(
            "interface bad CIDR",
            c.update_interface(ctx(), &iface("02:00:00:00:00:99", "10.0.0.2"))
                .await
        ),
        Code::INVALID_ARGUMENT
    );

    // Still healthy, and the container still works.
    c.health(ctx(), &Empty::new())
        .await
        .expect("Health after bad requests");
    g.signal("x", "", libc::SIGKILL, true)
        .await
        .expect("kill all");
    assert_eq!(g.wait("x", "").await.exit_status, 137);
    g.remove("x").await;
    g.shutdown().await;
}

/// The agent dies (SIGQUIT to guest PID 1 from a container in the guest's pid namespace):
/// the guest kernel panics, QEMU ends, and the host sees it: wait() returns and calls in
/// flight fail, none hangs.
#[tokio::test]
async fn vm_agent_killed_host_sees_vm_gone() {
    let g = Guest::boot().await;
    let s = g.streams(false, false, false, false);
    g.create(
        "k",
        spec(
            "k",
            &["sh", "-c", "sleep 1; kill -QUIT 1; sleep 1000"],
            |v| {
                v["linux"]["namespaces"] = json!([{"type": "mount"}]);
            },
        ),
        &s,
    )
    .await;
    let c = g.c.clone();
    let in_flight = tokio::spawn(async move {
        c.wait_process(agent::ctx(Duration::from_secs(600)), &preq("k", ""))
            .await
    });
    g.start("k").await;
    let t = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(60), g.vm.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "VM still running 60 s after the agent was killed\n{}",
                g.diag()
            )
        })
        .unwrap();
    eprintln!(
        "vm_container: agent killed -> VM gone after {:?}: {exit}",
        t.elapsed()
    );
    let r = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("in-flight WaitProcess hung after the agent died")
        .unwrap();
    assert!(r.is_err(), "{r:?}");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        g.c.health(agent::ctx(Duration::from_secs(60)), &Empty::new()),
    )
    .await
    .expect("new call hung after the agent died");
    assert!(r.is_err());
    // The whole console: the panic trace after the agent's last line is long.
    let console = g.vm.console_tail(100_000);
    assert!(
        console.contains("SIGQUIT") || console.contains("kill init"),
        "console should show the agent's end: {console}"
    );
    let wd = g.vm.work_dir().to_path_buf();
    drop(g);
    assert!(!wd.exists(), "work dir left behind");
}

/// A virtio-net device (QEMU user networking): UpdateInterface finds it by MAC, renames it,
/// sets MTU and address, brings it up; AddRoutes adds the default route. A container sharing
/// the guest's network sees all of it.
#[tokio::test]
async fn vm_agent_network_interface_and_routes() {
    let mac = "02:00:00:00:00:01";
    let g = Guest::boot_with(|cfg| {
        cfg.extra_args = vec![
            "-netdev".into(),
            "user,id=n0".into(),
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={mac}"),
        ]
    })
    .await;
    let iface = Interface {
        name: "pod0".into(),
        mac: mac.into(),
        addresses: vec![IPAddress {
            address: "10.0.2.15/24".into(),
            ..Default::default()
        }],
        mtu: 1400,
        ..Default::default()
    };
    g.c.update_interface(ctx(), &iface)
        .await
        .unwrap_or_else(|e| panic!("UpdateInterface: {e}\n{}", g.diag()));
    let routes = Routes {
        routes: vec![Route {
            destination: "".into(),
            gateway: "10.0.2.2".into(),
            device: "pod0".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    g.c.add_routes(ctx(), &routes).await.expect("AddRoutes");
    let s = g.streams(false, true, true, false);
    g.create(
        "n",
        spec(
            "n",
            &[
                "sh",
                "-c",
                "ip link show pod0; ip -4 addr show pod0; ip route; ip link show lo",
            ],
            |v| v["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "pid"}]),
        ),
        &s,
    )
    .await;
    g.start("n").await;
    let (out, err) = tokio::join!(collect(s.out), collect(s.err));
    assert_eq!(g.wait("n", "").await.exit_status, 0, "{out}{err}");
    eprintln!("vm_container: guest network:\n{out}");
    assert!(out.contains("mtu 1400"), "{out}");
    assert!(out.contains("inet 10.0.2.15/24"), "{out}");
    assert!(out.contains("default via 10.0.2.2 dev pod0"), "{out}");
    assert!(out.contains("lo: <LOOPBACK,UP"), "loopback up: {out}");
    g.remove("n").await;
    g.shutdown().await;
}

/// Our guest kernel carries the CPU vulnerability mitigations a pod relies on under KVM (one
/// container must not read the guest kernel's memory through the CPU), and the QEMU driver
/// switches them off under TCG only, where guest code does not run on the CPU as such.
#[tokio::test]
async fn vm_guest_cpu_mitigations() {
    /// The guest's command line and what it says of Spectre v2, from a container.
    async fn cmdline_and_spectre_v2(g: &Guest) -> String {
        let s = g.streams(false, true, true, false);
        let sh = "cat /proc/cmdline /sys/devices/system/cpu/vulnerabilities/spectre_v2";
        let with_sys = |v: &mut serde_json::Value| {
            v["mounts"].as_array_mut().unwrap().push(
                json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]}),
            )
        };
        g.create("m", spec("m", &["sh", "-c", sh], with_sys), &s)
            .await;
        g.start("m").await;
        let (out, err) = tokio::join!(collect(s.out), collect(s.err));
        assert_eq!(g.wait("m", "").await.exit_status, 0, "{out}{err}");
        g.remove("m").await;
        out
    }
    // What the driver chose: off under TCG (this machine without vmx/svm), the kernel's own
    // choice with KVM.
    let g = Guest::boot().await;
    let out = cmdline_and_spectre_v2(&g).await;
    let tcg = g.vm.accel() == Accel::Tcg;
    g.shutdown().await;
    assert_eq!(out.contains("mitigations=off"), tcg, "{out}");
    // As the kernel decides (a later parameter wins): the mitigations are there to choose.
    let g = Guest::boot_with(|cfg| cfg.kernel_params = vec!["mitigations=auto".into()]).await;
    let out = cmdline_and_spectre_v2(&g).await;
    g.shutdown().await;
    let spectre_v2 = out.lines().last().unwrap_or_default();
    eprintln!("vm_guest_cpu_mitigations: mitigations=auto: {spectre_v2}");
    assert!(
        spectre_v2.starts_with("Mitigation:"),
        "spectre_v2 with mitigations=auto: {out}"
    );
}
