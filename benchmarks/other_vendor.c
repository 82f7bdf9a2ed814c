/* Preloaded by benchmarks/other_vendor.py: the process answers CPUID as an Intel CPU would, on a CPU of another
 * vendor, so that every library which chooses its code by the CPU's identity (MKL, oneDNN, numpy, ATen's cpuinfo)
 * chooses what it would on an Intel machine with this CPU's instruction set.
 *
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID 0; /proc/cpuinfo flag cpuid_fault) turns each CPUID instruction
 * of the thread, and of every thread it starts, into a SIGSEGV. The handler runs the real CPUID with faulting off for
 * that one instruction, rewrites the identity, writes the registers back and steps over the instruction. Changed:
 * leaf 0's vendor string (GenuineIntel), leaf 1's family and model (those of the Intel Xeon the project's first
 * record came from: family 6, model 167), leaf 2 (no descriptors: "read leaf 4") and leaf 4, Intel's cache leaf,
 * answered from this CPU's own caches (AMD's leaf 0x8000001D has the same layout). Features are this CPU's: nothing
 * is claimed that the hardware cannot run. What stays the hardware's own: the results of instructions whose answer
 * is implementation-defined (rcpps, rsqrtps), and anything read before this library's constructor (the dynamic
 * loader's own CPU features, which glibc uses to choose its string and math routines by instruction set).
 *
 * The program's own SIGSEGV handlers still run for real faults: sigaction and signal are wrapped so that this
 * handler stays installed and passes every fault that is not a CPUID on to what the program asked for. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012
#define INTEL_FAMILY_MODEL ((0xAu << 16) | (6u << 8) | (7u << 4) | 1u) /* family 6, model 0xA7 = 167, stepping 1 */

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;
static struct sigaction program_segv; /* what the program asked SIGSEGV to do */
static int emulating;

static void real_cpuid(unsigned leaf, unsigned subleaf, unsigned r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, subleaf, r[0], r[1], r[2], r[3]);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}

static void intel_cpuid(unsigned leaf, unsigned subleaf, unsigned r[4]) {
    if (leaf == 4) {
        unsigned cores[4];
        real_cpuid(0x80000008, 0, cores);
        real_cpuid(0x8000001D, subleaf, r);
        if (r[0] & 0x1f) /* a cache: bits 31-26 hold the package's cores - 1 on Intel, reserved on AMD */
            r[0] = (r[0] & 0x03ffffffu) | ((cores[2] & 0x3fu) << 26);
        return;
    }
    real_cpuid(leaf, subleaf, r);
    if (leaf == 0) {
        memcpy(&r[1], "Genu", 4);
        memcpy(&r[3], "ineI", 4);
        memcpy(&r[2], "ntel", 4);
    } else if (leaf == 1) {
        r[0] = INTEL_FAMILY_MODEL;
    } else if (leaf == 2) {
        r[0] = 0xff01u; /* one call; descriptor 0xff: the cache parameters are in leaf 4 */
        r[1] = r[2] = r[3] = 0;
    }
}

static void on_segv(int signum, siginfo_t *info, void *context) {
    greg_t *registers = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *instruction = (const unsigned char *)registers[REG_RIP];
    if (info->si_code == SI_KERNEL && instruction[0] == 0x0f && instruction[1] == 0xa2) {
        unsigned r[4];
        intel_cpuid((unsigned)registers[REG_RAX], (unsigned)registers[REG_RCX], r);
        registers[REG_RAX] = r[0];
        registers[REG_RBX] = r[1];
        registers[REG_RCX] = r[2];
        registers[REG_RDX] = r[3];
        registers[REG_RIP] += 2;
        return;
    }
    if (program_segv.sa_flags & SA_SIGINFO) {
        program_segv.sa_sigaction(signum, info, context);
    } else if (program_segv.sa_handler != SIG_DFL && program_segv.sa_handler != SIG_IGN) {
        program_segv.sa_handler(signum);
    } else { /* a real fault and no handler of the program's: the instruction faults again and the process dies */
        struct sigaction fallback = {0};
        fallback.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &fallback, NULL);
    }
}

int sigaction(int signum, const struct sigaction *action, struct sigaction *previous) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (signum != SIGSEGV || !emulating) return real_sigaction(signum, action, previous);
    if (previous) *previous = program_segv;
    if (action) program_segv = *action;
    return 0;
}

__sighandler_t signal(int signum, __sighandler_t handler) {
    struct sigaction action = {0}, previous;
    action.sa_handler = handler;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    return sigaction(signum, &action, &previous) ? SIG_ERR : previous.sa_handler;
}

__attribute__((constructor)) static void start_emulating(void) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    struct sigaction action = {0};
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    real_sigaction(SIGSEGV, &action, NULL);
    program_segv.sa_handler = SIG_DFL;
    emulating = syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) == 0;
}
