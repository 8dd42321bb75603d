/*
 * guestdrv.c: the simulated guest's blkfront ring driver (see guestdrv.h).
 *
 * Runs in a process that is the guest domain (under xensim), so every page it
 * shares and every event it sends goes through the real libxengntshr/libxenevtchn
 * API, exactly as the back-end sees a real front-end.
 */
#define _GNU_SOURCE
#include "xenring.h"

#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#include "guestdrv.h"

#define GD_SEGS BLKIF_MAX_SEGMENTS_PER_REQUEST
/* Latency histogram: 100 ns buckets up to 6.5 ms, then 10 us buckets up to 662 ms (a
 * 1 MiB request takes milliseconds), then the last bucket. */
#define GD_LAT_FINE 65536u
#define GD_LAT_NS 100u
#define GD_LAT_COARSE 65536u
#define GD_LAT_COARSE_NS 10000u
#define GD_LAT_BUCKETS (GD_LAT_FINE + GD_LAT_COARSE)

/* A block of a workload: one or more ring requests (its parts) over its data pages. */
struct gd_slot {
    int busy;
    uint8_t op;
    uint64_t sector;
    uint32_t nsect;
    uint32_t parts_left;
    int failed;
    uint64_t t0;
};

/* A ring request in flight: its id is (gen << 32) | its index; an INDIRECT one uses this
 * index's indirect pages until it is answered. */
struct gd_req {
    int busy;
    uint32_t gen;
    uint32_t block;
    uint8_t op;             /* what the response must carry: READ or WRITE */
};

struct gd {
    xengntshr_handle *xgs;
    xenevtchn_handle *xce;
    uint32_t backend;
    int proto;
    uint32_t nr_pages, nslots;
    void *sring;
    uint32_t ring_grefs[TD_MAX_RING_PAGES];
    char *data;
    uint32_t *data_grefs;
    uint32_t data_slots, data_pages, slot_pages;
    uint32_t max_segs;          /* per request; > 11: INDIRECT */
    uint32_t ind_pages;         /* indirect pages per ring request (0: never INDIRECT) */
    char *ind;                  /* nslots * ind_pages pages, granted read-only */
    uint32_t *ind_grefs;
    struct gd_req *reqs;        /* nslots */
    uint32_t *free_reqs;
    uint32_t nfree_reqs;
    evtchn_port_t port;
    RING_IDX req_prod_pvt, rsp_cons;
    struct gd_slot *slots;
    uint32_t *lat;
    uint64_t kicks_out, kicks_in;
    int16_t *raw_status;
    uint8_t *raw_op;
    uint32_t raw_got;
    uint64_t poll_ns;
};

struct gd_hdr {
    volatile RING_IDX req_prod, req_event, rsp_prod, rsp_event;
};

