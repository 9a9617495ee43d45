//! The causal LM: one implementation for the Llama family and Qwen2, with the differences in
//! [`ModelConfig`]. Linear layers carry optional LoRA factors; base weights are plain tensors
//! (frozen, shared, never copied) and only the LoRA factors are `Var`s.
//!
//! Batches are left-padded: row `b` has `pads[b]` padding tokens before its first real token,
//! and its real tokens get positions 0, 1, ... exactly as when the row runs alone.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::bf16::PackedBf16;
use super::config::ModelConfig;
use super::kv_cache::{CachedKv, KvCache};
use super::lora::{Lora, LoraConfig};
use super::quant::QuantRows;
use super::skinny::Weight;
use crate::seed::fnv1a;

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Apply the trainable LoRA adapter. Off: the frozen reference policy, which is the base
    /// model, or base + the pinned copy of the adapter (see [`CausalLm::pin_reference_adapter`]).
    pub adapter: bool,
    /// Use differentiable ops (candle's fused CPU kernels have no backward pass).
    pub grad: bool,
    /// LoRA dropout (training): the seed of this pass's dropout masks. `None` = no dropout. The
    /// mask of each adapter input element is a pure function of (seed, layer path, element),
    /// so a pass repeats exactly with the same seed.
    pub dropout: Option<u64>,
}

impl Mode {
    pub const INFERENCE: Mode = Mode { adapter: true, grad: false, dropout: None };
    pub const REFERENCE: Mode = Mode { adapter: false, grad: false, dropout: None };
    pub const TRAIN: Mode = Mode { adapter: true, grad: true, dropout: None };

    /// A trainable tensor as a pass in this mode reads it. Without gradients it is detached:
    /// otherwise candle records every op downstream of it for a backward pass that never
    /// comes, and that graph keeps every layer's activations alive until the output is dropped
    /// (about 1 GB in a 500-token prefill of the default model).
    pub fn param(&self, v: &candle_core::Var) -> Tensor {
        if self.grad { v.as_tensor().clone() } else { v.as_tensor().detach() }
    }

    /// This mode with LoRA dropout masks drawn from `seed` (at each adapter's dropout rate).
    pub const fn with_dropout(self, seed: u64) -> Mode {
        Mode { dropout: Some(seed), ..self }
    }
}

/// A linear layer `y = x W^T (+ bias)`, optionally with a LoRA adapter.
pub struct Linear {
    /// The Hugging Face module path, e.g. `model.layers.0.self_attn.q_proj` (PEFT keys build on it).
    pub path: String,
    /// The f32 (or the model's dtype) weight, (out, in); `None` once released because neither
    /// path reads it: the few-row products read `blocks` and the wider ones `bf16`.
    weight: Option<Tensor>,
    /// (out, in).
    dims: (usize, usize),
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// The weight's GGUF blocks, read instead of `weight` by few-row products without gradients
    /// (`--quantized-base`; the same values, a sixth of the memory traffic for Q4_1).
    pub blocks: Option<QuantRows>,
    /// The weight rounded to bf16 in AMX tiles' layout, read instead of `weight` by wider products
    /// without gradients (`--bf16-prefill`).
    pub bf16: Option<PackedBf16>,
}

impl Linear {
    fn load(vb: &VarBuilder, path: &str, in_dim: usize, out_dim: usize, bias: bool) -> anyhow::Result<Self> {
        let weight = vb.get((out_dim, in_dim), &format!("{path}.weight"))?;
        let bias = if bias { Some(vb.get(out_dim, &format!("{path}.bias"))?) } else { None };
        Ok(Linear { path: path.to_string(), weight: Some(weight), dims: (out_dim, in_dim), bias, lora: None, blocks: None, bf16: None })
    }

    pub fn in_dim(&self) -> usize {
        self.dims.1
    }

    pub fn out_dim(&self) -> usize {
        self.dims.0
    }

