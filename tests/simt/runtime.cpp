// The fiber scheduler behind simt.hpp: one block at a time, one fiber per thread, barriers by
// cooperative yielding. Exposes `simt_launch` (C ABI) to the Rust test harness
// (tests/support/simt.rs). See simt.hpp for what is emulated.
#include "simt.hpp"

#include <sys/mman.h>
#include <ucontext.h>

// Fiber switches. On x86-64 a minimal switch (callee-saved registers and the stack pointer; no
// signal mask, so no system call per switch: the emulator switches several times per barrier
// per thread); elsewhere ucontext.
#if defined(__x86_64__) && !defined(SIMT_UCONTEXT)
#define SIMT_ASM_SWITCH 1
extern "C" void simt_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl simt_switch
    .type simt_switch, @function
simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch, .-simt_switch
)");
#endif

#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace simt {

struct Fiber {
    simt_dim3 tid{0, 0, 0};
    int warp = 0, lane = 0;
    bool done = false;
    unsigned exchanges = 0;  // warp exchanges so far (picks the exchange buffer)
#ifdef SIMT_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
};

Fiber* cur = nullptr;
simt_dim3 block_idx{0, 0, 0}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};

namespace {

struct Barrier {
    int count = 0;
    uint64_t gen = 0;
};

constexpr size_t kStack = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;

#ifdef SIMT_ASM_SWITCH
void* sched_sp = nullptr;
#else
ucontext_t sched;
#endif
std::vector<Fiber> fibers;
std::vector<char*> stacks;
std::vector<unsigned char> smem;
Barrier block_bar;
int block_live = 0;
std::vector<Barrier> warp_bar;
std::vector<int> warp_live;
std::vector<uint64_t> xch;  // [warps][2][32] published shuffle values, two buffers
uint64_t events = 0;        // arrivals, releases, exits: the block's progress
Thunk kernel = nullptr;
void** kargs = nullptr;

struct Registered {
    Thunk f;
    int nparams;
};

std::map<std::string, Registered>& registry() {
    static std::map<std::string, Registered> r;
    return r;
}

#ifdef SIMT_ASM_SWITCH
void yield() { simt_switch(&cur->sp, sched_sp); }
#else
void yield() { swapcontext(&cur->ctx, &sched); }
#endif

void wait(Barrier& b, const int& live) {
    uint64_t g = b.gen;
    ++events;
    if (++b.count >= live) {
        b.count = 0;
        ++b.gen;
        return;
    }
    while (b.gen == g) yield();
}

// A thread left: a barrier that only waited for it completes.
void release_if_complete(Barrier& b, int live) {
    if (b.count > 0 && b.count >= live) {
        b.count = 0;
        ++b.gen;
        ++events;
    }
}

// A thread's end: mark it done and free the barriers that only waited for it.
void finish(Fiber& f) {
    f.done = true;
    ++events;
    --block_live;
    --warp_live[f.warp];
    release_if_complete(block_bar, block_live);
    release_if_complete(warp_bar[f.warp], warp_live[f.warp]);
}

#ifdef SIMT_ASM_SWITCH
// First code of every fiber (entered by `ret` from simt_switch on a fresh stack); never
// returns: a finished fiber switches to the scheduler for good.
extern "C" void simt_entry() {
    kernel(kargs);
    finish(*cur);
    void* dead;
    simt_switch(&dead, sched_sp);
    __builtin_trap();
}

// A fresh stack whose first switch-in runs simt_entry with the ABI's call alignment.
void* fresh_stack(char* stack, size_t size) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                    // padding: rsp % 16 == 8 at entry
    *--sp = reinterpret_cast<void*>(&simt_entry);       // popped by `ret`
    for (int i = 0; i < 6; ++i) *--sp = nullptr;        // rbp rbx r12 r13 r14 r15
    return sp;
}
#else
void entry(int idx) {
    kernel(kargs);
    finish(fibers[idx]);
    // returning resumes uc_link, the scheduler
}
#endif

bool ensure_stacks(unsigned n) {
    while (stacks.size() < n) {
        void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return false;
        stacks.push_back(static_cast<char*>(p));
    }
    return true;
}

}  // namespace

const simt_dim3& thread_idx() { return cur->tid; }
void* dyn_smem() { return smem.data(); }
int lane_id() { return cur->lane; }
void syncthreads() { wait(block_bar, block_live); }
void syncwarp() { wait(warp_bar[cur->warp], warp_live[cur->warp]); }

