//! LoRA adapters in PEFT's layout: `adapter_config.json` plus `adapter_model.safetensors` with
//! keys like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, so an adapter
//! trained here loads in Python PEFT as is, and one from PEFT loads here.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::lora::{ALL_TARGETS, Lora, LoraConfig};
use super::peft_config::PeftSpec;
use super::transformer::{CausalLm, NewTokens};

/// The base model as an adapter records it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterBase {
    /// Its Hugging Face repo id when known: what PEFT's `AutoPeftModelForCausalLM` loads.
    pub repo: Option<String>,
    /// Where this tool loaded it from (a GGUF file, a model folder, a repo id), kept in the
    /// adapter's safetensors metadata.
    pub source: String,
}

impl AdapterBase {
    /// A base known only by where it was loaded from.
    pub fn local(source: &str) -> Self {
        AdapterBase { repo: None, source: source.to_string() }
    }
}

/// The safetensors metadata key that records [`AdapterBase::source`].
pub const SOURCE_METADATA_KEY: &str = "refine_poi.base_model";

fn short_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// The dtype of the adapter's factors for a model in `model`: f32, or f64 for an f64 model (the
/// gradient checks); never half precision (see [`CausalLm::attach_lora`]).
pub fn adapter_dtype(model: DType) -> DType {
    if model == DType::F64 { DType::F64 } else { DType::F32 }
}

/// PEFT's key of the rows of trainable tokens in the input embedding (saved without the adapter
/// name); a tied output head saves nothing of its own.
pub const TRAINABLE_TOKENS_KEY: &str = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";

/// The added tokens' text beside the adapter, `{"<a0>": 49152, ...}`: transformers'
/// `added_tokens.json`, what a tokenizer needs before it can read the adapter's prompts.
pub const ADDED_TOKENS_FILE: &str = "added_tokens.json";

fn peft_key(path: &str, factor: &str) -> String {
    format!("base_model.model.{path}.lora_{factor}.weight")
}

impl CausalLm {
    /// Adds a fresh adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming init), B = 0, so the
    /// adapted model starts equal to the base model. The factors are f32 (f64 for an f64 model)
    /// whatever the model's dtype: master weights that bf16 rounding cannot freeze (the
    /// forward casts them).
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> anyhow::Result<()> {
        let targets = cfg.target_modules()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (device, dtype) = (self.device().clone(), adapter_dtype(self.dtype()));
        let scale = cfg.alpha / cfg.r as f64;
        for lin in self.linears_mut() {
            if !targets.iter().any(|t| t == short_name(&lin.path)) {
                lin.lora = None;
                continue;
            }
            let (fan_in, fan_out) = (lin.in_dim(), lin.out_dim());
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a: Vec<f32> = (0..cfg.r * fan_in).map(|_| rng.random_range(-bound..bound) as f32).collect();
            let a = Tensor::from_vec(a, (cfg.r, fan_in), &device)?.to_dtype(dtype)?;
            let b = Tensor::zeros((fan_out, cfg.r), dtype, &device)?;
            lin.lora = Some(Lora { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, scale, dropout: cfg.dropout, reference: None });
        }
        self.lora_config = Some(cfg.clone());
        Ok(())
    }

    /// Adds `names` as new tokens with ids `vocab_size..`, trained with the adapter. Each row
    /// starts at the base embedding's mean plus seeded noise of the base entries' spread, so a
    /// new token looks like an ordinary token until training tells them apart.
    pub fn add_tokens(&mut self, names: Vec<String>, seed: u64) -> anyhow::Result<()> {
        anyhow::ensure!(self.new_tokens.is_none(), "the model already has added tokens");
        anyhow::ensure!(!names.is_empty(), "no tokens to add");
        anyhow::ensure!(
            !self.has_untied_head(),
            "added tokens need a model whose output head is tied to its embedding (this one's is not)"
        );
        let embed = self.embedding().to_dtype(DType::F32)?;
        let h = self.config.hidden_size;
        let mean = embed.mean_keepdim(0)?;
        let spread = embed.broadcast_sub(&mean)?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let noise: Vec<f32> = (0..names.len() * h).map(|_| spread * gaussian(&mut rng)).collect();
        let noise = Tensor::from_vec(noise, (names.len(), h), self.device())?;
        let rows = noise.broadcast_add(&mean)?.to_dtype(adapter_dtype(self.dtype()))?;
        self.new_tokens = Some(NewTokens { names, rows: Var::from_tensor(&rows)?, reference: None });
        Ok(())
    }

