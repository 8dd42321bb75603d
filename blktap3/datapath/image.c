/*
 * image.c: the raw image driver ("aio"/"raw": a file or block device, O_DIRECT
 * when the file system takes it), the null driver (no storage: the ring's own
 * ceiling), and the door to the VHD driver (vhd.c): td_image_map says where a
 * request goes on the hot path, td_image_sync_io serves the rest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "datapath.h"

/* The null image: large enough for any benchmark, addresses nothing. */
#define TD_NULL_SECTORS (1ull << 31)

static uint32_t physical_sector_size(int fd, const struct stat *st)
{
    unsigned int pbs = 0;
    if (S_ISBLK(st->st_mode) && ioctl(fd, BLKPBSZGET, &pbs) == 0 && pbs >= 512)
        return pbs;
    /* A file: the file system's block, when it is a sane power of two. */
    uint64_t b = (uint64_t)st->st_blksize;
    if (b >= 512 && b <= 65536 && (b & (b - 1)) == 0)
        return (uint32_t)b;
    return 512;
}

/* The logical block: what `sector-size` says and every request must align to (blkif.h:
 * alignment only, sectors stay 512 bytes). A device's own (a 4 KiB-sector disk); for a
 * file under O_DIRECT, the offset alignment the kernel demands (statx DIOALIGN). */
static uint32_t logical_block_size(int fd, const struct stat *st, int o_direct)
{
    int lbs = 0;
    if (S_ISBLK(st->st_mode) && ioctl(fd, BLKSSZGET, &lbs) == 0 && lbs >= 512 &&
        lbs <= 65536 && !(lbs & (lbs - 1)))
        return (uint32_t)lbs;
#ifdef STATX_DIOALIGN
    struct statx sx;
    if (o_direct && S_ISREG(st->st_mode) &&
        statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
        (sx.stx_mask & STATX_DIOALIGN)) {
        uint32_t a = sx.stx_dio_offset_align;
        if (a >= 512 && a <= 65536 && !(a & (a - 1)))
            return a;
    }
#else
    (void)o_direct;
#endif
    return 512;
}

static int can_punch(int fd, uint64_t size)
{
    /* Punching past EOF changes nothing but says whether the fs supports it. */
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     (off_t)size + TD_PAGE_SIZE, TD_PAGE_SIZE) == 0;
}

int td_image_open(const char *driver, const char *path, int readonly, int o_direct,
                  struct td_image **out)
{
    struct td_image *img = calloc(1, sizeof(*img));
    if (!img)
        return -ENOMEM;
    img->readonly = readonly;
    img->info.sector_size = 512;
    img->info.info = readonly ? VDISK_READONLY : 0;
    pthread_mutex_init(&img->lock, NULL);

    if (strcmp(driver, "null") == 0) {
        img->fd = -1;
        img->info.sectors = TD_NULL_SECTORS;
        img->info.physical_sector_size = 512;
        *out = img;
        return 0;
    }
    if (strcmp(driver, "aio") != 0 && strcmp(driver, "raw") != 0) {
        pthread_mutex_destroy(&img->lock);
        free(img);
        return -EINVAL;
    }

    int flags = (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC;
    int fd = -1;
    if (o_direct) {
        fd = open(path, flags | O_DIRECT);
        /* Some file systems (old tmpfs, some FUSE) refuse O_DIRECT: fall back, say so. */
        if (fd >= 0)
            img->info.o_direct = 1;
        else if (errno != EINVAL)
            goto fail_errno;
    }
    if (fd < 0) {
        fd = open(path, flags);
        if (fd < 0)
            goto fail_errno;
    }
    struct stat st;
    if (fstat(fd, &st) != 0)
        goto fail_close;
    uint64_t size;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &size) != 0)
            goto fail_close;
    } else if (S_ISREG(st.st_mode)) {
        size = (uint64_t)st.st_size;
    } else {
        close(fd);
        pthread_mutex_destroy(&img->lock);
        free(img);
        return -EINVAL;
    }
    img->fd = fd;
    img->info.sectors = size >> TD_SECTOR_SHIFT;
    img->info.sector_size = logical_block_size(fd, &st, img->info.o_direct);
    img->info.physical_sector_size = physical_sector_size(fd, &st);
    if (img->info.physical_sector_size < img->info.sector_size)
        img->info.physical_sector_size = img->info.sector_size;
    img->info.discard = !readonly && S_ISREG(st.st_mode) && can_punch(fd, size);
    *out = img;
    return 0;

fail_close: {
        int e = errno;
        close(fd);
        pthread_mutex_destroy(&img->lock);
        free(img);
        return -e;
    }