    /// The dense weight; an error once released ([`CausalLm::attach_bf16_prefill`] with
    /// `--quantized-base`), for what only it can do (training, export, products of more rows
    /// than the few-row kernel takes in the model's dtype).
    pub fn weight(&self) -> candle_core::Result<&Tensor> {
        self.weight.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: its dense weight was released (--quantized-base with --bf16-prefill keep only the blocks and the bf16 copy), \
                 and this product needs it",
                self.path
            ))
        })
    }

    /// What the few-row kernel reads: the blocks when there are.
    fn few_row_weight(&self) -> candle_core::Result<Weight<'_>> {
        Ok(match &self.blocks {
            Some(q) => Weight::Blocks(q),
            None => Weight::Dense(self.weight()?),
        })
    }

    /// The rate and seed of this layer's LoRA dropout in `mode`, if it drops anything.
    fn dropout(&self, lora: &Lora, mode: Mode) -> Option<(f64, u64)> {
        match mode.dropout {
            Some(seed) if lora.dropout > 0.0 => Some((lora.dropout, seed ^ fnv1a(self.path.as_bytes()))),
            _ => None,
        }
    }

    /// The adapter's factors in `mode` (the trained ones, or the frozen reference's), if any.
    fn factors(&self, mode: Mode) -> Option<(Tensor, Tensor, f64)> {
        match (&self.lora, mode.adapter) {
            (Some(lora), true) => Some((mode.param(&lora.a), mode.param(&lora.b), lora.scale)),
            (Some(lora), false) => lora.reference.clone(),
            (None, _) => None,
        }
    }

    /// `forward` of layers that read the same x (q, k and v; gate and up) when decoding a few
    /// rows without gradients: base and adapter in one pass over each weight, and all the
    /// layers' products in one parallel pass ([`super::skinny::matmul_wt_many`]). `None` where
    /// the few-row kernel does not apply.
    fn forward_few_rows(layers: &[&Linear], x: &Tensor, mode: Mode) -> candle_core::Result<Option<Vec<Tensor>>> {
        if mode.grad || mode.dropout.is_some() {
            return Ok(None);
        }
        let Some(first) = layers.first() else { return Ok(None) };
        let dims = x.dims();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, first.in_dim()))?;
        let factors: Vec<_> = layers.iter().map(|l| l.factors(mode)).collect();
        let projections = layers
            .iter()
            .zip(&factors)
            .map(|(l, f)| Ok(super::skinny::Projection { weight: l.few_row_weight()?, lora: super::skinny::LowRank::of(f) }))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let Some(ys) = super::skinny::matmul_wt_many(&x2, &projections)? else { return Ok(None) };
        let mut out = Vec::with_capacity(layers.len());
        for (l, mut y) in layers.iter().zip(ys) {
            if let Some(bias) = &l.bias {
                y = y.broadcast_add(bias)?;
            }
            let mut out_dims = dims.to_vec();
            *out_dims.last_mut().unwrap() = l.out_dim();
            out.push(y.reshape(out_dims)?);
        }
        Ok(Some(out))
    }

    /// The layer as one training node on x as it is, (..., in) (see train_ops::lora_linear):
    /// base and adapter (with its dropout), where the mode trains the adapter on this device.
    fn training_node(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Option<super::train_ops::LoraLayer<'_>>> {
        match &self.lora {
            Some(lora) if mode.grad && mode.adapter && super::train_ops::supported(x.device(), x.dtype()) => {
                Ok(Some(super::train_ops::LoraLayer {
                    w: self.weight()?,
                    bias: self.bias.as_ref(),
                    a: lora.a.as_tensor(),
                    b: lora.b.as_tensor(),
                    scale: lora.scale,
                    dropout: self.dropout(lora, mode).map(|(p, seed)| super::train_ops::Dropout { p, seed }),
                }))
            }
            _ => Ok(None),
        }
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        if let Some(layer) = self.training_node(x, mode)? {
            return super::train_ops::lora_linear(x, &layer);
        }
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.in_dim()))?;
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_dim();
        if let Some(mut ys) = Linear::forward_few_rows(&[self], x, mode)? {
            return Ok(ys.remove(0));
        }
        let factors = self.factors(mode);
        if let Some(packed) = &self.bf16
            && !mode.grad
        {
            // The adapter's rank-r terms are folded into each block of the result: no
            // full-width delta to allocate and add.
            let mut y = super::bf16::matmul_wt(&x2, packed, super::skinny::LowRank::of(&factors))?;
            if let Some(bias) = &self.bias {
                y = y.broadcast_add(bias)?;
            }
            return y.reshape(out_dims);
        }
        let factors = factors.as_ref().map(|(a, b, s)| (a, b, *s));
        let mut y = matmul_wt(&x2, self.weight()?, self.blocks.as_ref(), mode)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let (Some((a, b, scale)), Some(lora)) = (factors, &self.lora) {
            let dropped;
            let input = match self.dropout(lora, mode) {
                Some((p, seed)) if mode.adapter => {
                    dropped = (&x2 * super::train_ops::dropout_mask(rows, self.in_dim(), p, seed, x2.device(), x2.dtype())?)?;
                    &dropped
                }
                _ => &x2,
            };
            // The scale goes on the rank-r intermediate, not the full-width output. The f32
            // factors are cast to the activations' dtype (a no-op in f32); their gradients flow
            // back through the cast to the f32 master copy.
            let (a, b) = (a.to_dtype(x2.dtype())?, b.to_dtype(x2.dtype())?);
            let low = (input.matmul(&a.t()?)? * scale)?;
            let delta = low.matmul(&b.t()?)?;
            y = (y + delta)?;
        }
        y.reshape(out_dims)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Block {
    attn_norm: Tensor,
    attn: Attention,
    mlp_norm: Tensor,
    mlp: Mlp,
}

/// Rotary tables for one forward pass: (B, T, head_dim / 2) gathered per row and position, or
/// (T, head_dim / 2) when all rows share positions.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

pub struct CausalLm {
    pub config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<Tensor>,
    /// The output projection's GGUF blocks (`--quantized-base`), as [`Linear::blocks`].
    head_blocks: Option<QuantRows>,
    cos_table: Tensor,
    sin_table: Tensor,
    device: Device,
    dtype: DType,
    /// The attached adapter's settings, if any (see `lora.rs`).
    pub lora_config: Option<LoraConfig>,
    /// Vocabulary rows added after the base's (the semantic POI ids), if any.
    pub new_tokens: Option<NewTokens>,
}

/// Tokens added to the vocabulary, ids `vocab_size..vocab_size + n`, trained with the adapter
/// (PEFT's trainable tokens): each row is both the token's input embedding and its output row,
/// as the base ties the two (see `peft.rs`).
pub struct NewTokens {
    /// The tokens' text, in id order.
    pub names: Vec<String>,
    /// (n, hidden), in the adapter's dtype (f32 master weights).
    pub rows: candle_core::Var,
    /// The frozen rows of the reference policy (adapter-off passes), pinned with the adapter's.
    pub reference: Option<Tensor>,
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, mode: Mode) -> candle_core::Result<Tensor> {
    if mode.grad && super::train_ops::supported(x.device(), x.dtype()) {
        super::train_ops::rms_norm(x, weight, eps)
    } else if mode.grad || x.dtype() == DType::F64 {
        // candle's fused kernel has no f64 path.
        candle_nn::ops::rms_norm_slow(x, weight, eps as f32)
    } else {
        candle_nn::ops::rms_norm(x, weight, eps as f32)
    }
}

fn softmax(x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
    if mode.grad { candle_nn::ops::softmax(x, D::Minus1) } else { candle_nn::ops::softmax_last_dim(x) }
}

