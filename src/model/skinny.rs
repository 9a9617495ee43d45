//! `y = x W^T` for a few rows of x (decoding: one row per sequence in the batch) on the CPU.
//!
//! gemm is tuned for large blocks: with 1–16 rows it spends its time repacking the weight and
//! synchronising threads, and reaches a fraction of either the memory or the FMA bound
//! (measured with `refine-poi bench`). Here each weight row is streamed from memory once and
//! dotted with every row of x while it sits in cache; threads split the weight rows. Quantised
//! weights ([`QuantRows`]) stream as blocks, expanded to f32 in registers (or, on CPUs without
//! AVX2, FMA and F16C, a pair of rows at a time in L1).

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::quant::QuantRows;

/// Rows of x up to which the kernel beats gemm.
pub const MAX_ROWS: usize = 16;

/// A LoRA adapter on the weight: `a` (r, in), `b` (out, r), and the scale alpha / r.
#[derive(Clone, Copy)]
pub struct LowRank<'t> {
    pub a: &'t Tensor,
    pub b: &'t Tensor,
    pub scale: f64,
}

impl<'t> LowRank<'t> {
    /// The adapter of a layer's `(a, b, scale)` factors, if it has one.
    pub fn of(factors: &'t Option<(Tensor, Tensor, f64)>) -> Option<LowRank<'t>> {
        factors.as_ref().map(|(a, b, scale)| LowRank { a, b, scale: *scale })
    }
}

/// The weight (out, in) of a few-row product.
#[derive(Clone, Copy)]
pub enum Weight<'t> {
    /// Contiguous f32 rows on the CPU (anything else declines).
    Dense(&'t Tensor),
    /// A GGUF's quantised blocks.
    Blocks(&'t QuantRows),
}

impl Weight<'_> {
    /// (out, in), or `None` for a weight the kernel does not read.
    fn dims(&self) -> candle_core::Result<Option<(usize, usize)>> {
        Ok(match self {
            Weight::Dense(w) if w.dtype() == DType::F32 && w.is_contiguous() => Some(w.dims2()?),
            Weight::Dense(_) => None,
            Weight::Blocks(q) => Some(q.dims()),
        })
    }
}

/// One product of a few-row pass: a weight and, if any, the adapter on it.
#[derive(Clone, Copy)]
pub struct Projection<'t> {
    pub weight: Weight<'t>,
    pub lora: Option<LowRank<'t>>,
}

/// `x` (rows, in) times `w` (out, in) transposed, if both are contiguous f32 CPU tensors and
/// rows <= MAX_ROWS; `None` means "use the general matmul".
pub fn matmul_wt(x: &Tensor, w: Weight) -> candle_core::Result<Option<Tensor>> {
    matmul_wt_lora(x, w, None)
}

/// `x W^T + scale (x A^T) B^T` in one pass: the adapter's two rank-r products are folded into
/// the result instead of four candle ops per projection (decoding with an adapter spent as
/// long on those small ops as on the weights; `bench --grpo`, sampling).
pub fn matmul_wt_lora(x: &Tensor, w: Weight, lora: Option<LowRank>) -> candle_core::Result<Option<Tensor>> {
    Ok(matmul_wt_many(x, &[Projection { weight: w, lora }])?.map(|mut ys| ys.remove(0)))
}

/// Where a projection's weight rows are read from during the pass.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Dense(&'a [f32]),
    Blocks(&'a QuantRows),
}

