/*
 * fuzz_checks.c: libFuzzer target of the data path's request checks (checks.c).
 *
 * Input: [proto][readonly|discard bits][max_indirect: 2][dev_sectors: 8][ring indices:
 * 3 x 4][one request slot in that layout][indirect segments...]. The slot and the
 * segments are copied into buffers of exactly their size, so ASan sees any read past
 * them. Every answer is checked against what blkif.h and blkback allow; a request the
 * checks pass must be one the data path can serve without going out of bounds.
 * Build and run: tests/fuzz/run_fuzzers.py.
 */
#include <stdlib.h>
#include <string.h>

#include "datapath.h"

#define REQUIRE(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static size_t slot_size(int proto)
{
    switch (proto) {
    case TD_PROTO_X86_32:
        return sizeof(blkif_x86_32_request_t);
    case TD_PROTO_X86_64:
        return sizeof(blkif_x86_64_request_t);
    default:
        return sizeof(blkif_request_t);
    }
}

static void check_segs_ok(const struct td_req *r, const struct td_seg *segs, unsigned n,
                          uint64_t dev_sectors)
{
    uint64_t sum = 0;
    for (unsigned i = 0; i < n; i++) {
        REQUIRE(segs[i].first_sect <= segs[i].last_sect);
        REQUIRE(segs[i].last_sect < TD_SECTORS_PER_PAGE);
        sum += segs[i].last_sect - segs[i].first_sect + 1u;
    }
    REQUIRE(r->nr_sectors == sum);
    if (sum) {
        REQUIRE(r->sector_number <= dev_sectors);
        REQUIRE(sum <= dev_sectors - r->sector_number);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    enum { HDR = 1 + 1 + 2 + 8 + 12 };
    if (size < HDR)
        return 0;
    int proto = TD_PROTO_NATIVE + data[0] % 3;
    int readonly = data[1] & 1, discard = (data[1] >> 1) & 1;
    uint32_t max_indirect;
    uint64_t dev_sectors;
    uint32_t idx[3];
    memcpy(&max_indirect, data + 2, 2);
    max_indirect &= 0xffff;
    memcpy(&dev_sectors, data + 4, 8);
    memcpy(idx, data + 12, 12);
    data += HDR;
    size -= HDR;

    /* Ring indices: req_prod sane, past the ring, or behind what was taken. */
    uint32_t nslots = 32u << (idx[2] % 4);
    int prod = td_ring_prod_check(idx[0], idx[1], idx[2], nslots);
    uint32_t ahead = idx[0] - idx[2], taken = idx[1] - idx[2];
    REQUIRE(prod == (ahead > nslots ? TD_PROD_PAST_RING
                     : ahead < taken ? TD_PROD_BEHIND : TD_PROD_OK));

    size_t ssize = slot_size(proto);
    if (size < ssize)
        return 0;
    void *slot = malloc(ssize);
    memcpy(slot, data, ssize);
    data += ssize;
    size -= ssize;
    struct td_req r;
    td_req_fetch(proto, slot, &r);
    free(slot);

    int rc = td_req_check(&r, dev_sectors, readonly, discard, max_indirect);
    REQUIRE(rc >= TD_OK && rc < TD_ERR_MAX);
    if (rc != TD_OK)
        return 0;
    switch (r.operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
        REQUIRE(r.nr_segments >= 1 && r.nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST);
        REQUIRE(r.operation == BLKIF_OP_READ || !readonly);
        check_segs_ok(&r, r.seg, r.nr_segments, dev_sectors);
        break;
    case BLKIF_OP_WRITE_BARRIER:
        REQUIRE(r.nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST && !readonly);
        check_segs_ok(&r, r.seg, r.nr_segments, dev_sectors);
        break;
    case BLKIF_OP_FLUSH_DISKCACHE:
        REQUIRE(r.nr_segments == 0);
        break;
    case BLKIF_OP_DISCARD:
        REQUIRE(discard && !readonly);
        REQUIRE(r.sector_number <= dev_sectors &&
                r.nr_sectors <= dev_sectors - r.sector_number);
        break;
    case BLKIF_OP_INDIRECT: {
        REQUIRE(max_indirect > 0);
        REQUIRE(r.indirect_op == BLKIF_OP_READ || r.indirect_op == BLKIF_OP_WRITE);
        REQUIRE(r.nr_segments >= 1 && r.nr_segments <= max_indirect &&
                r.nr_segments <= TD_MAX_INDIRECT_SEGS);
        REQUIRE(td_rsp_operation(&r) == r.indirect_op);
        /* The data path copies exactly nr_segments segments: so does this. */
        struct td_seg *segs = calloc(r.nr_segments, sizeof(*segs));
        memcpy(segs, data, size < r.nr_segments * sizeof(*segs) ? size
                                                                 : r.nr_segments * sizeof(*segs));
        if (td_req_check_segs(&r, segs, dev_sectors, readonly) == TD_OK) {
            REQUIRE(r.indirect_op == BLKIF_OP_READ || !readonly);
            check_segs_ok(&r, segs, r.nr_segments, dev_sectors);
        }
        free(segs);
        break;
    }
    default:
        REQUIRE(0);     /* an unknown operation passed */
    }
    return 0;
}
