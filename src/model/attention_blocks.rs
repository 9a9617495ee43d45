//! The backward of training's causal attention for f32 on the CPU, in blocks of queries that
//! each multiply only by the keys they can see.
//!
//! Over the full square of queries and keys, the backward's five products (the recomputed
//! scores, dP = dO Vᵀ, dQ = dS K, dV = Pᵀ dO, dK = dSᵀ Q) cost twice what causality needs, and
//! in SFT's 1,024-token windows they are a quarter of the FLOPs. Here a block of `block`
//! queries (rows `r0..r1`) multiplies by the keys `0..past + r1` only, and a block of keys by
//! the queries that see it; the masked entries inside the diagonal block are zero, as in the
//! full square. The products go through the gemm crate's kernel on strided views of q, k, v and
//! dy ([`super::gemm_views`]), so nothing is copied, and each block of every output is written
//! by one task in a fixed order, so the result does not depend on the number of threads.
//!
//! The forward stays the fused inference kernel ([`super::attention_cpu`]): the same blocks'
//! scores and `P V` through the GEMM ran 2% slower over SFT steps (twenty-ninth session).

use rayon::prelude::*;

use super::attention_cpu::kernels;
use super::gemm_views::{Shared, product, unwritten};

/// Queries per block: the products of a block stay large enough for the GEMM's kernel, and the
/// masked upper halves of the diagonal blocks are 1/32 of a 1,024-token window's square.
pub(crate) const BLOCK: usize = 64;

/// The shape of one attention call: q is (b, h, t, d), k and v (b, kv, l, d), dy (b, t, h·d);
/// query i sits at position `l − t + i`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub h: usize,
    pub kv: usize,
    pub t: usize,
    pub l: usize,
    pub d: usize,
}

impl Dims {
    fn past(&self) -> usize {
        self.l - self.t
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// Row b's keys and values of the KV head that query head hh reads, from key 0 on.
    fn kv_rows<'a>(&self, k: &'a [f32], v: &'a [f32], bi: usize, hh: usize) -> (&'a [f32], &'a [f32]) {
        let base = (bi * self.kv + hh / (self.h / self.kv)) * self.l * self.d;
        (&k[base..], &v[base..])
    }

    /// The shapes and lengths every caller guarantees (custom ops check their inputs).
    fn check(&self, q: &[f32], k: &[f32], v: &[f32], pads: &[usize], block: usize) {
        let Dims { b, h, kv, t, l, d } = *self;
        assert!(block > 0 && kv > 0 && h % kv == 0 && l >= t && pads.len() == b, "blocked attention: bad shape {self:?}");
        assert!(q.len() == b * h * t * d && k.len() == b * kv * l * d && v.len() == k.len(), "blocked attention: lengths for {self:?}");
    }
}

/// f32 storage that is not zeroed: every region is written before it is read, and all access
/// goes through the raw pointer, so no reference to an unwritten value is ever made.
struct Unzeroed {
    buf: Vec<f32>,
    len: usize,
}

impl Unzeroed {
    fn new(len: usize) -> Self {
        Unzeroed { buf: unwritten(len), len }
    }

    fn at(&mut self) -> Shared {
        Shared(self.buf.as_mut_ptr())
    }

    /// The values, once every one of them has been written.
    ///
    /// # Safety
    /// Each of the `len` elements must have been written.
    unsafe fn written(mut self) -> Vec<f32> {
        // SAFETY: the caller's contract.
        unsafe { self.buf.set_len(self.len) };
        self.buf
    }
}

/// The probabilities of `rows` queries (rows r0.. of one head, `q` at the first) over keys
/// `0..keys`, written at `p` with row stride `p_stride`: the scaled scores Q Kᵀ through the
/// GEMM, then each row's softmax over the keys it sees, 0 elsewhere.
///
/// # Safety
/// p must be valid for writes of `rows` rows of `keys` values at row stride `p_stride`.
unsafe fn probabilities(
    dims: Dims,
    q: &[f32],
    k: &[f32],
    (pad, r0, rows, keys): (usize, usize, usize, usize),
    p: *mut f32,
    p_stride: usize,
) {
    let d = dims.d;
    // SAFETY: the caller's contract for p; q holds rows × d, k holds keys rows of d.
    unsafe {
        product(rows, keys, d, (p, p_stride), (q.as_ptr(), 1, d), (k.as_ptr(), d, 1), false, dims.scale());
    }
    for i in 0..rows {
        let pos = dims.past() + r0 + i;
        let first = if pos < pad { pos } else { pad };
        // SAFETY: the product just wrote these keys of row i.
        let row = unsafe { std::slice::from_raw_parts_mut(p.add(i * p_stride), keys) };
        masked_softmax(row, first, pos);
    }
}

