//! The run configuration of the training commands (`sft-warmup`, `grpo-train`) and of
//! `preprocess --config`: one TOML file, unknown keys rejected everywhere, every key
//! overridable on the command line with `--set key.path=value` (the layering is
//! [`crate::config`]).
//!
//! Each section's type lives with the code that owns it: `[preprocess]`
//! ([`PreprocessConfig`]), `[model]` and `[data]` (here), `[prompt]` ([`PromptConfig`]),
//! `[lora]` ([`LoraConfig`]), `[sft]` ([`SftConfig`]), `[grpo]` ([`GrpoConfig`]) and
//! `[rewards]` ([`RewardsConfig`]). Defaults are each type's `Default`. The resolved config is
//! validated and written to the stage's run directory with every key spelled out, so a run
//! records exactly what it ran with. Each stage has its own learning rate, steps and schedule
//! ([`TrainConfig`], flattened into its section), and a stage ignores the other's section
//! (also when checking that a resumed run is unchanged).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use super::grpo::config::GrpoConfig;
use super::grpo::rewards::RewardsConfig;
use super::schedule::TrainConfig;
use super::sft::config::SftConfig;
use crate::config::{explain_flattened, from_value, layered, overlaid};
use crate::data::preprocess::PreprocessConfig;
use crate::model::{DEFAULT_MODEL, LoraConfig};
use crate::prompt::PromptConfig;
use crate::ranker::RankerConfig;

/// A training stage: its run directory is `{run_dir}/{name}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Sft,
    Grpo,
}

impl Stage {
    /// The stage's folder name, also its section's name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Sft => "sft",
            Stage::Grpo => "grpo",
        }
    }

    /// The command that runs it.
    pub fn command(self) -> &'static str {
        match self {
            Stage::Sft => "sft-warmup",
            Stage::Grpo => "grpo-train",
        }
    }

    /// The sections this stage does not read.
    fn other_sections(self) -> &'static [&'static str] {
        match self {
            Stage::Sft => &["grpo", "rewards", "ranker"],
            Stage::Grpo => &["sft", "ranker"],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Base folder of the run. Each stage writes its own subfolder: `sft-warmup` writes
    /// `{run_dir}/sft`, `grpo-train` `{run_dir}/grpo`.
    pub run_dir: PathBuf,
    pub preprocess: PreprocessConfig,
    pub model: ModelSection,
    pub data: DataSection,
    pub prompt: PromptConfig,
    pub lora: LoraConfig,
    pub sft: SftConfig,
    pub grpo: GrpoConfig,
    pub rewards: RewardsConfig,
    /// `[ranker]`: read by `eval`/`recommend --method ranker --ranker-config`, not by training.
    pub ranker: RankerConfig,
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

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            run_dir: PathBuf::from("runs/nyc"),
            preprocess: PreprocessConfig::default(),
            model: ModelSection { path: DEFAULT_MODEL.to_string(), adapter: None },
            data: DataSection { dir: PathBuf::from("runs/nyc/data"), train_instances: 0 },
            prompt: PromptConfig::default(),
            lora: LoraConfig::default(),
            sft: SftConfig::default(),
            grpo: GrpoConfig::default(),
            rewards: RewardsConfig::default(),
            ranker: RankerConfig::default(),
        }
    }
}

