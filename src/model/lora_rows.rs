//! The LoRA adapter's products in training (f32, CPU), a block of rows at a time: forward
//! `y += s · ((x ∘ m) Aᵀ) Bᵀ`, backward `dx += m ∘ (s · (dy B) A)`, `dA = s · (dy B)ᵀ (x ∘ m)`
//! and `dB = s · dyᵀ ((x ∘ m) Aᵀ)`, for A (r, k), B (n, r) and a dropout mask m.
//!
//! candle runs each of these as a GEMM with one dimension of r (8), at about a quarter of its
//! rate on the 2-core EPYC (45-53 against 195-208 GFLOP/s for the base weights' products at
//! 1,024 rows), seven of them per linear layer, plus a pass for each mask, scale and sum. Here
//! a block of rows is masked once into a buffer that stays in cache, and every product that
//! reads it runs over it there. The gradients of A and B are summed per fixed chunk of rows and
//! the chunks added in order, so they do not depend on the number of threads.

use rayon::prelude::*;

/// Rows per parallel task of the backward pass; the chunks' partial gradients are added in
/// chunk order. (The forward's task is one block.)
const CHUNK_ROWS: usize = 128;
/// Rows masked and multiplied together (a multiple of 4, the kernels' row blocking).
const BLOCK_ROWS: usize = 16;

/// `mask(first, x, out)` writes `x ∘ m` for the elements of the flat (rows · k) input that
/// start at `first` (a multiple of 64) into `out`, which is zero on entry: a mask may write
/// only the elements it keeps.
pub type Mask<'a> = &'a (dyn Fn(usize, &[f32], &mut [f32]) + Sync);

/// The adapter of one linear layer: A (r, k) row-major, Bᵀ (r, n) row-major, and the scale.
pub struct Factors<'a> {
    pub a: &'a [f32],
    pub bt: &'a [f32],
    pub r: usize,
    pub k: usize,
    pub n: usize,
    pub scale: f32,
}

impl Factors<'_> {
    fn check(&self) -> candle_core::Result<()> {
        if self.r == 0 || self.k == 0 || self.n == 0 || self.a.len() != self.r * self.k || self.bt.len() != self.r * self.n {
            candle_core::bail!("lora rows: A {} and Bᵀ {} for r {}, k {}, n {}", self.a.len(), self.bt.len(), self.r, self.k, self.n);
        }
        Ok(())
    }

    /// Rows per block: `BLOCK_ROWS`, rounded up so that each block's first element is a
    /// multiple of 64 (where a mask's words start).
    fn block_rows(&self) -> usize {
        let step = 64 / gcd(self.k, 64);
        BLOCK_ROWS.div_ceil(step) * step
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `x ∘ m` for the rows of x from `first_row` on, in `buf` (or x itself without a mask).
fn masked_rows<'b>(x: &'b [f32], first_row: usize, k: usize, mask: Option<Mask>, buf: &'b mut Vec<f32>) -> &'b [f32] {
    match mask {
        Some(mask) => {
            buf.clear();
            buf.resize(x.len(), 0.0);
            mask(first_row * k, x, buf);
            buf
        }
        None => x,
    }
}

/// Forward: adds `s · ((x ∘ m) Aᵀ) Bᵀ` to `y` (rows, n) for x (rows, k), and returns
/// `u = (x ∘ m) Aᵀ` (rows, r) for the backward pass.
pub fn forward(x: &[f32], f: &Factors, mask: Option<Mask>, y: &mut [f32]) -> candle_core::Result<Vec<f32>> {
    f.check()?;
    let rows = x.len() / f.k;
    if x.len() != rows * f.k || y.len() != rows * f.n {
        candle_core::bail!("lora rows: x of {} and y of {} elements for k {}, n {}", x.len(), y.len(), f.k, f.n);
    }
    let block = f.block_rows();
    let mut u = vec![0f32; rows * f.r];
    y.par_chunks_mut(block * f.n).zip(u.par_chunks_mut(block * f.r)).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(buf, ut), (b, (y, u))| {
            let first = b * block;
            let n_rows = u.len() / f.r;
            let xm = masked_rows(&x[first * f.k..(first + n_rows) * f.k], first, f.k, mask, buf);
            // ut (r, rows) = A xmᵀ, then u = utᵀ and y += (s · ut)ᵀ Bᵀ.
            ut.resize(f.r * n_rows, 0.0);
            super::skinny::dot_block(xm, n_rows, f.a, f.k, ut);
            transpose_into(ut, f.r, n_rows, u);
            ut.iter_mut().for_each(|v| *v *= f.scale);
            accumulate(ut, f.r, n_rows, f.bt, f.n, y);
        },
    );
    Ok(u)
}

