//! The console device model against mock queues.

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
    let mut c = Console::new(vec![None]).unwrap();
    assert_eq!(c.features(), 0);
    assert_eq!(c.queue_max_sizes().len(), 2);
    m.write_slice(b"hello", GuestAddress(0x10000)).unwrap();
    let (_mq, mut q) = queue(&m, &[(0x10000, 5, false)]);
    assert!(c.process_queue(TX, &mut q, &m));
    // No peer yet: kept, then sent when one connects.
    let (a, mut b) = UnixStream::pair().unwrap();
    c.host_event(0, HostEvent::Connected(a));
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
    let mut c = Console::new(vec![Some("janus.agent".into()), Some("janus.stdio".into())]).unwrap();
    assert_eq!(c.features(), F_MULTIPORT);
    assert_eq!(c.queue_max_sizes().len(), 6);
    let mut cfg = [0u8; 4];
    c.read_config(4, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg), 2);
    c.ack_features(F_MULTIPORT);
    // A peer on port 1 before the driver is up: opened once the port is ready.
    let (a, mut b) = UnixStream::pair().unwrap();
    c.host_event(1, HostEvent::Connected(a));
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
    let (a, _b) = UnixStream::pair().unwrap();
    c.host_event(9, HostEvent::Connected(a));
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
    let mut c = Console::new(vec![None]).unwrap();
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
    let mut c = Console::new(vec![None]).unwrap();
    c.ack_features(0);
    c.host_event(0, HostEvent::Connected(a));
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
    let mut c = Console::new(vec![Some("a".into()), Some("b".into())]).unwrap();
    c.ack_features(0);
    let (_mq, mut q) = queue(&m, &[(0x40000, 8, false)]);
    assert!(!c.process_queue(CTRL_TX, &mut q, &m));
    assert!(!c.process_queue(5, &mut q, &m));
    // Port 0 flows without any PORT_OPEN.
    c.host_event(0, HostEvent::Data(b"hi".to_vec()));
    let (_mq, mut q) = queue(&m, &[(0x60000, 16, true)]);
    assert!(c.process_queue(RX, &mut q, &m));
}

#[test]
fn work_found_while_running_a_queue_wakes_the_event_handler() {
    let m = mem();
    let mut c = Console::new(vec![Some("a".into())]).unwrap();
    let wake = c.wake_fd().unwrap();
    c.ack_features(F_MULTIPORT);
    assert!(wake.read().is_err(), "nothing to do yet");
    // DEVICE_READY asks for DEVICE_ADD on the control receive queue.
    driver_says(&mut c, &m, 0, DEVICE_READY, 1);
    assert_eq!(wake.read().unwrap(), 1);
    assert_eq!(c.take_kicks(), vec![CTRL_RX]);
}
