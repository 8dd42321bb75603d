/* cffi declarations of the data path (parsed by cffi, not compiled; see datapath.h). */

#define BLKIF_OP_READ 0
#define BLKIF_OP_WRITE 1
#define BLKIF_OP_WRITE_BARRIER 2
#define BLKIF_OP_FLUSH_DISKCACHE 3
#define BLKIF_OP_DISCARD 5
#define BLKIF_OP_INDIRECT 6
#define BLKIF_RSP_OKAY 0
#define BLKIF_RSP_ERROR -1
#define BLKIF_RSP_EOPNOTSUPP -2
#define BLKIF_MAX_SEGMENTS_PER_REQUEST 11
#define BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST 8
#define VDISK_CDROM 1
#define VDISK_READONLY 4

#define TD_PROTO_NATIVE 1
#define TD_PROTO_X86_32 2
#define TD_PROTO_X86_64 3
#define TD_ENGINE_AUTO 0
#define TD_ENGINE_URING 1
#define TD_ENGINE_SYNC 2
#define TD_ENGINE_NULL 3
#define TD_ERR_MAX 13
#define TD_SEGS_PER_INDIRECT_PAGE ...
#define TD_MAX_INDIRECT_SEGS ...
#define TD_MAX_RING_ORDER ...

struct blkif_request_segment { uint32_t gref; uint8_t first_sect; uint8_t last_sect; ...; };
struct blkif_request {
    uint8_t operation; uint8_t nr_segments; uint16_t handle; uint64_t id;
    uint64_t sector_number; struct blkif_request_segment seg[11]; ...;
};
struct blkif_request_discard {
    uint8_t operation; uint8_t flag; uint16_t handle; uint64_t id;
    uint64_t sector_number; uint64_t nr_sectors; ...;
};
struct blkif_x86_32_request {
    uint8_t operation; uint8_t nr_segments; uint16_t handle; uint64_t id;
    uint64_t sector_number; struct blkif_request_segment seg[11]; ...;
};
struct blkif_x86_32_request_discard {
    uint8_t operation; uint8_t flag; uint16_t handle; uint64_t id;
    uint64_t sector_number; uint64_t nr_sectors; ...;
};
struct blkif_x86_32_request_indirect {
    uint8_t operation; uint8_t indirect_op; uint16_t nr_segments; uint64_t id;
    uint64_t sector_number; uint16_t handle; uint32_t indirect_grefs[8]; ...;
};
struct blkif_x86_32_response { uint64_t id; uint8_t operation; int16_t status; ...; };
struct blkif_x86_64_request {
    uint8_t operation; uint8_t nr_segments; uint16_t handle; uint64_t id;
    uint64_t sector_number; struct blkif_request_segment seg[11]; ...;
};
struct blkif_x86_64_request_discard {
    uint8_t operation; uint8_t flag; uint16_t handle; uint64_t id;
    uint64_t sector_number; uint64_t nr_sectors; ...;
};
struct blkif_x86_64_request_indirect {
    uint8_t operation; uint8_t indirect_op; uint16_t nr_segments; uint64_t id;
    uint64_t sector_number; uint16_t handle; uint32_t indirect_grefs[8]; ...;
};
struct blkif_x86_64_response { uint64_t id; uint8_t operation; int16_t status; ...; };
struct blkif_request_indirect {
    uint8_t operation; uint8_t indirect_op; uint16_t nr_segments; uint64_t id;
    uint64_t sector_number; uint16_t handle; uint32_t indirect_grefs[8]; ...;
};
struct blkif_response { uint64_t id; uint8_t operation; int16_t status; ...; };

struct td_seg { uint32_t gref; uint8_t first_sect; uint8_t last_sect; ...; };
struct td_req {
    uint8_t operation; uint8_t indirect_op; uint16_t nr_segments; uint8_t flag;
    uint16_t handle; uint64_t id; uint64_t sector_number; uint64_t nr_sectors;
    uint32_t indirect_grefs[8]; struct td_seg seg[11]; ...;
};
int td_ring_prod_check(uint32_t rp, uint32_t req_cons, uint32_t rsp_prod_pvt,
                       uint32_t nslots);
void td_req_fetch(int proto, const void *slot, struct td_req *out);
int td_req_check(struct td_req *r, uint64_t dev_sectors, int readonly, int discard,
                 uint32_t max_indirect);
