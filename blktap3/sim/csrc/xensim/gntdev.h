/*
 * xensim: the handle shared by libxengnttab and libxengntshr (both are
 * `struct xengntdev_handle` in xengnttab.h) and its list of mappings.
 */
#ifndef XENSIM_GNTDEV_H
#define XENSIM_GNTDEV_H

#include "xensim.h"

#include <xen/event_channel.h>

struct xs_mapping {
    struct xs_mapping *next;
    void *addr;
    uint32_t count;
    uint32_t notify_offset; /* (uint32_t)-1: none */
    evtchn_port_t notify_port; /* (evtchn_port_t)-1: none */
    uint32_t notify_dom;
    /* gntshr: the shared pages and their grant refs; gnttab: the refs mapped */
    uint64_t *pfns;
    uint32_t *refs;
    /* gnttab only: the granting domain of each ref, and whether the map pinned them
     * writable (the pins go with the mapping) */
    uint32_t *doms;
    int writable;
};

struct xengntdev_handle {
    uint32_t domid;
    int fd;
    uint32_t max_grants;
    pthread_mutex_t lock;
    struct xs_mapping *maps;
};

struct xengntdev_handle *xs_gntdev_open(uint32_t domid);
void xs_gntdev_close(struct xengntdev_handle *h);
void xs_gntdev_add(struct xengntdev_handle *h, struct xs_mapping *mp);
struct xs_mapping *xs_gntdev_take(struct xengntdev_handle *h, void *addr, uint32_t count);
void xs_unmap_notify(struct xs_mapping *mp);
/* gnttab: drop the pins of a mapping and free it (the pages are unmapped already). */
void xs_mapping_unpin(struct xs_mapping *mp);
/* /dev/xen/gntdev opened without libxengnttab (gntdevnode.c): whether `path` is the
 * node, and an open of it (a handle's fd, or -1 and errno). */
int xs_is_gntdev_node(const char *path);
int xs_gntdev_node_open(void);

#endif