impl RunConfig {
    /// The defaults, then `file` (if any), then each `key.path=value` of `sets`; validated.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<RunConfig> {
        let (value, origin) = layered(&RunConfig::default(), file, sets)?;
        let cfg = Self::deserialize(value).with_context(|| format!("bad config in {origin}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a resolved config (a stage directory's `config.toml`); the sections that stage
    /// leaves out (the other stage's) take the defaults.
    pub fn from_toml(text: &str) -> Result<RunConfig> {
        Self::deserialize(overlaid(&RunConfig::default(), text)?)
    }

    /// Deserialises with a bad value of a stage's loop keys named at the key (`sft.lr`).
    fn deserialize(value: toml::Value) -> Result<RunConfig> {
        from_value(value.clone()).map_err(|e| {
            let defaults = RunConfig::default();
            let e = explain_flattened(&value, e, Stage::Sft.name(), &defaults.sft.train);
            explain_flattened::<TrainConfig>(&value, e, Stage::Grpo.name(), &defaults.grpo.train)
        })
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
        ensure!(
            !(self.grpo.constrained && self.prompt.reasoning),
            "grpo.constrained needs prompt.reasoning = false: the answer grammar has no <think> part"
        );
        let semantic = self.prompt.ids == crate::answer::PoiIds::Semantic;
        ensure!(
            !(semantic && self.grpo.reference == super::grpo::config::ReferencePolicy::Base),
            "grpo.reference = \"base\" has no rows for the semantic ids' tokens: use \"init\""
        );
        ensure!(
            semantic || self.grpo.form != super::grpo::config::GrpoForm::Next,
            "grpo.form = \"next\" samples POI codes: it needs prompt.ids = \"semantic\""
        );
        self.ranker.validate()?;
        self.rewards.validate()
    }

    /// Parses a stage directory's `config.toml` and names the stage that wrote it: the one
    /// whose section [`RunConfig::stage_toml`] kept.
    pub fn from_stage_toml(text: &str) -> Result<(RunConfig, Stage)> {
        let table: toml::Table = toml::from_str(text)?;
        let stage = if table.contains_key(Stage::Grpo.name()) { Stage::Grpo } else { Stage::Sft };
        Ok((Self::from_toml(text)?, stage))
    }

    /// How `stage`'s model ranks: by beam search over the next code with this many beams
    /// (`eval --beam-next`), or `None` for writing a list. A whole-history SFT stage and a
    /// next-form GRPO stage trained the next code, so they rank by it; a list stage writes lists.
    /// Validation during training and `eval --run` both ask this.
    pub fn next_code_beams(&self, stage: Stage) -> Option<usize> {
        let next = match stage {
            Stage::Sft => self.sft.examples == super::sft::config::Examples::Histories,
            Stage::Grpo => self.grpo.form == super::grpo::config::GrpoForm::Next,
        };
        (next && self.prompt.ids == crate::answer::PoiIds::Semantic).then_some(crate::beam::DEFAULT_BEAMS.max(self.prompt.k))
    }

    /// Every key spelled out, as written to the run directory.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// The config as `stage` sees it, every key spelled out: the other stage's section left
    /// out, so that editing `[grpo]` does not block resuming an SFT run.
    pub fn stage_toml(&self, stage: Stage) -> Result<String> {
        let mut value = toml::Value::try_from(self)?;
        if let Some(t) = value.as_table_mut() {
            for k in stage.other_sections() {
                t.remove(*k);
            }
        }
        Ok(toml::to_string_pretty(&value)?)
    }

    /// The stage's run directory, e.g. `{run_dir}/sft`.
    pub fn stage_dir(&self, stage: Stage) -> PathBuf {
        self.run_dir.join(stage.name())
    }
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
        for key in [
            "run_dir",
            "[model]",
            "[data]",
            "[prompt]",
            "[lora]",
            "[sft]",
            "[grpo]",
            "[rewards.weights]",
            "[rewards.params]",
            "lr",
            "answer",
            "warmup_steps",
            "targets",
            "beta",
        ] {
            assert!(text.contains(key), "{key} missing from\n{text}");
        }
    }

    #[test]
    fn file_then_sets_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "run_dir = \"out\"\n[sft]\nlr = 1\nanswer = \"single\"\n[prompt]\nk = 5\n").unwrap();
        let sets =
            ["sft.lr=3e-4", "sft.max_steps=7", "data.dir=/tmp/x y", "lora.targets=[\"q\", \"v\"]", "model.adapter=a/b"].map(String::from);
        let cfg = RunConfig::load(Some(&path), &sets).unwrap();
        assert_eq!(cfg.run_dir, PathBuf::from("out"));
        assert_eq!(cfg.sft.train.lr, 3e-4);
        assert_eq!(cfg.sft.train.max_steps, 7);
        assert_eq!(cfg.sft.answer, crate::train::sft::config::AnswerForm::Single);
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
    fn each_stage_sees_its_own_sections() {
        let cfg = RunConfig::default();
        let sft = cfg.stage_toml(Stage::Sft).unwrap();
        let grpo = cfg.stage_toml(Stage::Grpo).unwrap();
        assert!(sft.contains("[sft]") && !sft.contains("[grpo]") && !sft.contains("[rewards"), "{sft}");
        assert!(grpo.contains("[grpo]") && grpo.contains("[rewards.weights]") && !grpo.contains("[sft]"), "{grpo}");
        let mut other = cfg.clone();
        other.grpo.beta = 0.5;
        assert_eq!(other.stage_toml(Stage::Sft).unwrap(), sft);
        assert_ne!(other.stage_toml(Stage::Grpo).unwrap(), grpo);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn toml_bytes() -> impl Strategy<Value = Vec<u8>> {
            let pieces = prop_oneof![
                Just(b"[sft]\n".to_vec()),
                Just(b"[grpo]\n".to_vec()),
                Just(b"[prompt]\n".to_vec()),
                Just(b"[rewards.weights]\n".to_vec()),
                Just(b"lr = ".to_vec()),
                Just(b"k = ".to_vec()),
                Just(b"max_steps = -".to_vec()),
                Just(b"= \"".to_vec()),
                Just(b"1e999\n".to_vec()),
                Just(b"nan\n".to_vec()),
                Just(b"[[x]]\n".to_vec()),
                prop::collection::vec(any::<u8>(), 0..8),
            ];
            prop::collection::vec(pieces, 0..12).prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any file (truncated, wrong encoding, odd values) and any `--set`: a config or an
            /// error, never a panic.
            #[test]
            fn the_loader_never_panics(file in toml_bytes(), sets in prop::collection::vec("[a-z_.]{0,20}=?[ -~]{0,12}", 0..4)) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("c.toml");
                std::fs::write(&path, &file).unwrap();
                if let Ok(cfg) = RunConfig::load(Some(&path), &sets) {
                    // What loads also round-trips through the run directory's config.toml.
                    prop_assert_eq!(RunConfig::from_toml(&cfg.to_toml().unwrap()).unwrap(), cfg);
                }
                let _ = RunConfig::from_toml(&String::from_utf8_lossy(&file));
            }
        }
    }
}
