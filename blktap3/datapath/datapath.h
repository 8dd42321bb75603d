/*
 * datapath.h: the C data path's interface: image drivers, io engines, request
 * checks and the ring service. The cffi declarations in datapath_cdef.h mirror the
 * public part of this file (checked by the compiler through cffi's `...;`).
 */
#ifndef BLKTAP3_DATAPATH_H
#define BLKTAP3_DATAPATH_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include "xenring.h"

/* ---- request: the private copy a request is checked on (XSA-155) ---- */

/* One segment; laid out as Xen's blkif_request_segment, so that an indirect page's
 * array is grant-copied straight into private td_seg entries. */
struct td_seg {
    uint32_t gref;
    uint8_t  first_sect;
    uint8_t  last_sect;
};
_Static_assert(sizeof(struct td_seg) == sizeof(struct blkif_request_segment) &&
                   offsetof(struct td_seg, first_sect) ==
                       offsetof(struct blkif_request_segment, first_sect) &&
                   offsetof(struct td_seg, last_sect) ==
                       offsetof(struct blkif_request_segment, last_sect),
               "td_seg is blkif_request_segment");

struct td_req {
    uint8_t  operation;
    uint8_t  indirect_op;   /* INDIRECT: the operation inside (raw, checked before use) */
    uint16_t nr_segments;   /* raw value from the guest (16 bits for INDIRECT), checked */
    uint8_t  flag;          /* DISCARD: BLKIF_DISCARD_SECURE */
    uint16_t handle;
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors;    /* DISCARD: from the request; R/W: sum of the segments */
    /* INDIRECT: the pages holding its segments (the first TD_INDIRECT_PAGES are used) */
    uint32_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    struct td_seg seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};

/* Why a request was refused: the index of its error counter. */
enum td_err {
    TD_OK = 0,
    TD_ERR_OP = 1,          /* unknown operation (answered EOPNOTSUPP) */
    TD_ERR_NSEG = 2,        /* nr_segments 0 (r/w) or > 11 */
    TD_ERR_SECT = 3,        /* first_sect > last_sect or last_sect > 7 */
    TD_ERR_RANGE = 4,       /* past the end of the device */
    TD_ERR_READONLY = 5,    /* write to a read-only VBD */
    TD_ERR_GRANT = 6,       /* grant copy failed: a grant the guest did not give */
    TD_ERR_IO = 7,          /* the image driver failed */
    TD_ERR_UNSUPPORTED = 8, /* answered EOPNOTSUPP (INDIRECT or discard not offered, secure discard) */
    TD_ERR_OVERFLOW = 9,    /* req_prod more than a ring ahead: ring halted */
    TD_ERR_INDIRECT_OP = 10,    /* INDIRECT whose indirect_op is not READ or WRITE */
    TD_ERR_INDIRECT_NSEG = 11,  /* INDIRECT with 0 segments or more than offered */
    TD_ERR_INDIRECT_GRANT = 12, /* an indirect page the guest did not give */
    TD_ERR_MAX = 13
};

/* Is the front-end's req_prod `rp` sane, given what we consumed and answered?
 * Past the ring (more requests than slots) or behind what we already took (the
 * consumer would walk ~2^32 stale slots): the ring must halt. */
enum td_prod { TD_PROD_OK = 0, TD_PROD_PAST_RING = 1, TD_PROD_BEHIND = 2 };
int td_ring_prod_check(uint32_t rp, uint32_t req_cons, uint32_t rsp_prod_pvt,
                       uint32_t nslots);

/* Copy one request slot of a shared ring in layout `proto` into private memory. */
void td_req_fetch(int proto, const void *slot, struct td_req *out);
/* Check a private copy; fills nr_sectors for r/w. Returns an enum td_err.
 * INDIRECT: only its header (`max_indirect` segments offered, 0: not offered, answered
 * EOPNOTSUPP); TD_OK means "copy its TD_INDIRECT_PAGES(nr_segments) indirect pages into
 * private memory, then check the segments there with td_req_check_segs". */
int td_req_check(struct td_req *r, uint64_t dev_sectors, int readonly, int discard,
                 uint32_t max_indirect);
