/*
 * pgrant.c: persistent grants, a ring's bounded cache of mapped data grants.
 *
 * With feature-persistent negotiated the front-end keeps granting the same pages
 * (blkfront's pool), so the ring service maps each grant once, keeps the mapping and
 * memcpys from/to it, instead of a grant-copy hypercall per batch. Only the service
 * thread uses the cache, and every copy through a mapping is done before the call
 * returns: no mapping is in use between calls, so any entry may be evicted, and all
 * are unmapped at disconnect.
 *
 * When the cache is full, a new grant takes the place of the least recently used one
 * only if that one went cold (unused for TD_PGRANT_COLD x max copies); otherwise the new
 * grant is grant-copied, uncached, as blkback maps a grant non-persistently once it
 * holds max_persistent_grants. A working set larger than the cache (1 MiB requests at
 * QD8 touch 2048 pages) then keeps part of its pages mapped and copies the rest, instead
 * of mapping and unmapping every page in turn as plain LRU would; only a working set
 * past TD_PGRANT_COLD x max (over 16 MiB in flight on one ring) evicts as it goes.
 *
 * A grant that cannot be mapped (never granted, revoked before we mapped it, granted
 * read-only: mappings are writable, as blkback's persistent ones, since a page that
 * carries a write now may carry a read later) is left to the caller's grant copy,
 * whose per-segment status then decides (BLKIF_RSP_ERROR for a grant that is not the
 * guest's to give). Once mapped, Xen pins the grant: the guest cannot end access to
 * it (gnttab_end_foreign_access_ref fails) until we unmap, so the page under a cached
 * mapping is always the one the grant named.
 */
#define _GNU_SOURCE
#include "pgrant.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* Unused for this many times the cache's size in copies: cold, may be evicted. */
#define TD_PGRANT_COLD 4u

struct td_pgrant {
    uint32_t gref;
    int32_t next;           /* next entry of its hash bucket, -1: none */
    int32_t newer, older;   /* the LRU list, most recent first; -1: none */
    uint64_t last_use;      /* cache tick of its last copy */
    char *addr;             /* the mapped page */
};

struct td_pgcache {
    xengnttab_handle *xgt;
    uint32_t domid;
    uint32_t max, n;
    uint32_t nbuckets;      /* a power of two, at least twice max */
    int32_t *bucket;
    struct td_pgrant *e;
    int32_t newest, oldest; /* ends of the LRU list, -1: empty */
    uint64_t tick;
    struct td_pgstats st;
};

int td_pgcache_open(xengnttab_handle *xgt, uint32_t domid, uint32_t max,
                    struct td_pgcache **out)
{
    if (max == 0)
        return -EINVAL;
    struct td_pgcache *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->xgt = xgt;
    c->domid = domid;
    c->max = max;
    c->nbuckets = 1;
    while (c->nbuckets < 2 * max)
        c->nbuckets <<= 1;
    c->bucket = malloc(c->nbuckets * sizeof(*c->bucket));
    c->e = calloc(max, sizeof(*c->e));
    if (!c->bucket || !c->e) {
        td_pgcache_close(c);
        return -ENOMEM;
    }
    memset(c->bucket, 0xff, c->nbuckets * sizeof(*c->bucket)); /* all -1 */
    c->newest = c->oldest = -1;
    c->st.max = max;
    *out = c;
    return 0;
}

void td_pgcache_close(struct td_pgcache *c)
{
    if (!c)
        return;
    for (uint32_t i = 0; c->e && i < c->n; i++)
        xengnttab_unmap(c->xgt, c->e[i].addr, 1);
    free(c->bucket);
    free(c->e);
    free(c);
}

/* Counters are written by the service thread only and read by STATS from another. */
#define STAT_INC(c, field) __atomic_fetch_add(&(c)->st.field, 1, __ATOMIC_RELAXED)

static uint32_t hash(const struct td_pgcache *c, uint32_t gref)
{
    return (gref * 2654435761u) & (c->nbuckets - 1);    /* Knuth's multiplicative hash */
}

static int32_t lookup(const struct td_pgcache *c, uint32_t gref)
{
    for (int32_t i = c->bucket[hash(c, gref)]; i >= 0; i = c->e[i].next)
        if (c->e[i].gref == gref)
            return i;
    return -1;
}

static void unlink_entry(struct td_pgcache *c, int32_t i)
{
    int32_t *pp = &c->bucket[hash(c, c->e[i].gref)];
    while (*pp != i)
        pp = &c->e[*pp].next;
    *pp = c->e[i].next;
}

