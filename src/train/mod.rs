//! Training machinery shared by the stages (`sft-warmup`, `grpo-train`):
//!
//! - [`optim`]: AdamW on the adapter with saveable state, gradient accumulation, global-norm
//!   clipping, the warm-up + cosine schedule.
//! - [`checkpoint`]: the run directory, atomic checkpoints, `best/`, `metrics.jsonl`.
//! - [`val`]: greedy validation on a fixed val sample through the eval harness.
//! - here: log-probabilities of target tokens in a padded batch (the shape of every loss), the
//!   counter-based seeds every random draw uses, the Ctrl-C flag and the progress bar.

pub mod checkpoint;
pub mod optim;
pub mod val;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::{Tensor, D};

use crate::model::{CausalLm, Mode};

/// A seed derived from (seed, a, b): every random draw in training is one of these, keyed by
/// what it is for (e.g. the step and micro-batch of a dropout pass), so that resuming at a step
/// replays exactly the draws an uninterrupted run makes.
pub fn derive_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut x = crate::model::transformer::splitmix64(seed ^ 0x005E_ED0F_7EA1);
    x = crate::model::transformer::splitmix64(x ^ a);
    crate::model::transformer::splitmix64(x ^ b)
}

/// One row of a training forward: `ids[..score_from]` is context, and every token from
/// `score_from` on is scored (predicted from the tokens before it).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredSeq {
    pub ids: Vec<u32>,
    pub score_from: usize,
}

impl ScoredSeq {
    pub fn scored(&self) -> usize {
        self.ids.len() - self.score_from
    }
}

/// Log-probabilities of the scored tokens of `rows`, run as one left-padded batch: a flat
/// (N,) tensor in row order (row 0's scored tokens, then row 1's, ...), differentiable when
/// `mode.grad`. Only the scored positions go through the output projection.
pub fn token_logprobs(model: &CausalLm, rows: &[ScoredSeq], mode: Mode) -> Result<Tensor> {
    ensure!(!rows.is_empty(), "empty batch");
    for (i, r) in rows.iter().enumerate() {
        ensure!(r.score_from >= 1 && r.score_from < r.ids.len(), "row {i}: nothing to score (score_from {} of {} tokens)", r.score_from, r.ids.len());
    }
    // The input is every token but the last; position t predicts token t + 1.
    let t = rows.iter().map(|r| r.ids.len() - 1).max().unwrap_or(0);
    let mut input = Vec::with_capacity(rows.len() * t);
    let mut pads = Vec::with_capacity(rows.len());
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    for (b, r) in rows.iter().enumerate() {
        let len = r.ids.len() - 1;
        let pad = t - len;
        pads.push(pad);
        input.extend(std::iter::repeat_n(0u32, pad));
        input.extend_from_slice(&r.ids[..len]);
        for j in r.score_from..r.ids.len() {
            positions.push((b * t + pad + j - 1) as u32);
            targets.push(r.ids[j]);
        }
    }
    let device = model.device();
    let input = Tensor::from_vec(input, (rows.len(), t), device)?;
    let hidden = model.forward_hidden(&input, Some(&pads), None, mode)?;
    let h = hidden.dim(D::Minus1)?;
    let picked = hidden.reshape((rows.len() * t, h))?.index_select(&Tensor::new(positions.as_slice(), device)?, 0)?;
    let logits = model.logits(&picked)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let n = targets.len();
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    Ok(logp.gather(&targets, D::Minus1)?.squeeze(D::Minus1)?)
}

/// A stop request (Ctrl-C): the loop finishes or abandons the current step, writes a
/// checkpoint of the last completed one, and returns.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(pub Arc<AtomicBool>);

impl StopFlag {
    pub fn new() -> Self {
        StopFlag::default()
    }

    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// A flag raised by Ctrl-C (SIGINT); a second Ctrl-C exits at once with status 130.
    pub fn on_ctrl_c() -> Result<StopFlag> {
        let flag = StopFlag::new();
        let inner = flag.clone();
        ctrlc::set_handler(move || {
            if inner.raised() {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: writing a checkpoint of the last completed step (Ctrl-C again to abort)");
            inner.raise();
        })
        .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))?;
        Ok(flag)
    }
}

/// A progress bar over optimizer steps (hidden when quiet).
pub fn progress_bar(total: u64, done: u64, quiet: bool, label: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_string());
    bar.set_position(done);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ_by_key() {
        let s = derive_seed(1, 2, 3);
        assert_eq!(s, derive_seed(1, 2, 3));
        assert_ne!(s, derive_seed(1, 3, 2));
        assert_ne!(s, derive_seed(2, 2, 3));
    }
}
