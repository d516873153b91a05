//! virtio-blk on a host file: read, write, flush, get-id. Requests are checked against the
//! disk size and the descriptor layout; a bad request gets an error status (or, when it has no
//! room for one, is returned with nothing written), never a panic.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueT, Reader, Writer};

use crate::memory::GuestMemory;
use crate::virtio::{read_config_bytes, VirtioDevice};

pub const DEVICE_ID: u32 = 2;
pub const SECTOR: u64 = 512;
const QUEUE_SIZES: &[u16] = &[128];

const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Largest single request we serve (the data is staged in VMM memory).
const MAX_REQUEST: usize = 4 << 20;

pub struct Block {
    file: File,
    sectors: u64,
    readonly: bool,
    id: [u8; 20],
}

impl Block {
    pub fn new(file: File, readonly: bool, id: &str) -> std::io::Result<Block> {
        let len = file.metadata()?.len();
        let mut idb = [0u8; 20];
        for (d, s) in idb.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        Ok(Block {
            file,
            sectors: len / SECTOR,
            readonly,
            id: idb,
        })
    }

    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c
    }

    /// Serves one request; the number of bytes written into the chain.
    fn request(
        &self,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let (Ok(mut r), Ok(mut w)) = (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            return 0;
        };
        let Some(data_len) = w.available_bytes().checked_sub(1) else {
            return 0;
        };
        let Ok(mut status_w) = w.split_at(data_len) else {
            return 0;
        };
        let header = (
            r.read_obj::<u32>(),
            r.read_obj::<u32>(),
            r.read_obj::<u64>(),
        );
        let (status, written) = match header {
            (Ok(t), Ok(_), Ok(sector)) => self.serve(t, sector, &mut r, &mut w),
            _ => (S_IOERR, 0),
        };
        if status_w.write_obj(status).is_err() {
            return written as u32;
        }
        written as u32 + 1
    }

    fn range_ok(&self, sector: u64, len: usize) -> bool {
        (len as u64).is_multiple_of(SECTOR)
            && sector
                .checked_add(len as u64 / SECTOR)
                .is_some_and(|end| end <= self.sectors)
    }

    fn serve(&self, typ: u32, sector: u64, r: &mut Reader, w: &mut Writer) -> (u8, usize) {
        use std::io::{Read, Write};
        match typ {
            T_IN => {
                let len = w.available_bytes();
                if len > MAX_REQUEST || !self.range_ok(sector, len) {
                    return (S_IOERR, 0);
                }
                let mut buf = vec![0u8; len];
                if self.file.read_exact_at(&mut buf, sector * SECTOR).is_err() {
                    return (S_IOERR, 0);
                }
                match w.write_all(&buf) {
                    Ok(()) => (S_OK, len),
                    Err(_) => (S_IOERR, w.bytes_written()),
                }
            }
            T_OUT => {
                let len = r.available_bytes();
                if self.readonly {
                    return (S_IOERR, 0);
                }
                if len > MAX_REQUEST || !self.range_ok(sector, len) {
                    return (S_IOERR, 0);
                }
                let mut buf = vec![0u8; len];
                if r.read_exact(&mut buf).is_err()
                    || self.file.write_all_at(&buf, sector * SECTOR).is_err()
                {
                    return (S_IOERR, 0);
                }
                (S_OK, 0)
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let n = w.available_bytes().min(self.id.len());
                match w.write_all(&self.id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_BLK_SIZE | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let n = self.request(mem, chain);
            if queue.add_used(mem, head, n).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn disk(sectors: u64) -> (Block, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(sectors * SECTOR).unwrap();
        let b = Block::new(f.reopen().unwrap(), false, "janus-disk").unwrap();
        (b, f)
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// Runs one chain (`descs` linked in order) through the device: the used length.
    fn run(b: &mut Block, m: &GuestMemory, descs: &[RawDescriptor]) -> Option<u32> {
        let mq = MockSplitQueue::new(m, 16);
        let mut linked = descs.to_vec();
        for (i, d) in linked.iter_mut().enumerate() {
            let s = Descriptor::from(*d);
            let last = i + 1 == descs.len();
            let flags = if last {
                s.flags() & !F_NEXT
            } else {
                s.flags() | F_NEXT
            };
            *d = RawDescriptor::from(Descriptor::new(
                s.addr().0,
                s.len(),
                flags,
                if last { 0 } else { i as u16 + 1 },
            ));
        }
        mq.add_desc_chains(&linked, 0).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        if !b.process_queue(0, &mut q, m) {
            return None;
        }
        let used_len = m.read_obj::<u32>(mq.used_addr().unchecked_add(8)).unwrap();
        Some(used_len)
    }

    /// Header at 0x10000, one data buffer, status byte at 0x30000.
    fn req(data: u64, len: u32, flags: u16) -> [RawDescriptor; 3] {
        [
            desc(0x10000, 16, 0),
            desc(data, len, flags),
            desc(0x30000, 1, F_WRITE),
        ]
    }

    fn header(m: &GuestMemory, at: u64, typ: u32, sector: u64) {
        m.write_obj(typ, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn write_then_read_a_sector() {
        let m = mem();
        let (mut b, _f) = disk(8);
        let data: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        m.write_slice(&data, GuestAddress(0x20000)).unwrap();
        header(&m, 0x10000, T_OUT, 3);
        let used = run(&mut b, &m, &req(0x20000, 512, 0));
        assert_eq!(used, Some(1));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30000)).unwrap(), S_OK);
        header(&m, 0x10000, T_IN, 3);
        m.write_obj(0xffu8, GuestAddress(0x30000)).unwrap();
        let used = run(&mut b, &m, &req(0x40000, 512, F_WRITE));
        assert_eq!(used, Some(513));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30000)).unwrap(), S_OK);
        let mut back = vec![0u8; 512];
        m.read_slice(&mut back, GuestAddress(0x40000)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn bad_requests_get_error_status() {
        let m = mem();
        let (mut b, _f) = disk(8);
        // Past the end of the disk.
        header(&m, 0x10000, T_IN, 8);
        let r = run(&mut b, &m, &req(0x40000, 512, F_WRITE));
        assert_eq!(r, Some(1));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30000)).unwrap(), S_IOERR);
        // Not a whole sector.
        header(&m, 0x10000, T_IN, 0);
        run(&mut b, &m, &req(0x40000, 100, F_WRITE));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30000)).unwrap(), S_IOERR);
        // Unknown type.
        header(&m, 0x10000, 77, 0);
        run(
            &mut b,
            &m,
            &[desc(0x10000, 16, 0), desc(0x30000, 1, F_WRITE)],
        );
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30000)).unwrap(), S_UNSUPP);
        // Truncated header.
        run(
            &mut b,
            &m,
            &[desc(0x10000, 8, 0), desc(0x30000, 1, F_WRITE)],
        );
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30000)).unwrap(), S_IOERR);
        // No writable status byte: returned with nothing written.
        header(&m, 0x10000, T_FLUSH, 0);
        assert_eq!(run(&mut b, &m, &[desc(0x10000, 16, 0)]), Some(0));
        // A descriptor outside guest memory.
        assert_eq!(
            run(
                &mut b,
                &m,
                &[desc(0x10000, 16, 0), desc(0x7fff_0000_0000, 512, F_WRITE)]
            ),
            Some(0)
        );
    }

    #[test]
    fn read_only_disk_refuses_writes_and_get_id_works() {
        let m = mem();
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 * SECTOR).unwrap();
        let mut b = Block::new(f.reopen().unwrap(), true, "ro-disk").unwrap();
        assert_ne!(b.features() & VIRTIO_BLK_F_RO, 0);
        header(&m, 0x10000, T_OUT, 0);
        run(&mut b, &m, &req(0x20000, 512, 0));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30000)).unwrap(), S_IOERR);
        header(&m, 0x10000, T_GET_ID, 0);
        let used = run(&mut b, &m, &req(0x40000, 20, F_WRITE));
        assert_eq!(used, Some(21));
        let mut id = [0u8; 7];
        m.read_slice(&mut id, GuestAddress(0x40000)).unwrap();
        assert_eq!(&id, b"ro-disk");
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 4);
    }
}
