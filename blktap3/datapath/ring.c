/*
 * ring.c: the blkif ring service.
 *
 * One service thread per ring, started from Python with the GIL released and never
 * calling back into it. Per event-channel kick it drains every request (private copy,
 * then checks), grant-copies the data of all writes in one call, submits the batch's
 * I/O in one io_uring call, and completes in batches: one grant copy for all finished
 * reads, responses written field by field, one RING_PUSH_RESPONSES_AND_CHECK_NOTIFY.
 * RING_FINAL_CHECK_FOR_REQUESTS closes the race with the front-end before it sleeps.
 *
 * Indirect requests (BLKIF_OP_INDIRECT, when the VBD offered them at connect): the
 * indirect pages are grant-copied into private memory once, then every segment is
 * checked there as a direct request's would be, and the data moves by the same batched
 * grant copy into a buffer of a bounded pool (TD_INDIRECT_POOL_BYTES per ring).
 *
 * Persistent grants (feature-persistent negotiated at connect): the data moves by memcpy
 * through the ring's cache of mapped grants (pgrant.c) instead of grant copy; a grant
 * the cache cannot map falls back to grant copy, whose status decides.
 *
 * With io_uring the thread sleeps inside it: one-shot polls on the event channel and
 * the control eventfd sit beside the I/O, so a single io_uring_enter submits the batch
 * and waits for a completion, a kick or a control request (per QD1 request: that
 * enter, the kick's xenevtchn_pending read, the response's notify, and one more enter
 * to sleep). Other engines sleep in poll().
 *
 * Control (pause, resume, disconnect) comes from other threads through `state`
 * (under `mu`) and an eventfd that wakes the service thread.
 */
#define _GNU_SOURCE
#include "datapath.h"
#include "pgrant.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#define TD_SEG_BYTES (BLKIF_MAX_SEGMENTS_PER_REQUEST * TD_PAGE_SIZE)
/* Memory for the data of indirect requests in flight, per ring (at least one request
 * of the offered size fits). 32 MiB in flight saturates any disk a ring sits on; it is
 * reserved, and only touched when a guest uses it. */
#define TD_INDIRECT_POOL_BYTES (32u << 20)
/* Data is grant-copied in chunks of about this many segments (2 MiB): the I/O of a
 * batch's first large writes starts while the next ones are copied, and its first reads
 * are answered while the next ones are. A batch of small requests stays one call. */
#define TD_COPY_CHUNK 512u

enum td_state { RS_RUN = 0, RS_PAUSING, RS_PAUSED, RS_STOPPING };
/* What woke the service thread, as io_uring watch bits. */
enum { TD_WAKE_EVTCHN = 1, TD_WAKE_CTL = 2 };

struct td_slot {
    struct td_req req;
    uint8_t op;             /* what the data moves for: INDIRECT's indirect_op, else op */
    const struct td_seg *segs;  /* the private segments: req.seg, or an indirect buffer's */
    char *buf;              /* the request's data, segments packed back to back */
    char *dbuf;             /* this slot's own buffer, big enough for a direct request */
    int32_t ibuf;           /* the indirect buffer the slot holds, or -1 */
    int err;                /* enum td_err once decided */
    uint64_t t0;            /* its I/O was queued (ns, CLOCK_MONOTONIC): latency, timeout */
    uint32_t retries;       /* its I/O was reissued after a retryable error */
    int fd;                 /* where the image mapped its I/O (td_image_map): a retry */
    uint64_t off;           /* goes to the same place */
    uint32_t pending;       /* completions still to come: 2 while a mirrored write's
                             * secondary half is in flight too, else 1 */
    int nbd_half;           /* that half went to an NBD secondary: its reply is read
                             * once the primary's half completed */
    uint64_t nbd_handle;
};

/* Room for one INDIRECT request: its segments (copied from the guest's indirect pages)
 * and its data. */
struct td_ibuf {
    struct td_seg *segs;
    char *data;
};

struct td_ring {
    xengnttab_handle *xgt;
    xenevtchn_handle *xce;
    void *sring;
    uint32_t nr_pages;
    int proto;
    uint32_t nslots;
    evtchn_port_t lport;
    uint32_t domid, devid;

    /* Back-ring indices, as BACK_RING's fields but layout independent. */
    RING_IDX req_cons, rsp_prod_pvt;
    RING_IDX rsp_pushed;    /* the rsp_prod we last published (the shared one is guest's) */

    struct td_image *img;
    struct td_engine *eng;
    int engine_kind;
    struct td_slot *slots;
    char *bufs;
    uint32_t *free_slots;
    uint32_t nfree;
    uint32_t inflight;      /* slots taken: submitted I/O or a held barrier */
    int32_t held;           /* a barrier/flush waiting for in-flight I/O to drain, or -1 */

    uint32_t max_indirect;  /* segments per INDIRECT request offered (0: not offered) */
    int discard;            /* the back-end offers discard (0: withheld, EOPNOTSUPP) */
    uint32_t nibufs;        /* indirect buffers (INDIRECT requests in flight at most) */
    struct td_ibuf *ibufs;
    uint32_t *free_ibufs;
    uint32_t nfree_ibufs;
    char *ibuf_mem;         /* one mapping: every buffer's segment pages, then data */
    size_t ibuf_mem_len;
    xengnttab_grant_copy_segment_t icopy[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];

    struct td_pgcache *pg;  /* persistent grants negotiated: the mapped grants, else NULL */

    xengnttab_grant_copy_segment_t *gcopy;
    uint32_t *gcopy_slot;
    uint32_t *batch;        /* slots of the batch being assembled */
    struct td_cqe *cqes;

    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int state;              /* enum td_state, under mu */
    int ctl_efd;
    int exited;
    uint64_t poll_ns;       /* spin this long for work before sleeping (0: never) */
    uint32_t poll_idle;     /* ...only while this % of CPU time is idle (0: always) */
    int poll_ok;            /* the last interval was idle enough */
    uint64_t cpu_at_ns;     /* when `cpu` was read */
    struct td_cpu_times cpu;
    int stop_seen;          /* disconnect: req_prod when it was asked, served up to there */
    RING_IDX stop_prod;
    int uring_wait;         /* sleeps in io_uring (td_engine_wait), else in poll() */
    uint32_t armed;         /* TD_WAKE_* watches queued or in the kernel */
    uint32_t to_submit;     /* I/O prepared, not yet handed to the kernel */
    int submit_deferred;    /* to_submit was kept back for one more round (see service) */

    struct td_stats st;     /* written by the service thread only, read relaxed */
    struct td_io_stats ios; /* the stats files' counters: same rules as st */
    uint64_t req_timeout_ns;    /* retry a retryable I/O error until this old (relaxed) */
    uint32_t inject_eagain;     /* tests: completions still to report as -EAGAIN */
};