static struct gd_hdr *hdr(struct gd *g)
{
    return (struct gd_hdr *)g->sring;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int gd_open(uint32_t backend_domid, uint32_t order, int proto, uint32_t data_slots,
            uint32_t slot_pages, uint32_t max_segs, int data_writable, struct gd **out)
{
    if (slot_pages == 0)
        slot_pages = GD_SEGS;
    if (max_segs == 0)
        max_segs = GD_SEGS;
    if (order > TD_MAX_RING_ORDER || proto < TD_PROTO_NATIVE || proto > TD_PROTO_X86_64 ||
        max_segs > TD_MAX_INDIRECT_SEGS || slot_pages > TD_MAX_INDIRECT_SEGS * 8u)
        return -EINVAL;
    struct gd *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    g->backend = backend_domid;
    g->proto = proto;
    g->nr_pages = 1u << order;
    g->nslots = TD_RING_SLOTS(proto, g->nr_pages);
    if (data_slots == 0 || data_slots > g->nslots)
        data_slots = g->nslots;
    g->data_slots = data_slots;
    g->slot_pages = slot_pages;
    g->data_pages = data_slots * slot_pages;
    g->max_segs = max_segs;
    g->ind_pages = max_segs > GD_SEGS ? TD_INDIRECT_PAGES(max_segs) : 0;
    int rc = -ENOMEM;
    g->slots = calloc(g->nslots, sizeof(*g->slots));
    g->reqs = calloc(g->nslots, sizeof(*g->reqs));
    g->free_reqs = calloc(g->nslots, sizeof(uint32_t));
    g->data_grefs = calloc(g->data_pages, sizeof(uint32_t));
    g->ind_grefs = calloc((size_t)g->nslots * g->ind_pages + 1, sizeof(uint32_t));
    g->lat = calloc(GD_LAT_BUCKETS, sizeof(uint32_t));
    g->raw_status = calloc(g->nslots, sizeof(int16_t));
    g->raw_op = calloc(g->nslots, sizeof(uint8_t));
    if (!g->slots || !g->reqs || !g->free_reqs || !g->data_grefs || !g->ind_grefs || !g->lat ||
        !g->raw_status || !g->raw_op)
        goto fail;

    g->xgs = xengntshr_open(NULL, 0);
    if (!g->xgs)
        goto fail_errno;
    g->sring = xengntshr_share_pages(g->xgs, backend_domid, (int)g->nr_pages, g->ring_grefs, 1);
    if (!g->sring)
        goto fail_errno;
    memset(g->sring, 0, (size_t)g->nr_pages * TD_PAGE_SIZE);
    /* SHARED_RING_INIT: both event indices at 1, so the first request/response kicks. */
    hdr(g)->req_event = 1;
    hdr(g)->rsp_event = 1;
    g->data = xengntshr_share_pages(g->xgs, backend_domid, (int)g->data_pages, g->data_grefs,
                                    data_writable);
    if (!g->data)
        goto fail_errno;
    if (g->ind_pages) {
        /* Writable, as Linux blkfront grants them (grant_foreign_access, readonly 0,
         * persistent or not): a back-end with persistent grants maps them as it maps data
         * pages (writable), and only reads them. */
        g->ind = xengntshr_share_pages(g->xgs, backend_domid, (int)(g->nslots * g->ind_pages),
                                       g->ind_grefs, 1);
        if (!g->ind)
            goto fail_errno;
    }
    g->xce = xenevtchn_open(NULL, 0);
    if (!g->xce)
        goto fail_errno;
    xenevtchn_port_or_error_t p = xenevtchn_bind_unbound_port(g->xce, backend_domid);
    if (p < 0)
        goto fail_errno;
    g->port = (evtchn_port_t)p;
    *out = g;
    return 0;
fail_errno:
    rc = errno ? -errno : -EIO;
fail:
    gd_close(g);
    return rc;
}

void gd_close(struct gd *g)
{
    if (!g)
        return;
    if (g->xce) {
        if (g->port)
            xenevtchn_unbind(g->xce, g->port);
        xenevtchn_close(g->xce);
    }
    if (g->xgs) {
        if (g->data)
            xengntshr_unshare(g->xgs, g->data, g->data_pages);
        if (g->ind)
            xengntshr_unshare(g->xgs, g->ind, g->nslots * g->ind_pages);
        if (g->sring)
            xengntshr_unshare(g->xgs, g->sring, g->nr_pages);
        xengntshr_close(g->xgs);
    }
    free(g->slots);
    free(g->reqs);
    free(g->free_reqs);
    free(g->data_grefs);
    free(g->ind_grefs);
    free(g->lat);
    free(g->raw_status);
    free(g->raw_op);
    free(g);
}

uint32_t gd_ring_gref(struct gd *g, uint32_t i) { return i < g->nr_pages ? g->ring_grefs[i] : 0; }
uint32_t gd_port(struct gd *g) { return g->port; }
uint32_t gd_slots(struct gd *g) { return g->nslots; }
uint32_t gd_data_pages(struct gd *g) { return g->data_pages; }
void gd_ring_indices(struct gd *g, uint32_t out[6])
{
    out[0] = g->req_prod_pvt;
    out[1] = hdr(g)->req_prod;
    out[2] = hdr(g)->req_event;
    out[3] = hdr(g)->rsp_prod;
    out[4] = hdr(g)->rsp_event;
    out[5] = g->rsp_cons;
}
uint32_t gd_data_gref(struct gd *g, uint32_t page)
{
    return page < g->data_pages ? g->data_grefs[page] : 0;
}
void *gd_data(struct gd *g, uint32_t page) { return g->data + (size_t)page * TD_PAGE_SIZE; }
uint32_t gd_indirect_gref(struct gd *g, uint32_t slot, uint32_t page)
{
    return slot < g->nslots && page < g->ind_pages ? g->ind_grefs[slot * g->ind_pages + page]
                                                    : 0;
}

/* Request slot `slot`'s indirect pages: where its segments go. */
static struct blkif_request_segment *ind_segs(struct gd *g, uint32_t slot)
{
    return (struct blkif_request_segment *)(void *)(g->ind +
                                                    (size_t)slot * g->ind_pages * TD_PAGE_SIZE);
}

#define GD_PUT(REQ_T, DISC_T, IND_T, SRING_T)                                       \
    do {                                                                            \
        SRING_T *s_ = g->sring;                                                     \
        REQ_T *q_ = &s_->ring[i].req;                                               \
        if (r->operation == BLKIF_OP_INDIRECT) {                                    \
            IND_T *n_ = (IND_T *)(void *)q_;                                        \
            n_->operation = r->operation;                                           \
            n_->indirect_op = r->indirect_op;                                       \
            n_->nr_segments = r->nr_segments;                                       \
            n_->handle = r->handle;                                                 \
            n_->id = id;                                                            \
            n_->sector_number = r->sector_number;                                   \
            for (unsigned k_ = 0; k_ < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; k_++)  \
                n_->indirect_grefs[k_] = grefs[k_];                                 \
        } else if (r->operation == BLKIF_OP_DISCARD) {                              \
            DISC_T *d_ = (DISC_T *)(void *)q_;                                      \
            d_->operation = r->operation;                                           \
            d_->flag = r->flag;                                                     \
            d_->handle = r->handle;                                                 \
            d_->id = id;                                                            \
            d_->sector_number = r->sector_number;                                   \
            d_->nr_sectors = r->nr_sectors;                                         \
        } else {                                                                    \
            q_->operation = r->operation;                                           \
            q_->nr_segments = (uint8_t)r->nr_segments;                              \
            q_->handle = r->handle;                                                 \
            q_->id = id;                                                            \
            q_->sector_number = r->sector_number;                                   \
            for (unsigned k_ = 0; k_ < GD_SEGS; k_++) {                             \
                q_->seg[k_].gref = r->seg[k_].gref;                                 \
                q_->seg[k_].first_sect = r->seg[k_].first_sect;                     \
                q_->seg[k_].last_sect = r->seg[k_].last_sect;                       \
            }                                                                       \
        }                                                                           \
    } while (0)

/* Put request `r` on the ring as request slot `slot` (whose indirect pages an INDIRECT
 * one uses: its segments are written there first). */
static void put_request(struct gd *g, const struct gd_raw *r, uint32_t slot, uint64_t id)
{
    uint32_t grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST] = {0};
    if (r->operation == BLKIF_OP_INDIRECT) {
        struct blkif_request_segment *dst = ind_segs(g, slot);
        for (uint32_t k = 0; k < r->nr_isegs; k++) {
            dst[k].gref = r->isegs[k].gref;
            dst[k].first_sect = r->isegs[k].first_sect;
            dst[k].last_sect = r->isegs[k].last_sect;
        }
        for (uint32_t k = 0; k < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; k++)
            grefs[k] = r->lie_grefs ? r->indirect_grefs[k] : gd_indirect_gref(g, slot, k);
    }
    uint32_t i = g->req_prod_pvt & (g->nslots - 1);
    switch (g->proto) {
    case TD_PROTO_X86_32:
        GD_PUT(blkif_x86_32_request_t, struct blkif_x86_32_request_discard,
               struct blkif_x86_32_request_indirect, struct blkif_x86_32_sring);
        break;
    case TD_PROTO_X86_64:
        GD_PUT(blkif_x86_64_request_t, struct blkif_x86_64_request_discard,
               struct blkif_x86_64_request_indirect, struct blkif_x86_64_sring);
        break;
    default:
        GD_PUT(blkif_request_t, blkif_request_discard_t, blkif_request_indirect_t,
               struct blkif_sring);
        break;
    }
    g->req_prod_pvt++;
}