/* The segment checks of an INDIRECT request whose header passed td_req_check, on the
 * private copy `segs` of its nr_segments segments: as a direct request's (sectors,
 * read-only, range); fills nr_sectors. */
int td_req_check_segs(struct td_req *r, const struct td_seg *segs, uint64_t dev_sectors,
                      int readonly);
/* `sector-size` as alignment only (blkif.h; sectors stay 512 bytes): a request that
 * moves data must start on a logical block and each segment (of nr_segments, after
 * the other checks) cover whole blocks, else TD_ERR_SECT, as blkback. */
int td_req_check_align(const struct td_req *r, const struct td_seg *segs, uint32_t sector_size);
/* The operation a response carries: INDIRECT answers with its indirect_op (blkback). */
uint8_t td_rsp_operation(const struct td_req *r);
/* Address of request slot `idx` / write response `idx`, in a shared ring. */
const void *td_ring_req_slot(int proto, void *sring, uint32_t nr_pages, uint32_t idx);
void td_ring_put_rsp(int proto, void *sring, uint32_t nr_pages, uint32_t idx,
                     uint64_t id, uint8_t op, int16_t status);

/* ---- images ---- */

struct td_image_info {
    uint64_t sectors;
    uint32_t sector_size;
    uint32_t physical_sector_size;
    uint32_t info;
    int32_t  o_direct;
    int32_t  discard;
};

struct td_vhd;
struct td_cbt;
struct td_mirror;

struct td_image {
    int fd;                 /* -1 for the null driver; a VHD's leaf file */
    int readonly;
    struct td_image_info info;
    struct td_vhd *vhd;     /* the VHD chain, or NULL (raw, null) */
    /* Several threads share one image (the ring's, the NBD export's): the lock guards
     * the VHD metadata and the mirror; the CBT map is marked atomically. */
    pthread_mutex_t lock;
    struct td_cbt *cbt;     /* changed-block log (cbt.c), or NULL */
    struct td_mirror *mirror;   /* the secondary (mirror.c), or NULL */
    /* A data sync of this image failed: see td_sync. Cleared only by a new open. */
    int sync_failed;
};

int td_image_open(const char *driver, const char *path, int readonly, int o_direct,
                  struct td_image **out);

/* One file of a VHD chain as the format module measured it (vhdformat.Layer). */
struct td_vhd_layer_desc {
    const char *path;
    uint32_t type;          /* 2 fixed, 3 dynamic, 4 differencing */
    uint32_t block_size;    /* bytes (dynamic and differencing) */
    uint32_t max_entries;   /* BAT entries */
    uint32_t bitmap_size;   /* bytes of a block's bitmap, whole sectors */
    uint64_t table_offset;  /* the BAT */
    uint64_t data_start;    /* end of the metadata: no block below */
    uint64_t footer_offset; /* the footer at the end: no block above */
    uint64_t sectors;       /* the disk's size */
};
/* A VHD chain, leaf first; parents read-only. */
int td_image_open_vhd(const struct td_vhd_layer_desc *layers, uint32_t n, int readonly,
                      int o_direct, struct td_image **out);
/* The hot path: the file a request of `nr` sectors at `sector` is one extent of, and
 * its offset there; -1 when it is not (serve it with td_image_sync_io). */
int td_image_map(struct td_image *img, int write, uint64_t sector, uint32_t nr,
                 uint64_t *off);
/* td_image_map of a write whose image may be mirrored: also where the write goes on the
 * secondary (*sfd, *soff), queued beside the primary's and reported with
 * td_image_mirror_done. *sfd -1 and a primary fd: no mirror to write. -1: serve it
 * with td_image_sync_io (an NBD secondary, a VHD block to allocate on either side). */
int td_image_map_mirrored(struct td_image *img, uint64_t sector, uint32_t nr,
                          uint64_t *off, int *sfd, uint64_t *soff);
/* A ring's write mapped by td_image_map_mirrored with *sfd -1, whose secondary is an NBD
 * server: send its secondary half now (0 and *handle; -1: nothing to wait for), then,
 * once the primary's half completed, td_image_mirror_wait for the reply. */
int td_image_mirror_send(struct td_image *img, const void *buf, uint64_t sector,
                         uint32_t nr, uint64_t *handle);
