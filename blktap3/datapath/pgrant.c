/*
 * pgrant.c: persistent grants, a ring's bounded cache of mapped data grants.
 *
 * With feature-persistent negotiated the front-end keeps granting the same pages
 * (blkfront's pool), so the ring service maps each grant once, keeps the mapping and
 * memcpys from/to it, instead of a grant-copy hypercall per batch. Only the service
 * thread uses the cache, and every copy through a mapping is done before the call
 * returns: no mapping is in use between calls, so any entry may be evicted (the least
 * recently used one, when the cache is full) and all are unmapped at disconnect.
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

struct td_pgrant {
    uint32_t gref;
    int32_t next;           /* next entry of its hash bucket, -1: none */
    uint64_t last_use;      /* cache tick of its last copy: the LRU order */
    char *addr;             /* the mapped page */
};

struct td_pgcache {
    xengnttab_handle *xgt;
    uint32_t domid;
    uint32_t max, n;
    uint32_t nbuckets;      /* a power of two, at least twice max */
    int32_t *bucket;
    struct td_pgrant *e;
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

/* Unmap the least recently used entry; its place is then free (the last entry moves
 * into it, so entries stay packed). */
static void evict_lru(struct td_pgcache *c)
{
    uint32_t victim = 0;
    for (uint32_t i = 1; i < c->n; i++)
        if (c->e[i].last_use < c->e[victim].last_use)
            victim = i;
    unlink_entry(c, (int32_t)victim);
    xengnttab_unmap(c->xgt, c->e[victim].addr, 1);
    uint32_t last = c->n - 1;
    __atomic_store_n(&c->n, last, __ATOMIC_RELAXED);
    if (victim != last) {
        unlink_entry(c, (int32_t)last);
        c->e[victim] = c->e[last];
        uint32_t h = hash(c, c->e[victim].gref);
        c->e[victim].next = c->bucket[h];
        c->bucket[h] = (int32_t)victim;
    }
    STAT_INC(c, evictions);
}

/* The mapping of `gref`, mapped now if it was not; NULL when it cannot be mapped. */
static char *get(struct td_pgcache *c, uint32_t gref)
{
    int32_t i = lookup(c, gref);
    if (i >= 0) {
        STAT_INC(c, hits);
    } else {
        uint32_t ref = gref;
        char *addr = xengnttab_map_domain_grant_refs(c->xgt, 1, c->domid, &ref,
                                                     PROT_READ | PROT_WRITE);
        if (!addr) {
            STAT_INC(c, map_failures);
            return NULL;
        }
        if (c->n == c->max)
            evict_lru(c);
        i = (int32_t)c->n;
        __atomic_store_n(&c->n, c->n + 1, __ATOMIC_RELAXED);
        uint32_t h = hash(c, gref);
        c->e[i] = (struct td_pgrant){.gref = gref, .next = c->bucket[h], .addr = addr};
        c->bucket[h] = i;
        STAT_INC(c, maps);
    }
    c->e[i].last_use = ++c->tick;
    return c->e[i].addr;
}

int td_pgcache_copy(struct td_pgcache *c, uint32_t gref, uint32_t offset, void *buf,
                    uint32_t len, int to_guest)
{
    if (offset >= TD_PAGE_SIZE || len > TD_PAGE_SIZE - offset)
        return -EINVAL;
    char *page = get(c, gref);
    if (!page)
        return -EFAULT;
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
    out->mapped = __atomic_load_n(&c->n, __ATOMIC_RELAXED);
    out->max = c->max;
}
