/*
 * gc-probe: the guest side of clockvmm's Linux guest. It runs as /init of the initramfs that
 * clockvmm builds (static, no libraries), and reports the guest's own clocks on the console:
 *
 *   GCPROBE mod name=ptp_vmclock rc=0
 *   GCPROBE hello v=2 cpus=N period_ms=P
 *   GCPROBE phc found dev=ptp0 name=vmclock0     (or: GCPROBE phc none reason=...)
 *   GCPROBE cs name=kvm-clock
 *   GCPROBE s cpu=C seq=Q tsc0=T0 rt=R mono=M boot=B tsc1=T1
 *   GCPROBE phc cpu=C seq=Q dev=ptp0 tsc0=T0 phc=P rt0=R0 rt1=R1 tsc1=T1 n=3
 *   GCPROBE vmclock dev=vmclock0 seq=S status=X marker=D gen=G flags=F counter_id=I
 *
 * Before anything else it loads the kernel modules clockvmm put under /gcmod (files
 * NN-name.ko, in name order, with finit_module; one "mod" line each, rc 0 or -errno).
 *
 * One "s" line per online vCPU per period (the probe pins itself to each vCPU in turn with
 * sched_setaffinity; T0/T1 are RDTSC immediately before and after the three clock_gettime
 * calls, all in decimal; of 5 back-to-back tries, the one with the narrowest [T0, T1]). The
 * host maps (T0+T1)/2 to host time through the vCPU's TSC offset. Before each sample the probe
 * waits until its earlier output is transmitted (tcdrain): when a pause finds the VMM has
 * parsed samples up to Q, sample Q+1 may have been read before the pause (its line still in
 * the guest's tty buffer) and Q+2 on were read after the guest ran again.
 *
 * Where a PTP clock named vmclock* exists (Linux's ptp_vmclock bound to the VMM's vmclock
 * device), each "s" sample is followed, on the same vCPU, by one PTP_SYS_OFFSET_EXTENDED of
 * n=3 readings: the "phc" line is the reading with the shortest CLOCK_REALTIME bracket
 * [R0, R1] around its PHC time P (T0/T1: RDTSC around the whole ioctl; Q: the "s" sample it
 * follows). Once per period the "vmclock" line reports the structure as /dev/vmclock0 reads.
 *
 * Settings come from the kernel command line (unknown name=value words become init's
 * environment): gcprobe_period_ms (default 1000), gcprobe_rounds (0 = forever; after that many
 * rounds the probe prints "GCPROBE bye" and reboots, which clockvmm's `reboot=t` turns into a
 * triple fault: the VM stops).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/ptp_clock.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ __volatile__("lfence; rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static uint64_t ns(const struct timespec *t)
{
    return (uint64_t)t->tv_sec * 1000000000ull + (uint64_t)t->tv_nsec;
}

static long env_long(const char *name, long dflt)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    char *end;
    long x = strtol(v, &end, 10);
    return (*end || x < 0) ? dflt : x;
}

static void print_clocksource(void)
{
    char buf[64] = {0};
    int fd = open("/sys/devices/system/clocksource/clocksource0/current_clocksource", O_RDONLY);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[strcspn(buf, "\n")] = 0;
    printf("GCPROBE cs name=%s\n", buf);
}

/* Read a small sysfs file into buf (trailing newline cut); 0 on success. */
static int read_small(const char *path, char *buf, size_t len)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    buf[strcspn(buf, "\n")] = 0;
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Load /gcmod/NN-name.ko in name order (finit_module, else init_module from memory). */
static void load_modules(void)
{
    DIR *d = opendir("/gcmod");
    if (!d)
        return;
    char *names[64];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 64) {
        size_t l = strlen(e->d_name);
        if (l > 3 && strcmp(e->d_name + l - 3, ".ko") == 0)
            names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof(names[0]), cmp_str);
    for (int i = 0; i < n; i++) {
        char path[320], shown[256];
        snprintf(path, sizeof(path), "/gcmod/%s", names[i]);
        const char *dash = strchr(names[i], '-');
        snprintf(shown, sizeof(shown), "%s", dash ? dash + 1 : names[i]);
        shown[strlen(shown) - 3] = 0;
        int rc = 0;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            rc = -errno;
        } else if (syscall(SYS_finit_module, fd, "", 0) != 0) {
            rc = -errno;
            if (rc == -ENOSYS) {
                struct stat st;
                void *buf = NULL;
                if (fstat(fd, &st) == 0 && (buf = malloc(st.st_size)) &&
                    pread(fd, buf, st.st_size, 0) == st.st_size)
                    rc = syscall(SYS_init_module, buf, (unsigned long)st.st_size, "") == 0 ? 0
                                                                                      : -errno;
                free(buf);
            }
        }
        if (fd >= 0)
            close(fd);
        printf("GCPROBE mod name=%s rc=%d\n", shown, rc);
        free(names[i]);
    }
}

