//! virtio-net on a tap device. The tap carries virtio-net headers itself (`IFF_VNET_HDR`, 12
//! bytes: the VERSION_1 layout), so frames pass through unchanged; no offloads are offered.
//! Transmit runs when the guest notifies the transmit queue; the event handler
//! (`event_handler.rs`) reads the tap and hands frames to `input`, and they go into the
//! guest's receive buffers as those are posted.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT, Writer};

use crate::memory::GuestMemory;
use crate::virtio::{read_config_bytes, VirtioDevice};

pub const DEVICE_ID: u32 = 1;
pub const RX: usize = 0;
pub const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr` with `num_buffers` (VERSION_1).
pub const HDR_LEN: usize = 12;
/// Frames waiting for receive buffers beyond this are dropped (as a NIC's ring overflows).
const MAX_PENDING: usize = 256;
/// A frame with its header: 64 KiB of GSO-less Ethernet at most.
pub const MAX_FRAME: usize = HDR_LEN + 65550;

pub struct Net {
    tap: Arc<File>,
    mac: [u8; 6],
    pending: VecDeque<Vec<u8>>,
    /// Frames dropped for want of receive buffers, and malformed transmit chains.
    pub dropped: u64,
}

impl Net {
    pub fn new(tap: Arc<File>, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            pending: VecDeque::new(),
            dropped: 0,
        }
    }

    /// A frame from the tap, kept until the guest posts receive buffers (then run `RX`).
    pub fn input(&mut self, frame: Vec<u8>) {
        if self.pending.len() >= MAX_PENDING {
            self.dropped += 1;
        } else {
            self.pending.push_back(frame);
        }
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        crate::virtio::drain_readable(queue, mem, MAX_FRAME, |frame| {
            match frame {
                Some(f) if f.len() >= HDR_LEN => {
                    if let Err(e) = (&*self.tap).write_all(&f) {
                        log::debug!("tap write: {e}");
                        self.dropped += 1;
                    }
                }
                _ => self.dropped += 1,
            }
            true
        })
    }

    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(frame) = self.pending.front() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut frame = frame.clone();
            self.pending.pop_front();
            // One buffer per frame: num_buffers = 1.
            if frame.len() >= HDR_LEN {
                frame[10] = 1;
                frame[11] = 0;
            }
            let n = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= frame.len() => {
                    w.write_all(&frame).map(|_| frame.len()).unwrap_or(0)
                }
                _ => {
                    self.dropped += 1;
                    0
                }
            };
            if queue.add_used(mem, head, n as u32).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        read_config_bytes(&c, offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        match index {
            RX => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    /// A pipe standing in for the tap: (device side, our side).
    fn pipe() -> (Arc<File>, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: fresh fds from pipe2.
        unsafe {
            (
                Arc::new(File::from_raw_fd(fds[1])),
                File::from_raw_fd(fds[0]),
            )
        }
    }

    fn queue_with(m: &GuestMemory, descs: &[RawDescriptor]) -> (Queue, GuestAddress) {
        let mq = MockSplitQueue::new(m, 16);
        mq.add_desc_chains(descs, 0).unwrap();
        (mq.create_queue().unwrap(), mq.used_addr())
    }

    #[test]
    fn transmit_writes_header_and_frame_to_the_tap() {
        let m = mem();
        let (tap, mut peer) = pipe();
        let mut n = Net::new(tap, [2, 0, 0, 0, 0, 1]);
        let frame: Vec<u8> = (0..(HDR_LEN + 60) as u32).map(|i| i as u8).collect();
        m.write_slice(&frame, GuestAddress(0x10000)).unwrap();
        let (mut q, _) = queue_with(
            &m,
            &[RawDescriptor::from(Descriptor::new(
                0x10000,
                frame.len() as u32,
                0,
                0,
            ))],
        );
        assert!(n.process_queue(TX, &mut q, &m));
        let mut got = vec![0u8; frame.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, frame);
        // Shorter than a header, or write-only: dropped, still returned to the guest.
        let (mut q, _) = queue_with(
            &m,
            &[RawDescriptor::from(Descriptor::new(0x10000, 4, 0, 0))],
        );
        assert!(n.process_queue(TX, &mut q, &m));
        assert_eq!(n.dropped, 1);
    }

    #[test]
    fn receive_waits_for_buffers_and_sets_num_buffers() {
        let m = mem();
        let (tap, _peer) = pipe();
        let mut n = Net::new(tap, [2, 0, 0, 0, 0, 1]);
        let mut frame = vec![0u8; HDR_LEN + 42];
        frame[HDR_LEN] = 0xff;
        n.input(frame.clone());
        // A buffer too small: the frame is dropped, the buffer returned empty.
        let (mut q, used) = queue_with(
            &m,
            &[RawDescriptor::from(Descriptor::new(
                0x20000, 16, F_WRITE, 0,
            ))],
        );
        assert!(n.process_queue(RX, &mut q, &m));
        assert_eq!(m.read_obj::<u32>(used.unchecked_add(8)).unwrap(), 0);
        assert_eq!(n.dropped, 1);
        n.input(frame.clone());
        let (mut q, used) = queue_with(
            &m,
            &[RawDescriptor::from(Descriptor::new(
                0x20000, 2048, F_WRITE, 0,
            ))],
        );
        assert!(n.process_queue(RX, &mut q, &m));
        assert_eq!(
            m.read_obj::<u32>(used.unchecked_add(8)).unwrap(),
            frame.len() as u32
        );
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x20000 + 10)).unwrap(), 1);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x20000 + HDR_LEN as u64))
                .unwrap(),
            0xff
        );
        // Nothing pending: nothing used.
        assert!(!n.process_queue(RX, &mut q, &m));
        let mut cfg = [0u8; 6];
        n.read_config(0, &mut cfg);
        assert_eq!(cfg, [2, 0, 0, 0, 0, 1]);
    }
}
