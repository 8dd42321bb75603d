/*
 * xensim libxenctrl subset: what xenstored and oxenstored call (interface
 * open/close, domain info in Xen 4.17's calls and 4.18's, foreign mapping of a
 * guest page by frame number, the toolstack's unbound-port allocation, last error).
 */
#include "xensim.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <xenctrl.h>

struct xc_interface_core {
    uint32_t domid;
};

static xc_error g_no_error; /* code XC_ERROR_NONE */

XS_EXPORT xc_interface *xc_interface_open(xentoollog_logger *logger,
                                          xentoollog_logger *dombuild_logger,
                                          unsigned open_flags)
{
    (void)logger;
    (void)dombuild_logger;
    (void)open_flags;
    if (xs_machine() == NULL)
        return NULL;
    xc_interface *xch = calloc(1, sizeof(*xch));
    if (xch != NULL)
        xch->domid = (uint32_t)xs_env_domid();
    return xch;
}

XS_EXPORT int xc_interface_close(xc_interface *xch)
{
    free(xch);
    return 0;
}

XS_EXPORT const xc_error *xc_get_last_error(xc_interface *xch)
{
    (void)xch;
    return &g_no_error;
}

XS_EXPORT void xc_clear_last_error(xc_interface *xch)
{
    (void)xch;
}

/* Next existing domain at or after *domid; NULL when none. */
static struct xs_dom_view *next_domain(uint32_t *domid)
{
    for (; *domid < XS_MAX_DOMID; (*domid)++) {
        struct xs_dom_view *v = xs_dom(*domid);
        if (v != NULL)
            return v;
    }
    return NULL;
}

static void fill_domaininfo(uint32_t domid, const struct xs_dom_view *v, xc_domaininfo_t *info)
{
    uint32_t flags = __atomic_load_n(&v->d->flags, __ATOMIC_ACQUIRE);
    memset(info, 0, sizeof(*info));
    info->domain = (domid_t)domid;
    info->flags = ((flags & XS_DOM_DYING) ? XEN_DOMINF_dying : 0) |
                  ((flags & XS_DOM_SHUTDOWN) ? XEN_DOMINF_shutdown : 0) |
                  ((flags & (XS_DOM_DYING | XS_DOM_SHUTDOWN)) ? 0 : XEN_DOMINF_running);
    info->tot_pages = v->nr_pages;
    info->max_pages = v->nr_pages;
    info->nr_online_vcpus = 1;
}

/*
 * xc_domain_getinfo() and its xc_dominfo_t are Xen 4.17's (domctl interface 0x15), what
 * its xenstored calls; Xen 4.18 removed them for xc_domain_getinfo_single() below.
 */
#if XEN_DOMCTL_INTERFACE_VERSION <= 0x15
XS_EXPORT int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid, unsigned int max_doms,
                                xc_dominfo_t *info)
{
    (void)xch;
    unsigned int n = 0;
    uint32_t domid = first_domid;
    for (; n < max_doms; n++, domid++) {
        struct xs_dom_view *v = next_domain(&domid);
        if (v == NULL)
            break;
        uint32_t flags = __atomic_load_n(&v->d->flags, __ATOMIC_ACQUIRE);
        memset(&info[n], 0, sizeof(info[n]));
        info[n].domid = domid;
        info[n].dying = (flags & XS_DOM_DYING) != 0;
        info[n].shutdown = (flags & XS_DOM_SHUTDOWN) != 0;
        info[n].running = !info[n].dying && !info[n].shutdown;
        info[n].nr_pages = v->nr_pages;
        info[n].max_memkb = v->nr_pages * (XS_PAGE_SIZE / 1024);
        info[n].nr_online_vcpus = 1;
    }
    return (int)n;
}
#endif

/* Xen 4.18 on (xenstored and oxenstored of 4.20): one domain, ESRCH when it does not exist;
 * `info` may be NULL. Exported under every Xen (Xen 4.17's headers do not declare it). */
XS_EXPORT int xc_domain_getinfo_single(xc_interface *xch, uint32_t domid,
                                       xc_domaininfo_t *info);
XS_EXPORT int xc_domain_getinfo_single(xc_interface *xch, uint32_t domid,
                                       xc_domaininfo_t *info)
{
    (void)xch;
    struct xs_dom_view *v = xs_dom(domid);
    if (v == NULL) {
        errno = ESRCH;
        return -1;
    }
    if (info != NULL)
        fill_domaininfo(domid, v, info);
    return 0;
}

XS_EXPORT int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain,
                                    unsigned int max_domains, xc_domaininfo_t *info)
{
    (void)xch;
    unsigned int n = 0;
    uint32_t domid = first_domain;
    for (; n < max_domains; n++, domid++) {
        struct xs_dom_view *v = next_domain(&domid);
        if (v == NULL)
            break;
        fill_domaininfo(domid, v, &info[n]);
    }
    return (int)n;
}

XS_EXPORT void *xc_map_foreign_range(xc_interface *xch, uint32_t dom, int size, int prot,
                                     unsigned long mfn)
{
    /* Privileged: only the control domain maps others' memory by frame. */
    if (xch->domid != 0) {
        errno = EPERM;
        return NULL;
    }
    struct xs_dom_view *v = xs_dom(dom);
    if (v == NULL)
        return NULL;
    uint64_t pages = ((uint64_t)size + XS_PAGE_SIZE - 1) / XS_PAGE_SIZE;
    if (size <= 0 || mfn >= v->nr_pages || pages > v->nr_pages - mfn) {
        errno = EINVAL;
        return NULL;
    }
    void *p = mmap(NULL, (size_t)size, prot, MAP_SHARED, v->mem_fd, (off_t)(mfn * XS_PAGE_SIZE));
    return p == MAP_FAILED ? NULL : p;
}

XS_EXPORT xc_evtchn_port_or_error_t xc_evtchn_alloc_unbound(xc_interface *xch, uint32_t dom,
                                                            uint32_t remote_dom)
{
    if (xch->domid != 0 && dom != xch->domid) {
        errno = EPERM;
        return -1;
    }
    return xs_alloc_unbound(dom, remote_dom);
}
