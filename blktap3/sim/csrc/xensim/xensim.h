/*
 * xensim: shared state of the simulated Xen machine and helpers used by every
 * part of the library (event channels, grant tables, xenctrl, redirects).
 *
 * The machine lives in a run directory ($XENSIM_DIR) so that separate processes
 * share it:
 *   machine          struct xs_machine: global lock, which domids exist
 *   dom<N>/state     struct xs_domain: ports, grant table, page bitmap
 *   memory file      dom<N>/mem, or /dev/shm/... when the run dir is not tmpfs
 *   evtchn/<pid>.<seq>  one FIFO per event-channel handle (seq unique machine-wide)
 *
 * All table mutations (bind, unbind, grant-ref and page allocation, domain
 * create/destroy) take the one process-shared robust mutex in the machine file:
 * they are rare, and one lock cannot deadlock. The hot paths (notify, grant
 * copy) take no lock: they read the tables and use atomics on port flags.
 */
#ifndef XENSIM_H
#define XENSIM_H

#define _GNU_SOURCE
#ifndef __XEN_TOOLS__
#define __XEN_TOOLS__ 1 /* the tools view of the ABI, as xenctrl.h */
#endif
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/grant_table.h>

#define XS_PAGE_SIZE 4096u
#define XS_MAX_DOMID 0x7FF0u /* DOMID_FIRST_RESERVED */
#define XS_NR_PORTS 4096u    /* the 2-level ABI limit of a 64-bit guest */
#define XS_NR_GRANTS 8192u   /* 16 grant frames of v1 entries */
#define XS_FIRST_FREE_GREF 8u /* GNTTAB_NR_RESERVED_ENTRIES, as Linux */
#define XS_MAX_PAGES (1u << 20)
#define XS_MAGIC 0x786e73696d303476ULL /* "xnsim04v": bump when a layout changes */

/* pfn of the zeroed xenstore page of every created domain; pfn 0 is left free. */
#define XENSIM_XENSTORE_PFN 1u

enum xs_port_state { XS_PORT_FREE = 0, XS_PORT_UNBOUND, XS_PORT_INTERDOMAIN, XS_PORT_VIRQ };

/* xs_port.flags, changed with atomics only */
#define XS_PF_PENDING 1u
#define XS_PF_MASKED 2u

/* gref_owner: its sharer ended it while it was mapped; freed at the last unmap */
#define XS_GREF_ENDED (-1)

#define XS_DOM_DYING 1u
#define XS_DOM_SHUTDOWN 2u

struct xs_port {
    uint32_t state;
    uint32_t flags;
    uint32_t remote_dom;
    uint32_t remote_port;
    uint32_t virq;
    int32_t owner_pid; /* 0: no handle owns it (toolstack-allocated) */
    uint32_t owner_seq;
    uint32_t owner_start; /* the owner's start time (xs_pid_start): its pid may be reused */
};

struct xs_machine {
    uint64_t magic;
    pthread_mutex_t lock;
    uint32_t next_gen;
    uint32_t gen[XS_MAX_DOMID]; /* 0: no such domain, else its generation */
    /* Event-channel handles are named (pid, seq) with seq unique machine-wide: a
     * process that reuses a dead one's pid must not get its handle's name, which
     * long-lived notifiers keep an open FIFO for. */
    uint32_t next_handle;
};

struct xs_domain {
    uint64_t magic;
    uint32_t domid;
    uint32_t flags; /* XS_DOM_* */
    uint64_t nr_pages;
    uint64_t xenstore_pfn;
    uint32_t xenstore_port;
    uint32_t gen;
    char mem_path[512];
    struct xs_port ports[XS_NR_PORTS];
    grant_entry_v1_t grants[XS_NR_GRANTS];
    int32_t gref_owner[XS_NR_GRANTS]; /* pid that shared it with gntshr; 0: toolstack;
                                         XS_GREF_ENDED: ended while mapped (see grants.c) */
    /* Xen's active grant entries, reduced to what a mapping needs: how many mappings
     * pin each grant read-only and writable, and the process holding them. */
    uint16_t pin_ro[XS_NR_GRANTS];
    uint16_t pin_rw[XS_NR_GRANTS];
    int32_t pin_pid[XS_NR_GRANTS];
    uint8_t page_used[XS_MAX_PAGES / 8];
};

/* A process's view of one domain, valid while gen matches the machine's.
 *
 * d points into the shared state file, which every process of that domain may
 * write: a guest's values there (nr_pages, mem_path, grant frames, port numbers)
 * are bounded against this private view before they address anything. */
struct xs_dom_view {
    uint32_t gen;
    struct xs_domain *d;
    int mem_fd;
    uint8_t *mem;
    size_t mem_len;
    uint64_t nr_pages; /* pages actually mapped at mem: the file's, never d->nr_pages */
};

/* state.c */
int xs_env_domid(void);
const char *xs_dir(void); /* NULL (errno set) when no run directory */
struct xs_machine *xs_machine(void);
int xs_lock(void);
void xs_unlock(void);
/* The view of an existing domain, or NULL with errno ESRCH. No lock needed. */
struct xs_dom_view *xs_dom(uint32_t domid);
int xs_path(char *buf, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The memory file of domain `domid`, generation `gen`: computed, never read from
 * the shared state (a guest could name any file there). */
int xs_mem_path(uint32_t domid, uint32_t gen, char *buf, size_t len);
/* d->nr_pages bounded by the page bitmap: for the domain's own allocators. */
uint64_t xs_bitmap_pages(const struct xs_domain *d);
void xs_forget_views(void);
void xs_forget_fifos(void);

/* evtchn.c: internal helpers shared with domain.c, gntshr.c, xenctrl.c */
int xs_evtchn_send(uint32_t domid, uint32_t port);
void xs_port_deliver(struct xs_domain *d, uint32_t port);
int xs_port_alloc(struct xs_domain *d); /* lock held; -1 ENOSPC */
void xs_port_close(struct xs_domain *d, uint32_t port); /* lock held */
void xs_gc_dead_handles(void); /* lock held */
int xs_pid_alive(int32_t pid);
/* A process's start time in clock ticks since boot (low 32 bits; 0: unknown). */
uint32_t xs_pid_start(int32_t pid);
/* Alive, and the same process that started at `start` (0: any) under that pid. */
int xs_owner_alive(int32_t pid, uint32_t start);
int xs_alloc_unbound(uint32_t dom, uint32_t remote_dom);

/* domain.c */
int xs_page_alloc(struct xs_domain *d); /* lock held; -1 if none free */
void xs_page_free(struct xs_domain *d, uint64_t pfn);
int xs_gref_alloc(struct xs_domain *d); /* lock held; -1 if none free */

/* grants.c: pins and the end of access (lock held for all) */
/* Pin grant `ref` of `d` for a mapping by this process: GTF_reading, and GTF_writing
 * for a writable one, set in the entry as Xen does. */
void xs_grant_pin(struct xs_domain *d, uint32_t ref, int writable);
void xs_grant_unpin(struct xs_domain *d, uint32_t ref, int writable);
/* Is the grant mapped by a live process? A dead mapper's pins are dropped here. */
int xs_grant_in_use(struct xs_domain *d, uint32_t ref);
/* gnttab_end_foreign_access_ref: 0 once ended, -1 (EBUSY) while it is mapped. */
int xs_grant_end(struct xs_domain *d, uint32_t ref);
/* Clear the entry and give its page back (the share that held it is going). */
void xs_grant_release(struct xs_domain *d, uint32_t ref, uint64_t pfn);

#define XS_EXPORT __attribute__((visibility("default")))

#endif
