//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) built with `acpi_tables`. Debian's kernel finds
//! virtio-mmio devices only through ACPI (`LNRO0005`), and powers off through the
//! hardware-reduced sleep registers the FADT names.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::layout;
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"JANUS ";

/// A virtio-mmio device as the guest is told about it.
#[derive(Debug, Clone, Copy)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

/// One table and where it goes.
#[derive(Debug, Clone)]
pub struct Table {
    pub signature: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

fn bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// The DSDT: COM1, the virtio-mmio devices, and `\_S5_` for power-off.
pub fn dsdt(slots: &[MmioSlot]) -> Vec<u8> {
    let mut sb = Vec::new();
    {
        let hid = EISAName::new("PNP0501");
        let hid = Name::new("_HID".into(), &hid);
        let uid = Name::new("_UID".into(), &0u8);
        let io = IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 1, 8);
        let irq = Interrupt::new(true, true, false, false, layout::SERIAL_IRQ);
        let crs = ResourceTemplate::new(vec![&io, &irq]);
        let crs = Name::new("_CRS".into(), &crs);
        sb.extend(bytes(&Device::new("COM1".into(), vec![&hid, &uid, &crs])));
    }
    for (i, s) in slots.iter().enumerate() {
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid = Name::new("_UID".into(), &(i as u32));
        let mem = Memory32Fixed::new(true, s.base as u32, layout::VIRTIO_MMIO_SIZE as u32);
        let irq = Interrupt::new(true, true, false, false, s.irq);
        let crs = ResourceTemplate::new(vec![&mem, &irq]);
        let crs = Name::new("_CRS".into(), &crs);
        let name = format!("V{i:03X}");
        sb.extend(bytes(&Device::new(
            Path::new(&name),
            vec![&hid, &uid, &crs],
        )));
    }
    let mut aml = Scope::raw("_SB_".into(), sb);
    let s5 = Package::new(vec![&layout::S5_SLP_TYP]);
    aml.extend(bytes(&Name::new("_S5_".into(), &s5)));
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"JANUSDSD", 1);
    t.append_slice(&aml);
    t.as_slice().to_vec()
}

/// The FADT: hardware-reduced, with the sleep control/status registers at our ports.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"JANUSFAC", 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    let port = |p: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            p as u64,
        )
    };
    f.sleep_control_reg = port(layout::SLEEP_CONTROL_PORT);
    f.sleep_status_reg = port(layout::SLEEP_STATUS_PORT);
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"JANUSVMM").into();
    bytes(&f.finalize())
}

/// The MADT: the local APICs, the I/O APIC, and ISA IRQ 0 (the PIT) on GSI 2.
pub fn madt(vcpus: u8) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"JANUSAPI", 1);
    t.write_u32(36, layout::LAPIC_ADDR);
    t.write_u32(40, PCAT_COMPAT);
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, uid, APIC id, flags (enabled).
        let mut s = vec![0u8, 8, id, id];
        s.extend(1u32.to_le_bytes());
        t.append_slice(&s);
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    let mut s = vec![1u8, 12, 0, 0];
    s.extend(layout::IOAPIC_ADDR.to_le_bytes());
    s.extend(0u32.to_le_bytes());
    t.append_slice(&s);
    // Interrupt source override: type 2, length 10, bus 0 (ISA), IRQ 0 -> GSI 2, flags.
    let mut s = vec![2u8, 10, 0, 0];
    s.extend(2u32.to_le_bytes());
    s.extend(0u16.to_le_bytes());
    t.append_slice(&s);
    t.as_slice().to_vec()
}

/// All tables with their addresses (RSDP at `ACPI_START`, the rest after it).
pub fn build(vcpus: u8, slots: &[MmioSlot]) -> Result<Vec<Table>> {
    let mut next = layout::ACPI_START + 0x40;
    let mut place = |len: usize| {
        let a = next;
        next = (next + len as u64 + 15) & !15;
        a
    };
    let dsdt = dsdt(slots);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(vcpus);
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, *b"JANUSXSD", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let xsdt_addr = place(xsdt.len());
    if next > layout::ACPI_END {
        return Err(Error::Config(format!(
            "ACPI tables need {} bytes, more than the {} reserved",
            next - layout::ACPI_START,
            layout::ACPI_END - layout::ACPI_START
        )));
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    let t = |s: &str, addr, bytes| Table {
        signature: s.to_string(),
        addr,
        bytes,
    };
    Ok(vec![
        t("RSDP", layout::ACPI_START, rsdp),
        t("DSDT", dsdt_addr, dsdt),
        t("FACP", fadt_addr, fadt),
        t("APIC", madt_addr, madt),
        t("XSDT", xsdt_addr, xsdt),
    ])
}

pub fn write(mem: &GuestMemory, tables: &[Table]) -> Result<()> {
    for t in tables {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(|e| Error::Memory(format!("ACPI {}: {e}", t.signature)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_have_valid_lengths_and_checksums() {
        let slots = [
            MmioSlot {
                base: layout::VIRTIO_MMIO_BASE,
                irq: 5,
            },
            MmioSlot {
                base: layout::VIRTIO_MMIO_BASE + 0x1000,
                irq: 6,
            },
        ];
        let tables = build(2, &slots).unwrap();
        for t in &tables {
            if t.signature == "RSDP" {
                assert_eq!(&t.bytes[..8], b"RSD PTR ");
                assert!(checksum_ok(&t.bytes[..20]) && checksum_ok(&t.bytes));
                continue;
            }
            assert_eq!(&t.bytes[..4], t.signature.as_bytes());
            let len = u32::from_le_bytes(t.bytes[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.bytes.len(), "{} length", t.signature);
            assert!(checksum_ok(&t.bytes), "{} checksum", t.signature);
        }
        let dsdt = &tables[1].bytes;
        let count = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 2);
        // No overlaps, all inside the reserved range.
        let mut spans: Vec<_> = tables
            .iter()
            .map(|t| (t.addr, t.addr + t.bytes.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
        assert!(spans.last().unwrap().1 <= layout::ACPI_END);
    }
}
