/*
 * xensim domains: the toolstack side of the simulated machine (create the run
 * directory, create and destroy domains, their memory and xenstore page),
 * page and grant-ref allocation, and queries used by the Python toolstack.
 */
#include "xensim.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC 0x01021994
#endif

/* What the Python toolstack reads about a domain (ctypes mirrors it). */
struct xensim_domain_info {
    uint32_t domid;
    uint32_t flags;
    uint64_t nr_pages;
    uint64_t xenstore_pfn;
    uint32_t xenstore_port;
    uint32_t pad;
    char mem_path[512];
};

static int write_file_excl(const char *path, size_t len)
{
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)len) < 0) {
        int saved = errno;
        close(fd);
        unlink(path);
        errno = saved;
        return -1;
    }
    return fd;
}

XS_EXPORT int xensim_machine_init(void)
{
    const char *dir = xs_dir();
    if (dir == NULL)
        return -1;
    char path[PATH_MAX];
    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        return -1;
    if (xs_path(path, sizeof(path), "evtchn") < 0)
        return -1;
    if (mkdir(path, 0755) < 0 && errno != EEXIST)
        return -1;
    if (xs_path(path, sizeof(path), "machine") < 0)
        return -1;
    int fd = write_file_excl(path, sizeof(struct xs_machine));
    if (fd < 0)
        return errno == EEXIST ? 0 : -1;
    struct xs_machine *m = mmap(NULL, sizeof(*m), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return -1;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&m->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    __atomic_store_n(&m->magic, XS_MAGIC, __ATOMIC_RELEASE);
    munmap(m, sizeof(*m));
    return 0;
}

uint64_t xs_bitmap_pages(const struct xs_domain *d)
{
    uint64_t n = d->nr_pages;
    return n < XS_MAX_PAGES ? n : XS_MAX_PAGES;
}

int xs_page_alloc(struct xs_domain *d)
{
    uint64_t pages = xs_bitmap_pages(d);
    for (uint64_t pfn = 0; pfn < pages; pfn++) {
        if (!(d->page_used[pfn / 8] & (1u << (pfn % 8)))) {
            d->page_used[pfn / 8] |= (uint8_t)(1u << (pfn % 8));
            return (int)pfn;
        }
    }
    return -1;
}

void xs_page_free(struct xs_domain *d, uint64_t pfn)
{
    if (pfn < xs_bitmap_pages(d))
        d->page_used[pfn / 8] &= (uint8_t)~(1u << (pfn % 8));
}

int xs_gref_alloc(struct xs_domain *d)
{
    for (uint32_t ref = XS_FIRST_FREE_GREF; ref < XS_NR_GRANTS; ref++) {
        /* An entry its sharer ended stays the share's until the share goes. */
        if (__atomic_load_n(&d->grants[ref].flags, __ATOMIC_ACQUIRE) == 0 &&
            d->gref_owner[ref] == 0)
            return (int)ref;
    }
    return -1;
}

static int domain_create_locked(uint32_t domid, uint64_t nr_pages, uint32_t *xenstore_port)
{
    struct xs_machine *m = xs_machine();
    char path[PATH_MAX];
    if (domid >= XS_MAX_DOMID || nr_pages < 2 || nr_pages > XS_MAX_PAGES) {
        errno = EINVAL;
        return -1;
    }
    if (m->gen[domid] != 0) {
        errno = EEXIST;
        return -1;
    }
    uint32_t gen = ++m->next_gen;
    if (gen == 0)
        gen = ++m->next_gen;
    if (xs_path(path, sizeof(path), "dom%u", domid) < 0)
        return -1;
    if (mkdir(path, 0755) < 0 && errno != EEXIST)
        return -1;
    if (xs_path(path, sizeof(path), "dom%u/state", domid) < 0)
        return -1;
    unlink(path); /* left over by a crashed toolstack */
    int fd = write_file_excl(path, sizeof(struct xs_domain));
    if (fd < 0)
        return -1;
    struct xs_domain *d = mmap(NULL, sizeof(*d), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (d == MAP_FAILED)
        return -1;
    int rc = -1;
    if (xs_mem_path(domid, gen, d->mem_path, sizeof(d->mem_path)) < 0)
        goto out;
    unlink(d->mem_path); /* left over by a crashed toolstack */
    int mfd = write_file_excl(d->mem_path, (size_t)nr_pages * XS_PAGE_SIZE);
    if (mfd < 0)
        goto out;
    close(mfd);
    d->domid = domid;
    d->nr_pages = nr_pages;
    d->gen = gen;
    /* pfn 0 stays unused (a console page in a real guest); the xenstore
     * page is zeroed (fresh file) and granted to dom0 by the reserved ref,
     * as the toolstack does, because C xenstored maps it through that ref. */
    d->page_used[0] |= 1u | (1u << XENSIM_XENSTORE_PFN);
    d->xenstore_pfn = XENSIM_XENSTORE_PFN;
    d->grants[GNTTAB_RESERVED_XENSTORE].domid = 0;
    d->grants[GNTTAB_RESERVED_XENSTORE].frame = XENSIM_XENSTORE_PFN;
    d->grants[GNTTAB_RESERVED_XENSTORE].flags = GTF_permit_access;
    int port = xs_port_alloc(d);
    if (port < 0)
        goto out;
    d->ports[port].state = XS_PORT_UNBOUND;
    d->ports[port].remote_dom = 0;
    /* No handle owns it yet: keep events pending until the guest claims it. */
    d->ports[port].flags = XS_PF_MASKED;
    d->xenstore_port = (uint32_t)port;
    __atomic_store_n(&d->magic, XS_MAGIC, __ATOMIC_RELEASE);
    __atomic_store_n(&m->gen[domid], gen, __ATOMIC_RELEASE);
    if (xenstore_port != NULL)
        *xenstore_port = (uint32_t)port;
    rc = 0;
out:
    munmap(d, sizeof(*d));
    return rc;
}

/* Extension: create domain `domid` with `nr_pages` pages of memory, its
 * xenstore page at XENSIM_XENSTORE_PFN (grant ref 1 to dom0) and an unbound
 * xenstore port for dom0 returned in *xenstore_port. */
XS_EXPORT int xensim_domain_create(uint32_t domid, uint64_t nr_pages, uint32_t *xenstore_port)
{
    if (xs_lock() < 0)
        return -1;
    int rc = domain_create_locked(domid, nr_pages, xenstore_port);
    int saved = errno;
    xs_unlock();
    errno = saved;
    return rc;
}

static void fire_virq(uint32_t virq)
{
    struct xs_machine *m = xs_machine();
    for (uint32_t domid = 0; domid < XS_MAX_DOMID; domid++) {
        if (__atomic_load_n(&m->gen[domid], __ATOMIC_ACQUIRE) == 0)
            continue;
        struct xs_dom_view *v = xs_dom(domid);
        if (v == NULL)
            continue;
        for (uint32_t p = 1; p < XS_NR_PORTS; p++) {
            struct xs_port *pt = &v->d->ports[p];
            if (pt->state == XS_PORT_VIRQ && pt->virq == virq)
                xs_port_deliver(v->d, p);
        }
    }
}

/* Extension: mark a domain dying, close its ports, remove its state and fire
 * VIRQ_DOM_EXC so that xenstored notices and releases it. */
XS_EXPORT int xensim_domain_destroy(uint32_t domid)
{
    if (xs_lock() < 0)
        return -1;
    struct xs_dom_view *v = xs_dom(domid);
    if (v == NULL) {
        xs_unlock();
        errno = ESRCH;
        return -1;
    }
    struct xs_domain *d = v->d;
    __atomic_or_fetch(&d->flags, XS_DOM_DYING, __ATOMIC_RELEASE);
    for (uint32_t p = 1; p < XS_NR_PORTS; p++) {
        if (d->ports[p].state != XS_PORT_FREE)
            xs_port_close(d, p);
    }
    __atomic_store_n(&xs_machine()->gen[domid], 0, __ATOMIC_RELEASE);
    char path[PATH_MAX];
    /* The file we created, not d->mem_path: the guest may have renamed it to any file. */
    if (xs_mem_path(domid, v->gen, path, sizeof(path)) == 0)
        unlink(path);
    if (xs_path(path, sizeof(path), "dom%u/state", domid) == 0)
        unlink(path);
    if (xs_path(path, sizeof(path), "dom%u/mem", domid) == 0)
        unlink(path);
    if (xs_path(path, sizeof(path), "dom%u", domid) == 0)
        rmdir(path);
    fire_virq(VIRQ_DOM_EXC);
    xs_unlock();
    return 0;
}

/* Extension: what the toolstack knows about a domain. */
XS_EXPORT int xensim_domain_info(uint32_t domid, struct xensim_domain_info *out)
{
    struct xs_dom_view *v = xs_dom(domid);
    if (v == NULL)
        return -1;
    memset(out, 0, sizeof(*out));
    out->domid = domid;
    out->flags = __atomic_load_n(&v->d->flags, __ATOMIC_ACQUIRE);
    out->nr_pages = v->nr_pages;
    out->xenstore_pfn = v->d->xenstore_pfn;
    out->xenstore_port = v->d->xenstore_port;
    if (xs_mem_path(domid, v->gen, out->mem_path, sizeof(out->mem_path)) < 0)
        return -1;
    return 0;
}

/* Extension: the existing domids in increasing order; returns how many. */
XS_EXPORT int xensim_domain_list(uint32_t *out, uint32_t max)
{
    struct xs_machine *m = xs_machine();
    if (m == NULL)
        return -1;
    uint32_t n = 0;
    for (uint32_t domid = 0; domid < XS_MAX_DOMID && n < max; domid++) {
        if (__atomic_load_n(&m->gen[domid], __ATOMIC_ACQUIRE) != 0)
            out[n++] = domid;
    }
    return (int)n;
}

/* Extension: map pages of a domain's own memory (a guest's xenstore page). */
XS_EXPORT void *xensim_map_own_pages(uint32_t domid, uint64_t pfn, uint32_t count, int writable)
{
    struct xs_dom_view *v = xs_dom(domid);
    if (v == NULL)
        return NULL;
    if (count == 0 || pfn >= v->nr_pages || count > v->nr_pages - pfn) {
        errno = EINVAL;
        return NULL;
    }
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *p = mmap(NULL, (size_t)count * XS_PAGE_SIZE, prot, MAP_SHARED, v->mem_fd,
                   (off_t)(pfn * XS_PAGE_SIZE));
    return p == MAP_FAILED ? NULL : p;
}

XS_EXPORT int xensim_unmap_pages(void *addr, uint32_t count)
{
    return munmap(addr, (size_t)count * XS_PAGE_SIZE);
}
