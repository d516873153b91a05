//! How a virtio transport signals the driver. The transport keeps the interrupt status
//! register; raising the interrupt is this trait's, so the transport does not depend on
//! where the line comes from (an irqfd in the VM, a plain eventfd in tests).

use crate::irq::IrqLine;

/// The device's interrupt, as the transport raises it after setting a status bit.
pub trait VirtioInterrupt: Send {
    fn trigger(&self) -> std::io::Result<()>;
}

impl VirtioInterrupt for IrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}
