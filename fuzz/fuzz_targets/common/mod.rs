//! What the virtio device targets share: guest memory filled from the input, a transport
//! without an interrupt line, and the input's records.
#![allow(dead_code)]

use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestMemory;
use vmm::virtio::interrupt::VirtioInterrupt;

pub const MEM: usize = 0x10000;
/// Where the input is copied to in guest memory.
pub const DATA_AT: u64 = 0x4000;

pub struct NoIrq;

impl VirtioInterrupt for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// 64 KiB of guest memory holding `data` from `DATA_AT` on.
pub fn guest_memory(data: &[u8]) -> GuestMemory {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let n = data.len().min(MEM - DATA_AT as usize);
    mem.write_slice(&data[..n], GuestAddress(DATA_AT))
        .expect("fits");
    mem
}

/// One 9-byte record: `op, a (u32 LE), b (u32 LE)`.
pub struct Record {
    pub op: u8,
    pub a: u32,
    pub b: u32,
}

/// The records up to one whose op is 0xff (or the end of the input).
pub fn records(data: &[u8]) -> impl Iterator<Item = Record> + '_ {
    data.chunks_exact(9)
        .take_while(|r| r[0] != 0xff)
        .map(|r| Record {
            op: r[0],
            a: u32::from_le_bytes(r[1..5].try_into().unwrap()),
            b: u32::from_le_bytes(r[5..9].try_into().unwrap()),
        })
}

/// Up to `len` bytes of the input from `at` (wrapping), as host-side data.
pub fn slice(data: &[u8], at: u32, len: usize) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    let start = at as usize % data.len();
    data[start..].iter().take(len).copied().collect()
}

/// A register access of the guest: odd ops write `b` at `a`, even ones read at `a`.
pub fn register(t: &mut vmm::virtio::mmio::MmioTransport, r: &Record) {
    let offset = u64::from(r.a & 0x1ff);
    if r.op & 1 == 1 {
        t.write(offset, &r.b.to_le_bytes());
    } else {
        let mut buf = [0u8; 4];
        t.read(offset, &mut buf);
    }
}

/// libFuzzer's main is not Rust's: SIGPIPE is not ignored as it is in the VMM's process.
pub fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal's disposition to SIG_IGN.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}
