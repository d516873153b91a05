//! `janus-vmm`: boots one microVM and runs it until the guest powers off.
//!
//! janus-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--mem-mib N] [--vcpus N]
//!           [--serial-log PATH] [--hide-cpuid cx16,xsave] [--entry pvh|64]
//!           [--timeout-ms N] [--disk PATH[,ro]]... [--tap NAME[,mac=M]]... [--shared-memory]
//!           [--console-socket PATH] [--port NAME=PATH]...
//!           [--fs TAG=SOCKET]... (--fs needs --shared-memory)
//!           [--pidfile PATH] [--name NAME] [--no-seccomp]
//!           [--acpi-dump DIR]
//!
//! Exit status: 0 when the guest powered off or reset, 1 on an error, 2 on a triple fault or
//! a KVM failure, 3 on timeout.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmm::boot::Preference;
use vmm::{Vm, VmConfig, VmExit};

/// What the command line asks for.
struct Args {
    cfg: VmConfig,
    timeout: Option<Duration>,
    acpi_dump: Option<PathBuf>,
    pidfile: Option<PathBuf>,
}

fn parse() -> anyhow::Result<Args> {
    let mut cfg = VmConfig::default();
    let mut pidfile = None;
    let mut timeout = None;
    let mut dump = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--kernel" => cfg.kernel = val()?.into(),
            "--initrd" => cfg.initrd = Some(val()?.into()),
            "--cmdline" => cfg.cmdline = val()?,
            "--mem-mib" => cfg.mem_mib = val()?.parse().context("--mem-mib")?,
            "--vcpus" => cfg.vcpus = val()?.parse().context("--vcpus")?,
            "--serial-log" => cfg.serial_log = Some(val()?.into()),
            "--timeout-ms" => {
                timeout = Some(Duration::from_millis(
                    val()?.parse().context("--timeout-ms")?,
                ))
            }
            "--acpi-dump" => dump = Some(PathBuf::from(val()?)),
            "--shared-memory" => cfg.shared_memory = true,
            "--console-socket" => cfg.console_ports.push((None, val()?.into())),
            "--port" => {
                // A named virtio-console port (multiport), served on a unix socket.
                let v = val()?;
                let (name, path) = v
                    .split_once('=')
                    .with_context(|| format!("--port {v}: NAME=SOCKET_PATH"))?;
                if name.is_empty() || name.len() > 64 {
                    bail!("--port {v}: a name of 1 to 64 bytes");
                }
                cfg.console_ports
                    .push((Some(name.to_string()), path.into()));
            }
            "--fs" => {
                // TAG=SOCKET: virtio-fs with the vhost-user backend (virtiofsd) at SOCKET.
                let v = val()?;
                let (tag, sock) = v
                    .split_once('=')
                    .with_context(|| format!("--fs {v}: TAG=SOCKET"))?;
                cfg.fs.push((tag.to_string(), sock.into()));
            }
            "--tap" => {
                // NAME or NAME,mac=aa:bb:cc:dd:ee:ff
                let v = val()?;
                let (name, mac) = match v.split_once(",mac=") {
                    Some((n, m)) => (n.to_string(), parse_mac(m)?),
                    None => (
                        v.clone(),
                        [0x52, 0x54, 0x00, 0x4a, 0x4e, cfg.taps.len() as u8],
                    ),
                };
                cfg.taps.push((name, mac));
            }
            "--no-seccomp" => cfg.seccomp = false,
            "--pidfile" => pidfile = Some(PathBuf::from(val()?)),
            // Only there for `ps`: which container this VM runs.
            "--name" => {
                val()?;
            }
            "--disk" => {
                // PATH or PATH,ro
                let v = val()?;
                let (p, ro) = match v.strip_suffix(",ro") {
                    Some(p) => (p.to_string(), true),
                    None => (v, false),
                };
                cfg.disks.push((p.into(), ro));
            }
            "--entry" => {
                cfg.entry = match val()?.as_str() {
                    "pvh" => Preference::Pvh,
                    "64" => Preference::Long64,
                    o => bail!("--entry {o}: pvh or 64"),
                }
            }
            "--hide-cpuid" => {
                for f in val()?.split(',') {
                    match f {
                        "cx16" => cfg.cpuid.hide_cx16 = true,
                        "xsave" => cfg.cpuid.hide_xsave = true,
                        o => bail!("--hide-cpuid {o}: cx16 or xsave"),
                    }
                }
            }
            o => bail!("unknown argument {o}"),
        }
    }
    if dump.is_none() && cfg.kernel.as_os_str().is_empty() {
        bail!("--kernel is required");
    }
    Ok(Args {
        cfg,
        timeout,
        acpi_dump: dump,
        pidfile,
    })
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {s}"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {s}: six bytes"))
}

fn main() {
    let started = Instant::now();
    let code = match real_main(started) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("janus-vmm: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn real_main(started: Instant) -> anyhow::Result<i32> {
    let Args {
        cfg,
        timeout,
        acpi_dump: dump,
        pidfile,
    } = parse()?;
    if let Some(p) = &pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("pidfile {}", p.display()))?;
    }
    if let Some(dir) = dump {
        // The tables as the guest would get them, one file per table (for iasl -d).
        std::fs::create_dir_all(&dir)?;
        let n = cfg.disks.len()
            + cfg.taps.len()
            + cfg.fs.len()
            + !cfg.console_ports.is_empty() as usize;
        let slots = vmm::vm::mmio_slots(n);
        for t in vmm::acpi::build(cfg.vcpus, &slots)? {
            std::fs::write(dir.join(format!("{}.dat", t.signature)), &t.bytes)?;
        }
        return Ok(0);
    }
    let vm = Vm::new(&cfg).context("setting up the VM")?;
    eprintln!(
        "janus-vmm: ready in {} us ({:?})",
        vm.ready_at.duration_since(started).as_micros(),
        vm.entry
    );
    let devices = vm.devices.clone();
    let t = Instant::now();
    let exit = vm.run(timeout)?;
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    let pio = devices.stats.pio.load(std::sync::atomic::Ordering::Relaxed);
    let mmio = devices
        .stats
        .mmio
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "janus-vmm: {exit:?} after {:.3} s; exits: {pio} port IO, {mmio} MMIO ({:.0}/s)",
        secs,
        (pio + mmio) as f64 / secs
    );
    Ok(match exit {
        VmExit::Guest(_) => 0,
        VmExit::Failed(m) if m == "timed out" => 3,
        VmExit::TripleFault | VmExit::Failed(_) => 2,
    })
}
