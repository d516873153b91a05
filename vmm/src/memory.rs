//! Guest RAM: one memfd (so a vhost-user backend such as virtiofsd can map the same pages),
//! mapped into the VMM and given to KVM as one slot per RAM range.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::error::{Error, KvmContext, Result};
use crate::layout;

pub type GuestMemory = GuestMemoryMmap<()>;

/// Guest RAM of `mem_bytes`. `shared`: backed by a memfd (returned), which a vhost-user
/// backend such as virtiofsd can map; otherwise anonymous memory with transparent huge pages
/// asked for (hosts usually allow THP for anonymous memory only, and every 4 KiB page the
/// guest touches first costs a fault: huge pages make early boot markedly faster).
pub fn create(mem_bytes: u64, shared: bool) -> Result<(GuestMemory, Option<File>)> {
    if mem_bytes < (16 << 20) || !mem_bytes.is_multiple_of(4096) {
        return Err(Error::Config(format!(
            "guest memory {mem_bytes} bytes: at least 16 MiB, in whole pages"
        )));
    }
    if !shared {
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_bytes)
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|e| Error::Memory(format!("map guest RAM: {e}")))?;
        for region in mem.iter() {
            if let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) {
                // SAFETY: advice on a mapping we own; it changes no memory contents.
                unsafe {
                    libc::madvise(
                        host as *mut libc::c_void,
                        region.len() as usize,
                        libc::MADV_HUGEPAGE,
                    )
                };
            }
        }
        return Ok((mem, None));
    }
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"janus-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memory(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_bytes)
        .map_err(|e| Error::Memory(format!("size the memfd to {mem_bytes}: {e}")))?;
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for (start, len) in layout::ram_ranges(mem_bytes) {
        let f = file
            .try_clone()
            .map_err(|e| Error::Memory(format!("dup memfd: {e}")))?;
        ranges.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(f, offset)),
        ));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&ranges)
        .map_err(|e| Error::Memory(format!("map guest RAM: {e}")))?;
    Ok((mem, Some(file)))
}

/// Gives every RAM range to KVM as a memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(format!("host address of a region: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping stays alive as long as `mem`, which the VM owns for its
        // whole life; slots do not overlap (the ranges are disjoint).
        unsafe { vm.set_user_memory_region(r) }.kvm("KVM_SET_USER_MEMORY_REGION")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memfd_backed_ram_reads_back() {
        let (mem, fd) = create(32 << 20, true).unwrap();
        assert!(fd.is_some());
        mem.write_obj(0x1234_5678u32, GuestAddress(0x100000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x100000)).unwrap(),
            0x1234_5678
        );
        assert!(mem.read_obj::<u8>(GuestAddress(32 << 20)).is_err());
        assert!(create(1 << 20, true).is_err());
        let (mem, fd) = create(32 << 20, false).unwrap();
        assert!(fd.is_none());
        mem.write_obj(7u8, GuestAddress(0)).unwrap();
    }
}