/// [`matmul_wt_lora`] of every projection of the same `x` (q, k and v; gate and up) in one
/// parallel pass over all their weight rows: the threads are handed one job instead of one per
/// projection, and each task folds its rows' adapter terms itself. `None` if any projection is
/// one the kernel does not read.
pub fn matmul_wt_many(x: &Tensor, projections: &[Projection]) -> candle_core::Result<Option<Vec<Tensor>>> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (rows, k) = x.dims2()?;
    if rows > MAX_ROWS {
        return Ok(None);
    }
    let mut outs_n = Vec::with_capacity(projections.len());
    for p in projections {
        let Some((n, k2)) = p.weight.dims()? else { return Ok(None) };
        let lora_fits = p.lora.is_none_or(|l| {
            let r = l.a.dims().first().copied().unwrap_or(0);
            l.a.dims() == [r, k] && l.b.dims() == [n, r] && l.a.dtype() == DType::F32 && l.b.dtype() == DType::F32
        });
        if k2 != k || !lora_fits {
            return Ok(None);
        }
        outs_n.push(n);
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    // Each adapter's scale * x A^T as (r, rows), and its B (out, r) as stored: the fold is
    // then, per weight row, r axpys over the rows of x, which vectorise.
    let mut lows = Vec::with_capacity(projections.len());
    for p in projections {
        lows.push(match &p.lora {
            Some(l) => {
                let r = l.a.dims()[0];
                let a = l.a.flatten_all()?.to_vec1::<f32>()?;
                let mut xa_t = vec![0f32; r * rows];
                dot_block(&xs, rows, &a, k, &mut xa_t);
                xa_t.iter_mut().for_each(|v| *v *= l.scale as f32);
                Some((xa_t, l.b.flatten_all()?.to_vec1::<f32>()?, r))
            }
            None => None,
        });
    }
    let storages: Vec<_> = projections
        .iter()
        .map(|p| match p.weight {
            Weight::Dense(w) => Some(w.storage_and_layout()),
            Weight::Blocks(_) => None,
        })
        .collect();
    let mut sources = Vec::with_capacity(projections.len());
    for ((p, storage), &n) in projections.iter().zip(&storages).zip(&outs_n) {
        sources.push(match (p.weight, storage) {
            (Weight::Blocks(q), _) => Rows::Blocks(q),
            (Weight::Dense(_), Some((storage, layout))) => {
                let Storage::Cpu(CpuStorage::F32(data)) = &**storage else { return Ok(None) };
                Rows::Dense(&data[layout.start_offset()..layout.start_offset() + n * k])
            }
            (Weight::Dense(_), None) => unreachable!("dense weights hold their storage"),
        });
    }
    // outs[p] is (out, rows): weight row j's dots with every row of x, side by side.
    let mut outs: Vec<Vec<f32>> = outs_n.iter().map(|&n| vec![0f32; n * rows]).collect();
    let per_task = outs_n.iter().sum::<usize>().div_ceil(rayon::current_num_threads() * 8).max(16);
    let mut tasks = Vec::new();
    for (p, out) in outs.iter_mut().enumerate() {
        for (t, chunk) in out.chunks_mut(per_task * rows).enumerate() {
            tasks.push((p, t * per_task, chunk));
        }
    }
    tasks.into_par_iter().for_each(|(p, first, chunk)| {
        match sources[p] {
            Rows::Dense(ws) => dot_block(&xs, rows, &ws[first * k..(first + chunk.len() / rows) * k], k, chunk),
            Rows::Blocks(q) => {
                if !q.dot_rows(first, &xs, rows, chunk) {
                    dot_rows_expanded(&xs, rows, q, first, chunk);
                }
            }
        }
        if let Some((xa_t, b, r)) = &lows[p] {
            for (j, res) in chunk.chunks_exact_mut(rows).enumerate() {
                for (t, &bt) in b[(first + j) * r..(first + j + 1) * r].iter().enumerate() {
                    res.iter_mut().zip(&xa_t[t * rows..(t + 1) * rows]).for_each(|(o, x)| *o += x * bt);
                }
            }
        }
    });
    outs.iter()
        .zip(&outs_n)
        .map(|(out_t, &n)| {
            let mut out = vec![0f32; rows * n];
            for (j, col) in out_t.chunks_exact(rows).enumerate() {
                for (i, v) in col.iter().enumerate() {
                    out[i * n + j] = *v;
                }
            }
            Tensor::from_vec(out, (rows, n), x.device())
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map(Some)
}

/// The quantised rows from `first` that `out` covers, on CPUs without AVX2, FMA or F16C: each
/// pair of weight rows expanded into a buffer that stays in L1 and dotted by [`dot_block`]. The
/// same sums, bit for bit, as [`QuantRows::dot_rows`] and as the dense rows.
fn dot_rows_expanded(xs: &[f32], rows: usize, q: &QuantRows, first: usize, out: &mut [f32]) {
    let k = q.dims().1;
    let mut buf = vec![0f32; 2 * k];
    for (pair, res) in out.chunks_mut(2 * rows).enumerate() {
        let w = &mut buf[..res.len() / rows * k];
        q.dequantize_rows(first + 2 * pair, w);
        dot_block(xs, rows, w, k, res);
    }
}

/// For every weight row j of `w` (n rows of `k`) and x row i of `xs` (`rows` rows of `k`):
/// out[j * rows + i] = dot(x_i, w_j).
pub(super) fn dot_block(xs: &[f32], rows: usize, w: &[f32], k: usize, out: &mut [f32]) {
    // The vector path reads raw pointers: these are the bounds it relies on.
    assert!(k > 0 && xs.len() >= rows * k && w.len().is_multiple_of(k) && out.len() == w.len() / k * rows, "dot_block: mismatched slices");
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features this function is compiled for were just detected, and the
            // slice lengths it requires were asserted above.
            unsafe { avx2::dot_block(xs, rows, w, k, out) };
            return;
        }
    }
    for (wrow, res) in w.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
        for (i, r) in res.iter_mut().enumerate() {
            *r = xs[i * k..(i + 1) * k].iter().zip(wrow).map(|(a, b)| a * b).sum();
        }
    }
}

