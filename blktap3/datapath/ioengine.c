/*
 * ioengine.c: the io engines under the image drivers.
 *
 * io_uring (liburing): a batch of reads and writes is queued with td_engine_prep and
 * reaches the kernel in one io_uring_submit; completions signal an eventfd the ring
 * service polls beside the event channel. Where io_uring is unavailable (disabled by
 * sysctl, old kernel, seccomp) the sync engine does each I/O with pread/pwrite at
 * prep time and queues its completion. The null engine completes at once with no I/O.
 *
 * The ring service may also sleep inside io_uring (td_engine_use_watches): one-shot
 * poll requests on its event channel and control eventfd sit in the same queue as the
 * I/O, so a single io_uring_enter submits the batch and waits for whichever comes
 * first (a completion, a kick, a control request) instead of io_uring_enter + poll +
 * an eventfd read. Their completions carry TD_WATCH_BIT in user_data and are not
 * returned as I/O: td_engine_woken reports them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "datapath.h"

struct td_engine {
    int kind;
    int efd;
    struct io_uring uring;
    uint32_t queued;        /* sqes prepared since the last submit */
    uint32_t woken;         /* watches whose poll completed (td_engine_woken) */
    /* sync and null engines: completions waiting to be reaped */
    struct td_cqe *done;
    uint32_t ndone, cap;
};

/* user_data of a watch's poll: this bit, then the caller's wake bit. I/O tags are 32-bit. */
#define TD_WATCH_BIT (1ull << 63)
/* Room for the watches' polls beside a full ring of I/O. */
#define TD_WATCH_SQES 4u

static int uring_open(struct td_engine *e, uint32_t depth)
{
    int rc = io_uring_queue_init(depth + TD_WATCH_SQES, &e->uring, 0);
    if (rc < 0)
        return rc;
    e->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->efd < 0) {
        rc = -errno;
        io_uring_queue_exit(&e->uring);
        return rc;
    }
    rc = io_uring_register_eventfd(&e->uring, e->efd);
    if (rc < 0) {
        close(e->efd);
        io_uring_queue_exit(&e->uring);
        return rc;
    }
    return 0;
}

int td_engine_open(int kind, uint32_t depth, struct td_engine **out)
{
    struct td_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->efd = -1;
    if (depth == 0)
        depth = 1;
    if (kind == TD_ENGINE_AUTO || kind == TD_ENGINE_URING) {
        int rc = uring_open(e, depth);
        if (rc == 0) {
            e->kind = TD_ENGINE_URING;
            *out = e;
            return 0;
        }
        if (kind == TD_ENGINE_URING) {
            free(e);
            return rc;
        }
        e->efd = -1;
        kind = TD_ENGINE_SYNC;  /* auto: io_uring unavailable here, fall back */
    }
    if (kind != TD_ENGINE_SYNC && kind != TD_ENGINE_NULL) {
        free(e);
        return -EINVAL;
    }
    e->kind = kind;
    e->cap = depth;
    e->done = calloc(depth, sizeof(*e->done));
    if (!e->done) {
        free(e);
        return -ENOMEM;
    }
    *out = e;
    return 0;
}

void td_engine_close(struct td_engine *e)
{
    if (!e)
        return;
    if (e->kind == TD_ENGINE_URING) {
        io_uring_unregister_eventfd(&e->uring);
        io_uring_queue_exit(&e->uring);
        close(e->efd);
    }
    free(e->done);
    free(e);
}

int td_engine_kind(const struct td_engine *e)
{
    return e->kind;
}

int td_engine_fd(const struct td_engine *e)
{
    return e->efd;
}

void td_engine_clear(struct td_engine *e)
{
    uint64_t junk;
    /* Only once poll() said so: a read per reap would cost a syscall per batch. A
     * completion posted after this re-arms the eventfd, so none is slept through. */
    if (e->efd >= 0 && read(e->efd, &junk, sizeof(junk)) < 0)
        (void)0;    /* EAGAIN: already cleared */
}

int td_engine_ready(struct td_engine *e)
{
    if (e->kind == TD_ENGINE_URING)
        return io_uring_cq_ready(&e->uring) > 0;
    return e->ndone > 0;
}

int td_pio(int fd, int write, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = write ? pwrite(fd, (char *)buf + done, len - done, (off_t)(off + done))
                          : pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;    /* read past EOF: the range check should have stopped it */
        done += (size_t)n;
    }
    return 0;
}

int td_sync(int fd, int *failed)
{
    if (fdatasync(fd) == 0)
        return 0;
    int rc = -errno;
    __atomic_store_n(failed, 1, __ATOMIC_RELEASE);
    return rc;
}

