//! virtio-console with named ports (VIRTIO_CONSOLE_F_MULTIPORT), each port's host side a unix
//! socket the VMM listens on. This is the agent channel of the builtin driver: the agent
//! already speaks ttrpc and framed stdio over two named virtio-serial ports under QEMU
//! (`janus.agent`, `janus.stdio`, found through `/sys/class/virtio-ports/*/name`), so the
//! same guest and host code serve both drivers; a vsock device would have needed a second
//! transport in the agent and on the host.
//!
//! Port semantics follow QEMU's virtio-serial with `server=on,wait=off` chardevs: a peer
//! connecting to a port's socket opens the port for the guest (PORT_OPEN 1, guest reads stop
//! returning EOF), its leaving closes it (PORT_OPEN 0). What the peer writes waits until the
//! guest has the port open (Linux drops data for ports nobody opened). A byte stream, so
//! frames may be split across buffers.
//!
//! A driver that does not negotiate MULTIPORT sees port 0 only, on queues 0 and 1.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT, Writer};

pub use super::HostEvent;
use super::VirtioDevice;
use crate::memory::GuestMemory;

pub const DEVICE_ID: u32 = 3;
pub const RX: usize = 0;
pub const TX: usize = 1;
/// Control queues (multiport): device -> driver, driver -> device.
pub const CTRL_RX: usize = 2;
pub const CTRL_TX: usize = 3;
pub const F_MULTIPORT: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 128;
/// Output kept while no peer is connected, and input waiting for receive buffers.
const MAX_BUFFERED: usize = 1 << 20;
/// Input beyond which a port's peer is not read until the guest takes some (one read of
/// the event loop is at most 64 KiB, so MAX_BUFFERED is never reached by a paused peer);
/// output beyond which the guest's transmit buffers wait until the peer takes some.
pub const HIGH: usize = 256 << 10;
/// A port count no sane command line reaches; bounds the queue table.
pub const MAX_PORTS: usize = 16;

/// Control events (virtio 1.2 section 5.3.6.2).
pub const DEVICE_READY: u16 = 0;
pub const DEVICE_ADD: u16 = 1;
pub const PORT_READY: u16 = 3;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;
const CTRL_HEADER: usize = 8;

/// The connected peer of a port, shared with the thread that accepts and reads it.
pub type Peer = Arc<Mutex<Option<UnixStream>>>;

struct Port {
    name: Option<String>,
    peer: Peer,
    /// Guest output waiting for a peer.
    unsent: Vec<u8>,
    /// Peer input waiting for receive buffers (and for the guest to open the port).
    input: VecDeque<u8>,
    host_connected: bool,
    /// Transmit buffers were left in the queue because the peer was behind.
    tx_held: bool,
    /// The driver said PORT_READY for it.
    ready: bool,
    guest_open: bool,
}

pub struct Console {
    ports: Vec<Port>,
    sizes: Vec<u16>,
    multiport: bool,
    /// Control messages waiting for the driver's control receive buffers.
    ctrl_out: VecDeque<Vec<u8>>,
    /// Queues the device wants processed next (see `VirtioDevice::take_kicks`).
    kicks: Vec<usize>,
    pub dropped: u64,
}

/// Receive and transmit queue of port `p`.
pub fn port_queues(p: usize) -> (usize, usize) {
    if p == 0 {
        (RX, TX)
    } else {
        (4 + 2 * (p - 1), 5 + 2 * (p - 1))
    }
}

fn port_of_queue(q: usize) -> Option<(usize, bool)> {
    match q {
        RX | TX => Some((0, q == TX)),
        CTRL_RX | CTRL_TX => None,
        q => Some(((q - 4) / 2 + 1, q % 2 == 1)),
    }
}

