/*
 * xensim event channels: libxenevtchn (/dev/xen/evtchn) over the shared port
 * tables, plus the toolstack's xc_evtchn_alloc_unbound core.
 *
 * Each handle owns a FIFO; delivering an event writes the 4-byte local port
 * into the owner's FIFO, so xenevtchn_fd() polls like the real device and
 * xenevtchn_pending() reads the notified port. As Linux does, a delivered
 * port is masked until the handle unmasks it; a notify while masked only
 * sets pending, and unmask re-delivers a pending port (events coalesce, none
 * is lost).
 */
#include "xensim.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xenevtchn.h>

struct xenevtchn_handle {
    int fd;
    uint32_t domid;
    int32_t pid;
    uint32_t seq;
    uint32_t start;     /* this process's start time (xs_pid_start) */
    char path[PATH_MAX];
};

/* Writers' FIFO fds, kept open: notify is on the disk I/O path. An fd is used and
 * closed only under g_fifo_lock, so a closed number cannot be reused under a concurrent
 * writer. The FIFO of a closed handle is unlinked (xenevtchn_close), so an fd whose file
 * has no links left can never be needed again: they are closed whenever a new one is
 * opened, else a long-lived process (tapdisk, xenstored) would keep one per handle of
 * every peer it ever notified, guests long gone. */
struct fifo_fd {
    int32_t pid;
    uint32_t seq;
    int fd;
};
static pthread_mutex_t g_fifo_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fifo_fd *g_fifos;
static size_t g_nfifos, g_capfifos;

static int fifo_path(char *buf, size_t len, int32_t pid, uint32_t seq)
{
    return xs_path(buf, len, "evtchn/%d.%u", (int)pid, seq);
}

/* Close the fds of FIFOs that are gone; the caller holds g_fifo_lock. */
static void fifo_sweep(void)
{
    for (size_t i = 0; i < g_nfifos;) {
        struct stat st;
        if (fstat(g_fifos[i].fd, &st) == 0 && st.st_nlink > 0) {
            i++;
            continue;
        }
        close(g_fifos[i].fd);
        g_fifos[i] = g_fifos[--g_nfifos];
    }
}

/* Close every kept FIFO fd (the process moves to another machine). */
void xs_forget_fifos(void)
{
    pthread_mutex_lock(&g_fifo_lock);
    for (size_t i = 0; i < g_nfifos; i++)
        close(g_fifos[i].fd);
    g_nfifos = 0;
    pthread_mutex_unlock(&g_fifo_lock);
}

/* The fd of handle (pid, seq)'s FIFO; the caller holds g_fifo_lock. */
static int fifo_fd_for(int32_t pid, uint32_t seq)
{
    for (size_t i = 0; i < g_nfifos; i++)
        if (g_fifos[i].pid == pid && g_fifos[i].seq == seq)
            return g_fifos[i].fd;
    char path[PATH_MAX];
    if (fifo_path(path, sizeof(path), pid, seq) < 0)
        return -1;
    fifo_sweep();
    /* O_RDWR: a FIFO whose reader is gone then never raises SIGPIPE. */
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (g_nfifos == g_capfifos) {
        size_t cap = g_capfifos ? g_capfifos * 2 : 16;
        struct fifo_fd *n = realloc(g_fifos, cap * sizeof(*n));
        if (n == NULL) {
            close(fd);
            return -1;
        }
        g_fifos = n;
        g_capfifos = cap;
    }
    g_fifos[g_nfifos++] = (struct fifo_fd){pid, seq, fd};
    return fd;
}

