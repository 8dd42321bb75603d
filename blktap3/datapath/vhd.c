/*
 * vhd.c: the VHD image driver: fixed, dynamic and differencing chains.
 *
 * The layout of every file of the chain was measured and validated by the Python
 * format module (blktap3/datapath/vhdformat.py) and arrives as td_vhd_layer_desc;
 * here the BATs are read once and every entry is checked again against that layout
 * (the file may have changed in between), sector bitmaps are read on first use and
 * cached, and requests are served with no Python:
 *
 *  - td_vhd_map, the hot path: a request inside one block that one layer holds
 *    entirely (bitmap all ones) is one extent of one file, queued on the io engine as
 *    a raw request is;
 *  - td_vhd_io, everything else, synchronously in the caller's thread: reads that
 *    fall through to parents sector by sector, unallocated sectors read as zeros,
 *    writes that set bitmap bits or allocate a block in the leaf.
 *
 * Allocation is ordered so that a crash at any point leaves a valid image: the footer
 * is first written at the new end of the file (the file has a valid footer at its end
 * throughout), then the block's bitmap and data, then fdatasync, and only then the BAT
 * entry that makes the block part of the disk. A crash before the BAT write leaves an
 * unreferenced tail (space, not damage). A write acknowledged before a FLUSH may be
 * lost, as on any disk; FLUSH (fdatasync of the leaf) makes all of it durable, BAT and
 * bitmaps included, since metadata is written with pwrite, never cached dirty here.
 * Parents are opened read-only and never written: several leaves may share them.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datapath.h"

#define VHD_UNUSED 0xFFFFFFFFu
#define VHD_FIXED 2u
#define VHD_DIFF 4u
#define VHD_ALIGN 4096u     /* blocks are placed where their data is page aligned */

enum { BM_UNKNOWN = 0, BM_FULL = 1, BM_PARTIAL = 2 };

struct td_vhd_layer {
    int fd;
    uint32_t type;
    uint32_t spb_shift;     /* sectors per block, as a shift */
    uint32_t bm_bytes;      /* a block's bitmap, padded to sectors */
    uint64_t sectors;
    uint64_t table_offset;
    uint64_t data_start;
    uint64_t footer_offset;
    uint32_t nbat;
    uint32_t *bat;          /* big-endian, as on disk: a BAT sector is written from it */
    uint8_t *state;         /* BM_* per block */
    uint8_t **bm;           /* the bitmaps of BM_PARTIAL blocks */
};

struct td_vhd {
    uint32_t n;
    struct td_vhd_layer *l; /* [0] is the leaf */
    char *footer;           /* the leaf's footer, rewritten at each new end */
    char *bmbuf;            /* scratch: a bitmap being read or written */
    /* The queues of a multi-queue VBD are served by one thread each on this one chain:
     * the caches, the footer and the scratch bitmap are shared, and a new block must be
     * placed by one thread at a time. Held by each td_vhd_* entry point below. */
    pthread_mutex_t lock;
    int sync_failed;        /* an allocation's fdatasync failed (td_sync) */
};

static void *aligned(size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, VHD_ALIGN, len ? len : 512) != 0)
        return NULL;
    memset(p, 0, len ? len : 512);
    return p;
}

static uint32_t bat_get(const struct td_vhd_layer *l, uint64_t blk)
{
    return blk < l->nbat ? be32toh(l->bat[blk]) : VHD_UNUSED;
}

static int bm_test(const uint8_t *bm, uint32_t i)
{
    return bm[i >> 3] & (0x80 >> (i & 7));
}

static void bm_set(uint8_t *bm, uint32_t i)
{
    bm[i >> 3] |= (uint8_t)(0x80 >> (i & 7));
}

static int bm_full(const uint8_t *bm, uint32_t bits)
{
    for (uint32_t i = 0; i < bits / 8; i++)
        if (bm[i] != 0xff)
            return 0;
    return 1;
}

static uint64_t block_off(const struct td_vhd_layer *l, uint64_t blk)
{
    return (uint64_t)bat_get(l, blk) << TD_SECTOR_SHIFT;
}

