//! Differentiable fused ops for training on the CPU: causal attention, RMS norm, the split into
//! heads with the rotary embedding, SwiGLU, the LoRA linear layer, and gate, up and SwiGLU
//! together, as single graph nodes with their own backward pass.
//!
//! Built from candle's elementary ops, each of these is a chain of nodes that the autograd
//! keeps alive until the backward pass: for attention the (heads, T, keys) scores, their
//! masked, shifted, exponentiated and normalised copies, per layer. Measured on the default
//! model (`examples` of the GRPO issue), that was most of a training forward's memory and a
//! large share of its time. As one node each, the forward keeps its output and little else (the
//! output projection a (rows, hidden) direction per row, a LoRA layer its rank-r intermediate,
//! the gated pair gate(x) and up(x)), and the backward recomputes what it needs (attention
//! recomputes its probabilities, as FlashAttention does) in temporaries freed layer by layer.
//! Every node also costs candle's backward pass a zeroed gradient and an add per input, so
//! fewer nodes are faster.
//!
//! Attention's f32 forward is the fused inference kernel of [`super::attention_cpu`], and f64
//! (the finite-difference tests) computes it with candle's ops. RMS norm, the split into heads
//! and SwiGLU are one pass of their own in both directions, for f32 and f64 alike. The other
//! backward passes are written with candle's ops on detached tensors, so they work for both,
//! where f32 has no kernel of its own: the linear layers (the frozen weight's products through
//! [`super::gemm_views`], the adapter's in [`super::lora_rows`]) and attention (in causal
//! blocks, [`super::attention_blocks`]) have one.

use super::attention_cpu::kernels;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, D, DType, Device, Layout, Shape, Tensor};

/// Whether the fused training ops run on this device and dtype.
pub fn supported(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// A CPU storage as a (copied, contiguous) tensor.
pub(crate) fn storage_tensor(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("fused training ops need contiguous inputs") };
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
    let dims = attention_dims(q.shape(), k.shape())?;
    if pads.len() != dims.b || v.dims() != k.dims() {
        candle_core::bail!("attention: {} pads for q {:?}, k {:?}, v {:?}", pads.len(), q.dims(), k.dims(), v.dims());
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

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (storage_tensor(s1, l1)?, storage_tensor(s2, l2)?, storage_tensor(s3, l3)?);
        tensor_storage(&attention_forward(&q, &k, &v, &self.pads)?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = attention_grads(&q.detach(), &k.detach(), &v.detach(), &self.pads, dy)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// [`attention`]'s forward: the fused kernel for f32, candle's ops for f64.
fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[usize]) -> candle_core::Result<Tensor> {
    if super::attention_cpu::supported(q.device(), q.dtype()) {
        super::attention_cpu::causal_attention(q, k, v, pads)
    } else {
        attention_with_ops(q, k, v, pads)
    }
}

/// The blocked kernels' shape of q (B, H, T, D) over k (B, KV, L, D), checked.
fn attention_dims(q: &Shape, k: &Shape) -> candle_core::Result<super::attention_blocks::Dims> {
    let ((b, h, t, d), (kb, kv, l, kd)) = (q.dims4()?, k.dims4()?);
    if kb != b || kd != d || kv == 0 || h % kv != 0 || l < t {
        candle_core::bail!("attention: q {q:?} over k {k:?}");
    }
    Ok(super::attention_blocks::Dims { b, h, kv, t, l, d })
}

/// [`attention`]'s forward with candle's ops (f64, the finite-difference tests): (B, T, H·D).
fn attention_with_ops(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[usize]) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let y = attention_probs(q, k, pads)?.matmul(v)?.reshape((b, h, t, d))?;
    y.transpose(1, 2)?.reshape((b, t, h * d))
}

/// The gradients (dq, dk, dv) of [`attention`] for the output gradient dy (B, T, H·D), its
/// probabilities recomputed: f32 in causal blocks ([`super::attention_blocks`]), f64 with
/// candle's ops over the full square.
fn attention_grads(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[usize], dy: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    if q.dtype() == DType::F32 && q.device().is_cpu() {
        use super::attention_blocks::{BLOCK, causal_attention_grads};
        let dims = attention_dims(q.shape(), k.shape())?;
        if dy.elem_count() != q.elem_count() || v.dims() != k.dims() || pads.len() != dims.b {
            candle_core::bail!("attention backward: dy {:?}, k {:?}, v {:?} for q {:?}", dy.dims(), k.dims(), v.dims(), q.dims());
        }
        let (dq, dk, dv) = with_values::<f32, _>(q, |q| {
            with_values::<f32, _>(k, |k| {
                with_values::<f32, _>(v, |v| with_values::<f32, _>(dy, |dy| causal_attention_grads(q, k, v, dy, dims, pads, BLOCK)))
            })
        })????;
        let cpu = &Device::Cpu;
        return Ok((Tensor::from_vec(dq, q.shape(), cpu)?, Tensor::from_vec(dk, k.shape(), cpu)?, Tensor::from_vec(dv, k.shape(), cpu)?));
    }
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let gt = (h / kv) * t;
    let scale = 1.0 / (d as f64).sqrt();
    let p = attention_probs(q, k, pads)?;
    // dy (B, T, H·D) → (B, KV, G·T, D), the layout of the stacked query heads.
    let dout = dy.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?.reshape((b, kv, gt, d))?;
    let dv = p.t()?.matmul(&dout)?;
    let dp = dout.matmul(&v.t()?)?;
    let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
    let dq = (ds.matmul(k)? * scale)?.reshape((b, h, t, d))?;
    let dk = (ds.t()?.matmul(&q.reshape((b, kv, gt, d))?)? * scale)?;
    Ok((dq, dk, dv))
}

/// [`attention`] over a shared prefix and then each row's own keys: row b reads row
/// `of_row[b]` of the prefix's pk, pv (P_rows, KV, P, D), then its own k, v (B, KV, L, D); query
/// i of row b sits at position `P + L − T + i`. One node: the forward reads the prefix in place
/// (the inference kernel, for f32), and the backward sums the prefix's gradients over the rows
/// that read it. The per-row copies of the prefix, which candle's ops would keep for every
/// layer until the backward pass, exist only inside one layer's backward.
pub fn attention_with_prefix(
    q: &Tensor,
    pk: &Tensor,
    pv: &Tensor,
    of_row: &[usize],
    k: &Tensor,
    v: &Tensor,
    pads: &[usize],
) -> candle_core::Result<Tensor> {
    let (b, h, _, _) = q.dims4()?;
    let (prompts, kv, _, _) = pk.dims4()?;
    if pads.len() != b || of_row.len() != b || of_row.iter().any(|&r| r >= prompts) || h % kv != 0 {
        candle_core::bail!(
            "attention_with_prefix: {} pads and {} prefix rows for {b} rows of {prompts} prefixes",
            pads.len(),
            of_row.len()
        );
    }
    // Keys and values travel stacked, (2, ...): a custom op takes at most three inputs.
    let own = Tensor::stack(&[k, v], 0)?;
    let prefix = Tensor::stack(&[pk, pv], 0)?;
    let op = PrefixAttention { pads: pads.to_vec(), of_row: of_row.to_vec() };
    q.contiguous()?.apply_op3(&own.contiguous()?, &prefix.contiguous()?, op)
}

struct PrefixAttention {
    pads: Vec<usize>,
    of_row: Vec<usize>,
}

impl PrefixAttention {
    /// Each row's keys and values with its prefix copied in front: (B, KV, P + L, D) each.
    fn materialize(&self, pk: &Tensor, pv: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let prefix = Some((pk.clone(), pv.clone(), self.of_row.clone()));
        super::kv_cache::CachedKv { k: k.clone(), v: v.clone(), prefix }.materialize()
    }
}

impl CustomOp3 for PrefixAttention {
    fn name(&self) -> &'static str {
        "train-prefix-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, own, prefix) = (storage_tensor(s1, l1)?, storage_tensor(s2, l2)?, storage_tensor(s3, l3)?);
        let (k, v, pk, pv) = (own.get(0)?, own.get(1)?, prefix.get(0)?, prefix.get(1)?);
        let y = if super::attention_cpu::supported(q.device(), q.dtype()) {
            let shared = super::attention_cpu::SharedKv { k: &pk, v: &pv, of_row: &self.of_row };
            super::attention_cpu::causal_attention_with_prefix(&q, Some(shared), &k, &v, &self.pads)?
        } else {
            let (k, v) = self.materialize(&pk, &pv, &k, &v)?;
            attention_with_ops(&q, &k, &v, &self.pads)?
        };
        tensor_storage(&y)
    }

    fn bwd(
        &self,
        q: &Tensor,
        own: &Tensor,
        prefix: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, own, prefix) = (q.detach(), own.detach(), prefix.detach());
        let (k, v, pk, pv) = (own.get(0)?, own.get(1)?, prefix.get(0)?, prefix.get(1)?);
        let plen = pk.dim(2)?;
        let (k_all, v_all) = self.materialize(&pk, &pv, &k, &v)?;
        let (dq, dk, dv) = attention_grads(&q, &k_all, &v_all, &self.pads, dy)?;
        let idx = Tensor::from_vec(self.of_row.iter().map(|&r| r as u32).collect::<Vec<_>>(), self.of_row.len(), q.device())?;
        // Each prefix row's gradient: the sum over the rows that read it.
        let summed = |d: &Tensor, p: &Tensor| p.zeros_like()?.index_add(&idx, &d.narrow(2, 0, plen)?.contiguous()?, 0);
        let d_own = Tensor::stack(&[dk.narrow(2, plen, k.dim(2)?)?, dv.narrow(2, plen, v.dim(2)?)?], 0)?;
        let d_prefix = Tensor::stack(&[summed(&dk, &pk)?, summed(&dv, &pv)?], 0)?;
        Ok((Some(dq), Some(d_own), Some(d_prefix)))
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

impl RmsNorm {
    /// The forward (`dy` None: y) or backward (dx) pass over rows of `x`, in T.
    fn rows<T: candle_core::WithDType + num_traits::Float>(&self, x: &[T], dy: Option<&[T]>) -> candle_core::Result<Vec<T>> {
        use rayon::prelude::*;
        let w = self.w.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?;
        let n = w.len();
        if n == 0 || !x.len().is_multiple_of(n) || dy.is_some_and(|dy| dy.len() != x.len()) {
            candle_core::bail!("rms norm: {} values in rows of {n}", x.len());
        }
        // As candle's fused kernel: eps rounded to f32, the squares summed in order.
        let (eps, count) = (T::from(self.eps as f32).unwrap(), T::from(n).unwrap());
        let mut out = vec![T::zero(); x.len()];
        let norm = |x: &[T]| (x.iter().fold(T::zero(), |sum, &v| sum + v * v) / count + eps).sqrt();
        match dy {
            None => out.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(16).for_each(|(y, x)| {
                let m = norm(x);
                y.iter_mut().zip(x).zip(&w).for_each(|((y, &x), &w)| *y = x / m * w);
            }),
            // With r = 1 / m and g = dy · w: dx = r g − x r³ mean(x g).
            Some(dy) => out.par_chunks_mut(n).zip(x.par_chunks(n)).zip(dy.par_chunks(n)).with_min_len(16).for_each(|((dx, x), dy)| {
                let r = norm(x).recip();
                let xg = x.iter().zip(dy).zip(&w).fold(T::zero(), |sum, ((&x, &dy), &w)| sum + x * (dy * w));
                let proj = xg / count * r * r * r;
                dx.iter_mut().zip(x).zip(dy).zip(&w).for_each(|(((dx, &x), &dy), &w)| *dx = dy * w * r - x * proj);
            }),
        }
        Ok(out)
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if l.dims().last() != Some(&self.w.elem_count()) {
            candle_core::bail!("rms norm: a weight of {} for x {:?}", self.w.elem_count(), l.dims());
        }
        let out = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((start, end))) => CpuStorage::F32(self.rows(&v[start..end], None)?),
            (CpuStorage::F64(v), Some((start, end))) => CpuStorage::F64(self.rows(&v[start..end], None)?),
            _ => candle_core::bail!("rms norm: a contiguous f32 or f64 input"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        fn dx<T: candle_core::WithDType + num_traits::Float>(op: &RmsNorm, x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
            let dx = with_values::<T, _>(x, |x| with_values::<T, _>(dy, |dy| op.rows(x, Some(dy))))???;
            Tensor::from_vec(dx, x.shape(), &Device::Cpu)
        }
        match x.dtype() {
            DType::F32 => dx::<f32>(self, x, dy).map(Some),
            DType::F64 => dx::<f64>(self, x, dy).map(Some),
            dt => candle_core::bail!("rms norm supports f32 and f64, not {dt:?}"),
        }
    }
}

/// The heads of a projection x (B, T, H·D) as (B, H, T, D), rotated by the rotary tables
/// `rope` when given (the rotate-half layout, tables (T, D/2) or (B, T, D/2)), as one
/// node. As candle's reshape, transpose, copy and rotation they were four, and the backward
/// pass gives each node a zeroed gradient and an add. The backward pass is the inverse: the
/// rotation by −θ, back to (B, T, H·D).
pub fn split_heads(x: &Tensor, heads: usize, rope: Option<(&Tensor, &Tensor)>) -> candle_core::Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    x.contiguous()?.apply_op1(SplitHeads::new((b, t, width), heads, rope)?)
}

