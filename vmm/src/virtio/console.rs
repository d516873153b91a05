//! virtio-console (one port, no features) whose host side is a unix socket the VMM listens
//! on: what the guest writes goes to the connected peer (kept, up to a bound, until one
//! connects), what the peer writes goes to the guest's receive buffers. A byte stream, so
//! frames may be split across buffers.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT, Reader, Writer};

use super::VirtioDevice;
use crate::memory::GuestMemory;

pub const DEVICE_ID: u32 = 3;
pub const RX: usize = 0;
pub const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[128, 128];
/// Output kept while no peer is connected, and input waiting for receive buffers.
const MAX_BUFFERED: usize = 1 << 20;

/// The connected peer, shared with the thread that accepts and reads it.
pub type Peer = Arc<Mutex<Option<UnixStream>>>;

pub struct Console {
    peer: Peer,
    /// Guest output waiting for a peer.
    unsent: Vec<u8>,
    /// Peer input waiting for receive buffers.
    input: VecDeque<u8>,
    pub dropped: u64,
}

impl Console {
    pub fn new(peer: Peer) -> Console {
        Console {
            peer,
            unsent: Vec::new(),
            input: VecDeque::new(),
            dropped: 0,
        }
    }

    fn flush(&mut self) {
        if self.unsent.is_empty() {
            return;
        }
        let mut g = self.peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = g.as_mut() {
            if s.write_all(&self.unsent).is_err() {
                *g = None;
            }
            self.unsent.clear();
        }
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut data = Vec::new();
            match Reader::new(mem, chain) {
                Ok(mut r) if r.available_bytes() <= MAX_BUFFERED => {
                    if r.read_to_end(&mut data).is_err() {
                        self.dropped += 1;
                    }
                }
                _ => self.dropped += 1,
            }
            if self.unsent.len() + data.len() <= MAX_BUFFERED {
                self.unsent.extend_from_slice(&data);
            } else {
                self.dropped += 1;
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        self.flush();
        used
    }

    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while !self.input.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let n = match Writer::new(mem, chain) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(self.input.len());
                    let chunk: Vec<u8> = self.input.drain(..n).collect();
                    w.write_all(&chunk).map(|_| n).unwrap_or(0)
                }
                Err(_) => {
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

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        match index {
            RX => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            _ => false,
        }
    }

    /// Peer input (empty: a peer just connected, so send what was kept for it).
    fn input(&mut self, data: Vec<u8>) -> Option<usize> {
        if data.is_empty() {
            self.flush();
            return None;
        }
        if self.input.len() + data.len() > MAX_BUFFERED {
            self.dropped += 1;
            return Some(RX);
        }
        self.input.extend(data);
        Some(RX)
    }

    fn reset(&mut self) {
        self.input.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    #[test]
    fn output_waits_for_a_peer_and_input_spans_buffers() {
        let m = mem();
        let peer: Peer = Arc::default();
        let mut c = Console::new(peer.clone());
        m.write_slice(b"hello", GuestAddress(0x10000)).unwrap();
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x10000, 5, 0, 0))], 0)
            .unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert!(c.process_queue(TX, &mut q, &m));
        // No peer yet: kept, then sent when one connects.
        let (a, mut b) = UnixStream::pair().unwrap();
        *peer.lock().unwrap() = Some(a);
        assert_eq!(c.input(Vec::new()), None);
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // Seven bytes in, two 4-byte buffers.
        assert_eq!(c.input(b"abcdefg".to_vec()), Some(RX));
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x20000, 4, 2, 0)),
                RawDescriptor::from(Descriptor::new(0x30000, 4, 2, 0)),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert!(c.process_queue(RX, &mut q, &m));
        let mut x = [0u8; 4];
        m.read_slice(&mut x, GuestAddress(0x20000)).unwrap();
        assert_eq!(&x, b"abcd");
        m.read_slice(&mut x[..3], GuestAddress(0x30000)).unwrap();
        assert_eq!(&x[..3], b"efg");
        assert_eq!(
            m.read_obj::<u16>(mq.used_addr().unchecked_add(2)).unwrap(),
            2
        );
    }
}
