//! The run configuration of the training commands (`sft-warmup`, `grpo-train`): one TOML file,
//! deserialised with serde, unknown keys rejected everywhere, every key overridable on the
//! command line with `--set key.path=value`.
//!
//! Defaults live in one place, [`RunConfig::default`]. Loading merges, in order: the defaults,
//! the file, then each `--set` (its value parsed as TOML, or taken as a string when it is not
//! TOML, so `--set data.dir=/tmp/nyc` needs no quotes). The result is validated and written to
//! the run directory as `config.toml` with every key spelled out, so a run records exactly what
//! it ran with.
//!
//! Sections: top-level `run_dir`; `[model]` (weights and an optional starting adapter);
//! `[data]`; `[prompt]` ([`PromptConfig`]); `[lora]` ([`LoraConfig`]); `[sft]` (the answer
//! form, batching and the training loop, [`TrainConfig`], whose keys sit directly in the
//! section); `[grpo]` ([`GrpoConfig`], with its own [`TrainConfig`] keys); `[rewards]`
//! ([`RewardsConfig`]). Each stage has its own learning rate, steps and schedule, and a
//! stage ignores the other's section (also when checking that a resumed run is unchanged).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::protocol::SplitFractions;
use crate::data::readers::{BBox, Format};
use crate::grpo::LossNorm;
use crate::model::{LoraConfig, DEFAULT_MODEL};
use crate::prompt::PromptConfig;
use crate::rewards::RewardsConfig;

/// Name of the resolved config in a stage's run directory.
pub const CONFIG_FILE: &str = "config.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Base folder of the run. Each stage writes its own subfolder: `sft-warmup` writes
    /// `{run_dir}/sft`, `grpo-train` `{run_dir}/grpo`.
    pub run_dir: PathBuf,
    pub preprocess: PreprocessSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub prompt: PromptConfig,
    pub lora: LoraConfig,
    pub sft: SftConfig,
    pub grpo: GrpoConfig,
    pub rewards: RewardsConfig,
}

/// `[preprocess]`: how `refine-poi preprocess --config` builds the dataset in `data.dir` from
/// raw check-ins (the keys of `preprocess`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSection {
    /// `foursquare` (TSMC2014 raw), `gowalla` (SNAP) or `csv`.
    pub format: Format,
    /// The raw check-in file (gzip is detected).
    pub input: PathBuf,
    /// k-core: minimum check-ins per user and per POI.
    pub min_user: usize,
    pub min_poi: usize,
    /// A gap longer than this many hours starts a new trajectory.
    pub gap_hours: f64,
    /// Train and validation fractions of the sorted check-in times, `"0.8,0.1"`.
    pub split: String,
    /// Keep only check-ins inside `"min_lat,min_lon,max_lat,max_lon"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox: Option<String>,
    /// Gowalla: a `venue_id,category` CSV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub categories: Option<PathBuf>,
    /// Gowalla: the local offset in minutes of every check-in (default: from the longitude).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz_offset_min: Option<i32>,
    /// Fail on the first bad row instead of skipping and counting it.
    pub strict: bool,
}

impl PreprocessSection {
    pub fn split_fractions(&self) -> Result<SplitFractions> {
        self.split.parse().map_err(|e| anyhow::anyhow!("preprocess.split: {e}"))
    }

    pub fn bbox(&self) -> Result<Option<BBox>> {
        self.bbox.as_deref().map(|b| b.parse().map_err(|e| anyhow::anyhow!("preprocess.bbox: {e}"))).transpose()
    }
}

/// `[model]`: the base weights, and where the adapter starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file, a Hugging Face model folder, or a hub repo id.
    pub path: String,
    /// Start from this PEFT adapter folder instead of a fresh one (its r, alpha and targets
    /// must agree with `[lora]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

/// `[data]`: the dataset directory written by `refine-poi preprocess`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub dir: PathBuf,
    /// Train on a fixed random subset (seeded by the stage's seed) of this many train
    /// instances; 0 = all.
    pub train_instances: usize,
}

/// Learning-rate shape after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half a cosine from `lr` down to `lr * min_lr_ratio` at the last step.
    Cosine,
    /// A straight line from `lr` down to `lr * min_lr_ratio`.
    Linear,
    /// `lr` throughout.
    Constant,
}