/// Rotary embedding in the Hugging Face (rotate-half) layout; x is (B, H, T, head_dim).
fn apply_rope(x: &Tensor, rope: &Rope, mode: Mode) -> candle_core::Result<Tensor> {
    if !mode.grad {
        return candle_nn::rotary_emb::rope(x, &rope.cos, &rope.sin);
    }
    // Tables are (T, hd/2) when every row shares positions, else (B, T, hd/2): make them
    // broadcast against (B, H, T, hd).
    let full = |t: &Tensor| -> candle_core::Result<Tensor> {
        let t = Tensor::cat(&[t, t], D::Minus1)?;
        if t.rank() == 3 { t.unsqueeze(1) } else { Ok(t) }
    };
    let (cos, sin) = (full(&rope.cos)?, full(&rope.sin)?);
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

impl Attention {
    /// q (B, heads, T, hd) and k, v (B, kv_heads, T, hd), rotary embedding applied.
    fn project(&self, x: &Tensor, rope: &Rope, mode: Mode) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = match Linear::forward_few_rows(&[&self.q, &self.k, &self.v], x, mode)? {
            Some(mut qkv) => {
                let (v, k) = (qkv.pop().unwrap(), qkv.pop().unwrap());
                (qkv.pop().unwrap(), k, v)
            }
            None => (self.q.forward(x, mode)?, self.k.forward(x, mode)?, self.v.forward(x, mode)?),
        };
        if mode.grad && super::train_ops::supported(x.device(), x.dtype()) {
            let tables = Some((&rope.cos, &rope.sin));
            let q = super::train_ops::split_heads(&q, self.heads, tables)?;
            let k = super::train_ops::split_heads(&k, self.kv_heads, tables)?;
            return Ok((q, k, super::train_ops::split_heads(&v, self.kv_heads, None)?));
        }
        let q = apply_rope(&split(q, self.heads)?, rope, mode)?;
        let k = apply_rope(&split(k, self.kv_heads)?, rope, mode)?.contiguous()?;
        let v = split(v, self.kv_heads)?;
        Ok((q, k, v))
    }

    /// Training without a cache, when q, k and v all train adapters of one rank: their
    /// projections, heads and attention as two nodes (train_ops::qkv_heads), (B, T, H·D).
    fn train_stacked(&self, x: &Tensor, rope: &Rope, pads: &[usize], mode: Mode) -> candle_core::Result<Option<Tensor>> {
        let (Some(q), Some(k), Some(v)) = (self.q.training_node(x, mode)?, self.k.training_node(x, mode)?, self.v.training_node(x, mode)?)
        else {
            return Ok(None);
        };
        if !q.stacks_as_qkv(&k, &v) {
            return Ok(None);
        }
        let (b, t, _) = x.dims3()?;
        let qkv = super::train_ops::qkv_heads(x, [&q, &k, &v], self.heads, self.kv_heads, (&rope.cos, &rope.sin))?;
        Ok(Some(super::train_ops::stacked_attention(&qkv, (b, t), self.heads, self.kv_heads, pads)?))
    }

    /// Softmax attention of q (B, heads, T, hd) over k, v (B, kv_heads, keys, hd) with an
    /// additive mask broadcastable to (B, heads, T, keys), (B, T, heads·hd) before the output
    /// projection. Differentiable (candle ops).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, mode: Mode) -> candle_core::Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let keys = k.dim(2)?;
        let group = self.heads / self.kv_heads;
        // Grouped-query attention without copying K/V: the `group` query heads that share a KV
        // head are stacked along the time axis.
        let q = (q.contiguous()?.reshape((b, self.kv_heads, group * t, self.head_dim))? * (1.0 / (self.head_dim as f64).sqrt()))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, self.heads, t, keys))?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        // Half precision takes its softmax in f32, as Hugging Face's models do: a bf16 sum over
        // the keys would round away the small probabilities.
        let probs = match scores.dtype() {
            DType::BF16 | DType::F16 => softmax(&scores.to_dtype(DType::F32)?, mode)?.to_dtype(scores.dtype())?,
            _ => softmax(&scores, mode)?,
        };
        let probs = probs.reshape((b, self.kv_heads, group * t, keys))?;
        let y = probs.matmul(&v.contiguous()?)?.reshape((b, self.heads, t, self.head_dim))?;
        y.transpose(1, 2)?.reshape((b, t, self.heads * self.head_dim))
    }

    /// The heads' attention outputs, (B, T, heads·hd), before the output projection `o`.
    fn mix(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        pads: &[usize],
        cache: Option<(&mut KvCache, usize)>,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        if cache.is_none()
            && let Some(y) = self.train_stacked(x, rope, pads, mode)?
        {
            return Ok(y);
        }
        let (q, k, v) = self.project(x, rope, mode)?;
        let kv = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            None => CachedKv { k, v, prefix: None },
        };
        self.attend_causal(&q, &kv, pads, mask, mode)
    }

    /// Causal attention (query i of row b at position `keys − T + i` sees keys `pads[b]..=` it)
    /// before the output projection: a fused kernel when the mode and device have one (it reads
    /// a shared prefix in place), else candle's ops with the equivalent additive `mask`.
    fn attend_causal(&self, q: &Tensor, kv: &CachedKv, pads: &[usize], mask: Option<&Tensor>, mode: Mode) -> candle_core::Result<Tensor> {
        if fused_attention(mode, q.device(), q.dtype()) {
            let prefix = kv.prefix.as_ref().map(|(k, v, of_row)| super::attention_cpu::SharedKv { k, v, of_row });
            super::attention_cpu::causal_attention_with_prefix(q, prefix, &kv.k, &kv.v, pads)
        } else if mode.grad && super::train_ops::supported(q.device(), q.dtype()) {
            match &kv.prefix {
                Some((pk, pv, of_row)) => super::train_ops::attention_with_prefix(q, pk, pv, of_row, &kv.k, &kv.v, pads),
                None => super::train_ops::attention(q, &kv.k, &kv.v, pads),
            }
        } else {
            let (k, v) = kv.materialize()?;
            self.attend(q, &k, &v, mask, mode)
        }
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        if let (Some(gate), Some(up)) = (self.gate.training_node(x, mode)?, self.up.training_node(x, mode)?)
            && gate.stacks_with(&up)
        {
            return self.down.forward(&super::train_ops::gated_lora(x, &gate, &up)?, mode);
        }
        let (gate, up) = match Linear::forward_few_rows(&[&self.gate, &self.up], x, mode)? {
            Some(mut gu) => {
                let up = gu.pop().unwrap();
                (gu.pop().unwrap(), up)
            }
            None => (self.gate.forward(x, mode)?, self.up.forward(x, mode)?),
        };
        let hidden = super::train_ops::swiglu(&gate, &up)?;
        self.down.forward(&hidden, mode)
    }
}