// Exchanges alternate between two buffers, so one barrier each is enough: a lane can publish
// exchange k+1 while others still read exchange k, and it cannot reach exchange k+2 (the same
// buffer as k) before every lane has passed exchange k+1's barrier, that is, has read k.
uint64_t exchange(uint64_t v, int src) {
    int w = cur->warp;
    uint64_t* buf = &xch[(w * 2 + (cur->exchanges++ & 1)) * 32];
    buf[cur->lane] = v;
    wait(warp_bar[w], warp_live[w]);
    return buf[src & 31];
}

void register_kernel(const char* name, Thunk f, int nparams) { registry()[name] = Registered{f, nparams}; }

}  // namespace simt

using namespace simt;

// Runs kernel `name` on grid (gx,gy,gz) x block (bx,by,bz) with `shmem` bytes of dynamic shared
// memory; `args` as for cuLaunchKernel (pointers to the parameter values), `nargs` of them (a
// count cuLaunchKernel cannot check: here it must be the kernel's). Returns 0, or 1 for an
// unknown kernel / bad launch, 2 for a deadlock (message in err).
extern "C" int simt_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                           unsigned bz, size_t shmem, void** args, int nargs, char* err, size_t errlen) {
    auto it = registry().find(name);
    if (it == registry().end()) {
        std::snprintf(err, errlen, "no kernel named '%s'", name);
        return 1;
    }
    if (nargs != it->second.nparams) {
        std::snprintf(err, errlen, "%s: %d arguments for a kernel of %d parameters", name, nargs,
                      it->second.nparams);
        return 1;
    }
    unsigned nt = bx * by * bz;
    if (nt == 0 || nt > kMaxThreads || gx == 0 || gy == 0 || gz == 0) {
        std::snprintf(err, errlen, "%s: bad launch shape (grid %u,%u,%u block %u,%u,%u)", name, gx, gy, gz, bx, by,
                      bz);
        return 1;
    }
    if (!ensure_stacks(nt)) {
        std::snprintf(err, errlen, "%s: no memory for %u fiber stacks", name, nt);
        return 1;
    }
    unsigned nwarps = (nt + 31) / 32;
    fibers.assign(nt, Fiber{});
    kernel = it->second.f;
    kargs = args;
    grid_dim = {gx, gy, gz};
    block_dim = {bx, by, bz};
    smem.assign(shmem > 0 ? shmem : 1, 0xff);
    // the blocks run last to first: a GPU promises no order, and kernels that elect the block
    // arriving last (asa_last_block) must not depend on which one it is
    const unsigned long long nblocks = (unsigned long long)gx * gy * gz;
    for (unsigned long long bi = nblocks; bi-- > 0;) {
        const unsigned x = (unsigned)(bi % gx), y = (unsigned)((bi / gx) % gy),
                       z = (unsigned)(bi / ((unsigned long long)gx * gy));
        block_idx = {x, y, z};
        std::fill(smem.begin(), smem.end(), 0xff);
        block_bar = Barrier{};
        block_live = (int)nt;
        warp_bar.assign(nwarps, Barrier{});
        warp_live.assign(nwarps, 0);
        xch.assign(nwarps * 64, 0);
        for (unsigned i = 0; i < nt; ++i) {
            Fiber& f = fibers[i];
            f.tid = {i % bx, (i / bx) % by, i / (bx * by)};
            f.warp = (int)(i / 32);
            f.lane = (int)(i % 32);
            f.done = false;
            f.exchanges = 0;
            ++warp_live[f.warp];
#ifdef SIMT_ASM_SWITCH
            f.sp = fresh_stack(stacks[i], kStack);
#else
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = stacks[i];
            f.ctx.uc_stack.ss_size = kStack;
            f.ctx.uc_link = &sched;
            makecontext(&f.ctx, reinterpret_cast<void (*)()>(entry), 1, (int)i);
#endif
        }
        unsigned remaining = nt;
        while (remaining > 0) {
            uint64_t before = events;
            for (unsigned i = 0; i < nt; ++i) {
                if (fibers[i].done) continue;
                cur = &fibers[i];
#ifdef SIMT_ASM_SWITCH
                simt_switch(&sched_sp, fibers[i].sp);
#else
                swapcontext(&sched, &fibers[i].ctx);
#endif
                if (fibers[i].done) --remaining;
            }
            if (remaining > 0 && events == before) {
                std::snprintf(err, errlen,
                              "%s: deadlock in block (%u,%u,%u): %u threads wait at a barrier that "
                              "cannot complete",
                              name, x, y, z, remaining);
                cur = nullptr;
                return 2;
            }
        }
    }
    cur = nullptr;
    return 0;
}
