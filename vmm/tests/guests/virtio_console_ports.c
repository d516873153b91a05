/* Test guest: drives a multiport virtio-console by hand the way Linux's virtio_console does:
 * negotiates MULTIPORT, reads max_nr_ports, says DEVICE_READY on the control queue, answers
 * each DEVICE_ADD with PORT_READY, collects the port names, waits until the host side of
 * port 1 is connected (PORT_OPEN from the device), opens the port, writes a line on it and
 * waits (on interrupts) for the host peer's echo, then for BULK bytes of a pattern the peer
 * sends after it (more than the VMM buffers: the VMM must hold the peer back, not drop), and
 * finally sends TXBULK bytes to a peer that reads slowly (the VMM must hold the guest back). */

#include "guest.h"

#define NBUF 4
#define CBUF 64
#define BUFSZ 8

enum { DEVICE_READY = 0, DEVICE_ADD = 1, PORT_READY = 3, PORT_OPEN = 6, PORT_NAME = 7 };
struct ctrl { u32 id; u16 event; u16 value; };

static struct vq rx0, tx0, crx, ctx, rx1, tx1;
static u8 cbuf[NBUF][CBUF];
static u8 rxbuf[NBUF][BUFSZ];
#define BULK (1536 * 1024)
#define BIG 4096
#define TXBULK (1024 * 1024)
static u8 bigbuf[NBUF][BIG];
static struct ctrl out;
static const char msg[] = "janus-port-ping\n";
static char got[64];
static char names[2][CBUF];
static int added, host_open1;

static u16 used_idx(struct vq *q) { return *(volatile u16 *)&q->used.idx; }

/* Sends a control message and waits for the device to take it, as Linux does (it spins). */
static void send_ctrl(u64 base, u32 id, u16 event, u16 value)
{
	static u16 head;
	out = (struct ctrl){ id, event, value };
	ctx.desc[head % 8] = (struct desc){ (u64)&out, sizeof(out), 0, 0 };
	u16 before = used_idx(&ctx);
	kick(base, 3, &ctx, head % 8);
	head++;
	for (long n = 0; used_idx(&ctx) == before && n < 100000000; n++)
		__asm__ volatile("pause");
	if (used_idx(&ctx) == before)
		fail("control message not taken", event);
}

static void post(u64 base, u32 index, struct vq *q, u16 i, u8 *buf, u32 len)
{
	q->desc[i] = (struct desc){ (u64)buf, len, 2, 0 };
	kick(base, index, q, i);
}

static u16 cdone;
/* Handles the control messages the device returned so far. */
static void control(u64 base)
{
	while (cdone != used_idx(&crx)) {
		struct used_elem u = crx.used.ring[cdone % 8];
		struct ctrl *c = (struct ctrl *)cbuf[u.id];
		if (u.len < sizeof(*c)) {
			fail("short control message", u.len);
		} else if (c->event == DEVICE_ADD) {
			added++;
			send_ctrl(base, c->id, PORT_READY, 1);
		} else if (c->event == PORT_NAME && c->id < 2) {
			u32 n = u.len - sizeof(*c);
			memcpy(names[c->id], cbuf[u.id] + sizeof(*c), n < CBUF - 1 ? n : CBUF - 1);
			puts("port ");
			putc((char)('0' + c->id));
			puts(" name ");
			puts(names[c->id]);
			puts("\n");
		} else if (c->event == PORT_OPEN && c->id == 1) {
			host_open1 = c->value;
		}
		post(base, 2, &crx, (u16)u.id, cbuf[u.id], CBUF);
		cdone++;
	}
}

