//! Differentiable fused ops for training on the CPU: causal attention, RMS norm and rotary
//! embedding as single graph nodes with their own backward pass.
//!
//! Built from candle's elementary ops, each of these is a chain of nodes that the autograd
//! keeps alive until the backward pass: for attention the (heads, T, keys) scores, their
//! masked, shifted, exponentiated and normalised copies, per layer. Measured on the default
//! model (`examples` of the GRPO issue), that was most of a training forward's memory and a
//! large share of its time. As one node each, the forward keeps only its output, and the
//! backward recomputes what it needs (attention recomputes its probabilities, as
//! FlashAttention does) in temporaries freed layer by layer.
//!
//! Forward passes reuse the inference kernels for f32 (the fused attention of
//! [`super::attention_cpu`], candle's fused RMS norm and rope); f64 (the finite-difference
//! tests) computes the same with candle's ops. Backward passes are written with candle's ops
//! on detached tensors, so they work for both.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Shape, Tensor, D};

/// Whether the fused training ops run on this device and dtype.
pub fn supported(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// A CPU storage as a (copied, contiguous) tensor.
pub(crate) fn storage_tensor(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("fused training ops need contiguous inputs")
    };
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], l.shape(), &Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], l.shape(), &Device::Cpu),
        _ => candle_core::bail!("fused training ops support f32 and f64"),
    }
}

/// A CPU tensor's values as a storage and its shape (the output of a custom op).
pub(crate) fn tensor_storage(t: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let shape = t.shape().clone();
    let flat = t.flatten_all()?;
    let storage = match t.dtype() {
        DType::F64 => CpuStorage::F64(flat.to_vec1()?),
        DType::F32 => CpuStorage::F32(flat.to_vec1()?),
        dt => candle_core::bail!("fused training ops support f32 and f64, not {dt:?}"),
    };
    Ok((storage, shape))
}

/// The additive mask of [`attention`]: (B, 1, T, L), 0 where query i of row b (at position
/// `L − T + i`) sees key j, a large negative number elsewhere. A padding query (position before
/// `pads[b]`) sees only itself, as in the fused inference kernel.
fn causal_mask(pads: &[usize], t: usize, l: usize, dtype: DType) -> candle_core::Result<Tensor> {
    let past = l - t;
    let mut m = Vec::with_capacity(pads.len() * t * l);
    for &pad in pads {
        for i in 0..t {
            let pos = past + i;
            m.extend((0..l).map(|j| {
                let seen = if pos < pad { j == pos } else { pad <= j && j <= pos };
                if seen { 0f32 } else { -1e30 }
            }));
        }
    }
    Tensor::from_vec(m, (pads.len(), 1, t, l), &Device::Cpu)?.to_dtype(dtype)
}

/// Softmax probabilities (B, KV, G·T, L) of q (B, H, T, D) over k (B, KV, L, D), with the
/// group of G = H / KV query heads that share a KV head stacked along the time axis.
fn attention_probs(q: &Tensor, k: &Tensor, pads: &[usize]) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, kv, l, _) = k.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    let qg = q.reshape((b, kv, (h / kv) * t, d))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?.reshape((b, h, t, l))?;
    let scores = scores.broadcast_add(&causal_mask(pads, t, l, q.dtype())?)?;
    candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, kv, (h / kv) * t, l))
}

/// Causal attention of q (B, H, T, D) over k, v (B, KV, L, D): query i of row b sits at
/// position `L − T + i` and sees keys `pads[b]..=` its position. Returns (B, T, H·D).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[usize]) -> candle_core::Result<Tensor> {
    let (b, h, _, _) = q.dims4()?;
    let (_, kv, _, _) = k.dims4()?;
    if pads.len() != b || h % kv != 0 {
        candle_core::bail!("attention: {} pads for {b} rows, {h} heads over {kv} kv heads", pads.len());
    }
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { pads: pads.to_vec() })
}

struct Attention {
    pads: Vec<usize>,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "train-causal-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (storage_tensor(s1, l1)?, storage_tensor(s2, l2)?, storage_tensor(s3, l3)?);
        let y = if super::attention_cpu::supported(q.device(), q.dtype()) {
            super::attention_cpu::causal_attention(&q, &k, &v, &self.pads)?
        } else {
            let (b, h, t, d) = q.dims4()?;
            let y = attention_probs(&q, &k, &self.pads)?.matmul(&v)?.reshape((b, h, t, d))?;
            y.transpose(1, 2)?.reshape((b, t, h * d))?
        };
        tensor_storage(&y)
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (b, h, t, d) = q.dims4()?;
        let kv = k.dim(1)?;
        let gt = (h / kv) * t;
        let scale = 1.0 / (d as f64).sqrt();
        let p = attention_probs(&q, &k, &self.pads)?;
        // dy (B, T, H·D) → (B, KV, G·T, D), the layout of the stacked query heads.
        let dout = dy.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?.reshape((b, kv, gt, d))?;
        let dv = p.t()?.matmul(&dout)?;
        let dp = dout.matmul(&v.t()?)?;
        let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
        let dq = (ds.matmul(&k)? * scale)?.reshape((b, h, t, d))?;
        let dk = (ds.t()?.matmul(&q.reshape((b, kv, gt, d))?)? * scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// RMS norm `x / sqrt(mean(x²) + eps) · w` over the last axis, with `w` frozen (no gradient).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNorm { w: w.clone(), eps })
}

struct RmsNorm {
    w: Tensor,
    eps: f64,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = storage_tensor(s, l)?;
        let y = match x.dtype() {
            DType::F32 => candle_nn::ops::rms_norm(&x, &self.w, self.eps as f32)?,
            _ => candle_nn::ops::rms_norm_slow(&x, &self.w, self.eps as f32)?,
        };
        tensor_storage(&y)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // With r = (mean(x²) + eps)^−½ and g = dy·w: dx = r·g − x·r³·mean(x·g).
        let x = x.detach();
        // The forward kernels take eps as f32.
        let eps = f64::from(self.eps as f32);
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let g = dy.broadcast_mul(&self.w)?;
        let proj = (&x * &g)?.mean_keepdim(D::Minus1)?.mul(&r.powf(3.0)?)?;
        Ok(Some((g.broadcast_mul(&r)? - x.broadcast_mul(&proj)?)?))
    }
}

/// Rotary embedding in the rotate-half layout of x (B, H, T, D) with tables (T, D/2) or
/// (B, T, D/2). The rotation's transpose is the rotation by −θ: the backward pass is rope with
/// −sin.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Rope { cos: cos.clone(), sin: sin.clone() })
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "train-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = storage_tensor(s, l)?;
        tensor_storage(&candle_nn::rotary_emb::rope(&x, &self.cos, &self.sin)?)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(candle_nn::rotary_emb::rope(&dy.contiguous()?, &self.cos, &self.sin.neg()?)?))
    }
}
