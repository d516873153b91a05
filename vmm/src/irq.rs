//! Interrupt lines: an eventfd KVM turns into a GSI edge (irqfd). The legacy serial port
//! raises one through vm-superio's `Trigger`, the virtio transport through `VirtioInterrupt`;
//! the line itself knows neither.

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line, registered as an irqfd for its GSI.
pub struct IrqLine(EventFd);

impl IrqLine {
    pub fn new(evt: EventFd) -> IrqLine {
        IrqLine(evt)
    }

    /// Raises the interrupt (one edge).
    pub fn raise(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}
