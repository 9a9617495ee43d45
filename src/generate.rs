//! Batched sampling with a KV cache. The prompts' common beginning is prefilled once, then each
//! distinct prompt once (its G samples share that prefill); the rows then decode together,
//! left-padded to a common length, and a finished row leaves the batch so it stops costing
//! compute. Every row draws from its own seeded RNG, so a completion does not depend on what else
//! is in the batch.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::constrain::{AnswerConstraint, AnswerState};
use crate::model::{CausalLm, KvCache, Mode, TextTokenizer};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Argmax decoding; temperature, top-p and top-k are ignored.
    pub greedy: bool,
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off).
    pub top_p: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Generation stops once the completion contains one of these strings (it is kept).
    pub stop: Vec<String>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { greedy: false, temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 64, stop: Vec::new(), seed: 0 }
    }
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingConfig { greedy: true, max_new_tokens, ..Default::default() }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.greedy || self.temperature > 0.0, "temperature must be positive (or use greedy decoding)");
        anyhow::ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "top_p must be in (0, 1]");
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// Generated token ids (the EOS token, when reached, is not included).
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
}

/// One decoding row: which prompt and sample it is, its RNG, and what it generated.
struct Row {
    prompt: usize,
    sample: usize,
    rng: StdRng,
    tokens: Vec<u32>,
    finish: Option<FinishReason>,
    /// Where the row is in the answer grammar, when decoding is constrained.
    answer: Option<AnswerState>,
}

/// A per-row seed from (seed, prompt, sample): stable whatever the batch composition.
fn row_seed(seed: u64, prompt: u64, sample: usize) -> u64 {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [prompt, sample as u64] {
        x = (x ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
    }
    x
}

/// Generates `samples` completions for each prompt (token ids, already templated).
/// Returns, per prompt, its completions in sample order. Prompt `i` samples with seed `i`
/// (combined with `cfg.seed`); see [`generate_seeded`] to choose them.
pub fn generate(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    prompts: &[Vec<u32>],
    samples: usize,
    cfg: &SamplingConfig,
    mode: Mode,
) -> anyhow::Result<Vec<Vec<Completion>>> {
    let seeds: Vec<u64> = (0..prompts.len() as u64).collect();
    generate_seeded(model, tokenizer, prompts, &seeds, samples, cfg, mode)
}

/// [`generate`] with an explicit sampling seed per prompt: a prompt's completions are then the
/// same whatever else is in the batch.
pub fn generate_seeded(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    prompts: &[Vec<u32>],
    prompt_seeds: &[u64],
    samples: usize,
    cfg: &SamplingConfig,
    mode: Mode,
) -> anyhow::Result<Vec<Vec<Completion>>> {
    generate_constrained(model, tokenizer, prompts, prompt_seeds, samples, cfg, mode, None)
}

/// [`generate_seeded`], each completion held to `constraint`'s answer grammar when given: the
/// tokens it forbids are masked out before sampling (so greedy decoding takes the best allowed
/// token), and a token that alone is allowed is appended without sampling.
#[allow(clippy::too_many_arguments)]
pub fn generate_constrained(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    prompts: &[Vec<u32>],
    prompt_seeds: &[u64],
    samples: usize,
    cfg: &SamplingConfig,
    mode: Mode,
    constraint: Option<&AnswerConstraint>,
) -> anyhow::Result<Vec<Vec<Completion>>> {
    cfg.validate()?;
    anyhow::ensure!(prompt_seeds.len() == prompts.len(), "one seed per prompt");
    anyhow::ensure!(samples > 0, "need at least one sample per prompt");
    let device = model.device();
    let mut rows: Vec<Row> = Vec::with_capacity(prompts.len() * samples);
    let mut first_logits = Vec::with_capacity(prompts.len() * samples);
    let (caches, prompt_hidden) = prefill_each(model, prompts, mode, None)?;
    for (p, hidden) in prompt_hidden.iter().enumerate() {
        let logits = model.logits(hidden, mode)?.squeeze(0)?.to_vec1::<f32>()?;
        for s in 0..samples {
            rows.push(Row {
                prompt: p,
                sample: s,
                rng: StdRng::seed_from_u64(row_seed(cfg.seed, prompt_seeds[p], s)),
                tokens: Vec::new(),
                finish: None,
                answer: constraint.map(AnswerConstraint::start),
            });
            first_logits.push(logits.clone());
        }
    }
    if cfg.max_new_tokens == 0 {
        return collect(rows, prompts.len(), tokenizer, &cfg.stop);
    }
    // One cache row per sample, reading its prompt's prefill as a shared prefix.
    let row_of: Vec<usize> = (0..rows.len()).map(|r| rows[r].prompt).collect();
    let mut cache = KvCache::share_consumed(caches, &row_of, cfg.max_new_tokens)?;
    let mut active: Vec<usize> = (0..rows.len()).collect();
    let mut logits = first_logits;
    loop {
        // Sample one token for every active row and check whether it finished.
        let mut next = Vec::with_capacity(active.len());
        for (slot, &r) in active.iter().enumerate() {
            let row = &mut rows[r];
            let token = match (constraint, &row.answer) {
                (Some(c), Some(state)) => {
                    let token = match c.allowed(state, &tokenizer.eos_ids)[..] {
                        [] => anyhow::bail!("the answer grammar allows no token: the tokenizer has no end-of-sequence token"),
                        [only] => only,
                        ref allowed => {
                            let mut masked = vec![f32::NEG_INFINITY; logits[slot].len()];
                            for &a in allowed {
                                if let Some(&l) = logits[slot].get(a as usize) {
                                    masked[a as usize] = l;
                                }
                            }
                            sample_token(&masked, cfg, &mut row.rng)
                        }
                    };
                    row.answer = c.after_token(state, token);
                    token
                }
                _ => sample_token(&logits[slot], cfg, &mut row.rng),
            };
            if tokenizer.eos_ids.contains(&token) {
                row.finish = Some(FinishReason::Eos);
            } else {
                row.tokens.push(token);
                if !cfg.stop.is_empty() {
                    let text = tokenizer.decode(&row.tokens, true)?;
                    if cfg.stop.iter().any(|s| text.contains(s.as_str())) {
                        row.finish = Some(FinishReason::Stop);
                    }
                }
                if row.finish.is_none() && row.tokens.len() >= cfg.max_new_tokens {
                    row.finish = Some(FinishReason::Length);
                }
            }
            next.push(token);
        }
        let keep: Vec<usize> = (0..active.len()).filter(|&slot| rows[active[slot]].finish.is_none()).collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache = cache.select_rows(&keep)?;
            active = keep.iter().map(|&slot| active[slot]).collect();
            next = keep.iter().map(|&slot| next[slot]).collect();
        }
        let ids = Tensor::new(next.as_slice(), device)?.unsqueeze(1)?;
        let out = model.forward_last(&ids, None, Some(&mut cache), mode)?;
        logits = out.to_vec2::<f32>()?;
    }
    collect(rows, prompts.len(), tokenizer, &cfg.stop)
}