struct SplitHeads {
    heads: usize,
    rope: Option<(Tensor, Tensor)>,
}

/// The shape of a [`split_heads`] pass: batch, time, heads and head size.
#[derive(Clone, Copy)]
struct HeadDims {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
}

impl SplitHeads {
    /// The op for an x of (b, t, width), checked.
    fn new((b, t, width): (usize, usize, usize), heads: usize, rope: Option<(&Tensor, &Tensor)>) -> candle_core::Result<Self> {
        if b * t == 0 || heads == 0 || width == 0 || !width.is_multiple_of(heads) || !(width / heads).is_multiple_of(2) {
            candle_core::bail!("split_heads: x ({b}, {t}, {width}) does not split into {heads} heads of an even size");
        }
        let rope = match rope {
            Some((cos, sin)) => {
                let half = width / heads / 2;
                let fits = |c: &Tensor| c.dims() == [t, half] || c.dims() == [b, t, half];
                if !fits(cos) || cos.dims() != sin.dims() {
                    candle_core::bail!("split_heads: rotary tables {:?} and {:?} for x ({b}, {t}, {width})", cos.dims(), sin.dims());
                }
                Some((cos.contiguous()?, sin.contiguous()?))
            }
            None => None,
        };
        Ok(SplitHeads { heads, rope })
    }

    fn dims(&self, l: &Layout, heads_first: bool) -> candle_core::Result<HeadDims> {
        let (b, t, h, d) = if heads_first {
            let (b, h, t, d) = l.shape().dims4()?;
            (b, t, h, d)
        } else {
            let (b, t, w) = l.shape().dims3()?;
            (b, t, self.heads, w / self.heads)
        };
        Ok(HeadDims { b, t, h, d })
    }

    /// The rotary tables as values of T.
    fn tables<T: candle_core::WithDType>(&self) -> candle_core::Result<Option<(Vec<T>, Vec<T>)>> {
        self.rope.as_ref().map(|(cos, sin)| Ok((cos.flatten_all()?.to_vec1::<T>()?, sin.flatten_all()?.to_vec1::<T>()?))).transpose()
    }

    fn run<T: candle_core::WithDType + num_traits::Float>(&self, x: &[T], dims: HeadDims, inverse: bool) -> candle_core::Result<Vec<T>> {
        let mut out = vec![T::zero(); x.len()];
        self.run_into(x, dims, inverse, &mut out)?;
        Ok(out)
    }

    /// [`Self::run`] into `out`, of x's length.
    fn run_into<T: candle_core::WithDType + num_traits::Float>(
        &self,
        x: &[T],
        dims: HeadDims,
        inverse: bool,
        out: &mut [T],
    ) -> candle_core::Result<()> {
        if out.len() != x.len() || x.len() != dims.b * dims.t * dims.h * dims.d {
            candle_core::bail!("split_heads: {} values into {} for {} heads", x.len(), out.len(), dims.h);
        }
        let tables = self.tables::<T>()?;
        let shared = self.rope.as_ref().is_some_and(|(cos, _)| cos.rank() == 2);
        let table = tables.as_ref().map(|(c, s)| (c.as_slice(), s.as_slice()));
        split_heads_pass(x, dims, table, shared, inverse, out);
        Ok(())
    }
}

/// One [`split_heads`] pass: (B, T, H, D) to (B, H, T, D), rotated by θ, or back (`inverse`),
/// rotated by −θ. `shared`: the tables are (T, D/2), else (B, T, D/2).
fn split_heads_pass<T: num_traits::Float + Send + Sync>(
    x: &[T],
    HeadDims { b: _, t, h, d }: HeadDims,
    tables: Option<(&[T], &[T])>,
    shared: bool,
    inverse: bool,
    out: &mut [T],
) {
    use rayon::prelude::*;
    let half = d / 2;
    let rotate = |src: &[T], dst: &mut [T], row: usize| match tables {
        None => dst.copy_from_slice(src),
        Some((cos, sin)) => {
            let (cos, sin) = (&cos[row * half..][..half], &sin[row * half..][..half]);
            let (x1, x2) = src.split_at(half);
            let (y1, y2) = dst.split_at_mut(half);
            for i in 0..half {
                let s = if inverse { -sin[i] } else { sin[i] };
                y1[i] = x1[i] * cos[i] - x2[i] * s;
                y2[i] = x1[i] * s + x2[i] * cos[i];
            }
        }
    };
    if inverse {
        // Each task writes one (b, t) row of all heads.
        out.par_chunks_mut(h * d).enumerate().for_each(|(bt, dst)| {
            let (bi, ti) = (bt / t, bt % t);
            let row = if shared { ti } else { bt };
            for (hi, dst) in dst.chunks_exact_mut(d).enumerate() {
                rotate(&x[((bi * h + hi) * t + ti) * d..][..d], dst, row);
            }
        });
    } else {
        // Each task writes one head of one row, all its positions.
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, dst)| {
            let (bi, hi) = (bh / h, bh % h);
            for (ti, dst) in dst.chunks_exact_mut(d).enumerate() {
                let row = if shared { ti } else { bi * t + ti };
                rotate(&x[((bi * t + ti) * h + hi) * d..][..d], dst, row);
            }
        });
    }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "train-split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(l, false)?;
        let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("split_heads needs a contiguous input") };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end], dims, false)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[start..end], dims, false)?),
            _ => candle_core::bail!("split_heads supports f32 and f64"),
        };
        Ok((out, Shape::from((dims.b, dims.h, dims.t, dims.d))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        fn dx<T: candle_core::WithDType + num_traits::Float>(op: &SplitHeads, dy: &Tensor) -> candle_core::Result<Tensor> {
            let dims = op.dims(dy.layout(), true)?;
            let dx = with_values::<T, _>(dy, |dy| op.run(dy, dims, true))??;
            Tensor::from_vec(dx, (dims.b, dims.t, dims.h * dims.d), &Device::Cpu)
        }
        match dy.dtype() {
            DType::F32 => dx::<f32>(self, dy).map(Some),
            DType::F64 => dx::<f64>(self, dy).map(Some),
            dt => candle_core::bail!("split_heads supports f32 and f64, not {dt:?}"),
        }
    }
}

/// A LoRA linear layer `x Wᵀ (+ bias) + scale · ((x ∘ m) Aᵀ) Bᵀ` for x (..., in), with W and
/// the bias frozen and m the optional dropout mask of the adapter's input, as one node: the
/// base output, the dropped input, the rank-r intermediate, the update and their sum are not
/// kept for the backward pass, which computes `dx = dy W + scale · ((dy B) A) ∘ m`,
/// `dA = scale · (dy B)ᵀ (x ∘ m)` and `dB = scale · dyᵀ ((x ∘ m) Aᵀ)`, never W's gradient.
/// The mask is drawn once, as bits the node keeps for the backward pass (not as a tensor), and,
/// unlike a product with a constant tensor in candle's graph, gets no gradient of its own.
pub fn lora_linear(x: &Tensor, layer: &LoraLayer) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(layer.a, layer.b, LoraLinear::new(layer))
}

/// One LoRA linear layer of [`lora_linear`]: its frozen weight and bias, its factors A (r, in)
/// and B (out, r), their scale, and the adapter's dropout.
pub struct LoraLayer<'a> {
    pub w: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
    pub dropout: Option<Dropout>,
}

impl LoraLayer<'_> {
    /// Whether [`gated_lora`] can stack this layer's factors with `other`'s: the same shapes
    /// and dtype.
    pub fn stacks_with(&self, other: &LoraLayer) -> bool {
        self.a.dims() == other.a.dims()
            && self.b.dims() == other.b.dims()
            && self.w.dims() == other.w.dims()
            && self.a.dtype() == other.a.dtype()
            && self.b.dtype() == other.b.dtype()
    }

    /// Whether [`qkv_heads`] can stack this layer's factors (q's) with k's and v's: A of one
    /// shape and dtype, and k and v of one shape.
    pub fn stacks_as_qkv(&self, k: &LoraLayer, v: &LoraLayer) -> bool {
        [k, v].iter().all(|l| l.a.dims() == self.a.dims() && l.a.dtype() == self.a.dtype() && l.b.dtype() == self.b.dtype())
            && k.b.dims() == v.b.dims()
            && k.w.dims() == v.w.dims()
    }
}

/// The gated MLP's input `silu(gate(x)) · up(x)` of two [`lora_linear`] layers that read the same
/// x (..., in), as one node. As three (the two layers and [`swiglu`]), the backward pass gave
/// each of gate(x), up(x) and x a zeroed gradient and an add, and copied gate(x), up(x) and
/// the output gradient out of their tensors; here the node keeps gate(x) and up(x) and adds the
/// two layers' gradients of x once. The layers' factors travel stacked, A as (2r, in) and B as
/// (2·out, r): a custom op takes at most three inputs (the stacking adds two small nodes).
///
/// One backward pass per forward pass: the backward pass hands gate(x) and up(x) back.
pub fn gated_lora(x: &Tensor, gate: &LoraLayer, up: &LoraLayer) -> candle_core::Result<Tensor> {
    if !gate.stacks_with(up) {
        candle_core::bail!("gated_lora: gate {:?}, {:?} and up {:?}, {:?} differ", gate.a.dims(), gate.b.dims(), up.a.dims(), up.b.dims());
    }
    let (a, b) = (Tensor::cat(&[gate.a, up.a], 0)?, Tensor::cat(&[gate.b, up.b], 0)?);
    let op = GatedLora { gate: LoraLinear::new(gate), up: LoraLinear::new(up), saved: std::sync::Mutex::new(None) };
    x.contiguous()?.apply_op3(&a, &b, op)
}

struct GatedLora {
    gate: LoraLinear,
    up: LoraLinear,
    /// gate(x) and up(x), with their shape, from the forward pass for the backward pass.
    saved: std::sync::Mutex<Option<(CpuStorage, CpuStorage, Shape)>>,
}

impl CustomOp3 for GatedLora {
    fn name(&self) -> &'static str {
        "train-gated-lora"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // Each layer's half of the stacked factors, in place.
        let ((r2, k), (n2, r)) = (l2.shape().dims2()?, l3.shape().dims2()?);
        if !l2.is_contiguous() || !l3.is_contiguous() || r2 % 2 != 0 || n2 % 2 != 0 {
            candle_core::bail!("gated_lora: stacked factors {:?} and {:?}", l2.dims(), l3.dims());
        }
        let half = |l: &Layout, rows: usize, cols: usize, second: bool| {
            Layout::contiguous_with_offset((rows, cols), l.start_offset() + if second { rows * cols } else { 0 })
        };
        let (a_gate, a_up) = (half(l2, r2 / 2, k, false), half(l2, r2 / 2, k, true));
        let (b_gate, b_up) = (half(l3, n2 / 2, r, false), half(l3, n2 / 2, r, true));
        let (g, shape) = self.gate.cpu_fwd(s1, l1, s2, &a_gate, s3, &b_gate)?;
        let (u, _) = self.up.cpu_fwd(s1, l1, s2, &a_up, s3, &b_up)?;
        let out = match (&g, &u) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(swiglu_fwd(g, u)),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => CpuStorage::F64(swiglu_fwd(g, u)),
            _ => candle_core::bail!("gated_lora supports f32 and f64"),
        };
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("gated_lora: poisoned".into()))? = Some((g, u, shape.clone()));
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().map_err(|_| candle_core::Error::Msg("gated_lora: poisoned".into()))?.take();
        let Some((g, u, shape)) = saved else { candle_core::bail!("gated_lora: a backward pass without its forward") };
        fn swiglu_grads<T: SwiGluElem + candle_core::WithDType>(
            g: &CpuStorage,
            u: &CpuStorage,
            dy: &Tensor,
            shape: &Shape,
        ) -> candle_core::Result<(Tensor, Tensor)> {
            let (g, u) = (T::cpu_storage_as_slice(g)?, T::cpu_storage_as_slice(u)?);
            let (dg, du) = with_values::<T, _>(dy, |dy| swiglu_bwd(g, u, dy))?;
            Ok((Tensor::from_vec(dg, shape, &Device::Cpu)?, Tensor::from_vec(du, shape, &Device::Cpu)?))
        }
        let (dg, du) = match dy.dtype() {
            DType::F32 => swiglu_grads::<f32>(&g, &u, dy, &shape)?,
            DType::F64 => swiglu_grads::<f64>(&g, &u, dy, &shape)?,
            dt => candle_core::bail!("gated_lora supports f32 and f64, not {dt:?}"),
        };
        let (r, n) = (a.dim(0)? / 2, b.dim(0)? / 2);
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let (dx, da, db) = layers_grads(
            &x,
            &[(&self.gate, a.narrow(0, 0, r)?, b.narrow(0, 0, n)?, dg), (&self.up, a.narrow(0, r, r)?, b.narrow(0, n, n)?, du)],
        )?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// q, k and v of one attention layer from the same x (B, T, in) as one node: three
