/*
 * gc-probe: the guest side of clockvmm's Linux guest. It runs as /init of the initramfs that
 * clockvmm builds (static, no libraries), and reports the guest's own clocks on the console:
 *
 *   GCPROBE hello v=1 cpus=N period_ms=P
 *   GCPROBE cs name=kvm-clock
 *   GCPROBE s cpu=C seq=Q tsc0=T0 rt=R mono=M boot=B tsc1=T1
 *
 * one "s" line per online vCPU per period (the probe pins itself to each vCPU in turn with
 * sched_setaffinity; T0/T1 are RDTSC immediately before and after the three clock_gettime
 * calls, all in decimal). The host maps (T0+T1)/2 to host time through the vCPU's TSC offset.
 *
 * Settings come from the kernel command line (unknown name=value words become init's
 * environment): gcprobe_period_ms (default 1000), gcprobe_rounds (0 = forever; after that many
 * rounds the probe prints "GCPROBE bye" and reboots, which clockvmm's `reboot=t` turns into a
 * triple fault: the VM stops).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
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

int main(void)
{
    /* As PID 1 the console is the kernel's /dev/console (the initramfs carries the node). */
    mkdir("/proc", 0555);
    mkdir("/sys", 0555);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);

    long period_ms = env_long("gcprobe_period_ms", 1000);
    long rounds = env_long("gcprobe_rounds", 0);
    if (period_ms < 1)
        period_ms = 1;
    int cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < 1)
        cpus = 1;
    if (cpus > CPU_SETSIZE)
        cpus = CPU_SETSIZE;
    printf("GCPROBE hello v=1 cpus=%d period_ms=%ld\n", cpus, period_ms);

    uint64_t seq = 0;
    for (long r = 0; rounds == 0 || r < rounds; r++) {
        print_clocksource();
        for (int c = 0; c < cpus; c++) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(c, &set);
            if (sched_setaffinity(0, sizeof(set), &set) != 0)
                continue;
            struct timespec rt, mono, boot;
            uint64_t t0 = rdtsc();
            clock_gettime(CLOCK_REALTIME, &rt);
            clock_gettime(CLOCK_MONOTONIC, &mono);
            clock_gettime(CLOCK_BOOTTIME, &boot);
            uint64_t t1 = rdtsc();
            printf("GCPROBE s cpu=%d seq=%llu tsc0=%llu rt=%llu mono=%llu boot=%llu tsc1=%llu\n", c,
                   (unsigned long long)seq++, (unsigned long long)t0, (unsigned long long)ns(&rt),
                   (unsigned long long)ns(&mono), (unsigned long long)ns(&boot),
                   (unsigned long long)t1);
        }
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