/* The default req_timeout: blktap's TD_VBD_REQUEST_TIMEOUT (drivers/tapdisk-vbd.h). */
#define TD_REQ_TIMEOUT_DEFAULT_S 120u
/* A completion whose I/O was reissued: no response yet. */
#define TD_CQE_RETRIED INT32_MIN
/* A completion of a mirrored write whose other half is still in flight: no response yet. */
#define TD_CQE_HALF (INT32_MIN + 1)
/* The tag of a mirrored write's secondary half: its slot, and this bit. */
#define TD_TAG_MIRROR (1u << 31)

#define STAT_ADD(r, field, n) __atomic_fetch_add(&(r)->st.field, (n), __ATOMIC_RELAXED)
#define IOS_ADD(r, field, n) __atomic_fetch_add(&(r)->ios.field, (n), __ATOMIC_RELAXED)

static uint64_t now_ns(void);

/* The four indices that open every layout's sring; volatile: the guest writes them. */
struct td_sring_hdr {
    volatile RING_IDX req_prod, req_event, rsp_prod, rsp_event;
};

static struct td_sring_hdr *hdr(struct td_ring *r)
{
    return (struct td_sring_hdr *)r->sring;
}

/* An operation blkif does not define is EOPNOTSUPP, not ERROR: Linux blkback's
 * dispatch_other_io answers so, and blktap since CA-416464 (a guest migrated from
 * another back-end may issue requests this one lacks; ERROR can crash its OS, Windows
 * xenvbd drops the feature on EOPNOTSUPP). Found by the conformance scenario
 * hostile-bad-requests. It is still counted as "op". */
static int16_t rsp_status_of(int err)
{
    return (int16_t)(err == TD_OK ? BLKIF_RSP_OKAY
                     : err == TD_ERR_UNSUPPORTED || err == TD_ERR_OP ? BLKIF_RSP_EOPNOTSUPP
                                                                     : BLKIF_RSP_ERROR);
}

static void respond(struct td_ring *r, const struct td_req *req, int err)
{
    td_ring_put_rsp(r->proto, r->sring, r->nr_pages, r->rsp_prod_pvt, req->id,
                    td_rsp_operation(req), rsp_status_of(err));
    r->rsp_prod_pvt++;
    STAT_ADD(r, responses, 1);
    if (err != TD_OK)
        STAT_ADD(r, errors[err], 1);
}

static void push_responses(struct td_ring *r)
{
    /* `old` is our own copy: the guest may scribble on the shared rsp_prod, and must
     * not make us skip publishing or miscount the notify window with it. */
    RING_IDX old = r->rsp_pushed, new = r->rsp_prod_pvt;
    if (old == new)
        return;
    r->rsp_pushed = new;
    /* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY, spelled out over our layout-free indices. */
    xen_wmb();  /* the front-end sees the responses before the new producer index */
    hdr(r)->rsp_prod = new;
    xen_mb();   /* it sees the new rsp_prod before we read its rsp_event */
    int notify = (RING_IDX)(new - hdr(r)->rsp_event) < (RING_IDX)(new - old);
    if (notify && xenevtchn_notify(r->xce, r->lport) == 0)
        STAT_ADD(r, kicks_out, 1);
}

static void free_slot(struct td_ring *r, uint32_t s)
{
    struct td_slot *sl = &r->slots[s];
    if (sl->ibuf >= 0) {
        r->free_ibufs[r->nfree_ibufs++] = (uint32_t)sl->ibuf;
        sl->ibuf = -1;
    }
    r->free_slots[r->nfree++] = s;
}

/* No INDIRECT request could be taken now: every indirect buffer is in flight. */
static int ibufs_exhausted(const struct td_ring *r)
{
    return r->max_indirect && r->nfree_ibufs == 0;
}

static void halt(struct td_ring *r, const char *why)
{
    if (r->st.halted[0])
        return;
    snprintf(r->st.halted, sizeof(r->st.halted), "%s", why);
    STAT_ADD(r, errors[TD_ERR_OVERFLOW], 1);
    /* Logged once, never per request: the VBD owner reads `halted` from the stats. */
    fprintf(stderr, "blktap3 datapath: ring d%u/%u halted: %s\n", r->domid, r->devid, why);
}

/* Grant-copy `n` prepared segments; failed ones mark their slot TD_ERR_GRANT. */
static void grant_copy(struct td_ring *r, uint32_t n)
{
    if (n == 0)
        return;
    if (xengnttab_grant_copy(r->xgt, n, r->gcopy) != 0) {
        for (uint32_t i = 0; i < n; i++)
            r->slots[r->gcopy_slot[i]].err = TD_ERR_GRANT;
        return;
    }
    for (uint32_t i = 0; i < n; i++)
        if (r->gcopy[i].status != GNTST_okay)
            r->slots[r->gcopy_slot[i]].err = TD_ERR_GRANT;
}

/* Move one slot's data: through the persistent mappings when there are, else (and for
 * any grant the cache cannot map) prepare grant-copy segments; returns the new count. */
static uint32_t prep_copy(struct td_ring *r, uint32_t s, int to_guest, uint32_t n)
{
    struct td_slot *sl = &r->slots[s];
    uint32_t off = 0;
    for (unsigned i = 0; i < sl->req.nr_segments; i++) {
        const struct td_seg *sg = &sl->segs[i];
        uint32_t len = (uint32_t)(sg->last_sect - sg->first_sect + 1) << TD_SECTOR_SHIFT;
        if (r->pg && td_pgcache_copy(r->pg, sg->gref, (uint32_t)sg->first_sect << TD_SECTOR_SHIFT,
                                     sl->buf + off, len, to_guest) == 0) {
            off += len;
            continue;
        }
        xengnttab_grant_copy_segment_t *c = &r->gcopy[n];
        memset(c, 0, sizeof(*c));
        if (to_guest) {
            c->source.virt = sl->buf + off;
            c->dest.foreign.ref = sg->gref;
            c->dest.foreign.offset = (uint16_t)(sg->first_sect << TD_SECTOR_SHIFT);
            c->dest.foreign.domid = (uint16_t)r->domid;
            c->flags = GNTCOPY_dest_gref;
        } else {
            c->source.foreign.ref = sg->gref;
            c->source.foreign.offset = (uint16_t)(sg->first_sect << TD_SECTOR_SHIFT);
            c->source.foreign.domid = (uint16_t)r->domid;
            c->dest.virt = sl->buf + off;
            c->flags = GNTCOPY_source_gref;
        }
        c->len = (uint16_t)len;
        r->gcopy_slot[n++] = s;
        off += len;
    }
    return n;
}

static int is_null(const struct td_ring *r)
{
    return r->img->fd < 0;
}

