//! Linux early-boot parity: the guest kernel (target/guest; Debian's cloud kernel or ours) booted
//! by janus-vmm and, in the same test, by QEMU (`-M microvm,accel=kvm`), both with CMPXCHG16B
//! hidden and `noxsave`. On this machine's software KVM (no vmx/svm) the kernel runs slowly and
//! stops for good at a point neither VMM can get past (its kernel-mode int3/SSE use); our serial
//! log must get at least as far as QEMU's, and show the kernel reading our ACPI tables.
//!
//! Slow (minutes): `#[ignore]`d, run by hack/test.sh as its own step:
//! `cargo test -p vmm --test linux_parity -- --ignored --nocapture`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Boot messages in the order the kernel prints them (substrings); how far a boot got is the
/// last one found.
const MILESTONES: &[&str] = &[
    "Linux version",
    "BIOS-e820",
    "ACPI: RSDP",
    "ACPI: Using ACPI (MADT)",
    "Booting paravirtualized kernel",
    "setup_percpu:",
    "Kernel command line:",
    "Memory:",
    "SLUB:",
    "ftrace: allocating",
    "ftrace: allocated",
    "rcu: Preemptible hierarchical RCU",
    "rcu: Adjusting geometry",
    "NR_IRQS:",
    "Console: colour",
    "printk: console [ttyS0] enabled",
    "ACPI: Core revision",
    "APIC: Switch to symmetric I/O mode setup",
    "clocksource: tsc-early",
    "Calibrating delay loop",
    "Spectre V2",
    // Where this machine's software KVM stops: the alternatives patching right after it
    // needs int3 in kernel mode.
    "x86/fpu: x87 FPU will use",
    // Reached only with hardware virtualization.
    "pid_max:",
    "Mount-cache hash table",
    "smp: Bringing up secondary CPUs",
    "devtmpfs: initialized",
    "clocksource: Switched to clocksource",
    "Freeing unused kernel image",
    "Run /init as init process",
];

fn progress(log: &str) -> (usize, &'static str) {
    MILESTONES
        .iter()
        .enumerate()
        .rev()
        .find(|(_, m)| log.contains(**m))
        .map(|(i, m)| (i + 1, *m))
        .unwrap_or((0, "(nothing)"))
}

fn guest_dir() -> PathBuf {
    std::env::var_os("JANUS_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest"))
}

const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave loglevel=8";

/// Runs `child` until its serial log has not grown for `stall` or `max` has passed; the log.
fn run(mut child: Child, log: &PathBuf, max: Duration, stall: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut last_len = 0;
    let mut last_change = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let len = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        if len != last_len {
            last_len = len;
            last_change = Instant::now();
        }
        let exited = child.try_wait().ok().flatten().is_some();
        if exited || t.elapsed() > max || last_change.elapsed() > stall {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    (text, t.elapsed())
}

#[test]
#[ignore = "slow: boots Linux twice under a software KVM (hack/test.sh runs it)"]
fn linux_early_boot_parity_with_qemu() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        janus_tests::not_run(
            "linux_early_boot_parity_with_qemu",
            janus_tests::Prereq::Kvm,
            "/dev/kvm cannot be opened",
            false,
        );
        return;
    }
    let kernel = guest_dir().join("vmlinux");
    assert!(
        kernel.is_file(),
        "{} missing: run hack/build-guest.sh",
        kernel.display()
    );
    let max = Duration::from_secs(
        std::env::var("JANUS_PARITY_MAX_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(240),
    );
    let stall = Duration::from_secs(30);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("parity");
    std::fs::create_dir_all(&dir).unwrap();

    // One after the other, so neither competes with the other for the CPU.
    let ours_log = dir.join("janus-vmm.serial");
    let _ = std::fs::remove_file(&ours_log);
    let ours = Command::new(env!("CARGO_BIN_EXE_janus-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--cmdline", CMDLINE, "--mem-mib", "256"])
        .args(["--hide-cpuid", "cx16,xsave"])
        .arg("--serial-log")
        .arg(&ours_log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (ours_text, ours_t) = run(ours, &ours_log, max, stall);

    let qemu_log = dir.join("qemu.serial");
    let _ = std::fs::remove_file(&qemu_log);
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,accel=kvm,acpi=on"])
        // `-cpu host` trips over MSR 0x10a on this KVM; host features otherwise, as ours.
        .args(["-cpu", "host,-cx16,-xsave,-arch-capabilities", "-m", "256"])
        .arg("-kernel")
        .arg(&kernel)
        .args(["-append", CMDLINE])
        .args(["-nographic", "-nodefaults", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", qemu_log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
    let (qemu_text, qemu_t) = run(qemu, &qemu_log, max, stall);

    let (pi, pm) = progress(&ours_text);
    let (qi, qm) = progress(&qemu_text);
    eprintln!(
        "parity: janus-vmm reached #{pi} {pm:?} ({} lines, {:.0} s); QEMU reached #{qi} {qm:?} \
         ({} lines, {:.0} s)",
        ours_text.lines().count(),
        ours_t.as_secs_f64(),
        qemu_text.lines().count(),
        qemu_t.as_secs_f64()
    );
    for l in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: DSDT",
        "ACPI: FACP",
        "ACPI: APIC",
    ] {
        assert!(
            ours_text.contains(l),
            "our log lacks {l:?}:\n{}",
            tail(&ours_text)
        );
    }
    assert!(
        pi >= qi,
        "janus-vmm got less far than QEMU.\n--- ours ---\n{}\n--- QEMU ---\n{}",
        tail(&ours_text),
        tail(&qemu_text)
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Where the CPU has vmx/svm, Debian's kernel boots all the way under janus-vmm: PID 1 (the
/// guest image's test init) runs, finds the virtio-mmio devices the ACPI tables describe (a
/// disk here) with the kernel's own drivers bound, and powers the VM off through ACPI S5.
/// Elsewhere (this project's CI: a software KVM) it says that it did not run and why; the
/// parity test above covers what can run there.
#[test]
fn linux_boots_to_init_with_hardware_virtualization() {
    if runtime::vm::hardware_virtualization().is_none() {
        janus_tests::not_run(
            "linux_boots_to_init_with_hardware_virtualization",
            janus_tests::Prereq::Vmx,
            "the CPU shows no vmx/svm (a software KVM cannot run a Linux guest to the end)",
            false,
        );
        return;
    }
    let dir = guest_dir();
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initramfs-testinit.cpio"));
    assert!(
        kernel.is_file() && initrd.is_file(),
        "{} / {} missing: run hack/build-guest.sh",
        kernel.display(),
        initrd.display()
    );
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fullboot");
    std::fs::create_dir_all(&tmp).unwrap();
    let disk = tmp.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let log = tmp.join("serial.log");
    let o = Command::new(env!("CARGO_BIN_EXE_janus-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 panic=-1", "--mem-mib", "256"])
        .arg("--disk")
        .arg(&disk)
        .args(["--timeout-ms", "60000"])
        .arg("--serial-log")
        .arg(&log)
        .output()
        .unwrap();
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        serial.contains("JANUS-TESTINIT: kernel="),
        "init did not run:\n{}\n{}",
        tail(&serial),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        serial.contains("virtio_blk"),
        "no virtio-blk bound:\n{serial}"
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
