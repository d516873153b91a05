//! The ACPI tables checked by ACPICA's disassembler (Debian's acpica-tools, which
//! hack/test.sh installs): each table must disassemble without errors, and the DSDT must
//! describe the virtio-mmio devices as LNRO0005 with their MMIO window and interrupt.

use std::path::PathBuf;
use std::process::Command;

use vmm::acpi::{build, MmioSlot};
use vmm::layout;

#[test]
fn iasl_disassembles_every_table() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("acpi");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let slots = [
        MmioSlot {
            base: layout::VIRTIO_MMIO_BASE,
            irq: 5,
        },
        MmioSlot {
            base: layout::VIRTIO_MMIO_BASE + layout::VIRTIO_MMIO_SIZE,
            irq: 6,
        },
    ];
    let tables = build(2, &slots).unwrap();
    for t in &tables {
        if t.signature == "RSDP" {
            continue;
        }
        let dat = dir.join(format!("{}.dat", t.signature));
        std::fs::write(&dat, &t.bytes).unwrap();
        let o = Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("iasl: {e} (apt-get install acpica-tools)"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "iasl -d {}: {text}", dat.display());
        assert!(!text.contains("Error"), "iasl -d {}: {text}", dat.display());
    }
    let dsl = std::fs::read_to_string(dir.join("DSDT.dsl")).unwrap();
    assert_eq!(dsl.matches("\"LNRO0005\"").count(), 2, "{dsl}");
    assert!(
        dsl.contains("0xD0000000") && dsl.contains("0xD0001000"),
        "{dsl}"
    );
    assert!(dsl.contains("PNP0501"), "{dsl}");
    assert!(dsl.contains("_S5_"), "{dsl}");
    let facp = std::fs::read_to_string(dir.join("FACP.dsl")).unwrap();
    assert!(
        facp.contains("Hardware Reduced (V5) : 1"),
        "FADT not hardware-reduced:\n{facp}"
    );
    let madt = std::fs::read_to_string(dir.join("APIC.dsl")).unwrap();
    assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
    assert!(madt.contains("I/O APIC"), "{madt}");
}
