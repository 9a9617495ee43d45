//! Fused causal attention for inference on the CPU (no gradients): scores, masking, softmax and
//! the weighted sum of values in one pass per query, skipping the masked keys entirely instead
//! of materialising a (heads, T, keys) score tensor and a mask. Used for prefill and decoding;
//! training keeps candle's differentiable ops.

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

fn with_view<R>(t: &Tensor, f: impl FnOnce(Option<View>) -> R) -> R {
    let (storage, layout): (_, &Layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => f(Some(View { data, offset: layout.start_offset(), stride: layout.stride().to_vec() })),
        _ => f(None),
    }
}

/// Attention of q (B, H, T, D) over k, v (B, KV, L, D) (views into the cache are fine), with
/// query i of row b at absolute position `L - T + i` seeing keys `pads[b]..=` its position.
/// Returns (B, T, H * D). Only for f32 CPU tensors (see [`supported`]).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[usize]) -> candle_core::Result<Tensor> {
    if !supported(q.device(), q.dtype()) {
        candle_core::bail!("fused CPU attention needs f32 CPU tensors");
    }
    let (b, h, t, d) = q.dims4()?;
    let (_, kv, l, _) = k.dims4()?;
    let group = h / kv;
    let past = l - t;
    let scale = 1.0 / (d as f32).sqrt();
    let qs = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    // Work items: (row, kv head, block of queries); many blocks so threads balance causal work.
    let q_block = t.div_ceil(8).max(1);
    let items: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| (0..kv).flat_map(move |g| (0..t).step_by(q_block).map(move |i0| (bi, g, i0))))
        .collect();
    let results = with_view(k, |kview| {
        with_view(v, |vview| {
            let (Some(kview), Some(vview)) = (kview, vview) else { return None };
            if kview.stride[3] != 1 || vview.stride[3] != 1 {
                return None;
            }
            Some(
                items
                    .par_iter()
                    .map(|&(bi, g, i0)| {
                        let i1 = (i0 + q_block).min(t);
                        let keys = past + i1; // keys any query of the block can see
                        // K for this (row, kv head), transposed to (D, keys): scores for many keys
                        // become broadcast multiply-adds over contiguous memory.
                        let kbase = kview.offset + bi * kview.stride[0] + g * kview.stride[1];
                        let mut kt = vec![0f32; d * keys];
                        for j in 0..keys {
                            let row = &kview.data[kbase + j * kview.stride[2]..kbase + j * kview.stride[2] + d];
                            for (c, x) in row.iter().enumerate() {
                                kt[c * keys + j] = *x;
                            }
                        }
                        let vbase = vview.offset + bi * vview.stride[0] + g * vview.stride[1];
                        let mut out = vec![0f32; (i1 - i0) * group * d];
                        let mut scores = vec![0f32; keys];
                        for i in i0..i1 {
                            let pos = past + i;
                            let (first, last) = if pos < pads[bi] { (pos, pos) } else { (pads[bi], pos) };
                            for hh in 0..group {
                                let head = g * group + hh;
                                let qrow = &qs[((bi * h + head) * t + i) * d..((bi * h + head) * t + i + 1) * d];
                                let s = &mut scores[first..=last];
                                kernels::scores(qrow, &kt, keys, first, s, scale);
                                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                                let mut sum = 0f32;
                                for x in s.iter_mut() {
                                    *x = (*x - max).exp();
                                    sum += *x;
                                }
                                let o = &mut out[((i - i0) * group + hh) * d..((i - i0) * group + hh + 1) * d];
                                for (j, p) in (first..=last).zip(s.iter()) {
                                    let vrow = &vview.data[vbase + j * vview.stride[2]..vbase + j * vview.stride[2] + d];
                                    kernels::axpy(p / sum, vrow, o);
                                }
                            }
                        }
                        ((bi, g, i0, i1), out)
                    })
                    .collect::<Vec<_>>(),
            )
        })
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

/// The two inner loops, compiled for AVX2+FMA when the CPU has it (the plain loops vectorise).
mod kernels {
    /// s[j - first] = scale * sum_c q[c] * kt[c * keys + j] for j in first..first + s.len().
    pub fn scores(q: &[f32], kt: &[f32], keys: usize, first: usize, s: &mut [f32], scale: f32) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                unsafe { scores_avx2(q, kt, keys, first, s, scale) };
                return;
            }
        }
        scores_plain(q, kt, keys, first, s, scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_avx2(q: &[f32], kt: &[f32], keys: usize, first: usize, s: &mut [f32], scale: f32) {
        scores_plain(q, kt, keys, first, s, scale)
    }

    #[inline(always)]
    fn scores_plain(q: &[f32], kt: &[f32], keys: usize, first: usize, s: &mut [f32], scale: f32) {
        s.fill(0.0);
        let n = s.len();
        for (c, qc) in q.iter().enumerate() {
            let row = &kt[c * keys + first..c * keys + first + n];
            for (x, kv) in s.iter_mut().zip(row) {
                *x = qc.mul_add(*kv, *x);
            }
        }
        for x in s.iter_mut() {
            *x *= scale;
        }
    }

    /// o += a * x
    pub fn axpy(a: f32, x: &[f32], o: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                unsafe { axpy_avx2(a, x, o) };
                return;
            }
        }
        axpy_plain(a, x, o)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpy_avx2(a: f32, x: &[f32], o: &mut [f32]) {
        axpy_plain(a, x, o)
    }

    #[inline(always)]
    fn axpy_plain(a: f32, x: &[f32], o: &mut [f32]) {
        for (y, v) in o.iter_mut().zip(x) {
            *y = a.mul_add(*v, *y);
        }
    }
}
