//! The settings of the loop every stage runs ([`TrainConfig`], whose keys sit directly in the
//! stage's section: `[sft]`, `[grpo]`): optimiser, learning-rate schedule, length, and the
//! cadence of validation and checkpoints; and the schedule itself ([`lr_at`]).

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

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
    /// A step whose loss or gradient is not finite skips its update; this many in a row stop
    /// the run with an error (its checkpoints hold the last good adapter).
    pub max_nonfinite_steps: usize,
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
        ensure!(self.max_nonfinite_steps >= 1, "{section}.max_nonfinite_steps must be at least 1");
        ensure!(self.max_steps > 0 || self.epochs > 0, "{section}: set max_steps or epochs");
        ensure!(self.eval_every == 0 || self.eval_instances > 0, "{section}.eval_instances must be positive when eval_every is set");
        ensure!(self.eval_batch_size >= 1, "{section}.eval_batch_size must be at least 1");
        ensure!(self.eval_max_new_tokens >= 1, "{section}.eval_max_new_tokens must be at least 1");
        Ok(())
    }

    /// Optimizer steps of the whole run for `examples` training examples, `per_step` a step.
    pub fn total_steps(&self, examples: usize, per_step: usize) -> usize {
        if self.max_steps > 0 { self.max_steps } else { (self.epochs * examples).div_ceil(per_step.max(1)).max(1) }
    }
}

/// The SFT warm-up's loop settings; GRPO's defaults change a few of them
/// (`crate::train::grpo::config`).
impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            max_nonfinite_steps: 5,
            epochs: 1,
            max_steps: 0,
            eval_every: 50,
            eval_instances: 100,
            eval_batch_size: 8,
            eval_max_new_tokens: 64,
            save_every: 25,
            keep_checkpoints: 3,
            seed: 0,
        }
    }
}

/// The learning rate of the `step`-th update (0-based) of a run of `total` updates: a linear
/// warm-up reaching `lr` at update `warmup_steps`, then the schedule down to
/// `lr * min_lr_ratio` at the last update.
pub fn lr_at(t: &TrainConfig, step: usize, total: usize) -> f64 {
    let n = step + 1;
    let warmup = t.warmup_steps;
    if n <= warmup {
        return t.lr * n as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((n - warmup) as f64 / span as f64).min(1.0);
    let floor = t.min_lr_ratio;
    let factor = match t.schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => 1.0 - (1.0 - floor) * progress,
        Schedule::Cosine => floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    };
    t.lr * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let mut t = TrainConfig { lr: 1.0, warmup_steps: 4, min_lr_ratio: 0.1, ..TrainConfig::default() };
        let total = 20;
        let lrs: Vec<f64> = (0..total).map(|s| lr_at(&t, s, total)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert!(lrs[4..].windows(2).all(|w| w[1] <= w[0]), "{lrs:?}");
        assert!((lrs[total - 1] - 0.1).abs() < 1e-12);
        // Halfway through the decay, cosine is at the midpoint.
        assert!((lr_at(&t, 4 + 7, total) - 0.55).abs() < 1e-12);
        t.schedule = Schedule::Linear;
        assert!((lr_at(&t, 4 + 7, total) - 0.55).abs() < 1e-12);
        assert!((lr_at(&t, total - 1, total) - 0.1).abs() < 1e-12);
        t.schedule = Schedule::Constant;
        assert_eq!(lr_at(&t, total - 1, total), 1.0);
        t.warmup_steps = 0;
        assert_eq!(lr_at(&t, 0, total), 1.0);
    }

    #[test]
    fn step_counts() {
        let mut t = TrainConfig { epochs: 2, max_steps: 0, ..TrainConfig::default() };
        assert_eq!(t.total_steps(10, 6), 4); // 20 examples / 6 per step, rounded up
        t.max_steps = 9;
        assert_eq!(t.total_steps(10, 6), 9);
    }
}
