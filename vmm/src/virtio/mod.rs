//! virtio devices on the MMIO transport (virtio 1.2, "virtio-mmio" version 2). Queues are
//! `virtio-queue`'s split queues; the transport's register file is ours (the rust-vmm crate
//! that has one, virtio-device, is not published on crates.io).
//!
//! Layout: the transport (`mmio`) knows only what every device has (register file, queues,
//! feature negotiation, interrupt status) and reaches the device through `VirtioDevice`; it
//! signals the guest through `interrupt`. Each device has its own folder: `device.rs` is the
//! device model, `event_handler.rs` (console, net) watches the device's host fds on the event
//! loop (`events.rs`) and asks the transport to run queues through `QueueNotifier`.

pub mod blk;
pub mod console;
pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod net;

use std::sync::{Mutex, MutexGuard};

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
    /// The driver's accepted features (FEATURES_OK was set).
    fn ack_features(&mut self, _features: u64) {}
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

/// How a device's own event handler (host fds: a tap, console sockets) gets queue work done:
/// it asks the transport to run a queue as if the driver had notified it, after releasing the
/// device, since the transport locks the device to process the queue.
pub trait QueueNotifier: Send + Sync {
    /// Processes queue `index` if the device is live and the queue valid; raises the
    /// interrupt when buffers were used.
    fn notify(&self, index: usize);
    /// The vhost-user backend serving the device's queues used buffers.
    fn backend_used(&self);
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

/// Locks a device or transport. A poisoned lock still holds a usable one: a panic on one
/// thread must not take the guest's devices down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
