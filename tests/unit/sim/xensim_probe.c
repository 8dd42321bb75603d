/*
 * xensim_probe: one Xen library operation per run, linked against the real
 * Debian libraries and run with libxensim preloaded, so the tests exercise
 * the same symbols a real program (xenstored, tapdisk) resolves.
 * Prints "ok ..." or "err <errno>" / "status <GNTST>" on stdout.
 * `poke` plays a hostile guest process: it rewrites its own domain's shared state
 * file (xensim.h's layout), as any process of that domain can.
 */
#include "xensim.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xenctrl.h>
#include <xenevtchn.h>
#include <xengnttab.h>
#include <xen/sys/gntdev.h>

static unsigned long arg(char **argv, int i) { return strtoul(argv[i], NULL, 0); }

/* Map DOMID REF rw|ro (argv[2..4]) as one page; prints "err <errno>" on failure. */
static unsigned char *map_one(char **argv, xengnttab_handle **g, int *prot)
{
    *g = xengnttab_open(NULL, 0);
    *prot = PROT_READ | (strcmp(argv[4], "rw") == 0 ? PROT_WRITE : 0);
    uint32_t ref = (uint32_t)arg(argv, 3);
    unsigned char *p = xengnttab_map_domain_grant_refs(*g, 1, (uint32_t)arg(argv, 2), &ref, *prot);
    if (p == NULL)
        printf("err %d\n", errno);
    else
        printf("ok %02x\n", p[0]);
    return p;
}

static int map(char **argv) /* map DOMID REF rw|ro */
{
    xengnttab_handle *g;
    int prot;
    unsigned char *p = map_one(argv, &g, &prot);
    if (p == NULL)
        return 0;
    if (prot & PROT_WRITE)
        p[1] = 0x5a;
    printf("unmap %d\n", xengnttab_unmap(g, p, 1));
    xengnttab_close(g);
    return 0;
}

/* hold DOMID REF rw|ro: map, say so, keep the mapping until stdin closes, unmap */
static int hold(char **argv)
{
    xengnttab_handle *g;
    int prot;
    unsigned char *p = map_one(argv, &g, &prot);
    fflush(stdout);
    if (p == NULL)
        return 0;
    char buf[64];
    while (read(0, buf, sizeof(buf)) > 0)
        ;
    printf("still %02x\n", p[0]);
    printf("unmap %d\n", xengnttab_unmap(g, p, 1));
    xengnttab_close(g);
    return 0;
}

/* One 16-byte copy segment from (or to, at offset 2) grant REF of DOMID (argv[2..3]). */
#define FILL_SEGMENT(seg, argv, from, buf)                       \
    do {                                                         \
        memset(&(seg), 0, sizeof(seg));                          \
        (seg).len = sizeof(buf);                                 \
        if (from) {                                              \
            (seg).flags = GNTCOPY_source_gref;                   \
            (seg).source.foreign.domid = (uint16_t)arg(argv, 2); \
            (seg).source.foreign.ref = (uint32_t)arg(argv, 3);   \
            (seg).dest.virt = (buf);                             \
        } else {                                                 \
            (seg).flags = GNTCOPY_dest_gref;                     \
            (seg).dest.foreign.domid = (uint16_t)arg(argv, 2);   \
            (seg).dest.foreign.ref = (uint32_t)arg(argv, 3);     \
            (seg).dest.foreign.offset = 2;                       \
            (seg).source.virt = (buf);                           \
        }                                                        \
    } while (0)

static int copy(char **argv, int from) /* copy-from|copy-to DOMID REF */
{
    xengnttab_handle *g = xengnttab_open(NULL, 0);
    unsigned char buf[16];
    memset(buf, 0xc3, sizeof(buf));
    xengnttab_grant_copy_segment_t seg;
    FILL_SEGMENT(seg, argv, from, buf);
    if (xengnttab_grant_copy(g, 1, &seg) < 0)
        printf("err %d\n", errno);
    else
        printf("status %d %02x\n", seg.status, buf[0]);
    xengnttab_close(g);
    return 0;
}

/* node-copy-from|node-copy-to DOMID REF: the same copy through the device node, as
 * blktap's tapdisk does it (open /dev/xen/gntdev, IOCTL_GNTDEV_GRANT_COPY); then what
 * another ioctl on the node answers. */
static int node_copy(char **argv, int from)
{
    if (access("/dev/xen/gntdev", F_OK) != 0) {
        printf("no node %d\n", errno);
        return 0;
    }
    int fd = open("/dev/xen/gntdev", O_NONBLOCK);
    if (fd < 0) {
        printf("err %d\n", errno);
        return 0;
    }
    unsigned char buf[16];
    memset(buf, 0xc3, sizeof(buf));
    struct ioctl_gntdev_grant_copy_segment seg;
    FILL_SEGMENT(seg, argv, from, buf);
    struct ioctl_gntdev_grant_copy op = {.count = 1, .segments = &seg};
    if (ioctl(fd, IOCTL_GNTDEV_GRANT_COPY, &op) < 0)
        printf("err %d\n", errno);
    else
        printf("status %d %02x\n", seg.status, buf[0]);
    struct ioctl_gntdev_map_grant_ref map;
    memset(&map, 0, sizeof(map));
    printf("other ioctl %d\n", ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, &map) < 0 ? errno : 0);
    printf("close %d\n", close(fd));
    return 0;
}

