/*
 * mirror.c: the secondary of a mirrored image (blktap's `-2`, TD_OPEN_SECONDARY):
 * another image (`aio:`, `vhd:`) or an NBD server reached on a connected socket whose
 * handshake the Python side (blktap3/tapdisk/mirror.py) already made.
 *
 * Every write and discard goes to the primary and to the secondary and is answered once
 * both are done; FLUSH flushes both. On the ring's hot path a write to an image
 * secondary that maps to one extent (raw, an allocated VHD block) is queued beside the
 * primary's in the same io_uring batch (td_mirror_map, ring.c); everything else (NBD,
 * a VHD block to allocate, the NBD export's writes) goes to the primary, then to the
 * secondary, synchronously in the caller's thread under the image's lock (image.c).
 * A ring's write to an NBD secondary is sent at once and its reply read when the
 * primary's half completed (td_mirror_send/td_mirror_wait): the requests of a batch
 * are in flight together, their replies matched by handle whoever reads them.
 * A secondary that fails is dropped and counted (blktap's nbd_mirror_failed): the
 * request that met the failure and every later one complete on the primary alone, so
 * the guest goes on and never sees the secondary's error. A dropped image secondary
 * stays open until the mirror is closed: hot-path writes may still be in flight on it.
 *
 * The NBD client speaks the simple-reply transmission phase (no structured replies
 * were negotiated), under the primary's lock: a request is sent whole, and a reply
 * read for another request than the one waited for is kept for its waiter. A target
 * that stops answering fails by the socket's timeouts (set by Python).
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "datapath.h"

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_CMD_WRITE 1
#define NBD_CMD_FLUSH 3
#define NBD_CMD_WRITE_ZEROES 6

/* NBD requests in flight at once at most: every ring slot of every queue, and more. */
#define TD_NBD_MAX_INFLIGHT 8192u

struct td_mirror {
    struct td_image *image; /* a secondary image, or NULL */
    int fd;                 /* an NBD socket, or -1 */
    uint64_t handle;        /* the last request's (handles start at 1) */
    /* replies read while waiting for another one, kept for their waiters */
    struct { uint64_t handle; int32_t err; } *replies;
    uint32_t nreplies;
    struct td_mirror_stats st;
};

static int send_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int recv_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -ECONNRESET;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Send one NBD request (its data after the header): 0 and its handle, or -errno. */
static int nbd_send(struct td_mirror *m, uint16_t type, uint64_t off, uint32_t len,
                    const void *data, uint64_t *h)
{
    unsigned char req[28];
    *h = ++m->handle;
    uint32_t magic = htobe32(NBD_REQUEST_MAGIC), length = htobe32(len);
    uint16_t flags = 0, cmd = htobe16(type);
    uint64_t handle = htobe64(*h), offset = htobe64(off);
    memcpy(req, &magic, 4);
    memcpy(req + 4, &flags, 2);
    memcpy(req + 6, &cmd, 2);
    memcpy(req + 8, &handle, 8);
    memcpy(req + 16, &offset, 8);
    memcpy(req + 24, &length, 4);
    int rc = send_all(m->fd, req, sizeof(req));
    if (!rc && data)
        rc = send_all(m->fd, data, len);
    return rc;
}

/* Wait for the reply to `h`: 0, -errno of the transport, or -EIO when the server
 * answered an error. Replies to other requests read meanwhile (the server may answer
 * out of order; another thread's requests are in flight too) are kept for their
 * waiters. */
static int nbd_wait(struct td_mirror *m, uint64_t h)
{
    for (uint32_t i = 0; i < m->nreplies; i++) {
        if (m->replies[i].handle == h) {
            int err = m->replies[i].err;
            m->replies[i] = m->replies[--m->nreplies];
            return err;
        }
    }
    for (;;) {
        unsigned char rep[16];
        int rc = recv_all(m->fd, rep, sizeof(rep));
        if (rc)
            return rc;
        uint32_t rmagic, error;
        uint64_t rhandle;
        memcpy(&rmagic, rep, 4);
        memcpy(&error, rep + 4, 4);
        memcpy(&rhandle, rep + 8, 8);
        rhandle = be64toh(rhandle);
        if (be32toh(rmagic) != NBD_SIMPLE_REPLY_MAGIC || rhandle == 0 || rhandle > m->handle)
            return -EPROTO;
        int err = error ? -EIO : 0;
        if (rhandle == h)
            return err;
        if (m->nreplies == TD_NBD_MAX_INFLIGHT)
            return -EPROTO;     /* more answers than requests in flight: a broken peer */
        m->replies[m->nreplies].handle = rhandle;
        m->replies[m->nreplies].err = err;
        m->nreplies++;
    }
}

/* One NBD request and its reply (the caller holds the primary's lock). */
static int nbd_request(struct td_mirror *m, uint16_t type, uint64_t off, uint32_t len,
                       const void *data)
{
    uint64_t h;
    int rc = nbd_send(m, type, off, len, data, &h);
    return rc ? rc : nbd_wait(m, h);
}

