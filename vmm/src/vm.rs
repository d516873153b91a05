//! One microVM: KVM VM with in-kernel irqchip and PIT, memfd-backed RAM, the loaded guest,
//! ACPI tables, legacy devices, and a thread per vCPU running until the guest powers off,
//! resets, triple-faults, or KVM reports an error.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{self, Preference};
use crate::cpu::{self, CpuidFilter, Entry};
use crate::devices::{Devices, GuestStop};
use crate::error::{io, Error, KvmContext, Result};
use crate::events::{self, EventLoop, Handler, QueueEvents};
use crate::irq::IrqLine;
use crate::memory::{self, GuestMemory};
use crate::virtio::blk::Block;
use crate::virtio::console::{Console, ConsoleHandler};
use crate::virtio::fs::Fs;
use crate::virtio::mmio::{self, MmioTransport, SharedDevice};
use crate::virtio::net::{self, Net, NetHandler};
use crate::virtio::{console, lock, QueueNotifier};
use crate::{acpi, layout};

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Where the serial console goes (`None`: the VMM's stdout).
    pub serial_log: Option<PathBuf>,
    pub cpuid: CpuidFilter,
    pub entry: Preference,
    /// virtio-blk disks: (image file, read-only).
    pub disks: Vec<(PathBuf, bool)>,
    /// virtio-net devices: (tap name, MAC).
    pub taps: Vec<(String, [u8; 6])>,
    /// Ports of one virtio-console device, each a name (`None`: an unnamed port, no
    /// multiport when it is the only one) and the unix socket the VMM listens on for it.
    pub console_ports: Vec<(Option<String>, PathBuf)>,
    /// virtio-fs devices: (tag, vhost-user socket of the backend, e.g. virtiofsd).
    pub fs: Vec<(String, PathBuf)>,
    /// Guest RAM in a memfd a vhost-user backend can map (virtio-fs); otherwise anonymous
    /// memory with huge pages.
    pub shared_memory: bool,
    /// Confine the VMM with its seccomp filter before the guest runs (off only to debug).
    pub seccomp: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: 128,
            vcpus: 1,
            serial_log: None,
            cpuid: CpuidFilter::default(),
            entry: Preference::default(),
            disks: Vec::new(),
            taps: Vec::new(),
            console_ports: Vec::new(),
            fs: Vec::new(),
            shared_memory: false,
            seccomp: true,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    Guest(GuestStop),
    /// Triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not go on (internal error, failed entry, unknown exit).
    Failed(String),
}

pub struct Vm {
    _kvm: Kvm,
    _vm: VmFd,
    mem: GuestMemory,
    _memfd: Option<std::fs::File>,
    vcpus: Vec<VcpuFd>,
    pub devices: Arc<Devices>,
    pub entry: Entry,
    seccomp: bool,
    /// The device event loop's subscribers (queue notifications, taps, the console sockets).
    handlers: Vec<Handler>,
    /// When setup finished (the first KVM_RUN follows).
    pub ready_at: Instant,
}

/// Puts a virtio device in `slot`: its transport, its interrupt as an irqfd, and its queue
/// events on the event loop. The transport is returned for the device's own event handler.
fn attach(
    vm: &VmFd,
    devices: &mut Devices,
    mem: &GuestMemory,
    slot: &acpi::MmioSlot,
    dev: SharedDevice,
    handlers: &mut Vec<Handler>,
) -> Result<Arc<dyn QueueNotifier>> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
    vm.register_irqfd(&evt, slot.irq)
        .kvm("KVM_IRQFD (virtio)")?;
    let (mut notify, mut calls) = (Vec::new(), Vec::new());
    let d = lock(&dev);
    // One ioeventfd per queue: KVM matches the queue index written to QueueNotify.
    let backend = d.backend_queues();
    for queue in 0..d.queue_max_sizes().len() as u32 {
        let addr = IoEventAddress::Mmio(slot.base + mmio::REG_QUEUE_NOTIFY);
        if let Some(b) = &backend {
            // Straight to the vhost-user backend: the VMM never sees these.
            vm.register_ioevent(&b.kick[queue as usize], &addr, queue)
                .kvm("KVM_IOEVENTFD (virtio)")?;
            continue;
        }
        let n = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        vm.register_ioevent(&n, &addr, queue)
            .kvm("KVM_IOEVENTFD (virtio)")?;
        notify.push((n, queue as usize));
    }
    for call in backend.iter().flat_map(|b| b.call) {
        calls.push(call.try_clone().map_err(io("eventfd"))?);
    }
    drop(d);
    let irq = Box::new(IrqLine::new(evt));
    let transport = Arc::new(Mutex::new(MmioTransport::new(dev, mem.clone(), irq)));
    devices.add_mmio(slot.base, transport.clone());
    let queue_events = QueueEvents::new(transport.clone(), notify, calls);
    if !queue_events.is_empty() {
        handlers.push(Arc::new(Mutex::new(queue_events)));
    }
    Ok(transport)
}