static int pingpong(char **argv) /* pingpong DOMID PORT ROUNDS GREF */
{
    xenevtchn_handle *e = xenevtchn_open(NULL, 0);
    xengnttab_handle *g = xengnttab_open(NULL, 0);
    uint32_t dom = (uint32_t)arg(argv, 2);
    unsigned char *page = xengnttab_map_grant_ref(g, dom, (uint32_t)arg(argv, 5),
                                                  PROT_READ | PROT_WRITE);
    if (page == NULL) {
        printf("err map %d\n", errno);
        return 1;
    }
    int local = xenevtchn_bind_interdomain(e, dom, (uint32_t)arg(argv, 3));
    if (local < 0) {
        printf("err bind %d\n", errno);
        return 1;
    }
    /* Xen marks a freshly bound port pending: take that event first. */
    xenevtchn_unmask(e, (uint32_t)xenevtchn_pending(e));
    /* echo the guest's greeting, upper-cased, then bounce every event */
    for (size_t i = 0; page[i] != 0 && i < 64; i++)
        page[64 + i] = (unsigned char)(page[i] - 32 * (page[i] >= 'a' && page[i] <= 'z'));
    unsigned long rounds = arg(argv, 4), got = 0;
    xenevtchn_notify(e, (uint32_t)local);
    while (got < rounds) {
        int port = xenevtchn_pending(e);
        if (port < 0) {
            printf("err pending %d\n", errno);
            return 1;
        }
        xenevtchn_unmask(e, (uint32_t)port);
        if (port == local) {
            got++;
            xenevtchn_notify(e, (uint32_t)local);
        }
    }
    printf("ok %lu\n", got);
    xengnttab_unmap(g, page, 1);
    xengnttab_close(g);
    xenevtchn_close(e);
    return 0;
}

static int poke(char **argv) /* poke DOMID nr_pages N | frame REF N | mem_path PATH */
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/dom%lu/state", getenv("XENSIM_DIR"), arg(argv, 2));
    int fd = open(path, O_RDWR);
    struct xs_domain *d = fd < 0 ? MAP_FAILED
                                 : mmap(NULL, sizeof(*d), PROT_READ | PROT_WRITE, MAP_SHARED,
                                        fd, 0);
    if (d == MAP_FAILED) {
        printf("err %d\n", errno);
        return 1;
    }
    if (strcmp(argv[3], "nr_pages") == 0)
        d->nr_pages = arg(argv, 4);
    else if (strcmp(argv[3], "frame") == 0)
        d->grants[arg(argv, 4) % XS_NR_GRANTS].frame = (uint32_t)arg(argv, 5);
    else if (strcmp(argv[3], "mem_path") == 0)
        snprintf(d->mem_path, sizeof(d->mem_path), "%s", argv[4]);
    else
        return 2;
    printf("ok\n");
    return 0;
}

int main(int argc, char **argv)
{
    const char *op = argc > 1 ? argv[1] : "";
    if (strcmp(op, "map") == 0 && argc == 5)
        return map(argv);
    if (strcmp(op, "hold") == 0 && argc == 5)
        return hold(argv);
    if (strcmp(op, "copy-from") == 0 && argc == 4)
        return copy(argv, 1);
    if (strcmp(op, "copy-to") == 0 && argc == 4)
        return copy(argv, 0);
    if (strcmp(op, "node-copy-from") == 0 && argc == 4)
        return node_copy(argv, 1);
    if (strcmp(op, "node-copy-to") == 0 && argc == 4)
        return node_copy(argv, 0);
    if (strcmp(op, "poke") == 0 && argc >= 5)
        return poke(argv);
    if (strcmp(op, "pingpong") == 0 && argc == 6)
        return pingpong(argv);
    if (strcmp(op, "bind") == 0 && argc == 4) { /* bind DOMID PORT */
        xenevtchn_handle *e = xenevtchn_open(NULL, 0);
        int port = xenevtchn_bind_interdomain(e, (uint32_t)arg(argv, 2), (uint32_t)arg(argv, 3));
        printf(port < 0 ? "err %d\n" : "ok %d\n", port < 0 ? errno : port);
        xenevtchn_close(e);
        return 0;
    }
    if (strcmp(op, "notify") == 0 && argc == 3) { /* notify+unbind PORT (not ours) */
        xenevtchn_handle *e = xenevtchn_open(NULL, 0);
        int rc = xenevtchn_notify(e, (uint32_t)arg(argv, 2));
        printf(rc < 0 ? "err %d\n" : "ok %d\n", rc < 0 ? errno : rc);
        rc = xenevtchn_unbind(e, (uint32_t)arg(argv, 2));
        printf(rc < 0 ? "err %d\n" : "ok %d\n", rc < 0 ? errno : rc);
        xenevtchn_close(e);
        return 0;
    }
    if (strcmp(op, "getinfo") == 0 && argc == 3) { /* getinfo DOMID */
        xc_interface *xc = xc_interface_open(NULL, NULL, 0);
        xc_domaininfo_t info; /* getinfolist: in Xen 4.17's API and 4.20's alike */
        int n = xc_domain_getinfolist(xc, (uint32_t)arg(argv, 2), 1, &info);
        printf("ok %d %u %d\n", n, n > 0 ? info.domain : 0,
               n > 0 ? (info.flags & XEN_DOMINF_dying) != 0 : 0);
        xc_interface_close(xc);
        return 0;
    }
    fprintf(stderr, "usage: xensim_probe map|copy-from|copy-to|node-copy-from|node-copy-to|bind|notify|pingpong|getinfo ...\n");
    return 2;
}
