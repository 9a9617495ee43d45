//! Process-wide tuning applied once at start-up, before any other thread exists.

/// candle allocates a fresh buffer for every op; with glibc's defaults each large buffer is a
/// new mmap whose pages are faulted in and zeroed, then unmapped on drop. Raising the mmap and
/// trim thresholds keeps freed buffers in the heap for reuse (measured with `refine-poi bench`:
/// prefill about twice as fast). glibc's own settings win when the user gives them
/// (`MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`).
///
/// Commands run on a pool thread ([`on_command_pool`]), which glibc would give an arena of its
/// own beside the main one; one arena for the process keeps freed buffers where the next
/// allocation looks (`bench --grpo` peaked 40-240 MiB higher with two, and ran no faster),
/// unless the user sets `MALLOC_ARENA_MAX`.
///
/// candle splits each matmul over `RAYON_NUM_THREADS` threads, else over the physical cores,
/// which it counts by reading /proc/cpuinfo again on every call (2.6% of an SFT step's
/// samples on the 2-core EPYC). Unless the user set it, the variable gets candle's count once
/// here, and the command pool keeps rayon's own default size ([`on_command_pool`]), so neither
/// thread count changes.
///
/// candle runs its element-wise ops (adds, the backward pass's gradient sums) on a second pool
/// of its own, sized like rayon's, whose workers spin beside rayon's on the same cores and take
/// one op at a time behind a lock. Unless the user set `CANDLE_NUM_THREADS`, that pool gets no
/// workers: each op runs on the thread that asks for it, while the other threads run their own
/// work (SFT trains neighbouring windows at the same time). Measured on the 2-core Zen 4 with
/// `farm-bench -n 4`, 4 SFT steps of configs/nyc.toml: wall 0.97, CPU time 0.95; `bench`'s
/// prefill and decoding unchanged within their noise. Where the user does give it workers, they
/// spin only briefly after each op before parking (unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is
/// set): on two cores a long spin stole the core gemm's threads need (~510–570 → ~615 prefill
/// tokens/s).
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
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() && std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    if std::env::var_os(RAYON_THREADS).is_none() && std::env::var_os("RAYON_RS_NUM_CPUS").is_none() {
        // rayon's own default: one thread per logical CPU, else 1.
        let pool = std::thread::available_parallelism().map_or(1, usize::from);
        let _ = COMMAND_POOL_THREADS.set(pool);
        default_env(RAYON_THREADS, &candle_core::utils::get_num_threads().to_string());
    }
    default_env("CANDLE_NUM_THREADS", "1");
    default_env("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
}

/// Sets the environment variable `name` to `value` unless the user gave it.
fn default_env(name: &str, value: &str) {
    if std::env::var_os(name).is_none() {
        // SAFETY: only [`tune`] calls it, first thing in main, while the process has a single
        // thread.
        unsafe { std::env::set_var(name, value) };
    }
}

const RAYON_THREADS: &str = "RAYON_NUM_THREADS";

/// The command pool's size when [`tune`] set `RAYON_NUM_THREADS` for candle (rayon's default,
/// one thread per logical CPU); unset, rayon reads the user's variables.
static COMMAND_POOL_THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Stack of the thread that runs a command: candle's backward pass walks the graph
/// recursively, deeper than a pool thread's default 2 MiB allows for a long sequence.
const COMMAND_STACK: usize = 64 << 20;

/// Runs `f` (a whole command) on a worker of a rayon pool of rayon's default size (the user's
/// `RAYON_NUM_THREADS`, else one thread per logical CPU, as [`tune`] keeps it). The kernels'
/// parallel loops then split their work from inside the pool: the calling worker takes a share
/// and the others steal the rest. Called from outside, each loop would hand its work to the
/// pool and put the calling thread to sleep until woken, and decoding a token runs over a
/// hundred such loops.
/// Measured on the 2-core AVX-512 EPYC (`bench --quantized-base --repeats 3`, 7 alternating
/// pairs, medians): decoding 98.8 → 115 tokens/s at batch 1, 262 → 270 at batch 8; prefill
/// 566 → 601. (The main thread joining the pool as a worker instead, rayon's
/// `use_current_thread`, halved decoding.) Falls back to the calling thread if no pool starts.
pub fn on_command_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let threads = COMMAND_POOL_THREADS.get().copied().unwrap_or(0);
    match rayon::ThreadPoolBuilder::new().num_threads(threads).stack_size(COMMAND_STACK).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
