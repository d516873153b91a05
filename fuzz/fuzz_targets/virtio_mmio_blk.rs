//! A guest driving a virtio-blk device through the virtio-mmio register file, with
//! guest-controlled memory: register writes and reads in any order (queue setup, features,
//! status, notify), then the device walks whatever descriptor chains the memory holds.
//!
//! Input: 9-byte records `op, offset (u32 LE), value (u32 LE)` until a record whose op is 0xff
//! (or the input ends); the whole input is also the guest memory from 0x4000 on.
#![no_main]

use std::fs::File;
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestMemory;
use vmm::virtio::blk::Block;
use vmm::virtio::interrupt::VirtioInterrupt;
use vmm::virtio::mmio::MmioTransport;

const MEM: usize = 0x10000;
const DATA_AT: u64 = 0x4000;

struct NoIrq;

impl VirtioInterrupt for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The disk behind the device: 64 KiB, made once.
fn disk() -> File {
    static DISK: OnceLock<File> = OnceLock::new();
    let f = DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("janus-fuzz-disk-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("fuzz disk");
        let _ = std::fs::remove_file(&path);
        f.set_len(64 * 1024).expect("fuzz disk size");
        f
    });
    f.try_clone().expect("dup fuzz disk")
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let n = data.len().min(MEM - DATA_AT as usize);
    mem.write_slice(&data[..n], GuestAddress(DATA_AT))
        .expect("fits");
    let Ok(block) = Block::new(disk(), false, "fuzz") else {
        return;
    };
    let mut t = MmioTransport::new(Arc::new(Mutex::new(block)), mem, Box::new(NoIrq));
    for rec in data.chunks_exact(9) {
        if rec[0] == 0xff {
            break;
        }
        let offset = u64::from(u32::from_le_bytes(rec[1..5].try_into().unwrap()) & 0x1ff);
        let value = u32::from_le_bytes(rec[5..9].try_into().unwrap());
        if rec[0] & 1 == 1 {
            t.write(offset, &value.to_le_bytes());
        } else {
            let mut buf = [0u8; 4];
            t.read(offset, &mut buf);
        }
    }
});