int main(void)
{
	puts("virtio-console ports test guest\n");
	u64 base = open_device(3, "no console device");
	if (!base) {
		poweroff();
		return 1;
	}
	wr(base + 0x14, 0);
	if (!(rd(base + 0x10) & 2))
		fail("no MULTIPORT offered", rd(base + 0x10));
	negotiate(base, 2);
	u32 max_ports = rd(base + 0x104);
	puts("max_nr_ports ");
	puthex(max_ports);
	puts("\n");
	setup_queue(base, 0, &rx0);
	setup_queue(base, 1, &tx0);
	setup_queue(base, 2, &crx);
	setup_queue(base, 3, &ctx);
	setup_queue(base, 4, &rx1);
	setup_queue(base, 5, &tx1);
	wr(base + 0x70, 1 | 2 | 8 | 4);
	for (u16 i = 0; i < NBUF; i++)
		post(base, 2, &crx, i, cbuf[i], CBUF);
	send_ctrl(base, 0xffffffff, DEVICE_READY, 1);
	/* DEVICE_ADD x2, names, and the host peer of port 1. */
	u32 seen = 0;
	for (int rounds = 0; rounds < 400 && !(added == 2 && names[0][0] && names[1][0] && host_open1); rounds++) {
		control(base);
		if (added == 2 && names[0][0] && names[1][0] && host_open1)
			break;
		wait_irq(base, seen, "no control interrupt");
		seen = irq_count;
	}
	control(base);
	if (added != 2)
		fail("ports added", added);
	if (!host_open1)
		fail("host side of port 1 never opened", 0);
	/* Descriptors 0-3: small buffers (lines split across them), 4-7: big ones. */
	for (u16 i = 0; i < NBUF; i++)
		post(base, 4, &rx1, i, rxbuf[i], BUFSZ);
	for (u16 i = 0; i < NBUF; i++)
		post(base, 4, &rx1, NBUF + i, bigbuf[i], BIG);
	send_ctrl(base, 1, PORT_OPEN, 1);
	tx1.desc[0] = (struct desc){ (u64)msg, sizeof(msg) - 1, 0, 0 };
	seen = irq_count;
	kick(base, 5, &tx1, 0);
	u16 done = 0;
	unsigned n = 0;
	u32 bulk = 0;
	const unsigned line = sizeof(msg) - 1;
	for (long rounds = 0; rounds < 200000 && bulk < BULK && !failed; rounds++) {
		if (done == used_idx(&rx1)) {
			wait_irq(base, seen, "no receive interrupt");
			seen = irq_count;
		}
		control(base);
		while (done != used_idx(&rx1)) {
			struct used_elem u = rx1.used.ring[done % 8];
			u8 *b = u.id < NBUF ? rxbuf[u.id] : bigbuf[u.id - NBUF];
			u32 i = 0;
			for (; i < u.len && n < line; i++)
				got[n++] = (char)b[i];
			/* Bulk: this machine's KVM runs guest code slowly, so check each buffer's
			 * first and last byte (a dropped chunk shifts the pattern) and count. */
			if (i < u.len) {
				u32 len = u.len - i;
				if ((b[i] != (u8)((bulk * 7 + 3) % 251) ||
				     b[u.len - 1] != (u8)(((bulk + len - 1) * 7 + 3) % 251)) && !failed)
					fail("bulk bytes differ at", bulk);
				bulk += len;
			}
			if (u.id < NBUF)
				post(base, 4, &rx1, (u16)u.id, rxbuf[u.id], BUFSZ);
			else
				post(base, 4, &rx1, (u16)u.id, bigbuf[u.id - NBUF], BIG);
			done++;
		}
	}
	/* Out: at most 4 buffers in flight on port 1's transmit queue (descriptors 1-4). */
	u16 sent = 1;
	u32 out = 0;
	for (long rounds = 0; rounds < 200000 && !failed; rounds++) {
		while ((u16)(sent - used_idx(&tx1)) < 4 && out < TXBULK) {
			u16 d = (u16)(1 + sent % 4);
			tx1.desc[d] = (struct desc){ (u64)bigbuf[0], BIG, 0, 0 };
			kick(base, 5, &tx1, d);
			sent++;
			out += BIG;
		}
		if (out >= TXBULK && used_idx(&tx1) == sent)
			break;
		wait_irq(base, seen, "no transmit interrupt");
		seen = irq_count;
	}
	if (used_idx(&tx1) != sent)
		fail("transmit buffers not returned", used_idx(&tx1));
	got[n] = 0;
	int same = n == line;
	for (unsigned i = 0; same && i < n; i++)
		same = got[i] == msg[i];
	if (!same)
		fail("echo differs, bytes", n);
	if (used_idx(&rx0) != 0)
		fail("data on port 0", used_idx(&rx0));
	if (!failed) {
		puts("port ");
		puts(names[1]);
		puts(": echoed back, then bulk ");
		puthex(bulk);
		puts(" in ");
		puthex(done);
		puts(" buffers; sent ");
		puthex(out);
		puts("\n");
	}
	poweroff();
	return 0;
}
