//! A container in a VM: the host's rootfs shared by virtiofsd (virtio-fs, no copy), created
//! and started by the in-guest agent with runtime::linux, its stdout/stderr delivered as
//! frames on the stdio port, its exit status through WaitProcess.
#![cfg(feature = "vm")]
// One boot at a time (serialised by a file lock across test binaries); held across awaits.
#![allow(clippy::await_holding_lock)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocols::agent::*;
use protocols::stdio_frame::{decode_header, FLAG_EOF, HEADER};
use runtime::vm::{agent, qemu::Qemu, Hypervisor, Vm, VmConfig};
use tokio::io::AsyncReadExt;

static BOOT: Mutex<()> = Mutex::new(());

const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

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
    for a in ["sh", "echo", "cat", "uname", "ls"] {
        std::fs::hard_link(root.join("bin/busybox"), root.join("bin").join(a)).unwrap();
    }
    root
}

struct Virtiofsd(Child);

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn virtiofsd(sock: &Path, source: &Path, log: &Path) -> Virtiofsd {
    assert!(
        Path::new(VIRTIOFSD).is_file(),
        "{VIRTIOFSD} is missing: apt-get install qemu-system-x86 (Debian ships virtiofsd with it)"
    );
    let child = Command::new(VIRTIOFSD)
        .arg(format!("--socket-path={}", sock.display()))
        .args([
            "-o",
            &format!("source={}", source.display()),
            "-o",
            "cache=none",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start virtiofsd");
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "virtiofsd did not create {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Virtiofsd(child)
}

fn spec(rootfs: &str, args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0},
                    "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}},
        "root": {"path": rootfs},
        "hostname": "in-vm",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "cgroupsPath": "/janus/c1",
            "resources": {"memory": {"limit": 67108864}}
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn container_in_vm_from_host_rootfs() {
    let _g: MutexGuard<'_, ()> = BOOT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = guest_dir();
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    let vfs_sock = tmp.path().join("vfs.sock");
    let vfs_log = tmp.path().join("virtiofsd.log");
    let _vfs = virtiofsd(&vfs_sock, &rootfs, &vfs_log);

    let mut cfg =
        VmConfig::from_guest_dir(&dir).unwrap_or_else(|e| panic!("{e} (run hack/build-guest.sh)"));
    cfg.shared_memory = true;
    cfg.extra_args = vec![
        "-chardev".into(),
        format!("socket,id=vfs,path={}", vfs_sock.display()),
        "-device".into(),
        "vhost-user-fs-device,chardev=vfs,tag=rootfs".into(),
    ];
    let vm: Arc<dyn Vm> = Arc::from(
        Qemu::new()
            .start(&cfg)
            .await
            .unwrap_or_else(|e| panic!("start: {e}")),
    );
    let mut stdio = vm.take_stdio_stream().expect("stdio stream");
    vm.connect_agent(None)
        .await
        .unwrap_or_else(|e| panic!("agent: {e}"));
    let c = vm.agent().unwrap();
    let ctx = || agent::ctx(Duration::from_secs(60));

    let guest_root = "/run/janus/c1/rootfs";
    let req = CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec: spec(
            guest_root,
            &[
                "sh",
                "-c",
                "echo hello-from-vm; uname -r; hostname; echo oops >&2; exit 3",
            ],
        ),
        storages: vec![Storage {
            driver: "virtiofs".into(),
            source: "rootfs".into(),
            mount_point: guest_root.into(),
            ..Default::default()
        }],
        stdio: protobuf::MessageField::some(StdioStreams {
            stdout: 1,
            stderr: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let created = c.create_container(ctx(), &req).await.unwrap_or_else(|e| {
        panic!(
            "CreateContainer: {e}\n--- console ---\n{}\n--- virtiofsd ---\n{}",
            vm.console_tail(30),
            std::fs::read_to_string(&vfs_log).unwrap_or_default()
        )
    });
    assert!(created.pid > 0);
    let pr = ProcessRequest {
        container_id: "c1".into(),
        ..Default::default()
    };
    c.start_process(ctx(), &pr).await.expect("StartProcess");

    // Read frames until both streams have ended.
    let mut out: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut open = 2;
    let read = async {
        while open > 0 {
            let mut h = [0u8; HEADER];
            stdio.read_exact(&mut h).await.expect("stdio frame header");
            let (stream, flags, len) = decode_header(&h).expect("well-formed frame");
            let mut data = vec![0u8; len];
            stdio
                .read_exact(&mut data)
                .await
                .expect("stdio frame payload");
            out.entry(stream).or_default().extend_from_slice(&data);
            if flags & FLAG_EOF != 0 {
                open -= 1;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("container output within 60 s");
    let w = c.wait_process(ctx(), &pr).await.expect("WaitProcess");
    eprintln!("vm_container: create+start+run+wait in {:?}", t.elapsed());
    let stdout =
        String::from_utf8_lossy(out.get(&1).map(|v| v.as_slice()).unwrap_or_default()).to_string();
    let stderr =
        String::from_utf8_lossy(out.get(&2).map(|v| v.as_slice()).unwrap_or_default()).to_string();
    let release = std::fs::read_to_string(dir.join("kernel.release")).unwrap_or_default();
    assert!(stdout.starts_with("hello-from-vm\n"), "{stdout}");
    assert!(
        stdout.contains(release.trim()),
        "guest kernel release in {stdout:?}"
    );
    assert!(stdout.contains("in-vm"), "{stdout}");
    assert_eq!(stderr, "oops\n");
    assert_eq!(w.exit_status, 3);

    // Bad requests are answered with errors, not crashes.
    let dup = c.create_container(ctx(), &req).await;
    assert!(dup.is_err(), "duplicate id accepted");
    let bad = CreateContainerRequest {
        container_id: "c2".into(),
        oci_spec: b"{not json".to_vec(),
        ..Default::default()
    };
    let e = c
        .create_container(ctx(), &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("InvalidArgument") || e.contains("INVALID_ARGUMENT") || e.contains("invalid"),
        "{e}"
    );
    let e = c
        .wait_process(
            ctx(),
            &ProcessRequest {
                container_id: "nope".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.to_lowercase().contains("not found"), "{e}");

    c.remove_container(
        ctx(),
        &ContainerRequest {
            container_id: "c1".into(),
            ..Default::default()
        },
    )
    .await
    .expect("RemoveContainer");
    let (pid, wd) = (vm.pid(), vm.work_dir().to_path_buf());
    let exit = vm.shutdown(Duration::from_secs(30)).await.unwrap();
    assert!(exit.success(), "{exit}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu left behind"
    );
    assert!(!wd.exists(), "work dir left behind");
}