/// Inference on the CPU uses the fused attention kernel, which needs no mask tensor.
fn fused_attention(mode: Mode, device: &Device, dtype: DType) -> bool {
    !mode.grad && super::attention_cpu::supported(device, dtype)
}

fn few_row_weight<'t>(w: &'t Tensor, blocks: Option<&'t QuantRows>) -> Weight<'t> {
    match blocks {
        Some(q) => Weight::Blocks(q),
        None => Weight::Dense(w),
    }
}

/// `x W^T` for a frozen W (whose quantised `blocks`, if given, hold the same values): the
/// few-row kernel when decoding, a gradient-aware op when training on the CPU, gemm otherwise.
fn matmul_wt(x: &Tensor, w: &Tensor, blocks: Option<&QuantRows>, mode: Mode) -> candle_core::Result<Tensor> {
    if !mode.grad {
        if let Some(y) = super::skinny::matmul_wt(x, few_row_weight(w, blocks))? {
            return Ok(y);
        }
    } else if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() });
    }
    x.matmul(&w.t()?)
}

/// `x W^T` whose backward pass computes only the gradient of x. candle's matmul backward also
/// computes the gradient of W, which for frozen base weights is never used: as much work as
/// the forward and a W-sized buffer per layer (measured: `refine-poi bench --grpo`).
struct FrozenMatmul {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("frozen-matmul needs a contiguous input") };
        let x = match storage {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.shape(), &Device::Cpu)?,
            CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], layout.shape(), &Device::Cpu)?,
            _ => candle_core::bail!("frozen-matmul supports f32 and f64"),
        };
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let flat = y.flatten_all()?;
        let out = match y.dtype() {
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            _ => CpuStorage::F32(flat.to_vec1()?),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.w)?))
    }
}

/// A finite "minus infinity": masked keys get exactly zero weight, and a fully masked row
/// (a padding query) stays finite instead of turning into NaN.
const MASKED: f32 = -1e30;

impl CausalLm {
    /// Builds the model from weights under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub fn load(config: ModelConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        config.validate()?;
        let cfg = &config;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let embed = vb.get((cfg.vocab_size, h), "model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let lin = |name: &str, i: usize, o: usize, bias: bool| Linear::load(&vb, &format!("{p}.{name}"), i, o, bias);
            let bias = cfg.qkv_bias();
            blocks.push(Block {
                attn_norm: vb.get(h, &format!("{p}.input_layernorm.weight"))?,
                attn: Attention {
                    q: lin("self_attn.q_proj", h, heads * hd, bias)?,
                    k: lin("self_attn.k_proj", h, kv_heads * hd, bias)?,
                    v: lin("self_attn.v_proj", h, kv_heads * hd, bias)?,
                    o: lin("self_attn.o_proj", heads * hd, h, false)?,
                    heads,
                    kv_heads,
                    head_dim: hd,
                },
                mlp_norm: vb.get(h, &format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate: lin("mlp.gate_proj", h, cfg.intermediate_size, false)?,
                    up: lin("mlp.up_proj", h, cfg.intermediate_size, false)?,
                    down: lin("mlp.down_proj", cfg.intermediate_size, h, false)?,
                },
            });
        }
        let final_norm = vb.get(h, "model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            None
        } else {
            Some(vb.get((cfg.vocab_size, h), "lm_head.weight")?)
        };
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let inv_freq = config.rope_inv_freq();
        let positions = config.max_position_embeddings;
        let angles: Vec<f32> = (0..positions).flat_map(|p| inv_freq.iter().map(move |f| (p as f64 * f) as f32)).collect();
        let angles = Tensor::from_vec(angles, (positions, inv_freq.len()), &device)?;
        let cos_table = angles.cos()?.to_dtype(dtype)?;
        let sin_table = angles.sin()?.to_dtype(dtype)?;
        Ok(CausalLm {
            config,
            embed,
            blocks,
            final_norm,
            lm_head,
            head_blocks: None,
            cos_table,
            sin_table,
            device,
            dtype,
            lora_config: None,
            new_tokens: None,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The base's input embedding, (vocab, hidden).
    pub fn embedding(&self) -> &Tensor {
        &self.embed
    }

    /// Whether the output projection has weights of its own (not tied to the embedding).
    pub fn has_untied_head(&self) -> bool {
        self.lm_head.is_some()
    }

    /// The base vocabulary and the added tokens: the width of the logits.
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size + self.new_tokens.as_ref().map_or(0, |t| t.names.len())
    }

    /// The added rows a pass in `mode` uses, in the model's dtype: the trainable ones with the
    /// adapter on, else the pinned reference (or, unpinned, the current rows, detached: the
    /// base has no rows of its own for these tokens).
    fn new_rows(&self, mode: Mode) -> candle_core::Result<Option<Tensor>> {
        let Some(t) = &self.new_tokens else { return Ok(None) };
        let rows = match (&t.reference, mode.adapter) {
            (_, true) => mode.param(&t.rows),
            (Some(r), false) => r.clone(),
            (None, false) => t.rows.as_tensor().detach(),
        };
        rows.to_dtype(self.dtype).map(Some)
    }

    /// Input embeddings (N, hidden) of the flat ids (N,), added tokens included.
    fn embed_ids(&self, ids: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let Some(rows) = self.new_rows(mode)? else { return self.embed.index_select(ids, 0) };
        let v = self.config.vocab_size as u32;
        let host = ids.to_vec1::<u32>()?;
        if host.iter().all(|&i| i < v) {
            return self.embed.index_select(ids, 0);
        }
        let device = ids.device();
        let base_ids: Vec<u32> = host.iter().map(|&i| if i < v { i } else { 0 }).collect();
        let new_ids: Vec<u32> = host.iter().map(|&i| i.saturating_sub(v)).collect();
        let is_new: Vec<f32> = host.iter().map(|&i| if i < v { 0.0 } else { 1.0 }).collect();
        let base = self.embed.index_select(&Tensor::new(base_ids, device)?, 0)?;
        let added = rows.index_select(&Tensor::new(new_ids, device)?, 0)?;
        let is_new = Tensor::new(is_new, device)?.to_dtype(self.dtype)?.unsqueeze(1)?;
        // Multiplying by exactly 0 and 1 selects each row; the added rows get their gradient.
        base.broadcast_mul(&(1.0 - &is_new)?)? + added.broadcast_mul(&is_new)?
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every linear layer, in a fixed order (layer by layer: q, k, v, o, gate, up, down).
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks.iter().flat_map(|b| [&b.attn.q, &b.attn.k, &b.attn.v, &b.attn.o, &b.mlp.gate, &b.mlp.up, &b.mlp.down])
    }

    /// Every weight under its Hugging Face name with the adapter merged in (`W + scale · B A`;
    /// the base weights themselves are untouched): what `refine-poi export` writes. The output
    /// projection is left out when it is tied to the embedding.
    /// Added tokens become rows after the base vocabulary (the embedding is resized).
    pub fn merged_weights(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let embed = match &self.new_tokens {
            Some(t) => Tensor::cat(&[&self.embed, &t.rows.as_tensor().to_dtype(self.embed.dtype())?], 0)?,
            None => self.embed.clone(),
        };
        let mut out = vec![("model.embed_tokens.weight".to_string(), embed)];
        for (i, block) in self.blocks.iter().enumerate() {
            out.push((format!("model.layers.{i}.input_layernorm.weight"), block.attn_norm.clone()));
            out.push((format!("model.layers.{i}.post_attention_layernorm.weight"), block.mlp_norm.clone()));
        }
        for lin in self.linears() {
            let weight = match &lin.lora {
                // In f32, then back to the weight's dtype.
                Some(l) => {
                    let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
                    (lin.weight()?.to_dtype(delta.dtype())? + delta)?.to_dtype(lin.weight()?.dtype())?
                }
                None => lin.weight()?.clone(),
            };
            out.push((format!("{}.weight", lin.path), weight));
            if let Some(bias) = &lin.bias {
                out.push((format!("{}.bias", lin.path), bias.clone()));
            }
        }
        out.push(("model.norm.weight".to_string(), self.final_norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.clone()));
        }
        Ok(out)
    }

