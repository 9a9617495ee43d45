//! The GRPO objective: per-token log-probabilities of sampled completions, the clipped
//! surrogate with group-relative advantages, and the k3 KL estimate against the reference
//! policy (the same model with its adapter switched off).
//!
//! Per completion token t of sample i, with ratio ρ = exp(logp − logp_old):
//!   loss_it = −min(ρ·A_i, clip(ρ, 1−ε_low, 1+ε_high)·A_i) + β·(exp(ref − logp) − (ref − logp) − 1)
//! normalised over tokens as configured (see [`LossNorm`]).
//!
//! In the next-code form with several codes per sample, a sample is a ranked list of codes and
//! its log-probability is that of the list under the Plackett–Luce model of the policy's code
//! distribution ([`plackett_luce`]), which does not split into tokens: the ratio, its clipping
//! and the KL estimate are then per list (as GSPO takes them per sequence), one term per list.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::config::LossNorm;

use super::advantages::{DEFAULT_EPS, GroupStats, group_advantages};
use crate::beam::{CodeTrie, sample_next_codes};
use crate::constrain::AnswerConstraint;
use crate::dist::Dist;
use crate::generate::{Completion, FinishReason, SamplingConfig, generate_constrained};
use crate::model::{CausalLm, Mode, TextTokenizer};
use crate::train::optim::{AdamW, GradAccum, clip_grad_norm};

/// The objective's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Lower clip range ε of the ratio.
    pub epsilon: f64,
    /// Upper clip range (DAPO's clip-higher); defaults to `epsilon`.
    pub epsilon_high: Option<f64>,
    /// Weight β of the KL penalty (0 skips the reference forward entirely).
    pub beta: f64,
    pub loss_norm: LossNorm,
    /// The constant of `loss_norm = constant`: usually the max new tokens.
    pub max_completion_tokens: usize,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { epsilon: 0.2, epsilon_high: None, beta: 0.04, loss_norm: LossNorm::Sequence, max_completion_tokens: 64 }
    }
}

/// What one loss evaluation measured (all means over real completion tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LossStats {
    pub loss: f64,
    pub kl: f64,
    /// Share of tokens whose ratio was clipped (the clipped branch was the active one).
    pub clip_fraction: f64,
    pub tokens: f64,
}

/// The GRPO loss of one group or batch. `logp` (G, C) carries gradients; `old_logp` and
/// `ref_logp` are constants; `advantages` (G); `mask` (G, C) is 1 on real completion tokens.
pub fn grpo_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    cfg: &LossConfig,
) -> candle_core::Result<(Tensor, LossStats)> {
    let (g, _) = logp.dims2()?;
    let adv = advantages.unsqueeze(1)?.broadcast_as(logp.shape())?;
    let ratio = (logp - old_logp.detach())?.exp()?;
    let hi = 1.0 + cfg.epsilon_high.unwrap_or(cfg.epsilon);
    let clipped = ratio.clamp(1.0 - cfg.epsilon, hi)?;
    let unclipped_obj = (&ratio * &adv)?;
    let clipped_obj = (&clipped * &adv)?;
    let objective = unclipped_obj.minimum(&clipped_obj)?;
    let mut per_token = objective.neg()?;
    let mut kl_mean = 0.0;
    let scalar = |t: Tensor| -> candle_core::Result<f64> { t.to_dtype(DType::F64)?.to_scalar::<f64>() };
    let tokens = scalar(mask.sum_all()?)?;
    if let (Some(r), true) = (ref_logp, cfg.beta > 0.0) {
        let diff = (r.detach() - logp)?;
        let kl = ((diff.exp()? - &diff)? - 1.0)?;
        kl_mean = scalar((&kl * mask)?.sum_all()?)? / tokens.max(1.0);
        per_token = (per_token + (kl * cfg.beta)?)?;
    }
    let masked = (per_token * mask)?;
    let loss = match cfg.loss_norm {
        LossNorm::Sequence => {
            let lens = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
            (masked.sum(1)? / lens)?.mean_all()?
        }
        LossNorm::Token => (masked.sum_all()? / tokens.max(1.0))?,
        LossNorm::Constant => (masked.sum_all()? / (g * cfg.max_completion_tokens.max(1)) as f64)?,
    };
    // A token is "clipped" when the clipped branch is strictly the smaller objective.
    let was_clipped = clipped_obj.lt(&unclipped_obj)?.to_dtype(mask.dtype())?;
    let clip_fraction = scalar((was_clipped * mask)?.sum_all()?)? / tokens.max(1.0);
    let stats = LossStats { loss: scalar(loss.clone())?, kl: kl_mean, clip_fraction, tokens };
    Ok((loss, stats))
}

