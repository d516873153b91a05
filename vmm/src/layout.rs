//! Guest physical memory map. Low memory follows what Linux's x86 boot code expects (zero page
//! and command line below 1 MiB, the kernel from 1 MiB); devices sit in a hole below 4 GiB.

/// The GDT and IDT the vCPU starts with.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, its memory map and module list.
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// Linux's `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (grows down, below the page tables).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapped page tables for 64-bit entry: PML4, one PDPT, four PDs of 2 MiB pages
/// (the low 4 GiB, device hole included, so a test guest can reach MMIO directly).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// End of conventional low RAM (the EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP first (also where Linux scans for it), the rest after it.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// Kernels load from here up.
pub const HIMEM_START: u64 = 0x100000;
/// The device hole: RAM above 3 GiB moves to 4 GiB and up.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio slots, one page each; their interrupts count up from `FIRST_DEVICE_IRQ`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const FIRST_DEVICE_IRQ: u32 = 5;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// COM1, IRQ 4.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 command port: 0xfe there is the classic reset.
pub const I8042_PORT: u16 = 0x64;
/// ACPI hardware-reduced sleep control and status registers (FADT): writing SLP_TYP 5 with
/// SLP_EN powers the VM off.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// `SLP_TYP` of S5 in `\_S5_` and the sleep control register.
pub const S5_SLP_TYP: u8 = 5;

/// The RAM ranges (start, length) for `mem_bytes` of guest memory: below the device hole, and
/// the rest from 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut v = vec![(0, low)];
    if mem_bytes > low {
        v.push((MMIO_GAP_END, mem_bytes - low));
    }
    v
}

/// The e820 map the guest gets: (start, length, type) with 1 = RAM, 2 = reserved.
pub fn e820(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut v = vec![(0, EBDA_START, 1)];
    v.push((EBDA_START, HIMEM_START - EBDA_START, 2));
    for (start, len) in ram_ranges(mem_bytes) {
        if start == 0 {
            if len > HIMEM_START {
                v.push((HIMEM_START, len - HIMEM_START, 1));
            }
        } else {
            v.push((start, len, 1));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_above_the_hole_moves_to_4g() {
        assert_eq!(ram_ranges(256 << 20), [(0, 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            [
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        let m = e820(256 << 20);
        assert_eq!(m[0], (0, EBDA_START, 1));
        assert_eq!(
            m.last().unwrap(),
            &(HIMEM_START, (256 << 20) - HIMEM_START, 1)
        );
        // Nothing the VMM places in low memory collides.
        let fixed = [
            GDT_ADDR,
            IDT_ADDR,
            PVH_INFO_ADDR,
            PVH_MODLIST_ADDR,
            PVH_MEMMAP_ADDR,
            ZERO_PAGE_ADDR,
            PML4_ADDR,
            PDPT_ADDR,
            PD_ADDR,
            CMDLINE_ADDR,
        ];
        assert!(fixed.windows(2).all(|w| w[0] < w[1]));
        const {
            assert!(PD_ADDR + PD_COUNT * 0x1000 <= CMDLINE_ADDR);
            assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= EBDA_START);
        }
    }
}