int td_req_check_segs(struct td_req *r, const struct td_seg *segs, uint64_t dev_sectors,
                      int readonly);
int td_req_check_align(const struct td_req *r, const struct td_seg *segs, uint32_t sector_size);
uint8_t td_rsp_operation(const struct td_req *r);
const void *td_ring_req_slot(int proto, void *sring, uint32_t nr_pages, uint32_t idx);
void td_ring_put_rsp(int proto, void *sring, uint32_t nr_pages, uint32_t idx,
                     uint64_t id, uint8_t op, int16_t status);

struct td_image_info {
    uint64_t sectors; uint32_t sector_size; uint32_t physical_sector_size; uint32_t info;
    int32_t o_direct; int32_t discard; ...;
};
struct td_image;
int td_image_open(const char *driver, const char *path, int readonly, int o_direct,
                  struct td_image **out);
void td_image_close(struct td_image *img);
const struct td_image_info *td_image_info(const struct td_image *img);
struct td_vhd_layer_desc {
    const char *path; uint32_t type; uint32_t block_size; uint32_t max_entries;
    uint32_t bitmap_size; uint64_t table_offset; uint64_t data_start;
    uint64_t footer_offset; uint64_t sectors; ...;
};
int td_image_open_vhd(const struct td_vhd_layer_desc *layers, uint32_t n, int readonly,
                      int o_direct, struct td_image **out);
int td_image_rw(struct td_image *img, int engine, int write, void *buf,
                uint64_t sector, uint32_t nr_sectors);
int td_image_sync_io(struct td_image *img, int write, void *buf, uint64_t sector,
                     uint32_t nr);
int td_image_discard(struct td_image *img, uint64_t sector, uint64_t nr);
int td_image_flush(struct td_image *img);
int td_image_set_log(struct td_image *img, const char *path, uint64_t offset,
                     uint64_t nbits);
int td_image_set_mirror_image(struct td_image *img, struct td_image *secondary);
int td_image_set_mirror_nbd(struct td_image *img, int fd);
#define TD_MIRROR_NONE 0
#define TD_MIRROR_IMAGE 1
#define TD_MIRROR_NBD 2
struct td_mirror_stats {
    int32_t kind; int32_t active; uint64_t writes; uint64_t flushes; uint64_t failed;
    int32_t last_error; ...;
};
void td_image_mirror_stats(struct td_image *img, struct td_mirror_stats *out);

struct td_stats {
    uint64_t reqs[8]; uint64_t indirect[2]; uint64_t indirect_pages; uint64_t segments; uint64_t sectors_read; uint64_t sectors_written;
    uint64_t kicks_in; uint64_t kicks_out; uint64_t responses; uint64_t errors[13];
    uint64_t in_flight; uint64_t batches; int32_t o_direct; int32_t engine; int32_t paused;
    int32_t slots; uint32_t max_indirect; uint32_t indirect_bufs; char halted[64];
    uint64_t polls; uint64_t polls_busy; uint32_t poll_idle_threshold;
    int32_t persistent; uint32_t pgrants_mapped; uint32_t pgrants_max; uint64_t pgrant_maps;
    uint64_t pgrant_hits; uint64_t pgrant_evictions; uint64_t pgrant_map_failures;
    uint64_t pgrant_full; ...;
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
const char *td_ring_connect_failure(void);
int td_ring_pause(struct td_ring *r, int timeout_ms);
int td_ring_resume(struct td_ring *r, struct td_image *img);
int td_ring_disconnect(struct td_ring *r, int timeout_ms);
void td_ring_stats(struct td_ring *r, struct td_stats *out);

struct td_io_stats {
    uint64_t submitted[2]; uint64_t completed[2]; uint64_t usecs[2]; uint64_t max_usecs[2];
    uint64_t retried; uint64_t timed_out;
    uint32_t nr_ents; uint32_t req_prod; uint32_t req_cons; uint32_t req_event;
    uint32_t rsp_prod; uint32_t rsp_prod_pvt; uint32_t rsp_event; ...;
};
void td_ring_io_stats(struct td_ring *r, struct td_io_stats *out);
void td_ring_set_req_timeout(struct td_ring *r, uint32_t secs);
void td_ring_inject_eagain(struct td_ring *r, uint32_t n);
