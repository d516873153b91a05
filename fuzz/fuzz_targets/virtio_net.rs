//! A guest driving virtio-net through the virtio-mmio registers, with guest-controlled
//! memory, while frames arrive from the tap: transmit chains of any shape and length, receive
//! buffers of any size for frames of any size (the tap is /dev/null here).
//!
//! Input: 9-byte records `op, a (u32 LE), b (u32 LE)` until a record whose op is 0xff (or the
//! input ends); the whole input is also the guest memory from 0x4000 on. Ops below 0x80 are
//! register accesses (odd: write `b` at `a & 0x1ff`, even: read); from 0x80 on, a frame from
//! the tap of `b & 0x1ffff` bytes (taken from the input at `a`), then the receive queue runs
//! as the event handler runs it.
#![no_main]

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use common::{guest_memory, records, register, slice, NoIrq};
use libfuzzer_sys::fuzz_target;
use vmm::virtio::lock;
use vmm::virtio::mmio::MmioTransport;
use vmm::virtio::net::{device::RX, Net, MAX_FRAME};

/// The tap: frames written to it are gone, as on a link nobody listens to.
fn tap() -> Arc<std::fs::File> {
    static TAP: OnceLock<Arc<std::fs::File>> = OnceLock::new();
    TAP.get_or_init(|| {
        Arc::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .expect("/dev/null"),
        )
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let mem = guest_memory(data);
    let net = Arc::new(Mutex::new(Net::new(tap(), [2, 0, 0, 0, 0, 1])));
    let mut t = MmioTransport::new(net.clone(), mem, Box::new(NoIrq));
    for r in records(data) {
        if r.op < 0x80 {
            register(&mut t, &r);
        } else {
            let frame = slice(data, r.a, (r.b & 0x1ffff) as usize % (MAX_FRAME + 1));
            lock(&net).input(frame);
            t.notify(RX);
        }
    }
});
