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

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig { answer: AnswerForm::List, batch_size: 4, grad_accum: 4, train: TrainConfig::default() }
    }
}