/// The training loop shared by every stage: optimiser, schedule, batching, length, and the
/// cadence of validation and checkpoints. Its keys sit directly in the stage's section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate (AdamW, on the adapter only).
    pub lr: f64,
    pub schedule: Schedule,
    /// Linear warm-up from 0 to `lr` over this many optimizer steps.
    pub warmup_steps: usize,
    /// The schedule ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// Passes over the training examples, used when `max_steps` is 0.
    pub epochs: usize,
    /// Optimizer steps to run (0 = as many as `epochs` take).
    pub max_steps: usize,
    /// Validate every this many optimizer steps, and at the end (0 = never).
    pub eval_every: usize,
    /// Size of the fixed validation subset (the same sample `eval --limit N` uses).
    pub eval_instances: usize,
    /// Prompts decoded together during validation.
    pub eval_batch_size: usize,
    /// Tokens the model may generate per validation answer.
    pub eval_max_new_tokens: usize,
    /// Write a checkpoint every this many optimizer steps, and at the end (0 = only at the end).
    pub save_every: usize,
    /// Keep this many most recent checkpoints (0 = all).
    pub keep_checkpoints: usize,
    /// Seeds the data order, the LoRA initialisation and the dropout masks.
    pub seed: u64,
}

impl TrainConfig {
    pub fn validate(&self, section: &str) -> Result<()> {
        ensure!(self.lr > 0.0 && self.lr.is_finite(), "{section}.lr must be positive");
        ensure!((0.0..=1.0).contains(&self.min_lr_ratio), "{section}.min_lr_ratio must be in [0, 1]");
        ensure!(self.weight_decay >= 0.0, "{section}.weight_decay must not be negative");
        for (name, b) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            ensure!((0.0..1.0).contains(&b), "{section}.{name} must be in [0, 1)");
        }
        ensure!(self.adam_eps > 0.0, "{section}.adam_eps must be positive");
        ensure!(self.max_grad_norm >= 0.0, "{section}.max_grad_norm must not be negative (0 = off)");
        ensure!(self.max_steps > 0 || self.epochs > 0, "{section}: set max_steps or epochs");
        ensure!(self.eval_every == 0 || self.eval_instances > 0, "{section}.eval_instances must be positive when eval_every is set");
        ensure!(self.eval_batch_size >= 1, "{section}.eval_batch_size must be at least 1");
        ensure!(self.eval_max_new_tokens >= 1, "{section}.eval_max_new_tokens must be at least 1");
        Ok(())
    }

    /// Optimizer steps of the whole run for `examples` training examples, `per_step` a step.
    pub fn total_steps(&self, examples: usize, per_step: usize) -> usize {
        if self.max_steps > 0 {
            self.max_steps
        } else {
            (self.epochs * examples).div_ceil(per_step.max(1)).max(1)
        }
    }
}

/// What the SFT target answer lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerForm {
    /// The ground-truth POI alone: `<answer>123</answer>`.
    Single,
    /// k ids (k = prompt.k): the ground truth first, then the user's history POIs by visit
    /// count (ties by train popularity, then id), then the most popular train POIs.
    List,
}

/// `[sft]`: the supervised warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    pub answer: AnswerForm,
    /// Examples per forward/backward pass (micro-batch).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (effective batch = batch_size * grad_accum).
    pub grad_accum: usize,
    #[serde(flatten)]
    pub train: TrainConfig,
}

impl SftConfig {
    /// Examples per optimizer step.
    pub fn examples_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.batch_size >= 1, "sft.batch_size must be at least 1");
        ensure!(self.grad_accum >= 1, "sft.grad_accum must be at least 1");
        self.train.validate("sft")
    }
}

/// The policy the KL term keeps GRPO near.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferencePolicy {
    /// The policy GRPO starts from (e.g. the SFT warm-up), frozen: base + the initial adapter.
    Init,
    /// The base model (adapter off).
    Base,
}