/// (dq (b, h, t, d), dk (b, kv, l, d), dv (b, kv, l, d)) of causal attention for the output
/// gradient dy, with the probabilities recomputed. Query i of row b sees keys
/// `pads[b]..=` its position, or only itself when it is a padding position (before `pads[b]`).
pub(crate) fn causal_attention_grads(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dy: &[f32],
    dims: Dims,
    pads: &[usize],
    block: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, h, kv, t, l, d } = dims;
    dims.check(q, k, v, pads, block);
    assert_eq!(dy.len(), q.len(), "blocked attention: dy for {dims:?}");
    if t == 0 || d == 0 {
        return (vec![0f32; b * h * t * d], vec![0f32; b * kv * l * d], vec![0f32; b * kv * l * d]);
    }
    let (past, group, scale) = (dims.past(), h / kv, dims.scale());
    // Probabilities and score gradients of every head, (b, h, t, l): only the causal blocks
    // are written, and only they are read. None of the five buffers is zeroed first (for a
    // 1,024-token window, p and ds are 38 MB each per layer).
    let (mut p, mut ds) = (Unzeroed::new(b * h * t * l), Unzeroed::new(b * h * t * l));
    let mut dq = Unzeroed::new(b * h * t * d);
    let (mut dk, mut dv) = (Unzeroed::new(b * kv * l * d), Unzeroed::new(b * kv * l * d));
    let (pp, dsp, dqp, dkp, dvp) = (p.at(), ds.at(), dq.at(), dk.at(), dv.at());

    // Query blocks: the scores, the probabilities, dS and dQ of rows r0..r0 + rows of one
    // head, the largest blocks (the last queries see the most keys) first, for the balance.
    let mut query_blocks: Vec<(usize, usize)> = (0..b * h).flat_map(|head| (0..t).step_by(block).map(move |r0| (head, r0))).collect();
    query_blocks.sort_by_key(|&(_, r0)| std::cmp::Reverse(r0));
    query_blocks.into_par_iter().for_each(|(head, r0)| {
        let (bi, hh) = (head / h, head % h);
        let rows = block.min(t - r0);
        let keys = past + r0 + rows;
        let (kb, vb) = dims.kv_rows(k, v, bi, hh);
        let (pb, dsb, dqb) = (pp.at((head * t + r0) * l), dsp.at((head * t + r0) * l), dqp.at((head * t + r0) * d));
        let dyb = &dy[((bi * t + r0) * h + hh) * d..];
        // SAFETY: this task alone writes rows r0..r0 + rows of this head in p, ds and dq;
        // keys ≤ l, and the views of q, k, v and dy lie inside their slices.
        unsafe {
            probabilities(dims, &q[(head * t + r0) * d..], kb, (pads[bi], r0, rows, keys), pb, l);
            // dP = dO Vᵀ, into ds.
            product(rows, keys, d, (dsb, l), (dyb.as_ptr(), 1, h * d), (vb.as_ptr(), d, 1), false, 1.0);
            for i in 0..rows {
                let p_row = std::slice::from_raw_parts(pb.add(i * l), keys);
                softmax_backward(p_row, std::slice::from_raw_parts_mut(dsb.add(i * l), keys));
            }
            // dQ = scale · dS K.
            product(rows, d, keys, (dqb, d), (dsb, 1, l), (kb.as_ptr(), 1, d), false, scale);
        }
    });

    // Key blocks: dV and dK of keys k0..k0 + keys of one KV head, from the queries that see
    // them (rows r0.. of every head of its group). Every query sees the keys the first query
    // block sees (the past, then its own), so those blocks read every row; after them, block c
    // holds the keys that query block c sees first.
    let first_keys = past + block.min(t);
    let mut key_blocks: Vec<(usize, usize, usize)> = Vec::new();
    for kv_head in 0..b * kv {
        key_blocks.extend((0..first_keys).step_by(block).map(|k0| (kv_head, 0, k0)));
        key_blocks.extend((first_keys..l).step_by(block).enumerate().map(|(c, k0)| (kv_head, (c + 1) * block, k0)));
    }
    key_blocks.into_par_iter().for_each(|(kv_head, r0, k0)| {
        let (bi, g0) = (kv_head / kv, (kv_head % kv) * group);
        let end = if k0 < first_keys { first_keys } else { l };
        let (keys, rows) = (block.min(end - k0), t - r0);
        let (dkb, dvb) = (dkp.at((kv_head * l + k0) * d), dvp.at((kv_head * l + k0) * d));
        for hh in g0..g0 + group {
            let head = bi * h + hh;
            let (pb, dsb) = (pp.at((head * t + r0) * l + k0), dsp.at((head * t + r0) * l + k0));
            let qb = &q[(head * t + r0) * d..];
            let dyb = &dy[((bi * t + r0) * h + hh) * d..];
            let accumulate = hh > g0;
            // SAFETY: Pᵀ and dSᵀ read rows r0..t, keys k0..k0 + keys of p and ds, written by
            // the query blocks of rows r0 and after (all see those keys) before this loop; this
            // task alone writes its keys of dk and dv, the group's first head without reading.
            unsafe {
                // dV = Pᵀ dO, summed over the group's heads.
                product(keys, d, rows, (dvb, d), (pb, l, 1), (dyb.as_ptr(), 1, h * d), accumulate, 1.0);
                // dK = scale · dSᵀ Q.
                product(keys, d, rows, (dkb, d), (dsb, l, 1), (qb.as_ptr(), 1, d), accumulate, scale);
            }
        }
    });
    // SAFETY: the query blocks cover every row of dq, and the key blocks every key of dk and dv.
    unsafe { (dq.written(), dk.written(), dv.written()) }
}