/// [`lora_linear`] layers and their [`split_heads`], q and k rotated by the tables `rope`. As
/// six nodes, the backward pass gave x three gradients to add, and each of the six outputs a
/// zeroed gradient and an add. The output holds q (B, H, T, D), then k and v (B, KV, T, D),
/// one after another as a (B·(H + 2·KV)·T, D) tensor, which [`stacked_attention`] reads. The
/// factors travel stacked, A as (3r, in) and B as (out_q + 2·out_kv, r), as in [`gated_lora`].
pub fn qkv_heads(
    x: &Tensor,
    [q, k, v]: [&LoraLayer; 3],
    heads: usize,
    kv_heads: usize,
    rope: (&Tensor, &Tensor),
) -> candle_core::Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nq, nkv) = (q.b.dim(0)?, k.b.dim(0)?);
    if !q.stacks_as_qkv(k, v) || heads == 0 || kv_heads == 0 || nq * kv_heads != nkv * heads {
        candle_core::bail!(
            "qkv_heads: q {:?}, {:?}, k {:?}, {:?} and v {:?}, {:?} for {heads} and {kv_heads} heads",
            q.a.dims(),
            q.b.dims(),
            k.a.dims(),
            k.b.dims(),
            v.a.dims(),
            v.b.dims()
        );
    }
    let split = [
        SplitHeads::new((b, t, nq), heads, Some(rope))?,
        SplitHeads::new((b, t, nkv), kv_heads, Some(rope))?,
        SplitHeads::new((b, t, nkv), kv_heads, None)?,
    ];
    let (a, bs) = (Tensor::cat(&[q.a, k.a, v.a], 0)?, Tensor::cat(&[q.b, k.b, v.b], 0)?);
    let op = QkvHeads { layers: [q, k, v].map(LoraLinear::new), split, widths: [nq, nkv, nkv] };
    x.contiguous()?.apply_op3(&a, &bs, op)
}

struct QkvHeads {
    layers: [LoraLinear; 3],
    split: [SplitHeads; 3],
    /// The outputs of q, k and v.
    widths: [usize; 3],
}

impl QkvHeads {
    /// Part i's rows of the stacked A (r rows each) and B ([`Self::b_rows`]), in place.
    fn factor_layouts(&self, i: usize, a: &Layout, b: &Layout) -> candle_core::Result<(Layout, Layout)> {
        let ((r3, k), (n, r)) = (a.shape().dims2()?, b.shape().dims2()?);
        if !a.is_contiguous() || !b.is_contiguous() || r3 != 3 * r || n != self.widths.iter().sum::<usize>() {
            candle_core::bail!("qkv_heads: stacked factors {:?} and {:?}", a.dims(), b.dims());
        }
        let rows = self.b_rows(i);
        Ok((
            Layout::contiguous_with_offset((r, k), a.start_offset() + i * r * k),
            Layout::contiguous_with_offset((rows.len(), r), b.start_offset() + rows.start * r),
        ))
    }

    /// Part i's rows of the stacked B (and of the layers' stacked outputs).
    fn b_rows(&self, i: usize) -> std::ops::Range<usize> {
        let first = self.widths[..i].iter().sum();
        first..first + self.widths[i]
    }

    /// The three layers' outputs (B, T, width) split into heads, one after another.
    fn stack<T: candle_core::WithDType + num_traits::Float>(&self, ys: &[(CpuStorage, Shape)]) -> candle_core::Result<Vec<T>> {
        let total = ys.iter().map(|(_, shape)| shape.elem_count()).sum();
        let mut out = vec![T::zero(); total];
        let mut rest = out.as_mut_slice();
        for ((y, shape), split) in ys.iter().zip(&self.split) {
            let (part, tail) = rest.split_at_mut(shape.elem_count());
            split.run_into(T::cpu_storage_as_slice(y)?, split.dims(&Layout::contiguous(shape), false)?, false, part)?;
            rest = tail;
        }
        Ok(out)
    }
}

impl CustomOp3 for QkvHeads {
    fn name(&self) -> &'static str {
        "train-qkv-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut ys = Vec::with_capacity(3);
        for (i, layer) in self.layers.iter().enumerate() {
            let (a, b) = self.factor_layouts(i, l2, l3)?;
            ys.push(layer.cpu_fwd(s1, l1, s2, &a, s3, &b)?);
        }
        let d = self.widths[0] / self.split[0].heads;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.stack::<f32>(&ys)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.stack::<f64>(&ys)?),
            _ => candle_core::bail!("qkv_heads supports f32 and f64"),
        };
        let rows = ys.iter().map(|(_, shape)| shape.elem_count()).sum::<usize>() / d;
        Ok((out, Shape::from((rows, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let (bt, r, d) = (x.elem_count() / x.dim(D::Minus1)?, a.dim(0)? / 3, dy.dim(1)?);
        let mut parts = Vec::with_capacity(3);
        for (i, (layer, split)) in self.layers.iter().zip(&self.split).enumerate() {
            // Part i of dy, (B, heads, T, D), back to (B, T, width).
            let b_rows = self.b_rows(i);
            let part = dy.narrow(0, bt * b_rows.start / d, bt * b_rows.len() / d)?.reshape((x.dim(0)?, split.heads, x.dim(1)?, d))?;
            let Some(dy_i) = split.bwd(&part, &part, &part)? else { candle_core::bail!("qkv_heads: no gradient of a split") };
            parts.push((layer, a.narrow(0, i * r, r)?, b.narrow(0, b_rows.start, b_rows.len())?, dy_i));
        }
        let (dx, da, db) = layers_grads(&x, &parts)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// Causal [`attention`] over the stacked q, k and v of [`qkv_heads`] (B·(H + 2·KV)·T, D), for
/// `b` rows of `t` positions: (B, T, H·D). One node, so that q, k and v need no nodes of their
/// own between the two.
pub fn stacked_attention(
    qkv: &Tensor,
    (b, t): (usize, usize),
    heads: usize,
    kv_heads: usize,
    pads: &[usize],
) -> candle_core::Result<Tensor> {
    let (rows, d) = qkv.dims2()?;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || rows != b * (heads + 2 * kv_heads) * t || pads.len() != b {
        candle_core::bail!("stacked_attention: {:?} for {b} rows of {t}, {heads} and {kv_heads} heads, {} pads", qkv.dims(), pads.len());
    }
    let dims = super::attention_blocks::Dims { b, h: heads, kv: kv_heads, t, l: t, d };
    qkv.contiguous()?.apply_op1(StackedAttention { dims, pads: pads.to_vec() })
}

struct StackedAttention {
    dims: super::attention_blocks::Dims,
    pads: Vec<usize>,
}

impl StackedAttention {
    /// q (B, H, T, D), k and v (B, KV, T, D) as views of the stacked tensor.
    fn parts(&self, qkv: &Tensor) -> candle_core::Result<[Tensor; 3]> {
        let super::attention_blocks::Dims { b, h, kv, t, d, .. } = self.dims;
        let (nq, nkv) = (b * h * t, b * kv * t);
        Ok([
            qkv.narrow(0, 0, nq)?.reshape((b, h, t, d))?,
            qkv.narrow(0, nq, nkv)?.reshape((b, kv, t, d))?,
            qkv.narrow(0, nq + nkv, nkv)?.reshape((b, kv, t, d))?,
        ])
    }
}

impl CustomOp1 for StackedAttention {
    fn name(&self) -> &'static str {
        "train-stacked-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let [q, k, v] = self.parts(&storage_tensor(s, l)?)?;
        tensor_storage(&attention_forward(&q, &k, &v, &self.pads)?)
    }

    fn bwd(&self, qkv: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [q, k, v] = self.parts(&qkv.detach())?;
        let (dq, dk, dv) = attention_grads(&q, &k, &v, &self.pads, dy)?;
        Ok(Some(Tensor::cat(&[dq.flatten_to(2)?, dk.flatten_to(2)?, dv.flatten_to(2)?], 0)?))
    }
}

/// LoRA dropout: each input element is zeroed with probability `p`, the mask drawn from `seed`
/// by [`dropout_mask`].
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    /// Elements whose hash (its top 53 bits) is below this are dropped: exact for any p in [0, 1).
    fn threshold(&self) -> u64 {
        (self.p * (1u64 << 53) as f64) as u64
    }

    /// `x ∘ m` for x (rows, cols): element i survives when position i of the SplitMix64
    /// stream `seed` clears [`Self::threshold`], and is then scaled by 1 / (1 − p).
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply_kept(&self.kept(x.elem_count()), x)
    }

    /// Which of `len` input elements survive, one bit each (bit i % 64 of word i / 64): the
    /// forward pass draws them once and the backward pass reuses them.
    fn kept(&self, len: usize) -> Vec<u64> {
        use rayon::prelude::*;
        const WORDS: usize = 256;
        let (seed, threshold) = (self.seed, self.threshold());
        let mut words = vec![0u64; len.div_ceil(64)];
        words.par_chunks_mut(WORDS).enumerate().for_each(|(c, chunk)| kept_words(seed, threshold, (c * WORDS * 64) as u64, chunk));
        words
    }

    /// `x ∘ m` for the mask whose kept elements are `kept`'s bits.
    fn apply_kept(&self, kept: &[u64], x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("dropout needs a contiguous input") };
        if kept.len() != (end - start).div_ceil(64) {
            candle_core::bail!("a dropout mask of {} words for {} elements", kept.len(), end - start);
        }
        let out = match &*storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => CpuStorage::F32(self.masked(kept, &v[start..end])),
            candle_core::Storage::Cpu(CpuStorage::F64(v)) => CpuStorage::F64(self.masked(kept, &v[start..end])),
            _ => candle_core::bail!("dropout runs on f32 or f64 CPU tensors"),
        };
        storage_tensor(&out, &Layout::contiguous(x.shape()))
    }

    fn masked<T: candle_core::WithDType + MaskedElem>(&self, kept: &[u64], x: &[T]) -> Vec<T> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let keep = T::from_f64(1.0 / (1.0 - self.p));
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).enumerate().for_each(|(c, (out, x))| {
            T::masked(&kept[c * CHUNK / 64..], x, keep, out);
        });
        out
    }
}

/// The element types dropout runs on, each with its fastest masking loop.
trait MaskedElem: num_traits::Float + Send + Sync {
    /// `out[j] = x[j] · keep` where bit j of `words` is set; the rest of `out` stays 0.
    fn masked(words: &[u64], x: &[Self], keep: Self, out: &mut [Self]);
}

impl MaskedElem for f64 {
    fn masked(words: &[u64], x: &[f64], keep: f64, out: &mut [f64]) {
        masked_plain(words, x, keep, out)
    }
}

impl MaskedElem for f32 {
    fn masked(words: &[u64], x: &[f32], keep: f32, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was just detected.
                return unsafe { masked_f32_avx512(words, x, keep, out) };
            }
        }
        masked_plain(words, x, keep, out)
    }
}

/// `out[j] = x[j] · keep` where bit j of `words` is set; the rest of `out` stays 0.
fn masked_plain<T: num_traits::Float>(words: &[u64], x: &[T], keep: T, out: &mut [T]) {
    for ((out, x), &word) in out.chunks_mut(64).zip(x.chunks(64)).zip(words) {
        let mut bits = word;
        for (o, &v) in out.iter_mut().zip(x) {
            if bits & 1 == 1 {
                *o = v * keep;
            }
            bits >>= 1;
        }
    }
}