/* Make a block's bitmap state known (one read, then cached). */
static int load_bitmap(struct td_vhd *v, struct td_vhd_layer *l, uint64_t blk)
{
    if (l->state[blk] != BM_UNKNOWN)
        return 0;
    int rc = td_pio(l->fd, 0, v->bmbuf, l->bm_bytes, block_off(l, blk));
    if (rc)
        return rc;
    if (bm_full((uint8_t *)v->bmbuf, 1u << l->spb_shift)) {
        l->state[blk] = BM_FULL;
        return 0;
    }
    uint8_t *bm = aligned(l->bm_bytes);
    if (!bm)
        return -ENOMEM;
    memcpy(bm, v->bmbuf, l->bm_bytes);
    l->bm[blk] = bm;
    l->state[blk] = BM_PARTIAL;
    return 0;
}

/* Sector `s` of the disk in layer `l`: 1 and its file offset when the layer holds
 * it, 0 when not, or -errno. */
static int locate(struct td_vhd *v, struct td_vhd_layer *l, uint64_t s, uint64_t *off)
{
    if (s >= l->sectors)
        return 0;   /* a parent smaller than the child: zeros beyond it */
    if (l->type == VHD_FIXED) {
        *off = s << TD_SECTOR_SHIFT;
        return 1;
    }
    uint64_t blk = s >> l->spb_shift;
    if (bat_get(l, blk) == VHD_UNUSED)
        return 0;
    int rc = load_bitmap(v, l, blk);
    if (rc)
        return rc;
    uint32_t idx = (uint32_t)(s & ((1u << l->spb_shift) - 1));
    if (l->state[blk] == BM_PARTIAL && !bm_test(l->bm[blk], idx))
        return 0;
    *off = block_off(l, blk) + l->bm_bytes + ((uint64_t)idx << TD_SECTOR_SHIFT);
    return 1;
}

/* Where the chain holds sector `s`: the file (-1: nowhere, zeros) and offset. */
static int find(struct td_vhd *v, uint64_t s, int *fd, uint64_t *off)
{
    *fd = -1;
    *off = 0;
    for (uint32_t k = 0; k < v->n; k++) {
        int rc = locate(v, &v->l[k], s, off);
        if (rc < 0)
            return rc;
        if (rc) {
            *fd = v->l[k].fd;
            return 0;
        }
    }
    return 0;
}

static int vhd_map(struct td_vhd *v, int write, uint64_t sector, uint32_t nr, uint64_t *off)
{
    uint32_t top = write ? 1 : v->n;
    for (uint32_t i = 0; i < top; i++) {
        struct td_vhd_layer *l = &v->l[i];
        if (l->type == VHD_FIXED) {
            if (sector + nr > l->sectors)
                return -1;
            *off = sector << TD_SECTOR_SHIFT;
            return l->fd;
        }
        uint64_t blk = sector >> l->spb_shift;
        if (((sector + nr - 1) >> l->spb_shift) != blk || sector + nr > l->sectors)
            return -1;
        if (bat_get(l, blk) == VHD_UNUSED)
            continue;   /* reads look further down the chain */
        if (l->state[blk] != BM_FULL)
            return -1;
        *off = block_off(l, blk) + l->bm_bytes +
               ((sector & ((1u << l->spb_shift) - 1)) << TD_SECTOR_SHIFT);
        return l->fd;
    }
    return -1;
}

static int vhd_read(struct td_vhd *v, char *buf, uint64_t sector, uint32_t nr)
{
    /* Runs of sectors that live contiguously in one file become one pread. */
    uint32_t i = 0;
    while (i < nr) {
        int fd, nfd;
        uint64_t off, next;
        int rc = find(v, sector + i, &fd, &off);
        if (rc)
            return rc;
        uint32_t run = 1;
        for (; i + run < nr; run++) {
            if ((rc = find(v, sector + i + run, &nfd, &next)) != 0)
                return rc;
            if (nfd != fd || (fd >= 0 && next != off + ((uint64_t)run << TD_SECTOR_SHIFT)))
                break;
        }
        char *dst = buf + ((size_t)i << TD_SECTOR_SHIFT);
        size_t len = (size_t)run << TD_SECTOR_SHIFT;
        if (fd < 0)
            memset(dst, 0, len);
        else if ((rc = td_pio(fd, 0, dst, len, off)) != 0)
            return rc;
        i += run;
    }
    return 0;
}