    /// Gives the few-row products (decoding, sampling) the base's quantised blocks by Hugging
    /// Face weight name: each linear layer and the output projection whose blocks are given
    /// (the rest stay dense). Returns how many weights took blocks. The blocks must hold the
    /// values of the f32 weights, as a GGUF's dequantised tensors do.
    pub fn attach_quantized_base(&mut self, mut blocks: std::collections::HashMap<String, QuantRows>) -> anyhow::Result<usize> {
        anyhow::ensure!(
            self.device.is_cpu() && self.dtype == DType::F32,
            "the quantised base runs on the CPU in f32 (the model is on {:?} in {:?})",
            self.device,
            self.dtype
        );
        let fits = |q: &QuantRows, dims: (usize, usize), name: &str| -> anyhow::Result<()> {
            anyhow::ensure!(dims == q.dims(), "{name}: blocks of {:?} for a weight of {dims:?}", q.dims());
            Ok(())
        };
        let mut attached = 0;
        for lin in self.linears_mut() {
            let name = format!("{}.weight", lin.path);
            if let Some(q) = blocks.remove(&name) {
                fits(&q, lin.dims, &name)?;
                lin.blocks = Some(q);
                attached += 1;
            }
        }
        let head_name = if self.lm_head.is_some() { "lm_head.weight" } else { "model.embed_tokens.weight" };
        if let Some(q) = blocks.remove(head_name) {
            fits(&q, self.lm_head.as_ref().unwrap_or(&self.embed).dims2()?, head_name)?;
            self.head_blocks = Some(q);
            attached += 1;
        }
        Ok(attached)
    }

    /// Gives the products of more than a few rows without gradients (prompts, wide decoding
    /// steps) bf16 copies of the base's weights, for AMX tiles or AVX512-BF16, whichever the CPU
    /// has: each linear layer whose shape fills
    /// whole tiles (the rest stay f32). The output projection stays f32: it is a fifth of the
    /// weights and a small part of the work (one row a prompt, and the beams), and its copy
    /// would take an evaluation past 1 GB. Their results are those of
    /// the weights and inputs rounded to bf16, summed in f32 ([`super::bf16`]). A layer that
    /// also has its GGUF blocks (`--quantized-base`, attached first) releases its dense weight:
    /// the few-row products read the blocks, the wider ones the bf16 copy, and nothing else
    /// runs without gradients. Returns the bytes packed.
    pub fn attach_bf16_prefill(&mut self) -> anyhow::Result<usize> {
        anyhow::ensure!(
            self.device.is_cpu() && self.dtype == DType::F32,
            "--bf16-prefill runs on the CPU in f32 (the model is on {:?} in {:?})",
            self.device,
            self.dtype
        );
        anyhow::ensure!(
            super::bf16::Isa::detect().is_some(),
            "--bf16-prefill needs a CPU with AMX-BF16 (Intel Sapphire Rapids or later) or AVX512-BF16 (AMD Zen 4 or later, Intel Cooper Lake), and this one has neither"
        );
        for lin in self.linears_mut() {
            lin.bf16 = PackedBf16::pack(lin.weight()?)?;
            if lin.bf16.is_some() && lin.blocks.is_some() {
                lin.weight = None;
            }
        }
        let bytes = self.bf16_prefill_bytes();
        anyhow::ensure!(bytes > 0, "--bf16-prefill: no weight of this model fills whole tiles (sides multiples of 32)");
        Ok(bytes)
    }

