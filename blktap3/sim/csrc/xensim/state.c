/*
 * xensim state: finding the run directory, mapping the machine file and each
 * domain's state and memory into this process, the machine-wide lock.
 */
#include "xensim.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

static pthread_mutex_t g_proc_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_dir[PATH_MAX];
static int g_dir_set;
static struct xs_machine *g_machine;
static struct xs_dom_view *g_views[XS_MAX_DOMID];

int xs_env_domid(void)
{
    const char *s = getenv("XENSIM_DOMID");
    if (s == NULL || *s == '\0')
        return 0;
    return atoi(s);
}

const char *xs_dir(void)
{
    if (!g_dir_set) {
        const char *s = getenv("XENSIM_DIR");
        if (s == NULL || *s == '\0' || strlen(s) >= sizeof(g_dir)) {
            errno = ENOENT;
            return NULL;
        }
        pthread_mutex_lock(&g_proc_lock);
        if (!g_dir_set) {
            strcpy(g_dir, s);
            g_dir_set = 1;
        }
        pthread_mutex_unlock(&g_proc_lock);
    }
    return g_dir;
}

int xs_path(char *buf, size_t len, const char *fmt, ...)
{
    const char *dir = xs_dir();
    if (dir == NULL)
        return -1;
    int n = snprintf(buf, len, "%s/", dir);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, len - (size_t)n, fmt, ap);
    va_end(ap);
    if (n < 0 || m < 0 || (size_t)(n + m) >= len) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC 0x01021994
#endif

/* Memory goes to tmpfs: grant copy and map touch it on every disk request.
 * Outside the run directory the name carries the run directory's inode, so
 * machines of different run directories never collide. */
int xs_mem_path(uint32_t domid, uint32_t gen, char *buf, size_t len)
{
    struct statfs sfs;
    struct stat st;
    const char *dir = xs_dir();
    if (dir == NULL || statfs(dir, &sfs) < 0 || stat(dir, &st) < 0)
        return -1;
    int n;
    if (sfs.f_type == TMPFS_MAGIC)
        n = snprintf(buf, len, "%s/dom%u/mem", dir, domid);
    else
        n = snprintf(buf, len, "/dev/shm/xensim-%lx-%lx-%u-%u", (unsigned long)st.st_dev,
                     (unsigned long)st.st_ino, domid, gen);
    if (n < 0 || (size_t)n >= len) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

static void *map_file(const char *path, size_t len, int *fd_out)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int saved = errno;
    if (fd_out != NULL && p != MAP_FAILED)
        *fd_out = fd;
    else
        close(fd);
    errno = saved;
    return p == MAP_FAILED ? NULL : p;
}

struct xs_machine *xs_machine(void)
{
    struct xs_machine *m = __atomic_load_n(&g_machine, __ATOMIC_ACQUIRE);
    if (m != NULL)
        return m;
    char path[PATH_MAX];
    if (xs_path(path, sizeof(path), "machine") < 0)
        return NULL;
    pthread_mutex_lock(&g_proc_lock);
    if (g_machine == NULL) {
        m = map_file(path, sizeof(*m), NULL);
        if (m != NULL && m->magic != XS_MAGIC) {
            munmap(m, sizeof(*m));
            m = NULL;
            errno = EINVAL;
        }
        __atomic_store_n(&g_machine, m, __ATOMIC_RELEASE);
    }
    m = g_machine;
    pthread_mutex_unlock(&g_proc_lock);
    return m;
}

int xs_lock(void)
{
    struct xs_machine *m = xs_machine();
    if (m == NULL)
        return -1;
    int rc = pthread_mutex_lock(&m->lock);
    /* A process died holding the lock: tables are updated in an order that
     * leaves them usable, so mark the lock consistent and go on. */
    if (rc == EOWNERDEAD)
        rc = pthread_mutex_consistent(&m->lock);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    return 0;
}

void xs_unlock(void)
{
    pthread_mutex_unlock(&g_machine->lock);
}

static void view_unmap(struct xs_dom_view *v)
{
    if (v->d != NULL)
        munmap(v->d, sizeof(*v->d));
    if (v->mem != NULL)
        munmap(v->mem, v->mem_len);
    if (v->mem_fd >= 0)
        close(v->mem_fd);
    v->d = NULL;
    v->mem = NULL;
    v->mem_fd = -1;
    v->gen = 0;
}