static void get_response(struct gd *g, RING_IDX idx, uint64_t *id, uint8_t *op,
                         int16_t *status)
{
    uint32_t i = idx & (g->nslots - 1);
    switch (g->proto) {
    case TD_PROTO_X86_32: {
        blkif_x86_32_response_t *p = &((struct blkif_x86_32_sring *)g->sring)->ring[i].rsp;
        *id = p->id;
        *op = p->operation;
        *status = p->status;
        break;
    }
    case TD_PROTO_X86_64: {
        blkif_x86_64_response_t *p = &((struct blkif_x86_64_sring *)g->sring)->ring[i].rsp;
        *id = p->id;
        *op = p->operation;
        *status = p->status;
        break;
    }
    default: {
        blkif_response_t *p = &((struct blkif_sring *)g->sring)->ring[i].rsp;
        *id = p->id;
        *op = p->operation;
        *status = p->status;
        break;
    }
    }
}

static void push_requests(struct gd *g)
{
    RING_IDX old = hdr(g)->req_prod, new = g->req_prod_pvt;
    if (old == new)
        return;
    /* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY over our own indices. */
    xen_wmb();  /* the back-end sees the requests before the producer index */
    hdr(g)->req_prod = new;
    xen_mb();   /* it sees req_prod before we read its req_event */
    if ((RING_IDX)(new - hdr(g)->req_event) < (RING_IDX)(new - old)) {
        xenevtchn_notify(g->xce, g->port);
        g->kicks_out++;
    }
}

/* Wait for an event or the timeout; returns 0 on timeout. A signal (the guest
 * process's SIGTERM, asking it to detach) is not a timeout: the caller reaps and waits
 * again, so a run never leaves requests in flight because of one. */
static int wait_event(struct gd *g, uint32_t timeout_ms)
{
    struct pollfd pfd = {xenevtchn_fd(g->xce), POLLIN, 0};
    int n = poll(&pfd, 1, (int)timeout_ms);
    if (n < 0 && errno == EINTR)
        return 1;
    if (n <= 0)
        return 0;
    xenevtchn_port_or_error_t p = xenevtchn_pending(g->xce);
    if (p >= 0) {
        xenevtchn_unmask(g->xce, (evtchn_port_t)p);
        g->kicks_in++;
    }
    return 1;
}

typedef void (*gd_on_rsp)(struct gd *g, uint64_t id, uint8_t op, int16_t status, void *ctx);

