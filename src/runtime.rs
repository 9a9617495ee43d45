//! Process-wide tuning applied once at start-up.

/// candle allocates a fresh buffer for every op; with glibc's defaults each large buffer is a
/// new mmap whose pages are faulted in and zeroed, then unmapped on drop. Raising the mmap and
/// trim thresholds keeps freed buffers in the heap for reuse (measured: fewer page faults and
/// faster decoding in `refine-poi bench`).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}
