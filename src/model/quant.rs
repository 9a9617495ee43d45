//! A GGUF's quantised weight blocks, kept beside the f32 weights for the few-row products of
//! decoding (`--quantized-base`).
//!
//! Decoding one row reads every weight once per token, so its speed is the memory traffic of
//! the weights: Q4_1 is 0.625 bytes a weight against f32's 4. The few-row kernel
//! ([`super::skinny`]) expands each block into f32 in registers (on CPUs without AVX2, FMA and
//! F16C, each pair of weight rows into a buffer in L1) and dots it with the rows of x as it
//! does the dense weights. The expansion is the same arithmetic as candle's
//! dequantisation (`q · d + m` for Q4_1, `q · d` for Q8_0, rounded the same way), and the f32
//! weights are that dequantisation: the two paths compute bit-identical products (tested).

use anyhow::{Context, bail, ensure};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

const BLOCK: usize = 32;

/// The block formats the kernel reads: those of the default model (Q4_1 layers, a Q8_0
/// embedding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// 32 weights: f16 scale d, f16 minimum m, 16 bytes of 4-bit q (low nibbles first);
    /// a weight is q · d + m.
    Q4_1,
    /// 32 weights: f16 scale d, 32 signed bytes q; a weight is q · d.
    Q8_0,
}

impl BlockFormat {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }
}

/// A (rows, cols) weight matrix as quantised blocks, row-major: each row is cols / 32 blocks.
#[derive(Debug, Clone)]
pub struct QuantRows {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QuantRows {
    /// The blocks of a 2-D GGUF tensor, its rows taken in `row_order` (source row of each
    /// output row) when given. `None` when its format is not one the kernel reads.
    pub fn from_qtensor(q: &QTensor, row_order: Option<&[usize]>) -> anyhow::Result<Option<Self>> {
        let Some(format) = BlockFormat::of(q.dtype()) else { return Ok(None) };
        let (rows, cols) = q.shape().dims2().context("quantised weights must be a matrix")?;
        let data = q.data()?;
        let me = Self::from_bytes(format, rows, cols, data.to_vec())?;
        Ok(Some(match row_order {
            Some(order) => me.reordered(order)?,
            None => me,
        }))
    }

    fn from_bytes(format: BlockFormat, rows: usize, cols: usize, data: Vec<u8>) -> anyhow::Result<Self> {
        ensure!(cols > 0 && cols.is_multiple_of(BLOCK), "quantised rows of {cols} weights are not whole blocks of {BLOCK}");
        let me = QuantRows { format, rows, cols, data };
        ensure!(me.data.len() == rows * me.row_bytes(), "{} bytes of blocks for a {rows}x{cols} {format:?} matrix", me.data.len());
        Ok(me)
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    fn reordered(&self, order: &[usize]) -> anyhow::Result<Self> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            bail!("a row order of {} entries for {} rows", order.len(), self.rows);
        }
        let rb = self.row_bytes();
        let data = order.iter().flat_map(|&r| &self.data[r * rb..(r + 1) * rb]).copied().collect();
        Ok(QuantRows { data, ..*self })
    }

    /// (rows, cols) of the matrix.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The bytes of the weights (what one full read of them costs).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Rows `first..first + out.len() / cols` as f32, bit for bit candle's dequantisation.
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        let n = out.len() / self.cols;
        assert!(out.len() == n * self.cols && first + n <= self.rows, "dequantize_rows: {n} rows from {first} of {}", self.rows);
        let rb = self.row_bytes();
        let src = &self.data[first * rb..(first + n) * rb];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
                // SAFETY: AVX2 and F16C were just detected; `src` holds exactly the blocks of `out`.
                unsafe { avx2::dequantize(self.format, src, out) };
                return;
            }
        }
        dequantize_portable(self.format, src, out);
    }
}

/// Which kernel [`QuantRows::dot_rows`] runs on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKernel {
    /// AVX2, FMA, F16C and AVX-512VL: with 3 or more rows of x, two weight rows a group in
    /// AVX-512VL's 32 vector registers (fewer rows take the AVX2 kernel).
    Avx512vl,
    /// AVX2, FMA and F16C: the blocks expanded in registers.
    Avx2,
    /// Anything else: the caller expands rows of blocks to f32 ([`QuantRows::dequantize_rows`]).
    Portable,
}

