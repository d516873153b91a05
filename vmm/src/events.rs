//! The device event loop (event-manager). One thread serves every device's host-side events;
//! device work happens there, off the vCPU threads. Its subscribers:
//!
//! - `QueueEvents`, one per virtio device: queue notifications arrive as ioeventfds (KVM
//!   completes the guest's QueueNotify write itself and signals the eventfd, so a
//!   notification costs no exit to the VMM), and a vhost-user backend's call eventfds say it
//!   used buffers. Both go to the device's transport.
//! - the devices' own handlers for their host fds (a tap, the console ports' sockets), next
//!   to each device (`virtio/*/event_handler.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::virtio::{lock, QueueNotifier};

/// A subscriber of the device event loop.
pub trait DeviceEventHandler: MutEventSubscriber + Send {
    /// Work that waits on a host peer rather than on an fd (output a slow peer could not take
    /// yet): called when the loop is idle (at least every 100 ms) and every 20 ms while busy.
    fn retry(&mut self) {}
    /// The VM has ended: hand host peers what they are still owed, until `deadline`.
    fn drain(&mut self, _deadline: Instant) {}
}

/// A handler as the loop and the VM share it (the VM drains it after the loop has stopped).
pub type Handler = Arc<Mutex<dyn DeviceEventHandler>>;

/// Watches `fd` for input, with `data` to tell it apart in `process`.
pub fn watch(ops: &mut EventOps, fd: std::os::fd::RawFd, data: usize) -> bool {
    match ops.add(Events::with_data_raw(fd, data as u32, EventSet::IN)) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("event loop: watch fd {fd}: {e:?}");
            false
        }
    }
}

/// A device's queue notifications and backend calls, for its transport.
pub struct QueueEvents {
    transport: Arc<dyn QueueNotifier>,
    /// (ioeventfd, queue index); the event data is the position here.
    notify: Vec<(EventFd, usize)>,
    /// The backend's call eventfds; event data `notify.len() + position`.
    calls: Vec<EventFd>,
}

impl QueueEvents {
    pub fn new(
        transport: Arc<dyn QueueNotifier>,
        notify: Vec<(EventFd, usize)>,
        calls: Vec<EventFd>,
    ) -> QueueEvents {
        QueueEvents {
            transport,
            notify,
            calls,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.notify.is_empty() && self.calls.is_empty()
    }
}

impl MutEventSubscriber for QueueEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = self.notify.iter().map(|(e, _)| e).chain(&self.calls);
        for (i, evt) in fds.enumerate() {
            use std::os::fd::AsRawFd;
            watch(ops, evt.as_raw_fd(), i);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let i = events.data() as usize;
        if let Some((evt, queue)) = self.notify.get(i) {
            let _ = evt.read();
            self.transport.notify(*queue);
        } else if let Some(evt) = self.calls.get(i - self.notify.len()) {
            let _ = evt.read();
            self.transport.backend_used();
        }
    }
}

impl DeviceEventHandler for QueueEvents {}

/// The loop over every handler; `run` on the device thread.
pub struct EventLoop {
    em: EventManager<Handler>,
    handlers: Vec<Handler>,
}

impl EventLoop {
    /// Makes the epoll set and registers every handler (before seccomp confines the thread).
    pub fn new(handlers: Vec<Handler>) -> Result<EventLoop> {
        let mut em = EventManager::<Handler>::new()
            .map_err(|e| Error::Config(format!("event loop: {e:?}")))?;
        for h in &handlers {
            em.add_subscriber(h.clone());
        }
        Ok(EventLoop { em, handlers })
    }

    /// Serves events until `stop`. Output a slow host peer could not take is retried when
    /// the loop is idle and at least every 20 ms while it is busy.
    pub fn run(&mut self, stop: &AtomicBool) {
        let mut retried = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            match self.em.run_with_timeout(100) {
                Err(e) => {
                    log::error!("device event loop: {e:?}");
                    return;
                }
                Ok(n) if n == 0 || retried.elapsed().as_millis() >= 20 => {
                    for h in &self.handlers {
                        lock(h).retry();
                    }
                    retried = Instant::now();
                }
                Ok(_) => {}
            }
        }
    }
}

/// The VM has ended: every handler hands its host peers what they are still owed.
pub fn drain(handlers: &[Handler], deadline: Instant) {
    for h in handlers {
        lock(h).drain(deadline);
    }
}
