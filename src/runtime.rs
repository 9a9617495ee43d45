//! Process-wide tuning applied once at start-up, before any other thread exists.

/// candle allocates a fresh buffer for every op; with glibc's defaults each large buffer is a
/// new mmap whose pages are faulted in and zeroed, then unmapped on drop. Raising the mmap and
/// trim thresholds keeps freed buffers in the heap for reuse (measured with `refine-poi bench`:
/// prefill about twice as fast). glibc's own settings win when the user gives them
/// (`MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`).
///
/// candle's element-wise thread pool spins for a while after each op before parking; on two
/// cores that spinning steals the core gemm's threads need. A short spin (unless the user set
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT`) measured ~510–570 → ~615 prefill tokens/s.
///
/// SIGPIPE gets its default action back (Rust ignores it): `refine-poi report ... | head` ends
/// quietly, as Unix tools do, instead of panicking on the closed pipe.
pub fn tune() {
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition before other threads start.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() && std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only adjusts allocator parameters; it is called before other threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        }
    }
    const SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN).is_none() {
        // SAFETY: called first thing in main, while the process has a single thread.
        unsafe { std::env::set_var(SPIN, "100") };
    }
}