void xs_port_deliver(struct xs_domain *d, uint32_t port)
{
    struct xs_port *p = &d->ports[port];
    uint32_t old = __atomic_load_n(&p->flags, __ATOMIC_ACQUIRE), new;
    int deliver;
    do {
        if (old & XS_PF_MASKED) {
            new = old | XS_PF_PENDING;
            deliver = 0;
        } else {
            new = old | XS_PF_MASKED;
            deliver = 1;
        }
    } while (!__atomic_compare_exchange_n(&p->flags, &old, new, 0, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    if (!deliver)
        return;
    int32_t pid = __atomic_load_n(&p->owner_pid, __ATOMIC_ACQUIRE);
    uint32_t seq = __atomic_load_n(&p->owner_seq, __ATOMIC_ACQUIRE);
    if (pid == 0)
        return;
    uint32_t word = port;
    pthread_mutex_lock(&g_fifo_lock);
    int fd = fifo_fd_for(pid, seq);
    /* 4 bytes to a FIFO are written atomically; EAGAIN (a full FIFO) cannot
     * happen below 16384 ports per handle since a delivered port is masked. */
    if (fd >= 0 && write(fd, &word, sizeof(word)) < 0)
        (void)0;    /* the owner is gone: nobody to wake */
    pthread_mutex_unlock(&g_fifo_lock);
}

static void port_unmask(struct xs_domain *d, uint32_t port)
{
    struct xs_port *p = &d->ports[port];
    uint32_t old = __atomic_load_n(&p->flags, __ATOMIC_ACQUIRE), new;
    int redeliver;
    do {
        if (old & XS_PF_PENDING) {
            new = (old & ~XS_PF_PENDING) & ~XS_PF_MASKED;
            redeliver = 1;
        } else {
            new = old & ~XS_PF_MASKED;
            redeliver = 0;
        }
    } while (!__atomic_compare_exchange_n(&p->flags, &old, new, 0, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    if (redeliver)
        xs_port_deliver(d, port);
}

int xs_evtchn_send(uint32_t domid, uint32_t port)
{
    struct xs_dom_view *v = xs_dom(domid);
    if (v == NULL)
        return -1;
    if (port == 0 || port >= XS_NR_PORTS) {
        errno = EINVAL;
        return -1;
    }
    struct xs_port *p = &v->d->ports[port];
    uint32_t state = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
    if (state == XS_PORT_UNBOUND)
        return 0; /* Xen drops a notification on an unbound port silently */
    if (state != XS_PORT_INTERDOMAIN) {
        errno = EINVAL;
        return -1;
    }
    struct xs_dom_view *rv = xs_dom(p->remote_dom);
    if (rv == NULL)
        return 0; /* the peer died: its end is gone */
    uint32_t rport = p->remote_port;
    if (rport >= XS_NR_PORTS)
        return 0;
    struct xs_port *rp = &rv->d->ports[rport];
    if (rp->state != XS_PORT_INTERDOMAIN || rp->remote_dom != domid || rp->remote_port != port)
        return 0;
    xs_port_deliver(rv->d, rport);
    return 0;
}

int xs_port_alloc(struct xs_domain *d)
{
    for (uint32_t p = 1; p < XS_NR_PORTS; p++) {
        if (d->ports[p].state == XS_PORT_FREE) {
            memset(&d->ports[p], 0, sizeof(d->ports[p]));
            return (int)p;
        }
    }
    errno = ENOSPC;
    return -1;
}

/* Close a port as Xen's evtchn_close: an interdomain peer becomes unbound
 * for this domain again, so it can be bound afresh (xenstored restart). */
void xs_port_close(struct xs_domain *d, uint32_t port)
{
    struct xs_port *p = &d->ports[port];
    if (p->state == XS_PORT_INTERDOMAIN) {
        struct xs_dom_view *rv = xs_dom(p->remote_dom);
        if (rv != NULL && p->remote_port < XS_NR_PORTS) {
            struct xs_port *rp = &rv->d->ports[p->remote_port];
            if (rp->state == XS_PORT_INTERDOMAIN && rp->remote_dom == d->domid &&
                rp->remote_port == port) {
                rp->remote_port = 0;
                __atomic_store_n(&rp->state, XS_PORT_UNBOUND, __ATOMIC_RELEASE);
            }
        }
    }
    __atomic_store_n(&p->state, XS_PORT_FREE, __ATOMIC_RELEASE);
    p->owner_pid = 0;
    p->owner_seq = 0;
    p->owner_start = 0;
    p->flags = 0;
    p->remote_dom = 0;
    p->remote_port = 0;
    p->virq = 0;
}

/* A handle that owned a port goes away (closed, or its process died).  The
 * guest's xenstore port belongs to the guest kernel in real Xen, not to one
 * process: it stays bound to xenstored and only loses its owner, so the
 * domain's next guest process can claim it again.  Any other port closes. */
static void xs_port_release(struct xs_domain *d, uint32_t port)
{
    struct xs_port *p = &d->ports[port];
    if (port == d->xenstore_port && d->domid != 0) {
        p->owner_pid = 0;
        p->owner_seq = 0;
        p->owner_start = 0;
        p->flags = XS_PF_MASKED;
        return;
    }
    xs_port_close(d, port);
}

/* /proc/<pid>/stat's state letter and start time (field 22); -1 if unreadable. */
static int read_stat(int32_t pid, char *state, uint32_t *start)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *rp = strrchr(buf, ')');
    if (rp == NULL || rp[1] != ' ')
        return -1;
    *state = rp[2];
    unsigned long long t = 0;
    /* After ") ": state is field 3, starttime field 22. */
    if (sscanf(rp + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d "
                       "%*d %*d %*d %*d %llu", &t) != 1)
        return -1;
    *start = (uint32_t)t;
    return 0;
}

uint32_t xs_pid_start(int32_t pid)
{
    char state;
    uint32_t start;
    return read_stat(pid, &state, &start) == 0 ? start : 0;
}

int xs_owner_alive(int32_t pid, uint32_t start)
{
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return 0;
    char state;
    uint32_t now;
    if (read_stat(pid, &state, &now) < 0)
        return 1;
    /* a zombie has closed its files: its ports are gone as with a real fd; another
     * process under the pid (the owner died, the pid was given out again) is not it */
    return state != 'Z' && (start == 0 || now == start);
}

int xs_pid_alive(int32_t pid)
{
    return xs_owner_alive(pid, 0);
}

/* The kernel unbinds a handle's ports when its process dies; here the next
 * binder does it for dead owners, so a restarted xenstored can bind again. */
void xs_gc_dead_handles(void)
{
    struct xs_machine *m = xs_machine();
    struct owner { int32_t pid; uint32_t start; } alive[64], dead[64];
    size_t nalive = 0, ndead = 0;
    for (uint32_t domid = 0; domid < XS_MAX_DOMID; domid++) {
        if (__atomic_load_n(&m->gen[domid], __ATOMIC_ACQUIRE) == 0)
            continue;
        struct xs_dom_view *v = xs_dom(domid);
        if (v == NULL)
            continue;
        for (uint32_t p = 1; p < XS_NR_PORTS; p++) {
            struct xs_port *pt = &v->d->ports[p];
            struct owner o = {pt->owner_pid, pt->owner_start};
            int32_t pid = o.pid;
            if (pt->state == XS_PORT_FREE || pid == 0)
                continue;
            int is_dead = -1;
            for (size_t i = 0; i < nalive && is_dead < 0; i++)
                if (alive[i].pid == pid && alive[i].start == o.start)
                    is_dead = 0;
            for (size_t i = 0; i < ndead && is_dead < 0; i++)
                if (dead[i].pid == pid && dead[i].start == o.start)
                    is_dead = 1;
            if (is_dead < 0) {
                is_dead = !xs_owner_alive(pid, o.start);
                if (is_dead && ndead < 64)
                    dead[ndead++] = o;
                else if (!is_dead && nalive < 64)
                    alive[nalive++] = o;
            }
            if (!is_dead)
                continue;
            char path[PATH_MAX];
            if (fifo_path(path, sizeof(path), pid, pt->owner_seq) == 0)
                unlink(path);
            xs_port_release(v->d, p);
        }
    }
}

int xs_alloc_unbound(uint32_t dom, uint32_t remote_dom)
{
    if (xs_lock() < 0)
        return -1;
    int port = -1;
    struct xs_dom_view *v = xs_dom(dom);
    if (v == NULL)
        goto out;
    port = xs_port_alloc(v->d);
    if (port < 0)
        goto out;
    struct xs_port *p = &v->d->ports[port];
    p->remote_dom = remote_dom;
    p->flags = XS_PF_MASKED; /* no handle yet: see xensim_evtchn_claim */
    __atomic_store_n(&p->state, XS_PORT_UNBOUND, __ATOMIC_RELEASE);
out:;
    int saved = errno;
    xs_unlock();
    errno = saved;
    return port;
}

static xenevtchn_handle *handle_open(uint32_t domid, unsigned flags)
{
    xenevtchn_handle *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return NULL;
    h->domid = domid;
    h->pid = (int32_t)getpid();
    h->start = xs_pid_start(h->pid);
    h->seq = __atomic_add_fetch(&xs_machine()->next_handle, 1, __ATOMIC_RELAXED);
    if (fifo_path(h->path, sizeof(h->path), h->pid, h->seq) < 0)
        goto fail;
    unlink(h->path);
    if (mkfifo(h->path, 0600) < 0)
        goto fail;
    /* O_RDWR keeps the FIFO open for writing too: no EOF, no open blocking. */
    h->fd = open(h->path, O_RDWR | ((flags & XENEVTCHN_NO_CLOEXEC) ? 0 : O_CLOEXEC));
    if (h->fd < 0) {
        int saved = errno;
        unlink(h->path);
        errno = saved;
        goto fail;
    }
    return h;
fail:;
    int saved = errno;
    free(h);
    errno = saved;
    return NULL;
}

XS_EXPORT xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags)
{
    (void)logger;
    if (xs_machine() == NULL)
        return NULL;
    return handle_open((uint32_t)xs_env_domid(), flags);
}

/* Extension: a handle acting as domain `domid` (Python guests, tests). */
XS_EXPORT xenevtchn_handle *xensim_evtchn_open_as(uint32_t domid)
{
    if (xs_machine() == NULL)
        return NULL;
    return handle_open(domid, 0);
}

XS_EXPORT xenevtchn_handle *xenevtchn_fdopen(struct xentoollog_logger *logger, int fd,
                                             unsigned open_flags)
{
    (void)logger;
    (void)fd;
    (void)open_flags;
    errno = EOPNOTSUPP; /* only used by xenstored's live update */
    return NULL;
}

static int owned(xenevtchn_handle *h, struct xs_port *p)
{
    return p->state != XS_PORT_FREE && p->owner_pid == h->pid && p->owner_seq == h->seq;
}

XS_EXPORT int xenevtchn_close(xenevtchn_handle *h)
{
    if (h == NULL)
        return 0;
    if (xs_lock() == 0) {
        struct xs_dom_view *v = xs_dom(h->domid);
        for (uint32_t p = 1; v != NULL && p < XS_NR_PORTS; p++) {
            if (owned(h, &v->d->ports[p]))
                xs_port_release(v->d, p);
        }
        xs_unlock();
    }
    close(h->fd);
    unlink(h->path);
    free(h);
    return 0;
}

XS_EXPORT int xenevtchn_fd(xenevtchn_handle *h)
{
    return h->fd;
}

XS_EXPORT int xenevtchn_notify(xenevtchn_handle *h, evtchn_port_t port)
{
    struct xs_dom_view *v = xs_dom(h->domid);
    if (v == NULL)
        return -1;
    if (port >= XS_NR_PORTS || !owned(h, &v->d->ports[port])) {
        errno = ENOTCONN;
        return -1;
    }
    return xs_evtchn_send(h->domid, port);
}

/* Take the lock and find our domain; on failure errno is set. */
static struct xs_domain *lock_own(xenevtchn_handle *h)
{
    if (xs_lock() < 0)
        return NULL;
    struct xs_dom_view *v = xs_dom(h->domid);
    if (v == NULL) {
        xs_unlock();
        errno = ESRCH;
        return NULL;
    }
    xs_gc_dead_handles();
    return v->d;
}

static int unlock_ret(int rc)
{
    int saved = errno;
    xs_unlock();
    errno = saved;
    return rc;
}

static void set_owner(xenevtchn_handle *h, struct xs_port *p)
{
    p->owner_pid = h->pid;
    p->owner_seq = h->seq;
    p->owner_start = h->start;
}

XS_EXPORT xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *h,
                                                                uint32_t domid)
{
    struct xs_domain *d = lock_own(h);
    if (d == NULL)
        return -1;
    int port = xs_port_alloc(d);
    if (port < 0)
        return unlock_ret(-1);
    struct xs_port *p = &d->ports[port];
    p->remote_dom = domid;
    set_owner(h, p);
    __atomic_store_n(&p->state, XS_PORT_UNBOUND, __ATOMIC_RELEASE);
    return unlock_ret(port);
}

XS_EXPORT xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *h,
                                                               uint32_t domid,
                                                               evtchn_port_t remote_port)
{
    struct xs_domain *d = lock_own(h);
    if (d == NULL)
        return -1;
    struct xs_dom_view *rv = xs_dom(domid);
    if (rv == NULL) {
        errno = ESRCH;
        return unlock_ret(-1);
    }
    struct xs_domain *rd = rv->d;
    /* Xen: the remote port must be unbound and name us as its remote. */
    if (remote_port == 0 || remote_port >= XS_NR_PORTS ||
        rd->ports[remote_port].state != XS_PORT_UNBOUND ||
        rd->ports[remote_port].remote_dom != h->domid) {
        errno = EINVAL;
        return unlock_ret(-1);
    }
    int port = xs_port_alloc(d);
    if (port < 0)
        return unlock_ret(-1);
    struct xs_port *p = &d->ports[port];
    p->remote_dom = domid;
    p->remote_port = remote_port;
    set_owner(h, p);
    __atomic_store_n(&p->state, XS_PORT_INTERDOMAIN, __ATOMIC_RELEASE);
    struct xs_port *rp = &rd->ports[remote_port];
    rp->remote_port = (uint32_t)port;
    __atomic_store_n(&rp->state, XS_PORT_INTERDOMAIN, __ATOMIC_RELEASE);
    /* Xen sets the new local port pending: notifications sent while the
     * remote end was unbound were dropped, so the binder must look. */
    xs_port_deliver(d, (uint32_t)port);
    return unlock_ret(port);
}

