/* Test guest: drives the first virtio-net device by hand (feature negotiation with MAC, a
 * receive and a transmit queue), sends an ARP request for 10.77.0.1 from 10.77.0.2, and waits
 * (on interrupts) for the reply that the host kernel sends back through the tap. */

#include "guest.h"

#define NBUF 4
#define BUFSZ 1600

static struct vq rxq, txq;
static u8 rxbuf[NBUF][BUFSZ];
static u8 frame[12 + 14 + 28];
static u8 mac[6];

static void post_rx(u64 base, u16 i)
{
	rxq.desc[i] = (struct desc){ (u64)rxbuf[i], BUFSZ, 2, 0 };
	kick(base, 0, &rxq, i);
}

static void putmac(const u8 *m)
{
	for (int i = 0; i < 6; i++) {
		putc("0123456789abcdef"[m[i] >> 4]);
		putc("0123456789abcdef"[m[i] & 15]);
		if (i < 5)
			putc(':');
	}
}

int main(void)
{
	puts("virtio-net test guest\n");
	u64 base = open_device(1, "no network device");
	if (!base) {
		poweroff();
		return 1;
	}
	negotiate(base, 1 << 5);
	for (int i = 0; i < 6; i++)
		mac[i] = *(volatile u8 *)(base + 0x100 + i);
	puts("net: mac ");
	putmac(mac);
	puts("\n");
	setup_queue(base, 0, &rxq);
	setup_queue(base, 1, &txq);
	wr(base + 0x70, 1 | 2 | 8 | 4);
	for (u16 i = 0; i < NBUF; i++)
		post_rx(base, i);

	/* virtio_net_hdr (zeros), Ethernet broadcast, ARP who-has 10.77.0.1 tell 10.77.0.2. */
	u8 *e = frame + 12;
	for (int i = 0; i < 6; i++) {
		e[i] = 0xff;
		e[6 + i] = mac[i];
	}
	e[12] = 0x08;
	e[13] = 0x06;
	u8 *a = e + 14;
	const u8 arp[8] = { 0, 1, 8, 0, 6, 4, 0, 1 };
	memcpy(a, arp, 8);
	memcpy(a + 8, mac, 6);
	const u8 spa[4] = { 10, 77, 0, 2 }, tpa[4] = { 10, 77, 0, 1 };
	memcpy(a + 14, spa, 4);
	memcpy(a + 24, tpa, 4);
	txq.desc[0] = (struct desc){ (u64)frame, sizeof(frame), 0, 0 };
	u32 seen = irq_count;
	kick(base, 1, &txq, 0);

	/* Frames may come before the reply (e.g. IPv6 neighbour discovery): look at each. */
	u16 done = 0;
	int got = 0;
	for (int rounds = 0; rounds < 50 && !got; rounds++) {
		wait_irq(base, seen, "no interrupt");
		seen = irq_count;
		while (done != rxq.used.idx && !got) {
			struct used_elem u = rxq.used.ring[done % 8];
			u8 *f = rxbuf[u.id] + 12;
			if (u.len >= 12 + 42 && f[12] == 0x08 && f[13] == 0x06 && f[14 + 7] == 2 &&
			    f[14 + 14] == 10 && f[14 + 15] == 77 && f[14 + 16] == 0 && f[14 + 17] == 1) {
				puts("net: ARP reply from 10.77.0.1, mac ");
				putmac(f + 14 + 8);
				puts("\n");
				got = 1;
			}
			post_rx(base, (u16)u.id);
			done++;
		}
	}
	if (txq.used.idx != 1)
		fail("transmit not completed", txq.used.idx);
	if (!got)
		fail("no ARP reply", done);
	if (!failed)
		puts("net: frame out through the tap and back\n");
	poweroff();
	return 0;
}
