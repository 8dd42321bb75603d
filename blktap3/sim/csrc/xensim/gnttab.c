/*
 * xensim grant tables, mapping side: libxengnttab (/dev/xen/gntdev) over the
 * granting domain's grant_entry_v1 table and memory file. Checks as Xen's
 * map and copy paths do: the entry must permit access to the caller's
 * domain, a read-only entry refuses writable maps and copies into it.
 * Errors: a failed map fails like gntdev's mmap (EINVAL); a failed copy
 * segment gets Xen's GNTST_* status and the call itself succeeds.
 */
#include "gntdev.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xengnttab.h>

struct xengntdev_handle *xs_gntdev_open(uint32_t domid)
{
    if (xs_machine() == NULL)
        return NULL;
    struct xengntdev_handle *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return NULL;
    h->domid = domid;
    /* Callers may ask for an fd; give one that exists. */
    h->fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    pthread_mutex_init(&h->lock, NULL);
    return h;
}

void xs_gntdev_add(struct xengntdev_handle *h, struct xs_mapping *mp)
{
    pthread_mutex_lock(&h->lock);
    mp->next = h->maps;
    h->maps = mp;
    pthread_mutex_unlock(&h->lock);
}

struct xs_mapping *xs_gntdev_take(struct xengntdev_handle *h, void *addr, uint32_t count)
{
    pthread_mutex_lock(&h->lock);
    struct xs_mapping **pp = &h->maps, *mp;
    for (mp = *pp; mp != NULL; pp = &mp->next, mp = mp->next) {
        if (mp->addr == addr && mp->count == count) {
            *pp = mp->next;
            break;
        }
    }
    pthread_mutex_unlock(&h->lock);
    return mp;
}

void xs_gntdev_close(struct xengntdev_handle *h)
{
    struct xs_mapping *mp = h->maps;
    while (mp != NULL) {
        struct xs_mapping *next = mp->next;
        munmap(mp->addr, (size_t)mp->count * XS_PAGE_SIZE);
        if (mp->doms != NULL) {
            xs_mapping_unpin(mp); /* closing gntdev unmaps what it mapped */
        } else {
            free(mp->pfns);
            free(mp->refs);
            free(mp);
        }
        mp = next;
    }
    if (h->fd >= 0)
        close(h->fd);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

XS_EXPORT xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return xs_gntdev_open((uint32_t)xs_env_domid());
}

/* Extension: a handle acting as domain `domid` (tests, Python). */
XS_EXPORT xengnttab_handle *xensim_gnttab_open_as(uint32_t domid)
{
    return xs_gntdev_open(domid);
}

XS_EXPORT int xengnttab_close(xengnttab_handle *xgt)
{
    if (xgt != NULL)
        xs_gntdev_close(xgt);
    return 0;
}

XS_EXPORT int xengnttab_fd(xengnttab_handle *xgt)
{
    return xgt->fd;
}

XS_EXPORT int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants)
{
    xgt->max_grants = nr_grants;
    return 0;
}

/* Check one grant for use by domain `self`; on success *view and *frame. */
static int16_t check_grant(uint32_t self, uint32_t domid, uint32_t ref, int write,
                           struct xs_dom_view **view, uint64_t *frame)
{
    struct xs_dom_view *v = xs_dom(domid);
    if (v == NULL)
        return GNTST_bad_domain;
    if (ref >= XS_NR_GRANTS)
        return GNTST_bad_gntref;
    grant_entry_v1_t *e = &v->d->grants[ref];
    /* The granter rewrites its entry at will: each field is read once (after flags,
     * which it writes last) and only that copy is checked and used; the frame is
     * bounded by the pages this process mapped, not by the granter's nr_pages. */
    uint16_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
    domid_t domid_ok = __atomic_load_n(&e->domid, __ATOMIC_RELAXED);
    uint32_t fr = __atomic_load_n(&e->frame, __ATOMIC_RELAXED);
    if ((flags & 3u) != GTF_permit_access || domid_ok != self)
        return GNTST_general_error; /* Xen: "Bad flags or dom" */
    if (write && (flags & GTF_readonly))
        return GNTST_general_error; /* Xen: "Attempt to write-pin a r/o grant" */
    if (fr >= v->nr_pages)
        return GNTST_bad_page;
    *view = v;
    *frame = fr;
    return GNTST_okay;
}

static void free_map(struct xs_mapping *mp)
{
    free(mp->refs);
    free(mp->doms);
    free(mp);
}

/* lock held: drop the pins of the first `n` refs of a mapping */
static void unpin_locked(struct xs_mapping *mp, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        struct xs_dom_view *v = xs_dom(mp->doms[i]);
        if (v != NULL) /* a destroyed domain took its table with it */
            xs_grant_unpin(v->d, mp->refs[i], mp->writable);
    }
}

void xs_mapping_unpin(struct xs_mapping *mp)
{
    if (xs_lock() == 0) {
        unpin_locked(mp, mp->count);
        xs_unlock();
    }
    free_map(mp);
}

/*
 * Map as gntdev's mmap does: every grant checked and pinned (GTF_reading, GTF_writing
 * for a writable map) under the machine lock, so that the granter's end of access sees
 * the pin or the map sees the ended entry, never both missed; any failure unmaps the
 * lot and fails like gntdev (EINVAL: a map op that did not return GNTST_okay).
 */
