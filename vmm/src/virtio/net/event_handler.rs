//! The tap of a virtio-net device on the device event loop: frames read from it go to the
//! device, then the transport runs the receive queue (with the device released, as the
//! transport locks it to run a queue).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Net, MAX_FRAME, RX};
use crate::events::{watch, DeviceEventHandler};
use crate::virtio::{lock, QueueNotifier};

pub struct NetHandler {
    net: Arc<Mutex<Net>>,
    transport: Arc<dyn QueueNotifier>,
    tap: Arc<File>,
    buf: Vec<u8>,
}

impl NetHandler {
    pub fn new(net: Arc<Mutex<Net>>, transport: Arc<dyn QueueNotifier>, tap: Arc<File>) -> Self {
        NetHandler {
            net,
            transport,
            tap,
            buf: vec![0u8; MAX_FRAME],
        }
    }
}

impl MutEventSubscriber for NetHandler {
    fn init(&mut self, ops: &mut EventOps) {
        watch(ops, self.tap.as_raw_fd(), 0);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let gone = match (&*self.tap).read(&mut self.buf) {
            Ok(n) if n > 0 => {
                lock(&self.net).input(self.buf[..n].to_vec());
                self.transport.notify(RX);
                false
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                false
            }
            Ok(_) => true,
            Err(e) => {
                log::warn!("tap read: {e}");
                true
            }
        };
        if gone
            || events
                .event_set()
                .intersects(EventSet::HANG_UP | EventSet::ERROR)
        {
            // The tap is gone: stop watching it.
            let _ = ops.remove(events);
        }
    }
}

impl DeviceEventHandler for NetHandler {}