/* Take every response; RING_FINAL_CHECK_FOR_RESPONSES before returning 0. */
static uint32_t reap(struct gd *g, gd_on_rsp cb, void *ctx)
{
    uint32_t n = 0;
    for (;;) {
        RING_IDX rp = hdr(g)->rsp_prod;
        xen_rmb();  /* read responses only after the index that covers them */
        while (g->rsp_cons != rp) {
            uint64_t id;
            uint8_t op;
            int16_t status;
            get_response(g, g->rsp_cons, &id, &op, &status);
            g->rsp_cons++;
            cb(g, id, op, status, ctx);
            n++;
        }
        if (n)
            return n;
        if (g->poll_ns) {
            /* Polling: rsp_event stays behind, so the back-end does not kick us. */
            uint64_t end = now_ns() + g->poll_ns;
            while (hdr(g)->rsp_prod == g->rsp_cons && now_ns() < end)
                __builtin_ia32_pause();
            if (hdr(g)->rsp_prod != g->rsp_cons)
                continue;
        }
        hdr(g)->rsp_event = g->rsp_cons + 1;
        xen_mb();   /* rsp_event is visible before we look at rsp_prod again */
        if (hdr(g)->rsp_prod == g->rsp_cons)
            return 0;
    }
}

/* ---- workloads ---- */

struct run_ctx {
    const struct gd_params *p;
    struct gd_result *res;
    uint32_t inflight;          /* blocks */
    uint32_t *free_slots;
    uint32_t nfree;
};

static void fill_pattern(char *buf, uint64_t sector, uint32_t nsect, uint64_t stamp)
{
    for (uint32_t s = 0; s < nsect; s++) {
        uint64_t pair[2] = {sector + s, stamp};
        for (unsigned k = 0; k < 512; k += 16)
            memcpy(buf + s * 512 + k, pair, 16);
    }
}

static int check_pattern(const char *buf, uint64_t sector, uint32_t nsect, uint64_t stamp)
{
    for (uint32_t s = 0; s < nsect; s++) {
        uint64_t pair[2] = {sector + s, stamp};
        for (unsigned k = 0; k < 512; k += 16)
            if (memcmp(buf + s * 512 + k, pair, 16) != 0)
                return 0;
    }
    return 1;
}

/*
 * One request over `nsect` sectors of the data pages from `page` on, a page per segment
 * (the last one partly): direct up to 11 segments, INDIRECT beyond (its segments go to
 * the request slot's indirect pages: `isegs` holds them until put_request writes them).
 */
static void build_rw(struct gd *g, uint8_t op, uint64_t sector, uint32_t page, uint32_t nsect,
                     struct gd_raw *r, struct gd_seg *isegs)
{
    memset(r, 0, sizeof(*r));
    uint32_t nseg = (nsect + TD_SECTORS_PER_PAGE - 1) / TD_SECTORS_PER_PAGE;
    int indirect = nseg > GD_SEGS;
    struct gd_seg *segs = indirect ? isegs : r->seg;
    r->operation = indirect ? BLKIF_OP_INDIRECT : op;
    r->indirect_op = indirect ? op : 0;
    r->sector_number = sector;
    r->nr_segments = (uint16_t)nseg;
    for (uint32_t k = 0, left = nsect; k < nseg; k++) {
        uint32_t n = left < TD_SECTORS_PER_PAGE ? left : TD_SECTORS_PER_PAGE;
        segs[k].gref = g->data_grefs[page + k];
        segs[k].first_sect = 0;
        segs[k].last_sect = (uint8_t)(n - 1);
        left -= n;
    }
    if (indirect) {
        r->isegs = isegs;
        r->nr_isegs = nseg;
    }
}

static void take_latency(struct gd *g, struct gd_result *res, uint64_t lat)
{
    uint64_t b = lat / GD_LAT_NS;
    if (b >= GD_LAT_FINE) {
        b = GD_LAT_FINE + (lat - (uint64_t)GD_LAT_FINE * GD_LAT_NS) / GD_LAT_COARSE_NS;
        if (b >= GD_LAT_BUCKETS)
            b = GD_LAT_BUCKETS - 1;
    }
    g->lat[b]++;
    if (lat > res->max_ns)
        res->max_ns = lat;
}

