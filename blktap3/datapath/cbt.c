/*
 * cbt.c: changed-block tracking, blktap's `log` filter (drivers/block-log.c): one bit
 * per 64 KiB of the disk, in a file mapped shared, after blktap's 48-byte
 * `struct cbt_log_metadata`. A write marks its blocks before it is queued, so before
 * it can be acknowledged; FLUSH makes the bits durable (msync) with the data.
 *
 * The Python side (blktap3/cbt.py) checked the file's header and size before it asks
 * for the mapping here. Bits are set with atomic ORs: the ring's thread and the NBD
 * export's threads mark the same map. Bit n is bit n%8 of byte n/8, which is what
 * blktap's set_bit on x86's little-endian longs amounts to.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "datapath.h"

#define CBT_BLOCK_SECTORS (TD_CBT_BLOCK >> TD_SECTOR_SHIFT)

struct td_cbt {
    uint8_t *map;           /* the whole file mapped */
    size_t len;
    uint8_t *bits;          /* map + offset */
    uint64_t nbits;
};

int td_cbt_open(const char *path, uint64_t offset, uint64_t nbits, struct td_cbt **out)
{
    struct td_cbt *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        free(c);
        return -e;
    }
    c->len = (size_t)(offset + (nbits + 7) / 8);
    c->map = mmap(NULL, c->len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);      /* the mapping holds the file */
    if (c->map == MAP_FAILED) {
        free(c);
        return -e;
    }
    c->bits = c->map + offset;
    c->nbits = nbits;
    *out = c;
    return 0;
}

void td_cbt_close(struct td_cbt *c)
{
    if (!c)
        return;
    munmap(c->map, c->len);
    free(c);
}

void td_cbt_mark(struct td_cbt *c, uint64_t sector, uint64_t nr)
{
    if (!c || !nr)
        return;
    uint64_t first = sector / CBT_BLOCK_SECTORS, last = (sector + nr - 1) / CBT_BLOCK_SECTORS;
    for (uint64_t b = first; b <= last && b < c->nbits; b++) {
        uint8_t bit = (uint8_t)(1u << (b & 7));
        /* Relaxed: the mark only has to be in the map before the ack, which the
         * caller's own ordering (completion, then response) gives. */
        if (!(__atomic_load_n(&c->bits[b >> 3], __ATOMIC_RELAXED) & bit))
            __atomic_fetch_or(&c->bits[b >> 3], bit, __ATOMIC_RELAXED);
    }
}

int td_cbt_sync(struct td_cbt *c)
{
    if (!c)
        return 0;
    return msync(c->map, c->len, MS_SYNC) == 0 ? 0 : -errno;
}
