/* Test guest (freestanding C, no SSE/x87, no int3): finds the virtio-mmio devices janus-vmm
 * describes, checks each one's magic, version and device id, then drives the first block
 * device by hand: feature negotiation, one split queue, a sector written and read back, with
 * the completion signalled by an interrupt (irqfd -> I/O APIC -> local APIC -> IDT), and
 * powers off. Everything it finds goes to COM1; "FAIL" lines mark what went wrong. */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

__asm__(".globl _start\n"
	"_start:\n"
	"  mov $0x80000, %rsp\n"
	"  call main\n"
	"1: hlt\n"
	"  jmp 1b\n"
	/* The interrupt handler: note it, EOI the local APIC, return. */
	".globl isr\n"
	"isr:\n"
	"  push %rax\n"
	"  incl irq_count(%rip)\n"
	"  mov $0xfee000b0, %eax\n"
	"  movl $0, (%rax)\n"
	"  pop %rax\n"
	"  iretq\n");

extern void isr(void);
volatile u32 irq_count;

void *memset(void *d, int c, unsigned long n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *a = d;
	const u8 *b = s;
	while (n--)
		*a++ = *b++;
	return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u32 rd(u64 a) { return *(volatile u32 *)a; }
static inline void wr(u64 a, u32 v) { *(volatile u32 *)a = v; }

static void putc(char c)
{
	while (!(inb(0x3fd) & 0x20))
		;
	outb(0x3f8, (u8)c);
}
static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}
static void puthex(u64 v)
{
	puts("0x");
	for (int i = 60; i >= 0; i -= 4)
		putc("0123456789abcdef"[(v >> i) & 0xf]);
}
static int failed;
static void fail(const char *what, u64 v)
{
	puts("FAIL ");
	puts(what);
	puts(" ");
	puthex(v);
	puts("\n");
	failed = 1;
}
static void poweroff(void) { outb(0x600, 0x34); }

#define MMIO_BASE 0xd0000000UL
#define SLOT 0x1000UL
#define FIRST_IRQ 5
#define VECTOR 0x30

/* Split queue of 8 entries, in the guest's own memory. */
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[8]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[8]; u16 avail_event; };

static struct desc descs[8] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(2)));
static struct used used __attribute__((aligned(4)));
static struct { u32 type; u32 reserved; u64 sector; } req;
static u8 data[512], back[512], status;

struct idt_entry { u16 off0; u16 sel; u8 ist; u8 type; u16 off1; u32 off2; u32 zero; };
static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct __attribute__((packed)) { u16 limit; u64 base; } idtr;

static void setup_interrupts(u32 gsi)
{
	u64 h = (u64)isr;
	idt[VECTOR].off0 = (u16)h;
	idt[VECTOR].sel = 8;
	idt[VECTOR].type = 0x8e;
	idt[VECTOR].off1 = (u16)(h >> 16);
	idt[VECTOR].off2 = (u32)(h >> 32);
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (u64)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr));
	/* Legacy PICs masked: only the I/O APIC routes interrupts. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	/* Local APIC on (spurious vector 0xff), accept every priority. */
	wr(0xfee000f0, 0x1ff);
	wr(0xfee00080, 0);
	/* I/O APIC: the device's pin -> VECTOR, fixed, edge, active high, to APIC 0. */
	wr(0xfec00000, 0x10 + 2 * gsi + 1);
	wr(0xfec00010, 0);
	wr(0xfec00000, 0x10 + 2 * gsi);
	wr(0xfec00010, VECTOR);
}

/* One request (header, optional data, status) and wait for its interrupt. */
static int request(u64 base, u32 type, u64 sector, u8 *buf, int write_to_buf)
{
	u16 n = 0;
	req.type = type;
	req.sector = sector;
	status = 0xff;
	descs[0] = (struct desc){ (u64)&req, sizeof(req), 1, 1 };
	if (buf) {
		descs[1] = (struct desc){ (u64)buf, 512, (u16)(1 | (write_to_buf ? 2 : 0)), 2 };
		descs[2] = (struct desc){ (u64)&status, 1, 2, 0 };
	} else {
		descs[0].next = 2;
		descs[2] = (struct desc){ (u64)&status, 1, 2, 0 };
	}
	u32 seen = irq_count;
	u16 before = used.idx;
	avail.ring[avail.idx % 8] = 0;
	__asm__ volatile("mfence" ::: "memory");
	avail.idx++;
	__asm__ volatile("mfence" ::: "memory");
	wr(base + 0x50, 0); /* QueueNotify */
	while (irq_count == seen && n < 1000) {
		__asm__ volatile("sti; hlt; cli");
		n++;
	}
	if (irq_count == seen)
		fail("no interrupt for request type", type);
	u32 isr_bits = rd(base + 0x60);
	wr(base + 0x64, isr_bits); /* InterruptACK */
	if (!(isr_bits & 1))
		fail("interrupt status", isr_bits);
	if (used.idx != (u16)(before + 1))
		fail("used idx", used.idx);
	return status;
}

int main(void)
{
	u64 blk = 0;
	u32 blk_slot = 0;
	puts("virtio test guest\n");
	for (u32 i = 0; i < 8; i++) {
		u64 base = MMIO_BASE + i * SLOT;
		u32 magic = rd(base);
		if (magic != 0x74726976)
			break;
		u32 version = rd(base + 4), id = rd(base + 8);
		puts("slot ");
		putc((char)('0' + i));
		puts(": magic ok, version ");
		putc((char)('0' + version));
		puts(", device id ");
		puthex(id);
		puts("\n");
		if (version != 2)
			fail("version", version);
		if (id == 2 && !blk) {
			blk = base;
			blk_slot = i;
		}
	}
	if (!blk) {
		fail("no block device", 0);
		poweroff();
		return 1;
	}
	setup_interrupts(FIRST_IRQ + blk_slot);
	wr(blk + 0x70, 0);
	wr(blk + 0x70, 1 | 2);
	wr(blk + 0x14, 1);
	u32 hi = rd(blk + 0x10);
	if (!(hi & 1))
		fail("no VIRTIO_F_VERSION_1", hi);
	/* An offer the device did not make must not be accepted. */
	wr(blk + 0x24, 1);
	wr(blk + 0x20, 1 | 2);
	wr(blk + 0x70, 1 | 2 | 8);
	if (rd(blk + 0x70) & 8)
		fail("FEATURES_OK with unknown features", rd(blk + 0x70));
	wr(blk + 0x24, 1);
	wr(blk + 0x20, 1);
	wr(blk + 0x24, 0);
	wr(blk + 0x20, 0);
	wr(blk + 0x70, 1 | 2 | 8);
	if (!(rd(blk + 0x70) & 8))
		fail("FEATURES_OK refused", rd(blk + 0x70));
	u64 sectors = rd(blk + 0x100) | ((u64)rd(blk + 0x104) << 32);
	puts("blk: capacity ");
	puthex(sectors);
	puts(" sectors\n");
	wr(blk + 0x30, 0);
	if (rd(blk + 0x34) < 8)
		fail("queue too small", rd(blk + 0x34));
	wr(blk + 0x38, 8);
	wr(blk + 0x80, (u32)(u64)descs);
	wr(blk + 0x84, 0);
	wr(blk + 0x90, (u32)(u64)&avail);
	wr(blk + 0x94, 0);
	wr(blk + 0xa0, (u32)(u64)&used);
	wr(blk + 0xa4, 0);
	wr(blk + 0x44, 1);
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
