/*
 * xensim grant sharing: libxengntshr (/dev/xen/gntalloc). Allocates pages of
 * the caller's own domain memory, grants them to another domain in the
 * caller's grant_entry_v1 table, and maps them locally.
 */
#include "gntdev.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xengnttab.h>

XS_EXPORT xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return xs_gntdev_open((uint32_t)xs_env_domid());
}

/* Extension: a sharing handle acting as domain `domid` (tests, Python). */
XS_EXPORT xengntshr_handle *xensim_gntshr_open_as(uint32_t domid)
{
    return xs_gntdev_open(domid);
}

/* lock held: end one shared grant and return its page, or, while another domain maps
 * it, leave both until the last unmap (gntalloc's deferred end of access). */
static void end_share(struct xs_domain *d, uint32_t ref, uint64_t pfn)
{
    if (xs_grant_in_use(d, ref))
        d->gref_owner[ref] = XS_GREF_ENDED;
    else
        xs_grant_release(d, ref, pfn);
}

/* lock held: end access and return the pages of a share */
static void release_locked(struct xs_domain *d, struct xs_mapping *mp, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        end_share(d, mp->refs[i], mp->pfns[i]);
}

/* lock held: gntalloc ends a dead process's grants when its fd closes; here
 * the next sharer that runs short of pages or refs does it (and frees the ended
 * grants whose mapper died). */
static void gc_dead_shares(struct xs_domain *d)
{
    for (uint32_t ref = XS_FIRST_FREE_GREF; ref < XS_NR_GRANTS; ref++) {
        int32_t pid = d->gref_owner[ref];
        if (pid == XS_GREF_ENDED)
            (void)xs_grant_in_use(d, ref); /* frees it when its mapper is gone */
        else if (pid != 0 && !xs_pid_alive(pid))
            end_share(d, ref, d->grants[ref].frame);
    }
}

/* lock held: allocate a page and a grant ref for one shared page */
static int alloc_one(struct xs_domain *d, int *pfn_out)
{
    int pfn = xs_page_alloc(d);
    if (pfn < 0)
        return -1;
    int ref = xs_gref_alloc(d);
    if (ref < 0) {
        xs_page_free(d, (uint64_t)pfn);
        return -1;
    }
    *pfn_out = pfn;
    return ref;
}

static void free_mapping(struct xs_mapping *mp)
{
    free(mp->pfns);
    free(mp->refs);
    free(mp);
}

static void *share(xengntshr_handle *xgs, uint32_t domid, uint32_t count, uint32_t *refs,
                   int writable, uint32_t notify_offset, evtchn_port_t notify_port)
{
    if (count == 0 || domid >= XS_MAX_DOMID) {
        errno = EINVAL;
        return NULL;
    }
    struct xs_mapping *mp = calloc(1, sizeof(*mp));
    if (mp == NULL)
        return NULL;
    mp->pfns = calloc(count, sizeof(*mp->pfns));
    mp->refs = calloc(count, sizeof(*mp->refs));
    if (mp->pfns == NULL || mp->refs == NULL) {
        free_mapping(mp);
        errno = ENOMEM;
        return NULL;
    }
    if (xs_lock() < 0) {
        free_mapping(mp);
        return NULL;
    }
    struct xs_dom_view *v = xs_dom(xgs->domid);
    if (v == NULL) {
        xs_unlock();
        free_mapping(mp);
        errno = ESRCH;
        return NULL;
    }
    struct xs_domain *d = v->d;
    uint32_t n = 0;
    int collected = 0;
    int32_t self = (int32_t)getpid();
    for (; n < count; n++) {
        int pfn = -1;
        int ref = alloc_one(d, &pfn);
        if (ref < 0 && !collected) {
            gc_dead_shares(d);
            collected = 1;
            ref = alloc_one(d, &pfn);
        }
        if (ref < 0)
            break;
        mp->pfns[n] = (uint64_t)pfn;
        mp->refs[n] = (uint32_t)ref;
        grant_entry_v1_t *e = &d->grants[ref];
        e->domid = (domid_t)domid;
        e->frame = (uint32_t)pfn;
        d->gref_owner[ref] = self;
        /* flags last: the entry is valid only once frame and domid are. */
        __atomic_store_n(&e->flags, (uint16_t)(GTF_permit_access | (writable ? 0 : GTF_readonly)),
                         __ATOMIC_RELEASE);
    }
    if (n < count) {
        release_locked(d, mp, n);
        xs_unlock();
        free_mapping(mp);
        errno = ENOMEM;
        return NULL;
    }
    xs_unlock();
    size_t len = (size_t)count * XS_PAGE_SIZE;
    uint8_t *base = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int ok = base != MAP_FAILED;
    for (uint32_t i = 0; ok && i < count; i++) {
        void *p = mmap(base + (size_t)i * XS_PAGE_SIZE, XS_PAGE_SIZE, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_FIXED, v->mem_fd, (off_t)(mp->pfns[i] * XS_PAGE_SIZE));
        ok = p != MAP_FAILED;
    }
    if (!ok) {
        int saved = errno;
        if (base != MAP_FAILED)
            munmap(base, len);
        if (xs_lock() == 0) {
            release_locked(d, mp, count);
            xs_unlock();
        }
        free_mapping(mp);
        errno = saved;
        return NULL;
    }
    memset(base, 0, len); /* gntalloc hands out zeroed pages */
    mp->addr = base;
    mp->count = count;
    mp->notify_offset = notify_offset;
    mp->notify_port = notify_port;
    mp->notify_dom = xgs->domid;
    memcpy(refs, mp->refs, count * sizeof(*refs));
    xs_gntdev_add(xgs, mp);
    return base;
}