void td_image_mirror_wait(struct td_image *img, uint64_t handle);
/* The secondary's half of a write mapped by td_image_map_mirrored completed: 0, or
 * -errno (the secondary is then dropped and counted). */
void td_image_mirror_done(struct td_image *img, int err);
/* A request served synchronously in the caller's thread (whatever td_image_map did
 * not map; barriers). 0 or -errno. */
int td_image_sync_io(struct td_image *img, int write, void *buf, uint64_t sector,
                     uint32_t nr);

/* vhd.c, behind the td_image_* calls above. */
int td_vhd_open(const struct td_vhd_layer_desc *layers, uint32_t n, int readonly,
                int o_direct, struct td_vhd **out, int *fd, int *direct);
void td_vhd_close(struct td_vhd *v);
int td_vhd_map(struct td_vhd *v, int write, uint64_t sector, uint32_t nr, uint64_t *off);
int td_vhd_io(struct td_vhd *v, int write, void *buf, uint64_t sector, uint32_t nr);
int td_vhd_discard(struct td_vhd *v, uint64_t sector, uint64_t nr);
int td_vhd_sync_failed(struct td_vhd *v);
void td_image_close(struct td_image *img);
const struct td_image_info *td_image_info(const struct td_image *img);
/* Discard (punch) a range of the image and its mirror; marks the CBT log. 0 or -errno. */
int td_image_discard(struct td_image *img, uint64_t sector, uint64_t nr);
/* FLUSH: the image, the CBT log and the secondary durable. 0 or -errno; -EIO for good
 * once any data sync of this open image failed (td_sync). */
int td_image_flush(struct td_image *img);
/* Track changed blocks in the log at `path` (bitmap at `offset`, `nbits` bits, checked
 * by the caller), replacing any log. Only before the image is shared. 0 or -errno. */
int td_image_set_log(struct td_image *img, const char *path, uint64_t offset,
                     uint64_t nbits);
/* Mirror writes to a secondary image (owned from now on) / an NBD server on the
 * connected socket `fd` (owned from now on). Only before the image is shared. */
int td_image_set_mirror_image(struct td_image *img, struct td_image *secondary);
int td_image_set_mirror_nbd(struct td_image *img, int fd);
enum td_mirror_kind { TD_MIRROR_NONE = 0, TD_MIRROR_IMAGE = 1, TD_MIRROR_NBD = 2 };
struct td_mirror_stats {
    int32_t kind;
    int32_t active;         /* 0 once the secondary failed and was dropped */
    uint64_t writes;        /* writes the secondary completed */
    uint64_t flushes;
    uint64_t failed;        /* secondaries dropped on failure (blktap's nbd_mirror_failed) */
    int32_t last_error;     /* errno of the failure */
};
void td_image_mirror_stats(struct td_image *img, struct td_mirror_stats *out);

/* cbt.c and mirror.c, behind the td_image_* calls above. */
#define TD_CBT_BLOCK 65536u
int td_cbt_open(const char *path, uint64_t offset, uint64_t nbits, struct td_cbt **out);
void td_cbt_close(struct td_cbt *c);
void td_cbt_mark(struct td_cbt *c, uint64_t sector, uint64_t nr);
int td_cbt_sync(struct td_cbt *c);
int td_mirror_open_image(struct td_image *sec, struct td_mirror **out);
int td_mirror_open_nbd(int fd, struct td_mirror **out);
void td_mirror_close(struct td_mirror *m);
int td_mirror_active(const struct td_mirror *m);
void td_mirror_write(struct td_mirror *m, const void *buf, uint64_t sector, uint32_t nr);
void td_mirror_discard(struct td_mirror *m, uint64_t sector, uint64_t nr);
void td_mirror_flush(struct td_mirror *m);
void td_mirror_stats(const struct td_mirror *m, struct td_mirror_stats *out);
/* Where a write goes on an image secondary (its fd), -1 when not one extent there or
 * no active image secondary. */