int td_mirror_open_image(struct td_image *sec, struct td_mirror **out)
{
    struct td_mirror *m = calloc(1, sizeof(*m));
    if (!m)
        return -ENOMEM;
    m->image = sec;
    m->fd = -1;
    m->st.kind = TD_MIRROR_IMAGE;
    m->st.active = 1;
    *out = m;
    return 0;
}

int td_mirror_open_nbd(int fd, struct td_mirror **out)
{
    struct td_mirror *m = calloc(1, sizeof(*m));
    if (!m)
        return -ENOMEM;
    m->replies = calloc(TD_NBD_MAX_INFLIGHT, sizeof(*m->replies));
    if (!m->replies) {
        free(m);
        return -ENOMEM;
    }
    m->fd = fd;
    m->st.kind = TD_MIRROR_NBD;
    m->st.active = 1;
    *out = m;
    return 0;
}

/* Under the primary's lock (image.c), so a failure seen by two threads counts once. */
static void drop(struct td_mirror *m, int err)
{
    if (!td_mirror_active(m))
        return;
    if (m->fd >= 0) {
        /* Shut down, not closed: the number stays ours until td_mirror_close. */
        shutdown(m->fd, SHUT_RDWR);
    }
    m->st.failed++;
    m->st.last_error = -err;
    __atomic_store_n(&m->st.active, 0, __ATOMIC_RELEASE);
}

void td_mirror_failed(struct td_mirror *m, int err)
{
    drop(m, err);
}

int td_mirror_is_nbd(const struct td_mirror *m)
{
    return m && m->fd >= 0;
}

int td_mirror_map(struct td_mirror *m, uint64_t sector, uint32_t nr, uint64_t *off)
{
    if (!td_mirror_active(m) || !m->image)
        return -1;
    return td_image_map(m->image, 1, sector, nr, off);
}

int td_mirror_send(struct td_mirror *m, const void *buf, uint64_t sector, uint32_t nr,
                   uint64_t *handle)
{
    if (!td_mirror_active(m) || m->fd < 0)
        return -1;
    int rc = nbd_send(m, NBD_CMD_WRITE, sector << TD_SECTOR_SHIFT, nr << TD_SECTOR_SHIFT,
                      buf, handle);
    if (rc) {
        drop(m, rc);
        return -1;
    }
    return 0;
}

void td_mirror_wait(struct td_mirror *m, uint64_t handle)
{
    if (!td_mirror_active(m))
        return;     /* dropped meanwhile: nothing to wait for */
    int rc = nbd_wait(m, handle);
    if (rc)
        drop(m, rc);
    else
        td_mirror_wrote(m);
}

void td_mirror_wrote(struct td_mirror *m)
{
    __atomic_fetch_add(&m->st.writes, 1, __ATOMIC_RELAXED);
}

void td_mirror_close(struct td_mirror *m)
{
    if (!m)
        return;
    if (m->image)
        td_image_close(m->image);
    if (m->fd >= 0)
        close(m->fd);
    free(m->replies);
    free(m);
}

/* Read without the image's lock by td_image_map: hence atomic. */
int td_mirror_active(const struct td_mirror *m)
{
    return m && __atomic_load_n(&m->st.active, __ATOMIC_ACQUIRE);
}

void td_mirror_write(struct td_mirror *m, const void *buf, uint64_t sector, uint32_t nr)
{
    if (!td_mirror_active(m))
        return;
    int rc = m->image ? td_image_sync_io(m->image, 1, (void *)buf, sector, nr)
                      : nbd_request(m, NBD_CMD_WRITE, sector << TD_SECTOR_SHIFT,
                                    nr << TD_SECTOR_SHIFT, buf);
    if (rc)
        drop(m, rc);
    else
        td_mirror_wrote(m);
}

void td_mirror_discard(struct td_mirror *m, uint64_t sector, uint64_t nr)
{
    if (!td_mirror_active(m))
        return;
    int rc = 0;
    if (m->image) {
        rc = td_image_discard(m->image, sector, nr);
    } else {
        /* Zeroes, not TRIM: a trimmed range of the target may read as anything. */
        while (!rc && nr) {
            uint64_t n = nr > (1u << 20) ? (1u << 20) : nr;     /* 512 MiB a request */
            rc = nbd_request(m, NBD_CMD_WRITE_ZEROES, sector << TD_SECTOR_SHIFT,
                             (uint32_t)(n << TD_SECTOR_SHIFT), NULL);
            sector += n;
            nr -= n;
        }
    }
    if (rc)
        drop(m, rc);
}

void td_mirror_flush(struct td_mirror *m)
{
    if (!td_mirror_active(m))
        return;
    int rc = m->image ? td_image_flush(m->image) : nbd_request(m, NBD_CMD_FLUSH, 0, 0, NULL);
    if (rc)
        drop(m, rc);
    else
        m->st.flushes++;
}

void td_mirror_stats(const struct td_mirror *m, struct td_mirror_stats *out)
{
    if (!m) {
        memset(out, 0, sizeof(*out));
        return;
    }
    *out = m->st;
    out->writes = __atomic_load_n(&m->st.writes, __ATOMIC_RELAXED);
}
