//! Fused causal attention for inference on the CPU (no gradients): scores, masking, softmax and
//! the weighted sum of values in one pass per query, skipping the masked keys entirely instead
//! of materialising a (heads, T, keys) score tensor and a mask. Used for prefill and decoding,
//! and as the forward pass of the training attention node, whose f32 backward pass is in
//! [`super::attention_blocks`] (it recomputes the probabilities, with this module's softmax).

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

/// Whether [`causal_attention`] runs on this device and dtype.
pub fn supported(device: &Device, dtype: DType) -> bool {
    matches!(device, Device::Cpu) && dtype == DType::F32
}

/// A borrowed f32 CPU tensor with its strides.
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    stride: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading a shared prefix in place equals attending over it copied into every row: rows
    /// of different prompts, left padding in the prefix, one query (decoding) or several.
    #[test]
    fn shared_prefix_equals_copied_keys() {
        let dev = Device::Cpu;
        let (kv, group, d, plen) = (2, 3, 64, 7);
        let pk = Tensor::randn(0f32, 1.0, (2, kv, plen, d), &dev).unwrap();
        let pv = Tensor::randn(0f32, 1.0, (2, kv, plen, d), &dev).unwrap();
        let of_row = [1usize, 0, 1];
        let pads = [2usize, 0, 2];
        for (own, t) in [(1, 1), (4, 1), (5, 3)] {
            let b = of_row.len();
            let q = Tensor::randn(0f32, 1.0, (b, kv * group, t, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, kv, own, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, kv, own, d), &dev).unwrap();
            let idx = Tensor::new(of_row.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev).unwrap();
            let kf = Tensor::cat(&[&pk.index_select(&idx, 0).unwrap(), &k], 2).unwrap();
            let vf = Tensor::cat(&[&pv.index_select(&idx, 0).unwrap(), &v], 2).unwrap();
            let want = causal_attention(&q, &kf, &vf, &pads).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let prefix = SharedKv { k: &pk, v: &pv, of_row: &of_row };
            let got =
                causal_attention_with_prefix(&q, Some(prefix), &k, &v, &pads).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() < 1e-5, "own {own}, t {t}: {a} vs {b}");
            }
        }
        let bad = SharedKv { k: &pk, v: &pv, of_row: &[2, 0, 1] };
        let q = Tensor::zeros((3, kv * group, 1, d), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((3, kv, 1, d), DType::F32, &dev).unwrap();
        assert!(causal_attention_with_prefix(&q, Some(bad), &k, &k, &pads).is_err());
    }

    /// `n` values in [-0.5, 0.5) from a counter-based stream (`seed` advances by n).
    fn uniform_values(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed += 1;
                (crate::seed::splitmix64(*seed) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The decoding scores (a group's queries against key rows as stored) equal the plain
    /// loop's, one query at a time, bit for bit on this CPU's build: whole blocks of 8 keys, a
    /// remainder, head sizes the vector build declines (not a multiple of 8), scores written
    /// into wider rows and nothing outside them.
    #[test]
    fn dot_scores_equal_the_plain_loop_bit_for_bit() {
        let mut seed = 3u64;
        let mut rand = |n: usize| uniform_values(&mut seed, n);
        for d in [64usize, 128, 48, 8, 40] {
            for n in [1usize, 7, 8, 9, 16, 31, 100] {
                for heads in [1usize, 3] {
                    // Scores into the middle of rows wider than the keys, as for a prefix's keys.
                    let (stride, s_stride, col) = (d + 3, n + 5, 2);
                    let (q, keys) = (rand(heads * d), rand(n * stride));
                    let (mut got, mut want) = (vec![7f32; heads * s_stride], vec![7f32; heads * s_stride]);
                    kernels::dot_scores(&q, d, &keys, stride, n, &mut got[col..], s_stride, 0.125);
                    for (r, qr) in q.chunks_exact(d).enumerate() {
                        kernels::dot_scores_plain(qr, &keys, stride, &mut want[r * s_stride + col..r * s_stride + col + n], 0.125);
                    }
                    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "d {d} n {n}: {got:?} against {want:?}");
                }
            }
        }
        // A zero product summed alone keeps the plain loop's sign.
        let (q, keys) = (vec![-0.0f32; 8], vec![0.0f32; 8 * 8]);
        let (mut got, mut want) = (vec![1f32; 8], vec![1f32; 8]);
        kernels::dot_scores(&q, 8, &keys, 8, 8, &mut got, 8, 1.0);
        kernels::dot_scores_plain(&q, &keys, 8, &mut want, 1.0);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{got:?} against {want:?}");
    }

    /// Scores and weighted sums of several heads at once equal one head at a time, and every
    /// instruction set this CPU has gives the portable build's results, bit for bit: block
    /// ends under lane masks, head sizes the intrinsics skip (48), groups of 5 to 9 heads.
    #[test]
    fn attention_isas_agree_bit_for_bit() {
        use kernels::{Isa, Probs};
        let mut seed = 7u64;
        let mut rand = |n: usize| uniform_values(&mut seed, n);
        let isas = Isa::available();
        assert_eq!(isas.last(), Some(&Isa::Portable));
        for d in [64usize, 128, 48] {
            for (keys, first) in [(1usize, 0usize), (9, 0), (40, 3), (101, 30)] {
                let n = keys - first;
                let (kt, v) = (rand(d * keys), rand((keys + 1) * d));
                for rows in [1, 2, 3, 4, 5, 7, 9] {
                    let q = rand(rows * d);
                    let mut want = vec![0f32; rows * n];
                    for (qr, sr) in q.chunks_exact(d).zip(want.chunks_exact_mut(n)) {
                        kernels::scores(Isa::Portable, 1, qr, &kt, keys, first, sr, 0.125);
                    }
                    let sums: Vec<f32> = (0..rows).map(|r| 1.5 + r as f32).collect();
                    let mut want_o = vec![0f32; rows * d];
                    for r in 0..rows {
                        let one = Probs { p: &want[r * n..], stride: n, sums: &sums[r..r + 1] };
                        kernels::weighted_sum(Isa::Portable, &one, 1.min(n)..n, &v, d, d, &mut want_o[r * d..(r + 1) * d]);
                    }
                    for &isa in &isas {
                        let mut s = vec![0f32; rows * n];
                        kernels::scores(isa, rows, &q, &kt, keys, first, &mut s, 0.125);
                        assert!(s.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "scores {isa:?} d {d} n {n} rows {rows}");
                        let mut o = vec![0f32; rows * d];
                        kernels::weighted_sum(isa, &Probs { p: &want, stride: n, sums: &sums }, 1.min(n)..n, &v, d, d, &mut o);
                        assert!(
                            o.iter().zip(&want_o).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "weighted sum {isa:?} d {d} n {n} rows {rows}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate_on_softmax_inputs() {
        for i in 0..=20_000 {
            let x = -(i as f32) * 0.005; // 0 down to -100
            let (got, want) = (kernels::exp(x), x.exp());
            assert!((got - want).abs() <= 5e-6 * want + 1.2e-38, "exp({x}) = {got}, want {want}");
        }
    }

    /// Each build's softmax exps give the portable build's bits: lengths around the 8- and
    /// 16-lane chunks and [`kernels::exp_sum`]'s blocks of 64, with masked (-inf) and very small
    /// entries.
    #[test]
    fn exp_isas_agree_bit_for_bit() {
        use kernels::{Isa, exp_normalize_on, exp_scaled_on, exp_sum_on};
        let mut seed = 11u64;
        let isas = Isa::available();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut rows: Vec<Vec<f32>> = (0..=40)
            .chain([63, 64, 65, 100, 129, 1000])
            .map(|len| {
                let mut s: Vec<f32> = uniform_values(&mut seed, len).iter().map(|x| x * 30.0).collect();
                for (i, x) in s.iter_mut().enumerate() {
                    match i % 11 {
                        3 => *x = f32::NEG_INFINITY,
                        7 => *x -= 120.0,
                        9 => *x = f32::NAN,
                        _ => {}
                    }
                }
                s
            })
            .collect();
        // A fully masked row: its max is -inf, so every exp is of NaN.
        rows.push(vec![f32::NEG_INFINITY; 37]);
        for s in rows {
            let len = s.len();
            let shift = s.iter().copied().fold(0f32, f32::max);
            let mut want = s.clone();
            let want_sum = exp_normalize_on(Isa::Portable, &mut want);
            let want_total = exp_sum_on(Isa::Portable, &s, shift);
            let mut want_scaled = s.clone();
            exp_scaled_on(Isa::Portable, &mut want_scaled, shift, -0.75);
            for &isa in &isas {
                let mut got = s.clone();
                assert_eq!(exp_normalize_on(isa, &mut got).to_bits(), want_sum.to_bits(), "{isa:?} sum of {len}");
                assert_eq!(bits(&got), bits(&want), "{isa:?} exps of {len}");
                assert_eq!(exp_sum_on(isa, &s, shift).to_bits(), want_total.to_bits(), "{isa:?} exp_sum of {len}");
                let mut scaled = s.clone();
                exp_scaled_on(isa, &mut scaled, shift, -0.75);
                assert_eq!(bits(&scaled), bits(&want_scaled), "{isa:?} exp_scaled of {len}");
            }
        }
    }

    #[test]
    fn exp_normalize_matches_softmax() {
        let mut s: Vec<f32> = (0..37).map(|i| ((i * 7919) % 23) as f32 * 0.37 - 3.0).collect();
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
        let sum = kernels::exp_normalize(&mut s);
        assert!((sum - want.iter().sum::<f32>()).abs() < 1e-5);
        for (g, w) in s.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6);
        }
    }
}

/// Views of f32 CPU tensors, `None` if any is not one. The storage guards live in `f`'s frame.
fn with_views<R>(ts: &[&Tensor], f: impl FnOnce(Option<Vec<View>>) -> R) -> R {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let views = guards
        .iter()
        .map(|(storage, layout): &(_, &Layout)| match &**storage {
            Storage::Cpu(CpuStorage::F32(data)) => Some(View { data, offset: layout.start_offset(), stride: layout.stride().to_vec() }),
            _ => None,
        })
        .collect();
    f(views)
}

/// Keys and values several rows share (a prompt's prefill read by its G samples):
/// (prompts, KV, P, D), row b reading prompt `of_row[b]` at positions `0..P`.
pub struct SharedKv<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub of_row: &'a [usize],
}

/// Attention of q (B, H, T, D) over k, v (B, KV, L, D) (views into the cache are fine), with
/// query i of row b at absolute position `L - T + i` seeing keys `pads[b]..=` its position.
/// Returns (B, T, H * D). Only for f32 CPU tensors (see [`supported`]).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[usize]) -> candle_core::Result<Tensor> {
    causal_attention_with_prefix(q, None, k, v, pads)
}

/// [`causal_attention`] where row b's keys are its shared prefix's P positions followed by its
/// own L: absolute positions `0..P + L`, the prefix read in place (not copied per row), so the
/// G rows of one prompt stream its keys and values from memory once.
pub fn causal_attention_with_prefix(
    q: &Tensor,
    prefix: Option<SharedKv>,
    k: &Tensor,
    v: &Tensor,
    pads: &[usize],
) -> candle_core::Result<Tensor> {
    if !supported(q.device(), q.dtype()) {
        candle_core::bail!("fused CPU attention needs f32 CPU tensors");
    }
    let (b, h, t, d) = q.dims4()?;
    let (_, kv, own, _) = k.dims4()?;
    let (plen, of_row) = match &prefix {
        Some(p) => {
            let (prompts, pkv, plen, pd) = p.k.dims4()?;
            if pkv != kv
                || pd != d
                || p.v.dims4()? != (prompts, kv, plen, d)
                || p.of_row.len() != b
                || p.of_row.iter().any(|&r| r >= prompts)
            {
                candle_core::bail!("shared prefix does not fit the rows' keys");
            }
            (plen, p.of_row)
        }
        None => (0, &[][..]),
    };
    let l = plen + own;
    let group = h / kv;
    let past = l - t;
    let scale = 1.0 / (d as f32).sqrt();
    let qs = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    // Work items: (row, kv head, block of queries); many blocks so threads balance causal work.
    let q_block = t.div_ceil(8).max(1);
    let items: Vec<(usize, usize, usize)> =
        (0..b).flat_map(|bi| (0..kv).flat_map(move |g| (0..t).step_by(q_block).map(move |i0| (bi, g, i0)))).collect();
    let mut tensors = vec![k, v];
    if let Some(p) = &prefix {
        tensors.extend([p.k, p.v]);
    }
    let results = with_views(&tensors, |views| {
        let views = views?;
        if views.iter().any(|view| view.stride[3] != 1) {
            return None;
        }
        let (kview, vview) = (&views[0], &views[1]);
        // Position j of row b, head g: its key row in the prefix (j < plen) or the row's own.
        let key_at = |view_own: &View, view_prefix: Option<&View>, bi: usize, g: usize, j: usize| -> (usize, usize) {
            match view_prefix {
                Some(pv) if j < plen => (pv.offset + of_row[bi] * pv.stride[0] + g * pv.stride[1] + j * pv.stride[2], pv.stride[2]),
                _ => (
                    view_own.offset + bi * view_own.stride[0] + g * view_own.stride[1] + (j - plen) * view_own.stride[2],
                    view_own.stride[2],
                ),
            }
        };
        let (pk, pv) = (views.get(2), views.get(3));
        // Prefill: K of each (row, kv head), transposed once to (D, L), so scores for many keys
        // become broadcast multiply-adds over contiguous memory. Decoding (one query per head)
        // reads K once as it is: a transpose would cost more than it saves.
        // With a shared prefix, its keys are the first columns.
        let transpose = t > 1;
        let isa = kernels::Isa::detect();
        let kts: Vec<Vec<f32>> = (0..if transpose { b * kv } else { 0 })
            .into_par_iter()
            .map(|bg| {
                let (bi, g) = (bg / kv, bg % kv);
                let mut kt = vec![0f32; d * l];
                if let Some(pview) = pk.filter(|_| plen > 0) {
                    let (at, stride) = key_at(kview, Some(pview), bi, g, 0);
                    transpose_rows_into(pview.data, at, stride, plen, d, &mut kt, l, 0);
                }
                let (at, stride) = key_at(kview, None, bi, g, plen);
                transpose_rows_into(kview.data, at, stride, own, d, &mut kt, l, plen);
                kt
            })
            .collect();
        Some(
            items
                .par_iter()
                .map(|&(bi, g, i0)| {
                    let i1 = (i0 + q_block).min(t);
                    let mut out = vec![0f32; (i1 - i0) * group * d];
                    // The group's heads see the same keys: their query rows and scores sit
                    // together (head-major), so each key and value row loaded serves them all.
                    let mut qg = vec![0f32; group * d];
                    let mut scores = vec![0f32; group * (past + i1)];
                    let mut sums = vec![0f32; group];
                    let mut part = vec![0f32; group * d];
                    for i in i0..i1 {
                        let pos = past + i;
                        let (first, last) = if pos < pads[bi] { (pos, pos) } else { (pads[bi], pos) };
                        // Keys first..=last: those in the prefix, then the row's own.
                        let split = plen.clamp(first, last + 1);
                        let (n_prefix, n_own, n) = (split - first, last + 1 - split, last + 1 - first);
                        for hh in 0..group {
                            let at = ((bi * h + g * group + hh) * t + i) * d;
                            qg[hh * d..(hh + 1) * d].copy_from_slice(&qs[at..at + d]);
                        }
                        let s = &mut scores[..group * n];
                        if transpose {
                            kernels::scores(isa, group, &qg, &kts[bi * kv + g], l, first, s, scale);
                        } else {
                            if n_prefix > 0 {
                                let (at, stride) = key_at(kview, pk, bi, g, first);
                                kernels::dot_scores(&qg, d, &pk.expect("prefix view").data[at..], stride, n_prefix, s, n, scale);
                            }
                            if n_own > 0 {
                                let (at, stride) = key_at(kview, None, bi, g, split);
                                kernels::dot_scores(&qg, d, &kview.data[at..], stride, n_own, &mut s[n_prefix..], n, scale);
                            }
                        }
                        for (sum, srow) in sums.iter_mut().zip(s.chunks_exact_mut(n)) {
                            *sum = kernels::exp_normalize(srow);
                        }
                        let o = &mut out[(i - i0) * group * d..(i - i0 + 1) * group * d];
                        let probs = kernels::Probs { p: s, stride: n, sums: &sums };
                        if n_prefix == 0 {
                            let (at, stride) = key_at(vview, None, bi, g, split);
                            kernels::weighted_sum(isa, &probs, 0..n, vview.data, at, stride, o);
                        } else {
                            let pview = pv.expect("prefix view");
                            let (at, stride) = key_at(vview, Some(pview), bi, g, first);
                            kernels::weighted_sum(isa, &probs, 0..n_prefix, pview.data, at, stride, o);
                            if n_own > 0 {
                                let (at, stride) = key_at(vview, None, bi, g, split);
                                kernels::weighted_sum(isa, &probs, n_prefix..n, vview.data, at, stride, &mut part);
                                o.iter_mut().zip(&part).for_each(|(y, x)| *y += x);
                            }
                        }
                    }
                    ((bi, g, i0, i1), out)
                })
                .collect::<Vec<_>>(),
        )
    });
    let Some(results) = results else { candle_core::bail!("fused CPU attention needs f32 CPU tensors with contiguous rows") };
    let mut out = vec![0f32; b * t * h * d];
    for ((bi, g, i0, i1), block) in results {
        for i in i0..i1 {
            for hh in 0..group {
                let head = g * group + hh;
                let src = &block[((i - i0) * group + hh) * d..((i - i0) * group + hh + 1) * d];
                let dst = ((bi * t + i) * h + head) * d;
                out[dst..dst + d].copy_from_slice(src);
            }
        }
    }
    Tensor::from_vec(out, (b, t, h * d), q.device())
}

/// `n` rows of `d` values (row i at `base + i * row_stride`) written as columns
/// `col0..col0 + n` of `out`, a (d, cols) row-major matrix, in blocks of 8 rows so the writes
/// stay sequential.
#[allow(clippy::too_many_arguments)]
fn transpose_rows_into(data: &[f32], base: usize, row_stride: usize, n: usize, d: usize, out: &mut [f32], cols: usize, col0: usize) {
    for j0 in (0..n).step_by(8) {
        let j1 = (j0 + 8).min(n);
        for c in 0..d {
            for j in j0..j1 {
                out[c * cols + col0 + j] = data[base + j * row_stride + c];
            }
        }
    }
}

/// The inner loops, shared with the fused training ops: the scores and weighted sums, which
/// serve the heads of a group together, and the softmax's exps, in AVX-512 and AVX2 builds
/// ([`kernels::Isa`]).
pub(crate) mod kernels {
    /// Which build of [`scores`], [`weighted_sum`] and the exps runs: the widest this CPU has.
    /// Every build sums each key's score, each output value and each exp in the same order, so
    /// all of them give the same results bit for bit (tests `attention_isas_agree_bit_for_bit`,
    /// `exp_isas_agree_bit_for_bit`). The AVX2 exps are the plain loops, which vectorise.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Isa {
        Avx512,
        Avx2,
        Portable,
    }

    impl Isa {
        /// The widest build this CPU runs (no allocation: it is asked once per attention call).
        pub fn detect() -> Isa {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    return if std::is_x86_feature_detected!("avx512f") { Isa::Avx512 } else { Isa::Avx2 };
                }
            }
            Isa::Portable
        }

        /// The builds this CPU can run, widest first (the portable one always): each build's
        /// features include the next one's.
        #[cfg(test)]
        pub fn available() -> Vec<Isa> {
            let all = [Isa::Avx512, Isa::Avx2, Isa::Portable];
            let widest = all.iter().position(|&isa| isa == Isa::detect()).unwrap_or(2);
            all[widest..].to_vec()
        }

        pub fn name(self) -> &'static str {
            match self {
                Isa::Avx512 => "avx512f",
                Isa::Avx2 => "avx2+fma",
                Isa::Portable => "portable",
            }
        }
    }

    /// Scores of `rows` query rows that see the same keys (`q`: the rows one after another, d
    /// values each; `s`: `rows` rows of n): `s[r * n + j] = scale * sum_c q_r[c] * kt[c * keys
    /// + first + j]`. Each key row loaded serves every query row.
    #[allow(clippy::too_many_arguments)]
    pub fn scores(isa: Isa, rows: usize, q: &[f32], kt: &[f32], keys: usize, first: usize, s: &mut [f32], scale: f32) {
        assert!(rows > 0, "scores of no rows");
        let (d, n) = (q.len() / rows, s.len() / rows);
        assert!(q.len() == rows * d && s.len() == rows * n, "scores: {rows} rows of {} query values and {} scores", q.len(), s.len());
        assert!(d == 0 || n == 0 || ((d - 1) * keys + first + n <= kt.len() && first + n <= keys), "scores: keys out of range");
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `isa` comes from Isa::available (the CPU has its features), and the
            // asserts above bound every key, query and score the kernels touch.
            unsafe {
                match (isa, rows) {
                    (Isa::Avx512, 1) => return x86::scores_avx512::<1>(q, kt, keys, first, s, scale),
                    (Isa::Avx512, 2) => return x86::scores_avx512::<2>(q, kt, keys, first, s, scale),
                    (Isa::Avx512, 3) => return x86::scores_avx512::<3>(q, kt, keys, first, s, scale),
                    (Isa::Avx512, 4) => return x86::scores_avx512::<4>(q, kt, keys, first, s, scale),
                    (Isa::Avx2, 1) => return x86::scores_avx2::<1>(q, kt, keys, first, s, scale),
                    (Isa::Avx2, 2) => return x86::scores_avx2::<2>(q, kt, keys, first, s, scale),
                    (Isa::Avx2, 3) => return x86::scores_avx2::<3>(q, kt, keys, first, s, scale),
                    (Isa::Avx2, 4) => return x86::scores_avx2::<4>(q, kt, keys, first, s, scale),
                    _ => {}
                }
            }
        }
        if rows > 4 && isa != Isa::Portable {
            // Blocks of at most 4 rows (models with larger groups), each in the wide build.
            for r0 in (0..rows).step_by(4) {
                let r1 = (r0 + 4).min(rows);
                scores(isa, r1 - r0, &q[r0 * d..r1 * d], kt, keys, first, &mut s[r0 * n..r1 * n], scale);
            }
            return;
        }
        for (qr, sr) in q.chunks_exact(d.max(1)).zip(s.chunks_exact_mut(n.max(1))) {
            scores_plain(qr, kt, keys, first, sr, scale)
        }
    }

    /// Blocks of 32 keys accumulate in registers across all of q's dimensions (4 independent
    /// vector chains, no stores in the inner loop).
    #[inline(always)]
    fn scores_plain(q: &[f32], kt: &[f32], keys: usize, first: usize, s: &mut [f32], scale: f32) {
        const BLOCK: usize = 32;
        let n = s.len();
        let mut j = 0;
        while j + BLOCK <= n {
            let mut acc = [0f32; BLOCK];
            for (c, qc) in q.iter().enumerate() {
                let row = &kt[c * keys + first + j..c * keys + first + j + BLOCK];
                for l in 0..BLOCK {
                    acc[l] = qc.mul_add(row[l], acc[l]);
                }
            }
            for l in 0..BLOCK {
                s[j + l] = acc[l] * scale;
            }
            j += BLOCK;
        }
        if j < n {
            let rest = &mut s[j..];
            rest.fill(0.0);
            for (c, qc) in q.iter().enumerate() {
                let row = &kt[c * keys + first + j..c * keys + first + n];
                for (x, kv) in rest.iter_mut().zip(row) {
                    *x = qc.mul_add(*kv, *x);
                }
            }
            for x in rest.iter_mut() {
                *x *= scale;
            }
        }
    }

    /// The scores of several query rows (`q`, d values each: a group's heads) against the same
    /// `keys` key rows as stored (key j at `j * stride` of `rows`): query r's score of key j,
    /// `scale * dot(q_r, key j)`, at `s[r * s_stride + j]`.
    #[allow(clippy::too_many_arguments)]
    pub fn dot_scores(q: &[f32], d: usize, rows: &[f32], stride: usize, keys: usize, s: &mut [f32], s_stride: usize, scale: f32) {
        let queries = q.len() / d.max(1);
        assert!(q.len() == queries * d && d > 0, "dot_scores: {} query values in rows of {d}", q.len());
        if queries == 0 || keys == 0 {
            return;
        }
        assert!((keys - 1) * stride + d <= rows.len(), "dot_scores: keys out of range");
        assert!((queries - 1) * s_stride + keys <= s.len(), "dot_scores: scores out of range");
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected; the bounds were asserted above.
                unsafe {
                    if std::is_x86_feature_detected!("avx512vl") {
                        dot_scores_avx512vl(q, d, rows, stride, keys, s, s_stride, scale)
                    } else {
                        dot_scores_avx2(q, d, rows, stride, keys, s, s_stride, scale)
                    }
                };
                return;
            }
        }
        for (r, qr) in q.chunks_exact(d).enumerate() {
            dot_scores_plain(qr, rows, stride, &mut s[r * s_stride..r * s_stride + keys], scale);
        }
    }

    /// [`dot_scores_plain`]'s sums in its order, eight keys at a time: each key's eight lane
    /// accumulators in one vector, the eight vectors transposed, so that adding the transposed
    /// rows in order sums each key's lanes first to last, as the scalar loop does (and no key
    /// waits on a chain of single additions). Every query row takes its turn on a block of keys
    /// while the block is in L1: the keys stream from memory once for the group's heads.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA, and the slices are as [`dot_scores`] asserts.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot_scores_avx2(q: &[f32], d: usize, rows: &[f32], stride: usize, keys: usize, s: &mut [f32], s_stride: usize, scale: f32) {
        // SAFETY: the caller's.
        unsafe { dot_scores_blocks(q, d, rows, stride, keys, s, s_stride, scale) }
    }

    /// [`dot_scores_avx2`] compiled with AVX-512VL's 32 vector registers.
    ///
    /// # Safety
    /// As [`dot_scores_avx2`], and the CPU has AVX-512F and AVX-512VL.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot_scores_avx512vl(
        q: &[f32],
        d: usize,
        rows: &[f32],
        stride: usize,
        keys: usize,
        s: &mut [f32],
        s_stride: usize,
        scale: f32,
    ) {
        // SAFETY: the caller's.
        unsafe { dot_scores_blocks(q, d, rows, stride, keys, s, s_stride, scale) }
    }

    /// The body of the two builds above, inlined into each.
    ///
    /// # Safety
    /// As [`dot_scores_avx2`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot_scores_blocks(q: &[f32], d: usize, rows: &[f32], stride: usize, keys: usize, s: &mut [f32], s_stride: usize, scale: f32) {
        use std::arch::x86_64::*;

        use crate::model::skinny::avx2::lane_sums8;
        let whole = if d.is_multiple_of(LANES) { keys - keys % LANES } else { 0 };
        // SAFETY (all intrinsics): the CPU has AVX2 and FMA; every load reads LANES floats of a
        // chunk that holds them, every store 8 scores j..j + 8 < keys of a query's row.
        unsafe {
            // What the plain loop adds for its empty tail: what a float sum starts from.
            let start = _mm256_set1_ps([0f32; 0].iter().sum::<f32>());
            let sc = _mm256_set1_ps(scale);
            for j in (0..whole).step_by(LANES) {
                let block = &rows[j * stride..(j + LANES - 1) * stride + d];
                for (r, qr) in q.chunks_exact(d).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); LANES];
                    for (key, acc) in acc.iter_mut().enumerate() {
                        let row = &block[key * stride..key * stride + d];
                        for (qc, rc) in qr.chunks_exact(LANES).zip(row.chunks_exact(LANES)) {
                            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(qc.as_ptr()), _mm256_loadu_ps(rc.as_ptr()), *acc);
                        }
                    }
                    let score = _mm256_mul_ps(_mm256_add_ps(lane_sums8(acc), start), sc);
                    _mm256_storeu_ps(s[r * s_stride + j..r * s_stride + j + LANES].as_mut_ptr(), score);
                }
            }
        }
        if whole < keys {
            for (r, qr) in q.chunks_exact(d).enumerate() {
                dot_scores_plain(qr, &rows[whole * stride..], stride, &mut s[r * s_stride + whole..r * s_stride + keys], scale);
            }
        }
    }

    #[inline(always)]
    pub(super) fn dot_scores_plain(q: &[f32], rows: &[f32], stride: usize, s: &mut [f32], scale: f32) {
        let d = q.len();
        for (j, x) in s.iter_mut().enumerate() {
            let row = &rows[j * stride..j * stride + d];
            let mut acc = [0f32; LANES];
            let mut qc = q.chunks_exact(LANES);
            let mut rc = row.chunks_exact(LANES);
            for (a, b) in (&mut qc).zip(&mut rc) {
                for l in 0..LANES {
                    acc[l] = a[l].mul_add(b[l], acc[l]);
                }
            }
            let tail: f32 = qc.remainder().iter().zip(rc.remainder()).map(|(a, b)| a * b).sum();
            *x = (acc.iter().sum::<f32>() + tail) * scale;
        }
    }

    /// s[j] = exp(s[j] - max(s)); returns the sum (the softmax's denominator).
    pub fn exp_normalize(s: &mut [f32]) -> f32 {
        exp_normalize_on(Isa::detect(), s)
    }

    /// [`exp_normalize`] of one build. Every build computes the same exps and adds them in the
    /// same order (8 running sums), so all give the same bits (test `exp_isas_agree_bit_for_bit`)
    /// for every input whose values are at most their max, NaNs and -inf included.
    pub fn exp_normalize_on(isa: Isa, s: &mut [f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: `Isa::detect` found the features (the caller names only available ones).
            Isa::Avx512 => return unsafe { x86::exp_normalize_avx512(s) },
            Isa::Avx2 => return unsafe { exp_normalize_avx2(s) },
            Isa::Portable => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        exp_normalize_plain(s)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_normalize_avx2(s: &mut [f32]) -> f32 {
        exp_normalize_plain(s)
    }

    const LANES: usize = 8;

    /// Lane-wise max, exp and sum, so the compiler vectorises all three.
    #[inline(always)]
    fn exp_normalize_plain(s: &mut [f32]) -> f32 {
        let max = max_of(s);
        let mut sums = [0f32; LANES];
        let mut chunks = s.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                c[l] = exp(c[l] - max);
                sums[l] += c[l];
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            sum += *x;
        }
        sum
    }

    /// The largest value (NaNs left out), -inf for none.
    #[inline(always)]
    fn max_of(s: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = s.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
            }
        }
        chunks.remainder().iter().chain(lanes.iter()).copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// sum_j exp(s[j] - shift) for shift >= max(s), accumulated in f64 per block of 64 (the
    /// log-sum-exp of 49k-wide vocabulary rows).
    pub fn exp_sum(s: &[f32], shift: f32) -> f64 {
        exp_sum_on(Isa::detect(), s, shift)
    }

    /// [`exp_sum`] of one build (the same bits from each, as [`exp_normalize_on`]).
    pub fn exp_sum_on(isa: Isa, s: &[f32], shift: f32) -> f64 {
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: as in `exp_normalize_on`.
            Isa::Avx512 => return unsafe { x86::exp_sum_avx512(s, shift) },
            Isa::Avx2 => return unsafe { exp_sum_avx2(s, shift) },
            Isa::Portable => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        exp_sum_plain(s, shift)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_sum_avx2(s: &[f32], shift: f32) -> f64 {
        exp_sum_plain(s, shift)
    }

    #[inline(always)]
    fn exp_sum_plain(s: &[f32], shift: f32) -> f64 {
        let mut total = 0f64;
        for block in s.chunks(EXP_SUM_BLOCK) {
            let mut lanes = [0f32; LANES];
            let mut chunks = block.chunks_exact(LANES);
            for c in &mut chunks {
                for l in 0..LANES {
                    lanes[l] += exp(c[l] - shift);
                }
            }
            total += block_total(&lanes, chunks.remainder(), shift);
        }
        total
    }

    /// Values a block of [`exp_sum`] adds in f32.
    const EXP_SUM_BLOCK: usize = 64;

    /// A block's sum of [`exp_sum`]: its 8 running sums, then the exps of the last `rest`.
    #[inline(always)]
    fn block_total(lanes: &[f32; LANES], rest: &[f32], shift: f32) -> f64 {
        let rest: f32 = rest.iter().map(|&x| exp(x - shift)).sum();
        (lanes.iter().sum::<f32>() + rest) as f64
    }

    /// s[j] = scale * exp(s[j] - shift) in place, for shift >= max(s).
    pub fn exp_scaled(s: &mut [f32], shift: f32, scale: f32) {
        exp_scaled_on(Isa::detect(), s, shift, scale)
    }

    /// [`exp_scaled`] of one build (the same bits from each: each value alone).
    pub fn exp_scaled_on(isa: Isa, s: &mut [f32], shift: f32, scale: f32) {
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: as in `exp_normalize_on`.
            Isa::Avx512 => return unsafe { x86::exp_scaled_avx512(s, shift, scale) },
            Isa::Avx2 => return unsafe { exp_scaled_avx2(s, shift, scale) },
            Isa::Portable => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        exp_scaled_plain(s, shift, scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_scaled_avx2(s: &mut [f32], shift: f32, scale: f32) {
        exp_scaled_plain(s, shift, scale)
    }

    #[inline(always)]
    fn exp_scaled_plain(s: &mut [f32], shift: f32, scale: f32) {
        for x in s.iter_mut() {
            *x = scale * exp(*x - shift);
        }
    }

    /// exp(x) for x <= 0 (softmax inputs after subtracting the max), relative error ~2e-7:
    /// 2^(x log2 e) split into an integer power (exponent bits) and a polynomial for 2^f,
    /// |f| <= 1/2. Branch-free so it vectorises.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        let y = (x * std::f32::consts::LOG2_E).max(EXP_LOWEST);
        let n = (y + EXP_ROUND) - EXP_ROUND; // round to nearest
        let f = y - n;
        let p = EXP_TAYLOR[1..].iter().fold(EXP_TAYLOR[0], |p, &c| p.mul_add(f, c));
        let r = f32::from_bits(p.to_bits().wrapping_add(((n as i32) << 23) as u32));
        // Below 2^-126 (x < -87.3) the true value is subnormal: flush it to zero.
        if y > EXP_LOWEST { r } else { 0.0 }
    }

    /// [`exp`]'s lowest power of two (smaller results are flushed to zero).
    const EXP_LOWEST: f32 = -126.0;
    /// 1.5 · 2^23: adding and subtracting it rounds an f32 to the nearest integer.
    const EXP_ROUND: f32 = 12_582_912.0;
    /// Taylor coefficients of 2^f = e^(f ln 2), the highest power's first.
    const EXP_TAYLOR: [f32; 7] = [1.535_336_2e-4, 1.339_887_4e-3, 9.618_437e-3, 5.550_332_5e-2, 2.402_264_9e-1, 6.931_472e-1, 1.0];

    /// The logistic function 1 / (1 + e^-x) through [`exp`] of -|x| (which is at most 1, so
    /// it never overflows), branch-free so it vectorises where `f32::exp` is a scalar libm call.
    #[inline(always)]
    pub fn sigmoid(x: f32) -> f32 {
        let e = exp(-x.abs());
        let r = 1.0 / (1.0 + e);
        if x >= 0.0 { r } else { e * r }
    }

    /// Unnormalised softmax rows of the heads that read the same values: row r is
    /// `p[r * stride..]`, its normaliser `sums[r]`.
    pub struct Probs<'a> {
        pub p: &'a [f32],
        pub stride: usize,
        pub sums: &'a [f32],
    }

    /// For each row r of `probs`: `o_r = sum_{j in cols} p_r[j] * v_(j - cols.start) / sums[r]`,
    /// where value row i starts at `base + i * stride` of `v`, and `o` holds the rows' outputs
    /// (d values each) one after another. Each value row loaded serves every row.
    #[allow(clippy::too_many_arguments)]
    pub fn weighted_sum(isa: Isa, probs: &Probs, cols: std::ops::Range<usize>, v: &[f32], base: usize, stride: usize, o: &mut [f32]) {
        let rows = probs.sums.len();
        assert!(rows > 0, "a weighted sum of no rows");
        let d = o.len() / rows;
        assert!(o.len() == rows * d && cols.start <= cols.end, "weighted_sum: {rows} rows of {} outputs", o.len());
        assert!(cols.is_empty() || (rows - 1) * probs.stride + cols.end <= probs.p.len(), "weighted_sum: weights out of range");
        assert!(cols.is_empty() || base + (cols.len() - 1) * stride + d <= v.len(), "weighted_sum: values out of range");
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `isa` comes from Isa::available (the CPU has its features), and the
            // asserts above bound every weight, value and output the kernels touch.
            unsafe {
                match (isa, rows, d.is_multiple_of(64), d.is_multiple_of(16)) {
                    (Isa::Avx512, 1, true, _) => return x86::weighted_sum_avx512::<1>(probs, cols, v, base, stride, o),
                    (Isa::Avx512, 2, true, _) => return x86::weighted_sum_avx512::<2>(probs, cols, v, base, stride, o),
                    (Isa::Avx512, 3, true, _) => return x86::weighted_sum_avx512::<3>(probs, cols, v, base, stride, o),
                    (Isa::Avx512 | Isa::Avx2, 1, _, true) => return x86::weighted_sum_avx2::<1>(probs, cols, v, base, stride, o),
                    (Isa::Avx512 | Isa::Avx2, 2, _, true) => return x86::weighted_sum_avx2::<2>(probs, cols, v, base, stride, o),
                    (Isa::Avx512 | Isa::Avx2, 3, _, true) => return x86::weighted_sum_avx2::<3>(probs, cols, v, base, stride, o),
                    (Isa::Avx512 | Isa::Avx2, 4, _, true) => return x86::weighted_sum_avx2::<4>(probs, cols, v, base, stride, o),
                    _ => {}
                }
            }
        }
        if rows > 4 && isa != Isa::Portable {
            // Blocks of at most 4 rows (models with larger groups), each in the wide build.
            for r0 in (0..rows).step_by(4) {
                let r1 = (r0 + 4).min(rows);
                let block = Probs { p: &probs.p[r0 * probs.stride..], stride: probs.stride, sums: &probs.sums[r0..r1] };
                weighted_sum(isa, &block, cols.clone(), v, base, stride, &mut o[r0 * d..r1 * d]);
            }
            return;
        }
        for (r, o) in o.chunks_exact_mut(d.max(1)).enumerate() {
            let p = &probs.p[r * probs.stride + cols.start..r * probs.stride + cols.end];
            weighted_sum_one(isa, p, probs.sums[r], v, base, stride, o);
        }
    }

    /// One row of [`weighted_sum`] for head sizes the intrinsics do not take (not a multiple of
    /// 16): the plain loops, compiled for AVX2 + FMA where the build allows.
    fn weighted_sum_one(isa: Isa, p: &[f32], norm: f32, v: &[f32], base: usize, stride: usize, o: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn narrow(p: &[f32], norm: f32, v: &[f32], base: usize, stride: usize, o: &mut [f32]) {
                weighted_sum_plain(p, norm, v, base, stride, o)
            }
            if isa != Isa::Portable {
                // SAFETY: `isa` comes from Isa::available, so the CPU has AVX2 and FMA.
                return unsafe { narrow(p, norm, v, base, stride, o) };
            }
        }
        weighted_sum_plain(p, norm, v, base, stride, o)
    }

    /// The intrinsics builds of [`scores`], [`weighted_sum`] and the softmax's exps. Callers
    /// check every bound.
    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use super::{EXP_LOWEST, EXP_ROUND, EXP_SUM_BLOCK, EXP_TAYLOR, LANES, Probs, block_total, exp, max_of};

        /// [`exp`] on 16 lanes: the same operations, so the same bits.
        #[target_feature(enable = "avx512f")]
        fn exp16(x: __m512) -> __m512 {
            let lowest = _mm512_set1_ps(EXP_LOWEST);
            let y = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)), lowest);
            let round = _mm512_set1_ps(EXP_ROUND);
            let n = _mm512_sub_ps(_mm512_add_ps(y, round), round);
            let f = _mm512_sub_ps(y, n);
            let p = EXP_TAYLOR[1..].iter().fold(_mm512_set1_ps(EXP_TAYLOR[0]), |p, &c| _mm512_fmadd_ps(p, f, _mm512_set1_ps(c)));
            let r = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32::<23>(_mm512_cvtps_epi32(n))));
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(y, lowest), r)
        }

        /// Adds 16 values to 8 running sums as two chunks of 8 would be: the first 8, then the rest.
        #[target_feature(enable = "avx512f")]
        fn add_halves(sums: __m256, e: __m512) -> __m256 {
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
            _mm256_add_ps(_mm256_add_ps(sums, _mm512_castps512_ps256(e)), high)
        }

        /// The exps of a slice of `len` values, `exps(lanes, j)` for the values j.. under the lane
        /// mask, over its whole chunks of 8 (16 at a time, then one of 8 under a mask), added to 8
        /// running sums; returns the sums and where the chunks end.
        #[target_feature(enable = "avx512f")]
        fn chunk_sums(len: usize, mut exps: impl FnMut(__mmask16, usize) -> __m512) -> ([f32; LANES], usize) {
            let whole = len - len % LANES;
            let mut sums = _mm256_setzero_ps();
            let mut j = 0;
            while j + 16 <= whole {
                sums = add_halves(sums, exps(0xFFFF, j));
                j += 16;
            }
            if j < whole {
                sums = _mm256_add_ps(sums, _mm512_castps512_ps256(exps(0x00FF, j)));
            }
            let mut out = [0f32; LANES];
            // SAFETY: `out` holds 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sums) };
            (out, whole)
        }

        /// [`super::exp_normalize`] 16 lanes at a time.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn exp_normalize_avx512(s: &mut [f32]) -> f32 {
            let max = max_of(s);
            let (m, p) = (_mm512_set1_ps(max), s.as_mut_ptr());
            let (sums, whole) = chunk_sums(s.len(), |lanes, j| {
                // SAFETY: the lanes `lanes` keeps are values j.. < whole of s.
                unsafe {
                    let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, p.add(j)), m));
                    _mm512_mask_storeu_ps(p.add(j), lanes, e);
                    e
                }
            });
            let mut sum: f32 = sums.iter().sum();
            for x in &mut s[whole..] {
                *x = exp(*x - max);
                sum += *x;
            }
            sum
        }

        /// [`super::exp_sum`] 16 lanes at a time.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn exp_sum_avx512(s: &[f32], shift: f32) -> f64 {
            let sh = _mm512_set1_ps(shift);
            let mut total = 0f64;
            for block in s.chunks(EXP_SUM_BLOCK) {
                let p = block.as_ptr();
                // SAFETY: the lanes kept are values j.. < whole of the block.
                let (sums, whole) =
                    chunk_sums(block.len(), |lanes, j| exp16(_mm512_sub_ps(unsafe { _mm512_maskz_loadu_ps(lanes, p.add(j)) }, sh)));
                total += block_total(&sums, &block[whole..], shift);
            }
            total
        }

        /// [`super::exp_scaled`] 16 lanes at a time, the end under a mask.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn exp_scaled_avx512(s: &mut [f32], shift: f32, scale: f32) {
            let (sh, sc, p) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale), s.as_mut_ptr());
            for j in (0..s.len()).step_by(16) {
                let lanes = lanes16(s.len() - j);
                // SAFETY: the lanes kept are values j.. < len of s.
                unsafe {
                    let x = _mm512_maskz_loadu_ps(lanes, p.add(j));
                    _mm512_mask_storeu_ps(p.add(j), lanes, _mm512_mul_ps(sc, exp16(_mm512_sub_ps(x, sh))));
                }
            }
        }

        /// The first `m` of 16 lanes.
        fn lanes16(m: usize) -> __mmask16 {
            if m >= 16 { 0xFFFF } else { ((1u32 << m) - 1) as __mmask16 }
        }

        /// The first `m` of 8 lanes, as `maskload`'s sign bits.
        #[target_feature(enable = "avx2")]
        fn lanes8(m: usize) -> __m256i {
            _mm256_cmpgt_epi32(_mm256_set1_epi32(m.min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
        }

        /// 32 keys a block, two vectors a row, the block's end under a lane mask (masked-off
        /// lanes are neither read nor written).
        #[target_feature(enable = "avx512f")]
        pub unsafe fn scores_avx512<const R: usize>(q: &[f32], kt: &[f32], keys: usize, first: usize, s: &mut [f32], scale: f32) {
            let (d, n) = (q.len() / R, s.len() / R);
            let (kp, sp, sc) = (kt.as_ptr().wrapping_add(first), s.as_mut_ptr(), _mm512_set1_ps(scale));
            for j in (0..n).step_by(32) {
                let (m0, m1) = (lanes16(n - j), lanes16((n - j).saturating_sub(16)));
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                for c in 0..d {
                    let row = kp.wrapping_add(c * keys + j);
                    // SAFETY: the lanes the masks keep are keys first + j.. < first + n.
                    let (k0, k1) = unsafe { (_mm512_maskz_loadu_ps(m0, row), _mm512_maskz_loadu_ps(m1, row.wrapping_add(16))) };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let qc = _mm512_set1_ps(q[r * d + c]);
                        acc[0] = _mm512_fmadd_ps(qc, k0, acc[0]);
                        acc[1] = _mm512_fmadd_ps(qc, k1, acc[1]);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let out = sp.wrapping_add(r * n + j);
                    // SAFETY: the kept lanes are scores r * n + j.. < (r + 1) * n.
                    unsafe {
                        _mm512_mask_storeu_ps(out, m0, _mm512_mul_ps(acc[0], sc));
                        _mm512_mask_storeu_ps(out.wrapping_add(16), m1, _mm512_mul_ps(acc[1], sc));
                    }
                }
            }
        }

        /// 16 keys a block, two vectors a row, the block's end under a lane mask.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn scores_avx2<const R: usize>(q: &[f32], kt: &[f32], keys: usize, first: usize, s: &mut [f32], scale: f32) {
            let (d, n) = (q.len() / R, s.len() / R);
            let (kp, sp, sc) = (kt.as_ptr().wrapping_add(first), s.as_mut_ptr(), _mm256_set1_ps(scale));
            for j in (0..n).step_by(16) {
                let (m0, m1) = (lanes8(n - j), lanes8((n - j).saturating_sub(8)));
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for c in 0..d {
                    let row = kp.wrapping_add(c * keys + j);
                    // SAFETY: the lanes the masks keep are keys first + j.. < first + n.
                    let (k0, k1) = unsafe { (_mm256_maskload_ps(row, m0), _mm256_maskload_ps(row.wrapping_add(8), m1)) };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let qc = _mm256_set1_ps(q[r * d + c]);
                        acc[0] = _mm256_fmadd_ps(qc, k0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(qc, k1, acc[1]);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let out = sp.wrapping_add(r * n + j);
                    // SAFETY: the kept lanes are scores r * n + j.. < (r + 1) * n.
                    unsafe {
                        _mm256_maskstore_ps(out, m0, _mm256_mul_ps(acc[0], sc));
                        _mm256_maskstore_ps(out.wrapping_add(8), m1, _mm256_mul_ps(acc[1], sc));
                    }
                }
            }
        }

        /// 64 output values (four vectors) a row per pass over the value rows.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn weighted_sum_avx512<const R: usize>(
            probs: &Probs,
            cols: std::ops::Range<usize>,
            v: &[f32],
            base: usize,
            stride: usize,
            o: &mut [f32],
        ) {
            let d = o.len() / R;
            for c0 in (0..d).step_by(64) {
                let mut acc = [[_mm512_setzero_ps(); 4]; R];
                for (i, j) in cols.clone().enumerate() {
                    let row = &v[base + i * stride + c0..base + i * stride + c0 + 64];
                    // SAFETY: `row` holds the 64 values read.
                    let vs: [__m512; 4] = std::array::from_fn(|k| unsafe { _mm512_loadu_ps(row.as_ptr().add(16 * k)) });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let pj = _mm512_set1_ps(probs.p[r * probs.stride + j]);
                        for k in 0..4 {
                            acc[k] = _mm512_fmadd_ps(pj, vs[k], acc[k]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let norm = _mm512_set1_ps(probs.sums[r]);
                    let out = &mut o[r * d + c0..r * d + c0 + 64];
                    for (k, acc) in acc.iter().enumerate() {
                        // SAFETY: `out` holds the 64 values written.
                        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * k), _mm512_div_ps(*acc, norm)) };
                    }
                }
            }
        }

        /// 16 output values (two vectors) a row per pass over the value rows.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn weighted_sum_avx2<const R: usize>(
            probs: &Probs,
            cols: std::ops::Range<usize>,
            v: &[f32],
            base: usize,
            stride: usize,
            o: &mut [f32],
        ) {
            let d = o.len() / R;
            for c0 in (0..d).step_by(16) {
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for (i, j) in cols.clone().enumerate() {
                    let row = &v[base + i * stride + c0..base + i * stride + c0 + 16];
                    // SAFETY: `row` holds the 16 values read.
                    let vs: [__m256; 2] = std::array::from_fn(|k| unsafe { _mm256_loadu_ps(row.as_ptr().add(8 * k)) });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let pj = _mm256_set1_ps(probs.p[r * probs.stride + j]);
                        for k in 0..2 {
                            acc[k] = _mm256_fmadd_ps(pj, vs[k], acc[k]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let norm = _mm256_set1_ps(probs.sums[r]);
                    let out = &mut o[r * d + c0..r * d + c0 + 16];
                    for (k, acc) in acc.iter().enumerate() {
                        // SAFETY: `out` holds the 16 values written.
                        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), _mm256_div_ps(*acc, norm)) };
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn weighted_sum_plain(p: &[f32], norm: f32, v: &[f32], base: usize, stride: usize, o: &mut [f32]) {
        match o.len() {
            64 => weighted_sum_fixed::<64>(p, norm, v, base, stride, o),
            128 => weighted_sum_fixed::<128>(p, norm, v, base, stride, o),
            d => {
                o.fill(0.0);
                for (j, pj) in p.iter().enumerate() {
                    for (y, x) in o.iter_mut().zip(&v[base + j * stride..base + j * stride + d]) {
                        *y = pj.mul_add(*x, *y);
                    }
                }
                for y in o.iter_mut() {
                    *y /= norm;
                }
            }
        }
    }

    /// The head dimension known at compile time keeps the accumulator in registers.
    #[inline(always)]
    fn weighted_sum_fixed<const D: usize>(p: &[f32], norm: f32, v: &[f32], base: usize, stride: usize, o: &mut [f32]) {
        let mut acc = [0f32; D];
        for (j, pj) in p.iter().enumerate() {
            let row = &v[base + j * stride..base + j * stride + D];
            for c in 0..D {
                acc[c] = pj.mul_add(row[c], acc[c]);
            }
        }
        for c in 0..D {
            o[c] = acc[c] / norm;
        }
    }
}
