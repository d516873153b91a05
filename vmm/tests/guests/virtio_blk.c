/* Test guest (freestanding C, no SSE/x87, no int3): finds the virtio-mmio devices janus-vmm
 * describes, checks each one's magic, version and device id, then drives the first block
 * device by hand: feature negotiation, one split queue, a sector written and read back, with
 * the completion signalled by an interrupt (irqfd -> I/O APIC -> local APIC -> IDT), and
 * powers off. Everything it finds goes to COM1; "FAIL" lines mark what went wrong. */

#include "guest.h"

static struct vq q;
static struct { u32 type; u32 reserved; u64 sector; } req;
static u8 data[512], back[512], status;

/* One request (header, optional data, status); waits for its interrupt. */
static int request(u64 base, u32 type, u64 sector, u8 *buf, int write_to_buf)
{
	req.type = type;
	req.sector = sector;
	status = 0xff;
	q.desc[0] = (struct desc){ (u64)&req, sizeof(req), 1, 1 };
	q.desc[1] = (struct desc){ (u64)buf, 512, (u16)(1 | (write_to_buf ? 2 : 0)), 2 };
	q.desc[2] = (struct desc){ (u64)&status, 1, 2, 0 };
	u32 seen = irq_count;
	u16 before = q.used.idx;
	kick(base, 0, &q, 0);
	wait_irq(base, seen, "no interrupt for request type");
	if (q.used.idx != (u16)(before + 1))
		fail("used idx", q.used.idx);
	return status;
}

int main(void)
{
	puts("virtio test guest\n");
	u64 blk = open_device(2, "no block device");
	if (!blk) {
		poweroff();
		return 1;
	}
	negotiate(blk, 0);
	u64 sectors = rd(blk + 0x100) | ((u64)rd(blk + 0x104) << 32);
	puts("blk: capacity ");
	puthex(sectors);
	puts(" sectors\n");
	setup_queue(blk, 0, &q);
	wr(blk + 0x70, 1 | 2 | 8 | 4);
	for (int i = 0; i < 512; i++)
		data[i] = (u8)(i * 7 + 3);
	int s = request(blk, 1, 1, data, 0);
	if (s != 0)
		fail("write status", s);
	s = request(blk, 0, 1, back, 1);
	if (s != 0)
		fail("read status", s);
	for (int i = 0; i < 512; i++)
		if (back[i] != data[i]) {
			fail("data differs at", i);
			break;
		}
	/* Past the end: an error status, not a crash. */
	s = request(blk, 0, sectors, back, 1);
	if (s != 1)
		fail("read past the end status", s);
	puts("blk: interrupts ");
	puthex(irq_count);
	puts("\n");
	if (!failed)
		puts("blk: sector written and read back\n");
	poweroff();
	return 0;
}
