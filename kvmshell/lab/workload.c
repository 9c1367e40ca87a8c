/* kvmshell lab workload: the program the Linux lab guest runs (built static by kvmshell/lab/linux.py).
 *
 * It keeps a working set of anonymous memory whose every page it can recompute: page i at generation g
 * holds a 24-byte header (magic, i, g, seed) and a body derived from (seed, i, g) alone. The generation
 * of each page lives in a separate array, so a page that comes back stale, zeroed or misplaced after a
 * migration no longer matches what the array says it must be.
 *
 * Knobs, read from /proc/cmdline:
 *   kvmshell.work=idle|ws|text|hotcold|sparse
 *                         idle: the set is written once, then left alone
 *                         ws: every page rewritten with fresh incompressible data
 *                         text: rewritten with text-like (compressible) pages
 *                         hotcold: only the first hot_pct % of pages are rewritten
 *                         sparse: every page rewritten, but only 40 bytes of it change per pass
 *                           (the header's generation and SPARSE_WORDS words spread over the page;
 *                           the rest is incompressible and the same in every generation)
 *   kvmshell.ws_mib=N     size of the working set in MiB (default 64; idle: 0)
 *   kvmshell.rate=R       rewrite rate in MB/s (10^6 bytes); 0 = as fast as it can (default 0)
 *   kvmshell.seed=S       the seed of every page's content (default 1)
 *   kvmshell.hot_pct=P    hotcold: the hot share of the pages (default 10)
 *   kvmshell.beat_ms=B    a heartbeat every B ms (default 2; 0 = none), see below
 *
 * Console protocol (one line per command on the serial console, one line per answer):
 *   check      -> "kvmshell-check ok N pages" or "kvmshell-check BAD page K ..." (first bad page, count)
 *                 Every rewrite first reads the page's header: one that does not say (i, gens[i]) is counted
 *                 and makes every later check BAD, so a lost page is caught even when a pass has rewritten
 *                 it (and its generation) consistent again before the check was asked for.
 *   hold, run  -> "kvmshell-hold" / "kvmshell-run": stop / resume rewriting
 *   where K    -> "kvmshell-where page K phys 0xADDR" (guest-physical address, from /proc/self/pagemap)
 *   where gen K -> "kvmshell-where gen K phys 0xADDR": where the generation table holds page K's entry
 * Unprompted: "kvmshell-ready ..." once the set is written, "kvmshell-pass N" after each pass, and
 * "kvmshell-hb SEQ USEC" every beat_ms: a sequence number from 0 and the guest's CLOCK_MONOTONIC in
 * microseconds, so the host can time the blackout the guest sees in a migration (lab/blackout.py).
 * The beat is written between pages (every 16 pages rewritten) and while waiting for input, so a
 * beat is late by at most the time of 16 page rewrites.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAGIC 0x3147575348535658ULL /* "XVSHSWG1" little-endian */
#define HDR_WORDS 3

enum mode { IDLE, WS, TEXT, HOTCOLD, SPARSE };
#define SPARSE_WORDS 4   /* sparse: words 3, 131, 259, 387 change with the generation */
#define SPARSE_STRIDE 128

static enum mode mode = WS;
static uint64_t ws_mib = 64, rate = 0, seed = 1, hot_pct = 10, beat_ms = 2;
static int ws_given = 0;
static uint8_t *ws;
static uint32_t *gens;
static uint64_t npages, nhot;
static int holding = 0;
static uint64_t torn = 0, torn_page, torn_header;  /* pages found wrong before a rewrite; the first, */
static uint32_t torn_want;                         /* and the generation the table said it had */

static const char *const words[16] = {
    "the ", "guest ", "memory ", "page ", "moves ", "over ", "a ", "link ",
    "while ", "it ", "runs ", "and ", "dirties ", "data ", "again ", "\n",
};

