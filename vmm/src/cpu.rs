//! vCPU state at power-on: CPUID (KVM's supported set, filtered), MSRs, FPU, local APIC
//! LINT pins, and the registers for the chosen entry: 64-bit long mode with identity-mapped
//! page tables (Linux's 64-bit boot protocol, test guests) or 32-bit protected mode without
//! paging (PVH).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, KvmContext, Result};
use crate::layout;
use crate::memory::GuestMemory;

/// How the guest is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode at `rip`, `rsi` = the zero page (Linux's 64-bit boot protocol).
    Long64 { rip: u64 },
    /// 32-bit protected mode, paging off, at `rip`, `rbx` = `hvm_start_info` (PVH).
    Pvh { rip: u64 },
}

/// CPUID features to hide from the guest.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuidFilter {
    /// CMPXCHG16B (leaf 1 ECX bit 13).
    pub hide_cx16: bool,
    /// XSAVE and OSXSAVE (leaf 1 ECX bits 26, 27).
    pub hide_xsave: bool,
}

const ECX_CX16: u32 = 1 << 13;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_HYPERVISOR: u32 = 1 << 31;

/// Adapts KVM's supported CPUID for vCPU `id` of `count`.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, count: u8, f: CpuidFilter) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if f.hide_cx16 {
                    e.ecx &= !ECX_CX16;
                }
                if f.hide_xsave {
                    e.ecx &= !(ECX_XSAVE | ECX_OSXSAVE);
                }
            }
            // x2APIC id of this vCPU.
            0xb | 0x1f => e.edx = id as u32,
            0xd if f.hide_xsave => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// A GDT entry from flags, base and limit (the classic layout).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
        | ((((limit as u64) & 0x000f_0000) >> 16) << 48)
        | (((flags as u64) & 0x0000_f0ff) << 40)
}

/// The KVM segment register for GDT entry `index`.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// GDTs: null, code, data, TSS.
const GDT_64: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const GDT_32: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Identity map of the low 4 GiB with 2 MiB pages.
pub fn write_page_tables(mem: &GuestMemory) -> Result<()> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| Error::Memory(format!("page tables at {a:#x}: {e}")))
    };
    w(layout::PDPT_ADDR | 0x3, layout::PML4_ADDR)?;
    for i in 0..layout::PD_COUNT {
        let pd = layout::PD_ADDR + i * 0x1000;
        w(pd | 0x3, layout::PDPT_ADDR + i * 8)?;
        for j in 0..512u64 {
            let phys = ((i * 512 + j) << 21) | 0x83;
            w(phys, pd + j * 8)?;
        }
    }
    Ok(())
}

/// Sets up one vCPU: CPUID, MSRs, FPU, LAPIC pins; the boot vCPU also gets segments, paging
/// and registers for `entry`.
pub fn configure(
    vcpu: &VcpuFd,
    mem: &GuestMemory,
    cpuid: &CpuId,
    id: u8,
    entry: Option<Entry>,
) -> Result<()> {
    vcpu.set_cpuid2(cpuid).kvm("KVM_SET_CPUID2")?;
    set_msrs(vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).kvm("KVM_SET_FPU")?;
    set_lint(vcpu)?;
    let Some(entry) = entry else {
        // Application processors wait for INIT/SIPI from the boot vCPU (in-kernel LAPIC).
        return Ok(());
    };
    let _ = id;
    let mut sregs = vcpu.get_sregs().kvm("KVM_GET_SREGS")?;
    let gdt = match entry {
        Entry::Long64 { .. } => GDT_64,
        Entry::Pvh { .. } => GDT_32,
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + i as u64 * 8))
            .map_err(|e| Error::Memory(format!("GDT: {e}")))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(|e| Error::Memory(format!("IDT: {e}")))?;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Long64 { rip } => {
            write_page_tables(mem)?;
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
            regs.rsi = layout::ZERO_PAGE_ADDR;
        }
        Entry::Pvh { rip } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = layout::PVH_INFO_ADDR;
        }
    }
    vcpu.set_sregs(&sregs).kvm("KVM_SET_SREGS")?;
    vcpu.set_regs(&regs).kvm("KVM_SET_REGS")?;
    Ok(())
}

fn set_msrs(vcpu: &VcpuFd) -> Result<()> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_TSC, 0),
        // Fast string operations.
        (MSR_IA32_MISC_ENABLE, 1),
        // MTRRs enabled, default type write-back.
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("MSRs: {e:?}")))?;
    let n = vcpu.set_msrs(&msrs).kvm("KVM_SET_MSRS")?;
    if n != entries.len() {
        log::warn!("KVM took {n} of {} MSRs", entries.len());
    }
    Ok(())
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as firmware leaves them.
fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().kvm("KVM_GET_LAPIC")?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let b = &mut lapic.regs[off..off + 4];
        let mut v = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
        v = (v & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            b[i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic).kvm("KVM_SET_LAPIC")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(GDT_64[1], 1);
        assert_eq!(
            (
                code.base,
                code.limit,
                code.selector,
                code.l,
                code.present,
                code.type_
            ),
            (0, 0xffff_ffff, 8, 1, 1, 0xb)
        );
        let data = segment(GDT_64[2], 2);
        assert_eq!((data.db, data.l, data.type_, data.s), (1, 0, 3, 1));
        let code32 = segment(GDT_32[1], 1);
        assert_eq!((code32.db, code32.l, code32.limit), (1, 0, 0xffff_ffff));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn cpuid_filter_sets_ids_and_hides_features() {
        let mut c = CpuId::new(3).unwrap();
        {
            let s = c.as_mut_slice();
            s[0].function = 1;
            s[0].ecx = ECX_CX16 | ECX_XSAVE | ECX_OSXSAVE | 1;
            s[0].ebx = 0xffff_0123;
            s[1].function = 0xb;
            s[2].function = 0xd;
            s[2].eax = 7;
        }
        filter_cpuid(
            &mut c,
            2,
            4,
            CpuidFilter {
                hide_cx16: true,
                hide_xsave: true,
            },
        );
        let s = c.as_slice();
        assert_eq!(s[0].ebx, 0x0204_0123);
        assert_eq!(s[0].ecx, 1 | ECX_HYPERVISOR);
        assert_eq!(s[1].edx, 2);
        assert_eq!(s[2].eax, 0);
    }
}
