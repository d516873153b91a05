//! The vhost-user frontend of virtio-fs against a backend that answers anything: the fuzzer
//! plays virtiofsd on a socketpair. Its replies (features, protocol features, queue count,
//! acknowledgements, vring bases; well-formed or not) meet the connect negotiation
//! (`Fs::from_stream`), the hand-over of memory and rings at DRIVER_OK (`activate`) and
//! their return at reset.
//!
//! Input: the bytes the backend sends, all of them written before the frontend starts (the
//! frontend reads a reply per request; when they run out it reads EOF).
#![no_main]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vmm::memory::GuestMemory;
use vmm::virtio::fs::Fs;
use vmm::virtio::VirtioDevice;

/// Guest RAM in a memfd (as with --shared-memory), made once: 16 MiB.
fn memory() -> GuestMemory {
    static MEM: OnceLock<(GuestMemory, Option<std::fs::File>)> = OnceLock::new();
    MEM.get_or_init(|| vmm::memory::create(16 << 20, true).expect("shared guest memory"))
        .0
        .clone()
}

/// The driver's two queues (high priority, requests): 8 entries each, inside guest RAM.
fn queues() -> Vec<Queue> {
    (0..2u32)
        .map(|i| {
            let mut q = Queue::new(1024).expect("queue");
            let base = 0x10_0000 * (i + 1);
            q.set_size(8);
            q.set_desc_table_address(Some(base), Some(0));
            q.set_avail_ring_address(Some(base + 0x1000), Some(0));
            q.set_used_ring_address(Some(base + 0x2000), Some(0));
            q.set_ready(true);
            q
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    common::ignore_sigpipe();
    // Less than a socket buffer: written at once without the frontend reading.
    let data = &data[..data.len().min(64 << 10)];
    let Ok((frontend_end, mut backend_end)) = UnixStream::pair() else {
        return;
    };
    if backend_end.write_all(data).is_err() {
        return;
    }
    // The frontend reads EOF once the replies run out; its requests still arrive (and stay
    // unread in the backend end's buffer, which is dropped at the end).
    let _ = backend_end.shutdown(std::net::Shutdown::Write);
    let Ok(mut fs) = Fs::from_stream("fuzz", Path::new("<fuzz>"), frontend_end) else {
        return;
    };
    let features = fs.features();
    let mem = memory();
    let _ = fs.activate(features, &queues(), &mem);
    fs.reset();
    drop(fs);
    drop(backend_end);
});