int td_mirror_map(struct td_mirror *m, uint64_t sector, uint32_t nr, uint64_t *off);
int td_mirror_is_nbd(const struct td_mirror *m);
void td_mirror_wrote(struct td_mirror *m);
/* An NBD secondary's half of a write: sent now (0, *handle) or -1 (no active NBD
 * secondary, or it failed and was dropped); td_mirror_wait reads its reply. Both under
 * the primary's lock. */
int td_mirror_send(struct td_mirror *m, const void *buf, uint64_t sector, uint32_t nr,
                   uint64_t *handle);
void td_mirror_wait(struct td_mirror *m, uint64_t handle);
/* Drop the secondary after a failure (the caller holds the primary's lock). */
void td_mirror_failed(struct td_mirror *m, int err);

/* ---- io engines ---- */

enum td_engine_kind { TD_ENGINE_AUTO = 0, TD_ENGINE_URING = 1, TD_ENGINE_SYNC = 2,
                      TD_ENGINE_NULL = 3 };
enum td_io_op { TD_IO_READ = 0, TD_IO_WRITE = 1 };

struct td_cqe {
    uint32_t tag;
    int32_t  res;           /* bytes moved, or -errno */
};

struct td_engine;           /* opaque: io_uring or a synchronous fallback */
int td_engine_open(int kind, uint32_t depth, struct td_engine **out);
void td_engine_close(struct td_engine *e);
int td_engine_kind(const struct td_engine *e);
/* Queue one I/O; nothing reaches the kernel before td_engine_submit (uring). */
int td_engine_prep(struct td_engine *e, int op, int fd, void *buf, uint32_t len,
                   uint64_t off, uint32_t tag);
/* Submit everything queued in one call. Returns 0 or -errno. */
int td_engine_submit(struct td_engine *e);
/* Reap up to `max` completions without blocking. */
uint32_t td_engine_reap(struct td_engine *e, struct td_cqe *out, uint32_t max);
/* A file descriptor readable when completions may be ready; -1 when never needed. */
int td_engine_fd(const struct td_engine *e);
/* Clear the wake-up of td_engine_fd once poll() reported it. */
void td_engine_clear(struct td_engine *e);
/* Completions are waiting (a memory read, no syscall: for polling). */
int td_engine_ready(struct td_engine *e);
/* Sleep inside the engine (io_uring only, else -EOPNOTSUPP): td_engine_fd is gone
 * after this; the caller arms watches and waits with td_engine_wait instead. */
int td_engine_use_watches(struct td_engine *e);
/* Queue a one-shot "fd readable" watch; td_engine_woken reports `bit` once it fired
 * (then it is disarmed: watch again). Submitted with the next submit or wait. */
int td_engine_watch(struct td_engine *e, int fd, uint32_t bit);
/* Bits of the watches that fired, seen by td_engine_reap since the last call. */
uint32_t td_engine_woken(struct td_engine *e);
/* Submit everything queued and sleep until at least one completion (I/O or watch)
 * is there: one syscall. Returns 0 or -errno (-EINTR: just call again). */
int td_engine_wait(struct td_engine *e);

/* pread/pwrite of all `len` bytes (EINTR retried, EOF is -EIO): 0 or -errno. */
int td_pio(int fd, int write, void *buf, size_t len, uint64_t off);
/* fdatasync(fd); 0 or -errno. A failure is remembered in *failed, for good: the kernel
 * reports a failed writeback once and may have dropped the data with it (the pages are
 * marked clean), so a later fdatasync that succeeds says nothing of what was written
 * before (PostgreSQL's "fsyncgate", 2018). A FLUSH after one has failed must not be
 * answered OKAY until the image is opened again. */
int td_sync(int fd, int *failed);

/* One synchronous read/write through an engine (tests, tools). */
int td_image_rw(struct td_image *img, int engine, int write, void *buf,
                uint64_t sector, uint32_t nr_sectors);

/* ---- the ring service ---- */