/* Open a device node: /dev/NAME (devtmpfs), else one made from /sys/class/CLASS/NAME/dev. */
static int open_dev(const char *class, const char *name, int flags)
{
    char path[256], buf[32];
    snprintf(path, sizeof(path), "/dev/%s", name);
    for (int i = 0; i < 50; i++) {
        int fd = open(path, flags);
        if (fd >= 0 || errno != ENOENT)
            return fd;
        struct timespec d = {0, 20 * 1000000L};
        nanosleep(&d, NULL);
    }
    snprintf(path, sizeof(path), "/sys/class/%s/%s/dev", class, name);
    unsigned maj, min;
    if (read_small(path, buf, sizeof(buf)) != 0 || sscanf(buf, "%u:%u", &maj, &min) != 2)
        return -1;
    snprintf(path, sizeof(path), "/gc-%s", name);
    mknod(path, S_IFCHR | 0600, makedev(maj, min));
    return open(path, flags);
}

/* The PTP clock ptp_vmclock registered (its clock_name is vmclockN); -1 and a reason if none. */
static int find_vmclock_phc(char *dev, size_t devlen, char *why, size_t whylen)
{
    DIR *d = opendir("/sys/class/ptp");
    if (!d) {
        snprintf(why, whylen, "no /sys/class/ptp (no PTP clock registered at all)");
        return -1;
    }
    char seen[192] = "";
    struct dirent *e;
    int fd = -1;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "ptp", 3) != 0)
            continue;
        char path[300], name[64];
        snprintf(path, sizeof(path), "/sys/class/ptp/%s/clock_name", e->d_name);
        if (read_small(path, name, sizeof(name)) != 0)
            continue;
        size_t l = strlen(seen);
        snprintf(seen + l, sizeof(seen) - l, " %.15s=%.31s", e->d_name, name);
        if (strncmp(name, "vmclock", 7) == 0 && fd < 0) {
            fd = open_dev("ptp", e->d_name, O_RDWR | O_CLOEXEC);
            if (fd < 0)
                snprintf(why, whylen, "open %.31s: %.128s", e->d_name, strerror(errno));
            else {
                snprintf(dev, devlen, "%.31s", e->d_name);
                printf("GCPROBE phc found dev=%s name=%s\n", e->d_name, name);
            }
        }
    }
    closedir(d);
    if (fd < 0 && !why[0])
        snprintf(why, whylen, "no PTP clock named vmclock*; clocks:%s", seen[0] ? seen : " none");
    return fd;
}

/* The three clocks between two RDTSCs: of CLOCK_TRIES back-to-back tries, the one with the
 * narrowest bracket [t0, t1]. A vCPU exit inside a bracket (the first touch of a page after a
 * restore into a new process, a timer interrupt) widens it by the exit's length, and the host
 * can place the clock readings only within the bracket: the retries make one exit cost a try,
 * not the sample. */
#define CLOCK_TRIES 5
static void read_clocks(struct timespec *rt, struct timespec *mono, struct timespec *boot,
                        uint64_t *t0, uint64_t *t1)
{
    uint64_t best = UINT64_MAX;
    for (int i = 0; i < CLOCK_TRIES; i++) {
        struct timespec r, m, b;
        uint64_t a = rdtsc();
        clock_gettime(CLOCK_REALTIME, &r);
        clock_gettime(CLOCK_MONOTONIC, &m);
        clock_gettime(CLOCK_BOOTTIME, &b);
        uint64_t z = rdtsc();
        if (z - a < best) {
            best = z - a;
            *rt = r;
            *mono = m;
            *boot = b;
            *t0 = a;
            *t1 = z;
        }
    }
}

static int64_t pct_ns(const struct ptp_clock_time *t)
{
    return (int64_t)t->sec * 1000000000ll + (int64_t)t->nsec;
}

/* One PTP_SYS_OFFSET_EXTENDED on this vCPU; the best of its readings as a line into out
 * (empty when there is nothing to print). */