    /// Freezes a copy of the adapter's current factors as the reference policy: from now on,
    /// adapter-off passes ([`Mode::REFERENCE`](super::Mode::REFERENCE)) compute base + this
    /// copy instead of the base model. The copy is the adapter only (a few MB), not the base.
    /// It is detached: candle's `copy` of a trainable tensor stays in its graph, and every
    /// reference pass would record one.
    pub fn pin_reference_adapter(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.lora_config.is_some(), "no adapter attached to pin as the reference");
        let frozen = |v: &candle_core::Var| v.as_tensor().detach().copy();
        for lin in self.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                l.reference = Some((frozen(&l.a)?, frozen(&l.b)?, l.scale));
            }
        }
        if let Some(t) = self.new_tokens.as_mut() {
            t.reference = Some(frozen(&t.rows)?);
        }
        Ok(())
    }

    /// Sets the dropout rate of every attached adapter (and of the recorded config), e.g. for
    /// training an adapter loaded from disk with the run's `lora.dropout`.
    pub fn set_lora_dropout(&mut self, p: f64) {
        for lin in self.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                l.dropout = p;
            }
        }
        if let Some(cfg) = self.lora_config.as_mut() {
            cfg.dropout = p;
        }
    }

    /// The adapter's trainable tensors under their PEFT keys, in a fixed order: the LoRA
    /// factors, then the added tokens' rows.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(l) = &lin.lora {
                out.push((peft_key(&lin.path, "A"), l.a.clone()));
                out.push((peft_key(&lin.path, "B"), l.b.clone()));
            }
        }
        if let Some(t) = &self.new_tokens {
            out.push((TRAINABLE_TOKENS_KEY.to_string(), t.rows.clone()));
        }
        out
    }

    /// Writes the adapter in PEFT's layout into `dir` (created if needed); files are written to a
    /// temporary name and renamed, so a crash never leaves a half-written adapter. A module
    /// whose rank or scale differs from what `[lora]`'s r and alpha give is written with
    /// `rank_pattern` / `alpha_pattern`; a set of adapted modules that is not "every layer's
    /// projections of these kinds" is written as the list of their full names.
    pub fn save_adapter(&self, dir: &Path, base: &AdapterBase) -> anyhow::Result<()> {
        let cfg = self.lora_config.as_ref().context("the model has no LoRA adapter to save")?;
        let adapted: Vec<(&str, usize, f64)> = self
            .linears()
            .filter_map(|l| l.lora.as_ref().map(|a| (l.path.as_str(), a.a.dims()[0], a.scale * a.a.dims()[0] as f64)))
            .collect();
        anyhow::ensure!(!adapted.is_empty(), "the model has no LoRA adapter to save");
        // The file's r and lora_alpha are the config's (what [lora] is checked against when the
        // adapter is loaded again); a module PEFT would give another rank or alpha gets a
        // pattern entry (its alpha = scale · r, whatever made the scale: rsLoRA included).
        let (r, alpha) = (cfg.r, cfg.alpha);
        let mut rank_pattern = serde_json::Map::new();
        let mut alpha_pattern = serde_json::Map::new();
        for &(path, r_i, alpha_i) in &adapted {
            // The module's name after its first part (`layers\.0\.self_attn\.q_proj`): a key
            // every PEFT version matches, as a suffix after a dot.
            let key = regex::escape(path.split_once('.').map_or(path, |(_, rest)| rest));
            if r_i != r {
                rank_pattern.insert(key.clone(), r_i.into());
            }
            if (alpha_i - alpha).abs() > 1e-12 * alpha.abs().max(1.0) {
                alpha_pattern.insert(key, alpha_i.into());
            }
        }
        let mut kinds: Vec<&str> = adapted.iter().map(|(p, ..)| short_name(p)).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let every_layer = self.linears().all(|l| l.lora.is_some() == kinds.contains(&short_name(&l.path)));
        let target_modules: Vec<&str> = if every_layer { kinds } else { adapted.iter().map(|(p, ..)| *p).collect() };
        let mut peft = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": target_modules,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "base_model_name_or_path": base.repo.as_deref().unwrap_or(&base.source),
            "inference_mode": true,
        });
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if let Some(t) = &self.new_tokens {
            let first = self.config.vocab_size;
            peft["trainable_token_indices"] = serde_json::json!({ "embed_tokens": (first..first + t.names.len()).collect::<Vec<_>>() });
            let ids: serde_json::Map<String, serde_json::Value> =
                t.names.iter().enumerate().map(|(i, name)| (name.clone(), (first + i).into())).collect();
            crate::fsutil::write_atomic(&dir.join(ADDED_TOKENS_FILE), serde_json::to_string_pretty(&ids)?.as_bytes())?;
        }
        let tensors: Vec<(String, Tensor)> =
            self.lora_vars().into_iter().map(|(k, v)| Ok((k, v.as_tensor().to_dtype(DType::F32)?))).collect::<anyhow::Result<_>>()?;
        crate::fsutil::write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&peft)?.as_bytes())?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string()), (SOURCE_METADATA_KEY.to_string(), base.source.clone())]);
        let tmp = dir.join("adapter_model.safetensors.tmp");
        safetensors::serialize_to_file(tensors, Some(metadata), &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join("adapter_model.safetensors"))?;
        Ok(())
    }

    /// Loads a PEFT LoRA adapter, replacing any attached one (a pinned reference stays). Every shape and key is checked
    /// against the model: an adapter for another model is an error, not a silent mismatch.
    pub fn load_adapter(&mut self, dir: &Path) -> anyhow::Result<()> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read adapter config {}", cfg_path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("malformed {}", cfg_path.display()))?;
        let spec = PeftSpec::parse(&json, &cfg_path.display().to_string())?;
        let weights_path = dir.join("adapter_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights_path, self.device())
            .with_context(|| format!("cannot read adapter weights {}", weights_path.display()))?;
        let mut kinds: Vec<String> = Vec::new();
        let dtype = adapter_dtype(self.dtype());
        for lin in self.linears_mut() {
            let reference = lin.lora.take().and_then(|l| l.reference);
            if !spec.targets(&lin.path) {
                anyhow::ensure!(reference.is_none(), "adapter {} does not fit the pinned reference: it has no {}", dir.display(), lin.path);
                continue;
            }
            let (r, scale) = spec.rank_and_scale(&lin.path);
            if !kinds.iter().any(|k| k == short_name(&lin.path)) {
                kinds.push(short_name(&lin.path).to_string());
            }
            let mut take = |factor: &str, shape: (usize, usize)| -> anyhow::Result<Var> {
                let key = peft_key(&lin.path, factor);
                let t = tensors
                    .remove(&key)
                    .or_else(|| tensors.remove(&key.replace(".weight", ".default.weight")))
                    .with_context(|| format!("adapter {} does not fit this model: it lacks {key}", dir.display()))?;
                anyhow::ensure!(
                    t.dims2()? == shape,
                    "adapter {} does not fit this model: {key} has shape {:?}, the model needs {:?}",
                    dir.display(),
                    t.dims(),
                    shape
                );
                Ok(Var::from_tensor(&t.to_dtype(dtype)?)?)
            };
            let a = take("A", (r, lin.in_dim()))?;
            let b = take("B", (lin.out_dim(), r))?;
            lin.lora = Some(Lora { a, b, scale, dropout: spec.dropout, reference });
        }
        let reference = self.new_tokens.take().and_then(|t| t.reference);
        if let Some(rows) = tensors.remove(TRAINABLE_TOKENS_KEY) {
            let names = read_added_tokens(dir, &spec.trainable_tokens, self.config.vocab_size)?;
            anyhow::ensure!(
                rows.dims2()? == (names.len(), self.config.hidden_size),
                "adapter {} does not fit this model: {TRAINABLE_TOKENS_KEY} has shape {:?}, the model needs ({}, {})",
                dir.display(),
                rows.dims(),
                names.len(),
                self.config.hidden_size
            );
            self.add_tokens(names, 0)?;
            let t = self.new_tokens.as_mut().expect("just added");
            t.rows = Var::from_tensor(&rows.to_dtype(dtype)?)?;
            t.reference = reference;
        } else {
            anyhow::ensure!(
                spec.trainable_tokens.is_empty(),
                "adapter {} lists trainable tokens but lacks {TRAINABLE_TOKENS_KEY}",
                dir.display()
            );
            anyhow::ensure!(reference.is_none(), "adapter {} does not fit the pinned reference: it has no added tokens", dir.display());
        }
        if let Some(extra) = tensors.keys().next() {
            anyhow::bail!("adapter {} does not fit this model: unexpected tensor {extra}", dir.display());
        }
        anyhow::ensure!(!kinds.is_empty(), "adapter {} does not fit this model: it targets none of its modules", dir.display());
        // What [lora] would say of it: the first kind's rank and alpha, and the kinds adapted.
        kinds.sort_by_key(|k| ALL_TARGETS.iter().position(|t| t == k));
        self.lora_config = Some(LoraConfig { r: spec.r, alpha: spec.alpha, dropout: spec.dropout, targets: kinds });
        Ok(())
    }
}

