/* Test guest (freestanding C, no SSE/x87, no int3): finds the virtio-fs device (id 26),
 * prints its tag, negotiates VERSION_1, sets up the high-priority queue and one request
 * queue, and speaks FUSE to the vhost-user backend (virtiofsd) over the request queue:
 * INIT, LOOKUP of "hello.txt" in the root, OPEN, READ, RELEASE. Prints the file's contents,
 * resets the device, sets it up again and repeats the LOOKUP, and powers off. Each reply is announced by an interrupt. "FAIL" lines mark what went
 * wrong. The FUSE structs are linux/fuse.h's (protocol 7.36). */

#include "guest.h"

#define FUSE_LOOKUP 1
#define FUSE_OPEN 14
#define FUSE_READ 15
#define FUSE_RELEASE 18
#define FUSE_INIT 26

struct fuse_in_header {
	u32 len;
	u32 opcode;
	u64 unique;
	u64 nodeid;
	u32 uid;
	u32 gid;
	u32 pid;
	u16 total_extlen;
	u16 padding;
};
struct fuse_out_header {
	u32 len;
	int error;
	u64 unique;
};
struct fuse_init_in {
	u32 major;
	u32 minor;
	u32 max_readahead;
	u32 flags;
	u32 flags2;
	u32 unused[11];
};
struct fuse_init_out {
	u32 major;
	u32 minor;
	u32 max_readahead;
	u32 flags;
	u16 max_background;
	u16 congestion_threshold;
	u32 max_write;
	u32 time_gran;
	u16 max_pages;
	u16 map_alignment;
	u32 flags2;
	u32 unused[7];
};
struct fuse_attr {
	u64 ino, size, blocks, atime, mtime, ctime;
	u32 atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};
struct fuse_entry_out {
	u64 nodeid;
	u64 generation;
	u64 entry_valid;
	u64 attr_valid;
	u32 entry_valid_nsec;
	u32 attr_valid_nsec;
	struct fuse_attr attr;
};
struct fuse_open_in {
	u32 flags;
	u32 open_flags;
};
struct fuse_open_out {
	u64 fh;
	u32 open_flags;
	u32 padding;
};
struct fuse_read_in {
	u64 fh;
	u64 offset;
	u32 size;
	u32 read_flags;
	u64 lock_owner;
	u32 flags;
	u32 padding;
};
struct fuse_release_in {
	u64 fh;
	u32 flags;
	u32 release_flags;
	u64 lock_owner;
};

_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct fuse_out_header) == 16, "fuse_out_header");
_Static_assert(sizeof(struct fuse_init_in) == 64, "fuse_init_in");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct fuse_attr) == 88, "fuse_attr");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct fuse_open_in) == 8, "fuse_open_in");
_Static_assert(sizeof(struct fuse_open_out) == 16, "fuse_open_out");
_Static_assert(sizeof(struct fuse_read_in) == 40, "fuse_read_in");
_Static_assert(sizeof(struct fuse_release_in) == 24, "fuse_release_in");

static struct vq hiprio, rq;
/* The request (device-readable) and the reply (device-writable), each one descriptor. */
static struct {
	struct fuse_in_header h;
	u8 arg[128];
} in;
static struct {
	struct fuse_out_header h;
	u8 arg[512];
} out;
static u64 unique;

/* Sends `opcode` on `nodeid` with `len` argument bytes already in `in.arg`; waits for the
 * reply. Returns the reply's argument length, or -1 (FUSE error or transport failure). */
static int fuse(u64 base, u32 opcode, u64 nodeid, u32 len, const char *what)
{
	in.h = (struct fuse_in_header){ 0 };
	in.h.len = (u32)sizeof(in.h) + len;
	in.h.opcode = opcode;
	in.h.unique = ++unique;
	in.h.nodeid = nodeid;
	memset(&out, 0xa5, sizeof(out));
	rq.desc[0] = (struct desc){ (u64)&in, in.h.len, 1, 1 };
	rq.desc[1] = (struct desc){ (u64)&out, sizeof(out), 2, 0 };
	u32 seen = irq_count;
	u16 before = rq.used.idx;
	kick(base, 1, &rq, 0);
	/* Sleep until the reply is in the used ring and an interrupt came after the kick
	 * (interrupts are only taken here, so one raised for this request is counted here or
	 * in a later wait, never before `seen`). An interrupt may come without a reply:
	 * libvhost-user signals the call eventfd once when it gets it (SET_VRING_CALL). */
	for (int n = 0; (*(volatile u16 *)&rq.used.idx == before || irq_count == seen) && n < 1000;
	     n++)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	if (irq_count == seen)
		fail("no interrupt for", opcode);
	wr(base + 0x64, rd(base + 0x60));
	if (rq.used.idx != (u16)(before + 1)) {
		fail("used idx", rq.used.idx);
		return -1;
	}
	u32 used = rq.used.ring[before % 8].len;
	if (out.h.unique != unique || out.h.len != used || used < sizeof(out.h)) {
		fail(what, out.h.len);
		return -1;
	}
	if (out.h.error) {
		fail(what, (u64)(long)out.h.error);
		return -1;
	}
	return (int)(used - sizeof(out.h));
}

