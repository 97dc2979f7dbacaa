/*
 * fakexen.c - LD_PRELOAD shim that lets Debian's C xenstored (Xen 4.17)
 * run on a machine WITHOUT a Xen hypervisor.
 *
 * It stubs the handful of libxenctrl / libxenevtchn / libxengnttab calls
 * xenstored makes and redirects /proc/xen/xsd_{kva,port} (dom0's ring page
 * and event channel) to a memfd.  xenstored itself is unmodified.
 *
 * Optional "fake guest domain" support (env XSFAKE_DIR=<dir>):
 *   - XS_INTRODUCE <domid> <mfn> <port> maps <dir>/ring-<domid> (4096-byte
 *     file, the xenstore_domain_interface page) instead of a grant page;
 *   - a client "kicks" xenstored by writing its domid as a 4-byte native
 *     uint32 into the FIFO <dir>/evtchn;
 *   - xenstored's notifications to domain <domid> are written (1 byte,
 *     non-blocking) to the FIFO <dir>/notify-<domid> if someone has it open;
 *   - xc_domain_getinfo() reports every domain as alive unless the file
 *     <dir>/dead-<domid> exists; writing the uint32 0xffffffff into
 *     <dir>/evtchn fires VIRQ_DOM_EXC (xenstored then rechecks all domains
 *     and fires @releaseDomain for dead ones).
 *
 * Build: gcc -shared -fPIC -O2 -o fakexen.so fakexen.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static int dummy_xc, dummy_gnt, dummy_evt;
static int evt_fd = -1, evt_wfd = -1;
#define VIRQ_PORT 4095
#define MAX_PORTS 4096
static int port_domid[MAX_PORTS];
static int next_port = 1;

static const char *fakedir(void)
{
	const char *d = getenv("XSFAKE_DIR");
	return (d && *d) ? d : NULL;
}

/* ---- open() interposition for /proc/xen/xsd_kva and /proc/xen/xsd_port */
static int fake_proc_open(const char *path)
{
	if (!strcmp(path, "/proc/xen/xsd_kva")) {
		int fd = memfd_create("xsd_kva", MFD_CLOEXEC);
		if (fd >= 0 && ftruncate(fd, 4096) < 0) {
			close(fd);
			return -1;
		}
		return fd;
	}
	if (!strcmp(path, "/proc/xen/xsd_port")) {
		int fd = memfd_create("xsd_port", MFD_CLOEXEC);
		if (fd >= 0) {
			if (write(fd, "0", 1) != 1) { close(fd); return -1; }
			lseek(fd, 0, SEEK_SET);
		}
		return fd;
	}
	return -2;
}

int open(const char *path, int flags, ...)
{
	static int (*real_open)(const char *, int, ...);
	mode_t mode = 0;
	va_list ap;
	int fd = fake_proc_open(path);

	if (fd != -2)
		return fd;
	if (flags & (O_CREAT | O_TMPFILE)) {
		va_start(ap, flags);
		mode = va_arg(ap, int);
		va_end(ap);
	}
	if (!real_open)
		real_open = dlsym(RTLD_NEXT, "open");
	return real_open(path, flags, mode);
}

/* oxenstored (OCaml Unix.openfile) calls open64 */
int open64(const char *path, int flags, ...)
{
	static int (*real_open64)(const char *, int, ...);
	mode_t mode = 0;
	va_list ap;
	int fd = fake_proc_open(path);

	if (fd != -2)
		return fd;
	if (flags & (O_CREAT | O_TMPFILE)) {
		va_start(ap, flags);
		mode = va_arg(ap, int);
		va_end(ap);
	}
	if (!real_open64)
		real_open64 = dlsym(RTLD_NEXT, "open64");
	return real_open64(path, flags, mode);
}

/* ---- libxenctrl */
void *xc_interface_open(void *logger, void *dombuild_logger, unsigned flags)
{
	return &dummy_xc;
}

int xc_interface_close(void *xch)
{
	return 0;
}

/* Only the first 16 bytes of xc_dominfo_t are touched:
 * domid, ssidref, {dying,crashed,shutdown,...} bitfield, shutdown_reason. */
int xc_domain_getinfo(void *xch, uint32_t first_domid, unsigned int max_doms,
		      void *info)
{
	uint32_t *w = info;
	char p[4096];
	const char *d = fakedir();

	if (d) {
		snprintf(p, sizeof(p), "%s/dead-%u", d, first_domid);
		if (access(p, F_OK) == 0)
			return 0;	/* domain does not exist */
	}
	w[0] = first_domid;
	w[1] = 0;
	w[2] = 0;		/* not dying / crashed / shutdown */
	w[3] = 0;
	return 1;
}

/* oxenstored: xc_domaininfo_t (struct xen_domctl_getdomaininfo) starts with
 * u16 domain, u16 pad, u32 flags (XEN_DOMINF_dying/shutdown/...). */
