/*
 * xensim grant entries in use: what Xen's active entries and the guest's end of
 * access do, reduced to one granting domain's table.
 *
 * A mapping pins its grant: Xen sets GTF_reading (and GTF_writing for a writable map)
 * in the granter's shared entry (grant_table.c, _set_status_v1) and clears them when
 * the last such pin goes. The granter ends access only to an entry neither bit is set
 * in (Linux gnttab_end_foreign_access_ref_v1 fails otherwise): a guest cannot take a
 * page back from a back-end that still maps it. gntalloc then defers the free until
 * the mapping goes; here the entry is marked XS_GREF_ENDED and the last unmap frees it.
 *
 * A mapper that died without unmapping (gntdev's release would have unmapped) leaves
 * pins behind: they are void once its pid is gone. Everything here runs under the
 * machine lock.
 */
#include "xensim.h"

#include <errno.h>
#include <unistd.h>

#define XS_GTF_IN_USE ((uint16_t)(GTF_reading | GTF_writing))

static void clear_flags(struct xs_domain *d, uint32_t ref, uint16_t bits)
{
    __atomic_fetch_and(&d->grants[ref].flags, (uint16_t)~bits, __ATOMIC_ACQ_REL);
}

void xs_grant_release(struct xs_domain *d, uint32_t ref, uint64_t pfn)
{
    grant_entry_v1_t *e = &d->grants[ref];
    __atomic_store_n(&e->flags, 0, __ATOMIC_RELEASE);
    e->domid = 0;
    e->frame = 0;
    d->gref_owner[ref] = 0;
    d->pin_ro[ref] = 0;
    d->pin_rw[ref] = 0;
    d->pin_pid[ref] = 0;
    xs_page_free(d, pfn);
}

/* The last pin went: clear the in-use bits, free an entry its sharer already ended. */
static void unpinned(struct xs_domain *d, uint32_t ref)
{
    d->pin_pid[ref] = 0;
    clear_flags(d, ref, XS_GTF_IN_USE);
    if (d->gref_owner[ref] == XS_GREF_ENDED)
        xs_grant_release(d, ref, d->grants[ref].frame);
}

void xs_grant_pin(struct xs_domain *d, uint32_t ref, int writable)
{
    (void)xs_grant_in_use(d, ref); /* drop a dead mapper's pins first */
    uint16_t *n = writable ? &d->pin_rw[ref] : &d->pin_ro[ref];
    if (*n < UINT16_MAX)
        (*n)++;
    d->pin_pid[ref] = (int32_t)getpid();
    __atomic_fetch_or(&d->grants[ref].flags,
                      (uint16_t)(GTF_reading | (writable ? GTF_writing : 0)), __ATOMIC_ACQ_REL);
}

void xs_grant_unpin(struct xs_domain *d, uint32_t ref, int writable)
{
    uint16_t *n = writable ? &d->pin_rw[ref] : &d->pin_ro[ref];
    if (*n > 0)
        (*n)--;
    if (d->pin_rw[ref] == 0)
        clear_flags(d, ref, GTF_writing);
    if (d->pin_ro[ref] == 0 && d->pin_rw[ref] == 0)
        unpinned(d, ref);
}

int xs_grant_in_use(struct xs_domain *d, uint32_t ref)
{
    if (d->pin_ro[ref] == 0 && d->pin_rw[ref] == 0)
        return 0;
    int32_t pid = d->pin_pid[ref];
    if (pid != 0 && !xs_pid_alive(pid)) {
        d->pin_ro[ref] = 0;
        d->pin_rw[ref] = 0;
        unpinned(d, ref);
        return 0;
    }
    return 1;
}

int xs_grant_end(struct xs_domain *d, uint32_t ref)
{
    if (xs_grant_in_use(d, ref)) {
        errno = EBUSY;
        return -1;
    }
    /* Only the flags: the share still owns the ref and its page until it goes. */
    __atomic_store_n(&d->grants[ref].flags, 0, __ATOMIC_RELEASE);
    return 0;
}