static void *map_refs(xengnttab_handle *xgt, uint32_t count, const uint32_t *domids,
                      uint32_t domid, const uint32_t *refs, int prot, uint32_t notify_offset,
                      evtchn_port_t notify_port)
{
    if (count == 0 || (prot & ~(PROT_READ | PROT_WRITE)) != 0) {
        errno = EINVAL;
        return NULL;
    }
    int writable = (prot & PROT_WRITE) != 0;
    struct xs_mapping *mp = calloc(1, sizeof(*mp));
    if (mp == NULL)
        return NULL;
    mp->refs = calloc(count, sizeof(*mp->refs));
    mp->doms = calloc(count, sizeof(*mp->doms));
    if (mp->refs == NULL || mp->doms == NULL) {
        free_map(mp);
        errno = ENOMEM;
        return NULL;
    }
    mp->writable = writable;
    size_t len = (size_t)count * XS_PAGE_SIZE;
    uint8_t *base = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        free_map(mp);
        return NULL;
    }
    if (xs_lock() < 0) {
        munmap(base, len);
        free_map(mp);
        return NULL;
    }
    uint32_t pinned = 0;
    for (; pinned < count; pinned++) {
        struct xs_dom_view *v;
        uint64_t frame;
        uint32_t dom = domids != NULL ? domids[pinned] : domid;
        if (check_grant(xgt->domid, dom, refs[pinned], writable, &v, &frame) != GNTST_okay)
            break;
        void *p = mmap(base + (size_t)pinned * XS_PAGE_SIZE, XS_PAGE_SIZE, prot,
                       MAP_SHARED | MAP_FIXED, v->mem_fd, (off_t)(frame * XS_PAGE_SIZE));
        if (p == MAP_FAILED)
            break;
        xs_grant_pin(v->d, refs[pinned], writable);
        mp->refs[pinned] = refs[pinned];
        mp->doms[pinned] = dom;
    }
    if (pinned < count) {
        unpin_locked(mp, pinned);
        xs_unlock();
        munmap(base, len);
        free_map(mp);
        errno = EINVAL; /* what gntdev's mmap returns when a map op fails */
        return NULL;
    }
    xs_unlock();
    mp->addr = base;
    mp->count = count;
    mp->notify_offset = notify_offset;
    mp->notify_port = notify_port;
    mp->notify_dom = xgt->domid;
    xs_gntdev_add(xgt, mp);
    return base;
}

XS_EXPORT void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref,
                                        int prot)
{
    return map_refs(xgt, 1, NULL, domid, &ref, prot, (uint32_t)-1, (evtchn_port_t)-1);
}

XS_EXPORT void *xengnttab_map_grant_refs(xengnttab_handle *xgt, uint32_t count,
                                         uint32_t *domids, uint32_t *refs, int prot)
{
    return map_refs(xgt, count, domids, 0, refs, prot, (uint32_t)-1, (evtchn_port_t)-1);
}

XS_EXPORT void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count,
                                                uint32_t domid, uint32_t *refs, int prot)
{
    return map_refs(xgt, count, NULL, domid, refs, prot, (uint32_t)-1, (evtchn_port_t)-1);
}

XS_EXPORT void *xengnttab_map_grant_ref_notify(xengnttab_handle *xgt, uint32_t domid,
                                               uint32_t ref, int prot, uint32_t notify_offset,
                                               evtchn_port_t notify_port)
{
    if (notify_offset != (uint32_t)-1 && notify_offset >= XS_PAGE_SIZE) {
        errno = EINVAL;
        return NULL;
    }
    return map_refs(xgt, 1, NULL, domid, &ref, prot, notify_offset, notify_port);
}

void xs_unmap_notify(struct xs_mapping *mp)
{
    if (mp->notify_offset != (uint32_t)-1)
        ((volatile uint8_t *)mp->addr)[mp->notify_offset] = 0;
    if (mp->notify_port != (evtchn_port_t)-1)
        xs_evtchn_send(mp->notify_dom, mp->notify_port);
}

XS_EXPORT int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count)
{
    struct xs_mapping *mp = xs_gntdev_take(xgt, start_address, count);
    if (mp == NULL) {
        errno = EINVAL;
        return -1;
    }
    xs_unmap_notify(mp);
    munmap(mp->addr, (size_t)count * XS_PAGE_SIZE);
    xs_mapping_unpin(mp);
    return 0;
}

XS_EXPORT int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count,
                                   xengnttab_grant_copy_segment_t *segs)
{
    /* gntdev rejects the whole call when a segment crosses its page. */
    for (uint32_t i = 0; i < count; i++) {
        const xengnttab_grant_copy_segment_t *s = &segs[i];
        if (((s->flags & GNTCOPY_source_gref) &&
             (uint32_t)s->source.foreign.offset + s->len > XS_PAGE_SIZE) ||
            ((s->flags & GNTCOPY_dest_gref) &&
             (uint32_t)s->dest.foreign.offset + s->len > XS_PAGE_SIZE)) {
            errno = EINVAL;
            return -1;
        }
    }
    for (uint32_t i = 0; i < count; i++) {
        xengnttab_grant_copy_segment_t *s = &segs[i];
        struct xs_dom_view *v = NULL;
        uint64_t frame = 0;
        const uint8_t *src = s->source.virt;
        uint8_t *dst = s->dest.virt;
        int16_t st = GNTST_okay;
        if (s->flags & GNTCOPY_source_gref) {
            st = check_grant(xgt->domid, s->source.foreign.domid, s->source.foreign.ref, 0, &v,
                             &frame);
            if (st == GNTST_okay)
                src = v->mem + frame * XS_PAGE_SIZE + s->source.foreign.offset;
        }
        if (st == GNTST_okay && (s->flags & GNTCOPY_dest_gref)) {
            st = check_grant(xgt->domid, s->dest.foreign.domid, s->dest.foreign.ref, 1, &v,
                             &frame);
            if (st == GNTST_okay)
                dst = v->mem + frame * XS_PAGE_SIZE + s->dest.foreign.offset;
        }
        if (st == GNTST_okay)
            memcpy(dst, src, s->len);
        s->status = st;
    }
    return 0;
}