fail_errno: {
        int e = errno;
        pthread_mutex_destroy(&img->lock);
        free(img);
        return -e;
    }
}

int td_image_open_vhd(const struct td_vhd_layer_desc *layers, uint32_t n, int readonly,
                      int o_direct, struct td_image **out)
{
    struct td_image *img = calloc(1, sizeof(*img));
    if (!img)
        return -ENOMEM;
    int direct = 0;
    int rc = td_vhd_open(layers, n, readonly, o_direct, &img->vhd, &img->fd, &direct);
    if (rc) {
        free(img);
        return rc;
    }
    struct stat st;
    if (fstat(img->fd, &st) != 0) {
        rc = -errno;
        td_vhd_close(img->vhd);
        free(img);
        return rc;
    }
    pthread_mutex_init(&img->lock, NULL);
    img->readonly = readonly;
    img->info.sectors = layers[0].sectors;
    img->info.sector_size = 512;
    img->info.info = readonly ? VDISK_READONLY : 0;
    img->info.o_direct = direct;
    img->info.physical_sector_size = physical_sector_size(img->fd, &st);
    /* DISCARD punches holes under the leaf's data (vhd.c says what it reclaims). */
    img->info.discard = !readonly && can_punch(img->fd, (uint64_t)st.st_size);
    *out = img;
    return 0;
}

void td_image_close(struct td_image *img)
{
    if (!img)
        return;
    td_mirror_close(img->mirror);
    td_cbt_close(img->cbt);
    pthread_mutex_destroy(&img->lock);
    if (img->vhd)
        td_vhd_close(img->vhd);     /* closes every file of the chain, img->fd too */
    else if (img->fd >= 0)
        close(img->fd);
    free(img);
}

static int map_primary(struct td_image *img, int write, uint64_t sector, uint32_t nr,
                       uint64_t *off)
{
    if (!img->vhd) {
        *off = sector << TD_SECTOR_SHIFT;
        return img->fd;
    }
    pthread_mutex_lock(&img->lock);
    int fd = td_vhd_map(img->vhd, write, sector, nr, off);
    pthread_mutex_unlock(&img->lock);
    return fd;
}

int td_image_map(struct td_image *img, int write, uint64_t sector, uint32_t nr,
                 uint64_t *off)
{
    if (write) {
        /* Marked before the I/O is queued, so before the write can be answered. */
        td_cbt_mark(img->cbt, sector, nr);
        if (td_mirror_active(img->mirror))
            return -1;  /* to both, in td_image_sync_io */
    }
    return map_primary(img, write, sector, nr, off);
}

int td_image_map_mirrored(struct td_image *img, uint64_t sector, uint32_t nr,
                          uint64_t *off, int *sfd, uint64_t *soff)
{
    *sfd = -1;
    td_cbt_mark(img->cbt, sector, nr);
    if (td_mirror_active(img->mirror) && !td_mirror_is_nbd(img->mirror)) {
        *sfd = td_mirror_map(img->mirror, sector, nr, soff);
        if (*sfd < 0)
            return -1;  /* to both, in td_image_sync_io */
    }
    int fd = map_primary(img, 1, sector, nr, off);
    if (fd < 0)
        *sfd = -1;
    return fd;
}

int td_image_mirror_send(struct td_image *img, const void *buf, uint64_t sector,
                         uint32_t nr, uint64_t *handle)
{
    /* Unlocked first: most images have no NBD secondary (its fd is fixed at open). */
    if (!td_mirror_is_nbd(img->mirror) || !td_mirror_active(img->mirror))
        return -1;
    pthread_mutex_lock(&img->lock);
    int rc = td_mirror_send(img->mirror, buf, sector, nr, handle);
    pthread_mutex_unlock(&img->lock);
    return rc;
}

void td_image_mirror_wait(struct td_image *img, uint64_t handle)
{
    pthread_mutex_lock(&img->lock);
    td_mirror_wait(img->mirror, handle);
    pthread_mutex_unlock(&img->lock);
}

void td_image_mirror_done(struct td_image *img, int err)
{
    if (!err) {
        td_mirror_wrote(img->mirror);
        return;
    }
    pthread_mutex_lock(&img->lock);
    td_mirror_failed(img->mirror, err);
    pthread_mutex_unlock(&img->lock);
}

int td_image_sync_io(struct td_image *img, int write, void *buf, uint64_t sector,
                     uint32_t nr)
{
    if (write)
        td_cbt_mark(img->cbt, sector, nr);
    pthread_mutex_lock(&img->lock);
    int rc = 0;
    if (img->vhd)
        rc = td_vhd_io(img->vhd, write, buf, sector, nr);
    else if (img->fd >= 0)
        rc = td_pio(img->fd, write, buf, (size_t)nr << TD_SECTOR_SHIFT,
                    sector << TD_SECTOR_SHIFT);
    /* Acknowledged once both completed; a failed primary is not mirrored (its error
     * goes to the guest, which will write again). */
    if (write && rc == 0)
        td_mirror_write(img->mirror, buf, sector, nr);
    pthread_mutex_unlock(&img->lock);
    return rc;
}

