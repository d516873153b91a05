/*
 * testinit: a tiny PID 1 for smoke-testing the Janus guest (kernel + modules + initramfs)
 * before the real vm-agent exists. Built by hack/build-guest.sh with `gcc -static -O2`.
 *
 * It mounts proc, sys and devtmpfs, loads every module named in
 * /lib/modules/<release>/modules.order with finit_module(2) (in file order: the build script
 * writes dependencies first), prints
 *     JANUS-TESTINIT: kernel=<release> modules=<loaded>/<listed>
 * then the virtio devices (/sys/bus/virtio/devices: virtio device id, driver) and the
 * virtio-serial ports (/sys/class/virtio-ports/<port>/name, /dev/<port>), writes a hello line
 * to the port named janus.agent when a host side is connected, and powers the VM off. Everything goes to /dev/console.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define AGENT_PORT_NAME "janus.agent"

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void out(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 1)
		n = sizeof(buf) - 1;
	(void)!write(1, buf, n);
}

/* Read a small sysfs/proc file into buf, trailing newline stripped. Returns 0 on success. */
static int read_small(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = 0;
	return 0;
}

static void do_mount(const char *src, const char *dst, const char *type, unsigned long flags)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, flags, NULL) < 0 && errno != EBUSY)
		out("testinit: mount %s on %s: %s\n", type, dst, strerror(errno));
}

static void ensure_console(void)
{
	/* The kernel opens /dev/console (from the cpio) as fds 0-2; fall back to devtmpfs. */
	if (fcntl(1, F_GETFD) >= 0)
		return;
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return;
	dup2(fd, 0);
	dup2(fd, 1);
	dup2(fd, 2);
	if (fd > 2)
		close(fd);
}

static int load_modules(const char *release, int *listed)
{
	char dir[256], path[1024], line[512];
	snprintf(dir, sizeof(dir), "/lib/modules/%s", release);
	snprintf(path, sizeof(path), "%s/modules.order", dir);
	FILE *f = fopen(path, "re");
	*listed = 0;
	if (!f) {
		out("testinit: %s: %s\n", path, strerror(errno));
		return 0;
	}
	int loaded = 0;
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\r\n")] = 0;
		if (!line[0] || line[0] == '#')
			continue;
		(*listed)++;
		snprintf(path, sizeof(path), "%s/%s", dir, line);
		double t0 = now_ms();
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			out("testinit: module %s: open: %s\n", line, strerror(errno));
			continue;
		}
		long r = syscall(SYS_finit_module, fd, "", 0);
		int err = errno;
		close(fd);
		double dt = now_ms() - t0;
		if (r == 0) {
			loaded++;
			out("testinit: module %s: loaded (%.1f ms)\n", line, dt);
		} else if (err == EEXIST) {
			loaded++;
			out("testinit: module %s: already loaded\n", line);
		} else {
			out("testinit: module %s: FAILED: %s\n", line, strerror(err));
		}
	}
	fclose(f);
	return loaded;
}

static const char *virtio_id_name(unsigned id)
{
	switch (id) {
	case 1: return "net";
	case 2: return "block";
	case 3: return "console";
	case 4: return "rng";
	case 5: return "balloon";
	case 9: return "9p";
	case 19: return "vsock";
	case 26: return "fs";
	default: return "?";
	}
}

static int has_console_device;

static void list_virtio_devices(void)
{
	DIR *d = opendir("/sys/bus/virtio/devices");
	if (!d) {
		out("JANUS-TESTINIT: no /sys/bus/virtio/devices (%s)\n", strerror(errno));
		return;
	}
	struct dirent *e;
	int n = 0;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char p[512], dev[32] = "", vendor[32] = "", drv[512] = "-", link[512];
		snprintf(p, sizeof(p), "/sys/bus/virtio/devices/%s/device", e->d_name);
		read_small(p, dev, sizeof(dev));
		snprintf(p, sizeof(p), "/sys/bus/virtio/devices/%s/vendor", e->d_name);
		read_small(p, vendor, sizeof(vendor));
		snprintf(p, sizeof(p), "/sys/bus/virtio/devices/%s/driver", e->d_name);
		ssize_t l = readlink(p, link, sizeof(link) - 1);
		if (l > 0) {
			link[l] = 0;
			char *b = strrchr(link, '/');
			snprintf(drv, sizeof(drv), "%s", b ? b + 1 : link);
		}
		/* Which transport: the parent device (virtio-mmio platform device or PCI). */
		snprintf(p, sizeof(p), "/sys/bus/virtio/devices/%s", e->d_name);
		l = readlink(p, link, sizeof(link) - 1);
		if (l > 0)
			link[l] = 0;
		else
			link[0] = 0;
		unsigned id = (unsigned)strtoul(dev, NULL, 0);
		if (id == 3)
			has_console_device = 1;
		out("JANUS-TESTINIT: virtio %s device=%s (%s) vendor=%s driver=%s path=%s\n", e->d_name,
		    dev, virtio_id_name(id), vendor, drv, link);
		n++;
	}
	closedir(d);
	out("JANUS-TESTINIT: virtio devices=%d console_device=%s\n", n,
	    has_console_device ? "yes" : "no");
}

