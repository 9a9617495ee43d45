//! `[sft]`: the SFT warm-up's settings.

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

use crate::train::schedule::TrainConfig;

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

/// What one SFT example is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Examples {
    /// A train instance: its prompt, then its answer (scored).
    #[default]
    Prompts,
    /// A window of a user's train check-ins as prompt lines, every check-in's POI name scored
    /// (`train/sft/history.rs`): one epoch is the whole train split.
    Histories,
}

fn default_history_tokens() -> usize {
    1024
}

/// `[sft]`: the supervised warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    pub answer: AnswerForm,
    /// Prompt-and-answer examples, or whole histories.
    #[serde(default)]
    pub examples: Examples,
    /// Tokens per window of a whole-history example.
    #[serde(default = "default_history_tokens")]
    pub history_tokens: usize,
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
        ensure!(self.history_tokens >= 16, "sft.history_tokens must be at least 16");
        self.train.validate("sft")
    }
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            answer: AnswerForm::List,
            examples: Examples::Prompts,
            history_tokens: default_history_tokens(),
            batch_size: 4,
            grad_accum: 4,
            train: TrainConfig::default(),
        }
    }
}
