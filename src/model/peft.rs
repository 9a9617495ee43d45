//! LoRA adapters in PEFT's layout: `adapter_config.json` plus `adapter_model.safetensors` with
//! keys like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, so an adapter
//! trained here loads in Python PEFT as is, and one from PEFT loads here.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::lora::{Lora, LoraConfig};
use super::transformer::CausalLm;

/// What PEFT writes in `adapter_config.json` (the keys PEFT needs to load it; extra keys it
/// writes are accepted on load).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Vec<String>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    inference_mode: bool,
}

fn short_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

fn peft_key(path: &str, factor: &str) -> String {
    format!("base_model.model.{path}.lora_{factor}.weight")
}

impl CausalLm {
    /// Adds a fresh adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming init), B = 0, so the
    /// adapted model starts equal to the base model.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> anyhow::Result<()> {
        let targets = cfg.target_modules()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (device, dtype) = (self.device().clone(), self.dtype());
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

    /// Freezes a copy of the adapter's current factors as the reference policy: from now on,
    /// adapter-off passes ([`Mode::REFERENCE`](super::Mode::REFERENCE)) compute base + this
    /// copy instead of the base model. The copy is the adapter only (a few MB), not the base.
    pub fn pin_reference_adapter(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.lora_config.is_some(), "no adapter attached to pin as the reference");
        for lin in self.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                l.reference = Some((l.a.as_tensor().copy()?, l.b.as_tensor().copy()?, l.scale));
            }
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

    /// The adapter's trainable tensors under their PEFT keys, in a fixed order.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(l) = &lin.lora {
                out.push((peft_key(&lin.path, "A"), l.a.clone()));
                out.push((peft_key(&lin.path, "B"), l.b.clone()));
            }
        }
        out
    }

    /// Writes the adapter in PEFT's layout into `dir` (created if needed); files are written to a
    /// temporary name and renamed, so a crash never leaves a half-written adapter.
    pub fn save_adapter(&self, dir: &Path, base_model: &str) -> anyhow::Result<()> {
        let cfg = self.lora_config.as_ref().context("the model has no LoRA adapter to save")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let peft = PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: cfg.r,
            lora_alpha: cfg.alpha,
            lora_dropout: cfg.dropout,
            target_modules: cfg.target_modules()?,
            bias: Some("none".into()),
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            base_model_name_or_path: Some(base_model.to_string()),
            inference_mode: true,
        };
        let tensors: HashMap<String, Tensor> =
            self.lora_vars().into_iter().map(|(k, v)| Ok((k, v.as_tensor().to_dtype(DType::F32)?))).collect::<anyhow::Result<_>>()?;
        crate::fsutil::write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&peft)?.as_bytes())?;
        let tmp = dir.join("adapter_model.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, dir.join("adapter_model.safetensors"))?;
        Ok(())
    }

    /// Loads a PEFT LoRA adapter, replacing any attached one (a pinned reference stays). Every shape and key is checked
    /// against the model: an adapter for another model is an error, not a silent mismatch.
    pub fn load_adapter(&mut self, dir: &Path) -> anyhow::Result<()> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read adapter config {}", cfg_path.display()))?;
        let peft: PeftConfig = serde_json::from_str(&text).with_context(|| format!("malformed {}", cfg_path.display()))?;
        anyhow::ensure!(
            peft.peft_type == "LORA",
            "{}: peft_type is '{}', only LORA adapters are supported",
            cfg_path.display(),
            peft.peft_type
        );
        anyhow::ensure!(
            !peft.fan_in_fan_out && !peft.use_dora,
            "{}: fan_in_fan_out and DoRA adapters are not supported",
            cfg_path.display()
        );
        let weights_path = dir.join("adapter_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights_path, self.device())
            .with_context(|| format!("cannot read adapter weights {}", weights_path.display()))?;
        let cfg = LoraConfig { r: peft.r, alpha: peft.lora_alpha, dropout: peft.lora_dropout, targets: peft.target_modules.clone() };
        let targets = cfg.target_modules()?;
        let scale = if peft.use_rslora { cfg.alpha / (cfg.r as f64).sqrt() } else { cfg.alpha / cfg.r as f64 };
        let dtype = self.dtype();
        for lin in self.linears_mut() {
            let reference = lin.lora.take().and_then(|l| l.reference);
            if !targets.iter().any(|t| t == short_name(&lin.path)) {
                anyhow::ensure!(reference.is_none(), "adapter {} does not fit the pinned reference: it has no {}", dir.display(), lin.path);
                continue;
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
            let a = take("A", (cfg.r, lin.in_dim()))?;
            let b = take("B", (lin.out_dim(), cfg.r))?;
            lin.lora = Some(Lora { a, b, scale, dropout: cfg.dropout, reference });
        }
        if let Some(extra) = tensors.keys().next() {
            anyhow::bail!("adapter {} does not fit this model: unexpected tensor {extra}", dir.display());
        }
        self.lora_config = Some(cfg);
        Ok(())
    }
}
