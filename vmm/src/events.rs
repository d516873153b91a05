//! The device event loop (event-manager). Queue notifications arrive as ioeventfds: KVM
//! completes the guest's QueueNotify write itself and signals the eventfd, so a notification
//! costs no exit to the VMM. Taps and the console ports' sockets are readable fds. One thread serves
//! them all; device work happens there, off the vCPU threads.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::Devices;
use crate::virtio::{console, net, HostEvent};

/// Something the loop waits on, and the device it feeds.
pub enum Source {
    /// The guest notified queue `queue` of the device at `base`.
    Notify { evt: EventFd, base: u64, queue: u32 },
    /// The vhost-user backend of the device at `base` used buffers (its call eventfd).
    BackendCall { evt: EventFd, base: u64 },
    /// A frame arrived on the tap of the virtio-net device at `base`.
    Tap { tap: Arc<File>, base: u64 },
    /// A peer connects to the socket of console port `port` of the device at `base`.
    ConsoleListener {
        listener: UnixListener,
        peer: console::Peer,
        base: u64,
        port: usize,
    },
    /// The connected peer of a console port sent bytes (or left).
    ConsolePeer {
        stream: UnixStream,
        peer: console::Peer,
        base: u64,
        port: usize,
    },
}

impl Source {
    fn fd(&self) -> RawFd {
        match self {
            Source::Notify { evt, .. } | Source::BackendCall { evt, .. } => evt.as_raw_fd(),
            Source::Tap { tap, .. } => tap.as_raw_fd(),
            Source::ConsoleListener { listener, .. } => listener.as_raw_fd(),
            Source::ConsolePeer { stream, .. } => stream.as_raw_fd(),
        }
    }
}

pub struct DeviceEvents {
    devices: Arc<Devices>,
    /// Indexed by the event's data; a finished source leaves `None`.
    sources: Vec<Option<Source>>,
    /// The source of each console port's peer now connected, by (device, port): a newer
    /// peer replaces an older one.
    console_peers: HashMap<(u64, usize), usize>,
    /// Console peers not being read while their port's input waits for the guest
    /// (backpressure: the peer's writes block in its socket instead of being dropped).
    paused: Vec<usize>,
    buf: Vec<u8>,
}

impl DeviceEvents {
    pub fn new(devices: Arc<Devices>, sources: Vec<Source>) -> DeviceEvents {
        DeviceEvents {
            devices,
            sources: sources.into_iter().map(Some).collect(),
            console_peers: HashMap::new(),
            paused: Vec::new(),
            buf: vec![0u8; net::MAX_FRAME],
        }
    }

    fn watch(&mut self, ops: &mut EventOps, s: Source) -> Option<usize> {
        let i = self.sources.len();
        if let Err(e) = ops.add(Events::with_data_raw(s.fd(), i as u32, EventSet::IN)) {
            log::warn!("event loop: watch fd {}: {e:?}", s.fd());
            return None;
        }
        self.sources.push(Some(s));
        Some(i)
    }
}

impl DeviceEvents {
    /// Watches paused console peers again whose port has room now (the guest took input).
    fn resume(&mut self, ops: &mut EventOps) {
        let devices = &self.devices;
        let sources = &self.sources;
        let (ready, still): (Vec<usize>, Vec<usize>) =
            self.paused.iter().partition(|&&j| match sources.get(j) {
                Some(Some(Source::ConsolePeer { base, port, .. })) => {
                    devices.mmio_wants_input(*base, *port)
                }
                _ => false,
            });
        self.paused = still;
        for j in ready {
            if let Some(Some(s)) = self.sources.get(j) {
                if let Err(e) = ops.add(Events::with_data_raw(s.fd(), j as u32, EventSet::IN)) {
                    log::warn!("event loop: watch fd {}: {e:?}", s.fd());
                }
            }
        }
    }
}

impl MutEventSubscriber for DeviceEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, s) in self.sources.iter().enumerate() {
            if let Some(s) = s {
                if let Err(e) = ops.add(Events::with_data_raw(s.fd(), i as u32, EventSet::IN)) {
                    log::warn!("event loop: watch fd {}: {e:?}", s.fd());
                }
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let i = events.data() as usize;
        let mut done = false;
        // Read data this time: a hang-up waits until the socket is drained.
        let mut more = false;
        let mut pause = false;
        let mut notified = false;
        let mut new = None;
        match self.sources.get(i).and_then(|s| s.as_ref()) {
            Some(Source::Notify { evt, base, queue }) => {
                let _ = evt.read();
                self.devices.mmio_notify(*base, *queue as usize);
                notified = true;
            }
            Some(Source::BackendCall { evt, base }) => {
                let _ = evt.read();
                self.devices.mmio_backend_used(*base);
            }
            Some(Source::Tap { tap, base }) => match (&**tap).read(&mut self.buf) {
                Ok(n) if n > 0 => self.devices.mmio_input(*base, self.buf[..n].to_vec()),
                Ok(_) => done = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("tap read: {e}");
                    done = true;
                }
            },
            Some(Source::ConsoleListener {
                listener,
                peer,
                base,
                port,
            }) => {
                if let Ok((stream, _)) = listener.accept() {
                    // Non-blocking both ways: a slow peer must not stall the device thread.
                    if let (Ok(w), Ok(())) = (stream.try_clone(), stream.set_nonblocking(true)) {
                        // One peer at a time: a new one replaces the old, whose source then
                        // reads as left.
                        if let Some(old) = self.console_peers.remove(&(*base, *port)) {
                            if let Some(Some(Source::ConsolePeer { stream, .. })) =
                                self.sources.get(old)
                            {
                                let _ = stream.shutdown(std::net::Shutdown::Both);
                            }
                            // The guest sees the old session end before the new one starts.
                            self.devices
                                .mmio_host_event(*base, *port, HostEvent::Disconnected);
                        }
                        *peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
                        self.devices
                            .mmio_host_event(*base, *port, HostEvent::Connected);
                        new = Some(Source::ConsolePeer {
                            stream,
                            peer: peer.clone(),
                            base: *base,
                            port: *port,
                        });
                    }
                }
            }
            Some(Source::ConsolePeer {
                stream,
                peer,
                base,
                port,
            }) => match (&*stream).read(&mut self.buf) {
                Ok(n) if n > 0 => {
                    self.devices.mmio_host_event(
                        *base,
                        *port,
                        HostEvent::Data(self.buf[..n].to_vec()),
                    );
                    more = true;
                    pause = !self.devices.mmio_wants_input(*base, *port);
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
                    if self.console_peers.get(&(*base, *port)) == Some(&i) {
                        *peer.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        self.console_peers.remove(&(*base, *port));
                        self.devices
                            .mmio_host_event(*base, *port, HostEvent::Disconnected);
                    }
                    done = true;
                }
            },
            None => {}
        }
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
        if notified && !self.paused.is_empty() {
            self.resume(ops);
        }
        if let Some(s) = new {
            let key = match &s {
                Source::ConsolePeer { base, port, .. } => Some((*base, *port)),
                _ => None,
            };
            if let (Some(j), Some(key)) = (self.watch(ops, s), key) {
                self.console_peers.insert(key, j);
            }
        }
    }
}