/// [`masked_plain`] for f32, 16 lanes a step: each multiply runs under 16 bits of the mask and
/// zeroes the other lanes, the same products bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn masked_f32_avx512(words: &[u64], x: &[f32], keep: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let whole = x.len() / 16;
    let scale = _mm512_set1_ps(keep);
    for g in 0..whole {
        let bits = (words[g / 4] >> (16 * (g % 4))) as u16;
        // SAFETY: 16 * (g + 1) <= x.len() = out.len(), and unaligned loads and stores are allowed.
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr().add(16 * g));
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * g), _mm512_maskz_mul_ps(bits, v, scale));
        }
    }
    let done = 16 * whole;
    if done < x.len() {
        // The tail starts on a word boundary only when `done` is a multiple of 64: shift the word.
        let mut bits = words[done / 64] >> (done % 64);
        for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
            if bits & 1 == 1 {
                *o = v * keep;
            }
            bits >>= 1;
        }
    }
}

/// Bits of the kept elements `first..` of a dropout stream, 64 per word: element i is kept when
/// its SplitMix64 hash (top 53 bits) clears `threshold`. The hashes are integer work, so every
/// build gives the same bits; AVX-512DQ multiplies 64-bit lanes in one instruction.
fn kept_words(seed: u64, threshold: u64, first: u64, words: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512dq")]
        unsafe fn wide(seed: u64, threshold: u64, first: u64, words: &mut [u64]) {
            kept_words_plain(seed, threshold, first, words)
        }
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
            // SAFETY: the features were just detected.
            return unsafe { wide(seed, threshold, first, words) };
        }
    }
    kept_words_plain(seed, threshold, first, words)
}

#[inline(always)]
fn kept_words_plain(seed: u64, threshold: u64, first: u64, words: &mut [u64]) {
    use crate::seed::splitmix64;
    for (w, word) in words.iter_mut().enumerate() {
        let base = first + 64 * w as u64;
        let mut bits = 0u64;
        for b in 0..64u64 {
            let i = base + b;
            let kept = splitmix64(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 11 >= threshold;
            bits |= (kept as u64) << b;
        }
        *word = bits;
    }
}

/// The dropout mask of an (rows, cols) input, [`Dropout::apply`]'s: each element is 0 with
/// probability `p`, else 1 / (1 − p).
pub fn dropout_mask(rows: usize, cols: usize, p: f64, seed: u64, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let exact = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let ones = Tensor::ones((rows, cols), exact, &Device::Cpu)?;
    Dropout { p, seed }.apply(&ones)?.to_device(device)?.to_dtype(dtype)
}

struct LoraLinear {
    w: Tensor,
    bias: Option<Tensor>,
    scale: f64,
    dropout: Option<Dropout>,
    /// The dropout mask's bits, drawn by the forward pass for the backward pass.
    kept: std::sync::OnceLock<Vec<u64>>,
    /// `(x ∘ m) Aᵀ` of an f32 forward ([`super::lora_rows`]), kept for the backward pass.
    xa: std::sync::OnceLock<Vec<f32>>,
}

impl LoraLinear {
    fn new(layer: &LoraLayer) -> Self {
        LoraLinear {
            w: layer.w.clone(),
            bias: layer.bias.cloned(),
            scale: layer.scale,
            dropout: layer.dropout,
            kept: std::sync::OnceLock::new(),
            xa: std::sync::OnceLock::new(),
        }
    }

    /// `t ∘ m` for this node's dropout mask m (t itself without dropout).
    fn dropped(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        match (&self.dropout, self.kept_bits(t.elem_count())) {
            (Some(d), Some(kept)) => d.apply_kept(kept, t),
            _ => Ok(t.clone()),
        }
    }

    /// The dropout mask's bits for an input of `len` elements (drawn once), if any.
    fn kept_bits(&self, len: usize) -> Option<&[u64]> {
        self.dropout.as_ref().map(|d| self.kept.get_or_init(|| d.kept(len)).as_slice())
    }

    /// `(first, x, out) ↦ out = x ∘ m` over the mask's elements from `first` (a multiple of 64).
    fn mask<'k>(&self, kept: Option<&'k [u64]>) -> Option<impl Fn(usize, &[f32], &mut [f32]) + Sync + 'k> {
        let keep = (1.0 / (1.0 - self.dropout?.p)) as f32;
        kept.map(move |kept| move |first: usize, x: &[f32], out: &mut [f32]| f32::masked(&kept[first / 64..], x, keep, out))
    }
}

impl LoraLinear {
    /// The f32 backward pass: (dx, dA, dB), dx added into `sum` when given (the nodes that run
    /// several layers over one x sum their gradients of x there, with no tensor for each).
    fn grads_f32(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
        sum: Option<Vec<f32>>,
    ) -> candle_core::Result<(Vec<f32>, Tensor, Tensor)> {
        let Some(xa) = self.xa.get() else { candle_core::bail!("train-lora-linear: a backward pass without its forward") };
        let ((r, k), (n, _)) = (a.dims2()?, b.dims2()?);
        // The factors are small: copies of them cost nothing next to x and dy.
        let (av, bt) = (a.flatten_all()?.to_vec1::<f32>()?, super::lora_rows::transposed(&b.flatten_all()?.to_vec1::<f32>()?, n, r));
        let factors = super::lora_rows::Factors { a: &av, bt: &bt, r, k, n, scale: self.scale as f32 };
        let dy = &dy.contiguous()?;
        let rows = x.elem_count() / k;
        let mut dx = with_values::<f32, _>(&self.w, |w| {
            with_values::<f32, _>(dy, |dys| match sum {
                Some(mut sum) if sum.len() == rows * k => {
                    super::gemm_views::add_times(dys, w, rows, n, k, &mut sum);
                    Ok(sum)
                }
                Some(_) => candle_core::bail!("train-lora-linear: a gradient sum of another shape"),
                None => Ok(super::gemm_views::times(dys, w, rows, n, k)),
            })
        })???;
        let grads = with_values::<f32, _>(x, |xs| {
            with_values::<f32, _>(dy, |dys| {
                let kept = self.kept_bits(xs.len());
                super::lora_rows::backward(xs, xa, dys, &factors, self.mask(kept).as_ref().map(|m| m as _), &mut dx)
            })
        })???;
        Ok((dx, Tensor::from_vec(grads.a, a.shape(), a.device())?, Tensor::from_vec(grads.b, b.shape(), b.device())?))
    }
}

/// The backward pass of several [`LoraLinear`] layers that read the same x, each given its
/// factors and its output's gradient: x's gradient summed over the layers (in place in f32),
/// and the factors' gradients stacked in layer order, (dx, dA, dB).
fn layers_grads(x: &Tensor, layers: &[(&LoraLinear, Tensor, Tensor, Tensor)]) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (mut das, mut dbs) = (Vec::with_capacity(layers.len()), Vec::with_capacity(layers.len()));
    let dx = if x.dtype() == DType::F32 {
        let mut sum = None;
        for (layer, a, b, dy) in layers {
            let (dx, da, db) = layer.grads_f32(x, a, b, dy, sum.take())?;
            sum = Some(dx);
            das.push(da);
            dbs.push(db);
        }
        let Some(sum) = sum else { candle_core::bail!("layers_grads: no layers") };
        Tensor::from_vec(sum, x.shape(), x.device())?
    } else {
        let mut sum: Option<Tensor> = None;
        for (layer, a, b, dy) in layers {
            let (Some(dx), Some(da), Some(db)) = layer.bwd(x, a, b, dy, dy)? else {
                candle_core::bail!("layers_grads: a layer without its gradients")
            };
            sum = Some(match sum {
                Some(s) => (s + dx)?,
                None => dx,
            });
            das.push(da);
            dbs.push(db);
        }
        let Some(sum) = sum else { candle_core::bail!("layers_grads: no layers") };
        sum
    };
    Ok((dx, Tensor::cat(&das, 0)?, Tensor::cat(&dbs, 0)?))
}

/// The shape of a linear layer's output for an input of `x` (..., k): (..., n).
fn rows_shape(x: &Shape, k: usize, n: usize) -> candle_core::Result<Shape> {
    match x.dims().split_last() {
        Some((&last, lead)) if last == k && k > 0 => Ok(Shape::from([lead, &[n]].concat())),
        _ => candle_core::bail!("linear layer: input {:?} for {k} inputs", x.dims()),
    }
}

/// The contiguous values of a CPU tensor of T, lent to `f`.
fn with_values<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("expected a contiguous tensor") };
    match &*storage {
        candle_core::Storage::Cpu(s) => Ok(f(&T::cpu_storage_as_slice(s)?[start..end])),
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}

/// A CPU storage's values, if they are f32 and contiguous.
fn f32_values<'s>(s: &'s CpuStorage, l: &Layout) -> Option<&'s [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Some(&v[start..end]),
        _ => None,
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "train-lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((r, k), (n, _)) = (l2.shape().dims2()?, l3.shape().dims2()?);
        // x is (..., in): its leading axes are rows, so the caller needs no reshape node (each
        // costs the backward pass a zeroed gradient and an add).
        let out_shape = rows_shape(l1.shape(), k, n)?;
        let rows = l1.shape().elem_count() / k;
        if let (Some(xs), Some(av), Some(bv)) = (f32_values(s1, l1), f32_values(s2, l2), f32_values(s3, l3)) {
            if self.w.dims() != [n, k] {
                candle_core::bail!("train-lora-linear: weight {:?} for x {:?} and B {:?}", self.w.dims(), l1.dims(), l3.dims());
            }
            if self.bias.as_ref().is_some_and(|bias| bias.elem_count() != n) {
                candle_core::bail!("train-lora-linear: a bias of {:?} for {n} outputs", self.bias.as_ref().map(Tensor::dims));
            }
            let mut out = with_values::<f32, _>(&self.w, |w| super::gemm_views::times_transposed(xs, w, rows, k, n))?;
            if let Some(bias) = &self.bias {
                with_values::<f32, _>(bias, |bias| out.chunks_mut(n).for_each(|y| y.iter_mut().zip(bias).for_each(|(y, b)| *y += b)))?;
            }
            let bt = super::lora_rows::transposed(bv, n, r);
            let factors = super::lora_rows::Factors { a: av, bt: &bt, r, k, n, scale: self.scale as f32 };
            let kept = self.kept_bits(xs.len());
            let xa = super::lora_rows::forward(xs, &factors, self.mask(kept).as_ref().map(|m| m as _), &mut out)?;
            let _ = self.xa.set(xa);
            return Ok((CpuStorage::F32(out), out_shape));
        }
        let (x, a, b) = (storage_tensor(s1, l1)?.reshape((rows, k))?, storage_tensor(s2, l2)?, storage_tensor(s3, l3)?);
        let mut y = x.matmul(&self.w.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let y = (y + (self.dropped(&x)?.matmul(&a.t()?)? * self.scale)?.matmul(&b.t()?)?)?;
        tensor_storage(&y.reshape(out_shape)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        if x.dtype() == DType::F32 {
            let (dx, da, db) = self.grads_f32(&x, &a, &b, dy, None)?;
            return Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(da), Some(db)));
        }
        let (k, n) = (a.dim(1)?, b.dim(0)?);
        let (shape, rows) = (x.shape().clone(), x.elem_count() / k);
        let (x, dy) = (x.reshape((rows, k))?, dy.reshape((rows, n))?);
        let xm = self.dropped(&x)?;
        let dyb = (dy.matmul(&b)? * self.scale)?;
        let dxm = dyb.matmul(&a)?;
        let dxm = self.dropped(&dxm)?;
        let dx = (dy.matmul(&self.w)? + dxm)?;
        let da = dyb.t()?.matmul(&xm)?;
        let db = dy.t()?.matmul(&(xm.matmul(&a.t()?)? * self.scale)?)?;
        Ok((Some(dx.reshape(shape)?), Some(da), Some(db)))
    }
}

/// The gated MLP activation `silu(gate) · up` as one node, elementwise over equal shapes (f32
/// or f64, CPU). candle's composite keeps silu's input, output and the product alive and runs
/// about ten elementwise passes in the backward; here the forward is one pass and the
/// backward one pass computing `du = dy · silu(g)` and `dg = dy · u · σ(g) · (1 + g (1 − σ(g)))`.
/// Inference uses the same forward.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !supported(gate.device(), gate.dtype()) || gate.shape() != up.shape() {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

/// Elements per parallel task of the elementwise passes.
const SWIGLU_CHUNK: usize = 1 << 14;

/// An element type of the SwiGLU passes, with its sigmoid. Each chunk loop is written once
/// ([`swiglu_chunk_fwd`], [`swiglu_chunk_bwd`]); f32 also builds them for AVX2 + FMA.
trait SwiGluElem: num_traits::Float + Send + Sync {
    fn sigmoid(x: Self) -> Self;

