//! Tiny random models written as Hugging Face folders, so tests (and users trying the pipeline)
//! run the real loading, LoRA, generation and training code in milliseconds.
//!
//! The tokenizer is byte-level BPE without merges (one token per byte) plus ChatML special
//! tokens, so any text round-trips and POI ids tokenise digit by digit.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::config::{ModelConfig, TokenIds};

pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A small config of the given family (`llama` or `qwen2`) over the tiny byte vocabulary.
pub fn tiny_config(model_type: &str) -> ModelConfig {
    ModelConfig {
        model_type: model_type.to_string(),
        vocab_size: SPECIAL_TOKENS.len() + 256,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: model_type == "llama",
        attention_bias: false,
        bos_token_id: None,
        eos_token_id: Some(TokenIds::One(2)),
    }
}

fn tiny_tokenizer() -> anyhow::Result<Tokenizer> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab: tokenizers::models::bpe::Vocab = SPECIAL_TOKENS.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), (SPECIAL_TOKENS.len() + i) as u32);
    }
    let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).build().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true))).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tok)
}

/// Writes `config.json`, `model.safetensors` (random weights, seeded), `tokenizer.json` and
/// `tokenizer_config.json` (ChatML template) into `dir`.
pub fn write_tiny_model(dir: &Path, config: &ModelConfig, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: &[usize], scale: f32, offset: f32| -> anyhow::Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0)).collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    let (h, hd) = (config.hidden_size, config.head_dim());
    let (heads, kv) = (config.num_attention_heads, config.num_kv_heads());
    let w = 0.3;
    add("model.embed_tokens.weight".into(), &[config.vocab_size, h], 1.0, 0.0)?;
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[h], 0.1, 1.0)?;
        add(format!("{p}.post_attention_layernorm.weight"), &[h], 0.1, 1.0)?;
        add(format!("{p}.self_attn.q_proj.weight"), &[heads * hd, h], w, 0.0)?;
        add(format!("{p}.self_attn.k_proj.weight"), &[kv * hd, h], w, 0.0)?;
        add(format!("{p}.self_attn.v_proj.weight"), &[kv * hd, h], w, 0.0)?;
        add(format!("{p}.self_attn.o_proj.weight"), &[h, heads * hd], w, 0.0)?;
        if config.qkv_bias() {
            add(format!("{p}.self_attn.q_proj.bias"), &[heads * hd], 0.1, 0.0)?;
            add(format!("{p}.self_attn.k_proj.bias"), &[kv * hd], 0.1, 0.0)?;
            add(format!("{p}.self_attn.v_proj.bias"), &[kv * hd], 0.1, 0.0)?;
        }
        add(format!("{p}.mlp.gate_proj.weight"), &[config.intermediate_size, h], w, 0.0)?;
        add(format!("{p}.mlp.up_proj.weight"), &[config.intermediate_size, h], w, 0.0)?;
        add(format!("{p}.mlp.down_proj.weight"), &[h, config.intermediate_size], w, 0.0)?;
    }
    add("model.norm.weight".into(), &[h], 0.1, 1.0)?;
    if !config.tie_word_embeddings {
        add("lm_head.weight".into(), &[config.vocab_size, h], w, 0.0)?;
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config)?)?;
    tiny_tokenizer()?.save(dir.join("tokenizer.json"), true).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tok_cfg = serde_json::json!({ "chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>" });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tok_cfg)?)?;
    Ok(())
}