int main(void)
{
	puts("virtio-fs test guest\n");
	u64 fs = open_device(26, "no virtio-fs device");
	if (!fs) {
		poweroff();
		return 1;
	}
	negotiate(fs, 0);
	char tag[37];
	for (int i = 0; i < 36; i++)
		tag[i] = (char)*(volatile u8 *)(fs + 0x100 + (u64)i);
	tag[36] = 0;
	puts("fs: tag ");
	puts(tag);
	puts(", request queues ");
	puthex(rd(fs + 0x100 + 36));
	puts("\n");
	setup_queue(fs, 0, &hiprio);
	setup_queue(fs, 1, &rq);
	wr(fs + 0x70, 1 | 2 | 8 | 4);
	if (rd(fs + 0x70) & 0x40)
		fail("device needs reset after DRIVER_OK", rd(fs + 0x70));

	struct fuse_init_in *init = (struct fuse_init_in *)in.arg;
	*init = (struct fuse_init_in){ .major = 7, .minor = 36, .max_readahead = 0x20000 };
	if (fuse(fs, FUSE_INIT, 0, sizeof(*init), "FUSE_INIT") < (int)sizeof(u32) * 2)
		goto done;
	struct fuse_init_out *io = (struct fuse_init_out *)out.arg;
	puts("fs: FUSE_INIT answered, protocol ");
	puthex(io->major);
	puts(".");
	puthex(io->minor);
	puts("\n");

	memcpy(in.arg, "hello.txt", 10);
	if (fuse(fs, FUSE_LOOKUP, 1, 10, "FUSE_LOOKUP") < (int)sizeof(struct fuse_entry_out))
		goto done;
	struct fuse_entry_out *e = (struct fuse_entry_out *)out.arg;
	u64 node = e->nodeid, size = e->attr.size;
	puts("fs: hello.txt size ");
	puthex(size);
	puts("\n");

	*(struct fuse_open_in *)in.arg = (struct fuse_open_in){ 0 }; /* O_RDONLY */
	if (fuse(fs, FUSE_OPEN, node, sizeof(struct fuse_open_in), "FUSE_OPEN") <
	    (int)sizeof(struct fuse_open_out))
		goto done;
	u64 fh = ((struct fuse_open_out *)out.arg)->fh;

	*(struct fuse_read_in *)in.arg = (struct fuse_read_in){ .fh = fh, .size = 256 };
	int n = fuse(fs, FUSE_READ, node, sizeof(struct fuse_read_in), "FUSE_READ");
	if (n < 0)
		goto done;
	if ((u64)n != size)
		fail("read length", (u64)n);
	puts("fs: read: ");
	for (int i = 0; i < n; i++)
		putc((char)out.arg[i]);
	puts("\n");

	*(struct fuse_release_in *)in.arg = (struct fuse_release_in){ .fh = fh };
	fuse(fs, FUSE_RELEASE, node, sizeof(struct fuse_release_in), "FUSE_RELEASE");

	/* A reset takes the rings back from the backend; set up again (fresh rings, as after a
	 * guest reboot), the device works as before. */
	wr(fs + 0x70, 0);
	if (rd(fs + 0x70) != 0)
		fail("reset", rd(fs + 0x70));
	negotiate(fs, 0);
	memset(&hiprio, 0, sizeof(hiprio));
	memset(&rq, 0, sizeof(rq));
	setup_queue(fs, 0, &hiprio);
	setup_queue(fs, 1, &rq);
	wr(fs + 0x70, 1 | 2 | 8 | 4);
	memcpy(in.arg, "hello.txt", 10);
	if (fuse(fs, FUSE_LOOKUP, 1, 10, "FUSE_LOOKUP after reset") >= 0 &&
	    ((struct fuse_entry_out *)out.arg)->attr.size == size)
		puts("fs: lookup after reset\n");
done:
	puts("fs: interrupts ");
	puthex(irq_count);
	puts("\n");
	if (!failed)
		puts("fs: round trip done\n");
	poweroff();
	return 0;
}