/* A barrier or flush, run once nothing else is in flight: write, then durable. */
static void run_held(struct td_ring *r)
{
    uint32_t s = (uint32_t)r->held;
    struct td_slot *sl = &r->slots[s];
    r->held = -1;
    if (!is_null(r)) {
        if (sl->req.nr_segments) {
            grant_copy(r, prep_copy(r, s, 0, 0));
            if (sl->err == TD_OK) {
                if (td_image_sync_io(r->img, 1, sl->buf, sl->req.sector_number,
                                     (uint32_t)sl->req.nr_sectors) != 0)
                    sl->err = TD_ERR_IO;
                else
                    STAT_ADD(r, sectors_written, sl->req.nr_sectors);
            }
        }
        /* Durable after: the response says the data (and all before it) is stable. */
        if (sl->err == TD_OK && td_image_flush(r->img) != 0)
            sl->err = TD_ERR_IO;
    }
    respond(r, &sl->req, sl->err);
    free_slot(r, s);
    r->inflight--;
}

static void run_discard(struct td_ring *r, struct td_slot *sl)
{
    if (is_null(r))
        return;
    /* The image punches (raw or the VHD's leaf), marks the CBT log, mirrors. */
    if (td_image_discard(r->img, sl->req.sector_number, sl->req.nr_sectors) != 0)
        sl->err = TD_ERR_IO;
}

/*
 * An INDIRECT request whose header passed: take an indirect buffer, copy the indirect
 * pages the segments need (and no more) into its private segment array, then check
 * every segment there. One copy, then checks: the guest may rewrite its pages now, we
 * never read them again (XSA-155). consume() made sure a buffer is free.
 *
 * With persistent grants the indirect pages come through the cache of mapped grants as
 * data pages do: Linux blkfront takes them from the same pool of persistent grants
 * (get_indirect_grant) and blkback maps them persistently (xen_blkbk_parse_indirect ->
 * xen_blkbk_map), so a ring slot's indirect page is mapped once and memcpy'd from. A
 * page the cache will not take (unmappable, cache full) is grant-copied as before.
 */
static int take_indirect(struct td_ring *r, uint32_t s)
{
    struct td_slot *sl = &r->slots[s];
    uint32_t b = r->free_ibufs[--r->nfree_ibufs];
    sl->ibuf = (int32_t)b;  /* back to the pool with the slot, whatever happens now */
    sl->segs = r->ibufs[b].segs;
    sl->buf = r->ibufs[b].data;
    sl->op = sl->req.indirect_op;
    STAT_ADD(r, indirect[sl->op == BLKIF_OP_WRITE], 1);

    uint32_t npages = TD_INDIRECT_PAGES(sl->req.nr_segments);
    uint32_t left = (uint32_t)sl->req.nr_segments * (uint32_t)sizeof(struct td_seg);
    uint32_t ncopy = 0;
    for (uint32_t p = 0; p < npages; p++) {
        uint32_t len = left < TD_PAGE_SIZE ? left : TD_PAGE_SIZE;
        char *dest = (char *)r->ibufs[b].segs + (size_t)p * TD_PAGE_SIZE;
        left -= len;
        if (r->pg && td_pgcache_copy(r->pg, sl->req.indirect_grefs[p], 0, dest, len, 0) == 0)
            continue;
        xengnttab_grant_copy_segment_t *c = &r->icopy[ncopy++];
        memset(c, 0, sizeof(*c));
        c->source.foreign.ref = sl->req.indirect_grefs[p];
        c->source.foreign.offset = 0;
        c->source.foreign.domid = (uint16_t)r->domid;
        c->dest.virt = dest;
        c->len = (uint16_t)len;
        c->flags = GNTCOPY_source_gref;
    }
    if (ncopy && xengnttab_grant_copy(r->xgt, ncopy, r->icopy) != 0)
        return TD_ERR_INDIRECT_GRANT;
    for (uint32_t p = 0; p < ncopy; p++)
        if (r->icopy[p].status != GNTST_okay)
            return TD_ERR_INDIRECT_GRANT;
    STAT_ADD(r, indirect_pages, npages);
    const struct td_image_info *info = &r->img->info;
    int err = td_req_check_segs(&sl->req, sl->segs, info->sectors, r->img->readonly);
    return err ? err : td_req_check_align(&sl->req, sl->segs, info->sector_size);
}

static void flush_submit(struct td_ring *r);

/* ---- the stats files' counters and blktap's req_timeout: off the per-segment work,
 * one clock read per batch queued and per batch reaped ---- */

static void io_queued(struct td_ring *r, struct td_slot *sl, uint64_t now)
{
    sl->t0 = now;
    sl->retries = 0;
    IOS_ADD(r, submitted[sl->op == BLKIF_OP_WRITE], 1);
}

static void io_done(struct td_ring *r, const struct td_slot *sl, uint64_t now)
{
    int w = sl->op == BLKIF_OP_WRITE;
    uint64_t us = now > sl->t0 ? (now - sl->t0) / 1000u : 0;
    IOS_ADD(r, completed[w], 1);
    IOS_ADD(r, usecs[w], us);
    if (us > r->ios.max_usecs[w])
        __atomic_store_n(&r->ios.max_usecs[w], us, __ATOMIC_RELAXED);
}

/* The result of completion `c`, after the test hook; a retryable error of a request
 * younger than req_timeout reissues its I/O and returns TD_CQE_RETRIED (blktap:
 * tapdisk_vbd_request_should_retry, then "req %s timed out, retried %d times"). */