    /// out = silu(g) · u over one chunk.
    fn forward(g: &[Self], u: &[Self], out: &mut [Self]) {
        swiglu_chunk_fwd(g, u, out)
    }

    /// du = dy · silu(g), dg = dy · u · σ(g) · (1 + g (1 − σ(g))) over one chunk.
    fn backward(g: &[Self], u: &[Self], dy: &[Self], dg: &mut [Self], du: &mut [Self]) {
        swiglu_chunk_bwd(g, u, dy, dg, du)
    }
}

impl SwiGluElem for f64 {
    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }
}

/// f32's sigmoid is [`kernels::sigmoid`] (`f32::exp` is a scalar libm call), so the chunk loops
/// vectorise; the AVX2 + FMA build is picked at run time.
impl SwiGluElem for f32 {
    #[inline(always)]
    fn sigmoid(x: f32) -> f32 {
        kernels::sigmoid(x)
    }

    fn forward(g: &[f32], u: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                return unsafe { swiglu_avx2::forward(g, u, out) };
            }
        }
        swiglu_chunk_fwd(g, u, out)
    }

    fn backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                return unsafe { swiglu_avx2::backward(g, u, dy, dg, du) };
            }
        }
        swiglu_chunk_bwd(g, u, dy, dg, du)
    }
}

#[inline(always)]
fn swiglu_chunk_fwd<T: SwiGluElem>(g: &[T], u: &[T], out: &mut [T]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g * T::sigmoid(g) * u;
    }
}

#[inline(always)]
fn swiglu_chunk_bwd<T: SwiGluElem>(g: &[T], u: &[T], dy: &[T], dg: &mut [T], du: &mut [T]) {
    let n = g.len();
    let (u, dy, dg, du) = (&u[..n], &dy[..n], &mut dg[..n], &mut du[..n]);
    for i in 0..n {
        let s = T::sigmoid(g[i]);
        du[i] = dy[i] * g[i] * s;
        dg[i] = dy[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
    }
}

/// The f32 chunk loops built for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
mod swiglu_avx2 {
    use super::{swiglu_chunk_bwd, swiglu_chunk_fwd};

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward(g: &[f32], u: &[f32], out: &mut [f32]) {
        swiglu_chunk_fwd(g, u, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        swiglu_chunk_bwd(g, u, dy, dg, du)
    }
}

fn swiglu_fwd<T: SwiGluElem>(g: &[T], u: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(SWIGLU_CHUNK)
        .zip(g.par_chunks(SWIGLU_CHUNK))
        .zip(u.par_chunks(SWIGLU_CHUNK))
        .for_each(|((o, g), u)| T::forward(g, u, o));
    out
}

fn swiglu_bwd<T: SwiGluElem>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    use rayon::prelude::*;
    let (mut dg, mut du) = (vec![T::zero(); g.len()], vec![T::zero(); g.len()]);
    dg.par_chunks_mut(SWIGLU_CHUNK)
        .zip(du.par_chunks_mut(SWIGLU_CHUNK))
        .zip(g.par_chunks(SWIGLU_CHUNK).zip(u.par_chunks(SWIGLU_CHUNK)).zip(dy.par_chunks(SWIGLU_CHUNK)))
        .for_each(|((dg, du), ((g, u), dy))| T::backward(g, u, dy, dg, du));
    (dg, du)
}

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("swiglu needs contiguous inputs")
        };
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(swiglu_fwd(&g[a..b], &u[c..d])),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => CpuStorage::F64(swiglu_fwd(&g[a..b], &u[c..d])),
            _ => candle_core::bail!("swiglu supports f32 and f64 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (shape, dev) = (g.shape(), g.device());
        let (dg, du) = match g.dtype() {
            DType::F64 => {
                let v = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
                let (dg, du) = swiglu_bwd(&v(g)?, &v(u)?, &v(dy)?);
                (Tensor::from_vec(dg, shape, dev)?, Tensor::from_vec(du, shape, dev)?)
            }
            _ => {
                let v = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                let (dg, du) = swiglu_bwd(&v(g)?, &v(u)?, &v(dy)?);
                (Tensor::from_vec(dg, shape, dev)?, Tensor::from_vec(du, shape, dev)?)
            }
        };
        Ok((Some(dg), Some(du)))
    }
}

/// `log softmax(logits)[target]` per row: logits (..., V) and u32 targets (...) give (...). The
/// (rows, V) log-softmax is never stored: the forward keeps one number per row, and the
/// backward, `dy · (onehot(target) − softmax(logits))`, recomputes the row's log-sum-exp.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if !supported(logits.device(), logits.dtype()) {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        return logp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1);
    }
    let lead = logits.dims()[..logits.rank() - 1].to_vec();
    if targets.dims() != lead.as_slice() || targets.dtype() != DType::U32 {
        candle_core::bail!("target_logprobs: targets {:?} ({:?}) for logits {:?}", targets.dims(), targets.dtype(), logits.dims());
    }
    logits.contiguous()?.apply_op2(&targets.contiguous()?, TargetLogprobs)
}

struct TargetLogprobs;

/// The log-softmax pieces of one vocabulary row, f32 rows through the vectorised exp of the
/// attention kernels (49k-wide rows, three passes per completion token), f64 rows exact.
trait SoftmaxRow: candle_core::WithDType + num_traits::Float {
    /// log sum_j exp(row[j]), the sum in f64.
    fn log_sum_exp(row: &[Self]) -> f64;
    /// row[j] = scale * exp(row[j] - lse), in place.
    fn exp_scaled(row: &mut [Self], lse: Self, scale: Self);
}

impl SoftmaxRow for f32 {
    fn log_sum_exp(row: &[f32]) -> f64 {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        max as f64 + kernels::exp_sum(row, max).ln()
    }
    fn exp_scaled(row: &mut [f32], lse: f32, scale: f32) {
        kernels::exp_scaled(row, lse, scale)
    }
}

impl SoftmaxRow for f64 {
    fn log_sum_exp(row: &[f64]) -> f64 {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln()
    }
    fn exp_scaled(row: &mut [f64], lse: f64, scale: f64) {
        for x in row.iter_mut() {
            *x = scale * (*x - lse).exp();
        }
    }
}

fn target_logprobs_fwd<T: SoftmaxRow>(x: &[T], t: &[u32], v: usize) -> candle_core::Result<Vec<T>> {
    use rayon::prelude::*;
    if t.iter().any(|&id| id as usize >= v) {
        candle_core::bail!("target_logprobs: a target id is outside the vocabulary of {v}");
    }
    Ok(x.par_chunks(v).zip(t.par_iter()).map(|(row, &id)| T::from_f64(row[id as usize].to_f64() - T::log_sum_exp(row))).collect())
}

fn target_logprobs_bwd<T: SoftmaxRow>(x: &[T], t: &[u32], dy: &[T], v: usize) -> Vec<T> {
    use rayon::prelude::*;
    let mut dx = x.to_vec();
    dx.par_chunks_mut(v).zip(t.par_iter().zip(dy.par_iter())).for_each(|(row, (&id, &g))| {
        // d logp(id) / d x_j = [j = id] - softmax_j.
        let lse = T::from_f64(T::log_sum_exp(row));
        T::exp_scaled(row, lse, -g);
        row[id as usize] += g;
    });
    dx
}

impl candle_core::CustomOp2 for TargetLogprobs {
    fn name(&self) -> &'static str {
        "target-logprobs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = *l1.dims().last().unwrap_or(&1);
        let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("target_logprobs needs contiguous inputs")
        };
        let CpuStorage::U32(t) = s2 else { candle_core::bail!("target_logprobs: targets must be u32") };
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(target_logprobs_fwd(&x[a..b], &t[c..d], v)?),
            CpuStorage::F64(x) => CpuStorage::F64(target_logprobs_fwd(&x[a..b], &t[c..d], v)?),
            _ => candle_core::bail!("target_logprobs supports f32 and f64"),
        };
        Ok((out, l2.shape().clone()))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let v = logits.dim(D::Minus1)?;
        let t = targets.flatten_all()?.to_vec1::<u32>()?;
        let dx = match logits.dtype() {
            DType::F64 => {
                let (x, g) = (logits.flatten_all()?.to_vec1::<f64>()?, dy.flatten_all()?.to_vec1::<f64>()?);
                Tensor::from_vec(target_logprobs_bwd(&x, &t, &g, v), logits.shape(), logits.device())?
            }
            _ => {
                let (x, g) = (logits.flatten_all()?.to_vec1::<f32>()?, dy.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                Tensor::from_vec(target_logprobs_bwd(&x, &t, &g, v), logits.shape(), logits.device())?
            }
        };
        Ok((Some(dx), None))
    }
}

/// Rows of the output projection computed at once by [`head_target_logprobs`]: 256 rows of a
/// 49k vocabulary are 50 MB of f32 logits; fewer rows pay for packing the 113 MB head once per chunk.
const HEAD_CHUNK_ROWS: usize = 256;

/// `log softmax([h Wᵀ, h Eᵀ])[target]` for each row of `hidden` (N, D): the output projection
/// and the target's log-probability as one node, with W (V₀, D) frozen and E (A, D) the added
/// tokens' output rows, trainable (`None`: no added tokens). The (N, V₀ + A) logits never exist
/// whole: the forward runs over chunks of rows. With `dz = dy (onehot − softmax)`, the
/// backward needs `dh = dz [W; E]` and `dE = dz[:, V₀..]ᵀ h`; as dy is one number per row, a
/// forward that will be differentiated keeps `(onehot − softmax) [W; E]` (N, D) and the added
/// columns of `onehot − softmax` (N, A), so the backward recomputes nothing.
///
/// With `support`, row i's log-softmax runs over the tokens `support[i]` only (which must hold
/// its target): the distribution a grammar or a code trie masks the logits to. Only those
/// columns of `[W; E]` are computed, so a grammar's dozen tokens cost a dozen dot products, not
/// the vocabulary.
pub fn head_target_logprobs(
    hidden: &Tensor,
    head: &Tensor,
    added: Option<&Tensor>,
    targets: &[u32],
    support: Option<&[Vec<u32>]>,
) -> candle_core::Result<Tensor> {
    let n = hidden.dim(0)?;
    if hidden.rank() != 2 || targets.len() != n || support.is_some_and(|s| s.len() != n) {
        candle_core::bail!(
            "head_target_logprobs: hidden {:?} for {} targets and {:?} supports",
            hidden.dims(),
            targets.len(),
            support.map(<[_]>::len)
        );
    }
    let width = |t: &Tensor| t.dims2().map(|(_, w)| w);
    if head.elem_count() == 0 || width(head)? != hidden.dim(1)? || added.is_some_and(|e| width(e).ok() != Some(hidden.dim(1).unwrap_or(0)))
    {
        candle_core::bail!(
            "head_target_logprobs: head {:?} and added rows {:?} for hidden {:?}",
            head.dims(),
            added.map(Tensor::dims),
            hidden.dims()
        );
    }
    let vocab = head.dim(0)? + added.map_or(Ok(0), |e| e.dim(0))?;
    if let Some(i) = (0..n).find(|&i| targets[i] as usize >= vocab) {
        candle_core::bail!("head_target_logprobs: row {i}'s target {} is outside the vocabulary of {vocab}", targets[i]);
    }
    if let Some(s) = support {
        if let Some(i) = (0..n).find(|&i| s[i].iter().any(|&t| t as usize >= vocab)) {
            candle_core::bail!("head_target_logprobs: row {i}'s support {:?} leaves the vocabulary of {vocab}", s[i]);
        }
        if let Some(i) = (0..n).find(|&i| !s[i].contains(&targets[i])) {
            candle_core::bail!("head_target_logprobs: row {i}'s target {} is not in its support {:?}", targets[i], s[i]);
        }
    }
    let differentiated = hidden.track_op() || added.is_some_and(Tensor::track_op);
    let op = HeadLogprobs {
        head: head.clone(),
        targets: targets.to_vec(),
        support: support.map(<[_]>::to_vec),
        saved: differentiated.then(Default::default),
    };
    match added {
        Some(e) => hidden.contiguous()?.apply_op2(&e.contiguous()?, op),
        None => hidden.contiguous()?.apply_op1(op),
    }
}

struct HeadLogprobs {
    head: Tensor,
    targets: Vec<u32>,
    /// Per row, the tokens its log-softmax runs over (`None`: the whole vocabulary).
    support: Option<Vec<Vec<u32>>>,
    /// What the forward keeps for the backward, when there will be one.
    saved: Option<std::sync::Mutex<Vec<SavedChunk>>>,
}