/// `[grpo]`: group-relative policy optimisation on the recommendation rewards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    /// The adapter the policy starts from: `"sft"` (`{run_dir}/sft/best`), `"none"` (a fresh
    /// adapter), or a PEFT adapter folder.
    pub init_adapter: String,
    /// What the KL term is measured against: `"init"` (the starting policy) or `"base"`.
    pub reference: ReferencePolicy,
    /// Completions sampled per prompt (G).
    pub group: usize,
    /// Prompts (groups) per optimizer step; their groups are sampled together.
    pub prompts_per_step: usize,
    /// Lower clip range ε of the probability ratio.
    pub epsilon: f64,
    /// Upper clip range (DAPO's clip-higher); left out = `epsilon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// Weight β of the k3 KL estimate (0 = no KL term and no reference forward).
    pub beta: f64,
    /// Optimizer updates (μ) per sampled batch.
    pub updates_per_batch: usize,
    /// `"sequence"` (GRPO), `"token"` (DAPO) or `"constant"` (Dr. GRPO).
    pub loss_norm: LossNorm,
    /// Divide advantages by the group's reward std (GRPO); false = Dr. GRPO.
    pub scale_rewards: bool,
    /// Leave groups whose rewards are all equal out of the update (counted either way).
    pub skip_zero_signal: bool,
    /// Tokens each sampled completion may have (it also stops at `</answer>`).
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Nucleus sampling (1 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    #[serde(flatten)]
    pub train: TrainConfig,
}

impl GrpoConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.group >= 2, "grpo.group must be at least 2 (advantages compare the samples of a group)");
        ensure!(self.prompts_per_step >= 1, "grpo.prompts_per_step must be at least 1");
        ensure!(self.epsilon > 0.0 && self.epsilon < 1.0, "grpo.epsilon must be in (0, 1)");
        ensure!(self.epsilon_high.is_none_or(|e| e > 0.0), "grpo.epsilon_high must be positive");
        ensure!(self.beta >= 0.0 && self.beta.is_finite(), "grpo.beta must not be negative");
        ensure!(self.updates_per_batch >= 1, "grpo.updates_per_batch must be at least 1");
        ensure!(self.max_new_tokens >= 1, "grpo.max_new_tokens must be at least 1");
        ensure!(self.temperature > 0.0, "grpo.temperature must be positive");
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "grpo.top_p must be in (0, 1]");
        self.train.validate("grpo")
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            run_dir: PathBuf::from("runs/nyc"),
            preprocess: PreprocessSection {
                format: Format::Csv,
                input: PathBuf::from("data/nyc/checkins.csv.gz"),
                min_user: 10,
                min_poi: 10,
                gap_hours: 24.0,
                split: "0.8,0.1".to_string(),
                bbox: None,
                categories: None,
                tz_offset_min: None,
                strict: false,
            },
            model: ModelSection { path: DEFAULT_MODEL.to_string(), adapter: None },
            data: DataSection { dir: PathBuf::from("runs/nyc/data"), train_instances: 0 },
            prompt: PromptConfig::default(),
            lora: LoraConfig::default(),
            sft: SftConfig {
                answer: AnswerForm::List,
                batch_size: 4,
                grad_accum: 4,
                train: TrainConfig {
                    lr: 2e-4,
                    schedule: Schedule::Cosine,
                    warmup_steps: 10,
                    min_lr_ratio: 0.1,
                    weight_decay: 0.0,
                    adam_beta1: 0.9,
                    adam_beta2: 0.999,
                    adam_eps: 1e-8,
                    max_grad_norm: 1.0,
                    epochs: 1,
                    max_steps: 0,
                    eval_every: 50,
                    eval_instances: 100,
                    eval_batch_size: 8,
                    eval_max_new_tokens: 64,
                    save_every: 25,
                    keep_checkpoints: 3,
                    seed: 0,
                },
            },
            grpo: GrpoConfig {
                init_adapter: "sft".to_string(),
                reference: ReferencePolicy::Init,
                group: 8,
                prompts_per_step: 2,
                epsilon: 0.2,
                epsilon_high: None,
                beta: 0.04,
                updates_per_batch: 1,
                loss_norm: LossNorm::Sequence,
                scale_rewards: true,
                skip_zero_signal: true,
                max_new_tokens: 64,
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
                train: TrainConfig {
                    lr: 5e-5,
                    schedule: Schedule::Constant,
                    warmup_steps: 0,
                    min_lr_ratio: 1.0,
                    weight_decay: 0.0,
                    adam_beta1: 0.9,
                    adam_beta2: 0.99,
                    adam_eps: 1e-8,
                    max_grad_norm: 1.0,
                    epochs: 1,
                    max_steps: 0,
                    eval_every: 50,
                    eval_instances: 100,
                    eval_batch_size: 8,
                    eval_max_new_tokens: 64,
                    save_every: 10,
                    keep_checkpoints: 3,
                    seed: 0,
                },
            },
            rewards: RewardsConfig::default(),
        }
    }
}

