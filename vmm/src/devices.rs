//! Port and MMIO dispatch for the legacy devices: the 8250 UART (vm-superio) on COM1, the
//! i8042 reset line, and the ACPI sleep registers that power the VM off. Everything else reads
//! as all ones and ignores writes, as absent hardware does.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::irq::IrqLine;
use crate::layout;
use crate::virtio::mmio::MmioTransport;

/// Why the guest stopped, when it asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStop {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// i8042 reset (Linux's `reboot` on this machine model).
    Reset,
}

/// Exit counters (for the benchmark and for debugging).
#[derive(Debug, Default)]
pub struct Stats {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
}

pub type SerialDev = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

pub struct Devices {
    serial: Mutex<SerialDev>,
    /// virtio-mmio devices: (base address, transport). The transport is shared with the
    /// event loop, which runs its queues on notifications.
    mmio: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
    pub stats: Stats,
}

impl Devices {
    pub fn new(serial_irq: IrqLine, out: Box<dyn Write + Send>) -> Devices {
        Devices {
            serial: Mutex::new(Serial::new(serial_irq, out)),
            mmio: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Adds a virtio-mmio device at `base` (one `VIRTIO_MMIO_SIZE` window).
    pub fn add_mmio(&mut self, base: u64, t: Arc<Mutex<MmioTransport>>) {
        self.mmio.push((base, t));
    }

    fn mmio_at(&self, addr: u64) -> Option<(u64, std::sync::MutexGuard<'_, MmioTransport>)> {
        self.mmio
            .iter()
            .find(|(base, _)| (*base..*base + layout::VIRTIO_MMIO_SIZE).contains(&addr))
            .map(|(base, t)| (addr - base, t.lock().unwrap_or_else(|e| e.into_inner())))
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, SerialDev> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.stats.pio.fetch_add(1, Ordering::Relaxed);
        data.fill(0xff);
        match port {
            p if (layout::SERIAL_PORT..layout::SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial().read((p - layout::SERIAL_PORT) as u8);
            }
            layout::SLEEP_STATUS_PORT => data.fill(0),
            _ => {}
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestStop> {
        self.stats.pio.fetch_add(1, Ordering::Relaxed);
        let v = data.first().copied().unwrap_or(0);
        match port {
            p if (layout::SERIAL_PORT..layout::SERIAL_PORT + 8).contains(&p) => {
                let mut s = self.serial();
                if let Err(e) = s.write((p - layout::SERIAL_PORT) as u8, v) {
                    log::debug!("serial write: {e:?}");
                }
                if p == layout::SERIAL_PORT {
                    let _ = s.writer_mut().flush();
                }
                None
            }
            layout::I8042_PORT if v == 0xfe => Some(GuestStop::Reset),
            layout::SLEEP_CONTROL_PORT => {
                // SLP_EN (bit 5) with SLP_TYP (bits 2..4) of S5.
                let slp_typ = (v >> 2) & 0x7;
                (v & 0x20 != 0 && slp_typ == layout::S5_SLP_TYP).then_some(GuestStop::PowerOff)
            }
            _ => None,
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.stats.mmio.fetch_add(1, Ordering::Relaxed);
        match self.mmio_at(addr) {
            Some((off, mut t)) => t.read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.stats.mmio.fetch_add(1, Ordering::Relaxed);
        if let Some((off, mut t)) = self.mmio_at(addr) {
            t.write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_power_off_and_reset() {
        let sink = Sink::default();
        let d = Devices::new(
            IrqLine::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            Box::new(sink.clone()),
        );
        for b in b"hi\n" {
            assert_eq!(d.pio_write(layout::SERIAL_PORT, &[*b]), None);
        }
        assert_eq!(&sink.0.lock().unwrap()[..], b"hi\n");
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        d.pio_read(layout::SERIAL_PORT + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(d.pio_write(layout::SLEEP_CONTROL_PORT, &[5 << 2]), None);
        assert_eq!(
            d.pio_write(layout::SLEEP_CONTROL_PORT, &[(5 << 2) | 0x20]),
            Some(GuestStop::PowerOff)
        );
        assert_eq!(
            d.pio_write(layout::I8042_PORT, &[0xfe]),
            Some(GuestStop::Reset)
        );
        let mut x = [0u8; 4];
        d.pio_read(0x80, &mut x);
        assert_eq!(x, [0xff; 4]);
        assert_eq!(d.stats.pio.load(Ordering::Relaxed), 8);
    }
}