/// The adapter's gradients: dA (r, k) and dB (n, r).
pub struct FactorGrads {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// Backward, for the forward's x, u and the output gradient dy (rows, n): adds
/// `m ∘ (s · (dy B) A)` to `dx` (rows, k) and returns dA and dB.
pub fn backward(x: &[f32], u: &[f32], dy: &[f32], f: &Factors, mask: Option<Mask>, dx: &mut [f32]) -> candle_core::Result<FactorGrads> {
    f.check()?;
    let rows = x.len() / f.k;
    if x.len() != rows * f.k || dx.len() != x.len() || u.len() != rows * f.r || dy.len() != rows * f.n {
        candle_core::bail!(
            "lora rows: x {}, u {}, dy {}, dx {} elements for k {}, r {}, n {}",
            x.len(),
            u.len(),
            dy.len(),
            dx.len(),
            f.k,
            f.r,
            f.n
        );
    }
    let (r, k, n) = (f.r, f.k, f.n);
    let block = f.block_rows();
    let chunk = CHUNK_ROWS.div_ceil(block) * block;
    // Each chunk's (dA, dBᵀ), flat: r · k then r · n.
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk * k)
        .enumerate()
        .map(|(c, dx)| {
            let mut grads = vec![0f32; r * (k + n)];
            let (da, dbt) = grads.split_at_mut(r * k);
            let (mut xm_buf, mut kept, mut g, mut gt, mut tmp, mut us) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (b, dx) in dx.chunks_mut(block * k).enumerate() {
                let first = c * chunk + b * block;
                let n_rows = dx.len() / k;
                let dy = &dy[first * n..(first + n_rows) * n];
                // g (r, rows) = s · Bᵀ dyᵀ: the gradient of (x ∘ m) Aᵀ.
                g.resize(r * n_rows, 0.0);
                super::skinny::dot_block(dy, n_rows, f.bt, n, &mut g);
                g.iter_mut().for_each(|v| *v *= f.scale);
                // dx += m ∘ (gᵀ A).
                tmp.clear();
                tmp.resize(n_rows * k, 0.0);
                accumulate(&g, r, n_rows, f.a, k, &mut tmp);
                let through = masked_rows(&tmp, first, k, mask, &mut kept);
                dx.iter_mut().zip(through).for_each(|(d, v)| *d += v);
                // dA += g (x ∘ m): coefficients (rows, r).
                gt.resize(n_rows * r, 0.0);
                transpose_into(&g, r, n_rows, &mut gt);
                let xm = masked_rows(&x[first * k..(first + n_rows) * k], first, k, mask, &mut xm_buf);
                accumulate(&gt, n_rows, r, xm, k, da);
                // dBᵀ += (s · u)ᵀ dy.
                us.clear();
                us.extend(u[first * r..(first + n_rows) * r].iter().map(|v| v * f.scale));
                accumulate(&us, n_rows, r, dy, n, dbt);
            }
            grads
        })
        .collect();
    let mut sum = vec![0f32; r * (k + n)];
    sum.par_chunks_mut(1024).enumerate().for_each(|(c, out)| {
        for p in &partials {
            out.iter_mut().zip(&p[c * 1024..]).for_each(|(o, v)| *o += v);
        }
    });
    let (da, dbt) = sum.split_at(r * k);
    Ok(FactorGrads { a: da.to_vec(), b: transposed(dbt, r, n) })
}

/// `out` (cols, rows) = the transpose of `m` (rows, cols), both row-major.
fn transpose_into(m: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    for (j, row) in out.chunks_exact_mut(rows).enumerate() {
        row.iter_mut().enumerate().for_each(|(i, v)| *v = m[i * cols + j]);
    }
}

/// The transpose (cols, rows) of a row-major (rows, cols) matrix.
pub fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    transpose_into(m, rows, cols, &mut out);
    out
}