XS_EXPORT xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *h, unsigned int virq)
{
    struct xs_domain *d = lock_own(h);
    if (d == NULL)
        return -1;
    if (virq >= NR_VIRQS) {
        errno = EINVAL;
        return unlock_ret(-1);
    }
    for (uint32_t p = 1; p < XS_NR_PORTS; p++) {
        if (d->ports[p].state == XS_PORT_VIRQ && d->ports[p].virq == virq) {
            errno = EEXIST;
            return unlock_ret(-1);
        }
    }
    int port = xs_port_alloc(d);
    if (port < 0)
        return unlock_ret(-1);
    struct xs_port *p = &d->ports[port];
    p->virq = virq;
    set_owner(h, p);
    __atomic_store_n(&p->state, XS_PORT_VIRQ, __ATOMIC_RELEASE);
    return unlock_ret(port);
}

XS_EXPORT int xenevtchn_unbind(xenevtchn_handle *h, evtchn_port_t port)
{
    if (port >= XS_NR_PORTS) {
        errno = EINVAL;
        return -1;
    }
    if (xs_lock() < 0)
        return -1;
    struct xs_dom_view *v = xs_dom(h->domid);
    if (v == NULL || !owned(h, &v->d->ports[port])) {
        errno = ENOTCONN;
        return unlock_ret(-1);
    }
    xs_port_close(v->d, port);
    return unlock_ret(0);
}