static void on_run_rsp(struct gd *g, uint64_t id, uint8_t op, int16_t status, void *vctx)
{
    struct run_ctx *c = vctx;
    uint32_t ri = (uint32_t)id;
    uint32_t gen = (uint32_t)(id >> 32);
    if (ri >= g->nslots || !g->reqs[ri].busy || g->reqs[ri].gen != gen) {
        c->res->duplicates++;
        return;
    }
    struct gd_req *q = &g->reqs[ri];
    q->busy = 0;
    g->free_reqs[g->nfree_reqs++] = ri;
    struct gd_slot *s = &g->slots[q->block];
    /* blkfront checks this: an INDIRECT request is answered with its indirect_op. */
    if (op != q->op)
        c->res->bad_ops++;
    if (status != BLKIF_RSP_OKAY)
        s->failed = 1;
    if (--s->parts_left)
        return;
    take_latency(g, c->res, now_ns() - s->t0);
    s->busy = 0;
    c->free_slots[c->nfree++] = q->block;
    c->inflight--;
    c->res->ios++;
    if (s->failed) {
        c->res->errors++;
        return;
    }
    c->res->bytes += (uint64_t)s->nsect * 512;
    if (s->op == BLKIF_OP_READ) {
        c->res->reads++;
        if (c->p->verify && !check_pattern(gd_data(g, q->block * g->slot_pages), s->sector,
                                           s->nsect, c->p->stamp))
            c->res->mismatches++;
    } else {
        c->res->writes++;
    }
}

static uint64_t rng_next(uint64_t *x)
{
    /* xorshift64*: cheap and good enough to spread offsets. */
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 2685821657736338717ull;
}

static uint64_t bucket_ns(uint32_t b)
{
    if (b < GD_LAT_FINE)
        return (uint64_t)b * GD_LAT_NS + GD_LAT_NS / 2;
    return (uint64_t)GD_LAT_FINE * GD_LAT_NS + (uint64_t)(b - GD_LAT_FINE) * GD_LAT_COARSE_NS +
           GD_LAT_COARSE_NS / 2;
}

static uint64_t percentile(const uint32_t *lat, uint64_t total, double q)
{
    uint64_t want = (uint64_t)((double)total * q), acc = 0;
    for (uint32_t b = 0; b < GD_LAT_BUCKETS; b++) {
        acc += lat[b];
        if (acc > want)
            return bucket_ns(b);
    }
    return bucket_ns(GD_LAT_BUCKETS - 1);
}

int gd_run(struct gd *g, const struct gd_params *p, struct gd_result *res)
{
    uint32_t max_segs = p->max_segs ? p->max_segs : g->max_segs;
    if (p->bs_sectors == 0 || p->bs_sectors > g->slot_pages * TD_SECTORS_PER_PAGE ||
        p->qd == 0 || p->span < p->bs_sectors || (p->max_ios == 0 && p->duration_ns == 0) ||
        max_segs > g->max_segs)
        return -EINVAL;
    /* A block is split into requests of max_segs pages, as the block layer splits a bio
     * at blkfront's max_hw_sectors; every block in flight must fit the ring at once. */
    uint32_t pages = (p->bs_sectors + TD_SECTORS_PER_PAGE - 1) / TD_SECTORS_PER_PAGE;
    uint32_t parts = (pages + max_segs - 1) / max_segs;
    uint32_t qd = p->qd < g->data_slots ? p->qd : g->data_slots;
    if ((uint64_t)qd * parts > g->nslots)
        return -EINVAL;
    if (g->req_prod_pvt != g->rsp_cons)
        return -EBUSY;      /* raw requests still unanswered */
    memset(res, 0, sizeof(*res));
    memset(g->lat, 0, GD_LAT_BUCKETS * sizeof(uint32_t));
    struct gd_seg *isegs = calloc(max_segs, sizeof(*isegs));
    struct run_ctx c = {p, res, 0, calloc(g->data_slots, sizeof(uint32_t)), 0};
    if (!c.free_slots || !isegs) {
        free(c.free_slots);
        free(isegs);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < qd; i++)
        c.free_slots[c.nfree++] = qd - 1 - i;
    g->nfree_reqs = 0;
    for (uint32_t i = 0; i < g->nslots; i++) {
        g->reqs[i].busy = 0;
        g->free_reqs[g->nfree_reqs++] = g->nslots - 1 - i;
    }
    uint64_t blocks = p->span / p->bs_sectors, issued = 0, seed = p->seed | 1;
    uint64_t kin0 = g->kicks_in, kout0 = g->kicks_out;
    uint64_t t0 = now_ns(), tend = p->duration_ns ? t0 + p->duration_ns : UINT64_MAX;
    uint32_t timeout = p->timeout_ms ? p->timeout_ms : 10000;
    g->poll_ns = (uint64_t)p->poll_us * 1000u;
    int rc = 0;
    for (;;) {
        uint64_t t = now_ns();
        int more = (p->max_ios == 0 || issued < p->max_ios) && t < tend;
        while (more && c.nfree) {
            uint32_t slot = c.free_slots[--c.nfree];
            uint64_t blk = p->random ? rng_next(&seed) % blocks : issued % blocks;
            uint64_t sector = p->start + blk * p->bs_sectors;
            int is_read = p->read_pct >= 100 ||
                          (p->read_pct > 0 && rng_next(&seed) % 100 < p->read_pct);
            uint8_t op = is_read ? BLKIF_OP_READ : BLKIF_OP_WRITE;
            struct gd_slot *s = &g->slots[slot];
            s->busy = 1;
            s->failed = 0;
            s->op = op;
            s->sector = sector;
            s->nsect = p->bs_sectors;
            s->parts_left = parts;
            if (p->verify && !is_read)
                fill_pattern(gd_data(g, slot * g->slot_pages), sector, p->bs_sectors,
                             p->stamp);
            s->t0 = t;
            for (uint32_t k = 0; k < parts; k++) {
                uint32_t first = k * max_segs * TD_SECTORS_PER_PAGE;
                uint32_t n = p->bs_sectors - first;
                if (n > max_segs * TD_SECTORS_PER_PAGE)
                    n = max_segs * TD_SECTORS_PER_PAGE;
                /* Room is certain: qd * parts requests fit the ring. */
                uint32_t ri = g->free_reqs[--g->nfree_reqs];
                struct gd_req *q = &g->reqs[ri];
                q->busy = 1;
                q->gen++;
                q->block = slot;
                q->op = op;
                struct gd_raw r;
                build_rw(g, op, sector + first, slot * g->slot_pages + k * max_segs, n, &r,
                         isegs);
                put_request(g, &r, ri, ((uint64_t)q->gen << 32) | ri);
                res->requests++;
                res->indirect += r.operation == BLKIF_OP_INDIRECT;
            }
            c.inflight++;
            issued++;
            more = p->max_ios == 0 || issued < p->max_ios;
        }
        push_requests(g);
        if (c.inflight == 0 && !more)
            break;
        if (reap(g, on_run_rsp, &c) == 0 && !wait_event(g, timeout)) {
            /* Nothing for `timeout`: whatever is still in flight is lost. */
            res->lost = c.inflight;
            rc = -ETIMEDOUT;
            break;
        }
    }
    g->poll_ns = 0;
    res->elapsed_ns = now_ns() - t0;
    res->kicks_in = g->kicks_in - kin0;
    res->kicks_out = g->kicks_out - kout0;
    res->p50_ns = percentile(g->lat, res->ios, 0.50);
    res->p99_ns = percentile(g->lat, res->ios, 0.99);
    free(c.free_slots);
    free(isegs);
    return rc;
}

