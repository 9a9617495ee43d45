//! The architecture description shared by every model source: Hugging Face `config.json` keys,
//! so a folder's config deserialises as is and a GGUF's metadata maps onto the same fields.

use serde::{Deserialize, Serialize};

/// Llama-family and Qwen2 models differ only in what this struct says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    /// `llama` (SmolLM2, Llama 2/3, TinyLlama) or `qwen2` (Qwen2/2.5: bias on q/k/v).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama configs may set this; Qwen2 always has q/k/v bias (see [`ModelConfig::qkv_bias`]).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

/// `eos_token_id` is an integer in some configs and a list in others.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Llama 3.1-style frequency scaling (`rope_type = "llama3"`); other types are rejected.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: f64,
    #[serde(default)]
    pub low_freq_factor: f64,
    #[serde(default)]
    pub high_freq_factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: usize,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_positions() -> usize {
    4096
}

impl ModelConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// One layer's linear products as (name, n, k) for `x [tokens, k] · w[n, k]ᵀ`.
    pub fn layer_shapes(&self) -> Vec<(&'static str, usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * self.head_dim(), self.num_kv_heads() * self.head_dim());
        vec![
            ("q_proj", q, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, q),
            ("gate_proj", i, h),
            ("up_proj", i, h),
            ("down_proj", h, i),
        ]
    }

    /// FLOPs of one training forward and backward pass over a sequence of `tokens`, `scored`
    /// of them through the LM head: each linear layer's product with its frozen weight forward
    /// (x Wᵀ) and for its input's gradient (dy W), the last layer's output projection and MLP
    /// on the scored rows only ([`crate::model::CausalLm::forward_hidden_at`]); causal
    /// attention's two products forward and five backward (the scores recomputed) over the keys
    /// each query sees; the head's logits and input gradients of the scored rows over the base
    /// vocabulary. The adapters' rank-r products and the element-wise work are left out.
    pub fn training_flops(&self, tokens: usize, scored: usize) -> f64 {
        let shapes = self.layer_shapes();
        let all: usize = shapes.iter().map(|(_, n, k)| n * k).sum();
        let projections: usize =
            shapes.iter().filter(|(name, ..)| matches!(*name, "q_proj" | "k_proj" | "v_proj")).map(|(_, n, k)| n * k).sum();
        let after_attention = all - projections;
        let layers = self.num_hidden_layers;
        let linear = layers * projections * tokens + after_attention * (layers.saturating_sub(1) * tokens + scored);
        let seen_keys = tokens * (tokens + 1) / 2;
        let attention = 7 * 2 * self.num_attention_heads * self.head_dim() * seen_keys;
        (2 * 2 * linear + layers * attention + 2 * 2 * self.vocab_size * self.hidden_size * scored) as f64
    }

    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// Checks what the implementation relies on, so a bad config is an error, not a panic.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.model_type.as_str(), "llama" | "qwen2"),
            "unsupported model_type '{}': refine-poi runs Llama-family and Qwen2 models",
            self.model_type
        );
        anyhow::ensure!(self.num_attention_heads > 0 && self.num_kv_heads() > 0, "model config has zero attention heads");
        anyhow::ensure!(
            self.num_attention_heads.is_multiple_of(self.num_kv_heads()),
            "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
            self.num_attention_heads,
            self.num_kv_heads()
        );
        anyhow::ensure!(self.head_dim().is_multiple_of(2), "head_dim must be even for rotary embeddings");
        if let Some(scaling) = &self.rope_scaling {
            anyhow::ensure!(
                scaling.rope_type == "llama3" || scaling.rope_type == "default",
                "unsupported rope_scaling type '{}'",
                scaling.rope_type
            );
        }
        Ok(())
    }

    /// Inverse rotary frequencies, one per pair of head dimensions.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let dim = self.head_dim();
        let base: Vec<f64> = (0..dim / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / dim as f64)).collect();
        match &self.rope_scaling {
            Some(s) if s.rope_type == "llama3" => {
                let old_ctx = s.original_max_position_embeddings as f64;
                let low_wavelen = old_ctx / s.low_freq_factor;
                let high_wavelen = old_ctx / s.high_freq_factor;
                base.into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / s.factor
                        } else {
                            let smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * freq / s.factor + smooth * freq
                        }
                    })
                    .collect()
            }
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_with_extra_keys_and_eos_list() {
        let json = r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"rms_norm_eps":1e-6,
            "rope_theta":1000000.0,"eos_token_id":[1,2],"torch_dtype":"bfloat16","use_cache":true}"#;
        let cfg: ModelConfig = serde_json::from_str(json).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.qkv_bias());
        assert_eq!(cfg.head_dim(), 4);
        assert_eq!(cfg.eos_token_id.unwrap().to_vec(), vec![1, 2]);
    }

    #[test]
    fn bad_head_counts_are_errors() {
        let json = r#"{"model_type":"llama","vocab_size":10,"hidden_size":12,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2,"rms_norm_eps":1e-6}"#;
        let cfg: ModelConfig = serde_json::from_str(json).unwrap();
        assert!(cfg.validate().is_err());
    }
}