/// One chunk's share of the backward: with D = onehot(target) − softmax over its columns,
/// `D [W; E]` (rows, D) and, with added rows, D's added columns (rows, A') and which rows of
/// E they are (`None`: all of E).
struct SavedChunk {
    direction: Tensor,
    added: Option<(Tensor, Option<Tensor>)>,
}

/// One chunk's logits (rows, columns) and each row's target column. `columns` are the
/// vocabulary ids of the columns when only a support was computed (ascending), else `None`.
struct ChunkLogits {
    logits: Tensor,
    targets: Vec<u32>,
    columns: Option<Vec<u32>>,
}

impl HeadLogprobs {
    /// The rows of `[W; E]` for vocabulary ids `columns` (ascending), (columns, D).
    fn column_weights(&self, columns: &[u32], added: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let v0 = self.head.dim(0)?;
        let split = columns.partition_point(|&c| (c as usize) < v0);
        let device = self.head.device();
        let base = self.head.index_select(&Tensor::new(&columns[..split], device)?, 0)?;
        match added {
            Some(e) if split < columns.len() => {
                let ids: Vec<u32> = columns[split..].iter().map(|&c| c - v0 as u32).collect();
                Tensor::cat(&[&base, &e.index_select(&Tensor::new(ids.as_slice(), device)?, 0)?], 0)
            }
            _ => Ok(base),
        }
    }

    /// The logits of rows `start..start + len` of h, added tokens last; with a support, only
    /// the union of the rows' supports, each row's others at −∞.
    fn chunk_logits(&self, h: &Tensor, added: Option<&Tensor>, start: usize, len: usize) -> candle_core::Result<ChunkLogits> {
        let rows = h.narrow(0, start, len)?;
        let targets = self.targets[start..start + len].to_vec();
        let Some(support) = &self.support else {
            let base = rows.matmul(&self.head.t()?)?;
            let logits = match added {
                Some(e) => Tensor::cat(&[&base, &rows.matmul(&e.t()?)?], 1)?,
                None => base,
            };
            return Ok(ChunkLogits { logits, targets, columns: None });
        };
        let support = &support[start..start + len];
        let mut columns: Vec<u32> = support.iter().flatten().copied().collect();
        columns.sort_unstable();
        columns.dedup();
        let width = columns.len();
        let column = |id: u32| columns.binary_search(&id).map_or(0, |c| c as u32);
        let mut mask = vec![f32::NEG_INFINITY; len * width];
        for (r, allowed) in support.iter().enumerate() {
            for &id in allowed {
                mask[r * width + column(id) as usize] = 0.0;
            }
        }
        let mask = Tensor::from_vec(mask, (len, width), h.device())?.to_dtype(h.dtype())?;
        let logits = (rows.matmul(&self.column_weights(&columns, added)?.t()?)? + mask)?;
        let targets = targets.iter().map(|&t| column(t)).collect();
        Ok(ChunkLogits { logits, targets, columns: Some(columns) })
    }

    fn forward(&self, h: &Tensor, added: Option<&Tensor>) -> candle_core::Result<Tensor> {
        if self.support.is_none() && h.dtype() == DType::F32 {
            return self.forward_f32(h, added);
        }
        let n = h.dim(0)?;
        let mut out = Vec::with_capacity(n);
        let mut saved = Vec::new();
        for start in (0..n).step_by(HEAD_CHUNK_ROWS) {
            let len = HEAD_CHUNK_ROWS.min(n - start);
            let ChunkLogits { logits, targets, columns } = self.chunk_logits(h, added, start, len)?;
            let keep = self.saved.is_some();
            let (logp, d) = match logits.dtype() {
                DType::F64 => logp_and_direction::<f64>(&logits, &targets, keep)?,
                _ => logp_and_direction::<f32>(&logits, &targets, keep)?,
            };
            out.extend(logp);
            if let Some(d) = d {
                saved.push(self.save_chunk(&d, columns.as_deref(), added)?);
            }
        }
        if let Some(slot) = &self.saved {
            *slot.lock().map_err(|_| candle_core::Error::Msg("head_target_logprobs: a poisoned lock".into()))? = saved;
        }
        Tensor::new(out, h.device())?.to_dtype(h.dtype())
    }

    /// [`Self::forward`] in f32 over the whole vocabulary (SFT's case), where it pays: each
    /// chunk's logits go into buffers of this op's own and become D = onehot − softmax in place,
    /// one pass for the maximum, one for the log-sum-exp and one for D. The general path copies
    /// the logits out of their tensor, computes each row's log-sum-exp twice and allocates D
    /// apart.
    fn forward_f32(&self, h: &Tensor, added: Option<&Tensor>) -> candle_core::Result<Tensor> {
        use super::gemm_views::{times, times_transposed};
        let (n, dim) = h.dims2()?;
        let v0 = self.head.dim(0)?;
        let a = added.map_or(Ok(0), |e| e.dim(0))?;
        let keep = self.saved.is_some();
        // The hidden rows and the added rows are small; the head is borrowed.
        let hs = h.flatten_all()?.to_vec1::<f32>()?;
        let es = added.map(|e| e.flatten_all()?.to_vec1::<f32>()).transpose()?;
        let mut out = Vec::with_capacity(n);
        let mut saved = Vec::new();
        with_values::<f32, _>(&self.head, |w| -> candle_core::Result<()> {
            for start in (0..n).step_by(HEAD_CHUNK_ROWS) {
                let len = HEAD_CHUNK_ROWS.min(n - start);
                let rows = &hs[start * dim..(start + len) * dim];
                let mut base = times_transposed(rows, w, len, dim, v0);
                let mut extra = es.as_ref().map(|e| times_transposed(rows, e, len, dim, a));
                out.extend(log_softmax_rows(&mut base, extra.as_deref_mut(), &self.targets[start..start + len], keep));
                if keep {
                    let mut direction = times(&base, w, len, v0, dim);
                    let added = match (extra, &es) {
                        (Some(extra), Some(e)) => {
                            direction.iter_mut().zip(times(&extra, e, len, a, dim)).for_each(|(d, x)| *d += x);
                            Some((Tensor::from_vec(extra, (len, a), &Device::Cpu)?, None))
                        }
                        _ => None,
                    };
                    saved.push(SavedChunk { direction: Tensor::from_vec(direction, (len, dim), &Device::Cpu)?, added });
                }
            }
            Ok(())
        })??;
        if let Some(slot) = &self.saved {
            *slot.lock().map_err(|_| candle_core::Error::Msg("head_target_logprobs: a poisoned lock".into()))? = saved;
        }
        Tensor::from_vec(out, n, h.device())?.to_dtype(DType::F32)
    }

    /// What the backward needs of a chunk's D = onehot − softmax (its logits' `columns`, or
    /// the whole vocabulary).
    fn save_chunk(&self, d: &Tensor, columns: Option<&[u32]>, added: Option<&Tensor>) -> candle_core::Result<SavedChunk> {
        let v = d.dim(1)?;
        let v0 = self.head.dim(0)?;
        Ok(match columns {
            None => match added {
                Some(e) => {
                    let d_added = d.narrow(1, v0, v - v0)?;
                    let direction = (d.narrow(1, 0, v0)?.matmul(&self.head)? + d_added.matmul(&e.detach())?)?;
                    SavedChunk { direction, added: Some((d_added.contiguous()?, None)) }
                }
                None => SavedChunk { direction: d.matmul(&self.head)?, added: None },
            },
            Some(c) => {
                let direction = d.matmul(&self.column_weights(c, added.map(Tensor::detach).as_ref())?)?;
                let split = c.partition_point(|&id| (id as usize) < v0);
                let added = if added.is_some() && split < c.len() {
                    let ids: Vec<u32> = c[split..].iter().map(|&id| id - v0 as u32).collect();
                    Some((d.narrow(1, split, v - split)?.contiguous()?, Some(Tensor::new(ids.as_slice(), d.device())?)))
                } else {
                    None
                };
                SavedChunk { direction, added }
            }
        })
    }

    /// (dh, dE) from dy (N,): `dh = dy ⊙ D [W; E]` and `dE = Σ_chunks D_addedᵀ (dy ⊙ h)`.
    fn backward(&self, h: &Tensor, added: Option<&Tensor>, dy: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let Some(slot) = &self.saved else { candle_core::bail!("head_target_logprobs: a backward pass of a forward that kept nothing") };
        let saved = slot.lock().map_err(|_| candle_core::Error::Msg("head_target_logprobs: a poisoned lock".into()))?;
        let h = h.detach();
        let dy = dy.to_dtype(h.dtype())?;
        let mut dh = Vec::with_capacity(saved.len());
        let mut de = added.map(Tensor::zeros_like).transpose()?;
        let mut start = 0;
        for chunk in saved.iter() {
            let len = chunk.direction.dim(0)?;
            let g = dy.narrow(0, start, len)?.unsqueeze(1)?;
            dh.push(chunk.direction.broadcast_mul(&g)?);
            if let (Some((d_added, ids)), Some(acc)) = (&chunk.added, de.as_mut()) {
                let part = d_added.t()?.matmul(&h.narrow(0, start, len)?.broadcast_mul(&g)?)?;
                *acc = match ids {
                    None => (&*acc + part)?,
                    Some(ids) => acc.index_add(ids, &part, 0)?,
                };
            }
            start += len;
        }
        Ok((Tensor::cat(&dh, 0)?, de))
    }
}

/// Each row's `log softmax[target]` over its logits split in two, `base` (rows, V₀) and `extra`
/// (rows, A) when there are added tokens, target ids counting from base's first column; with
/// `keep`, both become D = onehot(target) − softmax in place.
fn log_softmax_rows(base: &mut [f32], extra: Option<&mut [f32]>, targets: &[u32], keep: bool) -> Vec<f64> {
    use rayon::prelude::*;
    let rows = targets.len();
    let v0 = base.len() / rows;
    let extra_rows: Vec<&mut [f32]> = match extra {
        Some(x) if !x.is_empty() => x.chunks_mut(x.len() / rows).collect(),
        _ => (0..rows).map(|_| &mut [][..]).collect(),
    };
    base.par_chunks_mut(v0)
        .zip(extra_rows)
        .zip(targets)
        .map(|((b, x), &t)| {
            let max = b.iter().chain(x.iter()).copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max as f64 + (kernels::exp_sum(b, max) + kernels::exp_sum(x, max)).ln();
            let t = t as usize;
            let logit = if t < v0 { b[t] } else { x[t - v0] };
            if keep {
                kernels::exp_scaled(b, lse as f32, -1.0);
                kernels::exp_scaled(x, lse as f32, -1.0);
                *(if t < v0 { &mut b[t] } else { &mut x[t - v0] }) += 1.0;
            }
            (logit as f64 - lse) as f32 as f64
        })
        .collect()
}

/// The targets' log-probs of a chunk's logits (rows, V), and with `keep` also
/// D = onehot(target) − softmax (the row gradient at dy = 1), from one copy of the logits.
fn logp_and_direction<T: SoftmaxRow>(logits: &Tensor, targets: &[u32], keep: bool) -> candle_core::Result<(Vec<f64>, Option<Tensor>)> {
    let (rows, v) = logits.dims2()?;
    let x = logits.flatten_all()?.to_vec1::<T>()?;
    let logp = target_logprobs_fwd(&x, targets, v)?.into_iter().map(|l| l.to_f64()).collect();
    let d = if keep {
        Some(Tensor::from_vec(target_logprobs_bwd(&x, targets, &vec![T::one(); rows], v), (rows, v), logits.device())?)
    } else {
        None
    };
    Ok((logp, d))
}

impl CustomOp1 for HeadLogprobs {
    fn name(&self) -> &'static str {
        "head-target-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        tensor_storage(&self.forward(&storage_tensor(s, l)?, None)?)
    }

    fn bwd(&self, h: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(h, None, dy)?.0))
    }
}

impl candle_core::CustomOp2 for HeadLogprobs {
    fn name(&self) -> &'static str {
        "head-target-logprobs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        tensor_storage(&self.forward(&storage_tensor(s1, l1)?, Some(&storage_tensor(s2, l2)?))?)
    }

    fn bwd(&self, h: &Tensor, e: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dh, de) = self.backward(h, Some(e), dy)?;
        Ok((Some(dh), de))
    }
}

#[cfg(test)]
mod tests {
    //! Each fused op against the same function written with candle's differentiable ops: equal
    //! values, and equal gradients of a random linear functional of the output.
    use super::*;
    use candle_core::Var;

