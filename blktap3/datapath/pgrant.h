/*
 * pgrant.h: persistent grants (pgrant.c), the ring service's cache of mapped grants.
 */
#ifndef BLKTAP3_PGRANT_H
#define BLKTAP3_PGRANT_H

#include <stdint.h>
#include <xengnttab.h>
#include "xenring.h"

/* Grants a ring keeps mapped at most: Linux blkback's max_persistent_grants (1056, three
 * single-page rings of direct requests), or every direct segment of a full ring when that
 * is more, so that a front-end filling a multi-page ring never makes the cache thrash. */
#define TD_PGRANTS_MIN 1056u

struct td_pgstats {
    uint64_t maps;          /* grants mapped (first use, or again after eviction) */
    uint64_t hits;          /* copies through a mapping already there */
    uint64_t evictions;     /* mappings dropped to make room (least recently used) */
    uint64_t map_failures;  /* grants that could not be mapped: grant-copied instead */
    uint64_t full;          /* segments grant-copied: cache full, nothing cold to evict */
    uint32_t mapped;        /* mappings held now */
    uint32_t max;
};

struct td_pgcache;
int td_pgcache_open(xengnttab_handle *xgt, uint32_t domid, uint32_t max,
                    struct td_pgcache **out);
/* Unmap everything (the ring is going: disconnect). */
void td_pgcache_close(struct td_pgcache *c);
/* Copy `len` bytes at `offset` of the page granted by `gref` to/from `buf` through its
 * mapping (mapped now when it was not). -EFAULT: the grant cannot be mapped (the caller
 * grant-copies it, whose status decides); -ENOSPC: the cache is full of grants in use
 * (the caller grant-copies it); -EINVAL: outside the page. */
int td_pgcache_copy(struct td_pgcache *c, uint32_t gref, uint32_t offset, void *buf,
                    uint32_t len, int to_guest);
/* Counters, from any thread (relaxed reads of single-writer values). */
void td_pgcache_stats(const struct td_pgcache *c, struct td_pgstats *out);

#endif