/// One GRPO step's settings (the `[grpo]` table of a config, resolved).
#[derive(Debug, Clone, PartialEq)]
pub struct StepConfig {
    /// Completions per prompt (G).
    pub group: usize,
    pub loss: LossConfig,
    /// Sampling of the completions (temperature, top-p, max new tokens, stop, seed).
    pub sampling: SamplingConfig,
    /// Sample under the answer grammar; the log-probs are then those of the masked
    /// distribution, in the reference and old-policy forwards too.
    pub constraint: Option<AnswerConstraint>,
    /// The next-code form (`grpo.form = "next"`): a completion is one code, or a list of
    /// distinct codes, sampled under the codebook's trie ([`sample_next_codes`]), and the
    /// log-probs are those of its mask. `sampling` and `constraint` are then unused.
    pub next_code: Option<NextCodes>,
    /// Gradients flow through the last this-many prompt tokens only; 0 = the whole prompt
    /// ([`CausalLm::forward_group`]).
    pub grad_prompt_tokens: usize,
    /// Divide advantages by the group's reward std (GRPO) or not (Dr. GRPO).
    pub scale_rewards: bool,
    /// Leave groups whose rewards are all equal out of the update (they carry no signal).
    pub skip_zero_signal: bool,
    /// Optimisation passes (μ) over each sampled batch; the log-probs at sampling time are kept.
    pub updates_per_batch: usize,
    pub max_grad_norm: f64,
}

/// The next-code form's samples: the codebook's trie and the codes each sample lists.
#[derive(Debug, Clone, PartialEq)]
pub struct NextCodes {
    pub trie: Arc<CodeTrie>,
    pub per_sample: usize,
}

/// Where one step's time went, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepTimes {
    pub sampling: f64,
    pub reward: f64,
    /// Reference (adapter-off) and old-policy log-prob forwards, without gradients.
    pub reference: f64,
    pub forward_backward: f64,
    /// Summing the gradients over ranks (0 with one process).
    pub allreduce: f64,
    pub optimizer: f64,
}

/// What one step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub rewards: Vec<f64>,
    pub advantages: Vec<f64>,
    pub groups: GroupStats,
    /// Mean over updates and groups of the loss statistics.
    pub loss: LossStats,
    pub grad_norm: f64,
    /// Updates left out because their loss or gradient was not finite.
    pub skipped_updates: usize,
    pub completion_tokens: Vec<usize>,
    pub times: StepTimes,
}