/// A control message: id, event, value, then the payload (a port name).
pub fn control(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CTRL_HEADER + payload.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

impl Console {
    /// Ports in order (port 0 first); each a name (multiport) and its peer slot.
    pub fn new(ports: Vec<(Option<String>, Peer)>) -> Console {
        let n = ports.len().clamp(1, MAX_PORTS);
        // Queue 2 and 3 exist (control) as soon as there is more than one port.
        let nq = if n > 1 || ports.iter().any(|(name, _)| name.is_some()) {
            2 + 2 * n
        } else {
            2
        };
        Console {
            ports: ports
                .into_iter()
                .take(MAX_PORTS)
                .map(|(name, peer)| Port {
                    name,
                    peer,
                    unsent: Vec::new(),
                    input: VecDeque::new(),
                    host_connected: false,
                    tx_held: false,
                    ready: false,
                    guest_open: false,
                })
                .collect(),
            sizes: vec![QUEUE_SIZE; nq],
            multiport: false,
            ctrl_out: VecDeque::new(),
            kicks: Vec::new(),
            dropped: 0,
        }
    }

    fn offers_multiport(&self) -> bool {
        self.sizes.len() > 2
    }

    /// Whether guest output and host input may flow on port `p` now.
    fn open(&self, p: usize) -> bool {
        !self.multiport || self.ports[p].guest_open
    }

    /// Writes what the peer takes without blocking (peers are non-blocking: a slow peer
    /// must not stall the device thread); the rest waits for `retry_output`.
    fn flush(&mut self, p: usize) {
        let port = &mut self.ports[p];
        if port.unsent.is_empty() {
            return;
        }
        let mut g = port.peer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = g.as_mut() else {
            return;
        };
        let mut sent = 0;
        let mut gone = false;
        while sent < port.unsent.len() {
            match s.write(&port.unsent[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The peer is gone: what it did not take is lost with it.
                    gone = true;
                    sent = port.unsent.len();
                }
            }
        }
        if gone {
            *g = None;
        }
        port.unsent.drain(..sent);
    }

    fn send_control(&mut self, id: u32, event: u16, value: u16, payload: &[u8]) {
        self.ctrl_out.push_back(control(id, event, value, payload));
        self.kicks.push(CTRL_RX);
    }

    /// Guest output of port `p`. While the peer is behind by `HIGH` bytes the guest's buffers
    /// are not taken (its writes block), so nothing is dropped.
    fn transmit(&mut self, p: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        self.flush(p);
        if self.ports[p].unsent.len() >= HIGH {
            self.ports[p].tx_held = true;
            return false;
        }
        let mut held = false;
        let used = super::drain_readable(queue, mem, MAX_BUFFERED, |data| {
            let port = &mut self.ports[p];
            match data {
                Some(d) if port.unsent.len() + d.len() <= MAX_BUFFERED => {
                    port.unsent.extend_from_slice(&d)
                }
                _ => self.dropped += 1,
            }
            held = port.unsent.len() >= HIGH;
            !held
        });
        self.ports[p].tx_held = held;
        self.flush(p);
        used
    }

    fn receive(&mut self, p: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        if !self.open(p) {
            return false;
        }
        let mut used = false;
        while !self.ports[p].input.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let input = &mut self.ports[p].input;
            let n = match Writer::new(mem, chain) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(input.len());
                    let chunk: Vec<u8> = input.drain(..n).collect();
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

    fn control_receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(msg) = self.ctrl_out.front() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let n = match Writer::new(mem, chain) {
                // A message is never split: the driver parses one per buffer.
                Ok(mut w) if w.available_bytes() >= msg.len() => {
                    w.write_all(msg).map(|_| msg.len()).unwrap_or(0)
                }
                _ => {
                    self.dropped += 1;
                    0
                }
            };
            if n > 0 {
                self.ctrl_out.pop_front();
            }
            if queue.add_used(mem, head, n as u32).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn control_transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut msgs = Vec::new();
        let used = super::drain_readable(queue, mem, 4096, |m| {
            match m {
                Some(m) if m.len() >= CTRL_HEADER => msgs.push(m),
                _ => self.dropped += 1,
            }
            true
        });
        for m in msgs {
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            let event = u16::from_le_bytes([m[4], m[5]]);
            let value = u16::from_le_bytes([m[6], m[7]]);
            self.control_message(id, event, value);
        }
        used
    }

    fn control_message(&mut self, id: u32, event: u16, value: u16) {
        let p = id as usize;
        match event {
            DEVICE_READY if value == 1 => {
                for i in 0..self.ports.len() {
                    self.send_control(i as u32, DEVICE_ADD, 0, &[]);
                }
            }
            PORT_READY if p < self.ports.len() => {
                if value != 1 {
                    log::warn!("virtio-console: driver failed to add port {p}");
                    return;
                }
                self.ports[p].ready = true;
                if let Some(name) = self.ports[p].name.clone() {
                    self.send_control(id, PORT_NAME, 0, name.as_bytes());
                }
                if self.ports[p].host_connected {
                    self.send_control(id, PORT_OPEN, 1, &[]);
                }
            }
            PORT_OPEN if p < self.ports.len() => {
                self.ports[p].guest_open = value == 1;
                if value == 1 {
                    self.kicks.push(port_queues(p).0);
                    self.flush(p);
                }
            }
            _ => log::debug!("virtio-console: control event {event} ({id}, {value}) ignored"),
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        if self.offers_multiport() {
            F_MULTIPORT
        } else {
            0
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.multiport = features & F_MULTIPORT != 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (u16 each; no size), max_nr_ports (u32), emerg_wr (u32, not offered).
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        super::read_config_bytes(&cfg, offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        match index {
            CTRL_RX if self.multiport => self.control_receive(queue, mem),
            CTRL_TX if self.multiport => self.control_transmit(queue, mem),
            q => match port_of_queue(q) {
                Some((p, tx)) if p < self.ports.len() && (p == 0 || self.multiport) => {
                    if tx {
                        self.transmit(p, queue, mem)
                    } else {
                        self.receive(p, queue, mem)
                    }
                }
                _ => false,
            },
        }
    }

    fn take_kicks(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.kicks)
    }

    fn retry_output(&mut self) {
        for p in 0..self.ports.len() {
            self.flush(p);
            let port = &mut self.ports[p];
            if port.tx_held && port.unsent.len() < HIGH {
                port.tx_held = false;
                self.kicks.push(port_queues(p).1);
            }
        }
    }

    fn drain_output(&mut self, deadline: std::time::Instant) {
        for p in 0..self.ports.len() {
            loop {
                self.flush(p);
                let port = &self.ports[p];
                let connected = port.peer.lock().map(|g| g.is_some()).unwrap_or(false);
                if port.unsent.is_empty() || !connected || std::time::Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    fn wants_input(&self, port: usize) -> bool {
        self.ports.get(port).is_none_or(|p| p.input.len() < HIGH)
    }

    fn host_event(&mut self, p: usize, ev: HostEvent) {
        if p >= self.ports.len() {
            return;
        }
        match ev {
            HostEvent::Connected => {
                self.ports[p].host_connected = true;
                if self.multiport && self.ports[p].ready {
                    self.send_control(p as u32, PORT_OPEN, 1, &[]);
                }
                // Whatever the guest wrote before anyone listened.
                self.flush(p);
            }
            HostEvent::Data(data) => {
                let port = &mut self.ports[p];
                if port.input.len() + data.len() > MAX_BUFFERED {
                    self.dropped += 1;
                } else {
                    port.input.extend(data);
                }
                self.kicks.push(port_queues(p).0);
            }
            HostEvent::Disconnected => {
                let port = &mut self.ports[p];
                port.host_connected = false;
                // A new session starts clean, as with a fresh chardev connection.
                port.input.clear();
                if self.multiport && port.ready {
                    self.send_control(p as u32, PORT_OPEN, 0, &[]);
                }
            }
        }
    }

    fn reset(&mut self) {
        self.multiport = false;
        self.ctrl_out.clear();
        self.kicks.clear();
        for p in &mut self.ports {
            p.input.clear();
            p.tx_held = false;
            p.ready = false;
            p.guest_open = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    /// A queue with `bufs` (address, length, device-writable) chains of one descriptor each.
    /// Every mock queue has its rings at the same addresses: the newest one wins.
    fn queue<'a>(
        m: &'a GuestMemory,
        bufs: &[(u64, u32, bool)],
    ) -> (MockSplitQueue<'a, GuestMemory>, Queue) {
        let mq = MockSplitQueue::new(m, 16);
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .map(|&(a, l, w)| RawDescriptor::from(Descriptor::new(a, l, if w { 2 } else { 0 }, 0)))
            .collect();
        for (i, d) in descs.iter().enumerate() {
            mq.add_desc_chains(std::slice::from_ref(d), i as u16)
                .unwrap();
        }
        let q = mq.create_queue().unwrap();
        (mq, q)
    }

    #[test]
    fn output_waits_for_a_peer_and_input_spans_buffers() {
        let m = mem();
        let peer: Peer = Arc::default();
        let mut c = Console::new(vec![(None, peer.clone())]);
        assert_eq!(c.features(), 0);
        assert_eq!(c.queue_max_sizes().len(), 2);
        m.write_slice(b"hello", GuestAddress(0x10000)).unwrap();
        let (_mq, mut q) = queue(&m, &[(0x10000, 5, false)]);
        assert!(c.process_queue(TX, &mut q, &m));
        // No peer yet: kept, then sent when one connects.
        let (a, mut b) = UnixStream::pair().unwrap();
        *peer.lock().unwrap() = Some(a);
        c.host_event(0, HostEvent::Connected);
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // Seven bytes in, two 4-byte buffers.
        c.host_event(0, HostEvent::Data(b"abcdefg".to_vec()));
        assert_eq!(c.take_kicks(), vec![RX]);
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

    /// Feeds the driver's control message to the device.
    fn driver_says(c: &mut Console, m: &GuestMemory, id: u32, event: u16, value: u16) {
        m.write_slice(&control(id, event, value, &[]), GuestAddress(0x40000))
            .unwrap();
        let (_mq, mut q) = queue(m, &[(0x40000, 8, false)]);
        assert!(c.process_queue(CTRL_TX, &mut q, m));
    }

    /// Collects the device's control messages (one 64-byte buffer each).
    fn device_says(c: &mut Console, m: &GuestMemory) -> Vec<(u32, u16, u16, Vec<u8>)> {
        let bufs: Vec<_> = (0..8).map(|i| (0x50000 + i * 0x100, 64, true)).collect();
        let (mq, mut q) = queue(m, &bufs);
        c.process_queue(CTRL_RX, &mut q, m);
        let used = m.read_obj::<u16>(mq.used_addr().unchecked_add(2)).unwrap();
        (0..used as u64)
            .map(|i| {
                let e = mq.used_addr().unchecked_add(4 + 8 * i);
                let id = m.read_obj::<u32>(e).unwrap() as u64;
                let len = m.read_obj::<u32>(e.unchecked_add(4)).unwrap() as usize;
                let mut b = vec![0u8; len];
                m.read_slice(&mut b, GuestAddress(bufs[id as usize].0))
                    .unwrap();
                (
                    u32::from_le_bytes(b[0..4].try_into().unwrap()),
                    u16::from_le_bytes([b[4], b[5]]),
                    u16::from_le_bytes([b[6], b[7]]),
                    b[8..].to_vec(),
                )
            })
            .collect()
    }

    #[test]
    fn multiport_names_ports_and_opens_them_as_peers_come_and_go() {
        let m = mem();
        let peers: Vec<Peer> = (0..2).map(|_| Peer::default()).collect();
        let mut c = Console::new(vec![
            (Some("janus.agent".into()), peers[0].clone()),
            (Some("janus.stdio".into()), peers[1].clone()),
        ]);
        assert_eq!(c.features(), F_MULTIPORT);
        assert_eq!(c.queue_max_sizes().len(), 6);
        let mut cfg = [0u8; 4];
        c.read_config(4, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), 2);
        c.ack_features(F_MULTIPORT);
        // A peer on port 1 before the driver is up: opened once the port is ready.
        let (a, mut b) = UnixStream::pair().unwrap();
        *peers[1].lock().unwrap() = Some(a);
        c.host_event(1, HostEvent::Connected);
        driver_says(&mut c, &m, 0, DEVICE_READY, 1);
        assert_eq!(
            device_says(&mut c, &m),
            vec![(0, DEVICE_ADD, 0, vec![]), (1, DEVICE_ADD, 0, vec![])]
        );
        driver_says(&mut c, &m, 0, PORT_READY, 1);
        driver_says(&mut c, &m, 1, PORT_READY, 1);
        assert_eq!(
            device_says(&mut c, &m),
            vec![
                (0, PORT_NAME, 0, b"janus.agent".to_vec()),
                (1, PORT_NAME, 0, b"janus.stdio".to_vec()),
                (1, PORT_OPEN, 1, vec![]),
            ]
        );
        // Host input waits until the guest opens the port.
        c.host_event(1, HostEvent::Data(b"xyz".to_vec()));
        let (rx1, tx1) = port_queues(1);
        assert_eq!((rx1, tx1), (4, 5));
        let (_mq, mut q) = queue(&m, &[(0x60000, 16, true)]);
        assert!(!c.process_queue(rx1, &mut q, &m));
        driver_says(&mut c, &m, 1, PORT_OPEN, 1);
        assert!(c.take_kicks().contains(&rx1));
        // (Mock queues share their ring addresses: a fresh one after each use.)
        let (_mq, mut q) = queue(&m, &[(0x60000, 16, true)]);
        assert!(c.process_queue(rx1, &mut q, &m));
        let mut x = [0u8; 3];
        m.read_slice(&mut x, GuestAddress(0x60000)).unwrap();
        assert_eq!(&x, b"xyz");
        // Guest output on port 1 reaches port 1's peer only.
        m.write_slice(b"out", GuestAddress(0x70000)).unwrap();
        let (_mq, mut q) = queue(&m, &[(0x70000, 3, false)]);
        assert!(c.process_queue(tx1, &mut q, &m));
        let mut got = [0u8; 3];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out");
        // The peer leaves: the guest is told.
        c.host_event(1, HostEvent::Disconnected);
        assert_eq!(device_says(&mut c, &m), vec![(1, PORT_OPEN, 0, vec![])]);
        // Malformed: a short control message and an unknown port are ignored.
        m.write_slice(&[1, 2, 3], GuestAddress(0x40000)).unwrap();
        let (_mq, mut q) = queue(&m, &[(0x40000, 3, false)]);
        assert!(c.process_queue(CTRL_TX, &mut q, &m));
        driver_says(&mut c, &m, 9, PORT_OPEN, 1);
        c.host_event(9, HostEvent::Connected);
        // A control buffer too small for a name is used empty, the message kept.
        c.reset();
        c.ack_features(F_MULTIPORT);
        driver_says(&mut c, &m, 0, PORT_READY, 1);
        let (mq, mut q) = queue(&m, &[(0x50000, 4, true)]);
        assert!(c.process_queue(CTRL_RX, &mut q, &m));
        assert_eq!(
            m.read_obj::<u32>(mq.used_addr().unchecked_add(8)).unwrap(),
            0
        );
        assert_eq!(device_says(&mut c, &m).len(), 1);
    }

    #[test]
    fn a_full_port_asks_for_no_more_input_until_the_guest_takes_it() {
        let m = mem();
        let mut c = Console::new(vec![(None, Peer::default())]);
        c.ack_features(0);
        assert!(c.wants_input(0));
        c.host_event(0, HostEvent::Data(vec![7u8; HIGH]));
        assert!(!c.wants_input(0));
        let (_mq, mut q) = queue(&m, &[(0x60000, 4096, true)]);
        assert!(c.process_queue(RX, &mut q, &m));
        assert!(c.wants_input(0));
        assert_eq!(c.dropped, 0);
    }

    #[test]
    fn a_slow_peer_holds_the_guest_back_without_blocking_or_dropping() {
        let m = mem();
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let peer: Peer = Arc::new(Mutex::new(Some(a)));
        let mut c = Console::new(vec![(None, peer)]);
        c.ack_features(0);
        // 1 MiB of output in eight 128 KiB buffers; the peer reads nothing yet.
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        m.write_slice(&data, GuestAddress(0x100000)).unwrap();
        let bufs: Vec<_> = (0..8)
            .map(|i| (0x100000 + i * 0x20000, 0x20000, false))
            .collect();
        let (mq, mut q) = queue(&m, &bufs);
        let used = || m.read_obj::<u16>(mq.used_addr().unchecked_add(2)).unwrap();
        assert!(c.process_queue(TX, &mut q, &m), "returns without blocking");
        assert!(
            used() < 8,
            "every buffer taken although the peer reads nothing"
        );
        let reader = std::thread::spawn(move || {
            let mut all = vec![0u8; 1 << 20];
            b.read_exact(&mut all).unwrap();
            all
        });
        for _ in 0..5000 {
            c.retry_output();
            if c.take_kicks().contains(&TX) {
                c.process_queue(TX, &mut q, &m);
            }
            if used() == 8 && c.ports[0].unsent.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(used(), 8);
        assert!(reader.join().unwrap() == data, "output differs");
        assert_eq!(c.dropped, 0);
    }

    #[test]
    fn without_multiport_only_port_zero_exists() {
        let m = mem();
        let mut c = Console::new(vec![
            (Some("a".into()), Peer::default()),
            (Some("b".into()), Peer::default()),
        ]);
        c.ack_features(0);
        let (_mq, mut q) = queue(&m, &[(0x40000, 8, false)]);
        assert!(!c.process_queue(CTRL_TX, &mut q, &m));
        assert!(!c.process_queue(5, &mut q, &m));
        // Port 0 flows without any PORT_OPEN.
        c.host_event(0, HostEvent::Data(b"hi".to_vec()));
        let (_mq, mut q) = queue(&m, &[(0x60000, 16, true)]);
        assert!(c.process_queue(RX, &mut q, &m));
    }
}
