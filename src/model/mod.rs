//! The model: where it comes from (a GGUF file, a Hugging Face folder, or a hub repo id), the
//! network itself with LoRA, its tokenizer, and the KV cache.

pub mod attention_blocks;
pub mod attention_cpu;
pub mod bf16;
pub mod config;
pub mod gemm_views;
pub mod gguf;
pub mod kv_cache;
pub mod lora;
pub mod lora_rows;
pub mod peft;
pub mod peft_config;
pub mod quant;
pub mod skinny;
pub mod tiny;
pub mod tokenizer;
pub mod train_ops;
pub mod transformer;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

pub use config::ModelConfig;
pub use kv_cache::KvCache;
pub use lora::LoraConfig;
pub use peft::AdapterBase;
pub use tokenizer::{ChatMessage, TextTokenizer};
pub use transformer::{CausalLm, Mode};

/// The model every command uses when `--model` is not given (see `scripts/fetch-model.sh`).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// GGUF files whose source repo their metadata does not name: the default model's.
const KNOWN_GGUF_REPOS: [(&str, &str); 1] = [("SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")];

fn known_gguf_repo(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    KNOWN_GGUF_REPOS.iter().find(|(file, _)| *file == name).map(|(_, repo)| repo.to_string())
}

/// A model with its tokenizer, and the name it was loaded from (recorded in adapters).
pub struct LoadedModel {
    pub model: CausalLm,
    pub tokenizer: TextTokenizer,
    pub source: String,
    /// Its Hugging Face repo id, when known (a hub load, a GGUF's metadata, a folder's config).
    pub repo: Option<String>,
}

impl LoadedModel {
    /// The base model as the adapters trained on it record it.
    pub fn adapter_base(&self) -> AdapterBase {
        AdapterBase { repo: self.repo.clone(), source: self.source.clone() }
    }

    /// Adds `names` to the vocabulary: to the tokenizer, and as trainable rows to the model
    /// (see [`CausalLm::add_tokens`]).
    pub fn add_tokens(&mut self, names: Vec<String>, seed: u64) -> anyhow::Result<()> {
        self.model.add_tokens(names, seed)?;
        self.sync_tokenizer()
    }

    /// Loads a PEFT adapter ([`CausalLm::load_adapter`]); the tokens it adds join the tokenizer.
    pub fn load_adapter(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.model.load_adapter(dir)?;
        self.sync_tokenizer()
    }

    /// Gives the tokenizer the model's added tokens, with the model's ids.
    fn sync_tokenizer(&mut self) -> anyhow::Result<()> {
        let Some(added) = &self.model.new_tokens else { return Ok(()) };
        let first = self.model.config.vocab_size;
        for (i, name) in added.names.iter().enumerate() {
            let id = first + i;
            match self.tokenizer.token_id(name) {
                Some(have) => anyhow::ensure!(have as usize == id, "token {name} has id {have} in the tokenizer but {id} in the model"),
                None => {
                    anyhow::ensure!(
                        self.tokenizer.vocab_size() == id,
                        "the tokenizer has {} tokens where the model has {first} rows: added tokens need the two to agree",
                        self.tokenizer.vocab_size() - i
                    );
                    self.tokenizer.add_token(name)?;
                }
            }
        }
        Ok(())
    }
}

/// Where weights live.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Gguf(PathBuf),
    Folder(PathBuf),
    Hub(String),
}

impl ModelSource {
    /// A path to a `.gguf` file, a folder with `config.json`, or else a hub repo id (`owner/name`).
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let path = Path::new(spec);
        if path.is_file() {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        if path.is_dir() {
            return Ok(ModelSource::Folder(path.to_path_buf()));
        }
        if spec == DEFAULT_MODEL {
            bail!("the default model is not at {spec}: fetch it with `bash scripts/fetch-model.sh` (from the repository root)");
        }
        let looks_like_repo = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with(".gguf");
        if looks_like_repo {
            return Ok(ModelSource::Hub(spec.to_string()));
        }
        bail!("model '{spec}' is neither a GGUF file, a model folder, nor a hub repo id (owner/name)")
    }
}

/// Where models run, as `--device` and `--dtype` asked (unset: the defaults below). Set once,
/// before any model loads.
static PLACEMENT: std::sync::OnceLock<Placement> = std::sync::OnceLock::new();

/// `--device` (`cpu`, `cuda`, `cuda:N`) and `--dtype` (`f32`, `bf16`, `f16`), parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Placement {
    /// None: the default device; Some(None): CUDA, the GPU of this rank's local rank; Some(Some(n)): GPU n.
    pub cuda: Option<Option<usize>>,
    pub cpu: bool,
    pub dtype: Option<DType>,
    /// `--quantized-base`: decoding reads a GGUF's quantised blocks (see [`quant`]).
    pub quantized_base: bool,
    /// `--bf16-prefill`: wide products without gradients run in bf16 with f32 sums, on AMX tiles or
    /// AVX512-BF16 (see [`bf16`]).
    pub bf16_prefill: bool,
}