static int32_t io_result(struct td_ring *r, struct td_cqe *c, uint64_t now)
{
    struct td_slot *sl = &r->slots[c->tag];
    int32_t res = c->res;
    uint32_t inj = __atomic_load_n(&r->inject_eagain, __ATOMIC_RELAXED);
    while (inj && !__atomic_compare_exchange_n(&r->inject_eagain, &inj, inj - 1, 0,
                                               __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    if (inj)
        res = -EAGAIN;
    if (res != -EAGAIN && res != -EBUSY && res != -EINTR)
        return res;
    uint64_t timeout = __atomic_load_n(&r->req_timeout_ns, __ATOMIC_RELAXED);
    /* No retry once the ring is going down (blktap: not when SHUTDOWN_REQUESTED). */
    int stopping = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE) == RS_STOPPING;
    if (!stopping && now - sl->t0 < timeout) {
        int op = sl->op == BLKIF_OP_WRITE ? TD_IO_WRITE : TD_IO_READ;
        if (td_engine_prep(r->eng, op, sl->fd, sl->buf,
                           (uint32_t)(sl->req.nr_sectors << TD_SECTOR_SHIFT), sl->off,
                           c->tag) == 0) {
            sl->retries++;
            r->to_submit++;
            IOS_ADD(r, retried, 1);
            return c->res = TD_CQE_RETRIED;
        }
        return res;
    }
    IOS_ADD(r, timed_out, 1);
    /* One line per timed-out request, as blktap's ERR(): rare by definition. */
    fprintf(stderr, "blktap3 datapath: ring d%u/%u: req %llu timed out, retried %u times: "
            "%s\n", r->domid, r->devid, (unsigned long long)sl->req.id, sl->retries,
            strerror(-res));
    return res;
}

/* A request the image cannot map to one extent (a VHD block to allocate, a bitmap to
 * update, a read through a chain): served here, synchronously, then answered. */
static void run_sync(struct td_ring *r, uint32_t s)
{
    struct td_slot *sl = &r->slots[s];
    int write = sl->op == BLKIF_OP_WRITE;
    if (td_image_sync_io(r->img, write, sl->buf, sl->req.sector_number,
                         (uint32_t)sl->req.nr_sectors) != 0)
        sl->err = TD_ERR_IO;
    else if (!write)
        grant_copy(r, prep_copy(r, s, 1, 0));
    if (sl->err == TD_OK) {
        if (write)
            STAT_ADD(r, sectors_written, sl->req.nr_sectors);
        else
            STAT_ADD(r, sectors_read, sl->req.nr_sectors);
    }
    respond(r, &sl->req, sl->err);
    free_slot(r, s);
    r->inflight--;
}

/* Grant-copy the data of the writes among batch[0..n) (`ncopy` segments prepared), then
 * queue the I/O of the batch. */
static void dispatch(struct td_ring *r, uint32_t n, uint32_t ncopy)
{
    grant_copy(r, ncopy);
    uint32_t queued = 0;
    uint64_t now = now_ns();    /* one clock read per batch */
    for (uint32_t i = 0; i < n; i++) {
        uint32_t s = r->batch[i];
        struct td_slot *sl = &r->slots[s];
        if (sl->err != TD_OK) {
            respond(r, &sl->req, sl->err);
            free_slot(r, s);
            r->inflight--;
            continue;
        }
        int op = sl->op == BLKIF_OP_WRITE ? TD_IO_WRITE : TD_IO_READ;
        uint64_t off = 0, soff = 0;
        int sfd = -1;
        uint32_t nr = (uint32_t)sl->req.nr_sectors;
        int fd = is_null(r) ? -1
                 : op == TD_IO_WRITE
                     ? td_image_map_mirrored(r->img, sl->req.sector_number, nr, &off, &sfd,
                                             &soff)
                     : td_image_map(r->img, 0, sl->req.sector_number, nr, &off);
        if (fd < 0 && !is_null(r)) {
            run_sync(r, s);
            continue;
        }
        int rc = td_engine_prep(r->eng, op, fd, sl->buf, nr << TD_SECTOR_SHIFT, off, s);
        if (rc != 0) {
            respond(r, &sl->req, TD_ERR_IO);
            free_slot(r, s);
            r->inflight--;
            continue;
        }
        sl->fd = fd;
        sl->off = off;
        sl->pending = 1;
        sl->nbd_half = 0;
        io_queued(r, sl, now);
        queued++;
        /* An NBD secondary: the request goes out now, beside the batch's others. */
        if (op == TD_IO_WRITE && sfd < 0 &&
            td_image_mirror_send(r->img, sl->buf, sl->req.sector_number, nr,
                                 &sl->nbd_handle) == 0) {
            sl->pending = 2;
            sl->nbd_half = 1;
        }
        /* The secondary's copy in the same batch, from the same buffer: the two halves
         * run at once, the response waits for both (complete). */
        if (sfd >= 0) {
            rc = td_engine_prep(r->eng, TD_IO_WRITE, sfd, sl->buf, nr << TD_SECTOR_SHIFT,
                                soff, s | TD_TAG_MIRROR);
            if (rc == 0) {
                sl->pending = 2;
                queued++;
            } else {
                td_image_mirror_done(r->img, rc);
            }
        }
    }
    /* Handed to the kernel by flush_submit or, when the thread is about to sleep
     * anyway, by the same io_uring_enter that sleeps. */
    r->to_submit += queued;
}

/* Take the requests the front-end produced up to `rp`; returns how many. */
static uint32_t consume(struct td_ring *r, RING_IDX rp)
{
    uint32_t nbatch = 0, ncopy = 0, taken = 0;
    xen_rmb();  /* read the requests only after the producer index that covers them */

    /* More requests than slots (RING_REQUEST_PROD_OVERFLOW), or req_prod moved back
     * behind what we took: a broken front-end. Behind used to pass, and the loop then
     * took ~2^32 stale slots (a disconnect waiting for stop_prod never ended). */
    switch (td_ring_prod_check(rp, r->req_cons, r->rsp_prod_pvt, r->nslots)) {
    case TD_PROD_PAST_RING:
        halt(r, "req_prod overflow");
        return 0;
    case TD_PROD_BEHIND:
        halt(r, "req_prod went backwards");
        return 0;
    }
    const struct td_image_info *info = &r->img->info;
    while (r->req_cons != rp && r->held < 0) {
        /* RING_REQUEST_CONS_OVERFLOW: no response slot free yet, wait for completions.
         * Likewise without a free indirect buffer: the next request may need one, and a
         * request is never left half taken. */
        if ((RING_IDX)(r->req_cons - r->rsp_prod_pvt) >= r->nslots || r->nfree == 0 ||
            ibufs_exhausted(r))
            break;
        uint32_t s = r->free_slots[--r->nfree];
        struct td_slot *sl = &r->slots[s];
        td_req_fetch(r->proto,
                     td_ring_req_slot(r->proto, r->sring, r->nr_pages, r->req_cons),
                     &sl->req);
        /* Consumed before any response goes out for it (as blkback does). */
        r->req_cons++;
        taken++;
        STAT_ADD(r, reqs[sl->req.operation < 7 ? sl->req.operation : 7], 1);
        sl->op = sl->req.operation;
        sl->segs = sl->req.seg;
        sl->buf = sl->dbuf;
        sl->err = td_req_check(&sl->req, info->sectors, r->img->readonly,
                               info->discard && r->discard, r->max_indirect);
        if (sl->err == TD_OK && sl->req.operation == BLKIF_OP_INDIRECT)
            sl->err = take_indirect(r, s);
        else if (sl->err == TD_OK && sl->req.operation != BLKIF_OP_DISCARD)
            sl->err = td_req_check_align(&sl->req, sl->req.seg, info->sector_size);
        if (sl->err != TD_OK) {
            respond(r, &sl->req, sl->err);
            free_slot(r, s);
            continue;
        }
        STAT_ADD(r, segments, sl->req.nr_segments);
        switch (sl->op) {
        case BLKIF_OP_READ:
        case BLKIF_OP_WRITE:
            if (sl->op == BLKIF_OP_WRITE && !is_null(r))
                ncopy = prep_copy(r, s, 0, ncopy);
            r->batch[nbatch++] = s;
            r->inflight++;
            if (ncopy >= TD_COPY_CHUNK) {
                dispatch(r, nbatch, ncopy);
                flush_submit(r);
                nbatch = ncopy = 0;
            }
            break;
        case BLKIF_OP_WRITE_BARRIER:
        case BLKIF_OP_FLUSH_DISKCACHE:
            /* Drain before: hold it, stop taking requests until in-flight I/O is done. */
            r->held = (int32_t)s;
            r->inflight++;
            break;
        case BLKIF_OP_DISCARD:
            run_discard(r, sl);
            respond(r, &sl->req, sl->err);
            free_slot(r, s);
            break;
        }
    }
    if (nbatch)
        dispatch(r, nbatch, ncopy);     /* the batch's writes' data in one call */
    __atomic_store_n(&r->st.in_flight, r->inflight, __ATOMIC_RELAXED);
    return taken;
}

/* The whole batch in one call. */
static void flush_submit(struct td_ring *r)
{
    r->submit_deferred = 0;
    if (r->to_submit == 0)
        return;
    r->to_submit = 0;
    STAT_ADD(r, batches, 1);
    if (td_engine_submit(r->eng) != 0)
        halt(r, "io engine submit failed");
}

/* Complete finished I/O in one batch; returns how many. */
static uint32_t complete(struct td_ring *r)
{
    uint32_t n = td_engine_reap(r->eng, r->cqes, r->nslots);
    if (n == 0)
        return 0;
    uint32_t ncopy = 0, done = 0;
    uint64_t now = now_ns();    /* one clock read per batch */
    for (uint32_t i = 0; i < n; i++) {
        struct td_cqe *c = &r->cqes[i];
        int secondary = (c->tag & TD_TAG_MIRROR) != 0;
        c->tag &= ~TD_TAG_MIRROR;
        struct td_slot *sl = &r->slots[c->tag];
        uint32_t want = (uint32_t)(sl->req.nr_sectors << TD_SECTOR_SHIFT);
        /* The secondary's half: no retry, no error for the guest; a failure drops it. */
        int32_t res = secondary ? c->res : io_result(r, c, now);
        if (secondary)
            td_image_mirror_done(r->img, res == (int32_t)want ? 0 : res < 0 ? res : -EIO);
        else if (res == TD_CQE_RETRIED)
            ;   /* still in flight */
        else if (res != (int32_t)want)
            sl->err = TD_ERR_IO;
        else if (sl->op == BLKIF_OP_READ && !is_null(r))
            ncopy = prep_copy(r, c->tag, 1, ncopy);
        if (!secondary && c->res != TD_CQE_RETRIED && sl->nbd_half) {
            /* Its NBD half was sent with the primary's: by now its reply has usually
             * come (read here, or kept by whoever read it first). */
            td_image_mirror_wait(r->img, sl->nbd_handle);
            sl->nbd_half = 0;
            sl->pending--;
        }
        if (c->res != TD_CQE_RETRIED && --sl->pending)
            c->res = TD_CQE_HALF;   /* answered with the other half */
        if (ncopy < TD_COPY_CHUNK && i + 1 < n)
            continue;
        /* The finished reads' data to the guest (in one call for small ones), then
         * their responses: the guest sees them while the next chunk is copied. */
        grant_copy(r, ncopy);
        ncopy = 0;
        for (; done <= i; done++) {
            if (r->cqes[done].res == TD_CQE_RETRIED || r->cqes[done].res == TD_CQE_HALF)
                continue;
            uint32_t s = r->cqes[done].tag;
            struct td_slot *d = &r->slots[s];
            io_done(r, d, now);
            if (d->err == TD_OK) {
                if (d->op == BLKIF_OP_READ)
                    STAT_ADD(r, sectors_read, d->req.nr_sectors);
                else
                    STAT_ADD(r, sectors_written, d->req.nr_sectors);
            }
            respond(r, &d->req, d->err);
            free_slot(r, s);
            r->inflight--;
        }
        if (i + 1 < n)
            push_responses(r);
    }
    __atomic_store_n(&r->st.in_flight, r->inflight, __ATOMIC_RELAXED);
    return n;
}

static int get_state(struct td_ring *r)
{
    return __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Polling mode (blktap's poll_duration): before going to sleep, watch the ring and the
 * completion queue for a while. req_event is not re-armed meanwhile, so the front-end
 * does not kick us either: no syscall on either side while busy. Returns 1 when work
 * showed up.
 */
static int spin_for_work(struct td_ring *r, int st)
{
    uint64_t end = now_ns() + r->poll_ns;
    do {
        for (int i = 0; i < 64; i++) {
            if (hdr(r)->req_prod != r->req_cons || td_engine_ready(r->eng) ||
                get_state(r) != st)
                return 1;
            __builtin_ia32_pause();
        }
    } while (now_ns() < end);
    return 0;
}

/*
 * May the ring spin now? With a `polling-idle-threshold`, only while that share of all
 * CPU time was idle over the last interval (blktap's CPU monitor): polling then uses
 * spare cycles, never a loaded host's. /proc/stat is read at most every
 * TD_CPU_INTERVAL_NS, by this thread, so the hot path sees a plain flag.
 */
#define TD_CPU_INTERVAL_NS 100000000ull
static int may_poll(struct td_ring *r)
{
    if (r->poll_idle == 0)
        return 1;
    uint64_t now = now_ns();
    if (now - r->cpu_at_ns >= TD_CPU_INTERVAL_NS) {
        struct td_cpu_times cur;
        if (td_cpu_read(&cur) == 0) {
            int idle = r->cpu_at_ns ? td_cpu_idle_pct(&r->cpu, &cur) : -1;
            if (r->cpu_at_ns)
                r->poll_ok = idle >= 0 && (uint32_t)idle >= r->poll_idle;
            r->cpu = cur;
        } else {
            r->poll_ok = 0;     /* cannot tell: do not spin */
        }
        r->cpu_at_ns = now;
    }
    return r->poll_ok;
}

/* A kick from the front-end: take it off the event channel and unmask the port. */
static void take_kick(struct td_ring *r)
{
    xenevtchn_port_or_error_t p = xenevtchn_pending(r->xce);
    if (p >= 0) {
        xenevtchn_unmask(r->xce, (evtchn_port_t)p);
        STAT_ADD(r, kicks_in, 1);
    }
}

static void drain_ctl(struct td_ring *r)
{
    uint64_t junk;
    if (read(r->ctl_efd, &junk, sizeof(junk)) < 0)
        (void)0;    /* EAGAIN: another wake-up consumed it; nothing lost */
}

/* io_uring mode: act on the watches reaped with the completions. */
static void take_wakes(struct td_ring *r)
{
    if (!r->uring_wait)
        return;
    uint32_t w = td_engine_woken(r->eng);
    if (w & TD_WAKE_EVTCHN)
        take_kick(r);
    if (w & TD_WAKE_CTL)
        drain_ctl(r);
    r->armed &= ~w;
}

/* Submit the batch and sleep until a completion, a kick or a control request: one
 * io_uring_enter. The one-shot watches fired since are queued again first. */
static void sleep_in_engine(struct td_ring *r)
{
    if (!(r->armed & TD_WAKE_EVTCHN) &&
        td_engine_watch(r->eng, xenevtchn_fd(r->xce), TD_WAKE_EVTCHN) == 0)
        r->armed |= TD_WAKE_EVTCHN;
    if (!(r->armed & TD_WAKE_CTL) && td_engine_watch(r->eng, r->ctl_efd, TD_WAKE_CTL) == 0)
        r->armed |= TD_WAKE_CTL;
    if (r->armed != (TD_WAKE_EVTCHN | TD_WAKE_CTL)) {
        /* A watch could not be queued (the kernel refused a submit): sleeping now
         * could miss a kick, so look again shortly instead. */
        flush_submit(r);
        usleep(100);
        return;
    }
    r->submit_deferred = 0;
    if (r->to_submit) {
        r->to_submit = 0;
        STAT_ADD(r, batches, 1);
    }
    /* An error (EINTR, or ENOMEM/EBUSY under pressure) only means "look again"; a
     * short pause keeps a kernel that keeps refusing from making us spin. */
    if (td_engine_wait(r->eng) < 0)
        usleep(100);
}

static void sleep_in_poll(struct td_ring *r)
{
    flush_submit(r);
    struct pollfd pfd[3] = {
        {xenevtchn_fd(r->xce), POLLIN, 0},
        {r->ctl_efd, POLLIN, 0},
        {td_engine_fd(r->eng), POLLIN, 0},
    };
    int nfd = pfd[2].fd >= 0 ? 3 : 2;
    if (poll(pfd, (nfds_t)nfd, -1) < 0)
        return;     /* EINTR: look again */
    if (pfd[0].revents & POLLIN)
        take_kick(r);
    if (nfd == 3 && (pfd[2].revents & POLLIN))
        td_engine_clear(r->eng);
    if (pfd[1].revents & POLLIN)
        drain_ctl(r);
}

static void *service(void *arg)
{
    struct td_ring *r = arg;
    for (;;) {
        int st = get_state(r);
        if (st == RS_STOPPING && !r->stop_seen) {
            /* Disconnect answers what the front-end had queued by now, then stops. */
            r->stop_prod = hdr(r)->req_prod;
            r->stop_seen = 1;
        }
        int taking = (st == RS_RUN || st == RS_STOPPING) && !r->st.halted[0];
        uint32_t work = 0;

        work += complete(r);
        take_wakes(r);
        if (r->held >= 0 && r->inflight == 1) {
            run_held(r);
            work++;
        }
        if (taking)
            work += consume(r, st == RS_STOPPING ? r->stop_prod : hdr(r)->req_prod);
        push_responses(r);

        int idle = r->inflight == 0;
        if (st == RS_STOPPING && idle && (r->req_cons == r->stop_prod || r->st.halted[0]))
            break;
        if (st == RS_PAUSING && idle) {
            pthread_mutex_lock(&r->mu);
            if (r->state == RS_PAUSING) {
                r->state = RS_PAUSED;
                __atomic_store_n(&r->st.paused, 1, __ATOMIC_RELAXED);
                pthread_cond_broadcast(&r->cv);
            }
            pthread_mutex_unlock(&r->mu);
            continue;
        }
        if (work) {
            /* Look once more before sleeping: more may have come meanwhile, and req_event
             * stays unarmed while we find work, so a busy front-end need not kick. The
             * I/O prepared this round waits for that one look at most: then the next
             * round, or the io_uring_enter that sleeps (one syscall for a QD1 request's
             * submit and wait), hands it to the kernel. */
            if (r->submit_deferred)
                flush_submit(r);
            r->submit_deferred = r->to_submit != 0;
            continue;
        }
        /* Waiting for a barrier's drain or for an indirect buffer: only a completion
         * helps, so sleep until one (req_event stays unarmed: requests wait anyway). */
        int blocked = r->held >= 0 || ibufs_exhausted(r);
        if (r->poll_ns && st == RS_RUN && taking && !blocked) {
            flush_submit(r);
            if (!may_poll(r)) {
                STAT_ADD(r, polls_busy, 1);
            } else {
                STAT_ADD(r, polls, 1);
                if (spin_for_work(r, st))
                    continue;
            }
        }
        if (st == RS_RUN && taking && !blocked) {
            /* RING_FINAL_CHECK_FOR_REQUESTS: re-arm req_event, then look once more. */
            hdr(r)->req_event = r->req_cons + 1;
            xen_mb();   /* req_event is visible before we re-read req_prod */
            if (hdr(r)->req_prod != r->req_cons) {
                flush_submit(r);
                continue;
            }
        }
        if (r->uring_wait)
            sleep_in_engine(r);
        else
            sleep_in_poll(r);
    }
    push_responses(r);
    pthread_mutex_lock(&r->mu);
    r->exited = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

static void wake(struct td_ring *r)
{
    uint64_t one = 1;
    if (write(r->ctl_efd, &one, sizeof(one)) < 0)
        (void)0;    /* the counter is saturated: the thread is awake anyway */
}

static void free_ring(struct td_ring *r)
{
    if (r->eng)
        td_engine_close(r->eng);
    if (r->xce) {
        if (r->lport)
            xenevtchn_unbind(r->xce, r->lport);
        xenevtchn_close(r->xce);
    }
    td_pgcache_close(r->pg);    /* every persistent mapping goes before the handle */
    if (r->xgt) {
        if (r->sring)
            xengnttab_unmap(r->xgt, r->sring, r->nr_pages);
        xengnttab_close(r->xgt);
    }
    if (r->ctl_efd >= 0)
        close(r->ctl_efd);
    if (r->bufs)
        munmap(r->bufs, (size_t)r->nslots * TD_SEG_BYTES);
    if (r->ibuf_mem)
        munmap(r->ibuf_mem, r->ibuf_mem_len);
    free(r->ibufs);
    free(r->free_ibufs);
    free(r->slots);
    free(r->free_slots);
    free(r->gcopy);
    free(r->gcopy_slot);
    free(r->batch);
    free(r->cqes);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

/* Which step of the last td_ring_connect of this thread failed, and on which values. */
static __thread char connect_failure[192];

const char *td_ring_connect_failure(void)
{
    return connect_failure;
}

/* Note the failed step; errno is kept for the caller. */
static void connect_failed(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void connect_failed(const char *fmt, ...)
{
    int saved = errno;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(connect_failure, sizeof(connect_failure), fmt, ap);
    va_end(ap);
    errno = saved;
}

int td_ring_connect(struct td_image *img, uint32_t domid, uint32_t devid,
                    const uint32_t *grefs, uint32_t order, uint32_t port, int proto,
                    int engine, uint32_t poll_us, uint32_t poll_idle, uint32_t max_indirect,
                    int discard, int persistent,
                    struct td_ring **out)
{
    connect_failure[0] = 0;
    if (order > TD_MAX_RING_ORDER || proto < TD_PROTO_NATIVE || proto > TD_PROTO_X86_64 ||
        max_indirect > TD_MAX_INDIRECT_SEGS || poll_idle > 100) {
        connect_failed("arguments: ring order %u, protocol %d, %u indirect segments, "
                       "idle threshold %u%%", order, proto, max_indirect, poll_idle);
        return -EINVAL;
    }
    struct td_ring *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    int rc = -ENOMEM;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    r->ctl_efd = -1;
    r->held = -1;
    r->poll_ns = (uint64_t)poll_us * 1000u;
    r->poll_idle = poll_idle;
    r->poll_ok = poll_idle == 0;    /* with a threshold: not before one interval says so */
    r->st.poll_idle_threshold = poll_idle;
    r->img = img;
    r->domid = domid;
    r->devid = devid;
    r->proto = proto;
    r->nr_pages = 1u << order;
    r->nslots = TD_RING_SLOTS(proto, r->nr_pages);
    r->max_indirect = max_indirect;
    r->req_timeout_ns = (uint64_t)TD_REQ_TIMEOUT_DEFAULT_S * 1000000000ull;
    r->discard = discard != 0;
    if (max_indirect) {
        size_t per = (size_t)max_indirect * TD_PAGE_SIZE;
        size_t n = TD_INDIRECT_POOL_BYTES / per;
        r->nibufs = (uint32_t)(n < 1 ? 1 : n > r->nslots ? r->nslots : n);
    }

    /* A batch grant-copies at most every slot's direct data plus every indirect buffer. */
    size_t nseg = (size_t)r->nslots * BLKIF_MAX_SEGMENTS_PER_REQUEST +
                  (size_t)r->nibufs * max_indirect;
    r->slots = calloc(r->nslots, sizeof(*r->slots));
    r->free_slots = calloc(r->nslots, sizeof(uint32_t));
    r->gcopy = calloc(nseg, sizeof(*r->gcopy));
    r->gcopy_slot = calloc(nseg, sizeof(uint32_t));
    r->batch = calloc(r->nslots, sizeof(uint32_t));
    r->cqes = calloc(r->nslots, sizeof(*r->cqes));
    if (!r->slots || !r->free_slots || !r->gcopy || !r->gcopy_slot || !r->batch ||
        !r->cqes)
        goto fail;
    /* Page-aligned buffers, 11 pages per slot: O_DIRECT needs the alignment. */
    r->bufs = mmap(NULL, (size_t)r->nslots * TD_SEG_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r->bufs == MAP_FAILED) {
        r->bufs = NULL;
        goto fail;
    }
    for (uint32_t i = 0; i < r->nslots; i++) {
        r->slots[i].dbuf = r->bufs + (size_t)i * TD_SEG_BYTES;
        r->slots[i].buf = r->slots[i].dbuf;
        r->slots[i].segs = r->slots[i].req.seg;
        r->slots[i].ibuf = -1;
        r->free_slots[r->nfree++] = r->nslots - 1 - i;
    }
    if (r->nibufs) {
        /* Page-aligned both: the segment pages are grant-copy destinations a page each,
         * the data is O_DIRECT's. Reserved, not committed: only what a guest uses is. */
        size_t seg_bytes = (size_t)TD_INDIRECT_PAGES(max_indirect) * TD_PAGE_SIZE;
        size_t data_bytes = (size_t)max_indirect * TD_PAGE_SIZE;
        r->ibuf_mem_len = (size_t)r->nibufs * (seg_bytes + data_bytes);
        r->ibufs = calloc(r->nibufs, sizeof(*r->ibufs));
        r->free_ibufs = calloc(r->nibufs, sizeof(uint32_t));
        if (!r->ibufs || !r->free_ibufs)
            goto fail;
        r->ibuf_mem = mmap(NULL, r->ibuf_mem_len, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (r->ibuf_mem == MAP_FAILED) {
            r->ibuf_mem = NULL;
            goto fail;
        }
        for (uint32_t i = 0; i < r->nibufs; i++) {
            r->ibufs[i].segs = (struct td_seg *)(void *)(r->ibuf_mem + (size_t)i * seg_bytes);
            r->ibufs[i].data = r->ibuf_mem + (size_t)r->nibufs * seg_bytes +
                               (size_t)i * data_bytes;
            r->free_ibufs[r->nfree_ibufs++] = r->nibufs - 1 - i;
        }
    }
    r->ctl_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->ctl_efd < 0)
        goto fail_errno;

    /* Room for both halves of every slot's write when the image is mirrored. */
    rc = td_engine_open(img->fd < 0 ? TD_ENGINE_NULL : engine, 2 * r->nslots, &r->eng);
    if (rc)
        goto fail;
    r->engine_kind = td_engine_kind(r->eng);
    r->uring_wait = td_engine_use_watches(r->eng) == 0;

    r->xgt = xengnttab_open(NULL, 0);
    if (!r->xgt) {
        connect_failed("opening the grant device (xengnttab_open, /dev/xen/gntdev)");
        goto fail_errno;
    }
    r->sring = xengnttab_map_domain_grant_refs(r->xgt, r->nr_pages, domid,
                                               (uint32_t *)grefs, PROT_READ | PROT_WRITE);
    if (!r->sring) {
        connect_failed("grant map of the ring: domain %u, %u page(s), first ref %u", domid,
                       r->nr_pages, grefs[0]);
        goto fail_errno;
    }
    r->xce = xenevtchn_open(NULL, 0);
    if (!r->xce) {
        connect_failed("opening the event-channel device (xenevtchn_open, /dev/xen/evtchn)");
        goto fail_errno;
    }
    xenevtchn_port_or_error_t lp = xenevtchn_bind_interdomain(r->xce, domid, port);
    if (lp < 0) {
        connect_failed("event-channel bind: domain %u, port %u", domid, port);
        goto fail_errno;
    }
    r->lport = (evtchn_port_t)lp;
    if (persistent) {
        uint32_t direct = r->nslots * BLKIF_MAX_SEGMENTS_PER_REQUEST;
        rc = td_pgcache_open(r->xgt, domid, direct > TD_PGRANTS_MIN ? direct : TD_PGRANTS_MIN,
                             &r->pg);
        if (rc)
            goto fail;
    }

    /* Start from where the front-end's ring is (BACK_RING_ATTACH semantics): one read,
     * or a guest changing rsp_prod meanwhile would split req_cons from rsp_prod_pvt. */
    RING_IDX start = hdr(r)->rsp_prod;
    r->req_cons = start;
    r->rsp_prod_pvt = start;
    r->rsp_pushed = start;
    r->st.o_direct = img->info.o_direct;
    r->st.engine = r->engine_kind;
    r->st.slots = (int32_t)r->nslots;
    r->st.max_indirect = r->max_indirect;
    r->st.indirect_bufs = r->nibufs;
    r->st.persistent = r->pg != NULL;

    /* The service thread takes no signals: they belong to the Python main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = -pthread_create(&r->thread, NULL, service, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc)
        goto fail;
    *out = r;
    return 0;

fail_errno:
    rc = errno ? -errno : -EIO;
fail:
    free_ring(r);
    return rc;
}

static int wait_state(struct td_ring *r, int want_paused, int timeout_ms)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    int rc = 0;
    pthread_mutex_lock(&r->mu);
    while (!(want_paused ? (r->state == RS_PAUSED || r->exited) : r->exited)) {
        if (pthread_cond_timedwait(&r->cv, &r->mu, &dl) == ETIMEDOUT) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int td_ring_pause(struct td_ring *r, int timeout_ms)
{
    pthread_mutex_lock(&r->mu);
    if (r->state == RS_RUN)
        __atomic_store_n(&r->state, RS_PAUSING, __ATOMIC_RELEASE);
    int s = r->state;
    pthread_mutex_unlock(&r->mu);
    if (s == RS_STOPPING)
        return -ESHUTDOWN;
    wake(r);
    return wait_state(r, 1, timeout_ms);
}

int td_ring_resume(struct td_ring *r, struct td_image *img)
{
    pthread_mutex_lock(&r->mu);
    int s = r->state;
    if (s != RS_PAUSED) {
        pthread_mutex_unlock(&r->mu);
        return s == RS_RUN ? 0 : -EBUSY;
    }
    if (img) {
        /* The thread is parked with nothing in flight: swapping the image is safe. */
        r->img = img;
        __atomic_store_n(&r->st.o_direct, img->info.o_direct, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&r->st.paused, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&r->state, RS_RUN, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&r->mu);
    wake(r);
    return 0;
}

int td_ring_disconnect(struct td_ring *r, int timeout_ms)
{
    pthread_mutex_lock(&r->mu);
    __atomic_store_n(&r->state, RS_STOPPING, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&r->mu);
    wake(r);
    int rc = wait_state(r, 0, timeout_ms);
    if (rc)
        return rc;  /* still draining: the caller may retry; nothing is freed */
    pthread_join(r->thread, NULL);
    free_ring(r);
    return 0;
}

void td_ring_stats(struct td_ring *r, struct td_stats *out)
{
    /* No lock: single-writer counters, each read atomically; a snapshot, not a cut. */
    for (unsigned i = 0; i < 8; i++)
        out->reqs[i] = __atomic_load_n(&r->st.reqs[i], __ATOMIC_RELAXED);
    for (unsigned i = 0; i < TD_ERR_MAX; i++)
        out->errors[i] = __atomic_load_n(&r->st.errors[i], __ATOMIC_RELAXED);
    for (unsigned i = 0; i < 2; i++)
        out->indirect[i] = __atomic_load_n(&r->st.indirect[i], __ATOMIC_RELAXED);
    out->indirect_pages = __atomic_load_n(&r->st.indirect_pages, __ATOMIC_RELAXED);
    out->segments = __atomic_load_n(&r->st.segments, __ATOMIC_RELAXED);
    out->sectors_read = __atomic_load_n(&r->st.sectors_read, __ATOMIC_RELAXED);
    out->sectors_written = __atomic_load_n(&r->st.sectors_written, __ATOMIC_RELAXED);
    out->kicks_in = __atomic_load_n(&r->st.kicks_in, __ATOMIC_RELAXED);
    out->kicks_out = __atomic_load_n(&r->st.kicks_out, __ATOMIC_RELAXED);
    out->responses = __atomic_load_n(&r->st.responses, __ATOMIC_RELAXED);
    out->in_flight = __atomic_load_n(&r->st.in_flight, __ATOMIC_RELAXED);
    out->batches = __atomic_load_n(&r->st.batches, __ATOMIC_RELAXED);
    out->o_direct = __atomic_load_n(&r->st.o_direct, __ATOMIC_RELAXED);
    out->engine = r->st.engine;
    out->paused = __atomic_load_n(&r->st.paused, __ATOMIC_RELAXED);
    out->slots = r->st.slots;
    out->max_indirect = r->st.max_indirect;
    out->indirect_bufs = r->st.indirect_bufs;
    out->polls = __atomic_load_n(&r->st.polls, __ATOMIC_RELAXED);
    out->polls_busy = __atomic_load_n(&r->st.polls_busy, __ATOMIC_RELAXED);
    out->poll_idle_threshold = r->st.poll_idle_threshold;
    out->persistent = r->st.persistent;
    struct td_pgstats pg = {0};
    if (r->pg)
        td_pgcache_stats(r->pg, &pg);
    out->pgrant_maps = pg.maps;
    out->pgrant_hits = pg.hits;
    out->pgrant_evictions = pg.evictions;
    out->pgrant_map_failures = pg.map_failures;
    out->pgrant_full = pg.full;
    out->pgrants_mapped = pg.mapped;
    out->pgrants_max = pg.max;
    /* Written once, before the errors[OVERFLOW] bump; a torn read shows a prefix. */
    memcpy(out->halted, r->st.halted, sizeof(out->halted));
    out->halted[sizeof(out->halted) - 1] = 0;
}

void td_ring_io_stats(struct td_ring *r, struct td_io_stats *out)
{
    /* As td_ring_stats: single-writer values, each read atomically. */
    for (unsigned i = 0; i < 2; i++) {
        out->submitted[i] = __atomic_load_n(&r->ios.submitted[i], __ATOMIC_RELAXED);
        out->completed[i] = __atomic_load_n(&r->ios.completed[i], __ATOMIC_RELAXED);
        out->usecs[i] = __atomic_load_n(&r->ios.usecs[i], __ATOMIC_RELAXED);
        out->max_usecs[i] = __atomic_load_n(&r->ios.max_usecs[i], __ATOMIC_RELAXED);
    }
    out->retried = __atomic_load_n(&r->ios.retried, __ATOMIC_RELAXED);
    out->timed_out = __atomic_load_n(&r->ios.timed_out, __ATOMIC_RELAXED);
    out->nr_ents = r->nslots;
    out->req_prod = hdr(r)->req_prod;
    out->req_event = hdr(r)->req_event;
    out->rsp_prod = hdr(r)->rsp_prod;
    out->rsp_event = hdr(r)->rsp_event;
    out->req_cons = __atomic_load_n(&r->req_cons, __ATOMIC_RELAXED);
    out->rsp_prod_pvt = __atomic_load_n(&r->rsp_prod_pvt, __ATOMIC_RELAXED);
}

void td_ring_set_req_timeout(struct td_ring *r, uint32_t secs)
{
    __atomic_store_n(&r->req_timeout_ns, (uint64_t)secs * 1000000000ull, __ATOMIC_RELAXED);
}

void td_ring_inject_eagain(struct td_ring *r, uint32_t n)
{
    __atomic_store_n(&r->inject_eagain, n, __ATOMIC_RELAXED);
}
