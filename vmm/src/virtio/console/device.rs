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
//!
//! This is the device model; the sockets are watched by `event_handler.rs`, which hands what
//! happens on them to `host_event`. Work for the transport that arises while it runs a queue
//! (a control reply, input for a port the guest just opened, room for a paused peer) goes
//! through the `wake` eventfd to the handler, which cannot be called from here: the transport
//! holds the device while it runs a queue.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;

use virtio_queue::{Queue, QueueT, Writer};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestMemory;
use crate::virtio::VirtioDevice;

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

/// What happened on the host side of a port.
#[derive(Debug)]
pub enum HostEvent {
    /// A peer connected; the device writes guest output to this (non-blocking) stream.
    Connected(UnixStream),
    Data(Vec<u8>),
    Disconnected,
}

struct Port {
    name: Option<String>,
    /// The connected peer's write side.
    peer: Option<UnixStream>,
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
    /// Queues the device wants processed next (see `take_kicks`).
    kicks: Vec<usize>,
    /// Tells the event handler to look at `kicks` and its paused peers.
    wake: EventFd,
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
    /// Ports in order (port 0 first), each with its name (multiport).
    pub fn new(ports: Vec<Option<String>>) -> std::io::Result<Console> {
        let n = ports.len().clamp(1, MAX_PORTS);
        // Queue 2 and 3 exist (control) as soon as there is more than one port.
        let nq = if n > 1 || ports.iter().any(|name| name.is_some()) {
            2 + 2 * n
        } else {
            2
        };
        Ok(Console {
            ports: ports
                .into_iter()
                .take(MAX_PORTS)
                .map(|name| Port {
                    name,
                    peer: None,
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
            wake: EventFd::new(EFD_NONBLOCK)?,
            dropped: 0,
        })
    }

    /// The eventfd the event handler watches for `kicks` and for room on paused ports.
    pub fn wake_fd(&self) -> std::io::Result<EventFd> {
        self.wake.try_clone()
    }

    /// Asks for queue `q` to be run; once is enough until it has run, so `kicks` holds each
    /// queue at most once.
    fn kick(&mut self, q: usize) {
        if !self.kicks.contains(&q) {
            self.kicks.push(q);
        }
    }

    /// Wakes the event handler; a failed write only delays the work to its next retry.
    fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            log::debug!("virtio-console: wake: {e}");
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
        let Some(s) = port.peer.as_mut() else {
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
            port.peer = None;
        }
        port.unsent.drain(..sent);
    }

    fn send_control(&mut self, id: u32, event: u16, value: u16, payload: &[u8]) {
        self.ctrl_out.push_back(control(id, event, value, payload));
        self.kick(CTRL_RX);
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
        let used = crate::virtio::drain_readable(queue, mem, MAX_BUFFERED, |data| {
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
        // The handler stopped reading the peer at HIGH; it resumes once there is room.
        let was_full = !self.wants_input(p);
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
        if was_full && self.wants_input(p) {
            self.wake();
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
        let used = crate::virtio::drain_readable(queue, mem, 4096, |m| {
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
                    self.kick(port_queues(p).0);
                    self.flush(p);
                }
            }
            _ => log::debug!("virtio-console: control event {event} ({id}, {value}) ignored"),
        }
    }
}

/// The host side, driven by the event handler.
impl Console {
    /// Queues to run next (a control reply to deliver, input for a port); the event handler
    /// has the transport run them.
    pub fn take_kicks(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.kicks)
    }

    /// Retries output a host peer could not take yet (the event loop calls it after every
    /// round of events, at least every 100 ms); transmit queues it may take again go to
    /// `take_kicks`.
    pub fn retry_output(&mut self) {
        for p in 0..self.ports.len() {
            self.flush(p);
            let port = &mut self.ports[p];
            if port.tx_held && port.unsent.len() < HIGH {
                port.tx_held = false;
                let tx = port_queues(p).1;
                self.kick(tx);
            }
        }
    }

    /// The VM has ended: write out what host peers have not taken yet, until `deadline`.
    pub fn drain_output(&mut self, deadline: std::time::Instant) {
        for p in 0..self.ports.len() {
            loop {
                self.flush(p);
                let port = &self.ports[p];
                let connected = port.peer.is_some();
                if port.unsent.is_empty() || !connected || std::time::Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Whether port `port` takes more host input now; when not, the handler stops reading
    /// its peer until the guest has taken some (backpressure instead of dropping).
    pub fn wants_input(&self, port: usize) -> bool {
        self.ports.get(port).is_none_or(|p| p.input.len() < HIGH)
    }

    /// Something happened on the host side of port `p`.
    pub fn host_event(&mut self, p: usize, ev: HostEvent) {
        if p >= self.ports.len() {
            return;
        }
        match ev {
            HostEvent::Connected(stream) => {
                self.ports[p].peer = Some(stream);
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
                self.kick(port_queues(p).0);
            }
            HostEvent::Disconnected => {
                let port = &mut self.ports[p];
                port.peer = None;
                port.host_connected = false;
                // A new session starts clean, as with a fresh chardev connection.
                port.input.clear();
                if self.multiport && port.ready {
                    self.send_control(p as u32, PORT_OPEN, 0, &[]);
                }
            }
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
        crate::virtio::read_config_bytes(&cfg, offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let used = match index {
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
        };
        if !self.kicks.is_empty() {
            self.wake();
        }
        used
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
        // Input was dropped: paused peers may be read again.
        self.wake();
    }
}

#[cfg(test)]
mod tests;
