/* Test guest: drives the first virtio-console device by hand (no features, a receive and a
 * transmit queue), writes a line, and waits (on interrupts) for the host-side peer to echo
 * it back, which may arrive split across receive buffers. */

#include "guest.h"

#define NBUF 4
#define BUFSZ 8

static struct vq rxq, txq;
static u8 rxbuf[NBUF][BUFSZ];
static const char msg[] = "janus-console-ping\n";
static char got[64];

static void post_rx(u64 base, u16 i)
{
	rxq.desc[i] = (struct desc){ (u64)rxbuf[i], BUFSZ, 2, 0 };
	kick(base, 0, &rxq, i);
}

int main(void)
{
	puts("virtio-console test guest\n");
	u64 base = open_device(3, "no console device");
	if (!base) {
		poweroff();
		return 1;
	}
	negotiate(base, 0);
	setup_queue(base, 0, &rxq);
	setup_queue(base, 1, &txq);
	wr(base + 0x70, 1 | 2 | 8 | 4);
	for (u16 i = 0; i < NBUF; i++)
		post_rx(base, i);
	txq.desc[0] = (struct desc){ (u64)msg, sizeof(msg) - 1, 0, 0 };
	u32 seen = irq_count;
	kick(base, 1, &txq, 0);
	u16 done = 0;
	unsigned n = 0;
	for (int rounds = 0; rounds < 200 && n < sizeof(msg) - 1; rounds++) {
		wait_irq(base, seen, "no interrupt");
		seen = irq_count;
		while (done != rxq.used.idx) {
			struct used_elem u = rxq.used.ring[done % 8];
			for (u32 i = 0; i < u.len && n < sizeof(got) - 1; i++)
				got[n++] = (char)rxbuf[u.id][i];
			post_rx(base, (u16)u.id);
			done++;
		}
	}
	got[n] = 0;
	int same = n == sizeof(msg) - 1;
	for (unsigned i = 0; same && i < n; i++)
		same = got[i] == msg[i];
	if (!same)
		fail("echo differs, bytes", n);
	if (txq.used.idx != 1)
		fail("transmit not completed", txq.used.idx);
	if (!failed) {
		puts("console: echoed back in ");
		puthex(done);
		puts(" buffers\n");
	}
	poweroff();
	return 0;
}
