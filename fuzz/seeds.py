#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets added with it (fuzz/corpus/<target>/):
agent_request, shim_options, virtio_console, virtio_net, vhost_user_frontend. Each seed is
a well-formed input the target takes all the way through (a driver's full init and some
traffic, a vhost-user backend's whole conversation, a valid request of each type), for the
fuzzer to start from. Deterministic: running it again rewrites the same files.

    python3 fuzz/seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


# --- protobuf, the few wire types the agent API uses -----------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_bytes(field, b):
    if isinstance(b, str):
        b = b.encode()
    return varint(field << 3 | 2) + varint(len(b)) + b


def pb_uint(field, n):
    return varint(field << 3) + varint(n)


def stdio(stdin=0, stdout=0, stderr=0, terminal=False):
    m = b""
    if stdin:
        m += pb_uint(1, stdin)
    if stdout:
        m += pb_uint(2, stdout)
    if stderr:
        m += pb_uint(3, stderr)
    if terminal:
        m += pb_uint(4, 1)
    return m


def storage(driver, source, mount_point, options=()):
    m = pb_bytes(1, driver) + pb_bytes(2, source) + pb_bytes(3, mount_point)
    for o in options:
        m += pb_bytes(4, o)
    return m


def agent_request():
    t = "agent_request"
    with open(os.path.join(HERE, "corpus", "oci_spec", "default.json")) as f:
        spec = json.load(f)
    spec["process"]["args"] = ["sh", "-c", "echo hi"]
    spec["process"]["terminal"] = False
    spec["root"] = {"path": "/run/janus/c1/rootfs"}
    spec["linux"]["cgroupsPath"] = "/pod/c1"
    spec_json = json.dumps(spec, separators=(",", ":")).encode()
    create = (pb_bytes(1, "c1") + pb_bytes(2, spec_json)
              + pb_bytes(3, storage("virtiofs", "janus", "/run/janus/c1"))
              + pb_bytes(4, stdio(stdin=1, stdout=2, stderr=3)))
    write(t, "create", b"\x00" + create)
    process = json.dumps({"args": ["sh"], "cwd": "/", "terminal": True,
                          "user": {"uid": 0, "gid": 0},
                          "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]},
                         separators=(",", ":")).encode()
    exec_ = (pb_bytes(1, "c1") + pb_bytes(2, "e1") + pb_bytes(3, process)
             + pb_bytes(4, stdio(stdin=4, stdout=5, terminal=True)))
    write(t, "exec", b"\x01" + exec_)
    write(t, "signal", b"\x02" + pb_bytes(1, "c1") + pb_bytes(2, "e1") + pb_uint(3, 15)
          + pb_uint(4, 1))
    resources = json.dumps({"memory": {"limit": 268435456}, "cpu": {"shares": 512, "quota": 50000,
                                                                   "period": 100000},
                            "pids": {"limit": 100}}, separators=(",", ":")).encode()
    write(t, "update", b"\x03" + pb_bytes(1, "c1") + pb_bytes(2, resources))
    sandbox = (pb_bytes(1, "pod") + pb_bytes(2, "pod-host") + pb_bytes(3, "10.96.0.10")
               + pb_bytes(4, storage("tmpfs", "shm", "/run/janus/shm", ["size=65536k"]))
               + pb_bytes(4, storage("bind", "/run/janus/shm", "/dev/shm")))
    write(t, "sandbox", b"\x04" + sandbox)
    iface = (pb_bytes(1, "eth0") + pb_bytes(2, "02:00:00:00:00:01")
             + pb_bytes(3, pb_bytes(1, "10.88.0.5/16"))
             + pb_bytes(3, pb_bytes(1, "fd00:250:7::5/64")) + pb_uint(4, 1500))
    write(t, "interface", b"\x05" + iface)
    routes = (pb_bytes(1, pb_bytes(2, "10.88.0.1") + pb_bytes(3, "eth0"))
              + pb_bytes(1, pb_bytes(1, "::/0") + pb_bytes(2, "fd00:250:7::1")))
    write(t, "routes", b"\x06" + routes)
    write(t, "forward_port", b"\x07" + pb_uint(1, 8080) + pb_bytes(2, stdio(stdin=6, stdout=7)))


def shim_options():
    t = "shim_options"
    o = (pb_bytes(1, "io.containerd.janus.v2") + pb_bytes(2, "/etc/janus/config.toml"))
    write(t, "config_path", b"\x00" + o)
    body = b'[vm]\nhypervisor = "builtin"\n'
    write(t, "config_body", b"\x01" + pb_bytes(3, body) + pb_uint(5, 1))
    write(t, "runc", b"\x02" + pb_bytes(1, "runc"))


# --- virtio-mmio: a driver's register writes, and the rings in the input ---------------------

DATA_AT = 0x4000  # where the input starts in guest memory
RECORDS = 0x400  # the records' room at the input's start
QSIZE = 8
F_WRITE = 2
F_NEXT = 1


class Guest:
    """The input: records first, then rings and buffers at guest address DATA_AT + offset."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.recs = bytearray()
        self.queues = {}

    def rec(self, op, a, b):
        self.recs += struct.pack("<BII", op, a, b)

    def w(self, off, v):
        self.rec(1, off, v)

    def r(self, off):
        self.rec(0, off, 0)

    def put(self, off, data):
        self.buf[off:off + len(data)] = data

    def queue(self, q, off):
        """Queue q's rings at input offset off: descriptors, avail (+0x80), used (+0x100)."""
        self.queues[q] = [off, 0]
        base = DATA_AT + off
        self.w(0x30, q)  # QueueSel
        self.r(0x34)  # QueueNumMax
        self.w(0x38, QSIZE)
        self.w(0x80, base)
        self.w(0x84, 0)
        self.w(0x90, base + 0x80)
        self.w(0x94, 0)
        self.w(0xA0, base + 0x100)
        self.w(0xA4, 0)
        self.w(0x44, 1)  # QueueReady

    def chain(self, q, bufs):
        """Makes a chain of (guest address, length, writable) available on queue q."""
        off, n = self.queues[q]
        head = n
        for i, (addr, length, writable) in enumerate(bufs):
            idx = n + i
            last = i == len(bufs) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.put(off + 16 * idx, struct.pack("<QIHH", addr, length, flags, idx + 1))
        avail_idx = struct.unpack_from("<H", self.buf, off + 0x80 + 2)[0]
        self.put(off + 0x80 + 4 + 2 * (avail_idx % QSIZE), struct.pack("<H", head))
        self.put(off + 0x80 + 2, struct.pack("<H", avail_idx + 1))
        self.queues[q][1] = n + len(bufs)

    def init(self, features):
        self.r(0x000)
        self.r(0x008)
        self.w(0x70, 0)  # reset
        self.w(0x70, 1)
        self.w(0x70, 3)
        self.w(0x14, 0)
        self.r(0x10)
        self.w(0x14, 1)
        self.r(0x10)
        self.w(0x24, 0)
        self.w(0x20, features & 0xFFFFFFFF)
        self.w(0x24, 1)
        self.w(0x20, features >> 32)
        self.w(0x70, 0xB)  # FEATURES_OK
        self.r(0x70)

    def live(self):
        self.w(0x70, 0xF)  # DRIVER_OK

    def notify(self, q):
        self.w(0x50, q)

    def done(self):
        assert len(self.recs) < RECORDS
        self.buf[:len(self.recs)] = self.recs
        self.buf[len(self.recs)] = 0xFF
        return self.buf


VERSION_1 = 1 << 32


def ctrl(id_, event, value):
    return struct.pack("<IHH", id_, event, value)


def virtio_console():
    t = "virtio_console"
    for name, multiport in (("multiport", True), ("port0_only", False)):
        g = Guest(0x1400)
        g.init(VERSION_1 | (2 if multiport else 0))
        queues = range(6) if multiport else range(2)
        for q in queues:
            g.queue(q, RECORDS + 0x180 * q)
        g.live()
        bufs = 0xD00  # input offset of the readable buffers
        if multiport:
            # The driver's control messages: DEVICE_READY, PORT_READY 0 and 1, PORT_OPEN 0, 1.
            for i, m in enumerate([ctrl(0, 0, 1), ctrl(0, 3, 1), ctrl(1, 3, 1),
                                   ctrl(0, 6, 1), ctrl(1, 6, 1)]):
                g.put(bufs + 8 * i, m)
                g.chain(3, [(DATA_AT + bufs + 8 * i, 8, False)])
            # Room for the device's control messages (DEVICE_ADD, PORT_NAME, PORT_OPEN).
            for i in range(QSIZE):
                g.chain(2, [(0x8000 + 0x40 * i, 0x40, True)])
        # Output on port 0 (two descriptors) and port 1; receive buffers on both.
        g.put(bufs + 0x100, b"hello from the guest\n")
        g.chain(1, [(DATA_AT + bufs + 0x100, 6, False), (DATA_AT + bufs + 0x106, 15, False)])
        g.chain(0, [(0x9000, 0x20, True), (0x9020, 0x20, True)])
        if multiport:
            g.chain(5, [(DATA_AT + bufs + 0x100, 21, False)])
            g.chain(4, [(0x9800, 0x80, True)])
        if multiport:
            g.notify(3)  # the control messages
        g.rec(0x81, 0, 0)  # a peer connects to port 0
        g.rec(0x81, 1, 0)  # and to port 1
        g.rec(0x80, 0, 16 | (bufs + 0x100) << 16)  # it sends 16 bytes
        g.rec(0x80, 1, 8 | (bufs + 0x100) << 16)
        g.notify(1)
        g.notify(0)
        if multiport:
            g.notify(5)
            g.notify(4)
        g.rec(0x83, 0, 0)  # the event loop retries output
        g.rec(0x82, 0, 0)  # the peer leaves
        g.r(0x60)
        g.w(0x64, 1)
        g.w(0x70, 0)  # reset
        write(t, name, g.done())


def virtio_net():
    t = "virtio_net"
    g = Guest(0x800)
    g.init(VERSION_1 | (1 << 5))
    g.rec(0, 0x100, 0)  # the MAC, from config space
    g.queue(0, RECORDS)
    g.queue(1, RECORDS + 0x180)
    g.live()
    frame = bytes(12) + bytes.fromhex("ffffffffffff020000000001" "0806") + bytes(46)
    g.put(0x780 - len(frame), frame)
    # Transmit: header and frame in two descriptors; receive: two 1536-byte buffers.
    at = DATA_AT + 0x780 - len(frame)
    g.chain(1, [(at, 12, False), (at + 12, len(frame) - 12, False)])
    g.chain(0, [(0x8000, 1536, True)])
    g.chain(0, [(0x8800, 1536, True)])
    g.notify(1)
    # Two frames from the tap, the second too big for the buffer left.
    g.rec(0x80, 0x780 - len(frame), len(frame))
    g.rec(0x80, 0, 0x7FF)
    g.notify(0)
    g.w(0x70, 0)
    write(t, "tx_rx", g.done())


# --- vhost-user: what virtiofsd answers ------------------------------------------------------

GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
REPLY = 0x1 | 0x4  # version 1, reply


def reply(code, body):
    return struct.pack("<III", code, REPLY, len(body)) + body


def u64(code, v):
    return reply(code, struct.pack("<Q", v))


def vhost_user_frontend():
    t = "vhost_user_frontend"
    proto_features = 1 << 30
    event_idx = 1 << 29
    # Without protocol features: only GET_* are answered.
    s = u64(GET_FEATURES, VERSION_1 | event_idx)
    for i in range(2):
        s += reply(GET_VRING_BASE, struct.pack("<II", i, 0))
    write(t, "plain", s)
    # virtiofsd: protocol features MQ and REPLY_ACK (and CONFIG, not taken); every request
    # acknowledged once REPLY_ACK is on.
    s = u64(GET_FEATURES, VERSION_1 | proto_features | event_idx | 1)
    s += u64(GET_PROTOCOL_FEATURES, 1 | 1 << 3 | 1 << 9)
    s += u64(GET_QUEUE_NUM, 2)
    s += u64(SET_FEATURES, 0) + u64(SET_MEM_TABLE, 0)
    for _ in range(2):
        for code in (SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL,
                     SET_VRING_KICK, SET_VRING_ENABLE):
            s += u64(code, 0)
    for i in range(2):
        s += u64(SET_VRING_ENABLE, 0)
        s += reply(GET_VRING_BASE, struct.pack("<II", i, 0))
    write(t, "virtiofsd", s)
    # A backend with too few queues, and one failing SET_MEM_TABLE.
    s = u64(GET_FEATURES, VERSION_1 | proto_features) + u64(GET_PROTOCOL_FEATURES, 1)
    write(t, "one_queue", s + u64(GET_QUEUE_NUM, 1))
    s = u64(GET_FEATURES, VERSION_1 | proto_features) + u64(GET_PROTOCOL_FEATURES, 1 << 3)
    write(t, "mem_table_nack", s + u64(SET_FEATURES, 0) + u64(SET_MEM_TABLE, 1))


if __name__ == "__main__":
    agent_request()
    shim_options()
    virtio_console()
    virtio_net()
    vhost_user_frontend()