static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* sparse: the words of page i that change with the generation g (the header's dst[1] aside). */
static void sparse_words(uint64_t *dst, uint64_t i, uint32_t g) {
    dst[1] = i | ((uint64_t)g << 32);
    for (int k = 0; k < SPARSE_WORDS; k++)
        dst[HDR_WORDS + k * SPARSE_STRIDE] = mix(seed ^ mix((i << 8 | k) * 0x9e3779b97f4a7c15ULL + g + 1));
}

/* Page i at generation g, written into dst (a page of the set or a scratch page). */
static void fill(uint64_t *dst, uint64_t i, uint32_t g) {
    uint64_t s = mix(seed ^ mix(i * 0x9e3779b97f4a7c15ULL + (mode == SPARSE ? 0 : g) + 1)) | 1;
    dst[0] = MAGIC;
    dst[1] = i | ((uint64_t)g << 32);
    dst[2] = seed;
    if (mode != TEXT) {
        for (int w = HDR_WORDS; w < WORDS; w++) {   /* xorshift64*: fresh, incompressible */
            s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
            dst[w] = s * 0x2545f4914f6cdd1dULL;
        }
        if (mode == SPARSE) sparse_words(dst, i, g);
        return;
    }
    char *p = (char *)(dst + HDR_WORDS), *end = (char *)dst + PAGE;
    while (p < end) {                               /* words from a 16-word list: compresses well */
        s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
        uint64_t r = s * 0x2545f4914f6cdd1dULL;
        for (int k = 0; k < 16 && p < end; k++, r >>= 4) {
            const char *wd = words[r & 15];
            while (*wd && p < end) *p++ = *wd++;
        }
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w <= 0) return;
        off += w;
    }
}

/* A heartbeat line when one is due; the milliseconds until the next one (-1: no heartbeats). */
static int beat(void) {
    static double next = 0;
    static uint64_t seq = 0;
    if (!beat_ms) return -1;
    double t = now(), period = beat_ms / 1e3;
    if (t >= next) {
        say("kvmshell-hb %llu %llu", (unsigned long long)seq++, (unsigned long long)(t * 1e6));
        next = next + period > t ? next + period : t + period;
    }
    return (int)((next - t) * 1000) + 1;
}

static void check(void) {
    static uint64_t want[WORDS];
    uint64_t bad = 0, first = 0;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t *page = (uint64_t *)(ws + i * PAGE);
        fill(want, i, gens[i]);
        if (memcmp(page, want, PAGE) != 0) {
            if (!bad) first = i;
            bad++;
        }
    }
    if (!bad && !torn) {
        say("kvmshell-check ok %llu pages", (unsigned long long)npages);
        return;
    }
    if (!bad) {
        say("kvmshell-check BAD page %llu: before its rewrite want gen %u, header said page %llu gen %llu; "
            "%llu pages found bad before a rewrite, all %llu consistent now", (unsigned long long)torn_page,
            torn_want, (unsigned long long)(torn_header & 0xffffffffULL), (unsigned long long)(torn_header >> 32),
            (unsigned long long)torn, (unsigned long long)npages);
        return;
    }
    uint64_t *page = (uint64_t *)(ws + first * PAGE);
    say("kvmshell-check BAD page %llu: want gen %u, header says page %llu gen %llu; %llu of %llu pages bad; "
        "%llu found bad before a rewrite", (unsigned long long)first, gens[first],
        (unsigned long long)(page[1] & 0xffffffffULL), (unsigned long long)(page[1] >> 32),
        (unsigned long long)bad, (unsigned long long)npages, (unsigned long long)torn);
}

/* The guest-physical address of virtual address va (0: not mapped). */
static uint64_t phys_of(const void *va) {
    uint64_t entry = 0, v = (uint64_t)(uintptr_t)va;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0) return 0;
    if (pread(fd, &entry, 8, (off_t)(v / PAGE * 8)) != 8 || !(entry >> 63)) entry = 0;
    close(fd);
    return entry ? (entry & ((1ULL << 55) - 1)) * PAGE + v % PAGE : 0;
}

/* where K: page K of the set; where gen K: the generation table's entry for page K. */
static void where(const char *what, uint64_t i) {
    uint64_t phys = i >= npages ? 0 : phys_of(*what == 'g' ? (void *)&gens[i] : (void *)(ws + i * PAGE));
    if (!phys) say("kvmshell-where %s %llu unknown", what, (unsigned long long)i);
    else say("kvmshell-where %s %llu phys 0x%llx", what, (unsigned long long)i, (unsigned long long)phys);
}

static void command(char *line) {
    line[strcspn(line, "\r\n")] = 0;
    if (!strcmp(line, "check")) check();
    else if (!strcmp(line, "hold")) { holding = 1; say("kvmshell-hold"); }
    else if (!strcmp(line, "run")) { holding = 0; say("kvmshell-run"); }
    else if (!strncmp(line, "where gen ", 10)) where("gen", strtoull(line + 10, NULL, 10));
    else if (!strncmp(line, "where ", 6)) where("page", strtoull(line + 6, NULL, 10));
    else if (*line) say("kvmshell-what %s", line);
}

