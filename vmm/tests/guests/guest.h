/* Shared by the C test guests: entry, COM1 output, port/MMIO access, an interrupt handler
 * that counts, and the interrupt plumbing (IDT, legacy PICs off, local APIC on, I/O APIC
 * routes). Freestanding: no SSE/x87, no int3. Each guest includes it once. */

#define MMIO_BASE 0xd0000000UL
#define SLOT 0x1000UL
#define FIRST_IRQ 5
#define VECTOR 0x30

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


struct idt_entry { u16 off0; u16 sel; u8 ist; u8 type; u16 off1; u32 off2; u32 zero; };
static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct __attribute__((packed)) { u16 limit; u64 base; } idtr;

static void setup_idt(void)
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
}

/* I/O APIC: the device's pin -> VECTOR, fixed, edge, active high, to APIC 0. */
static void route_irq(u32 gsi)
{
	wr(0xfec00000, 0x10 + 2 * gsi + 1);
	wr(0xfec00010, 0);
	wr(0xfec00000, 0x10 + 2 * gsi);
	wr(0xfec00010, VECTOR);
}

/* Finds the first virtio-mmio device with `id` (printing every device seen); its slot or -1. */
static int find_device(u32 id)
{
	int found = -1;
	for (u32 i = 0; i < 8; i++) {
		u64 base = MMIO_BASE + i * SLOT;
		if (rd(base) != 0x74726976)
			break;
		u32 version = rd(base + 4), dev = rd(base + 8);
		puts("slot ");
		putc((char)('0' + i));
		puts(": magic ok, version ");
		putc((char)('0' + version));
		puts(", device id ");
		puthex(dev);
		puts("\n");
		if (version != 2)
			fail("version", version);
		if (dev == id && found < 0)
			found = (int)i;
	}
	return found;
}

/* The first device with `id`, its interrupt routed: its MMIO base, or 0 after a FAIL line
 * naming `what` (the caller powers off). */
static u64 open_device(u32 id, const char *what)
{
	int slot = find_device(id);
	if (slot < 0) {
		fail(what, id);
		return 0;
	}
	setup_idt();
	route_irq(FIRST_IRQ + (u32)slot);
	return MMIO_BASE + (u64)slot * SLOT;
}

/* Feature negotiation: VERSION_1 plus `low` (bits 0-31); an unoffered bit must be refused. */
static void negotiate(u64 base, u32 low)
{
	wr(base + 0x70, 0);
	wr(base + 0x70, 1 | 2);
	wr(base + 0x14, 1);
	u32 hi = rd(base + 0x10);
	if (!(hi & 1))
		fail("no VIRTIO_F_VERSION_1", hi);
	wr(base + 0x24, 1);
	wr(base + 0x20, 1 | 2);
	wr(base + 0x70, 1 | 2 | 8);
	if (rd(base + 0x70) & 8)
		fail("FEATURES_OK with unknown features", rd(base + 0x70));
	wr(base + 0x24, 1);
	wr(base + 0x20, 1);
	wr(base + 0x24, 0);
	wr(base + 0x20, low);
	wr(base + 0x70, 1 | 2 | 8);
	if (!(rd(base + 0x70) & 8))
		fail("FEATURES_OK refused", rd(base + 0x70));
}

/* Split queue of 8 entries. */
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[8]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[8]; u16 avail_event; };
struct vq {
	struct desc desc[8] __attribute__((aligned(16)));
	struct avail avail __attribute__((aligned(2)));
	struct used used __attribute__((aligned(4)));
};

static void setup_queue(u64 base, u32 index, struct vq *q)
{
	wr(base + 0x30, index);
	if (rd(base + 0x34) < 8)
		fail("queue too small", rd(base + 0x34));
	wr(base + 0x38, 8);
	wr(base + 0x80, (u32)(u64)q->desc);
	wr(base + 0x84, 0);
	wr(base + 0x90, (u32)(u64)&q->avail);
	wr(base + 0x94, 0);
	wr(base + 0xa0, (u32)(u64)&q->used);
	wr(base + 0xa4, 0);
	wr(base + 0x44, 1);
}

/* Makes descriptor `head` available on `q` and notifies queue `index`. */
static void kick(u64 base, u32 index, struct vq *q, u16 head)
{
	q->avail.ring[q->avail.idx % 8] = head;
	__asm__ volatile("mfence" ::: "memory");
	q->avail.idx++;
	__asm__ volatile("mfence" ::: "memory");
	wr(base + 0x50, index);
}

/* Sleeps until the interrupt count moves past `seen` (bounded); acks the device. */
static void wait_irq(u64 base, u32 seen, const char *what)
{
	for (int n = 0; irq_count == seen && n < 1000; n++)
		__asm__ volatile("sti; hlt; cli");
	if (irq_count == seen)
		fail(what, seen);
	u32 isr_bits = rd(base + 0x60);
	wr(base + 0x64, isr_bits);
}