/* ---- raw requests (a misbehaving front-end) ---- */

static void on_raw_rsp(struct gd *g, uint64_t id, uint8_t op, int16_t status, void *ctx)
{
    (void)ctx;
    if (id < g->nslots) {
        g->raw_status[id] = status;
        g->raw_op[id] = op;
    }
    g->raw_got++;
}

int gd_submit_raw(struct gd *g, const struct gd_raw *reqs, uint32_t n)
{
    /* Unanswered requests counted wrap-safe: after gd_overflow they exceed the ring,
     * and `nslots - unanswered` would wrap into "room for anything" (raw_status has
     * nslots entries). */
    RING_IDX unanswered = g->req_prod_pvt - g->rsp_cons;
    if (n > g->nslots || unanswered > g->nslots - n)
        return -EBUSY;
    /* Request i uses request slot i's indirect pages: they must hold its segments. */
    for (uint32_t i = 0; i < n; i++)
        if (reqs[i].operation == BLKIF_OP_INDIRECT &&
            reqs[i].nr_isegs > g->ind_pages * TD_SEGS_PER_INDIRECT_PAGE)
            return -EINVAL;
    g->raw_got = 0;
    for (uint32_t i = 0; i < n; i++) {
        g->raw_status[i] = 1;   /* not a blkif status: "no answer yet" */
        g->raw_op[i] = 0xff;
        put_request(g, &reqs[i], i, i);
    }
    push_requests(g);
    return 0;
}

int gd_collect(struct gd *g, uint32_t n, int16_t *statuses, uint32_t timeout_ms)
{
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (g->raw_got < n) {
        if (reap(g, on_raw_rsp, NULL))
            continue;
        uint64_t t = now_ns();
        if (t >= deadline)
            break;
        wait_event(g, (uint32_t)((deadline - t) / 1000000ull) + 1);
    }
    for (uint32_t i = 0; i < n && i < g->nslots; i++)
        statuses[i] = g->raw_status[i];
    return (int)g->raw_got;
}

void gd_raw_ops(struct gd *g, uint32_t n, uint8_t *ops)
{
    for (uint32_t i = 0; i < n && i < g->nslots; i++)
        ops[i] = g->raw_op[i];
}

int gd_overflow(struct gd *g, uint32_t extra)
{
    g->req_prod_pvt = hdr(g)->rsp_prod + g->nslots + 1 + extra;
    xen_wmb();  /* a garbage producer index, published as a real one would be */
    hdr(g)->req_prod = g->req_prod_pvt;
    xen_mb();
    xenevtchn_notify(g->xce, g->port);
    g->kicks_out++;
    return 0;
}

/* ---- hostile mode (blktap3-torture ring) ---- */