XS_EXPORT void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count,
                                      uint32_t *refs, int writable)
{
    if (count <= 0) {
        errno = EINVAL;
        return NULL;
    }
    return share(xgs, domid, (uint32_t)count, refs, writable, (uint32_t)-1, (evtchn_port_t)-1);
}

XS_EXPORT void *xengntshr_share_page_notify(xengntshr_handle *xgs, uint32_t domid,
                                            uint32_t *ref, int writable, uint32_t notify_offset,
                                            evtchn_port_t notify_port)
{
    if (notify_offset != (uint32_t)-1 && notify_offset >= XS_PAGE_SIZE) {
        errno = EINVAL;
        return NULL;
    }
    return share(xgs, domid, 1, ref, writable, notify_offset, notify_port);
}

XS_EXPORT int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count)
{
    struct xs_mapping *mp = xs_gntdev_take(xgs, start_address, count);
    if (mp == NULL || mp->pfns == NULL) {
        errno = EINVAL;
        return -1;
    }
    xs_unmap_notify(mp);
    munmap(mp->addr, (size_t)count * XS_PAGE_SIZE);
    if (xs_lock() == 0) {
        struct xs_dom_view *v = xs_dom(xgs->domid);
        if (v != NULL)
            release_locked(v->d, mp, count);
        xs_unlock();
    }
    free_mapping(mp);
    return 0;
}

XS_EXPORT int xengntshr_close(xengntshr_handle *xgs)
{
    if (xgs == NULL)
        return 0;
    /* Closing gntalloc ends every share of the handle. */
    struct xs_mapping *mp;
    while ((mp = xgs->maps) != NULL)
        if (mp->pfns == NULL || xengntshr_unshare(xgs, mp->addr, mp->count) < 0)
            break;
    xs_gntdev_close(xgs);
    return 0;
}

XS_EXPORT int xengntshr_fd(xengntshr_handle *xgs)
{
    return xgs->fd;
}

/* Extension: the guest ends access to one grant of its shares, as Linux's
 * gnttab_end_foreign_access_ref: fails (EBUSY) while the grantee maps it. The ref and
 * its page stay the share's; the grantee can no longer map or copy it. */
XS_EXPORT int xensim_gntshr_end_access(xengntshr_handle *xgs, uint32_t ref)
{
    if (ref >= XS_NR_GRANTS) {
        errno = EINVAL;
        return -1;
    }
    if (xs_lock() < 0)
        return -1;
    struct xs_dom_view *v = xs_dom(xgs->domid);
    int rc = -1;
    if (v == NULL)
        errno = ESRCH;
    else if (v->d->gref_owner[ref] != (int32_t)getpid())
        errno = EINVAL; /* not a grant of this process's shares */
    else
        rc = xs_grant_end(v->d, ref);
    xs_unlock();
    return rc;
}