impl RunConfig {
    /// The defaults, then `file` (if any), then each `key.path=value` of `sets`; validated.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<RunConfig> {
        let mut value = toml::Value::try_from(RunConfig::default()).context("serialising the default config")?;
        let origin = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
                let table: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not valid TOML: {e}", path.display()))?;
                merge(&mut value, toml::Value::Table(table));
                path.display().to_string()
            }
            None => "the defaults".to_string(),
        };
        for set in sets {
            apply_set(&mut value, set)?;
        }
        let cfg: RunConfig = from_value(value.clone()).map_err(|e| explain_flattened(&value, e)).with_context(|| {
            if sets.is_empty() { format!("bad config in {origin}") } else { format!("bad config in {origin} with --set {}", sets.join(" --set ")) }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a resolved config (a stage directory's `config.toml`); the sections that stage
    /// leaves out (the other stage's) take the defaults.
    pub fn from_toml(text: &str) -> Result<RunConfig> {
        let table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("not valid TOML: {e}"))?;
        let mut value = toml::Value::try_from(RunConfig::default()).context("serialising the default config")?;
        merge(&mut value, toml::Value::Table(table));
        from_value(value)
    }

    pub fn validate(&self) -> Result<()> {
        self.preprocess.split_fractions()?;
        self.preprocess.bbox()?;
        self.prompt.validate()?;
        self.lora.target_modules().context("bad [lora]")?;
        ensure!((0.0..1.0).contains(&self.lora.dropout), "lora.dropout must be in [0, 1)");
        ensure!(self.lora.alpha > 0.0, "lora.alpha must be positive");
        self.sft.validate()?;
        self.grpo.validate()?;
        self.rewards.validate()
    }

    /// Every key spelled out, as written to the run directory.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// The config as the stage `stage` sees it, every key spelled out: the other stage's
    /// section left out, so that editing `[grpo]` does not block resuming an SFT run.
    pub fn stage_toml(&self, stage: &str) -> Result<String> {
        let mut value = toml::Value::try_from(self)?;
        let others: &[&str] = match stage {
            "sft" => &["grpo", "rewards"],
            "grpo" => &["sft"],
            _ => bail!("unknown stage {stage}"),
        };
        if let Some(t) = value.as_table_mut() {
            for k in others {
                t.remove(*k);
            }
        }
        Ok(toml::to_string_pretty(&value)?)
    }

    /// The stage's run directory, e.g. `{run_dir}/sft`.
    pub fn stage_dir(&self, stage: &str) -> PathBuf {
        self.run_dir.join(stage)
    }
}

/// Deserialises with the offending key named: `unknown config key `sft.lrr``, or
/// `sft.lr: invalid type: string "x", expected f64`.
fn from_value<T: serde::de::DeserializeOwned>(value: toml::Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        // toml appends `in `table`` lines of its own: keep the message itself.
        let msg = e.inner().to_string().lines().next().unwrap_or_default().to_string();
        let prefix = if path == "." || path.is_empty() { String::new() } else { format!("{path}.") };
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            let key = rest.split('`').next().unwrap_or_default();
            let expected = rest.split_once(", ").map(|(_, e)| format!(" ({e})")).unwrap_or_default();
            // The path ends at the key itself, except inside a flattened table.
            let full = if path.rsplit('.').next() == Some(key) { path.clone() } else { format!("{prefix}{key}") };
            anyhow::anyhow!("unknown config key `{full}`{expected}")
        } else if path == "." || path.is_empty() {
            anyhow::anyhow!("{msg}")
        } else {
            anyhow::anyhow!("config key `{path}`: {msg}")
        }
    })
}

/// Stage sections whose [`TrainConfig`] keys are flattened into them, with the section's own
/// keys. serde reports a bad value there at the section (`sft`), not the key: deserialising the
/// section's loop keys alone names it (`sft.lr`).
const FLATTENED: [(&str, &[&str]); 2] = [
    ("sft", &["answer", "batch_size", "grad_accum"]),
    (
        "grpo",
        &[
            "init_adapter",
            "reference",
            "group",
            "prompts_per_step",
            "epsilon",
            "epsilon_high",
            "beta",
            "updates_per_batch",
            "loss_norm",
            "scale_rewards",
            "skip_zero_signal",
            "max_new_tokens",
            "temperature",
            "top_p",
            "top_k",
        ],
    ),
];