/* The bytes of ring slot `i` and their size, for rewriting a published request. */
static unsigned char *slot_bytes(struct gd *g, uint32_t i, size_t *size)
{
    i &= g->nslots - 1;
    switch (g->proto) {
    case TD_PROTO_X86_32:
        *size = sizeof(((struct blkif_x86_32_sring *)g->sring)->ring[0]);
        return (unsigned char *)&((struct blkif_x86_32_sring *)g->sring)->ring[i];
    case TD_PROTO_X86_64:
        *size = sizeof(((struct blkif_x86_64_sring *)g->sring)->ring[0]);
        return (unsigned char *)&((struct blkif_x86_64_sring *)g->sring)->ring[i];
    default:
        *size = sizeof(((struct blkif_sring *)g->sring)->ring[0]);
        return (unsigned char *)&((struct blkif_sring *)g->sring)->ring[i];
    }
}

/* A grant ref as a hostile guest picks it: one of its own (data, indirect pages, and, where the back-end only reads it, the ring itself), none, or anything.
 * A ring page as the buffer of a READ would have the back-end write the disk's bytes
 * over the ring: the guest wrecking its own ring, which only halts it. */
static uint32_t hostile_gref(struct gd *g, uint64_t *x, int ring_ok)
{
    uint64_t r = rng_next(x);
    switch (r % 10) {
    case 0: case 1: case 2: case 3: case 4:
        return g->data_grefs[(r >> 8) % g->data_pages];
    case 5:
        if (ring_ok)
            return g->ring_grefs[(r >> 8) % g->nr_pages];
        return g->data_grefs[(r >> 8) % g->data_pages];
    case 6:
        return g->ind_pages ? g->ind_grefs[(r >> 8) % (g->nslots * g->ind_pages)] : 0;
    case 7:
        return 0;
    default:
        return (uint32_t)(r >> 16);
    }
}

static uint64_t hostile_sector(uint64_t disk_sectors, uint64_t *x)
{
    uint64_t r = rng_next(x);
    switch (r % 5) {
    case 0: case 1:
        return disk_sectors ? (r >> 8) % disk_sectors : 0;
    case 2:
        return disk_sectors - ((r >> 8) % 200);   /* around the end, past it too */
    case 3:
        return rng_next(x);
    default:
        return (r >> 8) % 64;
    }
}

static const uint8_t hostile_ops[] = {
    BLKIF_OP_READ, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
    BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT, BLKIF_OP_INDIRECT, 4,
};

static void hostile_request(struct gd *g, const struct gd_hostile *h, uint64_t *x,
                            struct gd_raw *r, struct gd_seg *isegs, uint32_t icap,
                            int ring_ok)
{
    uint64_t a = rng_next(x), b = rng_next(x);
    memset(r, 0, sizeof(*r));
    r->operation = a % 16 == 0 ? (uint8_t)(a >> 8) : hostile_ops[(a >> 8) % sizeof(hostile_ops)];
    switch ((a >> 16) % 8) {
    case 0:
        r->nr_segments = 0;
        break;
    case 1:
        r->nr_segments = (uint16_t)(b % 256);
        break;
    default:
        r->nr_segments = (uint16_t)(1 + b % GD_SEGS);
        break;
    }
    if (a % 32 == 1)
        r->handle = (uint16_t)(b >> 16);
    r->sector_number = hostile_sector(h->disk_sectors, x);
    for (unsigned k = 0; k < GD_SEGS; k++) {
        uint64_t s = rng_next(x);
        r->seg[k].gref = hostile_gref(g, x, 0);
        /* Mostly a sane sector range in the page, sometimes not. */
        uint8_t first = (uint8_t)(s % 8), last = (uint8_t)(first + (s >> 8) % (8 - first));
        if (s % 8 == 0) {
            first = (uint8_t)(s >> 16) % 16;
            last = (uint8_t)(s >> 24) % 16;
        }
        r->seg[k].first_sect = first;
        r->seg[k].last_sect = last;
    }
    if (r->operation == BLKIF_OP_DISCARD) {
        r->flag = (uint8_t)(b >> 40) % 3;
        r->nr_sectors = b % 4 == 0 ? rng_next(x) : (b >> 8) % 4096;
    }
    if (r->operation == BLKIF_OP_INDIRECT) {
        r->indirect_op = (a >> 24) % 8 == 0 ? (uint8_t)(a >> 32)
                                            : hostile_ops[(a >> 32) % 4];
        uint64_t c = rng_next(x);
        r->nr_segments = c % 4 == 0 ? (uint16_t)(c >> 8) : (uint16_t)((c >> 8) % (icap + 2));
        r->nr_isegs = r->nr_segments < icap ? r->nr_segments : icap;
        for (uint32_t k = 0; k < r->nr_isegs; k++) {
            uint64_t s = rng_next(x);
            isegs[k].gref = hostile_gref(g, x, 0);
            isegs[k].first_sect = (uint8_t)(s % 9);
            isegs[k].last_sect = (uint8_t)((s >> 8) % 9);
        }
        r->isegs = isegs;
        if (c % 3 == 0) {
            r->lie_grefs = 1;
            for (unsigned k = 0; k < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; k++)
                r->indirect_grefs[k] = hostile_gref(g, x, ring_ok);
        }
    }
}