struct td_stats {
    uint64_t reqs[8];       /* by op: 0..6 as BLKIF_OP_*, 7 anything else */
    uint64_t indirect[2];   /* INDIRECT requests with a sane header, by indirect_op R/W */
    uint64_t indirect_pages;    /* indirect pages read (copied, or through a mapping) */
    uint64_t segments;
    uint64_t sectors_read;
    uint64_t sectors_written;
    uint64_t kicks_in;
    uint64_t kicks_out;
    uint64_t responses;
    uint64_t errors[TD_ERR_MAX];
    uint64_t in_flight;
    uint64_t batches;
    int32_t  o_direct;
    int32_t  engine;
    int32_t  paused;
    int32_t  slots;
    uint32_t max_indirect;  /* segments per INDIRECT request enforced (0: not offered) */
    uint32_t indirect_bufs; /* INDIRECT requests that can be in flight at once */
    char     halted[64];
    uint64_t polls;         /* spins for work before sleeping (polling-duration) */
    uint64_t polls_busy;    /* spins skipped: less CPU idle than polling-idle-threshold */
    uint32_t poll_idle_threshold;
    /* persistent grants (pgrant.c): negotiated, and the cache's counters */
    int32_t  persistent;
    uint32_t pgrants_mapped;    /* mappings held now */
    uint32_t pgrants_max;
    uint64_t pgrant_maps;       /* grants mapped */
    uint64_t pgrant_hits;       /* segments moved through a mapping already held */
    uint64_t pgrant_evictions;  /* mappings dropped for room (least recently used) */
    uint64_t pgrant_map_failures;   /* grants that would not map: grant-copied instead */
    uint64_t pgrant_full;       /* grant-copied: cache full, nothing cold to evict */
};

/* CPU time of all CPUs, from /proc/stat (cpuidle.c): for polling's idle threshold. */
struct td_cpu_times { uint64_t total; uint64_t idle; };
int td_cpu_read(struct td_cpu_times *out);
/* Percent of the CPU time between two readings that was idle; -1 when unknown. */
int td_cpu_idle_pct(const struct td_cpu_times *before, const struct td_cpu_times *after);

struct td_ring;
int td_ring_connect(struct td_image *img, uint32_t domid, uint32_t devid,
                    const uint32_t *grefs, uint32_t order, uint32_t port, int proto,
                    int engine, uint32_t poll_us, uint32_t poll_idle, uint32_t max_indirect,
                    int discard, int persistent,
                    struct td_ring **out);
/* After a failed td_ring_connect (same thread): the step that failed and its values
 * ("grant map of the ring: domain 7, 1 page(s), first ref 8"), or "" for another cause. */
const char *td_ring_connect_failure(void);
int td_ring_pause(struct td_ring *r, int timeout_ms);
int td_ring_resume(struct td_ring *r, struct td_image *img);
int td_ring_disconnect(struct td_ring *r, int timeout_ms);
void td_ring_stats(struct td_ring *r, struct td_stats *out);

/* ---- what blktap's stats files hold (vbd3-<domid>-<devid>/{statistics,io_ring},
 * td3-<pid>/vbd-<domid>-<devid>): kept apart from td_stats, read the same way ---- */
struct td_io_stats {
    uint64_t submitted[2];  /* [0] reads, [1] writes (direct or inside INDIRECT) queued */
    uint64_t completed[2];  /* their I/O completed, well or not */
    uint64_t usecs[2];      /* sum of their times from queued to completed */
    uint64_t max_usecs[2];
    uint64_t retried;       /* I/O reissued after EAGAIN/EBUSY/EINTR (blktap's retry) */
    uint64_t timed_out;     /* failed for being older than req_timeout when retried */
    /* The back ring, as blktap's io_ring file shows it (xen-ringwatch). */
    uint32_t nr_ents, req_prod, req_cons, req_event, rsp_prod, rsp_prod_pvt, rsp_event;
};
void td_ring_io_stats(struct td_ring *r, struct td_io_stats *out);
/* blktap's req_timeout (drivers/tapdisk-vbd.c, tapdisk_vbd_request_should_retry): an
 * I/O that failed with EAGAIN, EBUSY or EINTR is reissued until the request is older
 * than `secs`, then answered BLKIF_RSP_ERROR with a log line. Default 120 (blktap's
 * TD_VBD_REQUEST_TIMEOUT). */
void td_ring_set_req_timeout(struct td_ring *r, uint32_t secs);
/* Error-branch tests: the next `n` I/O completions report -EAGAIN instead. */
void td_ring_inject_eagain(struct td_ring *r, uint32_t n);

#endif
