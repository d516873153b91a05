//! The builtin hypervisor driver (`runtime::vm::builtin`) running janus-vmm on this machine's
//! /dev/kvm. A Linux guest cannot boot here (no vmx/svm), so the driver boots the test guests
//! instead: what is checked is the driver's side -- janus-vmm's command line (ports, virtio-fs
//! through a real virtiofsd, name, pidfile), the channels it hands over, the exit status, the
//! work directory going away, and a leftover VMM being found and killed after a crash.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{build_guest, kvm_or_say, virtiofsd};
use runtime::vm::builtin::Builtin;
use runtime::vm::{FsShare, Vm, VmConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn config(guest: &str, dir: &std::path::Path) -> VmConfig {
    let elf = build_guest(guest, &format!("driver-{guest}"));
    // The driver insists on an initramfs; the test guests ignore it.
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, b"unused").unwrap();
    let mut cfg = VmConfig::new(elf, initrd);
    cfg.vmm_binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_janus-vmm")));
    cfg.work_dir = Some(dir.join("vm"));
    cfg
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The console-ports guest under the driver: it finds the `janus.agent` and `janus.stdio`
/// ports the driver asked for, sees the driver's stdio connection, and its line comes back
/// through the stream the driver hands over; a virtio-fs device on a real virtiofsd is
/// present too. The guest powers off: exit status 0, work directory gone.
#[tokio::test]
async fn builtin_driver_runs_janus_vmm_with_the_agent_ports() {
    if !kvm_or_say("builtin_driver_runs_janus_vmm_with_the_agent_ports") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let share = d.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let (vfs, _) = virtiofsd(d.path(), &share).await;
    let mut cfg = config("virtio_console_ports", d.path());
    cfg.name = Some("driver-test".into());
    cfg.fs = Some(FsShare {
        tag: "janus".into(),
        socket: vfs.socket().to_path_buf(),
    });
    let vm = Builtin::new().start_vm(&cfg).await.expect("janus-vmm up");
    let args = cmdline(vm.pid());
    for want in [
        "--port janus.agent=",
        "--port janus.stdio=",
        "--name driver-test",
        "--shared-memory",
        "--fs janus=",
        "--pidfile",
    ] {
        assert!(args.contains(want), "{want} in {args}");
    }
    let pidfile = vm.work_dir().join(runtime::vm::builtin::VMM_FILES.pidfile);
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        vm.pid().to_string()
    );
    let stdio = vm.take_stdio_stream().expect("stdio channel");
    let (r, mut w) = stdio.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r);
    tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line))
        .await
        .expect("a line from the guest in time")
        .unwrap();
    assert_eq!(line, "janus-port-ping\n");
    w.write_all(line.as_bytes()).await.unwrap();
    // Then more than janus-vmm buffers: held back while the guest is behind, none lost.
    let bulk = common::console_bulk();
    let writer = tokio::spawn(async move { w.write_all(&bulk).await.map(|_| w) });
    // And 1 MiB back from the guest.
    let mut got = 0;
    let mut buf = vec![0u8; 64 << 10];
    while got < common::CONSOLE_TX_BULK {
        match tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got += n,
            other => panic!("guest output after {got} bytes: {other:?}"),
        }
    }
    let exit = tokio::time::timeout(Duration::from_secs(30), vm.wait())
        .await
        .expect("guest powers off")
        .unwrap();
    let _ = writer.await;
    let console = vm.console_tail(20);
    assert_eq!(exit.code, Some(0), "{exit}\n{console}");
    assert!(console.contains("port 0 name janus.agent"), "{console}");
    assert!(
        console.contains("port janus.stdio: echoed back, then bulk 0x0000000000180000 in")
            && console.contains("sent 0x0000000000100000"),
        "{console}"
    );
    let wd = vm.work_dir().to_path_buf();
    vm.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(!wd.exists(), "work dir left: {}", wd.display());
    drop(vfs);
}

/// A janus-vmm whose owner died (the shim was SIGKILLed): `cleanup_work_dir` finds it through
/// its pidfile, kills it and removes the directory. Also: a refused option is a boot error
/// quoting janus-vmm.
#[tokio::test]
async fn leftover_janus_vmm_is_cleaned_up() {
    if !kvm_or_say("leftover_janus_vmm_is_cleaned_up") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config("idle", d.path());
    cfg.keep_work_dir = true;
    let vm = Builtin::new().start_vm(&cfg).await.expect("janus-vmm up");
    let pid = vm.pid();
    let wd = vm.work_dir().to_path_buf();
    // Forget the handle as a crashed shim would (no kill on drop).
    std::mem::forget(vm);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(runtime::vm::cleanup_work_dir(&wd).unwrap(), "killed");
    assert!(!wd.exists());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
        "janus-vmm {pid} still running: {stat}"
    );

    let mut bad = config("idle", d.path());
    bad.extra_args = vec!["--no-such-option".into()];
    let e = Builtin::new().start_vm(&bad).await.unwrap_err().to_string();
    assert!(
        e.contains("janus-vmm exited at start") && e.contains("--no-such-option"),
        "{e}"
    );
}