static void on_hostile_rsp(struct gd *g, uint64_t id, uint8_t op, int16_t status, void *ctx)
{
    (void)op;
    struct gd_hostile_result *res = ctx;
    res->responses++;
    if (g->raw_got == UINT32_MAX)
        return;     /* this batch was rewritten while published: ids and statuses are ours */
    if (id >= g->nslots || g->raw_status[id] != 1) {
        res->bad_ids++;
        return;
    }
    g->raw_status[id] = status;
    if (status == BLKIF_RSP_OKAY)
        res->okay++;
    else if (status == BLKIF_RSP_ERROR)
        res->errors++;
    else if (status == BLKIF_RSP_EOPNOTSUPP)
        res->eopnotsupp++;
    else
        res->bad_status++;
}

int gd_hostile(struct gd *g, const struct gd_hostile *h, struct gd_hostile_result *res)
{
    memset(res, 0, sizeof(*res));
    if (g->req_prod_pvt != g->rsp_cons)
        return -EBUSY;  /* requests of another mode still unanswered */
    uint32_t icap = g->ind_pages * TD_SEGS_PER_INDIRECT_PAGE;
    struct gd_seg *isegs = calloc(icap ? icap : 1, sizeof(*isegs));
    if (!isegs)
        return -ENOMEM;
    uint64_t x = h->seed | 1;
    int rc = 0;
    while (res->requests < h->requests) {
        uint64_t left = h->requests - res->requests;
        uint32_t n = 1 + (uint32_t)(rng_next(&x) % g->nslots);
        if (n > left)
            n = (uint32_t)left;
        int scribble = h->scribble_pct && rng_next(&x) % 100 < h->scribble_pct;
        memset(g->raw_status, 0, g->nslots * sizeof(*g->raw_status));
        int stale = 0;
        for (uint32_t i = 0; i < n; i++) {
            if (rng_next(&x) % 1000 < h->stale_per_mille) {
                /* An index jump: publish a slot without writing it, so the back-end
                 * reads whatever it holds (an old request, a response). */
                g->req_prod_pvt++;
                stale = 1;
                res->stale++;
                continue;
            }
            struct gd_raw r;
            /* Not in a batch to be rewritten: a rewritten op could turn the ring page
             * named as an indirect page into the buffer of a READ. */
            hostile_request(g, h, &x, &r, isegs, icap, !scribble);
            g->raw_status[i] = 1;
            put_request(g, &r, i, i);
        }
        uint64_t before = res->responses;
        push_requests(g);
        res->requests += n;
        if (stale)
            g->raw_got = UINT32_MAX;
        if (scribble) {
            /* Rewrite published requests while the back-end may be copying them: it must
             * answer each slot it consumed once, whatever it read. */
            g->raw_got = UINT32_MAX;
            RING_IDX first = g->req_prod_pvt - n;
            for (uint32_t k = 0; k < 4 * n; k++) {
                size_t size;
                uint64_t s = rng_next(&x);
                unsigned char *p = slot_bytes(g, first + (uint32_t)(s % n), &size);
                __atomic_store_n(&p[(s >> 8) % size], (unsigned char)(s >> 32),
                                 __ATOMIC_RELAXED);
                res->scribbles++;
            }
        } else if (!stale) {
            g->raw_got = 0;
        }
        uint64_t deadline = now_ns() + (uint64_t)h->timeout_ms * 1000000ull;
        while (res->responses - before < n) {
            if (reap(g, on_hostile_rsp, res))
                continue;
            uint64_t t = now_ns();
            if (t >= deadline)
                break;
            wait_event(g, (uint32_t)((deadline - t) / 1000000ull) + 1);
        }
        if (res->responses - before < n) {
            res->lost += n - (res->responses - before);
            rc = -ETIMEDOUT;
            break;
        }
        if (res->responses - before > n) {
            res->extra += res->responses - before - n;
            break;
        }
    }
    g->raw_got = 0;
    free(isegs);
    return rc;
}

static int revoke_gref(struct gd *g, uint32_t gref)
{
    /* Looked up, not linked: the real libxengntshr has no such call. */
    int (*end_access)(xengntshr_handle *, uint32_t) =
        (int (*)(xengntshr_handle *, uint32_t))dlsym(RTLD_DEFAULT, "xensim_gntshr_end_access");
    if (!end_access)
        return -ENOSYS;
    return end_access(g->xgs, gref) == 0 ? 0 : -errno;
}

int gd_revoke(struct gd *g, uint32_t page)
{
    if (page >= g->data_pages)
        return -EINVAL;
    return revoke_gref(g, g->data_grefs[page]);
}

int gd_revoke_indirect(struct gd *g, uint32_t slot, uint32_t page)
{
    uint32_t gref = gd_indirect_gref(g, slot, page);
    return gref ? revoke_gref(g, gref) : -EINVAL;
}
