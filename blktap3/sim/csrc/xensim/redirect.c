/*
 * xensim redirects of the host interfaces the daemons touch besides the Xen
 * libraries: /proc/xen/xsd_port and /proc/xen/xsd_kva (C xenstored opens them
 * to find dom0's xenstore port and page) go to files of the run directory,
 * and setrlimit(RLIMIT_NOFILE or RLIMIT_MEMLOCK) is clamped to the hard limit
 * (oxenstored asks for 1M open files, blktap's tapdisk for unlimited locked
 * memory; root here lacks CAP_SYS_RESOURCE). An open of /dev/xen/gntdev is the
 * node of gntdevnode.c.
 */
#include "gntdev.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <string.h>
#include <sys/resource.h>

/* The sanitizer runtimes call open and setrlimit while they initialise,
 * before their shadow memory exists: these wrappers must not be
 * instrumented, or the sanitized build crashes at load. */
#define XS_NOSAN __attribute__((no_sanitize("address", "undefined")))

XS_NOSAN static const char *redirect(const char *path, char *buf, size_t len)
{
    const char *name = NULL;
    if (path != NULL && strcmp(path, "/proc/xen/xsd_port") == 0)
        name = "xsd_port";
    else if (path != NULL && strcmp(path, "/proc/xen/xsd_kva") == 0)
        name = "xsd_kva";
    if (name == NULL || xs_path(buf, len, "%s", name) < 0)
        return path;
    return buf;
}

XS_NOSAN static mode_t mode_arg(int flags, va_list ap)
{
    if (flags & (O_CREAT | O_TMPFILE))
        return (mode_t)va_arg(ap, int);
    return 0;
}

#define DEFINE_OPEN(name)                                                            \
    XS_EXPORT XS_NOSAN int name(const char *path, int flags, ...)                             \
    {                                                                                \
        static int (*real)(const char *, int, ...);                                  \
        if (real == NULL)                                                            \
            real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, #name);         \
        va_list ap;                                                                  \
        va_start(ap, flags);                                                         \
        mode_t mode = mode_arg(flags, ap);                                           \
        va_end(ap);                                                                  \
        if (xs_is_gntdev_node(path))                                                 \
            return xs_gntdev_node_open();                                            \
        char buf[PATH_MAX];                                                          \
        return real(redirect(path, buf, sizeof(buf)), flags, mode);                  \
    }

#define DEFINE_OPENAT(name)                                                          \
    XS_EXPORT XS_NOSAN int name(int dirfd, const char *path, int flags, ...)                  \
    {                                                                                \
        static int (*real)(int, const char *, int, ...);                             \
        if (real == NULL)                                                            \
            real = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, #name);    \
        va_list ap;                                                                  \
        va_start(ap, flags);                                                         \
        mode_t mode = mode_arg(flags, ap);                                           \
        va_end(ap);                                                                  \
        if (xs_is_gntdev_node(path))                                                 \
            return xs_gntdev_node_open();                                            \
        char buf[PATH_MAX];                                                          \
        return real(dirfd, redirect(path, buf, sizeof(buf)), flags, mode);           \
    }

DEFINE_OPEN(open)
DEFINE_OPEN(open64)
DEFINE_OPENAT(openat)
DEFINE_OPENAT(openat64)

XS_NOSAN static int clamps(__rlimit_resource_t resource)
{
    return resource == RLIMIT_NOFILE || resource == RLIMIT_MEMLOCK;
}

XS_EXPORT XS_NOSAN int setrlimit(__rlimit_resource_t resource, const struct rlimit *rl)
{
    static int (*real)(__rlimit_resource_t, const struct rlimit *);
    if (real == NULL)
        real = (int (*)(__rlimit_resource_t, const struct rlimit *))dlsym(RTLD_NEXT, "setrlimit");
    struct rlimit cur, clamped = *rl;
    if (clamps(resource) && getrlimit(resource, &cur) == 0) {
        if (clamped.rlim_max > cur.rlim_max)
            clamped.rlim_max = cur.rlim_max;
        if (clamped.rlim_cur > clamped.rlim_max)
            clamped.rlim_cur = clamped.rlim_max;
    }
    return real(resource, &clamped);
}

XS_EXPORT XS_NOSAN int setrlimit64(__rlimit_resource_t resource, const struct rlimit64 *rl)
{
    static int (*real)(__rlimit_resource_t, const struct rlimit64 *);
    if (real == NULL)
        real = (int (*)(__rlimit_resource_t, const struct rlimit64 *))dlsym(RTLD_NEXT,
                                                                              "setrlimit64");
    struct rlimit64 cur, clamped = *rl;
    if (clamps(resource) && getrlimit64(resource, &cur) == 0) {
        if (clamped.rlim_max > cur.rlim_max)
            clamped.rlim_max = cur.rlim_max;
        if (clamped.rlim_cur > clamped.rlim_max)
            clamped.rlim_cur = clamped.rlim_max;
    }
    return real(resource, &clamped);
}
