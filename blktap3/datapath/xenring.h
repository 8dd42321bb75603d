/*
 * xenring.h: Xen's own blkif/ring headers, made usable from user space, plus the
 * two x86 ABI layouts of the blkif ring.
 *
 * Shared by the back-end ring service (blktap3/datapath) and the simulated guest's
 * front-end driver (blktap3/sim/guestdrv): both sides must agree byte for byte.
 */
#ifndef BLKTAP3_XENRING_H
#define BLKTAP3_XENRING_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

/*
 * ring.h only picks its barrier macros when __XEN_INTERFACE_VERSION__ is recent
 * enough; user-space tools get that with __XEN_TOOLS__ (also passed on the command
 * line, so that whichever Xen header comes first sees it). The xen_*mb() macros must
 * then come from us: fences, because the ring is shared with another domain
 * (another process under xensim) running on another CPU.
 */
#ifndef __XEN_TOOLS__
#define __XEN_TOOLS__ 1
#endif
#define xen_mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

#include <xen/io/blkif.h>
#include <xen/io/protocols.h>

#define TD_PAGE_SIZE 4096u
#define TD_SECTOR_SHIFT 9
#define TD_SECTORS_PER_PAGE 8u
#define TD_MAX_RING_ORDER 4u  /* blktap3.abi.MAX_RING_PAGE_ORDER: blkback's and QEMU's */
#define TD_MAX_RING_PAGES (1u << TD_MAX_RING_ORDER)
/* An indirect page is an array of segments (blkif.h); a request has at most
 * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST of them: 4096 segments, 16 MiB. */
#define TD_SEGS_PER_INDIRECT_PAGE ((uint32_t)(TD_PAGE_SIZE / sizeof(struct blkif_request_segment)))
#define TD_MAX_INDIRECT_SEGS (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * TD_SEGS_PER_INDIRECT_PAGE)
/* Indirect pages holding `nseg` segments (nseg bounded by the caller). */
#define TD_INDIRECT_PAGES(nseg) \
    (((uint32_t)(nseg) + TD_SEGS_PER_INDIRECT_PAGE - 1) / TD_SEGS_PER_INDIRECT_PAGE)

/*
 * Which layout `protocol` names (blkif.h: a missing key means native). The numbers are
 * Xen's `enum blkif_protocol`, as XENBLKIF_CONNECT carries them, so the control message's
 * value reaches the ring unconverted (blktap3.abi.BlkifProtocol; a test pins both).
 */
enum td_proto {
    TD_PROTO_NATIVE = 1,
    TD_PROTO_X86_32 = 2,
    TD_PROTO_X86_64 = 3,
};

/*
 * The x86 ABI layouts. Xen's public headers only carry the native one; these are
 * the definitions Linux blkback (common.h) and QEMU (xen_blkif.h) use: a 32-bit
 * guest aligns uint64_t on 4 bytes (pack 4), a 64-bit guest on 8.
 */
#pragma pack(push, 4)
struct blkif_x86_32_request {
    uint8_t        operation;
    uint8_t        nr_segments;
    blkif_vdev_t   handle;
    uint64_t       id;
    blkif_sector_t sector_number;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct blkif_x86_32_request_discard {
    uint8_t        operation;
    uint8_t        flag;
    blkif_vdev_t   handle;
    uint64_t       id;
    blkif_sector_t sector_number;
    uint64_t       nr_sectors;
};
/* Xen's blkif_request_indirect as an i386 compiler lays it out (its `pad` included). */
struct blkif_x86_32_request_indirect {
    uint8_t        operation;
    uint8_t        indirect_op;
    uint16_t       nr_segments;
    uint64_t       id;
    blkif_sector_t sector_number;
    blkif_vdev_t   handle;
    grant_ref_t    indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint64_t       pad;
};
struct blkif_x86_32_response {
    uint64_t       id;
    uint8_t        operation;
    int16_t        status;
};
typedef struct blkif_x86_32_request blkif_x86_32_request_t;
typedef struct blkif_x86_32_response blkif_x86_32_response_t;
DEFINE_RING_TYPES(blkif_x86_32, struct blkif_x86_32_request, struct blkif_x86_32_response);
#pragma pack(pop)

struct blkif_x86_64_request {
    uint8_t        operation;
    uint8_t        nr_segments;
    blkif_vdev_t   handle;
    uint64_t       __attribute__((__aligned__(8))) id;
    blkif_sector_t sector_number;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct blkif_x86_64_request_discard {
    uint8_t        operation;
    uint8_t        flag;
    blkif_vdev_t   handle;
    uint64_t       __attribute__((__aligned__(8))) id;
    blkif_sector_t sector_number;
    uint64_t       nr_sectors;
};
struct blkif_x86_64_request_indirect {
    uint8_t        operation;
    uint8_t        indirect_op;
    uint16_t       nr_segments;
    uint64_t       __attribute__((__aligned__(8))) id;
    blkif_sector_t sector_number;
    blkif_vdev_t   handle;
    grant_ref_t    indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
};
struct blkif_x86_64_response {
    uint64_t       __attribute__((__aligned__(8))) id;
    uint8_t        operation;
    int16_t        status;
};
typedef struct blkif_x86_64_request blkif_x86_64_request_t;
typedef struct blkif_x86_64_response blkif_x86_64_response_t;
DEFINE_RING_TYPES(blkif_x86_64, struct blkif_x86_64_request, struct blkif_x86_64_response);

/* Every view of a request lies inside its ring slot. */
_Static_assert(sizeof(struct blkif_x86_32_request_indirect) <= sizeof(struct blkif_x86_32_request),
               "x86_32 indirect request fits its slot");
_Static_assert(sizeof(struct blkif_x86_64_request_indirect) <= sizeof(struct blkif_x86_64_request),
               "x86_64 indirect request fits its slot");
_Static_assert(sizeof(struct blkif_request_indirect) <= sizeof(struct blkif_request),
               "native indirect request fits its slot");

/* Slots of a ring of `nr_pages` pages in layout `proto` (a power of two). */
#define TD_RING_SLOTS(proto, nr_pages)                                              \
    ((proto) == TD_PROTO_X86_32                                                     \
         ? __CONST_RING_SIZE(blkif_x86_32, TD_PAGE_SIZE * (nr_pages))               \
     : (proto) == TD_PROTO_X86_64                                                   \
         ? __CONST_RING_SIZE(blkif_x86_64, TD_PAGE_SIZE * (nr_pages))               \
         : __CONST_RING_SIZE(blkif, TD_PAGE_SIZE * (nr_pages)))

#endif
