//! virtio devices on the MMIO transport (virtio 1.2, "virtio-mmio" version 2). Queues are
//! `virtio-queue`'s split queues; the transport's register file is ours (the rust-vmm crate
//! that has one, virtio-device, is not published on crates.io).

pub mod blk;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Feature bits every device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (the driver's progress).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// What a device model implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// virtio device id (2 = block, 3 = console, 19 = vsock, ...).
    fn device_type(&self) -> u32;
    /// One entry per queue: its maximum size.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Handles what the driver made available on queue `index`; true when buffers were
    /// returned (the driver should get an interrupt).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Data from the host side (a received frame); the queue to process for it.
    fn input(&mut self, _data: Vec<u8>) -> Option<usize> {
        None
    }
    /// The driver's accepted features (FEATURES_OK was set).
    fn ack_features(&mut self, _features: u64) {}
    /// Something happened on the host side of port `port` (console ports).
    fn host_event(&mut self, _port: usize, _ev: HostEvent) {}
    /// Whether port `port` takes more host input now; when not, its host side is not read
    /// until the guest has taken some (backpressure instead of dropping).
    fn wants_input(&self, _port: usize) -> bool {
        true
    }
    /// Retries output a host peer could not take yet (the device thread calls it after every
    /// round of events, at least every 100 ms); queues to run go to `take_kicks`.
    fn retry_output(&mut self) {}
    /// The VM has ended: write out what host peers have not taken yet, until `deadline`.
    fn drain_output(&mut self, _deadline: std::time::Instant) {}
    /// Queues the device wants processed next, e.g. a control reply to deliver after the
    /// driver's control message, or input that arrived for a port.
    fn take_kicks(&mut self) -> Vec<usize> {
        Vec::new()
    }
    /// The driver set DRIVER_OK with these features and queues. A device whose queues
    /// another process serves hands them over here; an error sets DEVICE_NEEDS_RESET.
    fn activate(
        &mut self,
        _features: u64,
        _queues: &[Queue],
        _mem: &GuestMemory,
    ) -> Result<(), String> {
        Ok(())
    }
    /// `Some` when a vhost-user backend serves the queues rather than `process_queue`.
    fn backend_queues(&self) -> Option<BackendQueues<'_>> {
        None
    }
}

/// What happened on the host side of a device's port.
#[derive(Debug)]
pub enum HostEvent {
    Connected,
    Data(Vec<u8>),
    Disconnected,
}

/// A backend-served device's eventfds, one of each per queue: `kick` is the queue's
/// ioeventfd (KVM signals it on QueueNotify, the backend reads it), `call` is what the
/// backend signals when it used buffers (the device event loop raises the interrupt).
pub struct BackendQueues<'a> {
    pub kick: &'a [EventFd],
    pub call: &'a [EventFd],
}

/// Takes the chains the driver made available on a driver-to-device queue: reads each whole
/// (`None` for one that is unreadable or longer than `max` bytes), hands it to `f`, and
/// returns it used with nothing written; stops early when `f` says false (the device cannot
/// take more now). True when any chain was used.
pub fn drain_readable(
    queue: &mut Queue,
    mem: &GuestMemory,
    max: usize,
    mut f: impl FnMut(Option<Vec<u8>>) -> bool,
) -> bool {
    use std::io::Read;
    use virtio_queue::QueueT;
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut data = Vec::new();
        let ok = virtio_queue::Reader::new(mem, chain)
            .ok()
            .filter(|r| r.available_bytes() <= max)
            .map(|mut r| r.read_to_end(&mut data).is_ok())
            .unwrap_or(false);
        let more = f(ok.then_some(data));
        if queue.add_used(mem, head, 0).is_err() {
            break;
        }
        used = true;
        if !more {
            break;
        }
    }
    used
}

/// Reads `data.len()` bytes at `offset` of a config space image.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = offset as usize;
    for (i, b) in data.iter_mut().enumerate() {
        *b = config.get(start + i).copied().unwrap_or(0);
    }
}
