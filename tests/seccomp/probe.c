/* Seccomp confinement probe. Usage: probe EVIDENCE_FILE TEST...
 * Each TEST runs in a forked child (fresh session, no shared state) and appends one line
 * "<test> <result>" to EVIDENCE_FILE: result is 0 on success, else the errno of the blocked call,
 * or "signal:<n>" when the child was killed. Tests that need a capability first try to get one
 * from a new user namespace, so a refusal measures the filter, not a missing capability. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <linux/io_uring.h>

static int fail(void) { return errno ? errno : 255; }

static int t_tiocsti(unsigned long cmd) {
    int m = posix_openpt(O_RDWR | O_NOCTTY);
    if (m < 0 || grantpt(m) || unlockpt(m)) return 200;
    int s = open(ptsname(m), O_RDWR);
    if (s < 0 || setsid() < 0 || ioctl(s, TIOCSCTTY, 0) < 0) return 201;
    char c = 'x';
    return syscall(SYS_ioctl, s, cmd, &c) == 0 ? 0 : fail();
}

static int t_io_uring(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    long fd = syscall(SYS_io_uring_setup, 4, &p);
    return fd >= 0 ? 0 : fail();
}

static int t_ptrace(void) {
    pid_t kid = fork();
    if (kid == 0) { pause(); _exit(0); }
    long r = ptrace(PTRACE_ATTACH, kid, 0, 0);
    int e = r == 0 ? 0 : fail();
    if (r == 0) { waitpid(kid, NULL, 0); ptrace(PTRACE_DETACH, kid, 0, 0); }
    kill(kid, SIGKILL); waitpid(kid, NULL, 0);
    return e;
}

static int t_process_vm_writev(void) {
    long r = syscall(SYS_process_vm_writev, getpid(), NULL, 0, NULL, 0, 0);
    return r == 0 ? 0 : fail();
}

static int t_unshare_net(void) {
    return unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0 ? 0 : fail();
}

static int t_clone_newnet(void) {
    long r = syscall(SYS_clone, CLONE_NEWUSER | CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0);
    if (r == 0) _exit(0);
    if (r < 0) return fail();
    waitpid(r, NULL, 0);
    return 0;
}

static int t_setns(void) {
    unshare(CLONE_NEWUSER | CLONE_NEWNET); /* best effort: a netns we may enter */
    int fd = open("/proc/self/ns/net", O_RDONLY);
    if (fd < 0) return 202;
    return setns(fd, CLONE_NEWNET) == 0 ? 0 : fail();
}

static int t_mount(void) {
    unshare(CLONE_NEWUSER | CLONE_NEWNS); /* best effort: gives CAP_SYS_ADMIN where allowed */
    if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 && errno != EPERM) return 203;
    return mount("none", "/tmp", "tmpfs", 0, NULL) == 0 ? 0 : fail();
}

static int t_af_packet(unsigned long domain) {
    unshare(CLONE_NEWUSER | CLONE_NEWNET); /* best effort: gives CAP_NET_RAW where allowed */
    long fd = syscall(SYS_socket, domain, SOCK_RAW, 0);
    return fd >= 0 ? 0 : fail();
}

static int t_setuid(void) {
    /* No-op credential changes: always allowed by the kernel, so EPERM can only be the filter. */
    if (syscall(SYS_setuid, getuid())) return fail();
    if (syscall(SYS_setgid, getgid())) return fail();
    if (syscall(SYS_setreuid, -1, -1)) return fail();
    if (syscall(SYS_setregid, -1, -1)) return fail();
    if (syscall(SYS_setresuid, -1, -1, -1)) return fail();
    if (syscall(SYS_setresgid, -1, -1, -1)) return fail();
    return 0;
}

static int t_execve(void) {
    char *argv[] = {"true", NULL};
    pid_t kid = fork();
    if (kid == 0) { execve("/bin/true", argv, environ); _exit(100 + errno); }
    int st; waitpid(kid, &st, 0);
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 255;
    return code == 0 ? 0 : (code >= 100 ? code - 100 : 255);
}