/// The row's probabilities in place from its scaled scores: keys `first..=last` share the
/// softmax, every other key gets exactly 0.
fn masked_softmax(s: &mut [f32], first: usize, last: usize) {
    s[..first].fill(0.0);
    s[last + 1..].fill(0.0);
    let seen = &mut s[first..=last];
    let inv = 1.0 / kernels::exp_normalize(seen);
    seen.iter_mut().for_each(|x| *x *= inv);
}

/// The softmax's backward for one row, in place in dp: `ds = p ⊙ (dp − Σ_j p_j dp_j)`.
fn softmax_backward(p: &[f32], dp: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { softmax_backward_avx2(p, dp) };
        }
    }
    softmax_backward_plain(p, dp)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_backward_avx2(p: &[f32], dp: &mut [f32]) {
    softmax_backward_plain(p, dp)
}

/// Eight partial sums, so the loop vectorises.
#[inline(always)]
fn softmax_backward_plain(p: &[f32], dp: &mut [f32]) {
    let mut lanes = [0f32; 8];
    for (a, b) in p.chunks_exact(8).zip(dp.chunks_exact(8)) {
        for j in 0..8 {
            lanes[j] += a[j] * b[j];
        }
    }
    let tail = p.len() / 8 * 8;
    let dot = lanes.iter().sum::<f32>() + p[tail..].iter().zip(&dp[tail..]).map(|(a, b)| a * b).sum::<f32>();
    dp.iter_mut().zip(p).for_each(|(x, pj)| *x = pj * (*x - dot));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// The gradients written out over each query's keys, in f64.
    fn reference(q: &[f32], k: &[f32], v: &[f32], dy: &[f32], dims: Dims, pads: &[usize]) -> [Vec<f64>; 3] {
        let Dims { b, h, kv, t, l, d } = dims;
        let (past, group, scale) = (l - t, h / kv, 1.0 / (d as f64).sqrt());
        let (mut dq, mut dk, mut dv) = (vec![0f64; q.len()], vec![0f64; k.len()], vec![0f64; v.len()]);
        for (bi, &pad) in pads.iter().enumerate().take(b) {
            for hh in 0..h {
                let kv_row = |j: usize| ((bi * kv + hh / group) * l + j) * d;
                for i in 0..t {
                    let (pos, qi, oi) = (past + i, ((bi * h + hh) * t + i) * d, ((bi * t + i) * h + hh) * d);
                    let seen: Vec<usize> = if pos < pad { vec![pos] } else { (pad..=pos).collect() };
                    let dot = |a: &[f32], x: usize, y: usize| (0..d).map(|e| f64::from(a[x + e]) * f64::from(dy[y + e])).sum::<f64>();
                    let s: Vec<f64> = seen
                        .iter()
                        .map(|&j| scale * (0..d).map(|e| f64::from(q[qi + e]) * f64::from(k[kv_row(j) + e])).sum::<f64>())
                        .collect();
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    let p: Vec<f64> = s.iter().map(|x| (x - max).exp() / sum).collect();
                    let dp: Vec<f64> = seen.iter().map(|&j| dot(v, kv_row(j), oi)).collect();
                    let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for (n, &j) in seen.iter().enumerate() {
                        let ds = p[n] * (dp[n] - pdp);
                        for e in 0..d {
                            dq[qi + e] += scale * ds * f64::from(k[kv_row(j) + e]);
                            dk[kv_row(j) + e] += scale * ds * f64::from(q[qi + e]);
                            dv[kv_row(j) + e] += p[n] * f64::from(dy[oi + e]);
                        }
                    }
                }
            }
        }
        [dq, dk, dv]
    }

    /// Blocks of 1 to more than the queries, with a past, GQA, rows left-padded inside and
    /// beyond the past, and queries that do not fill the last block: the gradients of the
    /// written-out sums.
    #[test]
    fn blocks_match_the_written_out_gradients() {
        for (dims, pads) in [
            (Dims { b: 2, h: 6, kv: 2, t: 13, l: 17, d: 8 }, vec![0, 6]),
            (Dims { b: 2, h: 4, kv: 2, t: 7, l: 12, d: 8 }, vec![2, 9]),
            (Dims { b: 1, h: 4, kv: 4, t: 9, l: 9, d: 5 }, vec![0]),
            (Dims { b: 1, h: 2, kv: 1, t: 1, l: 3, d: 4 }, vec![0]),
        ] {
            let Dims { b, h, kv, t, l, d } = dims;
            let (q, dy) = (values(1, b * h * t * d), values(2, b * h * t * d));
            let (k, v) = (values(3, b * kv * l * d), values(4, b * kv * l * d));
            let want = reference(&q, &k, &v, &dy, dims, &pads);
            for block in [1, 4, 5, 13, BLOCK] {
                let (dq, dk, dv) = causal_attention_grads(&q, &k, &v, &dy, dims, &pads, block);
                for (name, got, want) in [("dq", &dq, &want[0]), ("dk", &dk, &want[1]), ("dv", &dv, &want[2])] {
                    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
                        assert!(
                            (f64::from(a) - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "{dims:?} block {block}: {name}[{i}] = {a} against {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let dims = Dims { b: 2, h: 6, kv: 2, t: 150, l: 180, d: 16 };
        let (q, dy) = (values(5, 2 * 6 * 150 * 16), values(6, 2 * 6 * 150 * 16));
        let (k, v) = (values(7, 2 * 2 * 180 * 16), values(8, 2 * 2 * 180 * 16));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| causal_attention_grads(&q, &k, &v, &dy, dims, &[0, 12], 32))
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn softmax_backward_isas_agree_bit_for_bit() {
        let (p, dp) = (values(9, 77), values(10, 77));
        let mut want = dp.clone();
        softmax_backward_plain(&p, &mut want);
        let mut got = dp.clone();
        softmax_backward(&p, &mut got);
        assert_eq!(got, want);
    }

    #[test]
    fn no_queries_give_zero_gradients() {
        let dims = Dims { b: 1, h: 2, kv: 1, t: 0, l: 3, d: 4 };
        let (dq, dk, dv) = causal_attention_grads(&[], &values(1, 12), &values(2, 12), &[], dims, &[0], BLOCK);
        assert!(dq.is_empty() && dk.iter().chain(&dv).all(|&x| x == 0.0));
    }
}
