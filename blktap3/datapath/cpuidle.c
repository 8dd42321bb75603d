/*
 * cpuidle.c: how idle the host's CPUs were, for polling (blktap's CPU monitor).
 *
 * A ring busy-polls only while at least `polling-idle-threshold` percent of all CPU time
 * was idle over the last interval, so that polling takes spare cycles and never those
 * of a loaded host. The figures are the first line of /proc/stat.
 */
#include <stdio.h>

#include "datapath.h"

int td_cpu_read(struct td_cpu_times *out)
{
    FILE *f = fopen("/proc/stat", "re");
    if (!f)
        return -1;
    unsigned long long v[8] = {0};
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                   &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n < 4)
        return -1;
    out->total = 0;
    for (int i = 0; i < 8; i++)
        out->total += v[i];
    out->idle = v[3] + v[4];    /* idle and iowait: nobody wanted the CPU */
    return 0;
}

int td_cpu_idle_pct(const struct td_cpu_times *before, const struct td_cpu_times *after)
{
    /* Counters only grow; one that did not (a wrap, a hot-unplugged CPU) tells nothing. */
    if (after->total <= before->total || after->idle < before->idle)
        return -1;
    uint64_t total = after->total - before->total, idle = after->idle - before->idle;
    if (idle > total)
        return -1;
    return (int)(idle * 100 / total);
}