/// The virtio-mmio windows and interrupts of `n` devices, in slot order.
pub fn mmio_slots(n: usize) -> Vec<acpi::MmioSlot> {
    (0..n)
        .map(|i| acpi::MmioSlot {
            base: layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE,
            irq: layout::FIRST_DEVICE_IRQ + i as u32,
        })
        .collect()
}

/// The signal that kicks vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vm {
    pub fn new(cfg: &VmConfig) -> Result<Vm> {
        if cfg.vcpus == 0 || cfg.vcpus > 32 {
            return Err(Error::Config(format!("{} vCPUs: 1 to 32", cfg.vcpus)));
        }
        crate::virtio::fs::check_config(&cfg.fs, cfg.shared_memory)?;
        let kvm = Kvm::new().map_err(Error::Kvm)?;
        let vm = kvm.create_vm().kvm("KVM_CREATE_VM")?;
        vm.set_tss_address(0xfffb_d000).kvm("KVM_SET_TSS_ADDR")?;
        vm.create_irq_chip().kvm("KVM_CREATE_IRQCHIP")?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).kvm("KVM_CREATE_PIT2")?;
        let mem_bytes = cfg.mem_mib << 20;
        let (mem, memfd) = memory::create(mem_bytes, cfg.shared_memory)?;
        memory::register(&vm, &mem)?;
        let loaded = boot::load(
            &mem,
            mem_bytes,
            &cfg.kernel,
            cfg.initrd.as_deref(),
            &cfg.cmdline,
            cfg.entry,
        )?;

        let out: Box<dyn Write + Send> = match &cfg.serial_log {
            Some(p) => Box::new(
                std::fs::File::create(p).map_err(io(format!("serial log {}", p.display())))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        vm.register_irqfd(&serial_evt, layout::SERIAL_IRQ)
            .kvm("KVM_IRQFD (serial)")?;
        let mut devices = Devices::new(IrqLine::new(serial_evt), out);
        let mut handlers: Vec<Handler> = Vec::new();
        let n_console = !cfg.console_ports.is_empty() as usize;
        let slots = mmio_slots(cfg.disks.len() + cfg.taps.len() + cfg.fs.len() + n_console);
        for ((path, ro), slot) in cfg.disks.iter().zip(&slots) {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(!ro)
                .open(path)
                .map_err(io(format!("disk {}", path.display())))?;
            let id = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let blk = Block::new(f, *ro, &id).map_err(io(format!("disk {}", path.display())))?;
            let blk = Arc::new(Mutex::new(blk));
            attach(&vm, &mut devices, &mem, slot, blk, &mut handlers)?;
        }
        for ((name, mac), slot) in cfg.taps.iter().zip(&slots[cfg.disks.len()..]) {
            let tap = Arc::new(net::open_tap(name).map_err(io(format!("tap {name}")))?);
            let dev = Arc::new(Mutex::new(Net::new(tap.clone(), *mac)));
            let transport = attach(&vm, &mut devices, &mem, slot, dev.clone(), &mut handlers)?;
            handlers.push(Arc::new(Mutex::new(NetHandler::new(dev, transport, tap))));
        }
        let fs_slots = &slots[cfg.disks.len() + cfg.taps.len()..];
        for ((tag, socket), slot) in cfg.fs.iter().zip(fs_slots) {
            let fs = Arc::new(Mutex::new(Fs::connect(tag, socket)?));
            attach(&vm, &mut devices, &mem, slot, fs, &mut handlers)?;
        }
        if let (false, Some(slot)) = (cfg.console_ports.is_empty(), slots.last()) {
            if cfg.console_ports.len() > console::MAX_PORTS {
                return Err(Error::Config(format!(
                    "{} console ports: at most {}",
                    cfg.console_ports.len(),
                    console::MAX_PORTS
                )));
            }
            let mut listeners = Vec::new();
            for (_, path) in &cfg.console_ports {
                let _ = std::fs::remove_file(path);
                let listener = std::os::unix::net::UnixListener::bind(path)
                    .map_err(io(format!("console socket {}", path.display())))?;
                listeners.push(listener);
            }
            let names = cfg.console_ports.iter().map(|(n, _)| n.clone()).collect();
            let dev = Arc::new(Mutex::new(Console::new(names).map_err(io("eventfd"))?));
            let transport = attach(&vm, &mut devices, &mem, slot, dev.clone(), &mut handlers)?;
            let handler = ConsoleHandler::new(dev, transport, listeners).map_err(io("eventfd"))?;
            handlers.push(Arc::new(Mutex::new(handler)));
        }
        acpi::write(&mem, &acpi::build(cfg.vcpus, &slots)?)?;
        let devices = Arc::new(devices);

        let base = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .kvm("KVM_GET_SUPPORTED_CPUID")?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = vm.create_vcpu(id as u64).kvm("KVM_CREATE_VCPU")?;
            let mut cpuid = base.clone();
            cpu::filter_cpuid(&mut cpuid, id, cfg.vcpus, cfg.cpuid);
            let entry = (id == 0).then_some(loaded.entry);
            cpu::configure(&vcpu, &mem, &cpuid, id, entry)?;
            vcpus.push(vcpu);
        }
        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            mem,
            _memfd: memfd,
            vcpus,
            devices,
            entry: loaded.entry,
            seccomp: cfg.seccomp,
            handlers,
            ready_at: Instant::now(),
        })
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Runs the vCPUs until the guest stops; `timeout` ends a run that goes on too long.
    pub fn run(self, timeout: Option<Duration>) -> Result<VmExit> {
        register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| Error::Config(format!("kick signal handler: {e}")))?;
        // Each thread confines itself once started (the filter does not allow starting
        // threads); the main thread once it has started them all.
        let filter = if self.seccomp {
            Some(crate::seccomp::filter()?)
        } else {
            None
        };
        let stop = Arc::new(AtomicBool::new(false));
        let result: Arc<Mutex<Option<VmExit>>> = Arc::default();
        let mut threads = Vec::new();
        for (i, vcpu) in self.vcpus.into_iter().enumerate() {
            let (stop, result, devices) = (stop.clone(), result.clone(), self.devices.clone());
            let filter = filter.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    let r = match filter.as_deref().map(seccompiler::apply_filter) {
                        Some(Err(e)) => Some(VmExit::Failed(format!("seccomp: {e}"))),
                        _ => run_vcpu(vcpu, &devices, &stop),
                    };
                    let mut g = result.lock().unwrap_or_else(|e| e.into_inner());
                    if g.is_none() {
                        *g = r;
                    }
                    stop.store(true, Ordering::SeqCst);
                })
                .map_err(io("spawn vCPU thread"))?;
            threads.push(t);
        }
        // The device event loop, confined like the vCPUs (its epoll set is made before).
        if !self.handlers.is_empty() {
            let mut event_loop = EventLoop::new(self.handlers.clone())?;
            let (stop, filter) = (stop.clone(), filter.clone());
            let t = std::thread::Builder::new()
                .name("devices".into())
                .spawn(move || {
                    if let Some(Err(e)) = filter.as_deref().map(seccompiler::apply_filter) {
                        log::error!("device thread seccomp: {e}");
                        return;
                    }
                    event_loop.run(&stop);
                })
                .map_err(io("spawn device thread"))?;
            threads.push(t);
        }
        if let Some(f) = &filter {
            if let Err(e) = seccompiler::apply_filter(f) {
                stop.store(true, Ordering::SeqCst);
                result
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(VmExit::Failed(format!("seccomp: {e}")));
            }
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        while !stop.load(Ordering::SeqCst) {
            if deadline.is_some_and(|d| Instant::now() > d) {
                let mut g = result.lock().unwrap_or_else(|e| e.into_inner());
                g.get_or_insert(VmExit::Failed("timed out".into()));
                stop.store(true, Ordering::SeqCst);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Kick every vCPU out of KVM_RUN until its thread has seen `stop`.
        for t in &threads {
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for t in threads {
            let _ = t.join();
        }
        // Guest output the guest saw delivered (its buffers were returned) but a peer has not
        // read yet: hand it over before the process ends (the agent's last words, a
        // container's last output), waiting a bounded time for slow peers.
        events::drain(&self.handlers, Instant::now() + Duration::from_secs(2));
        let r = result.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(r.unwrap_or(VmExit::Failed("no vCPU reported an exit".into())))
    }
}

/// One vCPU's loop; `None` when another vCPU ended the run.
fn run_vcpu(mut vcpu: VcpuFd, devices: &Devices, stop: &AtomicBool) -> Option<VmExit> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if let Some(s) = devices.pio_write(port, data) {
                    return Some(VmExit::Guest(s));
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => devices.pio_read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => devices.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => devices.mmio_write(addr, data),
            Ok(VcpuExit::Hlt) => std::thread::sleep(Duration::from_millis(1)),
            Ok(VcpuExit::Shutdown) => return Some(VmExit::TripleFault),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(VmExit::Failed(format!(
                    "KVM entry failed: reason {reason:#x} on cpu {cpu}"
                )))
            }
            Ok(VcpuExit::InternalError) => {
                return Some(VmExit::Failed("KVM internal error".into()))
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => return Some(VmExit::Failed(format!("unhandled exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(VmExit::Failed(format!("KVM_RUN: {e}"))),
        }
    }
}
