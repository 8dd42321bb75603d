/* cffi declarations of the guest driver (parsed by cffi; mirrors guestdrv.h). */

struct gd_seg {
    uint32_t gref;
    uint8_t first_sect;
    uint8_t last_sect;
};

/* One request exactly as the test wants it on the ring, sane or not. */
struct gd_raw {
    uint8_t operation;
    uint8_t indirect_op;        /* INDIRECT only */
    uint16_t nr_segments;       /* put as is: 8 bits for direct ops, 16 for INDIRECT */
    uint8_t flag;
    uint16_t handle;
    uint64_t sector_number;
    uint64_t nr_sectors;        /* DISCARD only */
    struct gd_seg seg[11];      /* direct ops */
    /* INDIRECT: segments written into the request's own indirect pages */
    const struct gd_seg *isegs;
    uint32_t nr_isegs;
    /* INDIRECT: 0 names the request's own indirect pages; 1 puts indirect_grefs as is */
    int32_t lie_grefs;
    uint32_t indirect_grefs[8];
};

struct gd_params {
    uint32_t qd;                /* blocks in flight */
    uint32_t bs_sectors;        /* 1 .. 8 * slot_pages */
    uint32_t max_segs;          /* segments per request (0: the ring's); a block is split
                                   into requests of this many pages, INDIRECT beyond 11 */
    uint32_t read_pct;          /* 0 = all writes, 100 = all reads */
    int32_t random;
    uint64_t start;             /* first sector of the region */
    uint64_t span;              /* sectors in the region */
    uint64_t max_ios;           /* 0: until duration_ns */
    uint64_t duration_ns;       /* 0: until max_ios */
    uint64_t seed;
    int32_t verify;             /* writes carry (sector, stamp); reads check it */
    uint64_t stamp;
    uint32_t timeout_ms;        /* no response for this long: give up, count lost */
    uint32_t poll_us;           /* spin this long for responses before sleeping */
};

struct gd_result {
    uint64_t ios;               /* blocks */
    uint64_t requests;          /* ring requests: a block takes one or more */
    uint64_t indirect;          /* of which INDIRECT */
    uint64_t bad_ops;           /* responses whose operation is not the request's */
    uint64_t reads;
    uint64_t writes;
    uint64_t bytes;
    uint64_t errors;            /* responses with a status other than OKAY */
    uint64_t duplicates;        /* a response for an id not in flight */
    uint64_t mismatches;        /* verified reads whose data was wrong */
    uint64_t lost;              /* requests never answered before timeout */
    uint64_t kicks_out;
    uint64_t kicks_in;
    uint64_t elapsed_ns;
    uint64_t p50_ns;
    uint64_t p99_ns;
    uint64_t max_ns;
};

struct gd;
int gd_open(uint32_t backend_domid, uint32_t order, int proto, uint32_t data_slots,
            uint32_t slot_pages, uint32_t max_segs, int data_writable, struct gd **out);
void gd_close(struct gd *g);
uint32_t gd_ring_gref(struct gd *g, uint32_t i);
uint32_t gd_port(struct gd *g);
uint32_t gd_slots(struct gd *g);
void gd_ring_indices(struct gd *g, uint32_t out[6]);
uint32_t gd_data_pages(struct gd *g);
uint32_t gd_data_gref(struct gd *g, uint32_t page);
/* Grant ref of indirect page `page` of request slot `slot` (0: none). */
uint32_t gd_indirect_gref(struct gd *g, uint32_t slot, uint32_t page);
void *gd_data(struct gd *g, uint32_t page);
int gd_run(struct gd *g, const struct gd_params *p, struct gd_result *res);
/* Put `n` raw requests (ids 0..n-1) on the ring, push, notify. Does not wait. */
int gd_submit_raw(struct gd *g, const struct gd_raw *reqs, uint32_t n);
/* Wait until `n` responses came (or timeout); statuses[i] for id i. Returns count. */
int gd_collect(struct gd *g, uint32_t n, int16_t *statuses, uint32_t timeout_ms);
/* The operation field of the responses gd_collect saw, for ids 0..n-1. */
void gd_raw_ops(struct gd *g, uint32_t n, uint8_t *ops);
/* Misbehave: publish a req_prod a whole ring (+ extra) ahead of the responses. */
int gd_overflow(struct gd *g, uint32_t extra);
int gd_revoke(struct gd *g, uint32_t page);
int gd_revoke_indirect(struct gd *g, uint32_t slot, uint32_t page);

struct gd_hostile {
    uint64_t seed;
    uint64_t requests;
    uint64_t disk_sectors;
    uint32_t scribble_pct;
    uint32_t stale_per_mille;   /* of the slots, published without being written */
    uint32_t timeout_ms;
};

struct gd_hostile_result {
    uint64_t requests;
    uint64_t responses;
    uint64_t okay;
    uint64_t errors;
    uint64_t eopnotsupp;
    uint64_t bad_status;        /* a status that is none of blkif's */
    uint64_t bad_ids;           /* an id not in flight, or answered twice */
    uint64_t lost;              /* never answered */
    uint64_t extra;             /* more responses than requests */
    uint64_t scribbles;         /* bytes rewritten in published requests */
    uint64_t stale;             /* slots published without being written */
};
int gd_hostile(struct gd *g, const struct gd_hostile *h, struct gd_hostile_result *res);