/* Map a domain's state and memory. A domain destroyed and created again gets
 * a new generation, so stale views are noticed by one compare. */
static struct xs_dom_view *view_load(uint32_t domid, uint32_t gen)
{
    struct xs_dom_view *v = g_views[domid];
    if (v == NULL) {
        v = calloc(1, sizeof(*v));
        if (v == NULL)
            return NULL;
        v->mem_fd = -1;
        g_views[domid] = v;
    }
    if (v->gen == gen && v->d != NULL)
        return v;
    view_unmap(v);
    char path[PATH_MAX];
    if (xs_path(path, sizeof(path), "dom%u/state", domid) < 0)
        return NULL;
    struct xs_domain *d = map_file(path, sizeof(*d), NULL);
    if (d == NULL) {
        errno = ESRCH;
        return NULL;
    }
    if (d->magic != XS_MAGIC || d->gen != gen) {
        munmap(d, sizeof(*d));
        errno = ESRCH;
        return NULL;
    }
    /* The size is the file's, not d->nr_pages: the guest writes its state file. */
    char mem_path[PATH_MAX];
    struct stat st;
    int fd = -1;
    uint8_t *mem = NULL;
    size_t len = 0;
    if (xs_mem_path(domid, gen, mem_path, sizeof(mem_path)) == 0)
        fd = open(mem_path, O_RDWR | O_CLOEXEC);
    if (fd >= 0 && fstat(fd, &st) == 0 && st.st_size >= (off_t)XS_PAGE_SIZE) {
        uint64_t pages = (uint64_t)st.st_size / XS_PAGE_SIZE;
        len = (size_t)(pages < XS_MAX_PAGES ? pages : XS_MAX_PAGES) * XS_PAGE_SIZE;
        mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (mem == MAP_FAILED)
            mem = NULL;
    }
    if (mem == NULL) {
        if (fd >= 0)
            close(fd);
        munmap(d, sizeof(*d));
        errno = ESRCH;
        return NULL;
    }
    v->d = d;
    v->mem = mem;
    v->mem_len = len;
    v->nr_pages = len / XS_PAGE_SIZE;
    v->mem_fd = fd;
    __atomic_store_n(&v->gen, gen, __ATOMIC_RELEASE);
    return v;
}

struct xs_dom_view *xs_dom(uint32_t domid)
{
    struct xs_machine *m = xs_machine();
    if (m == NULL)
        return NULL;
    if (domid >= XS_MAX_DOMID) {
        errno = ESRCH;
        return NULL;
    }
    uint32_t gen = __atomic_load_n(&m->gen[domid], __ATOMIC_ACQUIRE);
    if (gen == 0) {
        errno = ESRCH;
        return NULL;
    }
    struct xs_dom_view *v = __atomic_load_n(&g_views[domid], __ATOMIC_ACQUIRE);
    if (v != NULL && __atomic_load_n(&v->gen, __ATOMIC_ACQUIRE) == gen)
        return v;
    pthread_mutex_lock(&g_proc_lock);
    v = view_load(domid, gen);
    pthread_mutex_unlock(&g_proc_lock);
    return v;
}

/* Drop every mapping (the run directory changed). Callers must not be using
 * views concurrently. */
void xs_forget_views(void)
{
    pthread_mutex_lock(&g_proc_lock);
    for (uint32_t i = 0; i < XS_MAX_DOMID; i++) {
        if (g_views[i] != NULL)
            view_unmap(g_views[i]);
    }
    if (g_machine != NULL)
        munmap(g_machine, sizeof(*g_machine));
    g_machine = NULL;
    pthread_mutex_unlock(&g_proc_lock);
}

/* Extension: point this process at a run directory (Python callers). */
XS_EXPORT int xensim_use_dir(const char *dir)
{
    if (dir == NULL || strlen(dir) >= sizeof(g_dir)) {
        errno = EINVAL;
        return -1;
    }
    if (g_dir_set && strcmp(dir, g_dir) == 0)
        return 0;
    xs_forget_views();
    xs_forget_fifos();  /* handle names are unique within one machine only */
    pthread_mutex_lock(&g_proc_lock);
    strcpy(g_dir, dir);
    g_dir_set = 1;
    pthread_mutex_unlock(&g_proc_lock);
    return 0;
}