static int t_execveat(void) {
    char *argv[] = {"true", NULL};
    pid_t kid = fork();
    if (kid == 0) {
        syscall(SYS_execveat, AT_FDCWD, "/bin/true", argv, environ, 0);
        _exit(100 + errno);
    }
    int st; waitpid(kid, &st, 0);
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 255;
    return code == 0 ? 0 : (code >= 100 ? code - 100 : 255);
}

static int t_unlink(void) {
    char path[] = "/tmp/probe-unlink-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) return 204;
    return unlink(path) == 0 ? 0 : fail();
}

static int t_int80(void) {
#if defined(__x86_64__)
    long ret;
    /* getpid through the i386 entry point: the filter must kill, not answer. */
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
    return ret > 0 ? 0 : 205;
#else
    return 206;
#endif
}

static int t_x32(void) {
#if defined(__x86_64__)
    /* getpid with the x32 ABI bit: a foreign ABI that must be killed, not answered. */
    long r = syscall(0x40000000L | SYS_getpid);
    return r > 0 ? 0 : fail();
#else
    return 206;
#endif
}

static int t_unshare_cli(void) {
    /* The util-linux command an agent would reach for: `unshare -rn true`. */
    pid_t kid = fork();
    if (kid == 0) {
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 2);
        execlp("unshare", "unshare", "-rn", "true", (char *)NULL);
        _exit(127);
    }
    int st; waitpid(kid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

static int t_userfaultfd(void) {
    long fd = syscall(SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY: allowed unprivileged */);
    return fd >= 0 ? 0 : fail();
}

static int t_add_key(void) {
    long id = syscall(SYS_add_key, "user", "firma-probe", "x", 1, -2 /* process keyring */);
    return id >= 0 ? 0 : fail();
}

/* Set-id probes: each creates a fresh file or directory in /tmp and asks for a setuid/setgid
 * mode through one syscall. 0 means the call succeeded *and* the bit is on the file (so a
 * silently dropped bit is not mistaken for success); 203 means the call succeeded without it. */
static char setid_path[64];
/* A stale path of an earlier probe with the same pid would make the creation fail: cleared first,
 * and removed again after each probe (t_setid), so no set-id file outlives the test. */
static void clear_setid(void) { if (setid_path[0]) { unlink(setid_path); rmdir(setid_path); } }
static void fresh(void) {
    snprintf(setid_path, sizeof setid_path, "/tmp/probe-setid-%d", (int)getpid());
    clear_setid();
}
static int has_bit(mode_t bit) {
    struct stat st;
    if (stat(setid_path, &st) != 0) return 202;
    return (st.st_mode & bit) ? 0 : 203;
}
static int made(long rc, mode_t bit) { return rc < 0 ? fail() : has_bit(bit); }
static int existing(void) {
    fresh();
    int fd = open(setid_path, O_CREAT | O_WRONLY | O_EXCL, 0755);
    if (fd < 0) return -1;
    return fd;
}
static int t_setid_once(const char *t);
static int t_setid(const char *t) {
    int rc = t_setid_once(t);
    clear_setid();
    return rc;
}
static int t_setid_once(const char *t) {
    if (!strcmp(t, "openat2")) {
        struct { unsigned long long flags, mode, resolve; } how = { O_RDONLY, 0, 0 };
        long fd = syscall(437, AT_FDCWD, "/", &how, sizeof how);
        return fd < 0 ? fail() : 0;
    }
    if (!strncmp(t, "chmod", 5) || !strncmp(t, "fchmod", 6)) {
        int fd = existing();
        if (fd < 0) return 204;
        if (!strcmp(t, "chmod_plain")) return made(chmod(setid_path, 0700), 0700);
        if (!strcmp(t, "chmod_suid")) return made(chmod(setid_path, 04755), S_ISUID);
        if (!strcmp(t, "chmod_sgid")) return made(chmod(setid_path, 02755), S_ISGID);
        if (!strcmp(t, "fchmod_suid")) return made(fchmod(fd, 04755), S_ISUID);
        if (!strcmp(t, "fchmodat_sgid")) return made(fchmodat(AT_FDCWD, setid_path, 02755, 0), S_ISGID);
        if (!strcmp(t, "fchmodat2_suid")) return made(syscall(452, AT_FDCWD, setid_path, 04755, 0), S_ISUID);
        return 254;
    }
    fresh();
    if (!strcmp(t, "open_creat_suid")) return made(syscall(SYS_open, setid_path, O_CREAT | O_WRONLY, 04755), S_ISUID);
    if (!strcmp(t, "openat_creat_sgid")) return made(openat(AT_FDCWD, setid_path, O_CREAT | O_WRONLY, 02755), S_ISGID);
    if (!strcmp(t, "creat_suid")) return made(creat(setid_path, 04755), S_ISUID);
    if (!strcmp(t, "mkdir_sgid")) return made(mkdir(setid_path, 02755), S_ISGID);
    if (!strcmp(t, "mknod_suid")) return made(mknod(setid_path, S_IFREG | 04755, 0), S_ISUID);
    if (!strcmp(t, "tmpfile_suid")) {
        long fd = openat(AT_FDCWD, "/tmp", O_TMPFILE | O_WRONLY, 04755);
        if (fd < 0) return fail();
        struct stat st;
        if (fstat((int)fd, &st) != 0) return 202;
        return (st.st_mode & S_ISUID) ? 0 : 203;
    }
    return 254;
}

static int run(const char *t) {
    if (!strcmp(t, "tiocsti")) return t_tiocsti(TIOCSTI);
    if (!strcmp(t, "tiocsti_hibits")) return t_tiocsti(TIOCSTI | (1UL << 32));
    if (!strcmp(t, "io_uring")) return t_io_uring();
    if (!strcmp(t, "ptrace")) return t_ptrace();
    if (!strcmp(t, "process_vm_writev")) return t_process_vm_writev();
    if (!strcmp(t, "unshare_net")) return t_unshare_net();
    if (!strcmp(t, "clone_newnet")) return t_clone_newnet();
    if (!strcmp(t, "setns")) return t_setns();
    if (!strcmp(t, "mount")) return t_mount();
    if (!strcmp(t, "af_packet")) return t_af_packet(AF_PACKET);
    if (!strcmp(t, "af_packet_hibits")) return t_af_packet(AF_PACKET | (1UL << 32));
    if (!strcmp(t, "setuid")) return t_setuid();
    if (!strcmp(t, "execve")) return t_execve();
    if (!strcmp(t, "execveat")) return t_execveat();
    if (!strcmp(t, "unlink")) return t_unlink();
    if (!strcmp(t, "int80")) return t_int80();
    if (!strcmp(t, "x32")) return t_x32();
    if (!strcmp(t, "userfaultfd")) return t_userfaultfd();
    if (!strcmp(t, "add_key")) return t_add_key();
    if (!strcmp(t, "unshare_cli")) return t_unshare_cli();
    return t_setid(t);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: probe EVIDENCE TEST...\n"); return 2; }
    FILE *ev = fopen(argv[1], "a");
    if (!ev) { perror(argv[1]); return 2; }
    setvbuf(ev, NULL, _IONBF, 0);
    fprintf(ev, "started %d\n", (int)getpid());
    for (int i = 2; i < argc; i++) {
        pid_t kid = fork();
        if (kid == 0) { errno = 0; _exit(run(argv[i])); }
        int st;
        waitpid(kid, &st, 0);
        if (WIFSIGNALED(st)) fprintf(ev, "%s signal:%d\n", argv[i], WTERMSIG(st));
        else fprintf(ev, "%s %d\n", argv[i], WEXITSTATUS(st));
    }
    fprintf(ev, "done\n");
    return 0;
}
