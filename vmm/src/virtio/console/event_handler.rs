//! The console ports' host side on the device event loop: each port's listening socket, the
//! peer connected to it, and the device's wake eventfd. What happens on them goes to the
//! device (`Console::host_event`); the queues that makes runnable go to the transport.
//! The console is never held while calling the transport, which locks it to run a queue.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Console, HostEvent};
use crate::events::{watch, DeviceEventHandler};
use crate::virtio::{lock, QueueNotifier};

/// One read of a peer; below the device's `HIGH`, so a paused peer never overflows its port.
const READ_SIZE: usize = 64 << 10;

enum Source {
    /// The device has queues to run or room on a port (see `Console::take_kicks`).
    Wake(EventFd),
    /// A peer connects to the socket of port `port`.
    Listener { listener: UnixListener, port: usize },
    /// The connected peer of port `port` sent bytes (or left).
    Peer { stream: UnixStream, port: usize },
}

impl Source {
    fn fd(&self) -> RawFd {
        match self {
            Source::Wake(evt) => evt.as_raw_fd(),
            Source::Listener { listener, .. } => listener.as_raw_fd(),
            Source::Peer { stream, .. } => stream.as_raw_fd(),
        }
    }
}

pub struct ConsoleHandler {
    console: Arc<Mutex<Console>>,
    transport: Arc<dyn QueueNotifier>,
    /// Indexed by the event's data; a finished source leaves `None`.
    sources: Vec<Option<Source>>,
    /// The source of each port's peer now connected: a newer peer replaces an older one.
    current: Vec<Option<usize>>,
    /// Peers not being read while their port's input waits for the guest (backpressure:
    /// the peer's writes block in its socket instead of being dropped).
    paused: Vec<usize>,
    buf: Vec<u8>,
}

impl ConsoleHandler {
    /// `listeners[p]` is the socket of port `p`.
    pub fn new(
        console: Arc<Mutex<Console>>,
        transport: Arc<dyn QueueNotifier>,
        listeners: Vec<UnixListener>,
    ) -> std::io::Result<ConsoleHandler> {
        let wake = lock(&console).wake_fd()?;
        let current = vec![None; listeners.len()];
        let listeners = listeners
            .into_iter()
            .enumerate()
            .map(|(port, listener)| Some(Source::Listener { listener, port }));
        Ok(ConsoleHandler {
            console,
            transport,
            sources: std::iter::once(Some(Source::Wake(wake)))
                .chain(listeners)
                .collect(),
            current,
            paused: Vec::new(),
            buf: vec![0u8; READ_SIZE],
        })
    }

    /// Has the transport run the queues the device asked for.
    fn run_kicks(&self) {
        let kicks = lock(&self.console).take_kicks();
        for q in kicks {
            self.transport.notify(q);
        }
    }

    /// Watches paused peers again whose port has room now (the guest took input).
    fn resume(&mut self, ops: &mut EventOps) {
        let console = lock(&self.console);
        let sources = &self.sources;
        let (ready, still): (Vec<usize>, Vec<usize>) =
            self.paused.iter().partition(|&&j| match sources.get(j) {
                Some(Some(Source::Peer { port, .. })) => console.wants_input(*port),
                _ => false,
            });
        drop(console);
        self.paused = still;
        for j in ready {
            if let Some(Some(s)) = self.sources.get(j) {
                watch(ops, s.fd(), j);
            }
        }
    }

    /// A peer connected to port `port`'s socket; the source to read it from.
    fn accept(&self, listener: &UnixListener, port: usize) -> Option<Source> {
        let (stream, _) = listener.accept().ok()?;
        // Non-blocking both ways: a slow peer must not stall the device thread.
        let w = stream.try_clone().ok()?;
        stream.set_nonblocking(true).ok()?;
        let mut console = lock(&self.console);
        // One peer at a time: a new one replaces the old, whose source then reads as left.
        if let Some(old) = self.current.get(port).copied().flatten() {
            if let Some(Some(Source::Peer { stream, .. })) = self.sources.get(old) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            // The guest sees the old session end before the new one starts.
            console.host_event(port, HostEvent::Disconnected);
        }
        console.host_event(port, HostEvent::Connected(w));
        Some(Source::Peer { stream, port })
    }
}

