//! Shared by the integration tests: building the C/assembly test guests, the /dev/kvm check,
//! a virtiofsd to talk to.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::Command;

pub use runtime::vm::virtiofsd::{Virtiofsd, VirtiofsdConfig};

/// What the console-ports guest sends after the bulk it receives: 1 MiB.
pub const CONSOLE_TX_BULK: usize = 1 << 20;

/// Reads `n` bytes from `r` slowly (16 KiB at a time, 10 ms apart), as a peer that falls
/// behind; returns how many arrived before EOF.
pub fn read_slowly(mut r: impl std::io::Read, n: usize) -> usize {
    let mut buf = vec![0u8; 16 << 10];
    let mut got = 0;
    while got < n {
        match r.read(&mut buf[..(n - got).min(16 << 10)]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    got
}

/// What the console-ports guest expects after its echo: 1.5 MiB (more than janus-vmm buffers
/// per port) of a pattern it checks.
pub fn console_bulk() -> Vec<u8> {
    (0..1536 * 1024u32)
        .map(|i| ((i * 7 + 3) % 251) as u8)
        .collect()
}

pub fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guests");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Builds `guests/<name>.S` or `guests/<name>.c` into a static ELF at 2 MiB. C guests are
/// freestanding and kept off SSE/x87 (which this machine's KVM cannot run in kernel mode).
pub fn build_guest(name: &str, tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let c = dir.join(format!("{name}.c"));
    let src = if c.exists() {
        c
    } else {
        dir.join(format!("{name}.S"))
    };
    // Tests run in parallel: each builds and logs under its own tag.
    let out = out_dir().join(format!("{tag}.elf"));
    let o = Command::new("gcc")
        .args([
            "-O1",
            "-ffreestanding",
            "-fno-pic",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-mno-sse",
            "-mno-mmx",
            "-mno-80387",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fcf-protection=none",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,-Ttext=0x200000",
            "-Wl,--build-id=none",
        ])
        .arg("-I")
        .arg(&dir)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .output()
        .expect("gcc (apt-get install gcc)");
    assert!(
        o.status.success(),
        "gcc {}: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// /dev/kvm present? Says so by name when not (the unit tests still cover the rest).
pub fn kvm_or_say(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        janus_tests::not_run(
            test,
            janus_tests::Prereq::Kvm,
            "/dev/kvm cannot be opened on this machine",
            false,
        );
    }
    ok
}

/// virtiofsd (Debian's, QEMU 7.2) on `share`, started as the shim starts it
/// (`runtime::vm::virtiofsd`) and logging every request (the tests look for the guest's file
/// names there); its socket and log (returned) in `dir`. Killed on drop.
pub async fn virtiofsd(dir: &Path, share: &Path) -> (Virtiofsd, PathBuf) {
    let log = dir.join("virtiofsd.log");
    let mut cfg = VirtiofsdConfig::new(share, dir.join("fs.sock"), &log);
    cfg.debug_log = true;
    let vfs = Virtiofsd::start(&cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (vfs, log)
}