impl Placement {
    pub fn parse(device: Option<&str>, dtype: Option<&str>) -> anyhow::Result<Placement> {
        let mut p = Placement::default();
        match device {
            None => {}
            Some("cpu") => p.cpu = true,
            Some("cuda") => p.cuda = Some(None),
            Some(d) => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => p.cuda = Some(Some(n)),
                _ => bail!("--device {d}: expected cpu, cuda or cuda:N"),
            },
        }
        p.dtype = match dtype {
            None => None,
            Some("f32") => Some(DType::F32),
            Some("bf16") => Some(DType::BF16),
            Some("f16") => Some(DType::F16),
            Some(t) => bail!("--dtype {t}: expected f32, bf16 or f16"),
        };
        if p.cuda.is_some() && !cfg!(feature = "cuda") {
            bail!("--device {}: this binary was built without the `cuda` feature (see scripts/build-cuda.sh)", device.unwrap_or_default());
        }
        Ok(p)
    }

    /// Makes this the process's placement (the first call wins).
    pub fn install(self) {
        let _ = PLACEMENT.set(self);
    }
}

/// The compute device: `--device` when given; else CUDA when built with the `cuda` feature and
/// a GPU is present, else CPU. Each data-parallel rank of a node takes the GPU of its local rank
/// (one rank per GPU) unless `--device cuda:N` names one.
pub fn default_device() -> anyhow::Result<Device> {
    let p = PLACEMENT.get().copied().unwrap_or_default();
    if p.cpu {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        if p.cuda.is_some() || candle_core::utils::cuda_is_available() {
            let ordinal = p.cuda.flatten().unwrap_or_else(crate::dist::local_rank);
            return Ok(Device::new_cuda(ordinal).with_context(|| format!("cannot open GPU {ordinal}"))?);
        }
    }
    Ok(Device::Cpu)
}

/// `--dtype` when given; else f32 on CPU and bf16 on a GPU. On CPU only f32 takes the fused
/// kernels; other types run candle's portable ops (the path a GPU runs).
pub fn default_dtype(device: &Device) -> DType {
    match PLACEMENT.get().and_then(|p| p.dtype) {
        Some(t) => t,
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
    }
}

/// Loads a model from `--model`'s value on the default device.
pub fn load(spec: &str) -> anyhow::Result<LoadedModel> {
    let device = default_device()?;
    let dtype = default_dtype(&device);
    let quantized_base = PLACEMENT.get().is_some_and(|p| p.quantized_base);
    let source = ModelSource::parse(spec)?;
    if quantized_base && !matches!(source, ModelSource::Gguf(_)) {
        bail!("--quantized-base reads a GGUF file's blocks, and the model '{spec}' is not a GGUF file");
    }
    let mut loaded = load_with(&source, &device, dtype, quantized_base)?;
    if PLACEMENT.get().is_some_and(|p| p.bf16_prefill) {
        loaded.model.attach_bf16_prefill()?;
    }
    Ok(loaded)
}

/// Loads `source` on `device` in `dtype`, dense.
pub fn load_on(source: &ModelSource, device: &Device, dtype: DType) -> anyhow::Result<LoadedModel> {
    load_with(source, device, dtype, false)
}

/// [`load_on`]; with `quantized_base` (a GGUF on the CPU in f32), the few-row products read the
/// file's quantised blocks ([`CausalLm::attach_quantized_base`]).
pub fn load_with(source: &ModelSource, device: &Device, dtype: DType, quantized_base: bool) -> anyhow::Result<LoadedModel> {
    match source {
        ModelSource::Gguf(path) => {
            let parts = gguf::load(path, device, dtype, quantized_base)?;
            let vb = VarBuilder::from_tensors(parts.tensors, dtype, device);
            let mut model =
                CausalLm::load(parts.config, vb).with_context(|| format!("{}: weights do not fit the architecture", path.display()))?;
            if quantized_base {
                let n = model.attach_quantized_base(parts.blocks).with_context(|| format!("--quantized-base with {}", path.display()))?;
                anyhow::ensure!(n > 0, "--quantized-base: {} has no weights in a format it reads (Q4_1, Q8_0)", path.display());
            }
            let repo = parts.repo.or_else(|| known_gguf_repo(path));
            Ok(LoadedModel { model, tokenizer: parts.tokenizer, source: path.display().to_string(), repo })
        }
        ModelSource::Folder(dir) => load_folder(dir, device, dtype),
        ModelSource::Hub(repo) => {
            let dir = hub_snapshot(repo)?;
            let mut loaded = load_folder(&dir, device, dtype)?;
            loaded.source = repo.clone();
            loaded.repo = Some(repo.clone());
            Ok(loaded)
        }
    }
}