XS_EXPORT xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *h)
{
    uint32_t port;
    ssize_t n = read(h->fd, &port, sizeof(port));
    if (n != (ssize_t)sizeof(port)) {
        if (n >= 0)
            errno = EIO;
        return -1;
    }
    return (xenevtchn_port_or_error_t)port;
}

XS_EXPORT int xenevtchn_unmask(xenevtchn_handle *h, evtchn_port_t port)
{
    struct xs_dom_view *v = xs_dom(h->domid);
    if (v == NULL)
        return -1;
    /* Linux ignores unmask of a port the handle does not own. */
    if (port < XS_NR_PORTS && owned(h, &v->d->ports[port]))
        port_unmask(v->d, port);
    return 0;
}

XS_EXPORT int xenevtchn_restrict(xenevtchn_handle *h, domid_t domid)
{
    (void)h;
    (void)domid;
    return 0;
}

/* Extension: attach a toolstack-allocated port (the guest's xenstore port,
 * owned by the guest kernel in real Xen) to this handle; pending events on
 * it are delivered now. */
XS_EXPORT int xensim_evtchn_claim(xenevtchn_handle *h, evtchn_port_t port)
{
    struct xs_domain *d = lock_own(h);
    if (d == NULL)
        return -1;
    if (port == 0 || port >= XS_NR_PORTS || d->ports[port].state == XS_PORT_FREE) {
        errno = EINVAL;
        return unlock_ret(-1);
    }
    struct xs_port *p = &d->ports[port];
    if (p->owner_pid != 0) {
        errno = EBUSY;
        return unlock_ret(-1);
    }
    set_owner(h, p);
    port_unmask(d, port);
    return unlock_ret(0);
}
