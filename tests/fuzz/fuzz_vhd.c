/*
 * fuzz_vhd.c: libFuzzer target of the VHD driver's metadata handling (vhd.c): the BAT
 * read and re-checked at open, sector bitmaps read and cached on first use, blocks
 * allocated and bitmaps updated by writes, holes punched by DISCARD.
 *
 * vhd.c trusts the layout the format module (vhdformat.py) measured and re-checks
 * every BAT entry against it, since the file may change between the two. This target
 * plays the format module loosely: it reads the layout from the footer and header
 * (no checksums, no overlap checks), so whatever the BAT and bitmaps hold is "changed
 * since it was validated". It then serves a few requests as image.c does (td_vhd_map
 * to a file extent, else td_vhd_io) and requires:
 *  - no memory error (ASan, UBSan), no trap;
 *  - a read returns what the last successful write of those sectors wrote;
 *  - nothing below the leaf's data area changes except BAT sectors; parents never change.
 *
 * Input: [flags][nops][nops x 8-byte op][leaf image][parent image, if flags & 1]
 * image: [u32le size][u8 extents]{[u32le offset][u16le length][bytes]} over zeros
 * (sparse: a seed image of 2 MiB blocks stays small). op: [kind][u32le sector][nr][fill][-]
 * Seeds: corpus/vhd/ (tests/fuzz/make_vhd_corpus.py). Build and run: run_fuzzers.py.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "datapath.h"

#define REQUIRE(cond) do { if (!(cond)) __builtin_trap(); } while (0)
#define MAX_FILE (64u << 20)
#define MAX_OPS 16
#define MAX_NR 64

struct input {
    const uint8_t *p;
    size_t left;
};

static int take(struct input *in, void *out, size_t n)
{
    if (in->left < n)
        return -1;
    memcpy(out, in->p, n);
    in->p += n;
    in->left -= n;
    return 0;
}

/* An image of the input as a memfd; -1 when the input ends early or is too large. */
static int make_file(struct input *in, uint64_t *size)
{
    uint32_t sz;
    uint8_t n;
    if (take(in, &sz, 4) || take(in, &n, 1))
        return -1;
    sz = le32toh(sz);
    if (sz < 512 || sz > MAX_FILE)
        return -1;
    int fd = memfd_create("fuzz-vhd", 0);
    REQUIRE(fd >= 0);
    REQUIRE(ftruncate(fd, sz) == 0);
    for (unsigned i = 0; i < n; i++) {
        uint32_t off;
        uint16_t len;
        if (take(in, &off, 4) || take(in, &len, 2))
            break;
        off = le32toh(off);
        len = le16toh(len);
        if (len > in->left)
            len = (uint16_t)in->left;
        if (off < sz)
            REQUIRE(pwrite(fd, in->p, off + len > sz ? sz - off : len, off) >= 0);
        in->p += len;
        in->left -= len;
    }
    *size = sz;
    return fd;
}

static uint64_t be64_at(int fd, uint64_t off)
{
    uint64_t v = 0;
    return pread(fd, &v, 8, (off_t)off) == 8 ? be64toh(v) : 0;
}

static uint32_t be32_at(int fd, uint64_t off)
{
    uint32_t v = 0;
    return pread(fd, &v, 4, (off_t)off) == 4 ? be32toh(v) : 0;
}

/* The layout as the format module would hand it over, loosely: 0 if usable. */
static int measure(int fd, uint64_t size, char *path, struct td_vhd_layer_desc *d)
{
    uint64_t foot = size - 512;
    memset(d, 0, sizeof(*d));
    snprintf(path, 64, "/proc/self/fd/%d", fd);
    d->path = path;
    d->type = be32_at(fd, foot + 60);
    d->sectors = be64_at(fd, foot + 48) / 512;
    d->footer_offset = foot;
    if (d->sectors > (2040ull << 30) / 512)
        return -1;
    if (d->type == 2)
        return d->sectors * 512 == foot ? 0 : -1;
    if (d->type != 3 && d->type != 4)
        return -1;
    uint64_t hdr = be64_at(fd, foot + 16);
    if (hdr % 512 || hdr < 512 || hdr + 1024 > foot)
        return -1;
    d->table_offset = be64_at(fd, hdr + 16);
    d->max_entries = be32_at(fd, hdr + 28);
    d->block_size = be32_at(fd, hdr + 32);
    uint32_t bs = d->block_size;
    if (bs < 4096 || bs > (2u << 20) || (bs & (bs - 1)))
        return -1;
    d->bitmap_size = ((bs / 512 / 8) + 511) & ~511u;
    uint64_t bat_bytes = ((uint64_t)d->max_entries * 4 + 511) & ~511ull;
    if (d->table_offset % 512 || d->table_offset < 512 || d->table_offset + bat_bytes > foot)
        return -1;
    if (((uint64_t)d->max_entries * (bs / 512)) < d->sectors)
        return -1;
    /* Metadata below the data area: footer copy, header, BAT (in whatever order). */
    uint64_t end = d->table_offset + bat_bytes;
    d->data_start = end > hdr + 1024 ? end : hdr + 1024;
    return d->data_start <= foot ? 0 : -1;
}

