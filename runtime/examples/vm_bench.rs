//! VM-mode benchmark (run by `hack/bench.sh`):
//!
//! 1. boot time: QEMU spawn → the test init's hello on the agent port (a bare boot of the same
//!    kernel to /init, loading the same modules) against QEMU spawn → vm-agent answering
//!    Health, alternating, medians and the ratio;
//! 2. stdio throughput: a guest container writes N bytes to stdout (`dd`), the host reads
//!    them off the stdio plane; MB/s.
//!
//! Usage: vm_bench [--boots N] [--mib M] [--guest-dir DIR]; prints KEY=VALUE lines.
//! Needs hack/build-guest.sh's output and /usr/lib/qemu/virtiofsd.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use protocols::agent::*;
use runtime::vm::virtiofsd::{Virtiofsd, VirtiofsdConfig};
use runtime::vm::{agent, qemu::Qemu, FsShare, Hypervisor, StdioPlane, VmConfig};
use tokio::io::AsyncReadExt;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// QEMU spawn -> the test init's hello (ms), and the guest's uptime when /init started (ms,
/// the test init's first console line: the kernel's own boot, without QEMU's start).
async fn bare_boot(cfg: &VmConfig) -> Result<(f64, f64)> {
    let vm = Qemu::new().start(cfg).await?;
    let mut s = vm.take_agent_stream().context("agent stream")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let read = async {
        while !got.ends_with(b"\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(90), read)
        .await
        .context("no hello from the test init within 90 s")??;
    let ms = vm.started_at().elapsed().as_secs_f64() * 1000.0;
    if !got.starts_with(b"hello") {
        bail!("test init said {:?}", String::from_utf8_lossy(&got));
    }
    // The console file is written by QEMU as the guest prints; the line precedes the hello.
    let console = std::fs::read_to_string(vm.console_log())?;
    let uptime = console
        .lines()
        .find_map(|l| l.split("testinit: started, uptime ").nth(1))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("no 'testinit: started' line on the console:\n{console}"))?;
    vm.kill()?;
    let _ = vm.wait().await;
    Ok((ms, uptime * 1000.0))
}

async fn agent_boot(cfg: &VmConfig) -> Result<f64> {
    let vm = Qemu::new().start(cfg).await?;
    vm.connect_agent(None).await?;
    let ms = vm.started_at().elapsed().as_secs_f64() * 1000.0;
    vm.shutdown(Duration::from_secs(30)).await?;
    Ok(ms)
}

async fn stdio_throughput(guest: &Path, mib: u64) -> Result<(f64, f64)> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("rootfs");
    for d in ["bin", "proc", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("/bin/busybox (apt-get install busybox-static)")?;
    std::fs::hard_link(root.join("bin/busybox"), root.join("bin/dd"))?;
    let sock = tmp.path().join("vfs.sock");
    let _vfs = Virtiofsd::start(&VirtiofsdConfig::new(
        tmp.path(),
        &sock,
        tmp.path().join("virtiofsd.log"),
    ))
    .await?;
    let mut cfg = VmConfig::from_guest_dir(guest)?;
    cfg.shared_memory = true;
    cfg.fs = Some(FsShare {
        tag: "share".into(),
        socket: sock.clone(),
    });
    let vm = Qemu::new().start(&cfg).await?;
    let plane = StdioPlane::new(vm.take_stdio_stream().context("stdio stream")?);
    vm.connect_agent(None).await?;
    let c = vm.agent().context("agent")?;
    let ctx = || agent::ctx(Duration::from_secs(600));
    c.create_sandbox(
        ctx(),
        &CreateSandboxRequest {
            storages: vec![Storage {
                driver: "virtiofs".into(),
                source: "share".into(),
                mount_point: "/run/janus/shared".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await?;
    let out = plane.alloc();
    let mut rx = plane.subscribe(out);
    let err = plane.alloc();
    let mut erx = plane.subscribe(err);
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["dd", "if=/dev/zero", "bs=65536", format!("count={}", mib * 16)],
                    "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "/run/janus/shared/rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}], "cgroupsPath": "/janus/tp"}
    });
    c.create_container(
        ctx(),
        &CreateContainerRequest {
            container_id: "tp".into(),
            oci_spec: serde_json::to_vec(&spec)?,
            stdio: protobuf::MessageField::some(StdioStreams {
                stdout: out,
                stderr: err,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await?;
    let t = Instant::now();
    c.start_process(
        ctx(),
        &ProcessRequest {
            container_id: "tp".into(),
            ..Default::default()
        },
    )
    .await?;
    let mut bytes = 0u64;
    while let Some(d) = rx.recv().await {
        bytes += d.len() as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    let mut errs = Vec::new();
    while let Some(d) = erx.recv().await {
        errs.extend_from_slice(&d);
    }
    let w = c
        .wait_process(
            ctx(),
            &ProcessRequest {
                container_id: "tp".into(),
                ..Default::default()
            },
        )
        .await?;
    if bytes != mib << 20 || w.exit_status != 0 {
        bail!(
            "got {bytes} bytes (expected {}), exit {}, stderr {:?}\n{}",
            mib << 20,
            w.exit_status,
            String::from_utf8_lossy(&errs),
            vm.console_tail(20)
        );
    }
    let _ = vm.shutdown(Duration::from_secs(30)).await;
    Ok((bytes as f64 / 1e6 / secs, secs))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut boots = 5usize;
    let mut mib = 1024u64;
    let mut guest = PathBuf::from(
        std::env::var("JANUS_GUEST_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/guest").into()),
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--boots" => boots = v.parse()?,
            "--mib" => mib = v.parse()?,
            "--guest-dir" => guest = v.into(),
            o => bail!("unknown argument {o}"),
        }
        i += 2;
    }
    let kernel = runtime::vm::find_kernel(&guest)?;
    let bare = VmConfig::new(kernel.clone(), guest.join("initramfs-testinit.cpio"));
    let full = VmConfig::new(kernel, guest.join("initramfs.cpio"));
    let (mut b, mut u, mut a) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..boots {
        let (spawn_ms, uptime_ms) = bare_boot(&bare).await?;
        b.push(spawn_ms);
        u.push(uptime_ms);
        a.push(agent_boot(&full).await?);
    }
    let accel = runtime::vm::choose_accel(runtime::vm::Accel::Auto)?.accel;
    let (bm, am) = (median(&mut b), median(&mut a));
    let (mbps, secs) = stdio_throughput(&guest, mib).await?;
    // KEY=VALUE lines: hack/bench.sh puts them in its table, beside the other kernel's.
    println!("accel={accel} boots={boots}");
    println!(
        "bare_boot_ms={bm:.0} guest_init_ms={:.0} agent_boot_ms={am:.0}",
        median(&mut u)
    );
    println!("stdio_mib={mib} stdio_mbps={mbps:.1} stdio_secs={secs:.2}");
    Ok(())
}