/* The leaf's block `blk` does not exist: place it at the end, in crash-safe order. */
static int allocate(struct td_vhd *v, uint64_t blk, const char *buf, uint32_t idx,
                    uint32_t nr, int diff)
{
    struct td_vhd_layer *l = &v->l[0];
    uint64_t bsize = (uint64_t)1 << (l->spb_shift + TD_SECTOR_SHIFT);
    uint64_t start = l->footer_offset > l->data_start ? l->footer_offset : l->data_start;
    uint64_t at = ((start + l->bm_bytes + VHD_ALIGN - 1) & ~(uint64_t)(VHD_ALIGN - 1)) -
                  l->bm_bytes;
    uint64_t new_footer = at + l->bm_bytes + bsize;
    if (at >> TD_SECTOR_SHIFT >= VHD_UNUSED)
        return -EFBIG;
    /* 1. A valid footer at the new end first: the file never lacks one. */
    int rc = td_pio(l->fd, 1, v->footer, 512, new_footer);
    if (rc)
        return rc;
    /* 2. Bitmap and data. A dynamic disk's new block is whole (its other sectors read
     * as the zeros of the file's hole); a differencing disk's has only what was
     * written, the rest still comes from the parent. */
    memset(v->bmbuf, diff ? 0 : 0xff, l->bm_bytes);
    for (uint32_t k = 0; diff && k < nr; k++)
        bm_set((uint8_t *)v->bmbuf, idx + k);
    if ((rc = td_pio(l->fd, 1, v->bmbuf, l->bm_bytes, at)) != 0 ||
        (rc = td_pio(l->fd, 1, (void *)buf, (size_t)nr << TD_SECTOR_SHIFT,
                  at + l->bm_bytes + ((uint64_t)idx << TD_SECTOR_SHIFT))) != 0)
        return rc;
    /* 3. Durable before the BAT points at it. A failure also fails every later FLUSH:
     * it may have dropped earlier acknowledged writes (td_sync). */
    if ((rc = td_sync(l->fd, &v->sync_failed)) != 0)
        return rc;
    /* 4. The BAT entry, in its sector. */
    l->bat[blk] = htobe32((uint32_t)(at >> TD_SECTOR_SHIFT));
    uint64_t first = (blk * 4) & ~(uint64_t)511;
    rc = td_pio(l->fd, 1, (char *)l->bat + first, 512, l->table_offset + first);
    if (rc) {
        l->bat[blk] = htobe32(VHD_UNUSED);
        return rc;
    }
    l->footer_offset = new_footer;
    if (diff) {
        uint8_t *bm = aligned(l->bm_bytes);
        if (!bm)
            return -ENOMEM;
        memcpy(bm, v->bmbuf, l->bm_bytes);
        l->bm[blk] = bm;
        l->state[blk] = bm_full(bm, 1u << l->spb_shift) ? BM_FULL : BM_PARTIAL;
        if (l->state[blk] == BM_FULL) {
            free(bm);
            l->bm[blk] = NULL;
        }
    } else {
        l->state[blk] = BM_FULL;
    }
    return 0;
}

static int vhd_write(struct td_vhd *v, const char *buf, uint64_t sector, uint32_t nr)
{
    struct td_vhd_layer *l = &v->l[0];
    if (l->type == VHD_FIXED)
        return td_pio(l->fd, 1, (void *)buf, (size_t)nr << TD_SECTOR_SHIFT,
                   sector << TD_SECTOR_SHIFT);
    uint32_t spb = 1u << l->spb_shift;
    while (nr) {
        uint64_t blk = sector >> l->spb_shift;
        uint32_t idx = (uint32_t)(sector & (spb - 1));
        uint32_t n = spb - idx < nr ? spb - idx : nr;
        int rc;
        if (bat_get(l, blk) == VHD_UNUSED) {
            rc = allocate(v, blk, buf, idx, n, l->type == VHD_DIFF);
        } else {
            rc = load_bitmap(v, l, blk);
            if (!rc)
                rc = td_pio(l->fd, 1, (void *)buf, (size_t)n << TD_SECTOR_SHIFT,
                         block_off(l, blk) + l->bm_bytes + ((uint64_t)idx << TD_SECTOR_SHIFT));
            if (!rc && l->state[blk] == BM_PARTIAL) {
                /* Data first, then the bits that make it visible. */
                uint8_t *bm = l->bm[blk];
                for (uint32_t k = 0; k < n; k++)
                    bm_set(bm, idx + k);
                rc = td_pio(l->fd, 1, bm, l->bm_bytes, block_off(l, blk));
                if (!rc && bm_full(bm, spb)) {
                    free(bm);
                    l->bm[blk] = NULL;
                    l->state[blk] = BM_FULL;
                }
            }
        }
        if (rc)
            return rc;
        buf += (size_t)n << TD_SECTOR_SHIFT;
        sector += n;
        nr -= n;
    }
    return 0;
}