/// A Hugging Face model folder: `config.json`, `*.safetensors`, `tokenizer.json` (and the chat
/// template from `tokenizer_config.json` or `chat_template.jinja`).
pub fn load_folder(dir: &Path, device: &Device, dtype: DType) -> anyhow::Result<LoadedModel> {
    let read_json = |name: &str| -> anyhow::Result<Option<serde_json::Value>> {
        let p = dir.join(name);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("malformed JSON in {}", p.display()))?))
    };
    let mut config_json = read_json("config.json")?.with_context(|| format!("{} has no config.json: not a model folder", dir.display()))?;
    // transformers 5 writes the RoPE base under `rope_parameters`.
    if config_json.get("rope_theta").is_none()
        && let Some(theta) = config_json.get("rope_parameters").and_then(|r| r.get("rope_theta")).cloned()
    {
        config_json["rope_theta"] = theta;
    }
    let config: ModelConfig = serde_json::from_value(config_json).with_context(|| format!("{}/config.json", dir.display()))?;
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    weights.sort();
    anyhow::ensure!(!weights.is_empty(), "{} has no *.safetensors weights", dir.display());
    // SAFETY: the files are memory-mapped read-only; modifying them while loaded is undefined,
    // as with every mmap-based loader.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, dtype, device)? };
    let model = CausalLm::load(config.clone(), vb).with_context(|| format!("{}: weights do not fit config.json", dir.display()))?;

    let tok_path = dir.join("tokenizer.json");
    let inner = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
    let tok_cfg = read_json("tokenizer_config.json")?.unwrap_or_default();
    let special = |key: &str| -> Option<String> {
        match tok_cfg.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        }
    };
    let template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
        Ok(t) => Some(t),
        Err(_) => match tok_cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        },
    };
    let eos_token = special("eos_token");
    let mut eos_ids: Vec<u32> = config.eos_token_id.as_ref().map(|e| e.to_vec()).unwrap_or_default();
    if let Some(generation) = read_json("generation_config.json")?
        && let Some(e) = generation.get("eos_token_id").and_then(|e| serde_json::from_value::<config::TokenIds>(e.clone()).ok())
    {
        eos_ids.extend(e.to_vec());
    }
    if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
        eos_ids.push(id);
    }
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let tokenizer = TextTokenizer::new(inner, eos_ids, special("bos_token"), eos_token, template);
    // transformers records the repo a saved model came from as `_name_or_path`.
    let repo = read_json("config.json")?
        .and_then(|c| c.get("_name_or_path")?.as_str().map(str::to_string))
        .filter(|n| n.split('/').count() == 2 && !n.starts_with('.') && !Path::new(n).exists());
    Ok(LoadedModel { model, tokenizer, source: dir.display().to_string(), repo })
}

const HUB_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
const HUB_OPTIONAL: [&str; 3] = ["tokenizer_config.json", "generation_config.json", "model.safetensors"];

/// The local snapshot folder of a hub repo: from hf-hub's cache, downloading what is missing
/// unless offline (`HF_HUB_OFFLINE=1`), where a missing file is a clear error.
fn hub_snapshot(repo: &str) -> anyhow::Result<PathBuf> {
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(repo.to_string());
    let mut dir = None;
    let mut missing = Vec::new();
    for file in HUB_FILES {
        match cached.get(file) {
            Some(p) => dir = p.parent().map(Path::to_path_buf),
            None => missing.push(file),
        }
    }
    if missing.is_empty() {
        let dir = dir.expect("at least one file found");
        let has_weights = std::fs::read_dir(&dir)?.flatten().any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
        if has_weights {
            return Ok(dir);
        }
        missing.push("model.safetensors");
    }
    let how = format!(
        "download it first, e.g. `huggingface-cli download {repo}`, into the Hugging Face cache at {} \
         (or pass a local model folder or GGUF file to --model)",
        cache.path().display()
    );
    if offline {
        bail!("model '{repo}' is not in the local cache (missing {}) and HF_HUB_OFFLINE=1: {how}", missing.join(", "));
    }
    let api = hf_hub::api::sync::Api::new().context("cannot start the hub client")?;
    let remote = api.model(repo.to_string());
    let mut dir = None;
    for file in HUB_FILES {
        let p = remote.get(file).with_context(|| format!("cannot download {file} of '{repo}' from the hub: {how}"))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    for file in HUB_OPTIONAL {
        let _ = remote.get(file);
    }
    dir.context("no files downloaded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_parses_devices_and_dtypes_and_names_bad_ones() {
        assert_eq!(Placement::parse(None, None).unwrap(), Placement::default());
        let p = Placement::parse(Some("cpu"), Some("bf16")).unwrap();
        assert!(p.cpu && p.cuda.is_none() && p.dtype == Some(DType::BF16));
        for (device, dtype, want) in [
            (Some("gpu"), None, "--device gpu: expected cpu, cuda or cuda:N"),
            (Some("cuda:x"), None, "expected cpu, cuda or cuda:N"),
            (None, Some("f8"), "--dtype f8: expected f32, bf16 or f16"),
        ] {
            let e = format!("{:#}", Placement::parse(device, dtype).unwrap_err());
            assert!(e.contains(want), "{e}");
        }
        let cuda = Placement::parse(Some("cuda:1"), None);
        if cfg!(feature = "cuda") {
            assert_eq!(cuda.unwrap().cuda, Some(Some(1)));
        } else {
            assert!(format!("{:#}", cuda.unwrap_err()).contains("built without the `cuda` feature"));
        }
    }
}