    fn rand(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 500.0) - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Values and input gradients of `f` and `g` on the same inputs, compared.
    fn same_values_and_grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, g: impl Fn(&[Tensor]) -> Tensor, tol: f64) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (f(&ts), g(&ts));
        assert!(max_diff(&a, &b) < tol, "values differ by {}", max_diff(&a, &b));
        let w = rand(a.dims(), 7, a.dtype());
        let (ga, gb) =
            ((&a * &w).unwrap().sum_all().unwrap().backward().unwrap(), (&b * &w).unwrap().sum_all().unwrap().backward().unwrap());
        for (i, v) in vars.iter().enumerate() {
            let (x, y) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
            assert!(max_diff(x, y) < tol, "input {i}: gradients differ by {}", max_diff(x, y));
        }
    }

    #[test]
    fn swiglu_matches_silu_times_up() {
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            // Values out to |g| = 8 exercise both tails of the sigmoid.
            let g = (rand(&[3, 5, 40], 1, dtype) * 8.0).unwrap();
            let u = rand(&[3, 5, 40], 2, dtype);
            same_values_and_grads(
                &[g, u],
                |t| swiglu(&t[0], &t[1]).unwrap(),
                |t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
                tol,
            );
        }
    }

    /// The AVX2 + FMA build of the f32 SwiGLU loops gives what the portable build gives, on
    /// values out to |g| = 90 (past where e^-|g| underflows), and both stay within f32
    /// rounding of the f64 formula.
    #[test]
    fn swiglu_f32_paths_agree() {
        let n = 1000;
        let g: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.18 - 90.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5).collect();
        let dy: Vec<f32> = (0..n).map(|i| ((i * 31) % 101) as f32 / 101.0 - 0.5).collect();
        let (mut out, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        swiglu_chunk_fwd(&g, &u, &mut out);
        swiglu_chunk_bwd(&g, &u, &dy, &mut dg, &mut du);
        let (g64, u64, dy64): (Vec<f64>, Vec<f64>, Vec<f64>) =
            (g.iter().map(|&x| x.into()).collect(), u.iter().map(|&x| x.into()).collect(), dy.iter().map(|&x| x.into()).collect());
        let (mut out64, mut dg64, mut du64) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        swiglu_chunk_fwd(&g64, &u64, &mut out64);
        swiglu_chunk_bwd(&g64, &u64, &dy64, &mut dg64, &mut du64);
        for (got, want) in [(&out, &out64), (&dg, &dg64), (&du, &du64)] {
            for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
                assert!((f64::from(a) - b).abs() <= 1e-6 * b.abs().max(1.0), "element {i} (g = {}): {a} against {b}", g[i]);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let (mut out2, mut dg2, mut du2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            // SAFETY: the features were just detected.
            unsafe {
                swiglu_avx2::forward(&g, &u, &mut out2);
                swiglu_avx2::backward(&g, &u, &dy, &mut dg2, &mut du2);
            }
            assert_eq!((out, dg, du), (out2, dg2, du2), "the AVX2 build differs from the portable one");
        }
    }

    fn composite_attention(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[usize]) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (_, kv, l, _) = k.dims4().unwrap();
        let rep = |x: &Tensor| Tensor::cat(&vec![x.unsqueeze(2).unwrap(); h / kv], 2).unwrap().reshape((b, h, l, d)).unwrap();
        let s = (q.matmul(&rep(k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let s = s.broadcast_add(&causal_mask(pads, t, l, q.dtype()).unwrap()).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&rep(v)).unwrap().transpose(1, 2).unwrap().reshape((b, t, h * d)).unwrap()
    }

    #[test]
    fn attention_matches_candle_ops_with_padding_gqa_and_a_past() {
        // 2 rows (one left-padded), 4 query heads over 2 KV heads, 3 queries over 5 keys; then
        // 6 heads over 3, 19 queries over 23 keys (rows longer than the softmax's 8 lanes).
        for (q, kv, pads) in [([2, 4, 3, 8], [2, 2, 5, 8], [0, 2]), ([2, 6, 19, 16], [2, 3, 23, 16], [0, 5])] {
            for dtype in [DType::F64, DType::F32] {
                let tol = if dtype == DType::F64 { 1e-10 } else { 2e-5 };
                let inputs = [rand(&q, 1, dtype), rand(&kv, 2, dtype), rand(&kv, 3, dtype)];
                same_values_and_grads(
                    &inputs,
                    |x| attention(&x[0], &x[1], &x[2], &pads).unwrap(),
                    |x| composite_attention(&x[0], &x[1], &x[2], &pads),
                    tol,
                );
            }
        }
    }

    /// Attention over a shared prefix equals [`attention`] over each row's prefix copied in
    /// front of its own keys, in values and in the gradients of q, the rows' keys and values,
    /// and the prefix (summed over the rows that read it), with padding, GQA and two prefixes.
    #[test]
    fn attention_with_prefix_matches_the_copied_prefix() {
        let (pads, of_row) = ([0usize, 2, 0], [1usize, 0, 1]);
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let inputs = [
                rand(&[3, 4, 2, 5], 31, dtype),
                rand(&[2, 2, 6, 5], 32, dtype),
                rand(&[2, 2, 6, 5], 33, dtype),
                rand(&[3, 2, 3, 5], 34, dtype),
                rand(&[3, 2, 3, 5], 35, dtype),
            ];
            let idx = Tensor::new(&[1u32, 0, 1], &Device::Cpu).unwrap();
            same_values_and_grads(
                &inputs,
                |x| attention_with_prefix(&x[0], &x[1], &x[2], &of_row, &x[3], &x[4], &pads).unwrap(),
                |x| {
                    let k = Tensor::cat(&[&x[1].index_select(&idx, 0).unwrap(), &x[3]], 2).unwrap();
                    let v = Tensor::cat(&[&x[2].index_select(&idx, 0).unwrap(), &x[4]], 2).unwrap();
                    composite_attention(&x[0], &k, &v, &pads)
                },
                tol,
            );
        }
    }

    /// A layer of scale 2 for [`lora_linear`] and [`gated_lora`].
    fn layer<'a>(w: &'a Tensor, bias: Option<&'a Tensor>, a: &'a Tensor, b: &'a Tensor, dropout: Option<Dropout>) -> LoraLayer<'a> {
        LoraLayer { w, bias, a, b, scale: 2.0, dropout }
    }

    /// The fused gate, up and SwiGLU node against the three nodes it replaces, with biases,
    /// dropout (each layer's own mask) and x of rank 3, wider than one block of the frozen
    /// weight's products; and mismatched layers are an error.
    #[test]
    fn gated_lora_matches_its_three_nodes() {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-3)] {
            let (inp, out) = (290, 300);
            let (wg, wu) = ((rand(&[out, inp], 21, dtype) * 0.1).unwrap(), (rand(&[out, inp], 22, dtype) * 0.1).unwrap());
            let (bg, bu) = (rand(&[out], 23, dtype), rand(&[out], 24, dtype));
            let (dg, du) = (Dropout { p: 0.25, seed: 5 }, Dropout { p: 0.25, seed: 6 });
            let inputs = [
                rand(&[2, 3, inp], 25, dtype),
                (rand(&[4, inp], 26, dtype) * 0.1).unwrap(),
                (rand(&[out, 4], 27, dtype) * 0.1).unwrap(),
                (rand(&[4, inp], 28, dtype) * 0.1).unwrap(),
                (rand(&[out, 4], 29, dtype) * 0.1).unwrap(),
            ];
            same_values_and_grads(
                &inputs,
                |x| {
                    gated_lora(&x[0], &layer(&wg, Some(&bg), &x[1], &x[2], Some(dg)), &layer(&wu, Some(&bu), &x[3], &x[4], Some(du)))
                        .unwrap()
                },
                |x| {
                    let gate = lora_linear(&x[0], &layer(&wg, Some(&bg), &x[1], &x[2], Some(dg))).unwrap();
                    let up = lora_linear(&x[0], &layer(&wu, Some(&bu), &x[3], &x[4], Some(du))).unwrap();
                    swiglu(&gate, &up).unwrap()
                },
                tol,
            );
            let narrow = rand(&[out, 3], 30, dtype);
            let (x, a) = (&inputs[0], &inputs[1]);
            assert!(gated_lora(x, &layer(&wg, None, a, &inputs[2], None), &layer(&wu, None, &inputs[3], &narrow, None)).is_err());
        }
    }

    /// q, k and v as one node and attention over the stack equal the seven nodes they replace
    /// (three LoRA layers with biases and dropout, three splits into heads, two of them
    /// rotated, and attention) in values and in the gradients of x and all six factors, with
    /// grouped heads and a left-padded row.
    #[test]
    fn qkv_heads_and_stacked_attention_match_their_nodes() {
        let (b, t, inp, heads, kv_heads, d) = (2, 5, 14, 4, 2, 6);
        let (nq, nkv) = (heads * d, kv_heads * d);
        let pads = [0, 2];
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let w = [nq, nkv, nkv].map(|n| (rand(&[n, inp], 31 + n as u64, dtype) * 0.2).unwrap());
            let bias = [nq, nkv, nkv].map(|n| rand(&[n], 41 + n as u64, dtype));
            let drop = [7, 8, 9].map(|seed| Some(Dropout { p: 0.2, seed }));
            let rope = (rand(&[t, d / 2], 51, dtype), rand(&[t, d / 2], 52, dtype));
            let inputs = [
                rand(&[b, t, inp], 53, dtype),
                (rand(&[3, inp], 54, dtype) * 0.3).unwrap(),
                (rand(&[nq, 3], 55, dtype) * 0.3).unwrap(),
                (rand(&[3, inp], 56, dtype) * 0.3).unwrap(),
                (rand(&[nkv, 3], 57, dtype) * 0.3).unwrap(),
                (rand(&[3, inp], 58, dtype) * 0.3).unwrap(),
                (rand(&[nkv, 3], 59, dtype) * 0.3).unwrap(),
            ];
            fn three<'a>(w: &'a [Tensor; 3], bias: &'a [Tensor; 3], drop: [Option<Dropout>; 3], x: &'a [Tensor]) -> [LoraLayer<'a>; 3] {
                [0, 1, 2].map(|i| layer(&w[i], Some(&bias[i]), &x[1 + 2 * i], &x[2 + 2 * i], drop[i]))
            }
            let tables = Some((&rope.0, &rope.1));
            same_values_and_grads(
                &inputs,
                |x| {
                    let [q, k, v] = three(&w, &bias, drop, x);
                    let qkv = qkv_heads(&x[0], [&q, &k, &v], heads, kv_heads, (&rope.0, &rope.1)).unwrap();
                    stacked_attention(&qkv, (b, t), heads, kv_heads, &pads).unwrap()
                },
                |x| {
                    let [q, k, v] = three(&w, &bias, drop, x);
                    let q = split_heads(&lora_linear(&x[0], &q).unwrap(), heads, tables).unwrap();
                    let k = split_heads(&lora_linear(&x[0], &k).unwrap(), kv_heads, tables).unwrap();
                    let v = split_heads(&lora_linear(&x[0], &v).unwrap(), kv_heads, None).unwrap();
                    attention(&q, &k, &v, &pads).unwrap()
                },
                tol,
            );
            let [q, k, v] = three(&w, &bias, drop, &inputs);
            let narrow = rand(&[nkv, 2], 60, dtype);
            let (short_v, x) = (layer(&w[2], None, &inputs[5], &narrow, None), &inputs[0]);
            assert!(qkv_heads(x, [&q, &k, &short_v], heads, kv_heads, (&rope.0, &rope.1)).is_err(), "factors of another rank");
            assert!(qkv_heads(x, [&q, &k, &v], heads + 1, kv_heads, (&rope.0, &rope.1)).is_err(), "heads that do not divide");
            let qkv = qkv_heads(x, [&q, &k, &v], heads, kv_heads, (&rope.0, &rope.1)).unwrap();
            assert!(stacked_attention(&qkv, (b, t + 1), heads, kv_heads, &pads).is_err(), "rows that do not fit");
        }
    }

    #[test]
    fn lora_linear_matches_candle_ops() {
        // The second shape is wider than one block of the frozen weight's products, both ways.
        for ((out, inp), dtype, tol) in
            [((5, 6), DType::F64, 1e-10), ((5, 6), DType::F32, 1e-4), ((300, 290), DType::F64, 1e-10), ((300, 290), DType::F32, 1e-3)]
        {
            let (w, bias) = ((rand(&[out, inp], 11, dtype) * 0.1).unwrap(), rand(&[out], 12, dtype));
            // x as rows, and as (batch, time, in): the leading axes are rows.
            for rows in [[4].as_slice(), &[2, 2]] {
                let x = rand(&[rows, &[inp]].concat(), 13, dtype);
                let inputs = [x, (rand(&[3, inp], 14, dtype) * 0.1).unwrap(), rand(&[out, 3], 15, dtype)];
                let composite = |x: &[Tensor]| {
                    let flat = x[0].reshape((4, inp)).unwrap();
                    let base = flat.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
                    let y = (base + (flat.matmul(&x[1].t().unwrap()).unwrap().matmul(&x[2].t().unwrap()).unwrap() * 2.0).unwrap()).unwrap();
                    y.reshape([rows, &[out]].concat()).unwrap()
                };
                let fused = |x: &[Tensor]| lora_linear(&x[0], &layer(&w, Some(&bias), &x[1], &x[2], None)).unwrap();
                same_values_and_grads(&inputs, fused, composite, tol);
            }
            assert!(
                lora_linear(
                    &rand(&[4, inp + 1], 13, dtype),
                    &layer(&w, None, &rand(&[3, inp], 14, dtype), &rand(&[out, 3], 15, dtype), None)
                )
                .is_err()
            );
        }
    }

    /// With dropout, the fused op equals the composite with the same mask, and the mask gets
    /// no gradient: x's gradient is zero through the adapter exactly where the mask is.
    /// The mask's bits are the seeded stream's, element by element, past a partial last word,
    /// from the vectorised build and the portable one alike; applying them keeps exactly those
    /// elements, scaled.
    #[test]
    fn dropout_bits_are_the_seeded_stream_in_every_build() {
        let d = Dropout { p: 0.3, seed: 42 };
        let len = 64 * 300 + 17;
        let kept = d.kept(len);
        let mut plain = vec![0u64; kept.len()];
        kept_words_plain(d.seed, d.threshold(), 0, &mut plain);
        assert_eq!(kept, plain);
        let mut dropped = 0;
        for i in 0..len {
            let want = crate::seed::splitmix64(d.seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 11 >= d.threshold();
            assert_eq!(kept[i / 64] >> (i % 64) & 1 == 1, want, "element {i}");
            dropped += usize::from(!want);
        }
        assert!((dropped as f64 / len as f64 - 0.3).abs() < 0.02, "dropped {dropped} of {len}");
        let x = Tensor::randn(0f32, 1.0, len, &Device::Cpu).unwrap();
        let xs = x.to_vec1::<f32>().unwrap();
        let y = d.apply(&x).unwrap().to_vec1::<f32>().unwrap();
        let keep = (1.0 / 0.7f64) as f32;
        for (i, (v, x)) in y.iter().zip(&xs).enumerate() {
            let want = if kept[i / 64] >> (i % 64) & 1 == 1 { x * keep } else { 0.0 };
            assert_eq!(v.to_bits(), want.to_bits(), "element {i}");
        }
        let mut plain = vec![0f32; len];
        masked_plain(&kept, &xs, keep, &mut plain);
        assert_eq!(plain, y);
    }

    #[test]
    fn lora_linear_with_dropout_matches_candle_ops() {
        let dropout = Dropout { p: 0.3, seed: 99 };
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let (w, bias) = (rand(&[5, 6], 11, dtype), rand(&[5], 12, dtype));
            let inputs = [rand(&[40, 6], 13, dtype), rand(&[3, 6], 14, dtype), rand(&[5, 3], 15, dtype)];
            let mask = dropout_mask(40, 6, dropout.p, dropout.seed, &Device::Cpu, dtype).unwrap();
            let dropped = mask.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert!(dropped.contains(&0.0) && dropped.iter().any(|&m| m > 1.0), "{dropped:?}");
            // Over many elements: about p of them dropped, the rest scaled by 1 / (1 - p).
            let big = dropout_mask(1000, 200, dropout.p, dropout.seed, &Device::Cpu, dtype).unwrap();
            let big = big.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            let zeros = big.iter().filter(|&&m| m == 0.0).count() as f64 / big.len() as f64;
            assert!((zeros - dropout.p).abs() < 0.005, "{zeros} dropped");
            assert!(big.iter().all(|&m| m == 0.0 || (m - 1.0 / (1.0 - dropout.p)).abs() < 1e-6));
            let composite = |x: &[Tensor]| {
                let base = x[0].matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
                let xm = (&x[0] * &mask).unwrap();
                (base + (xm.matmul(&x[1].t().unwrap()).unwrap().matmul(&x[2].t().unwrap()).unwrap() * 2.0).unwrap()).unwrap()
            };
            same_values_and_grads(
                &inputs,
                |x| lora_linear(&x[0], &layer(&w, Some(&bias), &x[1], &x[2], Some(dropout))).unwrap(),
                composite,
                tol,
            );
        }
    }

    /// The fused output projection and log-softmax equals logits then `target_logprobs`, in
    /// values and in the gradients of the hidden rows and the added rows, with and without
    /// added rows, with per-row supports, over more rows than one chunk.
    #[test]
    fn head_target_logprobs_matches_candle_ops() {
        let n = HEAD_CHUNK_ROWS + 9;
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
            let head = rand(&[11, 6], 21, dtype);
            let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % 14).collect();
            let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
            same_values_and_grads(
                &[rand(&[n, 6], 22, dtype), rand(&[3, 6], 23, dtype)],
                |x| head_target_logprobs(&x[0], &head, Some(&x[1]), &targets, None).unwrap(),
                |x| {
                    let logits =
                        Tensor::cat(&[x[0].matmul(&head.t().unwrap()).unwrap(), x[0].matmul(&x[1].t().unwrap()).unwrap()], 1).unwrap();
                    target_logprobs(&logits, &t).unwrap()
                },
                tol,
            );
            // Each row's own support (its target, a base token, and for some rows added
            // tokens) equals −∞ on the other logits, then the full log-softmax.
            let support: Vec<Vec<u32>> = targets
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    let mut s = vec![t, (t + 3) % 11];
                    if i % 3 == 0 {
                        s.extend([11, 13]);
                    }
                    s.sort_unstable();
                    s.dedup();
                    s
                })
                .collect();
            let mask: Vec<f32> =
                support.iter().flat_map(|s| (0..14u32).map(move |j| if s.contains(&j) { 0.0 } else { f32::NEG_INFINITY })).collect();
            let mask = Tensor::from_vec(mask, (n, 14), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            same_values_and_grads(
                &[rand(&[n, 6], 25, dtype), rand(&[3, 6], 26, dtype)],
                |x| head_target_logprobs(&x[0], &head, Some(&x[1]), &targets, Some(&support)).unwrap(),
                |x| {
                    let logits =
                        Tensor::cat(&[x[0].matmul(&head.t().unwrap()).unwrap(), x[0].matmul(&x[1].t().unwrap()).unwrap()], 1).unwrap();
                    target_logprobs(&(logits + &mask).unwrap(), &t).unwrap()
                },
                tol,
            );
            let outside = vec![vec![0u32]; n];
            assert!(
                head_target_logprobs(&rand(&[n, 6], 27, dtype), &head, None, &targets, Some(&outside)).is_err(),
                "a target outside its support"
            );
            let base_only: Vec<u32> = targets.iter().map(|&i| i % 11).collect();
            // No added rows at all equals none given; a head or added rows of another width
            // are errors, not panics.
            let x = Var::from_tensor(&rand(&[n, 6], 28, dtype)).unwrap();
            let none = Tensor::zeros((0, 6), dtype, &Device::Cpu).unwrap();
            let with_none = head_target_logprobs(x.as_tensor(), &head, Some(&none), &base_only, None).unwrap();
            assert_eq!(max_diff(&with_none, &head_target_logprobs(x.as_tensor(), &head, None, &base_only, None).unwrap()), 0.0);
            assert!(with_none.sum_all().unwrap().backward().is_ok());
            let wide = rand(&[11, 7], 29, dtype);
            assert!(head_target_logprobs(x.as_tensor(), &wide, None, &base_only, None).is_err());
            assert!(head_target_logprobs(x.as_tensor(), &head, Some(&wide), &base_only, None).is_err());
            let t = Tensor::new(base_only.as_slice(), &Device::Cpu).unwrap();
            same_values_and_grads(
                &[rand(&[n, 6], 24, dtype)],
                |x| head_target_logprobs(&x[0], &head, None, &base_only, None).unwrap(),
                |x| target_logprobs(&x[0].matmul(&head.t().unwrap()).unwrap(), &t).unwrap(),
                tol,
            );
        }
    }

    #[test]
    fn rms_norm_split_heads_and_target_logprobs_match_candle_ops() {
        let dtype = DType::F64;
        let w = rand(&[6], 4, dtype);
        same_values_and_grads(
            &[rand(&[2, 3, 6], 5, dtype)],
            |x| rms_norm(&x[0], &w, 1e-5).unwrap(),
            |x| candle_nn::ops::rms_norm_slow(&x[0], &w, 1e-5).unwrap(),
            1e-10,
        );
        // In f32 the forward is candle's fused inference kernel, bit for bit.
        let (x32, w32) = (rand(&[40, 576], 5, DType::F32), rand(&[576], 4, DType::F32));
        let fused = candle_nn::ops::rms_norm(&x32, &w32, 1e-5).unwrap();
        assert_eq!(max_diff(&rms_norm(&x32, &w32, 1e-5).unwrap(), &fused), 0.0);
        same_values_and_grads(
            &[x32],
            |x| rms_norm(&x[0], &w32, 1e-5).unwrap(),
            |x| candle_nn::ops::rms_norm_slow(&x[0], &w32, 1e-5).unwrap(),
            1e-5,
        );
        // Rotary tables shared by the rows (T, D/2) and per row (B, T, D/2); B, T and H differ.
        for tables in [[5, 4].as_slice(), &[3, 5, 4]] {
            let (cos, sin) = (rand(tables, 6, dtype), rand(tables, 8, dtype));
            let composite_rope = |x: &Tensor| {
                let x = x.reshape((3, 5, 2, 8)).unwrap().transpose(1, 2).unwrap();
                let full = |t: &Tensor| {
                    let t = Tensor::cat(&[t, t], D::Minus1).unwrap();
                    if t.rank() == 3 { t.unsqueeze(1).unwrap() } else { t }
                };
                let (x1, x2) = (x.narrow(3, 0, 4).unwrap(), x.narrow(3, 4, 4).unwrap());
                let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
                (x.broadcast_mul(&full(&cos)).unwrap() + rotated.broadcast_mul(&full(&sin)).unwrap()).unwrap()
            };
            let x = [rand(&[3, 5, 16], 9, dtype)];
            same_values_and_grads(&x, |x| split_heads(&x[0], 2, Some((&cos, &sin))).unwrap(), |x| composite_rope(&x[0]), 1e-10);
        }
        let heads = |x: &Tensor| x.reshape((2, 3, 4, 4)).unwrap().transpose(1, 2).unwrap();
        same_values_and_grads(&[rand(&[2, 3, 16], 9, dtype)], |x| split_heads(&x[0], 4, None).unwrap(), |x| heads(&x[0]), 1e-15);
        assert!(split_heads(&rand(&[2, 3, 16], 9, dtype), 3, None).is_err(), "16 features in 3 heads");
        assert!(split_heads(&rand(&[2, 0, 16], 9, dtype), 4, None).is_err(), "no positions");
        assert!(rms_norm(&rand(&[2, 6], 5, dtype), &rand(&[3], 4, dtype), 1e-5).is_err(), "a weight of 3 for rows of 6");
        assert!(split_heads(&rand(&[2, 3, 16], 9, dtype), 4, Some((&rand(&[3, 4], 6, dtype), &rand(&[3, 4], 6, dtype)))).is_err());
        let targets = Tensor::new(&[[0u32, 6, 3], [2, 2, 1]], &Device::Cpu).unwrap();
        let composite_logp = |x: &Tensor| {
            let logp = candle_nn::ops::log_softmax(x, D::Minus1).unwrap();
            logp.gather(&targets.unsqueeze(2).unwrap(), D::Minus1).unwrap().squeeze(2).unwrap()
        };
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
            let logits = (rand(&[2, 3, 7], 10, dtype) * 5.0).unwrap();
            same_values_and_grads(&[logits], |x| target_logprobs(&x[0], &targets).unwrap(), |x| composite_logp(&x[0]), tol);
        }
        let bad = Tensor::new(&[[9u32, 0, 0], [0, 0, 0]], &Device::Cpu).unwrap();
        assert!(target_logprobs(&rand(&[2, 3, 7], 1, dtype), &bad).is_err(), "an id outside the vocabulary is an error");
    }
}