/* What DISCARD reclaims: the file system's space under the leaf's data of the range
 * (holes punched; the blocks stay in the BAT, their sectors now read as zeros, which
 * also hides what a parent holds there). Never a secure discard: the checks refuse those
 * (no image of ours erases securely). The file does not shrink (a block in the middle
 * cannot go without moving the ones after it), and a parent is never touched: data a
 * snapshot shares cannot be erased from the leaf. */
static int punch(int fd, uint64_t off, uint64_t len)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                     (off_t)len) == 0 ? 0 : -errno;
}

static int vhd_discard(struct td_vhd *v, uint64_t sector, uint64_t nr)
{
    struct td_vhd_layer *l = &v->l[0];
    if (l->type == VHD_FIXED)
        return punch(l->fd, sector << TD_SECTOR_SHIFT, nr << TD_SECTOR_SHIFT);
    uint64_t spb = (uint64_t)1 << l->spb_shift;
    while (nr) {
        uint64_t blk = sector >> l->spb_shift, idx = sector & (spb - 1);
        uint64_t n = spb - idx < nr ? spb - idx : nr;
        if (bat_get(l, blk) != VHD_UNUSED) {
            int rc = punch(l->fd, block_off(l, blk) + l->bm_bytes + (idx << TD_SECTOR_SHIFT),
                           n << TD_SECTOR_SHIFT);
            if (rc)
                return rc;
        }
        sector += n;
        nr -= n;
    }
    return 0;
}

int td_vhd_sync_failed(struct td_vhd *v)
{
    return __atomic_load_n(&v->sync_failed, __ATOMIC_ACQUIRE);
}

int td_vhd_map(struct td_vhd *v, int write, uint64_t sector, uint32_t nr, uint64_t *off)
{
    pthread_mutex_lock(&v->lock);
    int rc = vhd_map(v, write, sector, nr, off);
    pthread_mutex_unlock(&v->lock);
    return rc;
}

int td_vhd_discard(struct td_vhd *v, uint64_t sector, uint64_t nr)
{
    pthread_mutex_lock(&v->lock);
    int rc = vhd_discard(v, sector, nr);
    pthread_mutex_unlock(&v->lock);
    return rc;
}

int td_vhd_io(struct td_vhd *v, int write, void *buf, uint64_t sector, uint32_t nr)
{
    pthread_mutex_lock(&v->lock);
    int rc = write ? vhd_write(v, buf, sector, nr) : vhd_read(v, buf, sector, nr);
    pthread_mutex_unlock(&v->lock);
    return rc;
}

static void layer_close(struct td_vhd_layer *l)
{
    if (l->fd >= 0)
        close(l->fd);
    if (l->bm) {
        for (uint32_t b = 0; b < l->nbat; b++)
            free(l->bm[b]);
    }
    free(l->bm);
    free(l->state);
    free(l->bat);
}

void td_vhd_close(struct td_vhd *v)
{
    if (!v)
        return;
    for (uint32_t i = 0; i < v->n; i++)
        layer_close(&v->l[i]);
    free(v->l);
    free(v->footer);
    free(v->bmbuf);
    pthread_mutex_destroy(&v->lock);
    free(v);
}

