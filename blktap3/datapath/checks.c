/*
 * checks.c: reading requests out of the shared ring and checking them.
 *
 * The guest is untrusted and can rewrite a slot while we look at it, so a request is
 * first copied whole into private memory (XSA-155) and every check and every later
 * use reads only that copy. Responses are written field by field into their slot so
 * that no stale private bytes leak into the shared page (XSA-216).
 */
#include "datapath.h"

static uint32_t ring_slots(int proto, uint32_t nr_pages)
{
    return TD_RING_SLOTS(proto, nr_pages);
}

const void *td_ring_req_slot(int proto, void *sring, uint32_t nr_pages, uint32_t idx)
{
    uint32_t i = idx & (ring_slots(proto, nr_pages) - 1);
    switch (proto) {
    case TD_PROTO_X86_32:
        return &((struct blkif_x86_32_sring *)sring)->ring[i].req;
    case TD_PROTO_X86_64:
        return &((struct blkif_x86_64_sring *)sring)->ring[i].req;
    default:
        return &((struct blkif_sring *)sring)->ring[i].req;
    }
}

void td_ring_put_rsp(int proto, void *sring, uint32_t nr_pages, uint32_t idx,
                     uint64_t id, uint8_t op, int16_t status)
{
    uint32_t i = idx & (ring_slots(proto, nr_pages) - 1);
    /* Field by field, never a struct copy: padding must not carry our memory. */
    switch (proto) {
    case TD_PROTO_X86_32: {
        blkif_x86_32_response_t *rsp = &((struct blkif_x86_32_sring *)sring)->ring[i].rsp;
        rsp->id = id;
        rsp->operation = op;
        rsp->status = status;
        break;
    }
    case TD_PROTO_X86_64: {
        blkif_x86_64_response_t *rsp = &((struct blkif_x86_64_sring *)sring)->ring[i].rsp;
        rsp->id = id;
        rsp->operation = op;
        rsp->status = status;
        break;
    }
    default: {
        blkif_response_t *rsp = &((struct blkif_sring *)sring)->ring[i].rsp;
        rsp->id = id;
        rsp->operation = op;
        rsp->status = status;
        break;
    }
    }
}

/* Normalise one layout's private copy; a macro because the three differ only in type. */
#define TD_NORMALISE(REQ_T, DISCARD_T, INDIRECT_T, src, out)                          \
    do {                                                                              \
        REQ_T copy;                                                                   \
        memcpy(&copy, (src), sizeof(copy));                                           \
        /* From here on only `copy` is read: the guest may change the slot now. */    \
        __atomic_signal_fence(__ATOMIC_SEQ_CST);                                      \
        (out)->operation = copy.operation;                                            \
        (out)->handle = copy.handle;                                                  \
        (out)->id = copy.id;                                                          \
        (out)->sector_number = copy.sector_number;                                    \
        if (copy.operation == BLKIF_OP_DISCARD) {                                     \
            const DISCARD_T *d = (const DISCARD_T *)(const void *)&copy;              \
            (out)->flag = d->flag;                                                    \
            (out)->nr_sectors = d->nr_sectors;                                        \
            (out)->nr_segments = 0;                                                   \
        } else if (copy.operation == BLKIF_OP_INDIRECT) {                             \
            /* Its own view: id, sector_number and handle sit elsewhere in it. */     \
            const INDIRECT_T *ind = (const INDIRECT_T *)(const void *)&copy;          \
            (out)->indirect_op = ind->indirect_op;                                    \
            (out)->nr_segments = ind->nr_segments;                                    \
            (out)->handle = ind->handle;                                              \
            (out)->id = ind->id;                                                      \
            (out)->sector_number = ind->sector_number;                                \
            for (unsigned i_ = 0; i_ < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i_++)    \
                (out)->indirect_grefs[i_] = ind->indirect_grefs[i_];                  \
        } else {                                                                      \
            unsigned n_ = copy.nr_segments;                                           \
            (out)->nr_segments = copy.nr_segments;                                    \
            if (n_ > BLKIF_MAX_SEGMENTS_PER_REQUEST)                                  \
                n_ = BLKIF_MAX_SEGMENTS_PER_REQUEST;                                  \
            for (unsigned i_ = 0; i_ < n_; i_++) {                                    \
                (out)->seg[i_].gref = copy.seg[i_].gref;                              \
                (out)->seg[i_].first_sect = copy.seg[i_].first_sect;                  \
                (out)->seg[i_].last_sect = copy.seg[i_].last_sect;                    \
            }                                                                         \
        }                                                                             \
    } while (0)

void td_req_fetch(int proto, const void *slot, struct td_req *out)
{
    memset(out, 0, sizeof(*out));
    switch (proto) {
    case TD_PROTO_X86_32:
        TD_NORMALISE(blkif_x86_32_request_t, struct blkif_x86_32_request_discard,
                     struct blkif_x86_32_request_indirect, slot, out);
        break;
    case TD_PROTO_X86_64:
        TD_NORMALISE(blkif_x86_64_request_t, struct blkif_x86_64_request_discard,
                     struct blkif_x86_64_request_indirect, slot, out);
        break;
    default:
        TD_NORMALISE(blkif_request_t, blkif_request_discard_t, blkif_request_indirect_t, slot,
                     out);
        break;
    }
}

