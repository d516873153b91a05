//! A guest driving virtio-console (multiport: two named ports, so the control queues exist)
//! through the virtio-mmio registers, with guest-controlled memory, while host peers come and
//! go and send input: every queue, including the control queue's messages from the driver
//! (DEVICE_READY, PORT_READY, PORT_OPEN with any id and value), and the queues the device
//! asks to be run, as its event handler runs them.
//!
//! Input: 9-byte records `op, a (u32 LE), b (u32 LE)` until a record whose op is 0xff (or the
//! input ends); the whole input is also the guest memory from 0x4000 on. Ops below 0x80 are
//! register accesses (odd: write `b` at `a & 0x1ff`, even: read); from 0x80 on, host events
//! on port `a % 2`: input of `b & 0xfff` bytes (taken from the input at `b >> 16`), a peer
//! connecting, the peer leaving, the event loop's retry of output.
#![no_main]

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use common::{guest_memory, records, register, slice, NoIrq};
use libfuzzer_sys::fuzz_target;
use vmm::virtio::console::{Console, HostEvent};
use vmm::virtio::lock;
use vmm::virtio::mmio::MmioTransport;

const PORTS: usize = 2;

/// The transport runs the queues the device asked for, as `ConsoleHandler::run_kicks` does.
fn run_kicks(console: &Mutex<Console>, t: &mut MmioTransport) {
    let kicks = lock(console).take_kicks();
    for q in kicks {
        t.notify(q);
    }
}

fuzz_target!(|data: &[u8]| {
    common::ignore_sigpipe();
    let mem = guest_memory(data);
    let Ok(console) = Console::new(vec![Some("janus.agent".into()), Some("janus.stdio".into())])
    else {
        return;
    };
    let console = Arc::new(Mutex::new(console));
    let mut t = MmioTransport::new(console.clone(), mem, Box::new(NoIrq));
    // Our ends of the connected peers: read (non-blocking) so they do not fill up.
    let mut peers: Vec<Option<UnixStream>> = (0..PORTS).map(|_| None).collect();
    for r in records(data) {
        if r.op < 0x80 {
            register(&mut t, &r);
        } else {
            let port = r.a as usize % PORTS;
            match r.op % 4 {
                0 => {
                    let input = slice(data, r.b >> 16, (r.b & 0xfff) as usize);
                    lock(&console).host_event(port, HostEvent::Data(input));
                }
                1 => {
                    let Ok((ours, theirs)) = UnixStream::pair() else {
                        return;
                    };
                    let _ = ours.set_nonblocking(true);
                    let _ = theirs.set_nonblocking(true);
                    let mut c = lock(&console);
                    if peers[port].is_some() {
                        c.host_event(port, HostEvent::Disconnected);
                    }
                    c.host_event(port, HostEvent::Connected(theirs));
                    peers[port] = Some(ours);
                }
                2 => {
                    if peers[port].take().is_some() {
                        lock(&console).host_event(port, HostEvent::Disconnected);
                    }
                }
                _ => {
                    let mut buf = [0u8; 4096];
                    for p in peers.iter_mut().flatten() {
                        while matches!(p.read(&mut buf), Ok(n) if n > 0) {}
                    }
                    lock(&console).retry_output();
                }
            }
        }
        run_kicks(&console, &mut t);
    }
});