/// The last prompt [`prefill_each`] prefilled, with the mode of that pass and its keys and
/// values: the next call's first prompt, in the same mode, reads the beginning it shares with it
/// instead of recomputing it (a user's consecutive instances in an evaluation share the start
/// of their history).
#[derive(Default)]
pub struct LastPrompt(Option<(Vec<u32>, Mode, KvCache)>);

/// Prefills each prompt into its own one-row cache and returns the caches with the hidden state
/// (1, hidden) of each prompt's last position. A prompt that begins as the one before it does (in `prompts`, or
/// for the first, the `last` prompt of the call before) reads that beginning's keys and values
/// instead of recomputing them: prompts that share their system text and instructions, a user's
/// consecutive instances. `last` then keeps this call's last prompt.
pub fn prefill_each(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    mode: Mode,
    last: Option<&mut LastPrompt>,
) -> anyhow::Result<(Vec<KvCache>, Vec<Tensor>)> {
    anyhow::ensure!(prompts.iter().all(|p| !p.is_empty()), "a prompt is empty");
    let device = model.device();
    let (mut caches, mut hidden): (Vec<KvCache>, _) = (Vec::with_capacity(prompts.len()), Vec::with_capacity(prompts.len()));
    for (i, prompt) in prompts.iter().enumerate() {
        let before = match i {
            0 => last.as_deref().and_then(|l| l.0.as_ref()).filter(|l| l.1 == mode).map(|(tokens, _, cache)| (tokens.as_slice(), cache)),
            _ => Some((prompts[i - 1].as_slice(), &caches[i - 1])),
        };
        let reused = before.map_or(0, |(tokens, _)| reusable_prefix(tokens, prompt));
        // Read-only after the prefill: rows append to their own part.
        let mut cache = match before {
            Some((_, cache)) if reused > 0 => cache.continue_prefix(reused, prompt.len() - reused)?,
            _ => model.new_cache(prompt.len()),
        };
        let ids = Tensor::new(&prompt[reused..], device)?.unsqueeze(0)?;
        hidden.push(model.forward_last_hidden(&ids, None, Some(&mut cache), mode)?);
        caches.push(cache);
    }
    if let (Some(last), Some(prompt), Some(cache)) = (last, prompts.last(), caches.last()) {
        last.0 = Some((prompt.clone(), mode, cache.continue_prefix(cache.len(), 1)?));
    }
    Ok((caches, hidden))
}

/// Below this many tokens a shared beginning is prefilled again: copying its keys and values
/// would cost more than it saves.
const MIN_SHARED_PREFIX: usize = 16;

/// How many leading tokens `prompt` can read from the prefill of `before`: the tokens they share,
/// leaving `prompt` at least one of its own (its prefill gives the first logits); 0 when fewer
/// than [`MIN_SHARED_PREFIX`].
fn reusable_prefix(before: &[u32], prompt: &[u32]) -> usize {
    let common = before.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
    if common >= MIN_SHARED_PREFIX { common } else { 0 }
}