    /// The bytes of bf16 weights packed (0 without `--bf16-prefill`).
    pub fn bf16_prefill_bytes(&self) -> usize {
        self.linears().filter_map(|l| l.bf16.as_ref()).map(PackedBf16::bytes).sum()
    }

    /// The bytes of quantised blocks attached (0 without `--quantized-base`).
    pub fn quantized_base_bytes(&self) -> usize {
        self.linears().filter_map(|l| l.blocks.as_ref()).chain(&self.head_blocks).map(QuantRows::bytes).sum()
    }

    /// The bytes of base weights a decoding step reads: each linear layer and the output
    /// projection, as blocks where they have them, else in the model's dtype.
    pub fn decode_weight_bytes(&self) -> usize {
        let dense = self.dtype.size_in_bytes();
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let head = self.head_blocks.as_ref().map_or(head.elem_count() * dense, QuantRows::bytes);
        self.linears().map(|l| l.blocks.as_ref().map_or(l.dims.0 * l.dims.1 * dense, QuantRows::bytes)).sum::<usize>() + head
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| [&mut b.attn.q, &mut b.attn.k, &mut b.attn.v, &mut b.attn.o, &mut b.mlp.gate, &mut b.mlp.up, &mut b.mlp.down])
    }

    /// Hidden states after the final norm, (B, T, hidden).
    ///
    /// `ids` is (B, T). With an empty (or no) cache, `pads` gives each row's left padding; with a
    /// non-empty cache the rows continue where the cache stops and `pads` must be `None`.
    pub fn forward_hidden(&self, ids: &Tensor, pads: Option<&[usize]>, cache: Option<&mut KvCache>, mode: Mode) -> anyhow::Result<Tensor> {
        self.hidden_states(ids, pads, cache, None, mode)
    }

    /// Hidden states after the final norm at the positions `at` only (each `b · T + t`), (N,
    /// hidden), of a pass over `ids` (B, T) left-padded by `pads` without a cache. The last
    /// layer's output projection and MLP run on those positions alone: nothing after them reads
    /// the others (in SFT's windows half the positions are scored, which saves 1.3% of a step's
    /// FLOPs).
    pub fn forward_hidden_at(&self, ids: &Tensor, pads: &[usize], at: &[u32], mode: Mode) -> anyhow::Result<Tensor> {
        anyhow::ensure!(!self.blocks.is_empty(), "a model without layers has no last layer to pick positions in");
        self.hidden_states(ids, Some(pads), None, Some(&Tensor::new(at, &self.device)?), mode)
    }

    /// [`Self::forward_hidden`], at the flat positions `at` only when given
    /// ([`Self::forward_hidden_at`]).
    fn hidden_states(
        &self,
        ids: &Tensor,
        pads: Option<&[usize]>,
        mut cache: Option<&mut KvCache>,
        at: Option<&Tensor>,
        mode: Mode,
    ) -> anyhow::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let pads: Vec<usize> = match (&cache, pads) {
            (Some(c), None) if past > 0 => c.pads().to_vec(),
            (Some(c), Some(_)) if past > 0 => anyhow::bail!("pads are fixed when a cache is first filled ({} rows)", c.rows()),
            (_, Some(p)) => p.to_vec(),
            (_, None) => vec![0; b],
        };
        anyhow::ensure!(pads.len() == b, "{} pads for a batch of {b} rows", pads.len());
        if let Some(c) = cache.as_deref_mut() {
            if past == 0 {
                c.start(pads.clone());
            }
            anyhow::ensure!(c.rows() == b, "cache has {} rows, batch has {b}", c.rows());
        }
        let keys = past + t;
        anyhow::ensure!(
            keys <= self.config.max_position_embeddings,
            "sequence of {keys} tokens exceeds the model's {} positions",
            self.config.max_position_embeddings
        );
        let mut positions = Vec::with_capacity(b * t);
        for &pad in &pads {
            positions.extend((0..t).map(|i| (past + i).saturating_sub(pad) as u32));
        }
        let positions = Tensor::from_vec(positions, b * t, &self.device)?;
        let half = self.config.head_dim() / 2;
        let rope = Rope {
            cos: self.cos_table.index_select(&positions, 0)?.reshape((b, t, half))?,
            sin: self.sin_table.index_select(&positions, 0)?.reshape((b, t, half))?,
        };
        // The fused inference attention masks by itself; only the differentiable path needs it.
        let mask = if fused_attention(mode, &self.device, self.dtype) { None } else { self.attention_mask(&pads, past, t)? };
        let mut x = self.embed_ids(&ids.flatten_all()?, mode)?.reshape((b, t, self.config.hidden_size))?;
        let eps = self.config.rms_norm_eps;
        let last = self.blocks.len().saturating_sub(1);
        for (layer, block) in self.blocks.iter().enumerate() {
            let normed = rms_norm(&x, &block.attn_norm, eps, mode)?;
            let mut mixed = block.attn.mix(&normed, &rope, mask.as_ref(), &pads, cache.as_deref_mut().map(|c| (c, layer)), mode)?;
            if let (Some(at), true) = (at, layer == last) {
                let pick = |v: &Tensor| -> candle_core::Result<Tensor> { v.reshape((b * t, v.dim(2)?))?.index_select(at, 0) };
                (x, mixed) = (pick(&x)?, pick(&mixed)?);
            }
            x = (x + block.attn.o.forward(&mixed, mode)?)?;
            let normed = rms_norm(&x, &block.mlp_norm, eps, mode)?;
            x = (&x + block.mlp.forward(&normed, mode)?)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        Ok(rms_norm(&x, &self.final_norm, eps, mode)?)
    }

    /// Additive mask (B, 1, T, past + T): causal, and padding keys hidden.
    fn attention_mask(&self, pads: &[usize], past: usize, t: usize) -> candle_core::Result<Option<Tensor>> {
        if t == 1 && pads.iter().all(|&p| p == 0) {
            return Ok(None);
        }
        let keys = past + t;
        let mut mask = vec![0f32; pads.len() * t * keys];
        for (b, &pad) in pads.iter().enumerate() {
            for i in 0..t {
                let query = past + i;
                let row = &mut mask[(b * t + i) * keys..(b * t + i + 1) * keys];
                for (j, m) in row.iter_mut().enumerate() {
                    let visible = (j >= pad && j <= query) || j == query;
                    if !visible {
                        *m = MASKED;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (pads.len(), 1, t, keys), &self.device)?.to_dtype(self.dtype).map(Some)
    }

    /// Next-token logits (…, vocab) from hidden states (…, hidden) of a pass in `mode`, added
    /// tokens last; half precision is upcast to f32.
    pub fn logits(&self, hidden: &Tensor, mode: Mode) -> anyhow::Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let dims = hidden.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let hidden = hidden.reshape((rows, self.config.hidden_size))?;
        // Hidden states that carry gradients keep the differentiable matmul.
        let base_mode = Mode { adapter: false, grad: hidden.track_op(), dropout: None };
        let mut logits = matmul_wt(&hidden, head, self.head_blocks.as_ref(), base_mode)?;
        if let Some(added) = self.new_rows(mode)? {
            logits = Tensor::cat(&[&logits, &hidden.matmul(&added.t()?)?], 1)?;
        }
        let mut out = dims;
        *out.last_mut().unwrap() = self.vocab_size();
        let logits = logits.reshape(out)?;
        Ok(match self.dtype {
            DType::F16 | DType::BF16 => logits.to_dtype(DType::F32)?,
            _ => logits,
        })
    }

    /// log p(target) (N,) at each row of `hidden` (N, hidden) of a pass in `mode`; with
    /// `support`, row i's distribution is renormalised over the tokens `support[i]` (a
    /// grammar's mask). Where the fused training ops run, the output projection and the
    /// log-softmax are one node ([`super::train_ops::head_target_logprobs`]) and the (N, vocab)
    /// logits never exist; elsewhere they go through [`Self::logits`].
    pub fn target_logprobs(&self, hidden: &Tensor, targets: &[u32], support: Option<&[Vec<u32>]>, mode: Mode) -> anyhow::Result<Tensor> {
        if !super::train_ops::supported(hidden.device(), hidden.dtype()) {
            let mut logits = self.logits(hidden, mode)?;
            if let Some(support) = support {
                let vocab = self.vocab_size();
                let mut mask = vec![f32::NEG_INFINITY; support.len() * vocab];
                for (row, allowed) in mask.chunks_exact_mut(vocab).zip(support) {
                    for &t in allowed {
                        anyhow::ensure!((t as usize) < vocab, "token {t} is outside a vocabulary of {vocab}");
                        row[t as usize] = 0.0;
                    }
                }
                logits = (&logits + Tensor::from_vec(mask, (support.len(), vocab), &self.device)?.to_dtype(logits.dtype())?)?;
            }
            let targets = Tensor::new(targets, hidden.device())?;
            return Ok(super::train_ops::target_logprobs(&logits, &targets)?);
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let added = self.new_rows(mode)?;
        Ok(super::train_ops::head_target_logprobs(hidden, head, added.as_ref(), targets, support)?)
    }

    /// Logits at every position, (B, T, vocab).
    pub fn forward(&self, ids: &Tensor, pads: Option<&[usize]>, cache: Option<&mut KvCache>, mode: Mode) -> anyhow::Result<Tensor> {
        let hidden = self.forward_hidden(ids, pads, cache, mode)?;
        self.logits(&hidden, mode)
    }

    /// Logits of the last position only, (B, vocab): what generation needs.
    pub fn forward_last(&self, ids: &Tensor, pads: Option<&[usize]>, cache: Option<&mut KvCache>, mode: Mode) -> anyhow::Result<Tensor> {
        self.logits(&self.forward_last_hidden(ids, pads, cache, mode)?, mode)
    }

    /// Hidden states of the last position only, (B, hidden), for [`Self::logits`] or
    /// [`Self::logits_over`].
    pub fn forward_last_hidden(
        &self,
        ids: &Tensor,
        pads: Option<&[usize]>,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> anyhow::Result<Tensor> {
        let hidden = self.forward_hidden(ids, pads, cache, mode)?;
        let t = hidden.dim(1)?;
        Ok(hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// The output projection's rows of `tokens`, (tokens, hidden), added tokens' rows as a pass
    /// in `mode` reads them: the head of [`Self::logits_over`].
    pub fn head_rows(&self, tokens: &[u32], mode: Mode) -> anyhow::Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let (base, added) = (self.config.vocab_size, self.new_rows(mode)?);
        let rows = tokens
            .iter()
            .map(|&t| match (t as usize).checked_sub(base) {
                None => Ok(head.get(t as usize)?),
                Some(i) if i < self.vocab_size() - base => Ok(added.as_ref().expect("added tokens have rows").get(i)?),
                Some(_) => anyhow::bail!("token {t} is beyond the vocabulary ({})", self.vocab_size()),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// Logits of `hidden` (N, hidden) at the tokens of `head` ([`Self::head_rows`]) only, (N,
    /// tokens) in f32: where only a few tokens may follow (a code's next level), the rest of the
    /// vocabulary's products are left out.
    pub fn logits_over(&self, hidden: &Tensor, head: &Tensor) -> anyhow::Result<Tensor> {
        Ok(hidden.matmul(&head.t()?)?.to_dtype(DType::F32)?)
    }

    /// Rotary tables for rows that share the positions `start..start + t`, (t, hd / 2).
    fn rope_range(&self, start: usize, t: usize) -> candle_core::Result<Rope> {
        Ok(Rope { cos: self.cos_table.narrow(0, start, t)?.contiguous()?, sin: self.sin_table.narrow(0, start, t)?.contiguous()? })
    }

    /// The training forward of one GRPO group: a prompt shared by G completions. The prompt's
    /// hidden states, keys and values are computed once (prefix sharing), not G times; each
    /// completion (right-padded to C tokens; padding only affects padded positions) attends to
    /// them and causally to itself.
    ///
    /// The first `frozen` prompt tokens run without gradients: their keys and values are
    /// constants of the backward pass, which then costs what the prompt's last tokens and the
    /// completions cost, not the whole prompt (`grpo.grad_prompt_tokens`). The values are the
    /// same for any `frozen` (up to rounding: in f32 the frozen head runs the inference
    /// kernels); only the gradient through those tokens is left out.
    ///
    /// Returns final hidden states (G, C, hidden) for [`Self::logits`] or
    /// [`Self::target_logprobs`]: row g, position i predicts completion token i, so position 0
    /// comes from the prompt's last hidden state.
    pub fn forward_group(&self, prompt: &[u32], completions: &Tensor, frozen: usize, mode: Mode) -> anyhow::Result<Tensor> {
        let (g, c) = completions.dims2()?;
        let p = prompt.len();
        anyhow::ensure!(p > 0 && c > 0, "a group needs a prompt and completion tokens");
        anyhow::ensure!(frozen < p, "at least the prompt's last token must carry gradients ({frozen} of {p} frozen)");
        anyhow::ensure!(p + c <= self.config.max_position_embeddings, "prompt + completion exceed the model's positions");
        let h = self.config.hidden_size;
        let live = p - frozen;
        let frozen_mode = Mode { grad: false, ..mode };
        let embed = |ids: &[u32], mode: Mode| -> anyhow::Result<Tensor> {
            self.embed_ids(&Tensor::new(ids, &self.device)?, mode)?.unsqueeze(0).map_err(Into::into)
        };
        let mut xf = if frozen > 0 { Some(embed(&prompt[..frozen], frozen_mode)?) } else { None };
        let mut xp = embed(&prompt[frozen..], mode)?;
        let mut xc = self.embed_ids(&completions.flatten_all()?, mode)?.reshape((g, c, h))?;
        let rope_f = if frozen > 0 { Some(self.rope_range(0, frozen)?) } else { None };
        let (rope_p, rope_c) = (self.rope_range(frozen, live)?, self.rope_range(p, c)?);
        let causal = |t: usize, past: usize| -> candle_core::Result<Tensor> {
            let mask: Vec<f32> = (0..t).flat_map(|i| (0..past + t).map(move |j| if j <= past + i { 0.0 } else { MASKED })).collect();
            Tensor::from_vec(mask, (1, 1, t, past + t), &self.device)?.to_dtype(self.dtype)
        };
        let (mask_p, mask_c) = (causal(live, frozen)?, causal(c, p)?);
        // The fused kernel masks by itself; the candle ops need the frozen head's causal mask.
        let mask_f = if frozen > 0 && !fused_attention(frozen_mode, &self.device, self.dtype) { Some(causal(frozen, 0)?) } else { None };
        let pads_c = vec![0; g];
        let eps = self.config.rms_norm_eps;
        for block in &self.blocks {
            let a = &block.attn;
            // The frozen head of the prompt: an inference pass, whose keys and values are constants.
            let frozen_kv = match (xf.take(), &rope_f) {
                (Some(x), Some(rope_f)) => {
                    let (qf, kf, vf) = a.project(&rms_norm(&x, &block.attn_norm, eps, frozen_mode)?, rope_f, frozen_mode)?;
                    let mixed =
                        a.attend_causal(&qf, &CachedKv { k: kf.clone(), v: vf.clone(), prefix: None }, &[0], mask_f.as_ref(), frozen_mode)?;
                    let attn = a.o.forward(&mixed, frozen_mode)?;
                    let x = (x + attn)?;
                    xf = Some((&x + block.mlp.forward(&rms_norm(&x, &block.mlp_norm, eps, frozen_mode)?, frozen_mode)?)?);
                    Some((kf, vf))
                }
                _ => None,
            };
            let (qp, kp, vp) = a.project(&rms_norm(&xp, &block.attn_norm, eps, mode)?, &rope_p, mode)?;
            let (qc, kc, vc) = a.project(&rms_norm(&xc, &block.attn_norm, eps, mode)?, &rope_c, mode)?;
            let prompt_kv = CachedKv { k: kp.clone(), v: vp.clone(), prefix: frozen_kv.clone().map(|(k, v)| (k, v, vec![0])) };
            let attn_p = a.o.forward(&a.attend_causal(&qp, &prompt_kv, &[0], Some(&mask_p), mode)?, mode)?;
            // Every completion reads the whole prompt's keys and values as a shared prefix.
            let (kp, vp) = match frozen_kv {
                Some((kf, vf)) => (Tensor::cat(&[&kf, &kp], 2)?, Tensor::cat(&[&vf, &vp], 2)?),
                None => (kp, vp),
            };
            let completion_kv = CachedKv { k: kc, v: vc, prefix: Some((kp, vp, vec![0; g])) };
            let attn_c = a.o.forward(&a.attend_causal(&qc, &completion_kv, &pads_c, Some(&mask_c), mode)?, mode)?;
            xp = (xp + attn_p)?;
            xc = (xc + attn_c)?;
            xp = (&xp + block.mlp.forward(&rms_norm(&xp, &block.mlp_norm, eps, mode)?, mode)?)?;
            xc = (&xc + block.mlp.forward(&rms_norm(&xc, &block.mlp_norm, eps, mode)?, mode)?)?;
        }
        let last_p = rms_norm(&xp.narrow(1, live - 1, 1)?.contiguous()?, &self.final_norm, eps, mode)?.broadcast_as((g, 1, h))?;
        Ok(if c > 1 {
            let hc = rms_norm(&xc.narrow(1, 0, c - 1)?.contiguous()?, &self.final_norm, eps, mode)?;
            Tensor::cat(&[&last_p, &hc], 1)?
        } else {
            last_p.contiguous()?
        })
    }

    /// A new, empty cache sized for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.blocks.len(), capacity)
    }
}