int td_ring_prod_check(uint32_t rp, uint32_t req_cons, uint32_t rsp_prod_pvt,
                       uint32_t nslots)
{
    /* Unsigned distances from the oldest unanswered request: wrap-safe over 2^32. */
    RING_IDX ahead = rp - rsp_prod_pvt, taken = req_cons - rsp_prod_pvt;
    if (ahead > nslots)
        return TD_PROD_PAST_RING;   /* RING_REQUEST_PROD_OVERFLOW */
    if (ahead < taken)
        return TD_PROD_BEHIND;      /* a producer index never moves back */
    return TD_PROD_OK;
}

static int range_ok(uint64_t start, uint64_t count, uint64_t dev_sectors)
{
    /* Written so that start + count cannot wrap. */
    return start <= dev_sectors && count <= dev_sectors - start;
}

/*
 * What every request that moves data gets, direct or indirect, in blkback's order: each
 * segment within its page (first_sect <= last_sect <= 7), then (xen_vbd_translate) no
 * write to a read-only VBD and the range within the device. `op` is the operation the
 * data moves for (an INDIRECT request's indirect_op).
 */
static int check_data(struct td_req *r, uint8_t op, const struct td_seg *segs, unsigned nseg,
                      uint64_t dev_sectors, int readonly)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < nseg; i++) {
        const struct td_seg *s = &segs[i];
        if (s->first_sect > s->last_sect || s->last_sect >= TD_SECTORS_PER_PAGE)
            return TD_ERR_SECT;
        n += (uint64_t)(s->last_sect - s->first_sect + 1);
    }
    r->nr_sectors = n;
    if (op != BLKIF_OP_READ && op != BLKIF_OP_FLUSH_DISKCACHE && readonly)
        return TD_ERR_READONLY;
    /* As blkback's xen_vbd_translate: only a request that moves data has a range; a
     * flush or an empty barrier carries whatever sector_number the front-end left. */
    if (n && !range_ok(r->sector_number, n, dev_sectors))
        return TD_ERR_RANGE;
    return TD_OK;
}

int td_req_check(struct td_req *r, uint64_t dev_sectors, int readonly, int discard,
                 uint32_t max_indirect)
{
    switch (r->operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_WRITE_BARRIER:
    case BLKIF_OP_FLUSH_DISKCACHE: {
        int rw = r->operation == BLKIF_OP_READ || r->operation == BLKIF_OP_WRITE;
        if (r->nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST || (rw && r->nr_segments == 0))
            return TD_ERR_NSEG;
        if (r->operation == BLKIF_OP_FLUSH_DISKCACHE && r->nr_segments != 0)
            return TD_ERR_NSEG;
        return check_data(r, r->operation, r->seg, r->nr_segments, dev_sectors, readonly);
    }
    case BLKIF_OP_DISCARD:
        if (readonly)
            return TD_ERR_READONLY;
        if (!discard)
            return TD_ERR_UNSUPPORTED;
        /* No image of ours erases securely (a punched hole, even zeroes written through
         * a file system, may leave the old data on the medium), so discard-secure is
         * never offered and a secure discard is refused, as blkback without it does. */
        if (r->flag & BLKIF_DISCARD_SECURE)
            return TD_ERR_UNSUPPORTED;
        if (!range_ok(r->sector_number, r->nr_sectors, dev_sectors))
            return TD_ERR_RANGE;
        return TD_OK;
    case BLKIF_OP_INDIRECT:
        /* Not advertised (no feature-max-indirect-segments): blkif.h says EOPNOTSUPP. */
        if (max_indirect == 0)
            return TD_ERR_UNSUPPORTED;
        /* blkback's dispatch_rw_block_io: only reads and writes travel indirect... */
        if (r->indirect_op != BLKIF_OP_READ && r->indirect_op != BLKIF_OP_WRITE)
            return TD_ERR_INDIRECT_OP;
        /* ...with 1 to the offered number of segments (which bounds the pages). */
        if (r->nr_segments == 0 || r->nr_segments > max_indirect ||
            r->nr_segments > TD_MAX_INDIRECT_SEGS)
            return TD_ERR_INDIRECT_NSEG;
        r->nr_sectors = 0;  /* known once the segments are: td_req_check_segs */
        return TD_OK;
    default:
        return TD_ERR_OP;
    }
}

int td_req_check_segs(struct td_req *r, const struct td_seg *segs, uint64_t dev_sectors,
                      int readonly)
{
    /* Only after td_req_check passed the header: nr_segments is then 1..max_indirect,
     * the size of `segs`, and indirect_op READ or WRITE. */
    return check_data(r, r->indirect_op, segs, r->nr_segments, dev_sectors, readonly);
}

int td_req_check_align(const struct td_req *r, const struct td_seg *segs, uint32_t sector_size)
{
    /* A power of two from 512 (the image driver's word); anything else aligns nothing. */
    uint32_t mask = sector_size >= 512 && !(sector_size & (sector_size - 1))
                        ? sector_size / 512 - 1 : 0;
    if (mask == 0 || r->nr_sectors == 0)
        return TD_OK;   /* 512-byte blocks, or nothing moves (a flush, an empty barrier) */
    /* blkback's "Misaligned I/O request": the start and every segment in whole blocks. */
    if (r->sector_number & mask)
        return TD_ERR_SECT;
    for (unsigned i = 0; i < r->nr_segments; i++)
        if ((uint32_t)(segs[i].last_sect - segs[i].first_sect + 1) & mask)
            return TD_ERR_SECT;
    return TD_OK;
}

uint8_t td_rsp_operation(const struct td_req *r)
{
    return r->operation == BLKIF_OP_INDIRECT ? r->indirect_op : r->operation;
}