/// A group's completions as training rows: tokens (+ the EOS token when the completion ended
/// with it, so stopping is learned; under a grammar that forced the end it has log-prob 0),
/// right-padded with `pad`, and the mask of real tokens.
pub fn completion_tensors(
    completions: &[Completion],
    eos: u32,
    pad: u32,
    device: &candle_core::Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let rows: Vec<Vec<u32>> = completions
        .iter()
        .map(|c| {
            let mut t = c.tokens.clone();
            if c.finish == FinishReason::Eos {
                t.push(eos);
            }
            t
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for r in &rows {
        ids.extend(r.iter().copied().chain(std::iter::repeat(pad)).take(width));
        mask.extend((0..width).map(|i| if i < r.len() { 1f32 } else { 0.0 }));
    }
    let g = rows.len();
    Ok((Tensor::from_vec(ids, (g, width), device)?, Tensor::from_vec(mask, (g, width), device)?.to_dtype(dtype)?))
}

/// Log-probs (G, C) of a group's completion tokens, the prompt run once (prefix sharing), its
/// first `frozen` tokens without gradients ([`CausalLm::forward_group`]). `support` (G · C
/// lists, row order) restricts each position's distribution to the answer grammar's tokens:
/// the distribution constrained completions were sampled from.
pub fn group_logprobs(
    model: &CausalLm,
    prompt: &[u32],
    tokens: &Tensor,
    support: Option<&[Vec<u32>]>,
    frozen: usize,
    mode: Mode,
) -> Result<Tensor> {
    let (g, c) = tokens.dims2()?;
    let hidden = model.forward_group(prompt, tokens, frozen, mode)?;
    let hidden = hidden.reshape((g * c, hidden.dim(2)?))?;
    let targets = tokens.flatten_all()?.to_vec1::<u32>()?;
    Ok(model.target_logprobs(&hidden, &targets, support, mode)?.reshape((g, c))?)
}

/// A group of sampled code lists as training rows: each distinct code of the group once, and
/// where each list's codes are among them.
pub struct CodeLists {
    /// The distinct codes' tokens (U, levels) and the tokens the trie allows at each of
    /// their positions (U · levels lists).
    codes: Tensor,
    grammar: Vec<Vec<u32>>,
    /// Per list, the row in `codes` of each of its codes, in list order: (G · per_list).
    index: Tensor,
    per_list: usize,
}

impl CodeLists {
    /// The rows of `group`, each completion `per_list` codes of `trie` one after the other.
    pub fn new(trie: &CodeTrie, group: &[Completion], per_list: usize, device: &candle_core::Device) -> Result<CodeLists> {
        let levels = trie.levels();
        let mut distinct: Vec<Vec<u32>> = Vec::new();
        let mut row_of = std::collections::HashMap::new();
        let mut index = Vec::with_capacity(group.len() * per_list);
        for c in group {
            ensure!(c.tokens.len() == per_list * levels, "a sample of {} tokens is not {per_list} codes of {levels}", c.tokens.len());
            for code in c.tokens.chunks_exact(levels) {
                let row = *row_of.entry(code.to_vec()).or_insert_with(|| {
                    distinct.push(code.to_vec());
                    distinct.len() - 1
                });
                index.push(row as u32);
            }
        }
        let u = distinct.len();
        let grammar = trie.supports(&distinct)?;
        let codes = Tensor::from_vec(distinct.concat(), (u, levels), device)?;
        let index = Tensor::from_vec(index, group.len() * per_list, device)?;
        Ok(CodeLists { codes, grammar, index, per_list })
    }

    /// Each list's log-probability (G, 1) under the policy ([`plackett_luce`] of its codes'
    /// log-probs, which one forward over the distinct codes gives).
    pub fn logprobs(&self, model: &CausalLm, prompt: &[u32], frozen: usize, mode: Mode) -> Result<Tensor> {
        let per_code = group_logprobs(model, prompt, &self.codes, Some(&self.grammar), frozen, mode)?.sum(1)?;
        plackett_luce(&per_code, &self.index, self.per_list)
    }
}

/// The Plackett–Luce log-probability (G, 1) of lists of distinct codes drawn without
/// replacement: with pᵢ the probability of a list's i-th code,
/// log P = Σᵢ [log pᵢ − log(1 − Σ_{j<i} pⱼ)]. `code_logp` (U) are the codes' log-probs, `index`
/// (G · per_list) each list's rows in it, in list order.
pub fn plackett_luce(code_logp: &Tensor, index: &Tensor, per_list: usize) -> Result<Tensor> {
    let lists = index.dims1()? / per_list.max(1);
    let logp = code_logp.index_select(index, 0)?.reshape((lists, per_list))?;
    // before[j][i] = 1 where j < i: the probability mass listed before each position.
    let before: Vec<f32> = (0..per_list * per_list).map(|x| f32::from(u8::from(x / per_list < x % per_list))).collect();
    let before = Tensor::from_vec(before, (per_list, per_list), code_logp.device())?.to_dtype(code_logp.dtype())?;
    let taken = logp.exp()?.matmul(&before)?;
    // The codes are distinct, so the rest is positive; the floor only guards rounding.
    let rest = taken.affine(-1.0, 1.0)?.clamp(1e-12, 1.0)?.log()?;
    Ok((logp - rest)?.sum_keepdim(1)?)
}

/// How a kept group's log-probs are taken: per completion token (under the answer grammar or
/// the trie, if any), or per sampled list of codes.
enum GroupRows {
    Tokens { tokens: Tensor, grammar: Option<Vec<Vec<u32>>> },
    Lists(CodeLists),
}

impl GroupRows {
    fn logprobs(&self, model: &CausalLm, prompt: &[u32], frozen: usize, mode: Mode) -> Result<Tensor> {
        match self {
            GroupRows::Tokens { tokens, grammar } => group_logprobs(model, prompt, tokens, grammar.as_deref(), frozen, mode),
            GroupRows::Lists(lists) => lists.logprobs(model, prompt, frozen, mode),
        }
    }
}

impl StepConfig {
    /// How many leading tokens of a `prompt_len`-token prompt run without gradients.
    pub fn frozen_prompt_tokens(&self, prompt_len: usize) -> usize {
        match self.grad_prompt_tokens {
            0 => 0,
            n => prompt_len.saturating_sub(n),
        }
    }
}

/// One GRPO step: sample G completions per prompt (one shared prefill each), score them with
/// `reward(prompt index, completion)`, turn rewards into group-relative advantages, and update
/// the adapter with the clipped surrogate + β·KL to the adapter-off reference.
///
/// With several ranks, each samples, scores and trains on its own prompts (`dist.owns`); the
/// rewards are gathered so that every rank computes all groups' advantages and statistics, and
/// the gradients, the kept-group count and the loss statistics are summed over ranks.
#[allow(clippy::too_many_arguments)]
pub fn step(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    reward: &mut dyn FnMut(usize, &Completion) -> Result<f64>,
    cfg: &StepConfig,
    opt: &mut AdamW,
    lr: f64,
    dropout_seed: Option<u64>,
    dist: &Dist,
) -> Result<StepReport> {
    let mut times = StepTimes::default();
    let t0 = Instant::now();
    let mine: Vec<usize> = (0..prompts.len()).filter(|&p| dist.owns(p)).collect();
    let my_prompts: Vec<Vec<u32>> = mine.iter().map(|&p| prompts[p].clone()).collect();
    let my_seeds: Vec<u64> = mine.iter().map(|&p| seeds[p]).collect();
    let sampled = if mine.is_empty() {
        Vec::new()
    } else if let Some(next) = &cfg.next_code {
        sample_next_codes(model, &next.trie, &my_prompts, &my_seeds, cfg.group, next.per_sample)?
    } else {
        generate_constrained(model, tokenizer, &my_prompts, &my_seeds, cfg.group, &cfg.sampling, Mode::INFERENCE, cfg.constraint.as_ref())?
    };
    times.sampling = t0.elapsed().as_secs_f64();

    let t0 = Instant::now();
    // Per prompt of this rank: its index, its G rewards, its G completion lengths.
    let mut mine_rows = Vec::with_capacity(mine.len() * (1 + 2 * cfg.group));
    for (&p, group) in mine.iter().zip(&sampled) {
        mine_rows.push(p as f64);
        for c in group {
            mine_rows.push(reward(p, c)?);
        }
        mine_rows.extend(group.iter().map(|c| c.tokens.len() as f64));
    }
    let (rewards, completion_tokens) = prompt_order(&dist.gather_f64(&mine_rows)?, prompts.len(), cfg.group)?;
    let (advantages, groups) = group_advantages(&rewards, cfg.group, cfg.scale_rewards, DEFAULT_EPS)?;
    times.reward = t0.elapsed().as_secs_f64();

    // The objective is computed in f32, as the log-probs are (half-precision logits are widened).
    let (device, dtype) = (model.device().clone(), DType::F32);
    let eos = tokenizer.eos_ids.first().copied().unwrap_or(0);
    let t0 = Instant::now();
    // Per group kept for the update: tokens, mask, advantages, old and reference log-probs.
    let mut prepared = Vec::new();
    for (&p, group) in mine.iter().zip(&sampled) {
        if cfg.skip_zero_signal && groups.zero_signal[p] {
            continue;
        }
        let (rows, mask) = match &cfg.next_code {
            Some(next) if next.per_sample > 1 => {
                let lists = CodeLists::new(&next.trie, group, next.per_sample, &device)?;
                (GroupRows::Lists(lists), Tensor::ones((group.len(), 1), dtype, &device)?)
            }
            _ => {
                let (tokens, mask) = completion_tensors(group, eos, eos, &device, dtype)?;
                let rows: Vec<Vec<u32>> = group.iter().map(|x| x.tokens.clone()).collect();
                let grammar = match (&cfg.next_code, &cfg.constraint) {
                    (Some(next), _) => {
                        ensure!(
                            tokens.dim(1)? == next.trie.levels(),
                            "codes of {} tokens in rows of {}",
                            next.trie.levels(),
                            tokens.dim(1)?
                        );
                        Some(next.trie.supports(&rows)?)
                    }
                    (None, Some(c)) => Some(c.supports(&rows, tokens.dim(1)?, &tokenizer.eos_ids, eos)?),
                    (None, None) => None,
                };
                (GroupRows::Tokens { tokens, grammar }, mask)
            }
        };
        let frozen = cfg.frozen_prompt_tokens(prompts[p].len());
        let adv = Tensor::from_vec(advantages[p * cfg.group..(p + 1) * cfg.group].to_vec(), cfg.group, &device)?.to_dtype(dtype)?;
        let reference = if cfg.loss.beta > 0.0 { Some(rows.logprobs(model, &prompts[p], frozen, Mode::REFERENCE)?) } else { None };
        // With one update per batch the policy has not moved since sampling: old = current
        // (detached), as in TRL. Otherwise the sampling-time log-probs are computed once here.
        let old = if cfg.updates_per_batch > 1 {
            Some(rows.logprobs(model, &prompts[p], frozen, Mode { adapter: true, grad: false, dropout: None })?)
        } else {
            None
        };
        prepared.push((p, rows, mask, frozen, adv, old, reference));
    }
    // The groups kept over all ranks: the batch loss is the mean over them.
    let kept = (0..prompts.len()).filter(|&p| !(cfg.skip_zero_signal && groups.zero_signal[p])).count();
    times.reference = t0.elapsed().as_secs_f64();

    let mut loss_sum = LossStats::default();
    let mut grad_norm = 0.0;
    let mut skipped_updates = 0;
    let mut evaluated = 0.0f64;
    let params = opt.params().to_vec();
    for update in 0..cfg.updates_per_batch.max(1) {
        if kept == 0 {
            break;
        }
        let t0 = Instant::now();
        let mut accum = GradAccum::new(params.len());
        // This update's loss, its statistics and the groups evaluated, summed over ranks below.
        let mut sums = [0.0f64; 6];
        for (p, rows, mask, frozen, adv, old, reference) in &prepared {
            let mode = match dropout_seed {
                Some(seed) => Mode::TRAIN.with_dropout(crate::seed::derive_seed(seed, update as u64, *p as u64)),
                None => Mode::TRAIN,
            };
            let logp = rows.logprobs(model, &prompts[*p], *frozen, mode)?;
            let old = match old {
                Some(o) => o.clone(),
                None => logp.detach(),
            };
            let (loss, stats) = grpo_loss(&logp, &old, reference.as_ref(), adv, mask, &cfg.loss)?;
            // The batch loss is the mean over its groups.
            let grads = (loss / kept as f64)?.backward()?;
            accum.add(&grads, &params)?;
            for (sum, v) in sums.iter_mut().zip([stats.loss, stats.loss, stats.kl, stats.clip_fraction, stats.tokens, 1.0]) {
                *sum += v;
            }
        }
        times.forward_backward += t0.elapsed().as_secs_f64();
        let mut grads = accum.take(&params)?;
        times.allreduce += dist.sum_tensors(&mut grads)?;
        dist.sum_f64(&mut sums)?;
        let [update_loss, loss, kl, clip_fraction, tokens, groups_evaluated] = sums;
        loss_sum.loss += loss;
        loss_sum.kl += kl;
        loss_sum.clip_fraction += clip_fraction;
        loss_sum.tokens += tokens;
        evaluated += groups_evaluated;
        let t0 = Instant::now();
        grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        // Each update on its own: one non-finite update does not stop the ones after it.
        if grad_norm.is_finite() && update_loss.is_finite() {
            opt.step(&grads, lr)?;
        } else {
            skipped_updates += 1;
        }
        times.optimizer += t0.elapsed().as_secs_f64();
    }
    let n = evaluated.max(1.0);
    let loss =
        LossStats { loss: loss_sum.loss / n, kl: loss_sum.kl / n, clip_fraction: loss_sum.clip_fraction / n, tokens: loss_sum.tokens / n };
    Ok(StepReport { rewards, advantages, groups, loss, grad_norm, skipped_updates, completion_tokens, times })
}

/// The gathered rows of [`step`] (per prompt: index, G rewards, G completion lengths, from all
/// ranks) back in prompt order: all rewards and all completion lengths.
fn prompt_order(rows: &[f64], prompts: usize, group: usize) -> Result<(Vec<f64>, Vec<usize>)> {
    let width = 1 + 2 * group;
    anyhow::ensure!(rows.len() == prompts * width, "gathered {} values for {prompts} prompts of {group} samples", rows.len());
    let mut by_prompt: Vec<&[f64]> = rows.chunks_exact(width).collect();
    by_prompt.sort_by_key(|r| r[0] as usize);
    let rewards = by_prompt.iter().flat_map(|r| r[1..=group].iter().copied()).collect();
    let lens = by_prompt.iter().flat_map(|r| r[1 + group..].iter().map(|&l| l as usize)).collect();
    Ok((rewards, lens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t2(v: &[f32], g: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (g, v.len() / g), &Device::Cpu).unwrap()
    }

    #[test]
    fn on_policy_loss_is_minus_the_mean_advantage_and_kl_is_zero() {
        // ρ = 1 everywhere: loss = −mean_i A_i (sequence norm), KL(ref = logp) = 0.
        let logp = t2(&[-1.0, -2.0, -0.5, -0.3], 2);
        let adv = Tensor::new(&[1.5f32, -0.5], &Device::Cpu).unwrap();
        let mask = t2(&[1.0, 1.0, 1.0, 0.0], 2);
        let (loss, s) = grpo_loss(&logp, &logp, Some(&logp), &adv, &mask, &LossConfig::default()).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - (-(1.5 - 0.5) / 2.0)).abs() < 1e-6);
        assert_eq!(s.kl, 0.0);
        assert_eq!(s.clip_fraction, 0.0);
        assert_eq!(s.tokens, 3.0);
    }

    #[test]
    fn clipping_and_k3_kl_by_hand() {
        // One token, A = 1, logp − old = ln 1.5 → ρ = 1.5, clipped to 1.2: objective 1.2.
        // ref − logp = −0.1: k3 = e^−0.1 + 0.1 − 1 = 0.0048374.
        let old = t2(&[0.0], 1);
        let logp = t2(&[1.5f32.ln()], 1);
        let reference = t2(&[1.5f32.ln() - 0.1], 1);
        let adv = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        let mask = t2(&[1.0], 1);
        let cfg = LossConfig { beta: 0.5, ..Default::default() };
        let (loss, s) = grpo_loss(&logp, &old, Some(&reference), &adv, &mask, &cfg).unwrap();
        let k3 = (-0.1f64).exp() + 0.1 - 1.0;
        assert!((s.kl - k3).abs() < 1e-6);
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - (-1.2 + 0.5 * k3)).abs() < 1e-6);
        assert_eq!(s.clip_fraction, 1.0);
        // A negative advantage is not clipped at 1.5 (min picks the unclipped −1.5).
        let adv = Tensor::new(&[-1.0f32], &Device::Cpu).unwrap();
        let (loss, s) = grpo_loss(&logp, &old, None, &adv, &mask, &cfg).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - 1.5).abs() < 1e-6);
        assert_eq!(s.clip_fraction, 0.0);
    }

    #[test]
    fn normalisations_differ_as_documented() {
        // Sequence lengths 2 and 1; per-token losses −A: row 0: −1, −1; row 1: −4.
        let logp = t2(&[0.0, 0.0, 0.0, 0.0], 2);
        let adv = Tensor::new(&[1.0f32, 4.0], &Device::Cpu).unwrap();
        let mask = t2(&[1.0, 1.0, 1.0, 0.0], 2);
        let loss = |norm| {
            let cfg = LossConfig { loss_norm: norm, beta: 0.0, max_completion_tokens: 4, ..Default::default() };
            grpo_loss(&logp, &logp, None, &adv, &mask, &cfg).unwrap().0.to_scalar::<f32>().unwrap()
        };
        assert!((loss(LossNorm::Sequence) - (-(1.0 + 4.0) / 2.0)).abs() < 1e-6);
        assert!((loss(LossNorm::Token) - (-6.0 / 3.0)).abs() < 1e-6);
        assert!((loss(LossNorm::Constant) - (-6.0 / 8.0)).abs() < 1e-6);
    }

    /// Plackett–Luce by hand: codes of probability .5, .3, .2; the list (0, 1) has
    /// .5 · .3/(1 − .5) = .3, the list (2, 0) .2 · .5/(1 − .2) = .125, and the three codes
    /// in any order together have probability 1 over the 6 orders. The gradient with respect
    /// to the codes' log-probs matches central finite differences (f64).
    #[test]
    fn plackett_luce_by_hand_and_by_finite_differences() {
        let probs = [0.5f64, 0.3, 0.2];
        let logp = Tensor::new(&probs.map(f64::ln), &Device::Cpu).unwrap();
        let index = Tensor::new(&[0u32, 1, 2, 0], &Device::Cpu).unwrap();
        let got = plackett_luce(&logp, &index, 2).unwrap().squeeze(1).unwrap().exp().unwrap().to_vec1::<f64>().unwrap();
        assert!((got[0] - 0.3).abs() < 1e-12 && (got[1] - 0.125).abs() < 1e-12, "{got:?}");
        let orders: [[u32; 3]; 6] = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        let index = Tensor::new(orders.concat().as_slice(), &Device::Cpu).unwrap();
        let all = plackett_luce(&logp, &index, 3).unwrap().exp().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!((all - 1.0).abs() < 1e-12, "{all}");

        // Log-probs of an unnormalised model (as a code's masked log-prob is only under its
        // own prompt): the function is defined for any inputs with Σ p < 1 before each position.
        let x = [-1.2f64, -2.0, -0.9];
        let index = Tensor::new(&[2u32, 0, 1, 1, 2, 0], &Device::Cpu).unwrap();
        let weights = Tensor::new(&[[0.7f64], [-1.3]], &Device::Cpu).unwrap();
        let objective = |v: &Tensor| plackett_luce(v, &index, 3).unwrap().mul(&weights).unwrap().sum_all().unwrap();
        let var = candle_core::Var::new(&x, &Device::Cpu).unwrap();
        let grads = objective(var.as_tensor()).backward().unwrap();
        let analytic = grads.get(var.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for i in 0..3 {
            let at = |h: f64| {
                let mut y = x;
                y[i] += h;
                objective(&Tensor::new(&y, &Device::Cpu).unwrap()).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!((numeric - analytic[i]).abs() < 1e-6, "d/dx{i}: {numeric} numeric, {} analytic", analytic[i]);
        }
    }
}