impl BlockKernel {
    pub fn detect() -> BlockKernel {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c");
            if avx2 && std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
                return BlockKernel::Avx512vl;
            }
            if avx2 {
                return BlockKernel::Avx2;
            }
        }
        BlockKernel::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            BlockKernel::Avx512vl => "avx512vl",
            BlockKernel::Avx2 => "avx2+fma+f16c",
            BlockKernel::Portable => "portable",
        }
    }
}

impl QuantRows {
    /// `out[j * rows + i] = dot(x_i, w_{first + j})` for the weight rows `out` covers, straight
    /// from the blocks, where the CPU has AVX2, FMA and F16C ([`BlockKernel`]); `false`
    /// (nothing written) otherwise. The sums are those of the few-row kernel over the
    /// dequantised rows, bit for bit: the same weights, multiplied and added in the same order.
    pub fn dot_rows(&self, first: usize, xs: &[f32], rows: usize, out: &mut [f32]) -> bool {
        let n = out.len() / rows;
        assert!(
            out.len() == n * rows && first + n <= self.rows && xs.len() >= rows * self.cols,
            "dot_rows: {n} weight rows from {first} of {}, {rows} rows of x",
            self.rows
        );
        #[cfg(target_arch = "x86_64")]
        {
            let rb = self.row_bytes();
            let src = &self.data[first * rb..(first + n) * rb];
            match BlockKernel::detect() {
                // SAFETY (both arms): `detect` found the features each kernel is compiled for;
                // the bounds they rely on were asserted above.
                BlockKernel::Avx512vl if rows > 2 => unsafe { avx2::dot_rows_wide(self.format, src, self.cols, xs, rows, out) },
                BlockKernel::Avx512vl | BlockKernel::Avx2 => unsafe { avx2::dot_rows(self.format, src, self.cols, xs, rows, out) },
                BlockKernel::Portable => return false,
            }
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

fn scale(bytes: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// The reference expansion: candle's `to_float` of each block.
fn dequantize_portable(format: BlockFormat, src: &[u8], out: &mut [f32]) {
    for (block, ys) in src.chunks_exact(format.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
        let d = scale(block);
        match format {
            BlockFormat::Q4_1 => {
                let m = scale(&block[2..]);
                for (j, q) in block[4..20].iter().enumerate() {
                    ys[j] = (q & 0x0F) as f32 * d + m;
                    ys[j + BLOCK / 2] = (q >> 4) as f32 * d + m;
                }
            }
            BlockFormat::Q8_0 => {
                for (y, q) in ys.iter_mut().zip(&block[2..34]) {
                    *y = *q as i8 as f32 * d;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, BlockFormat};
    use crate::model::skinny::avx2::{lane_sum, lane_sums8};
    use crate::model::skinny::weight_pairs;

    /// The f16 at the start of `bytes`, widened by the F16C instruction (exact, as every f16
    /// is an f32) and broadcast.
    #[target_feature(enable = "avx2,f16c")]
    fn scale(bytes: &[u8]) -> __m256 {
        let bits = u16::from_le_bytes([bytes[0], bytes[1]]);
        _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))))
    }

    /// [`super::dequantize_portable`] eight weights per instruction: a multiply then an add
    /// (not an FMA), so that each weight rounds as the portable code does.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `src` is whole blocks of `format` and `out` holds 32 floats per block.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn dequantize(format: BlockFormat, src: &[u8], out: &mut [f32]) {
        let bb = format.block_bytes();
        assert!(src.len().is_multiple_of(bb) && out.len() == src.len() / bb * BLOCK);
        for (block, ys) in src.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
            let d = scale(block);
            let y = ys.as_mut_ptr();
            // SAFETY: a block holds `bb` bytes (the loads read 16 from offset 4 of a 20-byte
            // Q4_1 block, 32 from offset 2 of a 34-byte Q8_0 block) and `ys` 32 floats.
            unsafe {
                let ints: [__m256i; 4] = match format {
                    BlockFormat::Q4_1 => {
                        let qs = _mm_loadu_si128(block.as_ptr().add(4) as *const __m128i);
                        let low = _mm_and_si128(qs, _mm_set1_epi8(0x0F));
                        let high = _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0F));
                        [
                            _mm256_cvtepu8_epi32(low),
                            _mm256_cvtepu8_epi32(_mm_srli_si128(low, 8)),
                            _mm256_cvtepu8_epi32(high),
                            _mm256_cvtepu8_epi32(_mm_srli_si128(high, 8)),
                        ]
                    }
                    BlockFormat::Q8_0 => {
                        let lo = _mm_loadu_si128(block.as_ptr().add(2) as *const __m128i);
                        let hi = _mm_loadu_si128(block.as_ptr().add(18) as *const __m128i);
                        [
                            _mm256_cvtepi8_epi32(lo),
                            _mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)),
                            _mm256_cvtepi8_epi32(hi),
                            _mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)),
                        ]
                    }
                };
                let m = match format {
                    BlockFormat::Q4_1 => Some(scale(&block[2..])),
                    BlockFormat::Q8_0 => None,
                };
                for (i, q) in ints.into_iter().enumerate() {
                    let mut w = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                    if let Some(m) = m {
                        w = _mm256_add_ps(w, m);
                    }
                    _mm256_storeu_ps(y.add(8 * i), w);
                }
            }
        }
    }

    /// One block's weights as four vectors of 8, expanded in registers: the arithmetic of
    /// [`dequantize`].
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn expand(format: BlockFormat, block: *const u8) -> [__m256; 4] {
        // SAFETY: `block` starts a whole block of `format` (see `dequantize`).
        unsafe {
            let bytes = std::slice::from_raw_parts(block, format.block_bytes());
            let d = scale(bytes);
            match format {
                BlockFormat::Q4_1 => {
                    let m = scale(&bytes[2..]);
                    let qs = _mm_loadu_si128(block.add(4) as *const __m128i);
                    let low = _mm_and_si128(qs, _mm_set1_epi8(0x0F));
                    let high = _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0F));
                    [low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)]
                        .map(|q| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), d), m))
                }
                BlockFormat::Q8_0 => {
                    let lo = _mm_loadu_si128(block.add(2) as *const __m128i);
                    let hi = _mm_loadu_si128(block.add(18) as *const __m128i);
                    [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
                        .map(|q| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d))
                }
            }
        }
    }

    /// The dot products of R rows of x (`xp`) with P weight rows (`wp`: block rows, a row
    /// repeated where there are fewer), one accumulator per pair as in the dense kernel, each
    /// block expanded once in registers for all R rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_group<const R: usize, const P: usize>(
        format: BlockFormat,
        wp: [*const u8; P],
        xp: [*const f32; R],
        blocks: usize,
        end: *const u8,
    ) -> [[f32; P]; R] {
        let bb = format.block_bytes();
        let mut acc = [[_mm256_setzero_ps(); P]; R];
        // The next P rows, asked for while these are summed (P blocks a step cover them), once
        // per cache line.
        let step = P * bb;
        let ahead = wp[0].wrapping_add(blocks * step);
        // SAFETY: the caller's rows hold `blocks` blocks of weights and 32 · blocks floats of x;
        // the prefetch address is computed with wrapping arithmetic, only issued below `end`
        // (the end of the weights, or null for none), and never read.
        unsafe {
            for b in 0..blocks {
                let at = ahead.wrapping_add(b * step);
                if at < end && (at as usize) % 64 < step {
                    _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
                }
                // A loop, not a closure: a closure may be left out of line, and each block would
                // then pay a call (batch-1 decoding at two thirds of its speed).
                let mut w = [[_mm256_setzero_ps(); 4]; P];
                for (w, wp) in w.iter_mut().zip(&wp) {
                    *w = expand(format, wp.add(b * bb));
                }
                for s in 0..4 {
                    for (x, acc) in xp.iter().zip(acc.iter_mut()) {
                        let x = _mm256_loadu_ps(x.add(b * BLOCK + 8 * s));
                        for (acc, w) in acc.iter_mut().zip(&w) {
                            *acc = _mm256_fmadd_ps(x, w[s], *acc);
                        }
                    }
                }
            }
        }
        if R == 8 {
            // Eight rows' sums of each weight row at once, in lane_sum's order.
            let mut sums = [[0f32; P]; R];
            for p in 0..P {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), lane_sums8(std::array::from_fn(|q| acc[q][p]))) };
                sums.iter_mut().zip(lanes).for_each(|(row, v)| row[p] = v);
            }
            return sums;
        }
        acc.map(|row| row.map(|v| lane_sum(v)))
    }

    /// [`super::QuantRows::dot_rows`] over the block rows `src` of `k` weights each: one or two
    /// rows of x against two weight rows at a time; more rows against one weight row at a time,
    /// in groups of 8 or 4 rows of x (the last row repeated to fill a group, its sums dropped),
    /// so that each block is expanded once per group and the accumulators stay in registers.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `src` is whole rows of blocks, `xs` holds `rows` rows
    /// of `k` floats and `out` `rows` floats per weight row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(format: BlockFormat, src: &[u8], k: usize, xs: &[f32], rows: usize, out: &mut [f32]) {
        let rb = k / BLOCK * format.block_bytes();
        let n = src.len() / rb;
        let end = src.as_ptr_range().end;
        let blocks = k / BLOCK;
        let x = |q: usize| xs[q.min(rows - 1) * k..].as_ptr();
        if rows <= 2 {
            for (j, pair) in weight_pairs(n) {
                let wp = [src[j * rb..].as_ptr(), src[(j + pair - 1) * rb..].as_ptr()];
                let mut put = |q: usize, s: [f32; 2]| {
                    for (p, v) in s.into_iter().enumerate().take(pair) {
                        out[(j + p) * rows + q] = v;
                    }
                };
                // SAFETY: as the function's contract states.
                unsafe {
                    if rows == 1 {
                        put(0, dot_group::<1, 2>(format, wp, [x(0)], blocks, end)[0]);
                    } else {
                        let [s0, s1] = dot_group::<2, 2>(format, wp, [x(0), x(1)], blocks, end);
                        put(0, s0);
                        put(1, s1);
                    }
                }
            }
            return;
        }
        for j in 0..n {
            // SAFETY: as the function's contract states.
            unsafe { row_groups(format, [src[j * rb..].as_ptr()], 1, j, xs, k, rows, end, out) };
        }
    }

    /// The `rows` rows of x against P weight rows (the block rows `wp` of weight rows j.., the
    /// first `pair` real, the others repeats), in groups of 8 or 4 rows of x (the last row
    /// repeated to fill a group, its sums dropped), into `out[(j + p) * rows + i]`. Always
    /// inlined, so that it compiles with its caller's instruction set (and registers).
    ///
    /// # Safety
    /// As [`dot_rows`]; the CPU has what the caller is compiled for (at least AVX2, FMA, F16C).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_groups<const P: usize>(
        format: BlockFormat,
        wp: [*const u8; P],
        pair: usize,
        j: usize,
        xs: &[f32],
        k: usize,
        rows: usize,
        end: *const u8,
        out: &mut [f32],
    ) {
        let blocks = k / BLOCK;
        let x = |q: usize| xs[q.min(rows - 1) * k..].as_ptr();
        let mut i = 0;
        while i < rows {
            let r = rows - i;
            // The first group of rows has asked for the next weight rows already.
            let end = if i == 0 { end } else { std::ptr::null() };
            // SAFETY: as the function's contract states; `x` clamps to the last row.
            let sums: &[[f32; P]] = unsafe {
                if r > 4 {
                    &dot_group::<8, P>(format, wp, std::array::from_fn(|q| x(i + q)), blocks, end)
                } else {
                    &dot_group::<4, P>(format, wp, std::array::from_fn(|q| x(i + q)), blocks, end)
                }
            };
            let take = r.min(sums.len());
            for (q, s) in sums[..take].iter().enumerate() {
                for (p, v) in s.iter().enumerate().take(pair) {
                    out[(j + p) * rows + i + q] = *v;
                }
            }
            i += take;
        }
    }

    /// [`dot_rows`] for 3 to 16 rows of x on CPUs with AVX-512VL: two weight rows at a time
    /// against a group of 8 (or 4) rows of x. The 16 accumulators, 8 weight vectors and the x
    /// vector fit in AVX-512VL's 32 vector registers, so each x vector loaded serves two weight
    /// rows. The sums are the same, bit for bit: each pair's FMAs run in the same order.
    ///
    /// # Safety
    /// As [`dot_rows`], and the CPU has AVX-512F and AVX-512VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    pub unsafe fn dot_rows_wide(format: BlockFormat, src: &[u8], k: usize, xs: &[f32], rows: usize, out: &mut [f32]) {
        let rb = k / BLOCK * format.block_bytes();
        let end = src.as_ptr_range().end;
        for (j, pair) in weight_pairs(src.len() / rb) {
            let wp = [src[j * rb..].as_ptr(), src[(j + pair - 1) * rb..].as_ptr()];
            // SAFETY: as the function's contract states.
            unsafe { row_groups(format, wp, pair, j, xs, k, rows, end, out) };
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// A (rows, cols) matrix of random weights quantised to `dtype` by candle.
    pub(crate) fn random_blocks(rows: usize, cols: usize, dtype: GgmlDType, seed: u64) -> (QuantRows, Tensor) {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let w = Tensor::from_vec(values, (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let dense = q.dequantize(&dev).unwrap();
        (QuantRows::from_qtensor(&q, None).unwrap().unwrap(), dense)
    }

    fn all_rows(q: &QuantRows) -> Vec<f32> {
        let mut out = vec![0f32; q.rows * q.cols];
        q.dequantize_rows(0, &mut out);
        out
    }

    #[test]
    fn every_path_expands_blocks_bit_for_bit_as_candle() {
        for (dtype, seed) in [(GgmlDType::Q4_1, 1), (GgmlDType::Q8_0, 2)] {
            let (q, dense) = random_blocks(7, 96, dtype, seed);
            let want: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
            // The dispatched path (AVX2 where present) and the portable one.
            assert_eq!(all_rows(&q), want, "{dtype:?}, dispatched");
            let mut portable = vec![0f32; want.len()];
            dequantize_portable(q.format, &q.data, &mut portable);
            assert_eq!(portable, want, "{dtype:?}, portable");
            // A slice of rows from the middle.
            let mut two = vec![0f32; 2 * 96];
            q.dequantize_rows(3, &mut two);
            assert_eq!(two, want[3 * 96..5 * 96]);
        }
    }

    /// The AVX-512VL kernel (two weight rows a group) and the AVX2 one (one weight row a
    /// group) give the same sums, bit for bit, wherever the CPU can run both; `dot_rows` takes
    /// the first where it can, so elsewhere only the second runs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_wide_and_narrow_kernels_agree_bit_for_bit() {
        if BlockKernel::detect() != BlockKernel::Avx512vl {
            return;
        }
        for (dtype, n, k) in [(GgmlDType::Q4_1, 193, 576), (GgmlDType::Q8_0, 37, 64), (GgmlDType::Q4_1, 1, 32)] {
            let (q, _) = random_blocks(n, k, dtype, 3);
            for rows in [3, 4, 5, 8, 9, 12, 13, 16] {
                let xs: Vec<f32> = (0..rows * k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
                let (mut narrow, mut wide) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                // SAFETY: the features were just detected; `q.data` is whole rows of blocks,
                // `xs` holds `rows` rows of k and each output `rows` floats per weight row.
                unsafe {
                    avx2::dot_rows(q.format, &q.data, k, &xs, rows, &mut narrow);
                    avx2::dot_rows_wide(q.format, &q.data, k, &xs, rows, &mut wide);
                }
                assert_eq!(narrow, wide, "{dtype:?} {rows}x{k}x{n}");
            }
        }
    }

    #[test]
    fn rows_can_be_reordered_and_bad_shapes_are_refused() {
        let (q, dense) = random_blocks(4, 64, GgmlDType::Q4_1, 3);
        let r = q.reordered(&[2, 0, 3, 1]).unwrap();
        let want = dense.to_vec2::<f32>().unwrap();
        let got = all_rows(&r);
        for (i, src) in [2, 0, 3, 1].into_iter().enumerate() {
            assert_eq!(got[i * 64..(i + 1) * 64], want[src]);
        }
        assert!(q.reordered(&[0, 1, 2]).is_err());
        assert!(q.reordered(&[0, 1, 2, 4]).is_err());
        assert!(QuantRows::from_bytes(BlockFormat::Q8_0, 2, 48, vec![0; 68]).is_err());
        assert!(QuantRows::from_bytes(BlockFormat::Q8_0, 2, 32, vec![0; 67]).is_err());
    }
}