/// The added tokens of an adapter in `dir`: its `trainable_token_indices` must be the rows right
/// after the base vocabulary of `vocab_size`, in order, and `added_tokens.json` must name each.
fn read_added_tokens(dir: &Path, indices: &[u32], vocab_size: usize) -> anyhow::Result<Vec<String>> {
    let expected: Vec<u32> = (vocab_size as u32..(vocab_size + indices.len()) as u32).collect();
    anyhow::ensure!(
        !indices.is_empty() && indices == expected,
        "adapter {}: trainable tokens must be new rows {vocab_size}.. in order (this tool does not retrain existing rows)",
        dir.display()
    );
    let path = dir.join(ADDED_TOKENS_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("adapter {} has trainable tokens but no readable {ADDED_TOKENS_FILE}", dir.display()))?;
    let ids: HashMap<String, u32> = serde_json::from_str(&text).with_context(|| format!("malformed {}", path.display()))?;
    let mut names = vec![None; indices.len()];
    for (name, id) in ids {
        let slot = id.checked_sub(vocab_size as u32).and_then(|i| names.get_mut(i as usize));
        let slot = slot.with_context(|| format!("{}: token {name} has id {id}, outside the adapter's rows", path.display()))?;
        anyhow::ensure!(slot.is_none(), "{}: two tokens have id {id}", path.display());
        *slot = Some(name);
    }
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| n.with_context(|| format!("{}: no token has id {}", path.display(), vocab_size + i)))
        .collect()
}

/// A standard normal draw (Box-Muller).
fn gaussian(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