/* Wait (the port name arrives asynchronously over the control queue) for the virtio-serial
 * port named AGENT_PORT_NAME; print all ports; return its /dev path in devpath. */
static int find_agent_port(char *devpath, size_t len, int timeout_ms)
{
	double deadline = now_ms() + timeout_ms;
	int found = 0;
	for (;;) {
		DIR *d = opendir("/sys/class/virtio-ports");
		if (d) {
			struct dirent *e;
			while ((e = readdir(d))) {
				if (e->d_name[0] == '.')
					continue;
				char p[512], name[128] = "";
				snprintf(p, sizeof(p), "/sys/class/virtio-ports/%s/name", e->d_name);
				if (read_small(p, name, sizeof(name)) == 0 && !strcmp(name, AGENT_PORT_NAME)) {
					snprintf(devpath, len, "/dev/%s", e->d_name);
					found = 1;
				}
			}
			closedir(d);
		}
		if (found || now_ms() > deadline)
			break;
		usleep(10000);
	}
	/* Print what is there, found or not. */
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d) {
		out("JANUS-TESTINIT: no /sys/class/virtio-ports (%s)\n", strerror(errno));
		return found;
	}
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char p[512], name[128] = "", devnode[300];
		struct stat st;
		snprintf(p, sizeof(p), "/sys/class/virtio-ports/%s/name", e->d_name);
		read_small(p, name, sizeof(name));
		snprintf(devnode, sizeof(devnode), "/dev/%s", e->d_name);
		int have = stat(devnode, &st) == 0 && S_ISCHR(st.st_mode);
		out("JANUS-TESTINIT: port %s name=%s dev=%s%s\n", e->d_name, name[0] ? name : "(none)",
		    devnode, have ? "" : " (missing)");
	}
	closedir(d);
	return found;
}

/* Write a line to the agent port. virtio_console reports POLLHUP while no host side is
 * connected to the chardev (writes would block then): check first, then write without
 * blocking, giving a just-connected host a moment. */
static void hello_agent_port(const char *devpath)
{
	int fd = open(devpath, O_RDWR | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		out("JANUS-TESTINIT: open %s: %s\n", devpath, strerror(errno));
		return;
	}
	struct pollfd pfd = { .fd = fd, .events = POLLOUT };
	int pr = poll(&pfd, 1, 0);
	if (pr > 0 && (pfd.revents & POLLHUP)) {
		out("JANUS-TESTINIT: %s: host side not connected (POLLHUP), not writing\n", devpath);
		close(fd);
		return;
	}
	const char msg[] = "hello from janus testinit\n";
	double deadline = now_ms() + 1000;
	ssize_t n;
	while ((n = write(fd, msg, sizeof(msg) - 1)) < 0 && errno == EAGAIN && now_ms() < deadline)
		usleep(10000);
	if (n < 0)
		out("JANUS-TESTINIT: write %s: %s\n", devpath, strerror(errno));
	else
		out("JANUS-TESTINIT: wrote %zd bytes to %s\n", n, devpath);
	close(fd);
}

int main(void)
{
	double t0 = now_ms();
	ensure_console();
	do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC);
	do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC);
	do_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID);
	ensure_console();

	struct utsname u;
	uname(&u);
	char uptime[64] = "?";
	read_small("/proc/uptime", uptime, sizeof(uptime));
	out("testinit: started, uptime %s\n", uptime);

	int listed = 0;
	int loaded = load_modules(u.release, &listed);
	read_small("/proc/uptime", uptime, sizeof(uptime));
	out("JANUS-TESTINIT: kernel=%s modules=%d/%d\n", u.release, loaded, listed);
	out("testinit: modules took %.1f ms, uptime %s\n", now_ms() - t0, uptime);

	char cs[64] = "?";
	read_small("/sys/devices/system/clocksource/clocksource0/current_clocksource", cs, sizeof(cs));
	out("JANUS-TESTINIT: clocksource=%s\n", cs);
	list_virtio_devices();
	char port[300] = "";
	double tw = now_ms();
	if (find_agent_port(port, sizeof(port), 2000)) {
		out("JANUS-TESTINIT: agent port %s found at %s (waited %.0f ms)\n", AGENT_PORT_NAME,
		    port, now_ms() - tw);
		hello_agent_port(port);
	} else {
		out("JANUS-TESTINIT: agent port %s NOT found\n", AGENT_PORT_NAME);
	}
	read_small("/proc/uptime", uptime, sizeof(uptime));
	out("JANUS-TESTINIT: done, uptime %s, powering off\n", uptime);
	sync();
	reboot(RB_POWER_OFF);
	/* Not reached unless power-off failed: with panic=-1 and -no-reboot, exiting PID 1
	 * panics, the kernel reboots at once and QEMU exits. */
	out("testinit: reboot(RB_POWER_OFF): %s\n", strerror(errno));
	return 1;
}
