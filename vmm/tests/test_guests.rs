//! Hand-written test guests (GNU assembler, built with gcc here) booted by `janus-vmm` on this
//! machine's /dev/kvm: they exercise the vCPU setup (long mode, paging, segments), port IO,
//! the 8250 console, and the power-off, reset and triple-fault paths. They avoid what this
//! machine's software KVM cannot run in kernel mode (SSE, int3, `int n`).

mod common;

use std::path::Path;
use std::process::Command;

use common::{build_guest, kvm_or_say, out_dir, virtiofsd};

struct Run {
    code: i32,
    serial: String,
    stderr: String,
}

fn run_guest(name: &str, tag: &str, extra: &[&str]) -> Run {
    let elf = build_guest(name, tag);
    let log = out_dir().join(format!("{tag}.serial"));
    let _ = std::fs::remove_file(&log);
    let o = Command::new(env!("CARGO_BIN_EXE_janus-vmm"))
        .arg("--kernel")
        .arg(&elf)
        .arg("--serial-log")
        .arg(&log)
        .args(["--timeout-ms", "60000"])
        .args(extra)
        .output()
        .unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        serial: std::fs::read_to_string(&log).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn hello_prints_and_powers_off() {
    if !kvm_or_say("hello_prints_and_powers_off") {
        return;
    }
    let r = run_guest("hello", "hello", &[]);
    assert_eq!(
        r.serial, "janus-testguest: hello from long mode\n",
        "stderr: {}",
        r.stderr
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("PowerOff"), "{}", r.stderr);
}

#[test]
fn hello_on_two_vcpus_and_1g_above_the_hole() {
    if !kvm_or_say("hello_on_two_vcpus_and_1g_above_the_hole") {
        return;
    }
    // 4 GiB of RAM: a second slot above the device hole (memfd-backed, lazily touched).
    let r = run_guest(
        "hello",
        "hello-2cpu-4g",
        &["--vcpus", "2", "--mem-mib", "4096"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.serial.contains("hello from long mode"), "{}", r.stderr);
}

#[test]
fn reset_ends_the_run() {
    if !kvm_or_say("reset_ends_the_run") {
        return;
    }
    let r = run_guest("reset", "reset", &[]);
    assert_eq!((r.code, r.serial.as_str()), (0, "R"), "{}", r.stderr);
    assert!(r.stderr.contains("Reset"), "{}", r.stderr);
}

#[test]
fn triple_fault_is_reported() {
    if !kvm_or_say("triple_fault_is_reported") {
        return;
    }
    let r = run_guest("fault", "fault", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("TripleFault"), "{}", r.stderr);
}

/// The C guest finds every virtio-mmio device (magic, version 2, device id), negotiates
/// features on the first disk (an unoffered feature refused), sets up a split queue, writes a
/// sector and reads it back, each completion announced by an interrupt through irqfd and the
/// I/O APIC, and a read past the end gets an error status.
#[test]
fn virtio_blk_round_trip_with_interrupts() {
    if !kvm_or_say("virtio_blk_round_trip_with_interrupts") {
        return;
    }
    let disk = out_dir().join("blk.img");
    let other = out_dir().join("blk-ro.img");
    for d in [&disk, &other] {
        let f = std::fs::File::create(d).unwrap();
        f.set_len(1 << 20).unwrap();
    }
    let ro = format!("{},ro", other.display());
    let r = run_guest(
        "virtio_blk",
        "virtio_blk",
        &["--disk", disk.to_str().unwrap(), "--disk", &ro],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.serial, r.stderr);
    assert!(!r.serial.contains("FAIL"), "{}", r.serial);
    assert!(
        r.serial
            .contains("slot 0: magic ok, version 2, device id 0x0000000000000002")
            && r.serial
                .contains("slot 1: magic ok, version 2, device id 0x0000000000000002"),
        "{}",
        r.serial
    );
    assert!(
        r.serial
            .contains("blk: capacity 0x0000000000000800 sectors"),
        "{}",
        r.serial
    );
    assert!(
        r.serial.contains("blk: sector written and read back"),
        "{}",
        r.serial
    );
    assert!(
        r.serial.contains("blk: interrupts 0x0000000000000003"),
        "{}",
        r.serial
    );
    // The sector reached the host file.
    let img = std::fs::read(&disk).unwrap();
    let want: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(&img[512..1024], &want[..]);
    assert!(std::fs::read(&other).unwrap().iter().all(|b| *b == 0));
}

#[test]
fn bad_kernel_is_an_error() {
    let bad = out_dir().join("not-a-kernel");
    std::fs::write(&bad, b"plain text, neither ELF nor bzImage").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_janus-vmm"))
        .arg("--kernel")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not-a-kernel"), "{e}");
    let o = Command::new(env!("CARGO_BIN_EXE_janus-vmm"))
        .args(["--kernel", "/nonexistent/vmlinux"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
}

/// While the guest runs, every thread of the VMM is under its seccomp filter.
#[test]
fn seccomp_confines_every_thread() {
    if !kvm_or_say("seccomp_confines_every_thread") {
        return;
    }
    let elf = build_guest("idle", "idle-seccomp");
    let log = out_dir().join("idle-seccomp.serial");
    let _ = std::fs::remove_file(&log);
    let mut child = Command::new(env!("CARGO_BIN_EXE_janus-vmm"))
        .arg("--kernel")
        .arg(&elf)
        .arg("--serial-log")
        .arg(&log)
        .args(["--vcpus", "2", "--timeout-ms", "60000"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::fs::read(&log).unwrap_or_default().is_empty() {
        assert!(t.elapsed().as_secs() < 20, "the idle guest never wrote");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Give the main thread a moment to confine itself after starting the vCPUs.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    let mut n = 0;
    for t in tasks {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        let mode = status
            .lines()
            .find(|l| l.starts_with("Seccomp:"))
            .unwrap_or_default()
            .to_string();
        assert_eq!(mode.split_whitespace().nth(1), Some("2"), "{status}");
        n += 1;
    }
    assert!(n >= 3, "main thread and two vCPU threads: {n} tasks");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A network namespace for one test, removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("jvmm-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (apt-get install iproute2)")
            .success();
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }

    fn ip(&self, args: &[&str]) {
        let o = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A frame out through virtio-net and a tap, and back: the guest sends an ARP request to the
/// tap's address in a network namespace of its own, the host kernel answers, the reply comes
/// back through the receive queue; completions by interrupt.
#[test]
fn virtio_net_arp_round_trip_through_a_tap() {
    if !kvm_or_say("virtio_net_arp_round_trip_through_a_tap") {
        return;
    }
    let ns = Netns::new();
    ns.ip(&["tuntap", "add", "dev", "jtap0", "mode", "tap", "vnet_hdr"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "jtap0"]);
    ns.ip(&["link", "set", "jtap0", "up"]);
    let elf = build_guest("virtio_net", "virtio_net");
    let log = out_dir().join("virtio_net.serial");
    let _ = std::fs::remove_file(&log);
    let o = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_janus-vmm"))
        .arg("--kernel")
        .arg(&elf)
        .args([
            "--tap",
            "jtap0,mac=02:4a:4e:00:00:02",
            "--timeout-ms",
            "60000",
        ])
        .arg("--serial-log")
        .arg(&log)
        .output()
        .unwrap();
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{serial}\n{stderr}");
    assert!(!serial.contains("FAIL"), "{serial}");
    assert!(serial.contains("device id 0x0000000000000001"), "{serial}");
    assert!(serial.contains("net: mac 02:4a:4e:00:00:02"), "{serial}");
    assert!(
        serial.contains("net: frame out through the tap and back"),
        "{serial}\n{stderr}"
    );
}

/// Boots console guest `name` with `extra` arguments, acts as the echo peer on `sock` (the
/// guest's first line goes back to it, which must be `want`, followed by `then`; then it
/// reads `out` bytes slowly), and returns the serial log and janus-vmm's stderr once the
/// guest has powered off (exit status 0).
fn console_echo(
    name: &str,
    extra: &[String],
    sock: &Path,
    want: &str,
    then: Vec<u8>,
    out: usize,
) -> (String, String) {
    let elf = build_guest(name, name);
    let log = out_dir().join(format!("{name}.serial"));
    let _ = std::fs::remove_file(&log);
    let child = Command::new(env!("CARGO_BIN_EXE_janus-vmm"))
        .arg("--kernel")
        .arg(&elf)
        .args(extra)
        .args(["--timeout-ms", "60000"])
        .arg("--serial-log")
        .arg(&log)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(sock) {
            break s;
        }
        assert!(t.elapsed().as_secs() < 20, "no socket {}", sock.display());
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut line = String::new();
    use std::io::{BufRead, Write};
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, want);
    (&stream).write_all(line.as_bytes()).unwrap();
    // From another thread: the VMM may hold these writes back until the guest reads.
    let reader = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || (&stream).write_all(&then).map(|_| stream));
    let got = common::read_slowly(reader, out);
    let o = child.wait_with_output().unwrap();
    let _ = writer.join();
    assert_eq!(got, out, "bytes from the guest");
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(0), "{serial}\n{stderr}");
    assert!(!serial.contains("FAIL"), "{serial}");
    (serial, stderr)
}

/// virtio-console with a host-side peer on the VMM's unix socket: the guest's line reaches the
/// peer, the peer echoes it, and the guest gets it back across several small receive buffers.
#[test]
fn virtio_console_echo_with_a_host_peer() {
    if !kvm_or_say("virtio_console_echo_with_a_host_peer") {
        return;
    }
    let sock = out_dir().join("console.sock");
    let _ = std::fs::remove_file(&sock);
    let extra = ["--console-socket".to_string(), sock.display().to_string()];
    let (serial, stderr) = console_echo(
        "virtio_console",
        &extra,
        &sock,
        "janus-console-ping\n",
        Vec::new(),
        0,
    );
    assert!(serial.contains("device id 0x0000000000000003"), "{serial}");
    assert!(
        serial.contains("console: echoed back in"),
        "{serial}\n{stderr}"
    );
}

/// A multiport virtio-console, as the builtin driver's agent channel uses it: the guest
/// learns both port names through the control queue, sees port 1's host side connect, and
/// gets its line echoed back by that port's peer (port 0, with no peer, stays silent); then
/// 1.5 MiB from the peer, more than the VMM buffers, arrive whole: the VMM stops reading the
/// peer while the guest is behind instead of dropping; and 1 MiB from the guest reaches a
/// peer that reads slowly: the VMM holds the guest's buffers instead of blocking or dropping.
#[test]
fn virtio_console_named_ports_with_a_host_peer() {
    if !kvm_or_say("virtio_console_named_ports_with_a_host_peer") {
        return;
    }
    let agent = out_dir().join("ports-agent.sock");
    let stdio = out_dir().join("ports-stdio.sock");
    let extra = [
        "--port".to_string(),
        format!("janus.agent={}", agent.display()),
        "--port".to_string(),
        format!("janus.stdio={}", stdio.display()),
    ];
    let bulk = common::console_bulk();
    let len = bulk.len();
    let (serial, stderr) = console_echo(
        "virtio_console_ports",
        &extra,
        &stdio,
        "janus-port-ping\n",
        bulk,
        common::CONSOLE_TX_BULK,
    );
    assert!(
        serial.contains("max_nr_ports 0x0000000000000002"),
        "{serial}"
    );
    assert!(serial.contains("port 0 name janus.agent"), "{serial}");
    assert!(serial.contains("port 1 name janus.stdio"), "{serial}");
    assert!(
        serial.contains(&format!(
            "port janus.stdio: echoed back, then bulk {len:#018x} in"
        )),
        "{serial}\n{stderr}"
    );
    assert!(!agent.exists() || std::os::unix::net::UnixStream::connect(&agent).is_err());
}

/// virtio-fs through a vhost-user backend: the guest finds the device and its tag, sets up
/// the queues, and reads a host file through virtiofsd with FUSE (INIT, LOOKUP, OPEN, READ,
/// RELEASE), notifications going to virtiofsd through ioeventfds and completions coming
/// back as interrupts; then resets the device and sets it up again (the rings go back to the
/// backend anew) and looks the file up once more. The VMM runs with seccomp on.
#[test]
fn virtio_fs_round_trip_through_virtiofsd() {
    if !kvm_or_say("virtio_fs_round_trip_through_virtiofsd") {
        return;
    }
    if let Err(e) = runtime::vm::virtiofsd::find(None) {
        janus_tests::not_run(
            "virtio_fs_round_trip_through_virtiofsd",
            janus_tests::Prereq::Virtiofsd,
            &e.to_string(),
            false,
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let content = "janus virtio-fs says hello";
    std::fs::write(share.join("hello.txt"), content).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (mut fsd, fsd_log) = rt.block_on(virtiofsd(tmp.path(), &share));
    let fs_arg = format!("myfs={}", fsd.socket().display());
    let r = run_guest(
        "virtio_fs",
        "virtio_fs",
        &["--shared-memory", "--fs", &fs_arg],
    );
    // virtiofsd ends when the VMM closes the session.
    let status = fsd
        .wait_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    let log = std::fs::read_to_string(&fsd_log).unwrap_or_default();
    assert_eq!(r.code, 0, "{}\n{}\nvirtiofsd:\n{log}", r.serial, r.stderr);
    assert!(
        !r.serial.contains("FAIL"),
        "{}\nvirtiofsd:\n{log}",
        r.serial
    );
    assert!(
        r.serial.contains("device id 0x000000000000001a"),
        "{}",
        r.serial
    );
    assert!(
        r.serial
            .contains("fs: tag myfs, request queues 0x0000000000000001"),
        "{}",
        r.serial
    );
    assert!(
        r.serial.contains(&format!("fs: read: {content}\n")),
        "{}\nvirtiofsd:\n{log}",
        r.serial
    );
    assert!(r.serial.contains("fs: lookup after reset"), "{}", r.serial);
    assert!(r.serial.contains("fs: round trip done"), "{}", r.serial);
    // virtiofsd served the session and ended with it.
    assert!(log.contains("hello.txt"), "virtiofsd:\n{log}");
    assert!(
        status.is_some_and(|s| s.success()),
        "virtiofsd {status:?}:\n{log}"
    );
}

/// `--fs` without memfd-backed guest RAM is refused before anything starts.
#[test]
fn virtio_fs_needs_shared_memory() {
    let o = Command::new(env!("CARGO_BIN_EXE_janus-vmm"))
        .args([
            "--kernel",
            "/nonexistent/vmlinux",
            "--fs",
            "myfs=/nonexistent.sock",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--shared-memory"), "{e}");
}
