//! `[grpo]`: group-relative policy optimisation's settings.

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

use crate::train::schedule::{Schedule, TrainConfig};

/// How per-token losses are averaged into one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossNorm {
    /// Mean over each sequence's tokens, then over sequences (the original GRPO).
    Sequence,
    /// Sum over all tokens of the batch / their number (DAPO).
    Token,
    /// Sum over all tokens / (sequences × max new tokens), a constant (Dr. GRPO).
    Constant,
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

/// What a GRPO completion is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrpoForm {
    /// A top-k list answering the list prompt ([`crate::prompt`]), scored as a list.
    List,
    /// One POI code written after the user's check-ins in the whole-history form
    /// ([`crate::history_prompt::next_checkin_prompt`]), sampled over the codebook's codes at
    /// temperature 1 and scored as a one-POI list; the model ranks as `eval --beam-next` does.
    /// Needs semantic ids.
    Next,
}

/// `[grpo]`: group-relative policy optimisation on the recommendation rewards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    /// The adapter the policy starts from: `"sft"` (`{run_dir}/sft/best`), `"none"` (a fresh
    /// adapter), or a PEFT adapter folder.
    pub init_adapter: String,
    /// `"list"` (a top-k list per sample) or `"next"` (one next-check-in code per sample).
    pub form: GrpoForm,
    /// In the next-code form, the distinct codes each sample lists: 1 = one code; more = a
    /// ranked list of codes drawn without replacement (Plackett–Luce), scored as a list of
    /// that length and trained on the list's probability.
    pub codes_per_sample: usize,
    /// Gradients flow through the last this-many prompt tokens only (the earlier ones run as
    /// inference, their keys and values constants): a long prompt then costs a prefill, not a
    /// training pass. 0 = the whole prompt.
    pub grad_prompt_tokens: usize,
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
    /// Tokens each sampled completion may have (it also stops at `</answer>`); unused in the
    /// next-code form, where a completion is one code.
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Nucleus sampling (1 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Sample (and validate) under the answer grammar: only k distinct POI ids of the dataset
    /// (`src/constrain.rs`). The log-probs are then those of the masked distribution. Needs
    /// `prompt.reasoning = false`.
    pub constrained: bool,
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
        if self.form == GrpoForm::Next {
            ensure!(
                self.temperature == 1.0 && self.top_p == 1.0 && self.top_k == 0,
                "grpo.form = \"next\" samples codes from the model's own distribution: set temperature = 1, top_p = 1, top_k = 0"
            );
            ensure!(!self.constrained, "grpo.form = \"next\" always samples under the codebook: leave grpo.constrained false");
        }
        ensure!(self.codes_per_sample >= 1, "grpo.codes_per_sample must be at least 1");
        ensure!(
            self.codes_per_sample == 1 || self.form == GrpoForm::Next,
            "grpo.codes_per_sample > 1 samples lists of codes: it needs grpo.form = \"next\""
        );
        self.train.validate("grpo")
    }
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            init_adapter: "sft".to_string(),
            form: GrpoForm::List,
            codes_per_sample: 1,
            grad_prompt_tokens: 0,
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
            constrained: false,
            train: TrainConfig {
                lr: 5e-5,
                schedule: Schedule::Constant,
                warmup_steps: 0,
                min_lr_ratio: 1.0,
                adam_beta2: 0.99,
                save_every: 10,
                ..TrainConfig::default()
            },
        }
    }
}