static void lru_unlink(struct td_pgcache *c, int32_t i)
{
    struct td_pgrant *e = &c->e[i];
    if (e->newer >= 0)
        c->e[e->newer].older = e->older;
    else
        c->newest = e->older;
    if (e->older >= 0)
        c->e[e->older].newer = e->newer;
    else
        c->oldest = e->newer;
}

static void lru_push(struct td_pgcache *c, int32_t i)
{
    c->e[i].newer = -1;
    c->e[i].older = c->newest;
    if (c->newest >= 0)
        c->e[c->newest].newer = i;
    else
        c->oldest = i;
    c->newest = i;
}

static void link_entry(struct td_pgcache *c, int32_t i)
{
    uint32_t h = hash(c, c->e[i].gref);
    c->e[i].next = c->bucket[h];
    c->bucket[h] = i;
    lru_push(c, i);
}

/* Unmap entry `victim` (the oldest); the last entry moves into its place, so that
 * entries stay packed. */
static void evict(struct td_pgcache *c, int32_t victim)
{
    unlink_entry(c, victim);
    lru_unlink(c, victim);
    xengnttab_unmap(c->xgt, c->e[victim].addr, 1);
    int32_t last = (int32_t)c->n - 1;
    __atomic_store_n(&c->n, (uint32_t)last, __ATOMIC_RELAXED);
    if (victim != last) {
        unlink_entry(c, last);
        c->e[victim] = c->e[last];
        /* The moved entry keeps its place in the LRU order: its neighbours follow it. */
        struct td_pgrant *e = &c->e[victim];
        if (e->newer >= 0)
            c->e[e->newer].older = victim;
        else
            c->newest = victim;
        if (e->older >= 0)
            c->e[e->older].newer = victim;
        else
            c->oldest = victim;
        uint32_t h = hash(c, e->gref);
        e->next = c->bucket[h];
        c->bucket[h] = victim;
    }
    STAT_INC(c, evictions);
}

/* The mapping of `gref`, mapped now if it was not and there is room; NULL (and *why)
 * when it is not cached. */
static char *get(struct td_pgcache *c, uint32_t gref, int *why)
{
    c->tick++;
    int32_t i = lookup(c, gref);
    if (i >= 0) {
        STAT_INC(c, hits);
        if (c->newest != i) {
            lru_unlink(c, i);
            lru_push(c, i);
        }
        c->e[i].last_use = c->tick;
        return c->e[i].addr;
    }
    if (c->n == c->max) {
        int32_t old = c->oldest;
        if (c->tick - c->e[old].last_use < (uint64_t)TD_PGRANT_COLD * c->max) {
            STAT_INC(c, full);
            *why = -ENOSPC;
            return NULL;
        }
        evict(c, old);
    }
    uint32_t ref = gref;
    char *addr = xengnttab_map_domain_grant_refs(c->xgt, 1, c->domid, &ref,
                                                 PROT_READ | PROT_WRITE);
    if (!addr) {
        STAT_INC(c, map_failures);
        *why = -EFAULT;
        return NULL;
    }
    i = (int32_t)c->n;
    __atomic_store_n(&c->n, c->n + 1, __ATOMIC_RELAXED);
    c->e[i] = (struct td_pgrant){.gref = gref, .last_use = c->tick, .addr = addr};
    link_entry(c, i);
    STAT_INC(c, maps);
    return addr;
}

int td_pgcache_copy(struct td_pgcache *c, uint32_t gref, uint32_t offset, void *buf,
                    uint32_t len, int to_guest)
{
    if (offset >= TD_PAGE_SIZE || len > TD_PAGE_SIZE - offset)
        return -EINVAL;
    int why = 0;
    char *page = get(c, gref, &why);
    if (!page)
        return why;
    if (to_guest)
        memcpy(page + offset, buf, len);
    else
        memcpy(buf, page + offset, len);
    return 0;
}

void td_pgcache_stats(const struct td_pgcache *c, struct td_pgstats *out)
{
    out->maps = __atomic_load_n(&c->st.maps, __ATOMIC_RELAXED);
    out->hits = __atomic_load_n(&c->st.hits, __ATOMIC_RELAXED);
    out->evictions = __atomic_load_n(&c->st.evictions, __ATOMIC_RELAXED);
    out->map_failures = __atomic_load_n(&c->st.map_failures, __ATOMIC_RELAXED);
    out->full = __atomic_load_n(&c->st.full, __ATOMIC_RELAXED);
    out->mapped = __atomic_load_n(&c->n, __ATOMIC_RELAXED);
    out->max = c->max;
}