fn explain_flattened(value: &toml::Value, err: anyhow::Error) -> anyhow::Error {
    let msg = err.to_string();
    for (section, own) in FLATTENED {
        if !msg.starts_with(&format!("config key `{section}`:")) {
            continue;
        }
        if let Some(mut table) = value.get(section).and_then(|v| v.as_table()).cloned() {
            for k in own {
                table.remove(*k);
            }
            if let Err(e) = from_value::<TrainConfig>(toml::Value::Table(table)) {
                let inner = e.to_string();
                return match inner.strip_prefix("config key `") {
                    Some(rest) => anyhow::anyhow!("config key `{section}.{rest}"),
                    None => anyhow::anyhow!("config key `{section}`: {inner}"),
                };
            }
        }
    }
    err
}

/// Recursively overlays `top` on `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Value, top: toml::Value) {
    match (base, top) {
        (toml::Value::Table(b), toml::Value::Table(t)) => {
            for (k, v) in t {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, t) => *b = t,
    }
}

/// Parses a `--set` value: TOML when it is (`3`, `1e-4`, `true`, `["q", "v"]`, `"x"`), else the
/// raw text as a string (`list`, `/tmp/nyc`).
pub fn parse_set_value(raw: &str) -> toml::Value {
    #[derive(Deserialize)]
    struct Wrap {
        v: toml::Value,
    }
    match toml::from_str::<Wrap>(&format!("v = {raw}")) {
        Ok(w) => w.v,
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Applies one `key.path=value` override. Tables on the way must exist (a misspelt section is
/// an error naming it); the last key is checked when the whole config is deserialised.
fn apply_set(value: &mut toml::Value, set: &str) -> Result<()> {
    let (key, raw) = set.split_once('=').with_context(|| format!("--set {set}: expected key.path=value"))?;
    let key = key.trim();
    ensure!(!key.is_empty(), "--set {set}: empty key");
    let parts: Vec<&str> = key.split('.').collect();
    ensure!(parts.iter().all(|p| !p.is_empty()), "--set {set}: malformed key `{key}`");
    let mut node = value;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let here = parts[..=i].join(".");
        let table = node.as_table_mut().with_context(|| format!("--set {set}: `{}` is not a section", parts[..i].join(".")))?;
        node = match table.get_mut(*part) {
            Some(t) if t.is_table() => t,
            Some(_) => bail!("--set {set}: `{here}` is a value, not a section"),
            None => bail!("--set {set}: unknown config key `{here}`"),
        };
    }
    let table = node.as_table_mut().context("config root is not a table")?;
    table.insert(parts[parts.len() - 1].to_string(), parse_set_value(raw.trim()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_validate() {
        let cfg = RunConfig::load(None, &[]).unwrap();
        assert_eq!(cfg, RunConfig::default());
        let text = cfg.to_toml().unwrap();
        assert_eq!(RunConfig::from_toml(&text).unwrap(), cfg);
        // Every key is spelled out in the resolved config.
        for key in ["run_dir", "[model]", "[data]", "[prompt]", "[lora]", "[sft]", "[grpo]", "[rewards.weights]", "[rewards.params]", "lr", "answer", "warmup_steps", "targets", "beta"] {
            assert!(text.contains(key), "{key} missing from\n{text}");
        }
    }

    #[test]
    fn file_then_sets_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "run_dir = \"out\"\n[sft]\nlr = 1\nanswer = \"single\"\n[prompt]\nk = 5\n").unwrap();
        let sets = ["sft.lr=3e-4", "sft.max_steps=7", "data.dir=/tmp/x y", "lora.targets=[\"q\", \"v\"]", "model.adapter=a/b"].map(String::from);
        let cfg = RunConfig::load(Some(&path), &sets).unwrap();
        assert_eq!(cfg.run_dir, PathBuf::from("out"));
        assert_eq!(cfg.sft.train.lr, 3e-4);
        assert_eq!(cfg.sft.train.max_steps, 7);
        assert_eq!(cfg.sft.answer, AnswerForm::Single);
        assert_eq!(cfg.prompt.k, 5);
        assert_eq!(cfg.data.dir, PathBuf::from("/tmp/x y"));
        assert_eq!(cfg.lora.targets, vec!["q", "v"]);
        assert_eq!(cfg.model.adapter, Some(PathBuf::from("a/b")));
        // Untouched keys keep their defaults.
        assert_eq!(cfg.sft.batch_size, RunConfig::default().sft.batch_size);
        // An integer for a float key is fine in the file too.
        let cfg = RunConfig::load(Some(&path), &[]).unwrap();
        assert_eq!(cfg.sft.train.lr, 1.0);
    }

    fn err(file: &str, sets: &[&str]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        format!("{:#}", RunConfig::load(Some(&path), &sets).unwrap_err())
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = err("[sft]\nlrr = 1\n", &[]);
        assert!(e.contains("unknown config key `sft.lrr`"), "{e}");
        let e = err("[model]\nadaptr = \"x\"\n", &[]);
        assert!(e.contains("unknown config key `model.adaptr`") && e.contains("expected"), "{e}");
        let e = err("bogus = 1\n", &[]);
        assert!(e.contains("unknown config key `bogus`"), "{e}");
        let e = err("[prompt]\nkk = 1\n", &[]);
        assert!(e.contains("unknown config key `prompt.kk`"), "{e}");
        let e = err("", &["sft.bogus=1"]);
        assert!(e.contains("unknown config key `sft.bogus`") && e.contains("--set sft.bogus=1"), "{e}");
        let e = err("", &["sftt.lr=1"]);
        assert!(e.contains("unknown config key `sftt`"), "{e}");
        let e = err("", &["sft.lr.x=1"]);
        assert!(e.contains("`sft.lr` is a value"), "{e}");
        let e = err("", &["sft.lr"]);
        assert!(e.contains("expected key.path=value"), "{e}");
        let e = err("", &["sft.lr=fast"]);
        assert!(e.contains("`sft.lr`") && e.contains("fast"), "{e}");
        let e = err("", &["sft.answer=both"]);
        assert!(e.contains("`sft.answer`") && e.contains("both"), "{e}");
        let e = err("[sft\n", &[]);
        assert!(e.contains("not valid TOML"), "{e}");
        let e = err("", &["sft.batch_size=0"]);
        assert!(e.contains("sft.batch_size"), "{e}");
        let e = err("[grpo]\nbeta2 = 1\n", &[]);
        assert!(e.contains("unknown config key `grpo.beta2`"), "{e}");
        let e = err("", &["grpo.lr=fast"]);
        assert!(e.contains("`grpo.lr`") && e.contains("fast"), "{e}");
        let e = err("", &["grpo.group=1"]);
        assert!(e.contains("grpo.group"), "{e}");
        let e = err("", &["rewards.weights.hitt=1"]);
        assert!(e.contains("unknown reward `hitt`"), "{e}");
        let e = err("", &["grpo.loss_norm=mean"]);
        assert!(e.contains("`grpo.loss_norm`") && e.contains("mean"), "{e}");
        let e = err("", &["lora.targets=[\"qq\"]"]);
        assert!(e.contains("unknown LoRA target 'qq'"), "{e}");
    }

    #[test]
    fn set_values_parse_as_toml_or_strings() {
        assert_eq!(parse_set_value("3"), toml::Value::Integer(3));
        assert_eq!(parse_set_value("1e-4"), toml::Value::Float(1e-4));
        assert_eq!(parse_set_value("true"), toml::Value::Boolean(true));
        assert_eq!(parse_set_value("\"a b\""), toml::Value::String("a b".into()));
        assert_eq!(parse_set_value("runs/x"), toml::Value::String("runs/x".into()));
        assert_eq!(parse_set_value("list"), toml::Value::String("list".into()));
    }

    #[test]
    fn step_counts() {
        let mut t = RunConfig::default().sft.train;
        t.epochs = 2;
        t.max_steps = 0;
        assert_eq!(t.total_steps(10, 6), 4); // 20 examples / 6 per step, rounded up
        t.max_steps = 9;
        assert_eq!(t.total_steps(10, 6), 9);
    }

    #[test]
    fn each_stage_sees_its_own_sections() {
        let cfg = RunConfig::default();
        let sft = cfg.stage_toml("sft").unwrap();
        let grpo = cfg.stage_toml("grpo").unwrap();
        assert!(sft.contains("[sft]") && !sft.contains("[grpo]") && !sft.contains("[rewards"), "{sft}");
        assert!(grpo.contains("[grpo]") && grpo.contains("[rewards.weights]") && !grpo.contains("[sft]"), "{grpo}");
        let mut other = cfg.clone();
        other.grpo.beta = 0.5;
        assert_eq!(other.stage_toml("sft").unwrap(), sft);
        assert_ne!(other.stage_toml("grpo").unwrap(), grpo);
    }
}