/* Wait up to timeout_ms (-1: forever) for console input and run the commands that came. */
static void serve(int timeout_ms) {
    static char buf[256];
    static size_t have = 0;
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    if (poll(&pfd, 1, timeout_ms) <= 0) return;
    ssize_t n = read(0, buf + have, sizeof buf - 1 - have);
    if (n <= 0) return;
    have += n;
    buf[have] = 0;
    char *start = buf, *nl;
    while ((nl = strpbrk(start, "\r\n"))) {
        *nl = 0;
        command(start);
        start = nl + 1;
    }
    have = strlen(start);
    memmove(buf, start, have + 1);
    if (have == sizeof buf - 1) have = 0;          /* a line too long: drop it */
}


static void knobs(void) {
    char line[4096] = {0};
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) { if (read(fd, line, sizeof line - 1) < 0) line[0] = 0; close(fd); }
    for (char *tok = strtok(line, " \n"); tok; tok = strtok(NULL, " \n")) {
        if (strncmp(tok, "kvmshell.", 9)) continue;
        char *key = tok + 9, *val = strchr(key, '=');
        if (!val) continue;
        *val++ = 0;
        if (!strcmp(key, "work")) {
            mode = !strcmp(val, "idle") ? IDLE : !strcmp(val, "text") ? TEXT
                 : !strcmp(val, "hotcold") ? HOTCOLD : !strcmp(val, "sparse") ? SPARSE : WS;
        } else if (!strcmp(key, "ws_mib")) { ws_mib = strtoull(val, NULL, 10); ws_given = 1; }
        else if (!strcmp(key, "rate")) rate = strtoull(val, NULL, 10);
        else if (!strcmp(key, "seed")) seed = strtoull(val, NULL, 10);
        else if (!strcmp(key, "hot_pct")) hot_pct = strtoull(val, NULL, 10);
        else if (!strcmp(key, "beat_ms")) beat_ms = strtoull(val, NULL, 10);
    }
    if (mode == IDLE && !ws_given) ws_mib = 0;
    if (hot_pct > 100) hot_pct = 100;
}

int main(void) {
    struct termios t;
    if (tcgetattr(0, &t) == 0) {                  /* commands are not echoed back */
        t.c_lflag &= ~(ECHO | ECHONL);
        tcsetattr(0, TCSANOW, &t);
    }
    knobs();
    npages = ws_mib * 256;
    nhot = mode == IDLE ? 0 : mode == HOTCOLD ? (npages * hot_pct + 99) / 100 : npages;
    gens = calloc(npages ? npages : 1, sizeof *gens);
    ws = npages ? mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0) : NULL;
    if (!gens || ws == MAP_FAILED) {
        say("kvmshell-error cannot allocate %llu MiB", (unsigned long long)ws_mib);
        return 1;
    }
    for (uint64_t i = 0; i < npages; i++) fill((uint64_t *)(ws + i * PAGE), i, 0);
    static const char *const names[] = {"idle", "ws", "text", "hotcold", "sparse"};
    say("kvmshell-ready work=%s pages=%llu hot=%llu rate=%llu", names[mode], (unsigned long long)npages,
        (unsigned long long)nhot, (unsigned long long)rate);
    double t0 = now(), written = 0;
    uint64_t pass = 0;
    for (;;) {
        if (!nhot || holding) { serve(beat()); t0 = now(); written = 0; continue; }
        for (uint64_t i = 0; i < nhot && !holding; i++) {
            uint64_t *page = (uint64_t *)(ws + i * PAGE);
            if ((page[0] != MAGIC || page[1] != (i | (uint64_t)gens[i] << 32)) && !torn++) {
                torn_page = i;
                torn_header = page[1];
                torn_want = gens[i];
            }
            if (mode == SPARSE) sparse_words(page, i, ++gens[i]);
            else fill(page, i, ++gens[i]);
            written += PAGE;
            if ((i & 15) != 15) continue;
            int wait_ms = 0, beat_in = beat();
            if (rate) {
                double due = t0 + written / (rate * 1e6), left = due - now();
                if (left > 0) wait_ms = (int)(left * 1000) + 1;
            }
            while (wait_ms > 0 && beat_in >= 0 && beat_in < wait_ms) {   /* beat while pacing */
                serve(beat_in);
                wait_ms -= beat_in;
                beat_in = beat();
            }
            if (wait_ms || (i & 255) == 255) serve(wait_ms);
        }
        if (!holding) say("kvmshell-pass %llu", (unsigned long long)++pass);
    }
}
