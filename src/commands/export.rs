//! `refine-poi export`: a model with its LoRA adapter merged into the weights, written as a
//! Hugging Face model folder (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json` with the chat template, `generation_config.json`) that transformers
//! and vLLM load like any Llama or Qwen2 checkpoint. Weights are written in f32 (a GGUF base is
//! dequantised, with q/k back in Hugging Face's layout).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use serde_json::json;

use super::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The folder to write (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let out = &args.out;
    if out.exists() {
        let empty = std::fs::read_dir(out).with_context(|| format!("{} exists and is not a folder", out.display()))?.next().is_none();
        ensure!(empty, "{} already exists and is not empty: choose a new --out", out.display());
    }
    let (loaded, name) = args.model.load()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);

    let tensors: HashMap<String, candle_core::Tensor> =
        model.merged_weights()?.into_iter().map(|(k, t)| Ok((k, t.to_dtype(candle_core::DType::F32)?))).collect::<Result<_>>()?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).context("cannot write model.safetensors")?;

    let cfg = &model.config;
    let architecture = match cfg.model_type.as_str() {
        "qwen2" => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let mut config = serde_json::to_value(cfg)?;
    let extra = json!({
        "architectures": [architecture],
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "tie_word_embeddings": !tensors.contains_key("lm_head.weight"),
        "head_dim": cfg.head_dim(),
        "num_key_value_heads": cfg.num_kv_heads(),
        "vocab_size": model.vocab_size(),
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
        c.retain(|_, v| !v.is_null());
    }

    tok.inner().save(out.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    let mut tok_cfg = json!({ "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings });
    for (key, value) in [("chat_template", &tok.chat_template), ("bos_token", &tok.bos_token), ("eos_token", &tok.eos_token)] {
        if let Some(v) = value {
            tok_cfg[key] = json!(v);
        }
    }
    // Batched generation and training in transformers need a pad token: the end-of-sequence
    // token, as SmolLM2's own tokenizer config has it (the tokenizer read here keeps no pad
    // token of its own, so a model whose pad differs from its EOS gets EOS too).
    if let Some(eos) = &tok.eos_token {
        tok_cfg["pad_token"] = json!(eos);
        if let Some(id) = tok.inner().token_to_id(eos) {
            config["pad_token_id"] = json!(id);
        }
    }
    std::fs::write(out.join("tokenizer_config.json"), serde_json::to_string_pretty(&tok_cfg)?)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let mut generation = json!({ "eos_token_id": tok.eos_ids, "pad_token_id": config.get("pad_token_id") });
    if let Some(bos) = cfg.bos_token_id.as_ref().map(|b| b.to_vec()) {
        generation["bos_token_id"] = json!(bos.first());
    }
    std::fs::write(out.join("generation_config.json"), serde_json::to_string_pretty(&generation)?)?;
    eprintln!("exported {name} ({} tensors) to {}", tensors.len(), out.display());
    Ok(())
}