int td_image_discard(struct td_image *img, uint64_t sector, uint64_t nr)
{
    if (img->fd < 0 || nr == 0)
        return 0;   /* the null image; fallocate would refuse an empty range */
    td_cbt_mark(img->cbt, sector, nr);     /* the blocks now read differently */
    pthread_mutex_lock(&img->lock);
    int rc;
    if (img->vhd)
        rc = td_vhd_discard(img->vhd, sector, nr);
    else
        rc = fallocate(img->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       (off_t)(sector << TD_SECTOR_SHIFT), (off_t)(nr << TD_SECTOR_SHIFT))
                 ? -errno : 0;
    if (rc == 0)
        td_mirror_discard(img->mirror, sector, nr);
    pthread_mutex_unlock(&img->lock);
    return rc;
}

int td_image_flush(struct td_image *img)
{
    if (img->fd < 0)
        return 0;
    int rc = td_sync(img->fd, &img->sync_failed);
    if (rc == 0 && (__atomic_load_n(&img->sync_failed, __ATOMIC_ACQUIRE) ||
                    (img->vhd && td_vhd_sync_failed(img->vhd))))
        rc = -EIO;  /* an earlier sync failed: what it covered may be gone (td_sync) */
    if (rc == 0)
        rc = td_cbt_sync(img->cbt);
    pthread_mutex_lock(&img->lock);
    td_mirror_flush(img->mirror);
    pthread_mutex_unlock(&img->lock);
    return rc;
}

int td_image_set_log(struct td_image *img, const char *path, uint64_t offset,
                     uint64_t nbits)
{
    struct td_cbt *c;
    int rc = td_cbt_open(path, offset, nbits, &c);
    if (rc)
        return rc;
    td_cbt_close(img->cbt);
    img->cbt = c;
    return 0;
}

int td_image_set_mirror_image(struct td_image *img, struct td_image *secondary)
{
    struct td_mirror *m;
    int rc = td_mirror_open_image(secondary, &m);
    if (rc)
        return rc;
    td_mirror_close(img->mirror);
    img->mirror = m;
    return 0;
}

int td_image_set_mirror_nbd(struct td_image *img, int fd)
{
    struct td_mirror *m;
    int rc = td_mirror_open_nbd(fd, &m);
    if (rc)
        return rc;
    td_mirror_close(img->mirror);
    img->mirror = m;
    return 0;
}

void td_image_mirror_stats(struct td_image *img, struct td_mirror_stats *out)
{
    pthread_mutex_lock(&img->lock);
    td_mirror_stats(img->mirror, out);
    pthread_mutex_unlock(&img->lock);
}

const struct td_image_info *td_image_info(const struct td_image *img)
{
    return &img->info;
}

int td_image_rw(struct td_image *img, int engine, int write, void *buf,
                uint64_t sector, uint32_t nr_sectors)
{
    if (write && img->readonly)
        return -EROFS;
    /* The byte length is a uint32_t (and an int32_t result): 2^23 sectors would wrap. */
    if (nr_sectors > (uint32_t)INT32_MAX >> TD_SECTOR_SHIFT)
        return -EINVAL;
    if (sector > img->info.sectors || nr_sectors > img->info.sectors - sector)
        return -ERANGE;
    if (img->fd < 0)
        engine = TD_ENGINE_NULL;
    uint64_t off;
    int fd = td_image_map(img, write, sector, nr_sectors, &off);
    if (fd < 0 && img->vhd)
        return td_image_sync_io(img, write, buf, sector, nr_sectors);
    struct td_engine *e;
    int rc = td_engine_open(engine, 1, &e);
    if (rc)
        return rc;
    uint32_t len = nr_sectors << TD_SECTOR_SHIFT;
    rc = td_engine_prep(e, write ? TD_IO_WRITE : TD_IO_READ, fd, buf, len, off, 0);
    if (!rc)
        rc = td_engine_submit(e);
    if (!rc) {
        struct td_cqe c;
        while (td_engine_reap(e, &c, 1) == 0) {
            /* Only tests and tools land here: a short sleep on one I/O is fine. */
            usleep(50);
        }
        rc = c.res < 0 ? c.res : (c.res == (int32_t)len ? 0 : -EIO);
    }
    td_engine_close(e);
    return rc;
}