/// The weight rows of a few-row kernel in pairs, `(first row, 1 or 2)`: two at a time, the last
/// one alone when `n` is odd (the kernels then read it twice and discard the copy).
pub(super) fn weight_pairs(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(2).map(move |j| (j, (n - j).min(2)))
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// Four rows of x against two weight rows, one vector per step: 8 independent FMA chains
    /// for 6 loads (each weight vector loaded once for four rows, each x vector once for two
    /// weight rows).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA, and the slices are as [`super::dot_block`] asserts: `k > 0`,
    /// `xs.len() >= rows * k`, `w.len()` a multiple of `k`, `out.len() == w.len() / k * rows`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_block(xs: &[f32], rows: usize, w: &[f32], k: usize, out: &mut [f32]) {
        // SAFETY: each `xp[q]` starts a row of `xs` that holds k elements (xs.len() >= rows * k)
        // and each `wp[p]` a k-element row of `w`; the vector loads read [c, c + 8) with
        // c + 8 <= body <= k, the scalar tail reads [body, k). The prefetch address is
        // computed with wrapping arithmetic, only issued below the end of `w`, and never read.
        unsafe {
            let body = k - k % 8;
            let n = w.len() / k;
            let end = w.as_ptr_range().end;
            for (j, pair) in super::weight_pairs(n) {
                let wp = [w[j * k..].as_ptr(), w[(j + pair - 1) * k..].as_ptr()];
                // The weights stream from memory once per step: ask for the next pair early.
                let ahead = wp[0].wrapping_add(2 * k);
                let mut i = 0;
                while i < rows {
                    let r = (rows - i).min(4);
                    // Rows past the end repeat the last row; their results are discarded.
                    let xp: [*const f32; 4] = std::array::from_fn(|q| xs[(i + q.min(r - 1)) * k..].as_ptr());
                    let mut acc = [_mm256_setzero_ps(); 8];
                    let mut c = 0;
                    while c < body {
                        if i == 0 && c % 16 == 0 {
                            for p in 0..2 {
                                let at = ahead.wrapping_add(p * k + c);
                                if at < end {
                                    _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
                                }
                            }
                        }
                        let w0 = _mm256_loadu_ps(wp[0].add(c));
                        let w1 = _mm256_loadu_ps(wp[1].add(c));
                        for q in 0..4 {
                            let x = _mm256_loadu_ps(xp[q].add(c));
                            acc[2 * q] = _mm256_fmadd_ps(x, w0, acc[2 * q]);
                            acc[2 * q + 1] = _mm256_fmadd_ps(x, w1, acc[2 * q + 1]);
                        }
                        c += 8;
                    }
                    for q in 0..r {
                        for p in 0..pair {
                            let mut sum = lane_sum(acc[2 * q + p]);
                            for t in body..k {
                                sum += *xp[q].add(t) * *wp[p].add(t);
                            }
                            out[(j + p) * rows + i + q] = sum;
                        }
                    }
                    i += r;
                }
            }
        }
    }

    /// The sum of a vector's lanes, first to last: the one reduction of every few-row kernel,
    /// so that the quantised path's sums equal the dense path's bit for bit.
    #[target_feature(enable = "avx2")]
    pub fn lane_sum(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum()
    }

    /// The sums of eight vectors' lanes, each first to last as [`lane_sum`] adds them (bit for
    /// bit), as the lanes of one vector: the vectors transposed and added in order, instead of
    /// eight chains of single additions.
    #[target_feature(enable = "avx2")]
    pub fn lane_sums8(v: [__m256; 8]) -> __m256 {
        let start = _mm256_set1_ps([0f32; 0].iter().sum::<f32>());
        transpose8(v).iter().fold(start, |sum, &lane| _mm256_add_ps(sum, lane))
    }

    /// An 8 × 8 block of floats transposed: lane l of vector k becomes lane k of vector l.
    #[target_feature(enable = "avx2")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // Pairs of rows interleaved, then fours, within each 128-bit half; then the halves swapped.
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 { _mm256_unpacklo_ps(a, b) } else { _mm256_unpackhi_ps(a, b) }
        });
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let (base, e) = (i / 4 * 4, i % 4);
            let (a, b) = (t[base + e / 2], t[base + 2 + e / 2]);
            if e % 2 == 0 { _mm256_shuffle_ps::<0x44>(a, b) } else { _mm256_shuffle_ps::<0xEE>(a, b) }
        });
        std::array::from_fn(|l| {
            if l < 4 { _mm256_permute2f128_ps::<0x20>(u[l], u[4 + l]) } else { _mm256_permute2f128_ps::<0x31>(u[l - 4], u[l]) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight lane sums at once are each lane_sum's, bit for bit: the order of the additions
    /// shows in values of mixed sizes and signs, and in a sum of zeros' sign.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn eight_lane_sums_at_once_are_each_lane_sum() {
        use std::arch::x86_64::*;
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: no AVX2");
            return;
        }
        let mut seed = 11u64;
        for round in 0..50 {
            let values: Vec<f32> = (0..64)
                .map(|i| {
                    seed += 1;
                    let r = (crate::seed::splitmix64(seed) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    if round == 0 { if i % 2 == 0 { -0.0 } else { 0.0 } } else { r * 10f32.powi((i % 7) - 3) }
                })
                .collect();
            // SAFETY: AVX2 was detected; each load reads 8 of the 64 values, the store 8 floats.
            let (want, got) = unsafe {
                let v: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(values[8 * k..].as_ptr()));
                let mut got = [0f32; 8];
                _mm256_storeu_ps(got.as_mut_ptr(), avx2::lane_sums8(v));
                (v.map(|v| avx2::lane_sum(v)), got)
            };
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "round {round}: {got:?} against {want:?}");
        }
    }

    #[test]
    fn matches_general_matmul() {
        let dev = Device::Cpu;
        for (rows, k, n) in [(1, 37, 5), (3, 64, 130), (8, 576, 193), (16, 17, 1), (5, 7, 2), (13, 1536, 77)] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            let got = matmul_wt(&x, Weight::Dense(&w)).unwrap().unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
                assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "{rows}x{k}x{n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn the_folded_adapter_matches_base_plus_low_rank() {
        let dev = Device::Cpu;
        for (rows, k, n, r) in [(1, 37, 5, 2), (8, 576, 193, 8), (16, 17, 3, 4)] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let a = Tensor::randn(0f32, 1.0, (r, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, (n, r), &dev).unwrap();
            let scale = 0.75;
            let low = (x.matmul(&a.t().unwrap()).unwrap() * scale).unwrap().matmul(&b.t().unwrap()).unwrap();
            let want = (x.matmul(&w.t().unwrap()).unwrap() + low).unwrap().to_vec2::<f32>().unwrap();
            let got =
                matmul_wt_lora(&x, Weight::Dense(&w), Some(LowRank { a: &a, b: &b, scale })).unwrap().unwrap().to_vec2::<f32>().unwrap();
            for (p, q) in want.iter().flatten().zip(got.iter().flatten()) {
                assert!((p - q).abs() < 1e-3 * (1.0 + p.abs()), "{rows}x{k}x{n} r{r}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn one_pass_over_several_projections_equals_each_alone_bit_for_bit() {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let k = 64;
        let (q, _) = crate::model::quant::tests::random_blocks(37, k, GgmlDType::Q4_1, 7);
        let dense = [Tensor::randn(0f32, 1.0, (130, k), &dev).unwrap(), Tensor::randn(0f32, 1.0, (5, k), &dev).unwrap()];
        let a = Tensor::randn(0f32, 1.0, (4, k), &dev).unwrap();
        let b = [Tensor::randn(0f32, 1.0, (130, 4), &dev).unwrap(), Tensor::randn(0f32, 1.0, (37, 4), &dev).unwrap()];
        let projections = [
            Projection { weight: Weight::Dense(&dense[0]), lora: Some(LowRank { a: &a, b: &b[0], scale: 0.5 }) },
            Projection { weight: Weight::Blocks(&q), lora: Some(LowRank { a: &a, b: &b[1], scale: 2.0 }) },
            Projection { weight: Weight::Dense(&dense[1]), lora: None },
        ];
        for rows in [1, 3, 8, 16] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let together = matmul_wt_many(&x, &projections).unwrap().unwrap();
            assert_eq!(together.len(), 3);
            for (p, y) in projections.iter().zip(&together) {
                let alone = matmul_wt_lora(&x, p.weight, p.lora).unwrap().unwrap();
                assert_eq!(y.to_vec2::<f32>().unwrap(), alone.to_vec2::<f32>().unwrap(), "{rows} rows");
            }
        }
        // One projection the kernel cannot read declines them all.
        let strided = dense[1].t().unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, k), &dev).unwrap();
        let mixed = [projections[0], Projection { weight: Weight::Dense(&strided), lora: None }];
        assert!(matmul_wt_many(&x, &mixed).unwrap().is_none());
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        assert!(matmul_wt(&Tensor::zeros((17, 8), DType::F32, &dev).unwrap(), Weight::Dense(&w)).unwrap().is_none());
        assert!(matmul_wt(&Tensor::zeros((2, 8), DType::F64, &dev).unwrap(), Weight::Dense(&w)).unwrap().is_none());
        assert!(matmul_wt(&Tensor::zeros((2, 4), DType::F32, &dev).unwrap(), Weight::Dense(&w.t().unwrap())).unwrap().is_none());
    }

    #[test]
    fn quantised_blocks_give_the_dense_products_bit_for_bit() {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        for (dtype, n, k) in [(GgmlDType::Q4_1, 193, 576), (GgmlDType::Q8_0, 37, 64), (GgmlDType::Q4_1, 1, 32)] {
            let (q, dense) = crate::model::quant::tests::random_blocks(n, k, dtype, n as u64);
            let a = Tensor::randn(0f32, 1.0, (4, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, (n, 4), &dev).unwrap();
            for rows in [1, 2, 3, 4, 5, 8, 9, 12, 13, 16] {
                let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
                let plain = |w| matmul_wt(&x, w).unwrap().unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(plain(Weight::Blocks(&q)), plain(Weight::Dense(&dense)), "{dtype:?} {rows}x{k}x{n}");
                let folded = |w| {
                    let lora = LowRank { a: &a, b: &b, scale: 0.5 };
                    matmul_wt_lora(&x, w, Some(lora)).unwrap().unwrap().to_vec2::<f32>().unwrap()
                };
                assert_eq!(folded(Weight::Blocks(&q)), folded(Weight::Dense(&dense)), "{dtype:?} {rows}x{k}x{n}, adapter");
                // The portable expansion, which CPUs without AVX2, FMA or F16C take.
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut expanded = vec![0f32; n * rows];
                dot_rows_expanded(&xs, rows, &q, 0, &mut expanded);
                let mut direct = vec![0f32; n * rows];
                #[cfg(target_arch = "x86_64")]
                let cpu =
                    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c");
                #[cfg(not(target_arch = "x86_64"))]
                let cpu = false;
                assert_eq!(q.dot_rows(0, &xs, rows, &mut direct), cpu, "the direct path runs where the CPU has it");
                if cpu {
                    assert_eq!(direct, expanded, "{dtype:?} {rows}x{k}x{n}, the two paths");
                }
            }
        }
    }
}