fn collect(rows: Vec<Row>, prompts: usize, tokenizer: &TextTokenizer, stop: &[String]) -> anyhow::Result<Vec<Vec<Completion>>> {
    let mut out: Vec<Vec<Completion>> = (0..prompts).map(|_| Vec::new()).collect();
    for row in rows {
        let mut text = tokenizer.decode(&row.tokens, true)?;
        let finish = row.finish.unwrap_or(FinishReason::Length);
        debug_assert_eq!(out[row.prompt].len(), row.sample);
        if finish == FinishReason::Stop {
            // The last token may carry characters past the stop string: cut them.
            if let Some(end) = stop.iter().filter_map(|s| text.find(s.as_str()).map(|i| i + s.len())).min() {
                text.truncate(end);
            }
        }
        out[row.prompt].push(Completion { tokens: row.tokens, text, finish });
    }
    Ok(out)
}

/// Picks the next token from one row's logits.
///
/// Plain temperature sampling walks the vocabulary in id order, with no sort of its 49k logits
/// per row and step (GRPO samples this way). With top-k or
/// top-p, only the candidates are sorted: the k best, or for top-p alone the tokens within
/// e^-28 (~1e-12) of the most likely one (the rest cannot change the nucleus measurably).
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> u32 {
    if cfg.greedy {
        return argmax(logits);
    }
    let inv_t = (1.0 / cfg.temperature) as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |i: u32| (((logits[i as usize] - max) * inv_t) as f64).exp();
    let n = logits.len();
    let k = if cfg.top_k == 0 { n } else { cfg.top_k.min(n) };
    if k == n && cfg.top_p >= 1.0 {
        let total: f64 = (0..n as u32).map(weight).sum();
        let mut u = rng.random::<f64>() * total;
        for i in 0..n as u32 {
            u -= weight(i);
            if u <= 0.0 {
                return i;
            }
        }
        return argmax(logits);
    }
    let (mut order, total) = if k < n {
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        order.truncate(k);
        let total = order.iter().map(|&i| weight(i)).sum::<f64>();
        (order, total)
    } else {
        let total = (0..n as u32).map(weight).sum::<f64>();
        let floor = (-28.0f64).exp();
        ((0..n as u32).filter(|&i| weight(i) >= floor).collect(), total)
    };
    order.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let mut probs: Vec<f64> = order.iter().map(|&i| weight(i)).collect();
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut cut = probs.len();
        for (n, p) in probs.iter().enumerate() {
            acc += p / total;
            if acc >= cfg.top_p {
                cut = n + 1;
                break;
            }
        }
        probs.truncate(cut);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (n, p) in probs.iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return order[n];
        }
    }
    order[probs.len() - 1]
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_reads_what_it_shares_with_the_one_before_when_it_is_worth_it() {
        let before: Vec<u32> = (0..40).collect();
        assert_eq!(reusable_prefix(&before, &[(0..30).collect::<Vec<_>>(), vec![99, 100]].concat()), 30);
        assert_eq!(reusable_prefix(&before, &(0..20).collect::<Vec<_>>()), 19, "a prompt keeps one token of its own");
        assert_eq!(reusable_prefix(&before, &(0..50).collect::<Vec<_>>()), 40);
        assert_eq!(reusable_prefix(&before, &[(0..15).collect::<Vec<_>>(), vec![99; 20]].concat()), 0, "15 tokens are not worth a copy");
        assert_eq!(reusable_prefix(&before, &[99]), 0);
    }

    fn cfg(top_k: usize, top_p: f64, temperature: f64) -> SamplingConfig {
        SamplingConfig { top_k, top_p, temperature, ..Default::default() }
    }

    #[test]
    fn argmax_takes_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(sample_token(&[0.1, 2.0, 1.9, -3.0], &cfg(1, 1.0, 1.0), &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p = 0.8 keeps tokens 0 and 1 only.
        let logits = [2.0f32, 1.0, 0.0, -1.2];
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample_token(&logits, &cfg(0, 0.8, 1.0), &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0);
        assert!(seen[1] > 300 && seen[0] > 1000, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 0.25, 0.75
        let mut rng = StdRng::seed_from_u64(3);
        let ones = (0..4000).filter(|_| sample_token(&logits, &cfg(0, 1.0, 1.0), &mut rng) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn low_temperature_sharpens() {
        let logits = [0.0f32, 0.5];
        let mut rng = StdRng::seed_from_u64(5);
        let ones = (0..1000).filter(|_| sample_token(&logits, &cfg(0, 1.0, 0.05), &mut rng) == 1).count();
        assert!(ones > 990, "{ones}");
    }

    #[test]
    fn row_seeds_differ() {
        assert_ne!(row_seed(0, 0, 1), row_seed(0, 1, 0));
        assert_ne!(row_seed(0, 0, 0), row_seed(1, 0, 0));
    }
}
