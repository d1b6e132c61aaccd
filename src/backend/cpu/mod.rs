//! CPU reference ops. Each op has a `_forward` and a `_backward`; backward functions accumulate
//! (`+=`) into their gradient outputs so that a tensor used twice gets both contributions.

/// Defines `fn $name` (any visibility) whose body runs compiled for AVX2 + FMA when the CPU has
/// them (checked at run time, cached by std), else as the portable build (through
/// [`simd_task`]). Closures the body hands to rayon are compiled as functions of their own and
/// do not inherit the features: each such task goes through `simd_task` itself. Only IEEE
/// arithmetic is involved and Rust never contracts `a*b + c` into an FMA by itself, so both
/// builds give the same bits; only vector width changes.
macro_rules! simd_kernel {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            $crate::backend::cpu::simd_task(#[inline(always)] || body($($arg),*))
        }
    };
}

pub(crate) use simd_kernel;

/// Runs `f` compiled for AVX2 + FMA where the CPU has them (the dispatch of `simd_kernel!`). A
/// closure handed to rayon is compiled as a function of its own, without the
/// features of the `simd_kernel!` around it (its loops came out as 128-bit SSE), so every
/// rayon task inside a kernel goes through here: `f` is inlined into `fast` and compiled with
/// its features. The functions it calls are compiled for them only where they are inlined
/// (`#[inline(always)]` on the per-tile helpers).
#[inline(always)]
pub(crate) fn simd_task<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn fast<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `fast` is compiled for.
            return unsafe { fast(f) };
        }
    }
    f()
}

pub mod ops;
pub mod scan;
pub mod simd;
pub mod slot_ops;

/// Keeps freed activation buffers in the process heap instead of handing them back to the OS.
///
/// A training step allocates and frees buffers of one to tens of MiB (per-layer gradients of the
/// backward pass, per-task scratch inside rayon jobs). By default glibc serves such sizes by
/// `mmap`, gives each worker thread an arena of its own made of 64 MiB heaps that are unmapped
/// whenever they empty, and trims the main heap, so every step page-faults the same memory in
/// again: on a 2-core machine that was about a third of a `cpu-small` step and more than half of
/// a `cpu-asa` step at T 16K (400K faults per step). One arena (the main heap, `brk`), no `mmap`
/// for large blocks and no trimming make the steady state fault-free; our allocations are coarse,
/// so the shared arena lock costs nothing measurable. Call once at start-up, before threads
/// allocate; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads run.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
