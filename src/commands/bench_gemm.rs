//! The machine's own matrix-multiply speed at the model's shapes, in the model's dtype on the
//! model's device, so that `bench` can say how far each phase is from this machine's limit, on
//! any CPU or GPU.
//!
//! Each linear layer of a prefill of `tokens` tokens is one `[tokens, k] x [k, n]` product,
//! timed through candle's matmul (the path the model's linear layers take; its kernels pick the
//! instruction set at run time). The FLOP-weighted rate over one layer's seven products is the
//! GEMM rate a prefill could reach at best; a phase's share is the rate it achieves over that.
//! The same products with Q8_0 weights tell whether a quantised frozen base would be faster.

use std::time::Instant;

use anyhow::Context;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use serde_json::{Value, json};

use crate::model::ModelConfig;

/// The instruction sets this CPU offers that the kernels dispatch on.
pub fn cpu_features() -> Value {
    #[cfg(target_arch = "x86_64")]
    {
        json!({
            "avx512f": std::is_x86_feature_detected!("avx512f"),
            "avx2": std::is_x86_feature_detected!("avx2"),
            "fma": std::is_x86_feature_detected!("fma"),
            // What `--bf16-prefill` runs on: AMX-BF16 (granted by Linux), else AVX512-BF16, else none.
            "bf16_kernels": crate::model::bf16::Isa::detect().map(|isa| isa.name()),
            // The project's own fused kernels (skinny matmul, softmax, SwiGLU): AVX2+FMA or portable.
            "fused_kernels": if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") { "avx2+fma" } else { "portable" },
            // Attention's scores and weighted sums over many keys, several heads at once.
            "attention_kernels": crate::model::attention_cpu::kernels::Isa::detect().name(),
            // Few-row products straight from a GGUF's blocks (`--quantized-base`).
            "block_kernels": crate::model::quant::BlockKernel::detect().name(),
            // candle's GEMM (the gemm crate, built with its AVX-512 kernels) picks the same way.
            "gemm_kernels": if std::is_x86_feature_detected!("avx512f") {
                "avx512f"
            } else if std::is_x86_feature_detected!("fma") {
                "avx2+fma"
            } else {
                "scalar"
            },
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        json!({
            "fused_kernels": "portable",
            "attention_kernels": crate::model::attention_cpu::kernels::Isa::detect().name(),
            "block_kernels": crate::model::quant::BlockKernel::detect().name(),
        })
    }
}

/// FLOPs of one token's forward in a causal prefill of `tokens` tokens: the linear layers, the
/// attention scores and weighted sums (each token attends to (tokens + 1) / 2 positions on
/// average), and no LM head (a prefill needs the last position's logits only).
pub fn prefill_flops_per_token(cfg: &ModelConfig, tokens: usize) -> f64 {
    let linear: usize = cfg.layer_shapes().iter().map(|(_, n, k)| n * k).sum();
    let attention = 2 * cfg.num_attention_heads * cfg.head_dim() * (tokens + 1) / 2;
    (2 * cfg.num_hidden_layers * (linear + attention)) as f64
}

/// Weights one decoding step reads (and multiplies once per row): every layer's linear weights
/// and the LM head.
pub fn decode_weights(cfg: &ModelConfig) -> f64 {
    let linear: usize = cfg.layer_shapes().iter().map(|(_, n, k)| n * k).sum();
    (cfg.num_hidden_layers * linear + cfg.vocab_size * cfg.hidden_size) as f64
}

/// How the weights of a timed product are held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weights {
    /// Dense, in the model's dtype: candle's matmul, the path the model takes.
    Dense,
    /// GGUF Q8_0 blocks through candle's quantized matmul (CPU; the activations stay f32):
    /// what a quantised frozen base would run, timed beside the dense path so any machine shows
    /// whether one would pay.
    Q8_0,
    /// Packed in bf16 for AMX tiles or AVX512-BF16, the sums f32 (`--bf16-prefill`; CPUs with
    /// either, shapes in multiples of 32).
    Bf16,
}

/// GFLOP/s of each of one layer's products at `tokens` rows (median of `repeats` timings of
/// ~50 ms each) on `dev` in `dtype` with `weights`, and the FLOP-weighted rate over all seven.
/// A GPU is synchronised before each clock is read.
pub fn gemm_at_model_shapes(
    cfg: &ModelConfig,
    tokens: usize,
    repeats: usize,
    dev: &Device,
    dtype: DType,
    weights: Weights,
) -> anyhow::Result<Value> {
    let mut per_shape = serde_json::Map::new();
    let (mut flops, mut seconds) = (0.0, 0.0);
    for (name, n, k) in cfg.layer_shapes() {
        let x = Tensor::randn(0f32, 1.0, (tokens, k), dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), dev)?;
        let product: Box<dyn Fn() -> candle_core::Result<Tensor>> = match weights {
            Weights::Dense => {
                let (x, wt) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?.t()?);
                Box::new(move || x.matmul(&wt))
            }
            Weights::Q8_0 => {
                let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
                Box::new(move || q.forward(&x))
            }
            Weights::Bf16 => {
                let packed =
                    crate::model::bf16::PackedBf16::pack(&w)?.with_context(|| format!("{name}: ({n}, {k}) does not fill whole tiles"))?;
                Box::new(move || crate::model::bf16::matmul_wt(&x, &packed, None))
            }
        };
        // Warm-up, and enough products per timing (about 50 ms) that one product's noise does
        // not decide the figure.
        let start = Instant::now();
        product()?;
        dev.synchronize()?;
        let per_timing = ((0.05 / start.elapsed().as_secs_f64().max(1e-6)) as usize).clamp(1, 10_000);
        let mut times: Vec<f64> = (0..repeats.max(1))
            .map(|_| {
                let start = Instant::now();
                for _ in 0..per_timing {
                    product()?;
                }
                dev.synchronize()?;
                Ok(start.elapsed().as_secs_f64() / per_timing as f64)
            })
            .collect::<anyhow::Result<_>>()?;
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let f = 2.0 * (tokens * n * k) as f64;
        per_shape.insert(format!("{name} [{tokens}x{k}]x[{k}x{n}]"), json!(f / t / 1e9));
        flops += f;
        seconds += t;
    }
    Ok(json!({ "tokens": tokens, "gflops_per_shape": per_shape, "gflops_layer": flops / seconds / 1e9 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::tiny_config;

    #[test]
    fn flops_and_bytes_by_hand() {
        // hidden 32, intermediate 64, 2 layers, 4 heads of 8, 2 KV heads.
        let cfg = tiny_config("llama");
        let shapes = cfg.layer_shapes();
        assert_eq!(shapes[0], ("q_proj", 32, 32));
        assert_eq!(shapes[1], ("k_proj", 16, 32));
        assert_eq!(shapes[6], ("down_proj", 32, 64));
        // Linear weights per layer: 1024 + 512 + 512 + 1024 + 3 × 2048 = 9216. At 3 tokens each
        // attends to 2 positions on average: 2 × 4 × 8 × 2 = 128 per layer.
        assert_eq!(prefill_flops_per_token(&cfg, 3), (2 * 2 * (9216 + 128)) as f64);
        assert_eq!(decode_weights(&cfg), (2 * 9216 + cfg.vocab_size * 32) as f64);
        // Training 3 tokens, 2 scored: 4 × 9216 × 3 through the first layer's linear layers; the
        // last layer's q, k and v (2048) on 3 rows, its o and MLP (7168) on the 2 scored rows;
        // the queries see 1 + 2 + 3 = 6 keys, 7 products of 2 × 4 × 8 FLOPs each; the head
        // 4 × V × 32 per scored row.
        let attention = 7 * 2 * 4 * 8 * 6;
        let layers = 4 * 9216 * 3 + 4 * (2048 * 3 + 7168 * 2) + 2 * attention;
        assert_eq!(cfg.training_flops(3, 2), (layers + 4 * cfg.vocab_size * 32 * 2) as f64);
    }

    #[test]
    fn gemm_rates_are_positive_for_every_shape() {
        for weights in [Weights::Dense, Weights::Q8_0] {
            let r = gemm_at_model_shapes(&tiny_config("llama"), 3, 2, &Device::Cpu, DType::F32, weights).unwrap();
            let shapes = r["gflops_per_shape"].as_object().unwrap();
            assert_eq!(shapes.len(), 7);
            assert!(shapes.values().all(|v| v.as_f64().unwrap() > 0.0));
            assert!(r["gflops_layer"].as_f64().unwrap().is_finite());
        }
        assert!(cpu_features()["fused_kernels"].is_string());
    }
}
