//! Loading the guest: the kernel (ELF, with its PVH entry when it has one, or bzImage) through
//! linux-loader, the initramfs, the command line, and the boot information for the chosen
//! entry (Linux's zero page with an e820 map, or PVH's `hvm_start_info` with a memory map).

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress};

use crate::cpu::Entry;
use crate::error::{Error, Result};
use crate::layout;
use crate::memory::GuestMemory;

/// What `load` placed in guest memory.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub entry: Entry,
    pub kernel_end: u64,
    /// The initramfs (address, size).
    pub initrd: Option<(u64, u64)>,
}

/// How to enter a kernel that offers both (ELF with a PVH note).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preference {
    #[default]
    Pvh,
    Long64,
}

fn kerr(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Kernel {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

/// Loads the kernel, initramfs and command line, and writes the boot information.
pub fn load(
    mem: &GuestMemory,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    pref: Preference,
) -> Result<Loaded> {
    let mut f = File::open(kernel).map_err(|e| kerr(kernel, e))?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let (res, bz): (KernelLoaderResult, bool) = match Elf::load(mem, None, &mut f, himem) {
        Ok(r) => (r, false),
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => (
            BzImage::load(mem, None, &mut f, himem).map_err(|e| kerr(kernel, e))?,
            true,
        ),
        Err(e) => return Err(kerr(kernel, e)),
    };
    let entry = match (res.pvh_boot_cap, pref, bz) {
        (PvhBootCapability::PvhEntryPresent(a), Preference::Pvh, false) => Entry::Pvh { rip: a.0 },
        // bzImage: the 64-bit entry is 0x200 past the protected-mode code.
        (_, _, true) => Entry::Long64 {
            rip: res.kernel_load.0 + 0x200,
        },
        _ => Entry::Long64 {
            rip: res.kernel_load.0,
        },
    };
    let kernel_end = res.kernel_load.0 + res.kernel_end;
    if cmdline.len() + 1 > layout::CMDLINE_MAX {
        return Err(Error::Config(format!(
            "kernel command line longer than {} bytes",
            layout::CMDLINE_MAX - 1
        )));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|e| Error::Memory(format!("command line: {e}")))?;
    let initrd = match initrd {
        Some(p) => Some(load_initrd(mem, mem_bytes, p, kernel_end)?),
        None => None,
    };
    match entry {
        Entry::Pvh { .. } => write_pvh_info(mem, mem_bytes, initrd)?,
        Entry::Long64 { .. } => {
            write_zero_page(mem, mem_bytes, res.setup_header, initrd, cmdline.len())?
        }
    }
    Ok(Loaded {
        entry,
        kernel_end,
        initrd,
    })
}

/// The initramfs goes at the top of low RAM (page aligned), above the kernel.
fn load_initrd(mem: &GuestMemory, mem_bytes: u64, p: &Path, kernel_end: u64) -> Result<(u64, u64)> {
    let data = std::fs::read(p).map_err(|e| kerr(p, e))?;
    let size = data.len() as u64;
    let top = mem_bytes.min(layout::MMIO_GAP_START);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or_else(|| {
            Error::Config(format!(
                "initramfs {} ({size} bytes) does not fit in guest RAM above the kernel",
                p.display()
            ))
        })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| Error::Memory(format!("initramfs: {e}")))?;
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMemory,
    mem_bytes: u64,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
) -> Result<()> {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448;
    p.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    p.hdr.kernel_alignment = 0x0100_0000;
    if let Some((a, s)) = initrd {
        p.hdr.ramdisk_image = a as u32;
        p.hdr.ramdisk_size = s as u32;
    }
    p.acpi_rsdp_addr = layout::ACPI_START;
    let map = layout::e820(mem_bytes);
    for (i, (addr, size, typ)) in map.iter().enumerate() {
        p.e820_table[i].addr = *addr;
        p.e820_table[i].size = *size;
        p.e820_table[i].r#type = *typ;
    }
    p.e820_entries = map.len() as u8;
    mem.write_obj(p, GuestAddress(layout::ZERO_PAGE_ADDR))
        .map_err(|e| Error::Memory(format!("zero page: {e}")))
}

/// PVH's `hvm_start_info` (version 1), written field by field at their ABI offsets.
fn write_pvh_info(mem: &GuestMemory, mem_bytes: u64, initrd: Option<(u64, u64)>) -> Result<()> {
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    let map = layout::e820(mem_bytes);
    let w32 = |v: u32, a: u64| mem.write_obj(v, GuestAddress(a));
    let w64 = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a));
    let res = (|| {
        let base = layout::PVH_INFO_ADDR;
        mem.write_slice(&[0u8; 56], GuestAddress(base))?;
        w32(XEN_HVM_START_MAGIC, base)?;
        w32(1, base + 4)?;
        if let Some((a, s)) = initrd {
            w32(1, base + 12)?;
            w64(layout::PVH_MODLIST_ADDR, base + 16)?;
            mem.write_slice(&[0u8; 32], GuestAddress(layout::PVH_MODLIST_ADDR))?;
            w64(a, layout::PVH_MODLIST_ADDR)?;
            w64(s, layout::PVH_MODLIST_ADDR + 8)?;
        }
        w64(layout::CMDLINE_ADDR, base + 24)?;
        w64(layout::ACPI_START, base + 32)?;
        w64(layout::PVH_MEMMAP_ADDR, base + 40)?;
        w32(map.len() as u32, base + 48)?;
        for (i, (addr, size, typ)) in map.iter().enumerate() {
            let e = layout::PVH_MEMMAP_ADDR + i as u64 * 24;
            w64(*addr, e)?;
            w64(*size, e + 8)?;
            w32(*typ, e + 16)?;
            w32(0, e + 20)?;
        }
        Ok::<_, vm_memory::GuestMemoryError>(())
    })();
    res.map_err(|e| Error::Memory(format!("PVH start info: {e}")))?;
    // The map must not run into the next fixed structure.
    debug_assert!(layout::PVH_MEMMAP_ADDR + map.len() as u64 * 24 <= layout::ZERO_PAGE_ADDR);
    Ok(())
}