static int32_t sync_io(int op, int fd, char *buf, uint32_t len, uint64_t off)
{
    int rc = td_pio(fd, op == TD_IO_WRITE, buf, len, off);
    return rc ? rc : (int32_t)len;
}

/* A free sqe; when the queue is full, hand what we have to the kernel first. */
static struct io_uring_sqe *get_sqe(struct td_engine *e, int *rc)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&e->uring);
    if (sqe)
        return sqe;
    *rc = io_uring_submit(&e->uring);
    if (*rc < 0)
        return NULL;
    e->queued = 0;
    sqe = io_uring_get_sqe(&e->uring);
    *rc = sqe ? 0 : -EBUSY;
    return sqe;
}

int td_engine_use_watches(struct td_engine *e)
{
    if (e->kind != TD_ENGINE_URING)
        return -EOPNOTSUPP;
    if (e->efd >= 0) {
        /* Nobody polls the eventfd any more: spare the kernel its signal per completion. */
        io_uring_unregister_eventfd(&e->uring);
        close(e->efd);
        e->efd = -1;
    }
    return 0;
}

int td_engine_watch(struct td_engine *e, int fd, uint32_t bit)
{
    if (e->kind != TD_ENGINE_URING)
        return -EOPNOTSUPP;
    int rc = 0;
    struct io_uring_sqe *sqe = get_sqe(e, &rc);
    if (!sqe)
        return rc;
    /* One-shot, so a completion means "readable now": the read after it cannot block. */
    io_uring_prep_poll_add(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, TD_WATCH_BIT | bit);
    e->queued++;
    return 0;
}

uint32_t td_engine_woken(struct td_engine *e)
{
    uint32_t w = e->woken;
    e->woken = 0;
    return w;
}

int td_engine_wait(struct td_engine *e)
{
    if (e->kind != TD_ENGINE_URING)
        return -EOPNOTSUPP;
    int rc = io_uring_submit_and_wait(&e->uring, 1);
    if (rc < 0)
        return rc;
    e->queued = 0;
    return 0;
}

int td_engine_prep(struct td_engine *e, int op, int fd, void *buf, uint32_t len,
                   uint64_t off, uint32_t tag)
{
    if (e->kind == TD_ENGINE_URING) {
        int rc = 0;
        struct io_uring_sqe *sqe = get_sqe(e, &rc);
        if (!sqe)
            return rc;
        if (op == TD_IO_WRITE)
            io_uring_prep_write(sqe, fd, buf, len, off);
        else
            io_uring_prep_read(sqe, fd, buf, len, off);
        io_uring_sqe_set_data64(sqe, tag);
        e->queued++;
        return 0;
    }
    if (e->ndone == e->cap)
        return -EBUSY;
    struct td_cqe *c = &e->done[e->ndone++];
    c->tag = tag;
    c->res = e->kind == TD_ENGINE_NULL ? (int32_t)len : sync_io(op, fd, buf, len, off);
    return 0;
}

int td_engine_submit(struct td_engine *e)
{
    if (e->kind != TD_ENGINE_URING || e->queued == 0)
        return 0;
    for (;;) {
        int rc = io_uring_submit(&e->uring);
        if (rc >= 0) {
            e->queued = 0;
            return 0;
        }
        if (rc != -EINTR && rc != -EAGAIN)
            return rc;
    }
}

uint32_t td_engine_reap(struct td_engine *e, struct td_cqe *out, uint32_t max)
{
    if (e->kind != TD_ENGINE_URING) {
        uint32_t n = e->ndone < max ? e->ndone : max;
        for (uint32_t i = 0; i < n; i++)
            out[i] = e->done[i];
        for (uint32_t i = n; i < e->ndone; i++)
            e->done[i - n] = e->done[i];
        e->ndone -= n;
        return n;
    }
    struct io_uring_cqe *cqes[256];
    uint32_t got = 0;
    while (got < max) {
        uint32_t want = max - got < 256 ? max - got : 256;
        unsigned n = io_uring_peek_batch_cqe(&e->uring, cqes, want);
        if (n == 0)
            break;
        for (unsigned i = 0; i < n; i++) {
            uint64_t data = io_uring_cqe_get_data64(cqes[i]);
            if (data & TD_WATCH_BIT) {
                e->woken |= (uint32_t)data;     /* a watch fired: not an I/O */
                continue;
            }
            out[got].tag = (uint32_t)data;
            out[got].res = cqes[i]->res;
            got++;
        }
        io_uring_cq_advance(&e->uring, n);
    }
    return got;
}
