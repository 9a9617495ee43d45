//! Products through the gemm crate's kernel on strided views of the caller's buffers: no copy
//! of an operand into a tensor, no zeroed output to copy out. The tasks are fixed by the shapes
//! alone, and the gemm crate's order of summation depends only on the inner dimension, not on
//! how many threads share a product, so results do not depend on the number of threads.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// `dst (m × n) = [dst +] beta · lhs (m × k) · rhs (k × n)` on one thread, each matrix given by
/// its first element's address and its (column, row) strides; dst's columns are adjacent.
///
/// # Safety
/// Every element the strides reach must lie inside its allocation, and dst must not overlap
/// the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, usize),
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    accumulate: bool,
    beta: f32,
) {
    // SAFETY: the caller's contract.
    unsafe { product_on(1, m, n, k, dst, lhs, rhs, accumulate, beta) }
}

/// [`product`] shared by up to `threads` threads (the gemm crate splits the rows of dst).
///
/// # Safety
/// As for [`product`].
#[allow(clippy::too_many_arguments)]
unsafe fn product_on(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    (dst, dst_rs): (*mut f32, usize),
    (lhs, lhs_cs, lhs_rs): (*const f32, usize, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
    accumulate: bool,
    beta: f32,
) {
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the caller's contract.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The widest block of a result's columns one task computes. Left to itself, the gemm crate
/// splits a product over the threads by the rows of x, so in the backward every thread packs
/// all of the frozen W; split by the result's columns, each task packs only its block of W (the
/// forward reads W's rows in place). Each task packs its rows of x (the left operand) once for
/// its block, so wider blocks would pack x less often; but one block per thread measured no
/// faster (thirty-second session), with no room left to balance the threads. 288 cuts a
/// 576-wide result in two and a 1,536-wide one in six: even on two threads. Threads beyond the
/// blocks share them the gemm crate's way.
const MAX_COLUMNS: usize = 288;

/// `y (rows × out) = x (rows × inp) Wᵀ` for a row-major W (out × inp).
pub(crate) fn times_transposed(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
    assert!(x.len() == rows * inp && w.len() == out * inp, "times_transposed: lengths");
    if inp == 0 {
        return vec![0f32; rows * out];
    }
    by_column_blocks(rows, out, |threads, y, c0, width| {
        // SAFETY: y's rows hold out columns, this block's at c0..c0 + width; x holds rows × inp;
        // W's rows c0..c0 + width hold inp values each.
        unsafe { product_on(threads, rows, width, inp, (y, out), (x.as_ptr(), 1, inp), (w[c0 * inp..].as_ptr(), inp, 1), false, 1.0) }
    })
}

/// `dx (rows × inp) = dy (rows × out) W` for a row-major W (out × inp).
pub(crate) fn times(dy: &[f32], w: &[f32], rows: usize, out: usize, inp: usize) -> Vec<f32> {
    assert!(dy.len() == rows * out && w.len() == out * inp, "times: lengths");
    if out == 0 {
        return vec![0f32; rows * inp];
    }
    by_column_blocks(rows, inp, |threads, dx, c0, width| {
        // SAFETY: dx's rows hold inp columns, this block's at c0..c0 + width; dy holds rows × out;
        // W's columns c0..c0 + width are read from its out rows.
        unsafe { product_on(threads, rows, width, out, (dx, inp), (dy.as_ptr(), 1, out), (w[c0..].as_ptr(), 1, inp), false, 1.0) }
    })
}

/// `dx (rows × inp) += dy (rows × out) W` for a row-major W (out × inp).
pub(crate) fn add_times(dy: &[f32], w: &[f32], rows: usize, out: usize, inp: usize, dx: &mut [f32]) {
    assert!(dy.len() == rows * out && w.len() == out * inp && dx.len() == rows * inp, "add_times: lengths");
    let dst = Shared(dx.as_mut_ptr());
    blocks_of(rows, inp, |threads, c0, width| {
        // SAFETY: as in `times`; dx holds rows × inp values, this block's columns c0..c0 + width.
        unsafe { product_on(threads, rows, width, out, (dst.at(c0), inp), (dy.as_ptr(), 1, out), (w[c0..].as_ptr(), 1, inp), true, 1.0) }
    });
}

/// A (rows × cols) result, its blocks of columns computed in parallel: `f(threads for the
/// block, address of the block's first element, first column, width)`, which must write every
/// element of its block (the products here run with `accumulate` false, and an inner
/// dimension of 0 never gets here). The result is not zeroed first: a pass over it would cost
/// about 1% of an SFT step.
fn by_column_blocks(rows: usize, cols: usize, f: impl Fn(usize, *mut f32, usize, usize) + Sync) -> Vec<f32> {
    let len = rows * cols;
    let mut y = unwritten(len);
    let base = Shared(y.as_mut_ptr());
    blocks_of(rows, cols, |threads, c0, width| f(threads, base.at(c0), c0, width));
    // SAFETY: the blocks cover every column of every row, and each task wrote all of its block.
    unsafe { y.set_len(len) };
    y
}

/// An empty vector with room for `len` values that a kernel will write. In the unit tests the
/// room is filled with NaN first, so that an element left unwritten fails them.
pub(crate) fn unwritten(len: usize) -> Vec<f32> {
    #[cfg(test)]
    {
        let mut v = vec![f32::NAN; len];
        v.clear();
        v
    }
    #[cfg(not(test))]
    Vec::with_capacity(len)
}

/// The first element of a buffer whose disjoint regions parallel tasks write.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);
// SAFETY: the tasks that share a buffer write disjoint regions of it, read only what was
// written before their parallel loop, and the buffer outlives the loop.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Runs `f(threads for the block, first column, width)` over the blocks of a (rows × cols)
/// result's columns in parallel.
fn blocks_of(rows: usize, cols: usize, f: impl Fn(usize, usize, usize) + Sync) {
    if rows == 0 || cols == 0 {
        return;
    }
    let blocks = cols.div_ceil(MAX_COLUMNS);
    // Widths on the kernel's 16-column tiles.
    let width = cols.div_ceil(blocks).next_multiple_of(16);
    let tasks = cols.div_ceil(width);
    let threads = (rayon::current_num_threads() / tasks).max(1);
    (0..tasks).into_par_iter().for_each(|b| {
        let c0 = b * width;
        f(threads, c0, width.min(cols - c0));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: usize, n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 - 0.5).collect()
    }

    /// Both products against the sums written out in f64, over widths of one block, several
    /// and a partial last one, and no rows.
    #[test]
    fn products_match_the_written_out_sums() {
        for (rows, inp, out) in [(5, 7, 3), (33, 64, 600), (17, 600, 40), (0, 8, 8), (5, 0, 8), (5, 8, 0)] {
            let (x, w, dy) = (values(1, rows * inp), values(2, out * inp), values(3, rows * out));
            let y = times_transposed(&x, &w, rows, inp, out);
            let dx = times(&dy, &w, rows, out, inp);
            let mut sum = values(4, rows * inp);
            let before = sum.clone();
            add_times(&dy, &w, rows, out, inp, &mut sum);
            for ((s, b), d) in sum.iter().zip(&before).zip(&dx) {
                assert!((s - b - d).abs() < 1e-4, "add_times adds dy W");
            }
            for r in 0..rows {
                for o in 0..out {
                    let want: f64 = (0..inp).map(|i| f64::from(x[r * inp + i]) * f64::from(w[o * inp + i])).sum();
                    assert!((f64::from(y[r * out + o]) - want).abs() < 1e-4, "y[{r}][{o}]");
                }
                for i in 0..inp {
                    let want: f64 = (0..out).map(|o| f64::from(dy[r * out + o]) * f64::from(w[o * inp + i])).sum();
                    assert!((f64::from(dx[r * inp + i]) - want).abs() < 1e-4, "dx[{r}][{i}]");
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (rows, inp, out) = (70, 576, 1536);
        let (x, w, dy) = (values(4, rows * inp), values(5, out * inp), values(6, rows * out));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| (times_transposed(&x, &w, rows, inp, out), times(&dy, &w, rows, out, inp)))
        };
        // 8 threads share each of the 2 blocks of the 576-wide dx four ways.
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one, run(8));
    }
}