impl MutEventSubscriber for ConsoleHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, s) in self.sources.iter().enumerate() {
            if let Some(s) = s {
                watch(ops, s.fd(), i);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let i = events.data() as usize;
        let mut done = false;
        // Read data this time: a hang-up waits until the socket is drained.
        let mut more = false;
        let mut read_port = None;
        let mut new = None;
        match self.sources.get(i).and_then(|s| s.as_ref()) {
            Some(Source::Wake(evt)) => {
                let _ = evt.read();
            }
            Some(Source::Listener { listener, port }) => {
                new = self.accept(listener, *port).map(|s| (s, *port));
            }
            Some(Source::Peer { stream, port }) => match (&*stream).read(&mut self.buf) {
                Ok(n) if n > 0 => {
                    let data = self.buf[..n].to_vec();
                    lock(&self.console).host_event(*port, HostEvent::Data(data));
                    more = true;
                    read_port = Some(*port);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    more = true;
                }
                _ => {
                    if self.current.get(*port) == Some(&Some(i)) {
                        self.current[*port] = None;
                        lock(&self.console).host_event(*port, HostEvent::Disconnected);
                    }
                    done = true;
                }
            },
            None => {}
        }
        self.run_kicks();
        // Decided after the guest had its chance to take the input.
        let pause = read_port.is_some_and(|p| !lock(&self.console).wants_input(p));
        let hup = events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR);
        if done || (hup && !more) {
            let _ = ops.remove(events);
            if let Some(s) = self.sources.get_mut(i) {
                *s = None;
            }
        } else if pause {
            let _ = ops.remove(events);
            self.paused.push(i);
        }
        if !self.paused.is_empty() {
            self.resume(ops);
        }
        if let Some((s, port)) = new {
            let j = self.sources.len();
            if watch(ops, s.fd(), j) {
                self.sources.push(Some(s));
                self.current[port] = Some(j);
            }
        }
    }
}

impl DeviceEventHandler for ConsoleHandler {
    fn retry(&mut self) {
        lock(&self.console).retry_output();
        self.run_kicks();
    }

    fn drain(&mut self, deadline: Instant) {
        lock(&self.console).drain_output(deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::io::Write;

    use crate::virtio::console::device::RX;

    /// Stands in for the transport: records the queues it was asked to run.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<usize>>);

    impl QueueNotifier for Recorder {
        fn notify(&self, index: usize) {
            self.0.lock().unwrap().push(index);
        }
        fn backend_used(&self) {}
    }

    /// A one-port console and its handler on a loop of its own, with a peer connecting.
    struct Setup {
        console: Arc<Mutex<Console>>,
        transport: Arc<Recorder>,
        em: EventManager<Arc<Mutex<ConsoleHandler>>>,
        peer: UnixStream,
        _dir: tempfile::TempDir,
    }

    impl Setup {
        fn new() -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("port0");
            let listener = UnixListener::bind(&path).unwrap();
            let console = Arc::new(Mutex::new(Console::new(vec![None]).unwrap()));
            let transport = Arc::new(Recorder::default());
            let handler = ConsoleHandler::new(console.clone(), transport.clone(), vec![listener]);
            let mut em = EventManager::<Arc<Mutex<ConsoleHandler>>>::new().unwrap();
            em.add_subscriber(Arc::new(Mutex::new(handler.unwrap())));
            let peer = UnixStream::connect(&path).unwrap();
            Setup {
                console,
                transport,
                em,
                peer,
                _dir: dir,
            }
        }
    }

    #[test]
    fn a_peer_is_accepted_and_its_input_runs_the_receive_queue() {
        let mut t = Setup::new();
        assert_eq!(t.em.run_with_timeout(1000).unwrap(), 1, "accept");
        assert!(t.transport.0.lock().unwrap().is_empty());
        t.peer.write_all(b"hi").unwrap();
        assert_eq!(t.em.run_with_timeout(1000).unwrap(), 1, "read");
        assert_eq!(*t.transport.0.lock().unwrap(), vec![RX]);
        assert!(lock(&t.console).wants_input(0));
        // The peer leaves: its source is dropped, nothing more to run.
        drop(t.peer);
        t.em.run_with_timeout(1000).unwrap();
        assert_eq!(t.em.run_with_timeout(50).unwrap(), 0);
        assert_eq!(t.transport.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_full_port_pauses_its_peer_until_the_guest_takes_input() {
        use crate::memory::GuestMemory;
        use crate::virtio::console::device::HIGH;
        use crate::virtio::VirtioDevice;
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;

        let mut t = Setup::new();
        t.em.run_with_timeout(1000).unwrap();
        // More than the port holds: the writer blocks once the socket is full.
        let mut peer = t.peer;
        let writer = std::thread::spawn(move || peer.write_all(&vec![7u8; 2 * HIGH]).unwrap());
        while lock(&t.console).wants_input(0) {
            t.em.run_with_timeout(1000).unwrap();
        }
        assert_eq!(
            t.em.run_with_timeout(50).unwrap(),
            0,
            "the peer is not read"
        );
        let reads = t.transport.0.lock().unwrap().len();
        // The guest takes it all: the device wakes the handler, which reads again.
        let m = GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let mq = MockSplitQueue::new(&m, 16);
        let d = RawDescriptor::from(Descriptor::new(0x10_0000, 2 * HIGH as u32, 2, 0));
        mq.add_desc_chains(&[d], 0).unwrap();
        let mut q = mq.create_queue().unwrap();
        assert!(lock(&t.console).process_queue(RX, &mut q, &m));
        assert!(lock(&t.console).wants_input(0));
        for _ in 0..100 {
            if writer.is_finished() {
                break;
            }
            t.em.run_with_timeout(100).unwrap();
        }
        assert!(writer.is_finished(), "the peer is read again");
        writer.join().unwrap();
        assert!(t.transport.0.lock().unwrap().len() > reads, "read again");
    }
}
