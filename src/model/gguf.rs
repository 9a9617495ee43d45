//! Loading a GGUF file: the architecture from its metadata, the weights dequantized to the
//! compute dtype under Hugging Face names, and the tokenizer and chat template from its metadata.
//!
//! llama.cpp's converter permutes the rows of Llama q/k projections so that its interleaved RoPE
//! works; we undo that permutation, so the weights (and LoRA adapters trained on them) are in
//! the Hugging Face layout that PEFT and transformers expect.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::config::{ModelConfig, TokenIds};
use super::quant::QuantRows;
use super::tokenizer::TextTokenizer;

pub struct GgufParts {
    pub config: ModelConfig,
    /// The Hugging Face repo the file was converted from, when its metadata names it.
    pub repo: Option<String>,
    pub tensors: HashMap<String, Tensor>,
    /// The 2-D weights' quantised blocks by Hugging Face name, when asked for and in a format
    /// the few-row kernel reads ([`QuantRows`]).
    pub blocks: HashMap<String, QuantRows>,
    pub tokenizer: TextTokenizer,
}

struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> anyhow::Result<&Value> {
        self.md.get(key).with_context(|| format!("{}: GGUF metadata lacks '{key}'", self.path.display()))
    }
    fn usize(&self, key: &str) -> anyhow::Result<usize> {
        let v = self.get(key)?;
        Ok(v.to_u32().map(|x| x as usize).or_else(|_| v.to_u64().map(|x| x as usize))?)
    }
    fn f64(&self, key: &str) -> anyhow::Result<f64> {
        Ok(self.get(key)?.to_f32()? as f64)
    }
    fn string(&self, key: &str) -> anyhow::Result<String> {
        Ok(self.get(key)?.to_string()?.clone())
    }
    fn strings(&self, key: &str) -> anyhow::Result<Vec<String>> {
        self.get(key)?.to_vec()?.iter().map(|v| Ok(v.to_string()?.clone())).collect()
    }
}

/// The repo id the file's metadata names as its source, when it does (newer llama.cpp
/// converters write it; `general.name` and its parts are not reliable: the default model's
/// say `smollm2` / `8k-lc100k-mix1-ep2`).
fn source_repo(meta: &Meta) -> Option<String> {
    meta.string("general.source.huggingface.repository").ok().filter(|s| s.split('/').count() == 2)
}

/// The model in `path`, its weights dequantised to `dtype` on `device`; with `keep_blocks`,
/// also the quantised blocks of its matrices (in the same row order as the dequantised ones).
pub fn load(path: &Path, device: &Device, dtype: DType, keep_blocks: bool) -> anyhow::Result<GgufParts> {
    let mut file = File::open(path).with_context(|| format!("cannot open model file {}", path.display()))?;
    let content = Content::read(&mut file).with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let meta = Meta { md: &content.metadata, path };
    let arch = meta.string("general.architecture")?;
    let model_type = match arch.as_str() {
        "llama" => "llama",
        "qwen2" => "qwen2",
        other => bail!("{}: GGUF architecture '{other}' is not supported (llama, qwen2)", path.display()),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let heads = meta.usize(&key("attention.head_count"))?;
    let hidden = meta.usize(&key("embedding_length"))?;
    let config = ModelConfig {
        model_type: model_type.to_string(),
        vocab_size: tokens.len(),
        hidden_size: hidden,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(meta.usize(&key("attention.head_count_kv")).unwrap_or(heads)),
        head_dim: meta.usize(&key("rope.dimension_count")).ok().filter(|&d| d != hidden / heads),
        rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: meta.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: meta.usize(&key("context_length")).unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: false,
        bos_token_id: meta.usize("tokenizer.ggml.bos_token_id").ok().map(|i| TokenIds::One(i as u32)),
        eos_token_id: meta.usize("tokenizer.ggml.eos_token_id").ok().map(|i| TokenIds::One(i as u32)),
    };
    config.validate()?;

    let mut tensors = HashMap::new();
    let mut blocks = HashMap::new();
    for (gguf_name, info) in &content.tensor_infos {
        let Some(hf_name) = hf_name(gguf_name) else { continue };
        let q = content
            .tensor(&mut file, gguf_name, &Device::Cpu)
            .with_context(|| format!("{}: cannot read tensor {gguf_name}", path.display()))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        let rope_heads = match gguf_name {
            _ if model_type != "llama" || info.shape.dims().len() != 2 => None,
            n if n.ends_with("attn_q.weight") => Some(config.num_attention_heads),
            n if n.ends_with("attn_k.weight") => Some(config.num_kv_heads()),
            _ => None,
        };
        if let Some(heads) = rope_heads {
            t = unpermute_rope_rows(&t, heads)?;
        }
        if keep_blocks && info.shape.dims().len() == 2 {
            // The blocks' rows in the order of `t`: the unpermutation applied to row numbers.
            let order = match rope_heads {
                Some(heads) => {
                    let rows = info.shape.dims()[0];
                    let ids = Tensor::arange(0u32, rows as u32, &Device::Cpu)?.to_dtype(DType::F32)?.reshape((rows, 1))?;
                    let order = unpermute_rope_rows(&ids, heads)?.flatten_all()?.to_vec1::<f32>()?;
                    Some(order.into_iter().map(|r| r as usize).collect::<Vec<_>>())
                }
                None => None,
            };
            if let Some(rows) = QuantRows::from_qtensor(&q, order.as_deref()).with_context(|| format!("{}: {gguf_name}", path.display()))? {
                blocks.insert(hf_name.clone(), rows);
            }
        }
        tensors.insert(hf_name, t.to_device(device)?.to_dtype(dtype)?);
    }
    let tokenizer = tokenizer_from_metadata(&meta, tokens)?;
    Ok(GgufParts { config, repo: source_repo(&meta), tensors, blocks, tokenizer })
}

/// llama.cpp's tensor names to Hugging Face's.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{param}"))
}