/// `out[p] += Σ_q c[q · ps + p] · w[q]` for rows `out[p]` (ps of them) and `w[q]` (qs of them),
/// each of `n` elements: a product whose inner dimension is small, written in place.
fn accumulate(c: &[f32], qs: usize, ps: usize, w: &[f32], n: usize, out: &mut [f32]) {
    // The vector path reads raw pointers: these are the bounds it relies on.
    assert!(c.len() == qs * ps && w.len() == qs * n && out.len() == ps * n, "accumulate: mismatched slices");
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features it is compiled for were just detected; the lengths are asserted.
            unsafe { avx2::accumulate(c, qs, ps, w, n, out) };
            return;
        }
    }
    accumulate_plain(c, qs, ps, w, n, out);
}

fn accumulate_plain(c: &[f32], qs: usize, ps: usize, w: &[f32], n: usize, out: &mut [f32]) {
    for (p, row) in out.chunks_exact_mut(n).enumerate() {
        for q in 0..qs {
            let cq = c[q * ps + p];
            row.iter_mut().zip(&w[q * n..(q + 1) * n]).for_each(|(o, v)| *o = cq.mul_add(*v, *o));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Four output rows by 16 columns per step: 8 accumulators, and for each q two loads of w
    /// and four broadcasts feed eight FMAs. Each output element gets the same q-ordered chain
    /// of fused multiply-adds as [`super::accumulate_plain`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `c.len() == qs * ps`, `w.len() == qs * n`, `out.len() == ps * n`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate(c: &[f32], qs: usize, ps: usize, w: &[f32], n: usize, out: &mut [f32]) {
        let wide = n - n % 16;
        let mut p = 0;
        while p < ps {
            let rows = (ps - p).min(4);
            // SAFETY: output rows p..p + rows exist (p + rows <= ps); columns [col, col + 16)
            // lie below `wide` <= n; w's rows q < qs hold n elements each; c[q * ps + p + i]
            // with i < rows is inside c.
            unsafe {
                // One pointer into `out`, from which the four row pointers derive.
                let base = out.as_mut_ptr();
                let op: [*mut f32; 4] = std::array::from_fn(|i| base.add((p + i.min(rows - 1)) * n));
                let mut col = 0;
                while col < wide {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for i in 0..4 {
                        acc[2 * i] = _mm256_loadu_ps(op[i].add(col));
                        acc[2 * i + 1] = _mm256_loadu_ps(op[i].add(col + 8));
                    }
                    for q in 0..qs {
                        let wp = w.as_ptr().add(q * n + col);
                        let (w0, w1) = (_mm256_loadu_ps(wp), _mm256_loadu_ps(wp.add(8)));
                        let cp = c.as_ptr().add(q * ps + p);
                        for i in 0..4 {
                            let ci = _mm256_broadcast_ss(&*cp.add(i.min(rows - 1)));
                            acc[2 * i] = _mm256_fmadd_ps(ci, w0, acc[2 * i]);
                            acc[2 * i + 1] = _mm256_fmadd_ps(ci, w1, acc[2 * i + 1]);
                        }
                    }
                    // Rows past the end repeat the last row: only the real ones are stored.
                    for i in 0..rows {
                        _mm256_storeu_ps(op[i].add(col), acc[2 * i]);
                        _mm256_storeu_ps(op[i].add(col + 8), acc[2 * i + 1]);
                    }
                    col += 16;
                }
                for i in 0..rows {
                    for col in wide..n {
                        let o = &mut *op[i].add(col);
                        for q in 0..qs {
                            *o = c[q * ps + p + i].mul_add(w[q * n + col], *o);
                        }
                    }
                }
            }
            p += rows;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64).map(|i| (crate::seed::splitmix64(seed.wrapping_add(i)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0).collect()
    }

    /// The vector build gives every element the same chain of fused multiply-adds as the
    /// portable loop: equal bit for bit, over row counts and widths that leave remainders.
    #[test]
    fn accumulate_equals_the_plain_loop_bit_for_bit() {
        for (qs, ps, n) in [(8, 16, 576), (16, 8, 40), (3, 5, 17), (1, 1, 1), (8, 7, 1536)] {
            let (c, w, start) = (values(qs * ps, 1), values(qs * n, 2), values(ps * n, 3));
            let mut fast = start.clone();
            accumulate(&c, qs, ps, &w, n, &mut fast);
            let mut plain = start;
            accumulate_plain(&c, qs, ps, &w, n, &mut plain);
            assert!(fast.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()), "qs {qs} ps {ps} n {n}");
        }
    }

    /// The same outputs and gradients, bit for bit, on pools of 1 and 3 threads: the rows'
    /// partial gradients are summed per fixed chunk, whoever runs it.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (rows, k, n, r) = (300, 64, 48, 8);
        let (x, a, bt, dy) = (values(rows * k, 11), values(r * k, 12), values(r * n, 13), values(rows * n, 14));
        let f = Factors { a: &a, bt: &bt, r, k, n, scale: 0.5 };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut y = values(rows * n, 15);
                let u = forward(&x, &f, None, &mut y).unwrap();
                let mut dx = values(rows * k, 16);
                let g = backward(&x, &u, &dy, &f, None, &mut dx).unwrap();
                [y, u, dx, g.a, g.b].map(|v| v.iter().map(|e| e.to_bits()).collect::<Vec<u32>>())
            })
        };
        assert_eq!(run(1), run(3));
    }

    /// Forward and backward against the products written out in f64, with and without a mask,
    /// over row counts that leave partial blocks and chunks, ks that are not multiples of 64
    /// (blocks of 64 rows when k is odd), and no rows at all.
    #[test]
    fn products_match_the_definitions() {
        let shapes =
            [(300, 576, 192, false), (300, 576, 192, true), (37, 24, 40, true), (5, 7, 3, false), (70, 7, 3, true), (0, 6, 4, true)];
        for (rows, k, n, masked) in shapes {
            let r = 8;
            let (x, a, bt, dy) = (values(rows * k, 4), values(r * k, 5), values(r * n, 6), values(rows * n, 7));
            let s = 2.0f32;
            let keep = |i: usize| !crate::seed::splitmix64(i as u64 + 99).is_multiple_of(5);
            let mask_fn = |first: usize, x: &[f32], out: &mut [f32]| {
                assert_eq!(first % 64, 0, "a block starts inside a mask word");
                for (j, (o, v)) in out.iter_mut().zip(x).enumerate() {
                    *o = if keep(first + j) { v * 1.25 } else { 0.0 };
                }
            };
            let mask: Option<Mask> = if masked { Some(&mask_fn) } else { None };
            let m = |i: usize| {
                if !masked {
                    1.0
                } else if keep(i) {
                    1.25
                } else {
                    0.0
                }
            };
            let f = Factors { a: &a, bt: &bt, r, k, n, scale: s };
            let y0 = values(rows * n, 8);
            let mut y = y0.clone();
            let u = forward(&x, &f, mask, &mut y).unwrap();
            let dx0 = values(rows * k, 9);
            let mut dx = dx0.clone();
            let grads = backward(&x, &u, &dy, &f, mask, &mut dx).unwrap();
            // The definitions in f64.
            let xm: Vec<f64> = (0..rows * k).map(|i| x[i] as f64 * m(i)).collect();
            let uu: Vec<f64> = (0..rows * r).map(|e| (0..k).map(|j| xm[e / r * k + j] * a[e % r * k + j] as f64).sum()).collect();
            let g: Vec<f64> = (0..rows * r)
                .map(|e| s as f64 * (0..n).map(|o| dy[e / r * n + o] as f64 * bt[e % r * n + o] as f64).sum::<f64>())
                .collect();
            let close = |got: f32, want: f64, what: &str| {
                assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "{what}: {got} against {want}")
            };
            for e in 0..rows * r {
                close(u[e], uu[e], "u");
            }
            for e in 0..rows * n {
                let want = y0[e] as f64 + s as f64 * (0..r).map(|j| uu[e / n * r + j] * bt[j * n + e % n] as f64).sum::<f64>();
                close(y[e], want, "y");
            }
            for e in 0..rows * k {
                let want = dx0[e] as f64 + m(e) * (0..r).map(|j| g[e / k * r + j] * a[j * k + e % k] as f64).sum::<f64>();
                close(dx[e], want, "dx");
            }
            for e in 0..r * k {
                let want: f64 = (0..rows).map(|i| g[i * r + e / k] * xm[i * k + e % k]).sum();
                close(grads.a[e], want, "dA");
            }
            for e in 0..n * r {
                let want: f64 = (0..rows).map(|i| dy[i * n + e / r] as f64 * s as f64 * uu[i * r + e % r]).sum();
                close(grads.b[e], want, "dB");
            }
        }
    }
}
