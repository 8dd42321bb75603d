/*
 * xensim's /dev/xen/gntdev node, for programs that use the device itself rather
 * than libxengnttab: blktap's tapdisk opens it and asks for grant copies with
 * IOCTL_GNTDEV_GRANT_COPY (blktap drivers/td-ctx.c, td-req.c), and blktap's
 * tapback will not start unless the node exists (tapback.c, main). On the
 * simulated machine the node "exists" for access(); an open returns the fd of a
 * grant handle of the caller's domain (kept in a table by fd), the ioctl copies
 * through that handle, and close ends it. Any other ioctl on it is ENOTTY: the
 * mapping ioctls are reached through libxengnttab here.
 */
#include "gntdev.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <xengnttab.h>
#include <xen/sys/gntdev.h>

#define NODE "/dev/xen/gntdev"
#define MAX_NODE_FD 4096 /* fds past this are refused the node (EMFILE) */

/* The sanitizer runtimes open and close files while they initialise, before their
 * shadow memory exists: what the open and close wrappers reach is not instrumented
 * (as in redirect.c). */
#define XS_NOSAN __attribute__((no_sanitize("address", "undefined")))

static struct xengntdev_handle *node_handles[MAX_NODE_FD];

XS_NOSAN int xs_is_gntdev_node(const char *path)
{
    return path != NULL && strcmp(path, NODE) == 0;
}

int xs_gntdev_node_open(void)
{
    struct xengntdev_handle *h = xs_gntdev_open((uint32_t)xs_env_domid());
    if (h == NULL) {
        errno = ENOENT; /* no simulated machine: no node, as on a host without Xen */
        return -1;
    }
    if (h->fd < 0 || h->fd >= MAX_NODE_FD) {
        xs_gntdev_close(h);
        errno = EMFILE;
        return -1;
    }
    __atomic_store_n(&node_handles[h->fd], h, __ATOMIC_RELEASE);
    return h->fd;
}

XS_NOSAN static struct xengntdev_handle *node_handle(int fd)
{
    if (fd < 0 || fd >= MAX_NODE_FD)
        return NULL;
    return __atomic_load_n(&node_handles[fd], __ATOMIC_ACQUIRE);
}

/* One end of a copy: a grant (ref, offset, domain) or a local address. */
typedef __typeof__(((struct ioctl_gntdev_grant_copy_segment *)0)->source) node_ptr;

static void copy_ptr(union xengnttab_copy_ptr *to, const node_ptr *from, int foreign)
{
    if (foreign) {
        to->foreign.ref = from->foreign.ref;
        to->foreign.offset = from->foreign.offset;
        to->foreign.domid = from->foreign.domid;
    } else {
        to->virt = from->virt;
    }
}

/* gntdev's IOCTL_GNTDEV_GRANT_COPY: the same segments as libxengnttab's, field by
 * field; the call fails as a whole only where gntdev's does (EINVAL, EFAULT). */
static int node_grant_copy(struct xengntdev_handle *h, struct ioctl_gntdev_grant_copy *op)
{
    if (op == NULL || (op->count > 0 && op->segments == NULL)) {
        errno = EFAULT;
        return -1;
    }
    if (op->count == 0)
        return 0;
    xengnttab_grant_copy_segment_t *segs = calloc(op->count, sizeof(*segs));
    if (segs == NULL) {
        errno = ENOMEM;
        return -1;
    }
    for (unsigned int i = 0; i < op->count; i++) {
        const struct ioctl_gntdev_grant_copy_segment *in = &op->segments[i];
        xengnttab_grant_copy_segment_t *s = &segs[i];
        s->flags = in->flags;
        s->len = in->len;
        copy_ptr(&s->source, &in->source, in->flags & GNTCOPY_source_gref);
        copy_ptr(&s->dest, &in->dest, in->flags & GNTCOPY_dest_gref);
    }
    int rc = xengnttab_grant_copy(h, op->count, segs);
    if (rc == 0)
        for (unsigned int i = 0; i < op->count; i++)
            op->segments[i].status = segs[i].status;
    free(segs);
    return rc;
}

XS_EXPORT XS_NOSAN int ioctl(int fd, unsigned long request, ...)
{
    static int (*real)(int, unsigned long, ...);
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    struct xengntdev_handle *h = node_handle(fd);
    if (h != NULL) {
        if (request == IOCTL_GNTDEV_GRANT_COPY)
            return node_grant_copy(h, arg);
        errno = ENOTTY;
        return -1;
    }
    if (real == NULL)
        real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    return real(fd, request, arg);
}

XS_EXPORT XS_NOSAN int close(int fd)
{
    static int (*real)(int);
    if (fd >= 0 && fd < MAX_NODE_FD) {
        struct xengntdev_handle *h = __atomic_exchange_n(&node_handles[fd], NULL,
                                                         __ATOMIC_ACQ_REL);
        if (h != NULL) {
            xs_gntdev_close(h); /* closes fd, through here again: no longer a node */
            return 0;
        }
    }
    if (real == NULL)
        real = (int (*)(int))dlsym(RTLD_NEXT, "close");
    return real(fd);
}

XS_EXPORT XS_NOSAN int access(const char *path, int mode)
{
    static int (*real)(const char *, int);
    if (xs_is_gntdev_node(path) && xs_machine() != NULL)
        return 0;
    if (real == NULL)
        real = (int (*)(const char *, int))dlsym(RTLD_NEXT, "access");
    return real(path, mode);
}