/// Inverse of llama.cpp's `permute`: rows grouped per head as (2, head_dim/2) pairs go back to
/// the rotate-half order, (head_dim/2, 2) -> (2, head_dim/2).
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    w.reshape((heads, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

/// Rebuilds the Hugging Face tokenizer of a byte-level BPE ("gpt2") GGUF vocabulary.
fn tokenizer_from_metadata(meta: &Meta, tokens: Vec<String>) -> anyhow::Result<TextTokenizer> {
    let path = meta.path;
    let model = meta.string("tokenizer.ggml.model")?;
    anyhow::ensure!(
        model == "gpt2",
        "{}: GGUF tokenizer model '{model}' cannot be rebuilt here (only byte-level BPE 'gpt2'); \
         use the model's Hugging Face folder with its tokenizer.json instead",
        path.display()
    );
    let pre = meta.string("tokenizer.ggml.pre").unwrap_or_else(|_| "default".into());
    let merges: Vec<(String, String)> = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("{}: malformed merge '{m}'", path.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("{}: cannot build BPE tokenizer: {e}", path.display()))?;
    let mut tok = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let regex_split = |pattern: &str| -> anyhow::Result<_> {
        Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false).map_err(|e| anyhow::anyhow!("{e}"))
    };
    // Each pre-tokenizer as the matching tokenizer.json writes it.
    let pre_tokenizer: tokenizers::PreTokenizerWrapper = match pre.as_str() {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "default" | "gpt2" => byte_level.into(),
        "llama-bpe" | "llama3" => Sequence::new(vec![
            regex_split(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )?
            .into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        "qwen2" => Sequence::new(vec![
            regex_split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")?
                .into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        other => bail!(
            "{}: GGUF pre-tokenizer '{other}' is not supported (smollm, gpt2, llama-bpe, qwen2); \
             use the model's Hugging Face folder with its tokenizer.json instead",
            path.display()
        ),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevel::default()));
    // Control (3) and user-defined (4) tokens are matched whole in the text, as in tokenizer.json.
    let types: Vec<i64> = match meta.md.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_i32().map(i64::from)).collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let specials: Vec<AddedToken> =
        types.iter().enumerate().filter(|(_, t)| **t == 3 || **t == 4).map(|(i, t)| AddedToken::from(tokens[i].clone(), *t == 3)).collect();
    tok.add_special_tokens(specials).map_err(|e| anyhow::anyhow!("{e}"))?;
    let token_at = |key: &str| meta.usize(key).ok().and_then(|i| tokens.get(i).cloned());
    let bos = token_at("tokenizer.ggml.bos_token_id");
    let eos = token_at("tokenizer.ggml.eos_token_id");
    let add_bos = meta.get("tokenizer.ggml.add_bos_token").and_then(|v| Ok(v.to_bool()?)).unwrap_or(false);
    if let (true, Some(bos)) = (add_bos, &bos) {
        let id = meta.usize("tokenizer.ggml.bos_token_id")? as u32;
        let post = TemplateProcessing::builder()
            .try_single(format!("{bos}:0 $A:0"))
            .and_then(|b| b.try_pair(format!("{bos}:0 $A:0 {bos}:1 $B:1")))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .special_tokens(vec![(bos.clone(), id)])
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tok.with_post_processor(Some(post));
    }
    let eos_ids = meta.usize("tokenizer.ggml.eos_token_id").map(|i| vec![i as u32]).unwrap_or_default();
    let template = meta.string("tokenizer.chat_template").ok();
    Ok(TextTokenizer::new(tok, eos_ids, bos, eos, template))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(hf_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.attn_k.bias").unwrap(), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_name("blk.12.ffn_down.weight").unwrap(), "model.layers.12.mlp.down_proj.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, hd, cols) = (2, 4, 3);
        let w = Tensor::arange(0f32, (heads * hd * cols) as f32, &Device::Cpu).unwrap().reshape((heads * hd, cols)).unwrap();
        let permuted = w
            .reshape((heads, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        let back = unpermute_rope_rows(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