int xc_domain_getinfolist(void *xch, uint32_t first_domain,
			  unsigned int max_domains, void *info)
{
	uint16_t *h = info;
	uint32_t *f = (uint32_t *)((char *)info + 4);
	char p[4096];
	const char *d = fakedir();

	if (d) {
		snprintf(p, sizeof(p), "%s/dead-%u", d, first_domain);
		if (access(p, F_OK) == 0)
			return 0;
	}
	h[0] = first_domain;
	h[1] = 0;
	*f = 0;
	return 1;
}

/* ---- libxengnttab */
void *xengnttab_open(void *logger, unsigned open_flags)
{
	return &dummy_gnt;
}

int xengnttab_close(void *xgt)
{
	return 0;
}

int xengnttab_set_max_grants(void *xgt, uint32_t nr_grants)
{
	return 0;
}

void *xengnttab_map_grant_ref(void *xgt, uint32_t domid, uint32_t ref, int prot)
{
	const char *d = fakedir();
	void *addr;

	if (d) {
		char p[4096];
		struct stat st;
		int fd;

		snprintf(p, sizeof(p), "%s/ring-%u", d, domid);
		fd = openat(AT_FDCWD, p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
		if (fd < 0)
			return NULL;
		if (fstat(fd, &st) == 0 && st.st_size < 4096 &&
		    ftruncate(fd, 4096) < 0) {
			close(fd);
			return NULL;
		}
		addr = mmap(NULL, 4096, prot, MAP_SHARED, fd, 0);
		close(fd);
	} else {
		addr = mmap(NULL, 4096, prot, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	}
	return addr == MAP_FAILED ? NULL : addr;
}

/* oxenstored maps guest rings with xc_map_foreign_range() instead of gnttab */
void *xc_map_foreign_range(void *xch, uint32_t dom, int size, int prot,
			   unsigned long mfn)
{
	return xengnttab_map_grant_ref(NULL, dom, 0, prot);
}

int xengnttab_unmap(void *xgt, void *start_address, uint32_t count)
{
	return munmap(start_address, 4096 * count);
}

/* ---- libxenevtchn */
static void *evt_open(void)
{
	const char *d = fakedir();

	if (evt_fd >= 0)
		return &dummy_evt;
	if (d) {
		char p[4096];

		snprintf(p, sizeof(p), "%s/evtchn", d);
		unlink(p);
		if (mkfifo(p, 0600) < 0)
			return NULL;
		/* O_RDWR: never sees EOF/POLLHUP when writers come and go */
		evt_fd = openat(AT_FDCWD, p, O_RDWR | O_NONBLOCK | O_CLOEXEC);
	} else {
		int pfd[2];

		if (pipe2(pfd, O_NONBLOCK | O_CLOEXEC) < 0)
			return NULL;
		evt_fd = pfd[0];
		evt_wfd = pfd[1];
	}
	return evt_fd < 0 ? NULL : &dummy_evt;
}

void *xenevtchn_open(void *logger, unsigned open_flags)
{
	return evt_open();
}

void *xenevtchn_fdopen(void *logger, int fd, unsigned open_flags)
{
	return evt_open();
}

int xenevtchn_close(void *xce)
{
	return 0;
}

int xenevtchn_fd(void *xce)
{
	return evt_fd;
}

int xenevtchn_bind_virq(void *xce, unsigned int virq)
{
	return VIRQ_PORT;
}

int xenevtchn_bind_interdomain(void *xce, uint32_t domid, uint32_t remote_port)
{
	int p = next_port++;

	if (p >= VIRQ_PORT) {
		errno = ENOSPC;
		return -1;
	}
	port_domid[p] = domid;
	return p;
}

int xenevtchn_unbind(void *xce, uint32_t port)
{
	return 0;
}

int xenevtchn_notify(void *xce, uint32_t port)
{
	const char *d = fakedir();
	char p[4096];
	int fd;

	if (!d || port == 0 || port >= VIRQ_PORT)
		return 0;
	snprintf(p, sizeof(p), "%s/notify-%d", d, port_domid[port]);
	fd = openat(AT_FDCWD, p, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
	if (fd >= 0) {
		if (write(fd, "n", 1) < 0) { /* full / no reader: ignore */ }
		close(fd);
	}
	return 0;
}

int xenevtchn_pending(void *xce)
{
	/* Kicks are 4-byte records (atomic FIFO writes): a domid, meaning
	 * "domain <domid> signalled its event channel", or 0xffffffff meaning
	 * VIRQ_DOM_EXC (a domain died).  One record per call; poll() wakes
	 * xenstored again while records remain. */
	uint32_t rec;
	int p;

	if (read(evt_fd, &rec, sizeof(rec)) != sizeof(rec))
		return 0;	/* spurious: C xenstored rescans all rings anyway */
	if (rec == 0xffffffffu)
		return VIRQ_PORT;
	for (p = next_port - 1; p > 0; p--)
		if (port_domid[p] == (int)rec)
			return p;	/* oxenstored credits this port's domain */
	return 0;
}

int xenevtchn_unmask(void *xce, uint32_t port)
{
	return 0;
}