static int open_fd(const char *path, int readonly, int o_direct, int *direct)
{
    int flags = (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC;
    if (o_direct) {
        int fd = open(path, flags | O_DIRECT);
        if (fd >= 0)
            return fd;
        if (errno != EINVAL)
            return -errno;
    }
    *direct = 0;
    int fd = open(path, flags);
    return fd >= 0 ? fd : -errno;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* No two blocks share a sector: a write to one would show through the other. */
static int blocks_apart(const struct td_vhd_layer *l, uint64_t span)
{
    uint32_t *used = malloc(((size_t)l->nbat ? l->nbat : 1) * sizeof(*used));
    if (!used)
        return -ENOMEM;
    uint32_t n = 0;
    for (uint32_t b = 0; b < l->nbat; b++)
        if (bat_get(l, b) != VHD_UNUSED)
            used[n++] = bat_get(l, b);
    qsort(used, n, sizeof(*used), cmp_u32);
    int rc = 0;
    for (uint32_t i = 1; i < n && !rc; i++)
        if (((uint64_t)(used[i] - used[i - 1]) << TD_SECTOR_SHIFT) < span)
            rc = -EINVAL;
    free(used);
    return rc;
}

static int layer_open(struct td_vhd_layer *l, const struct td_vhd_layer_desc *d,
                      int readonly, int o_direct, int *direct)
{
    l->type = d->type;
    l->sectors = d->sectors;
    l->fd = open_fd(d->path, readonly, o_direct, direct);
    if (l->fd < 0)
        return l->fd;
    if (d->type == VHD_FIXED)
        return 0;
    uint32_t bs = d->block_size;
    if (bs < 4096 || bs > (2u << 20) || (bs & (bs - 1)) || d->table_offset % 512 ||
        d->bitmap_size != (((bs >> TD_SECTOR_SHIFT) / 8 + 511) & ~511u))
        return -EINVAL;
    l->spb_shift = (uint32_t)__builtin_ctz(bs) - TD_SECTOR_SHIFT;
    l->bm_bytes = d->bitmap_size;
    l->table_offset = d->table_offset;
    l->data_start = d->data_start;
    l->footer_offset = d->footer_offset;
    l->nbat = d->max_entries;
    if ((uint64_t)l->nbat << l->spb_shift < l->sectors)
        return -EINVAL;
    size_t bat_bytes = ((size_t)l->nbat * 4 + 511) & ~(size_t)511;
    l->bat = aligned(bat_bytes);
    l->state = calloc(l->nbat ? l->nbat : 1, 1);
    l->bm = calloc(l->nbat ? l->nbat : 1, sizeof(*l->bm));
    if (!l->bat || !l->state || !l->bm)
        return -ENOMEM;
    int rc = td_pio(l->fd, 0, l->bat, bat_bytes, l->table_offset);
    if (rc)
        return rc;
    /* The checks the format module made, again on what we read now: a block lies
     * between the metadata and the footer, within the disk, and apart from the others. */
    uint64_t span = l->bm_bytes + ((uint64_t)bs);
    for (uint32_t b = 0; b < l->nbat; b++) {
        uint32_t e = bat_get(l, b);
        if (e == VHD_UNUSED)
            continue;
        uint64_t off = (uint64_t)e << TD_SECTOR_SHIFT;
        if (((uint64_t)b << l->spb_shift) >= l->sectors || off < l->data_start ||
            off + span > l->footer_offset)
            return -EINVAL;
    }
    return blocks_apart(l, span);
}

int td_vhd_open(const struct td_vhd_layer_desc *layers, uint32_t n, int readonly,
                int o_direct, struct td_vhd **out, int *fd, int *direct)
{
    if (n == 0 || n > 256)
        return -EINVAL;
    struct td_vhd *v = calloc(1, sizeof(*v));
    if (!v)
        return -ENOMEM;
    pthread_mutex_init(&v->lock, NULL);
    v->l = calloc(n, sizeof(*v->l));
    v->footer = aligned(512);
    v->bmbuf = aligned(512 * 8);
    if (!v->l || !v->footer || !v->bmbuf) {
        td_vhd_close(v);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < n; i++)
        v->l[i].fd = -1;
    *direct = o_direct;
    int rc = 0;
    for (uint32_t i = 0; i < n && !rc; i++) {
        v->n = i + 1;
        rc = layer_open(&v->l[i], &layers[i], i ? 1 : readonly, o_direct, direct);
    }
    if (!rc && v->l[0].type != VHD_FIXED)
        rc = td_pio(v->l[0].fd, 0, v->footer, 512, v->l[0].footer_offset);
    if (rc) {
        td_vhd_close(v);
        return rc;
    }
    *fd = v->l[0].fd;
    *out = v;
    return 0;
}