struct written {
    uint64_t sector;
    uint32_t nr;
    uint8_t fill;
    int known;
};

static void pattern(uint8_t *buf, uint64_t sector, uint32_t nr, uint8_t fill)
{
    for (uint32_t i = 0; i < nr; i++)
        memset(buf + (size_t)i * 512, fill ^ (uint8_t)(sector + i), 512);
}

/* A request as image.c serves it: one extent of one file, or the synchronous path. */
static int serve(struct td_vhd *v, int write, uint8_t *buf, uint64_t sector, uint32_t nr)
{
    uint64_t off;
    int fd = td_vhd_map(v, write, sector, nr, &off);
    if (fd < 0)
        return td_vhd_io(v, write, buf, sector, nr);
    return td_pio(fd, write, buf, (size_t)nr * 512, off);
}

static uint8_t *snapshot(int fd, uint64_t len)
{
    uint8_t *copy = malloc(len ? len : 1);
    REQUIRE(copy && pread(fd, copy, len, 0) == (ssize_t)len);
    return copy;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = { data, size };
    uint8_t flags, nops, ops[MAX_OPS][8];
    if (take(&in, &flags, 1) || take(&in, &nops, 1))
        return 0;
    nops %= MAX_OPS + 1;
    if (take(&in, ops, (size_t)nops * 8))
        return 0;
    int fds[2] = { -1, -1 };
    uint64_t sizes[2];
    unsigned n = (flags & 1) ? 2 : 1;
    struct td_vhd_layer_desc desc[2];
    char paths[2][64];
    int usable = 1;
    for (unsigned i = 0; i < n && usable; i++) {
        fds[i] = make_file(&in, &sizes[i]);
        usable = fds[i] >= 0 && measure(fds[i], sizes[i], paths[i], &desc[i]) == 0;
    }
    if (usable && n == 2 && desc[0].type != 4)
        usable = 0;     /* only a differencing disk has a parent */
    if (!usable) {
        for (unsigned i = 0; i < n; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        return 0;
    }
    uint64_t meta = desc[0].type == 2 ? 0 : desc[0].data_start;
    uint8_t *meta_before = snapshot(fds[0], meta);
    uint8_t *parent_before = n == 2 ? snapshot(fds[1], sizes[1]) : NULL;

    struct td_vhd *v = NULL;
    int fd, direct;
    int rc = td_vhd_open(desc, n, 0, 0, &v, &fd, &direct);
    REQUIRE(rc <= 0);
    if (rc == 0) {
        REQUIRE(v && fd >= 0);
        static uint8_t buf[MAX_NR * 512], want[MAX_NR * 512];
        struct written w[MAX_OPS];
        unsigned nw = 0;
        uint64_t sectors = desc[0].sectors;
        for (unsigned k = 0; k < nops && sectors; k++) {
            uint32_t s32;
            memcpy(&s32, ops[k] + 1, 4);
            uint64_t sector = le32toh(s32) % sectors;
            uint32_t nr = 1u + ops[k][5] % MAX_NR;
            if (nr > sectors - sector)
                nr = (uint32_t)(sectors - sector);
            switch (ops[k][0] % 3) {
            case 0:     /* write */
                pattern(buf, sector, nr, ops[k][6]);
                rc = serve(v, 1, buf, sector, nr);
                w[nw++] = (struct written){ sector, nr, ops[k][6], rc == 0 };
                break;
            case 1:     /* read: the last write of each sector, if it succeeded */
                if (serve(v, 0, buf, sector, nr) != 0)
                    break;
                for (uint32_t i = 0; i < nr; i++) {
                    uint64_t s = sector + i;
                    for (unsigned j = nw; j-- > 0;) {
                        if (s < w[j].sector || s >= w[j].sector + w[j].nr)
                            continue;
                        if (w[j].known) {
                            pattern(want, s, 1, w[j].fill);
                            REQUIRE(memcmp(buf + (size_t)i * 512, want, 512) == 0);
                        }
                        break;
                    }
                }
                break;
            default:    /* discard: what it covers is no longer known */
                td_vhd_discard(v, sector, nr);
                w[nw++] = (struct written){ sector, nr, 0, 0 };
                break;
            }
        }
        td_vhd_close(v);
    }
    /* The leaf's metadata: only BAT sectors may have changed. */
    uint8_t *meta_after = snapshot(fds[0], meta);
    uint64_t bat_end = desc[0].table_offset + (((uint64_t)desc[0].max_entries * 4 + 511) & ~511ull);
    for (uint64_t b = 0; b < meta; b++)
        REQUIRE(meta_after[b] == meta_before[b] || (b >= desc[0].table_offset && b < bat_end));
    if (n == 2) {
        uint8_t *parent_after = snapshot(fds[1], sizes[1]);
        REQUIRE(memcmp(parent_after, parent_before, sizes[1]) == 0);
        free(parent_after);
    }
    free(meta_before);
    free(meta_after);
    free(parent_before);
    for (unsigned i = 0; i < n; i++)
        close(fds[i]);
    return 0;
}