static void sample_phc(int fd, const char *dev, int cpu, uint64_t seq, char *out, size_t len)
{
    out[0] = 0;
    static int errors;
    struct ptp_sys_offset_extended x;
    memset(&x, 0, sizeof(x));
    x.n_samples = 3; /* rsv[0] (clockid on newer kernels) 0: CLOCK_REALTIME */
    uint64_t t0 = rdtsc();
    int rc = ioctl(fd, PTP_SYS_OFFSET_EXTENDED, &x);
    uint64_t t1 = rdtsc();
    if (rc != 0) {
        if (errors++ < 5)
            snprintf(out, len, "GCPROBE phc err cpu=%d dev=%s errno=%d (%s)\n", cpu, dev, errno,
                     strerror(errno));
        return;
    }
    unsigned best = 0;
    int64_t best_w = INT64_MAX;
    for (unsigned i = 0; i < x.n_samples && i < PTP_MAX_SAMPLES; i++) {
        int64_t w = pct_ns(&x.ts[i][2]) - pct_ns(&x.ts[i][0]);
        if (w >= 0 && w < best_w) {
            best_w = w;
            best = i;
        }
    }
    snprintf(out, len,
             "GCPROBE phc cpu=%d seq=%llu dev=%s tsc0=%llu phc=%lld rt0=%lld rt1=%lld tsc1=%llu "
             "n=%u\n",
             cpu, (unsigned long long)seq, dev, (unsigned long long)t0,
             (long long)pct_ns(&x.ts[best][1]), (long long)pct_ns(&x.ts[best][0]),
             (long long)pct_ns(&x.ts[best][2]), (unsigned long long)t1, x.n_samples);
}

static uint64_t le64(const unsigned char *b)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | b[i];
    return v;
}

/* The vmclock structure as /dev/vmclockN reads it (the driver's read copies under seq_count). */
static void report_vmclock(int fd, const char *dev)
{
    unsigned char b[112];
    if (pread(fd, b, sizeof(b), 0) != (ssize_t)sizeof(b)) {
        printf("GCPROBE vmclock err dev=%s errno=%d\n", dev, errno);
        return;
    }
    unsigned seq = b[12] | b[13] << 8 | b[14] << 16 | (unsigned)b[15] << 24;
    printf("GCPROBE vmclock dev=%s seq=%u status=%u marker=%llu gen=%llu flags=%llu "
           "counter_id=%u\n",
           dev, seq, b[34], (unsigned long long)le64(b + 16), (unsigned long long)le64(b + 104),
           (unsigned long long)le64(b + 24), b[10]);
}

int main(void)
{
    /* As PID 1 the console is the kernel's /dev/console (the initramfs carries the node). */
    mkdir("/proc", 0555);
    mkdir("/sys", 0555);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    /* Device nodes for what the modules create (the console stays open on fds 0-2). */
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    load_modules();

    long period_ms = env_long("gcprobe_period_ms", 1000);
    long rounds = env_long("gcprobe_rounds", 0);
    if (period_ms < 1)
        period_ms = 1;
    int cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < 1)
        cpus = 1;
    if (cpus > CPU_SETSIZE)
        cpus = CPU_SETSIZE;
    printf("GCPROBE hello v=2 cpus=%d period_ms=%ld\n", cpus, period_ms);

    char phc_dev[64] = "", why[256] = "";
    int phc = find_vmclock_phc(phc_dev, sizeof(phc_dev), why, sizeof(why));
    if (phc < 0)
        printf("GCPROBE phc none reason=%s\n", why);
    int vmc = open_dev("misc", "vmclock0", O_RDONLY | O_CLOEXEC);
    if (vmc < 0)
        printf("GCPROBE vmclock none reason=no /dev/vmclock0 (%s)\n", strerror(errno));

    uint64_t seq = 0;
    for (long r = 0; rounds == 0 || r < rounds; r++) {
        print_clocksource();
        for (int c = 0; c < cpus; c++) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(c, &set);
            if (sched_setaffinity(0, sizeof(set), &set) != 0)
                continue;
            /* Everything printed so far is on the wire before the clocks are read: a sample
             * whose line the VMM had not parsed at a pause is then at most the one in flight. */
            fflush(stdout);
            tcdrain(STDOUT_FILENO);
            struct timespec rt, mono, boot;
            uint64_t t0, t1;
            read_clocks(&rt, &mono, &boot, &t0, &t1);
            /* The PHC right after the clocks, before the (slow, trapping) console output. */
            char phc_line[384] = "";
            if (phc >= 0)
                sample_phc(phc, phc_dev, c, seq, phc_line, sizeof(phc_line));
            printf("GCPROBE s cpu=%d seq=%llu tsc0=%llu rt=%llu mono=%llu boot=%llu tsc1=%llu\n", c,
                   (unsigned long long)seq++, (unsigned long long)t0, (unsigned long long)ns(&rt),
                   (unsigned long long)ns(&mono), (unsigned long long)ns(&boot),
                   (unsigned long long)t1);
            fputs(phc_line, stdout);
        }
        if (vmc >= 0)
            report_vmclock(vmc, "vmclock0");
        struct timespec d = {period_ms / 1000, (period_ms % 1000) * 1000000L};
        nanosleep(&d, NULL);
    }
    printf("GCPROBE bye\n");
    fflush(stdout);
    sync();
    reboot(RB_AUTOBOOT);
    for (;;)
        pause();
}
