//! The virtio-mmio register file (virtio 1.2 section 4.2.2, version 2) in front of a
//! `VirtioDevice`. Queue notifications reach `notify` (from the event loop's ioeventfds, or a
//! vCPU for a notification no ioeventfd matched); used buffers set the interrupt status and
//! raise the device's `VirtioInterrupt`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};

use super::interrupt::VirtioInterrupt;
use super::{
    lock, QueueNotifier, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const VERSION: u32 = 2;
pub const VENDOR: u32 = 0x4a4e_5553; // "JNUS"

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
pub const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
pub const REG_QUEUE_USED_LOW: u64 = 0x0a0;
pub const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

/// Interrupt status bit: a used buffer was returned.
pub const INT_VRING: u32 = 1;

/// A device as the transport and the device's own event handler share it. The transport
/// locks it for every register access and queue run; an event handler must not hold it
/// while calling the transport (`QueueNotifier`), which locks transport then device.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

pub struct MmioTransport {
    device: SharedDevice,
    mem: GuestMemory,
    irq: Box<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(
        device: SharedDevice,
        mem: GuestMemory,
        irq: Box<dyn VirtioInterrupt>,
    ) -> MmioTransport {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .map(|&n| Queue::new(n).expect("queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    fn features(&self) -> u64 {
        lock(&self.device).features() | VIRTIO_F_VERSION_1
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        lock(&self.device).reset();
    }

    /// Register reads; registers are 32 bits wide (config space aside), other widths read 0.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            lock(&self.device).read_config(offset - REG_CONFIG, data);
            return;
        }
        let v: u32 = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected().map(|q| q.max_size() as u32).unwrap_or(0),
            REG_QUEUE_READY => self.selected().map(|q| q.ready() as u32).unwrap_or(0),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        if data.len() == 4 {
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            lock(&self.device).write_config(offset - REG_CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let v = u32::from_le_bytes(b);
        // Queue setup is only allowed before DRIVER_OK (and while the queue is not ready).
        let configuring = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = !(0xffff_ffffu64 << shift);
                self.driver_features = (self.driver_features & mask) | ((v as u64) << shift);
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if configuring => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY if configuring => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH
                if configuring =>
            {
                if let Some(q) = self.selected() {
                    let (lo, hi) = if offset & 0x4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !0x4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            REG_QUEUE_NOTIFY => self.notify(v as usize),
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => self.set_status(v),
            _ => log::debug!("virtio-mmio: write {v:#x} at {offset:#x} ignored"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // FEATURES_OK only sticks if the driver accepted a subset of what we offered,
        // including VERSION_1 (no legacy interface here).
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.features() == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
            lock(&self.device).ack_features(self.driver_features);
        }
        let known = STATUS_ACKNOWLEDGE
            | STATUS_DRIVER
            | STATUS_DRIVER_OK
            | STATUS_FEATURES_OK
            | STATUS_FAILED;
        let going_live = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        // DEVICE_NEEDS_RESET is the device's to set; only a reset clears it.
        self.status = (v & known) | (self.status & STATUS_NEEDS_RESET);
        if going_live {
            let activated =
                lock(&self.device).activate(self.driver_features, &self.queues, &self.mem);
            if let Err(e) = activated {
                log::error!("virtio-mmio: {e}");
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    /// The driver notified queue `index`: process it if the device is live and the queue
    /// valid; raise the interrupt when buffers were used.
    pub fn notify(&mut self, index: usize) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_FAILED != 0 {
            return;
        }
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        if !q.ready() || !q.is_valid(&self.mem) {
            return;
        }
        if lock(&self.device).process_queue(index, q, &self.mem) {
            self.used_buffers();
        }
    }

    /// Buffers were used (by the device, or by the backend that serves its queues): the
    /// driver learns it from InterruptStatus, then the interrupt.
    fn used_buffers(&mut self) {
        self.interrupt_status |= INT_VRING;
        std::sync::atomic::fence(Ordering::SeqCst);
        if let Err(e) = self.irq.trigger() {
            log::warn!("virtio-mmio interrupt: {e}");
        }
    }

    /// The vhost-user backend serving this device's queues used buffers.
    pub fn backend_used_buffers(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 {
            self.used_buffers();
        }
    }

    pub fn device_type(&self) -> u32 {
        lock(&self.device).device_type()
    }

    pub fn status(&self) -> u32 {
        self.status
    }
}

/// The transport as a device's event handler and the event loop reach it.
impl QueueNotifier for Mutex<MmioTransport> {
    fn notify(&self, index: usize) {
        lock(self).notify(index);
    }

    fn backend_used(&self) {
        lock(self).backend_used_buffers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Dummy {
        notified: usize,
        resets: usize,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[9, 8, 7, 6], offset, data);
        }
        fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestMemory) -> bool {
            self.notified += 1;
            true
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn irq(evt: &EventFd) -> Box<dyn VirtioInterrupt> {
        Box::new(crate::irq::IrqLine::new(evt.try_clone().unwrap()))
    }

    fn transport() -> (MmioTransport, EventFd) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let d = Dummy {
            notified: 0,
            resets: 0,
        };
        let t = MmioTransport::new(Arc::new(Mutex::new(d)), mem, irq(&evt));
        (t, evt)
    }

    #[test]
    fn identity_registers_and_config() {
        let (mut t, _) = transport();
        assert_eq!(r32(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r32(&mut t, REG_VERSION), 2);
        assert_eq!(r32(&mut t, REG_DEVICE_ID), 42);
        w32(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 1);
        w32(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 1 << 3);
        assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 16);
        w32(&mut t, REG_QUEUE_SEL, 5);
        assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 0);
        let mut b = [0u8; 2];
        t.read(REG_CONFIG + 1, &mut b);
        assert_eq!(b, [8, 7]);
        // Odd widths on registers read as zero and are ignored on write.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(r32(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn features_ok_needs_a_subset_with_version_1() {
        let (mut t, _) = transport();
        w32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Without VERSION_1.
        w32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r32(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // With a feature we do not offer.
        w32(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w32(&mut t, REG_DRIVER_FEATURES, 1);
        w32(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w32(&mut t, REG_DRIVER_FEATURES, 1 << 4);
        w32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r32(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        w32(&mut t, REG_DRIVER_FEATURES, 1 << 3);
        w32(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r32(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Reset clears everything.
        w32(&mut t, REG_STATUS, 0);
        assert_eq!(r32(&mut t, REG_STATUS), 0);
    }

    /// Negotiates VERSION_1, sets queue 0 up (descriptor table high half `desc_high`) and
    /// brings the device to DRIVER_OK.
    fn bring_up(t: &mut MmioTransport, desc_high: u32) {
        w32(t, REG_DRIVER_FEATURES_SEL, 1);
        w32(t, REG_DRIVER_FEATURES, 1);
        w32(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w32(t, REG_QUEUE_NUM, 16);
        w32(t, REG_QUEUE_DESC_LOW, 0x1000);
        w32(t, REG_QUEUE_DESC_HIGH, desc_high);
        w32(t, REG_QUEUE_AVAIL_LOW, 0x2000);
        w32(t, REG_QUEUE_USED_LOW, 0x3000);
        w32(t, REG_QUEUE_READY, 1);
        w32(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    #[test]
    fn notify_only_after_driver_ok_on_a_valid_queue() {
        let (mut t, evt) = transport();
        // Before DRIVER_OK: nothing happens.
        w32(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(evt.read().is_err());
        bring_up(&mut t, 0);
        // A queue that does not exist, then the real one.
        w32(&mut t, REG_QUEUE_NOTIFY, 3);
        assert!(evt.read().is_err());
        w32(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), INT_VRING);
        w32(&mut t, REG_INTERRUPT_ACK, INT_VRING);
        assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), 0);
        // Queue addresses are frozen after DRIVER_OK.
        w32(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r32(&mut t, REG_QUEUE_READY), 1);
    }

    /// A device served elsewhere: counts activations, fails them on request.
    struct Served {
        activations: Arc<std::sync::atomic::AtomicUsize>,
        fail: bool,
    }
    impl VirtioDevice for Served {
        fn device_type(&self) -> u32 {
            26
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestMemory) -> bool {
            false
        }
        fn activate(
            &mut self,
            features: u64,
            queues: &[Queue],
            _: &GuestMemory,
        ) -> Result<(), String> {
            assert_eq!(features, VIRTIO_F_VERSION_1);
            assert!(queues[0].ready() && queues[0].desc_table() == 0x1000);
            self.activations.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                Err("backend gone".into())
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn driver_ok_activates_once_and_a_failure_needs_reset() {
        for fail in [false, true] {
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let d = Served {
                activations: n.clone(),
                fail,
            };
            let mut t = MmioTransport::new(Arc::new(Mutex::new(d)), mem, irq(&evt));
            bring_up(&mut t, 0);
            // DRIVER_OK written again: no second activation.
            let s = r32(&mut t, REG_STATUS) & !STATUS_NEEDS_RESET;
            w32(&mut t, REG_STATUS, s);
            assert_eq!(n.load(Ordering::SeqCst), 1);
            assert_eq!(r32(&mut t, REG_STATUS) & STATUS_NEEDS_RESET != 0, fail);
            // A backend's completion interrupts only a live device.
            t.backend_used_buffers();
            assert_eq!(evt.read().unwrap(), 1);
            w32(&mut t, REG_STATUS, 0);
            t.backend_used_buffers();
            assert!(evt.read().is_err());
        }
    }

    #[test]
    fn a_queue_outside_guest_memory_is_not_processed() {
        let (mut t, evt) = transport();
        bring_up(&mut t, 0x10);
        w32(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(evt.read().is_err());
    }
}
