//! Ranking POIs by the code a model writes next: beam search over the codebook's codes.
//!
//! A code is one token per level (`<a12><b5><c4>`). After a prompt, a code's score is the sum
//! of its tokens' log-probabilities under the constrained distribution: at each level a softmax
//! over the tokens that continue some code of the dataset, as constrained decoding masks the
//! logits. Each level keeps the `beam` best prefixes of each prompt; the last level's `beam`
//! complete codes, best first, are the ranking. With at least as many beams as codes the search
//! is exhaustive, which the tests compare against scoring every code.
//!
//! GRPO's next-code form samples from the same distribution ([`sample_next_codes`]: one code,
//! or a list of distinct codes by stochastic beam search) and takes its training log-probs
//! over the same tokens ([`CodeTrie::supports`]).

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use candle_core::Tensor;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::data::codebook::Codebook;
use crate::data::{Dataset, Instance};
use crate::generate::{Completion, FinishReason, LastPrompt, prefill_each};
use crate::history_prompt::{next_checkin_budget, next_checkin_prompt};
use crate::model::{CausalLm, KvCache, Mode, TextTokenizer};
use crate::prompt::PromptConfig;

/// The beam width chosen on val for ranking by the next code: 40 beams gave the same 10 POIs
/// in the same order as 20 on the fixed val sample of 200 (docs/results.md).
pub const DEFAULT_BEAMS: usize = 20;

/// The POIs of a prompt's best next codes, best first, with their log-probabilities.
pub type Ranking = Vec<(u32, f32)>;

/// The codebook as a trie over token ids.
#[derive(Debug, PartialEq)]
pub struct CodeTrie {
    levels: usize,
    /// The token id of index `i` at `level`: `tokens[level][i]`.
    tokens: Vec<Vec<u32>>,
    /// The index within its level of each code token id.
    index: HashMap<u32, u16>,
    /// The indices that continue each prefix of a code (the empty prefix included), ascending.
    children: HashMap<Vec<u16>, Vec<u16>>,
    /// The POI of each complete code.
    poi: HashMap<Vec<u16>, u32>,
}

impl CodeTrie {
    /// The trie of `codebook`, whose tokens `tokenizer` must know (an adapter that adds them).
    pub fn new(codebook: &Codebook, tokenizer: &TextTokenizer) -> Result<CodeTrie> {
        let tokens = codebook
            .sizes
            .iter()
            .enumerate()
            .map(|(level, &size)| {
                (0..size)
                    .map(|i| {
                        let name = Codebook::token(level, i);
                        tokenizer
                            .token_id(&name)
                            .with_context(|| format!("the tokenizer has no token {name}: load the adapter that adds the codebook's tokens"))
                    })
                    .collect::<Result<Vec<u32>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut children: HashMap<Vec<u16>, Vec<u16>> = HashMap::new();
        for code in &codebook.codes {
            for level in 0..code.len() {
                children.entry(code[..level].to_vec()).or_default().push(code[level]);
            }
        }
        for next in children.values_mut() {
            next.sort_unstable();
            next.dedup();
        }
        let poi = codebook.codes.iter().enumerate().map(|(p, c)| (c.clone(), p as u32)).collect();
        let index = tokens.iter().flat_map(|level| level.iter().enumerate().map(|(i, &t)| (t, i as u16))).collect();
        Ok(CodeTrie { levels: codebook.levels(), tokens, index, children, poi })
    }

    pub fn num_codes(&self) -> usize {
        self.poi.len()
    }

    /// Tokens per code.
    pub fn levels(&self) -> usize {
        self.levels
    }

    /// The POI whose code `tokens` write, if they write a whole code of the dataset, each
    /// token at its own level.
    pub fn poi_of_tokens(&self, tokens: &[u32]) -> Option<u32> {
        self.code_of_tokens(tokens).and_then(|code| self.poi.get(&code).copied())
    }

    /// The level indices of `tokens`, if each is a code token of its level.
    fn code_of_tokens(&self, tokens: &[u32]) -> Option<Vec<u16>> {
        if tokens.len() != self.levels {
            return None;
        }
        let code: Vec<u16> = tokens.iter().map(|t| self.index.get(t).copied()).collect::<Option<_>>()?;
        code.iter().zip(tokens).enumerate().all(|(level, (&i, &t))| self.tokens[level].get(usize::from(i)) == Some(&t)).then_some(code)
    }

    /// The token ids allowed after the code prefix `code`.
    fn allowed(&self, code: &[u16]) -> impl Iterator<Item = u32> + '_ {
        let level = code.len();
        self.children.get(code).into_iter().flatten().map(move |&i| self.tokens[level][usize::from(i)])
    }

    /// The children of the code prefix `code` and their log-probabilities after it: the
    /// log-softmax of `logits` (the next-token logits after the prefix, at the level's tokens
    /// `tokens[level]` only, in their order) over the tokens that continue some code.
    fn child_logprobs(&self, code: &[u16], logits: &[f32]) -> Result<Vec<(u16, f64)>> {
        let children = &self.children[code];
        let picked: Vec<f64> = children.iter().map(|&i| f64::from(logits[usize::from(i)])).collect();
        let max = picked.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = max + picked.iter().map(|&l| (l - max).exp()).sum::<f64>().ln();
        ensure!(log_sum.is_finite(), "the model's logits over the codes are not finite");
        Ok(children.iter().zip(picked).map(|(&i, l)| (i, l - log_sum)).collect())
    }

    /// The tokens the trie allows at each position of codes written as token rows,
    /// (rows · levels) lists in row order: each position's log-softmax over its own list is the
    /// distribution [`sample_next_codes`] samples from.
    pub fn supports(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
        let mut out = Vec::with_capacity(rows.len() * self.levels);
        for (r, tokens) in rows.iter().enumerate() {
            let code = self
                .code_of_tokens(tokens)
                .filter(|c| self.poi.contains_key(c))
                .with_context(|| format!("row {r} ({tokens:?}) is not a code of the dataset"))?;
            out.extend((0..self.levels).map(|level| self.allowed(&code[..level]).collect()));
        }
        Ok(out)
    }
}

/// A code prefix being extended in one search group: the row of the logits that continue it,
/// its log-probability, and the key the group keeps its best prefixes by (the log-probability,
/// or its Gumbel-perturbed value when sampling).
struct Beam {
    row: usize,
    code: Vec<u16>,
    logp: f64,
    key: f64,
}

/// Beam search over the codes that follow each prompt, in `groups` independent groups per
/// prompt of at most `width` beams each; the prompt is prefilled once for all its groups. At
/// each level every beam's children get the constrained log-softmax ([`CodeTrie::child_logprobs`])
/// and each group keeps its `width` best keys (ties to the smaller code). Without `noise` the
/// key is the log-probability: plain beam search. With one generator per group it is Kool et
/// al.'s (2019) stochastic beam search: the keys are Gumbel-perturbed log-probabilities, each
/// conditioned on its parent's key, and the group's last beams, best key first, are `width`
/// distinct codes sampled without replacement, in the order of the Plackett–Luce model of the
/// code distribution. Returns each group's complete codes, best key first. With `last`, the
/// first prompt reads what it shares with the last prompt of the search before
/// ([`prefill_each`]).
fn search(
    model: &CausalLm,
    trie: &CodeTrie,
    prompts: &[Vec<u32>],
    groups: usize,
    width: usize,
    mut noise: Option<&mut [StdRng]>,
    last: Option<&mut LastPrompt>,
) -> Result<Vec<Vec<Beam>>> {
    ensure!(width > 0 && groups > 0, "a search needs at least one group of at least one beam");
    // Only a level's own tokens can follow: the logits are taken over them alone.
    let heads = trie.tokens.iter().map(|tokens| model.head_rows(tokens, Mode::INFERENCE)).collect::<Result<Vec<_>>>()?;
    let (caches, hidden) = prefill_each(model, prompts, Mode::INFERENCE, last)?;
    let mut logits = model.logits_over(&Tensor::cat(&hidden, 0)?, &heads[0])?.to_vec2::<f32>()?;
    let mut cache = KvCache::share_consumed(caches, &(0..prompts.len()).collect::<Vec<_>>(), trie.levels)?;
    let mut beams: Vec<Vec<Beam>> =
        (0..prompts.len() * groups).map(|g| vec![Beam { row: g / groups, code: Vec::new(), logp: 0.0, key: 0.0 }]).collect();
    for level in 0..trie.levels {
        let (mut rows, mut next) = (Vec::new(), Vec::new());
        for (g, group) in beams.iter_mut().enumerate() {
            let mut extended = Vec::new();
            for b in group.iter() {
                let children = trie.child_logprobs(&b.code, &logits[b.row])?;
                let logps: Vec<f64> = children.iter().map(|&(_, lp)| b.logp + lp).collect();
                let keys = match noise.as_deref_mut() {
                    Some(rngs) => gumbel_keys(&mut rngs[g], b.key, &logps),
                    None => logps.clone(),
                };
                for ((&(i, _), logp), key) in children.iter().zip(logps).zip(keys) {
                    let mut code = b.code.clone();
                    code.push(i);
                    extended.push(Beam { row: b.row, code, logp, key });
                }
            }
            extended.sort_by(|a, b| b.key.total_cmp(&a.key).then_with(|| a.code.cmp(&b.code)));
            extended.truncate(width);
            for b in &mut extended {
                rows.push(b.row);
                next.push(trie.tokens[level][usize::from(b.code[level])]);
                b.row = rows.len() - 1;
            }
            *group = extended;
        }
        if level + 1 < trie.levels {
            cache = cache.select_rows(&rows)?;
            let ids = Tensor::new(next.as_slice(), model.device())?.unsqueeze(1)?;
            let hidden = model.forward_last_hidden(&ids, None, Some(&mut cache), Mode::INFERENCE)?;
            logits = model.logits_over(&hidden, &heads[level + 1])?.to_vec2::<f32>()?;
        }
    }
    Ok(beams)
}

/// The keys of a node's children in stochastic beam search: each child's log-probability plus
/// a Gumbel draw, shifted so that their maximum equals the parent's key (Kool et al. 2019,
/// appendix B, in its numerically stable form).
fn gumbel_keys(rng: &mut StdRng, parent: f64, logps: &[f64]) -> Vec<f64> {
    let perturbed: Vec<f64> = logps
        .iter()
        .map(|&lp| {
            let u = rng.random::<f64>().max(f64::MIN_POSITIVE);
            lp - (-u.ln()).ln()
        })
        .collect();
    let max = perturbed.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    perturbed
        .iter()
        .map(|&g| {
            let v = parent - g + log1mexp(g - max);
            parent - v.max(0.0) - (-v.abs()).exp().ln_1p()
        })
        .collect()
}

/// ln(1 − eˣ) for x ≤ 0, accurate at both ends (−∞ at 0).
fn log1mexp(x: f64) -> f64 {
    if x > -std::f64::consts::LN_2 { (-x.exp_m1()).ln() } else { (-x.exp()).ln_1p() }
}

/// For each prompt, the POIs of the `beam` best codes that follow it, best first, with their
/// scores (log-probabilities, see the module comment). Ties go to the smaller code.
pub fn rank_next_codes(model: &CausalLm, trie: &CodeTrie, prompts: &[Vec<u32>], beam: usize) -> Result<Vec<Ranking>> {
    rank_codes_after(model, trie, prompts, beam, None)
}

/// [`rank_next_codes`], the first prompt reading what it shares with the `last` prompt ranked.
fn rank_codes_after(
    model: &CausalLm,
    trie: &CodeTrie,
    prompts: &[Vec<u32>],
    beam: usize,
    last: Option<&mut LastPrompt>,
) -> Result<Vec<Ranking>> {
    ensure!(beam > 0, "beam search needs at least one beam");
    let ranked = search(model, trie, prompts, 1, beam, None, last)?;
    Ok(ranked.into_iter().map(|bs| bs.into_iter().map(|b| (trie.poi[&b.code], b.logp as f32)).collect()).collect())
}

/// Ranks `batch` by the next code, as `eval --beam-next` and validation during training do:
/// each instance's whole-history prompt within `prompt`'s budget ([`next_checkin_prompt`]) and
/// the POIs of its `beams` best codes ([`rank_next_codes`]). With `last` (kept from batch to
/// batch), a user's next instance reads the history it shares with the one before instead of
/// prefilling it again. Returns the prompts and the rankings.
#[allow(clippy::too_many_arguments)]
pub fn rank_next_checkins(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    trie: &CodeTrie,
    ds: &Dataset,
    prompt: &PromptConfig,
    batch: &[&Instance],
    beams: usize,
    last: Option<&mut LastPrompt>,
) -> Result<(Vec<Vec<u32>>, Vec<Ranking>)> {
    let codebook = ds.codebook().context("ranking by the next code needs the dataset's codebook.json (preprocess writes it)")?;
    ensure!(trie.num_codes() == ds.num_pois(), "the code trie was built for another dataset");
    let budget = next_checkin_budget(prompt, model, codebook);
    let prompts = batch.iter().map(|inst| next_checkin_prompt(ds, prompt, tokenizer, inst, budget)).collect::<Result<Vec<_>>>()?;
    let ranked = rank_codes_after(model, trie, &prompts, beams, last)?;
    Ok((prompts, ranked))
}

/// `group` samples for each prompt, each a list of `codes` distinct codes drawn without
/// replacement from the model's distribution over the codebook's codes (temperature 1: at each
/// level a softmax over the tokens that continue some code, the distribution
/// [`rank_next_codes`] ranks by), in Plackett–Luce order: the first code is a draw from that
/// distribution, each next one a draw from it renormalised without the codes before. One code
/// per sample is a plain draw. Each prompt is prefilled once; sample `s` of prompt `p` draws
/// from a generator seeded by (`seeds[p]`, `s`). A completion's tokens are its codes one after
/// the other, its text theirs (`<a1><b0><c3><a4><b2><c0>`), its finish [`FinishReason::Stop`].
pub fn sample_next_codes(
    model: &CausalLm,
    trie: &CodeTrie,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    group: usize,
    codes: usize,
) -> Result<Vec<Vec<Completion>>> {
    ensure!(group > 0 && seeds.len() == prompts.len(), "one seed per prompt and at least one sample each");
    ensure!(codes <= trie.num_codes(), "{codes} distinct codes per sample, but the codebook has {}", trie.num_codes());
    let mut rngs: Vec<StdRng> = (0..prompts.len() * group)
        .map(|r| StdRng::seed_from_u64(crate::seed::derive_seed(seeds[r / group], 0, (r % group) as u64)))
        .collect();
    let sampled = search(model, trie, prompts, group, codes, Some(&mut rngs), None)?;
    let mut out: Vec<Vec<Completion>> = Vec::with_capacity(prompts.len());
    for (g, beams) in sampled.into_iter().enumerate() {
        if g % group == 0 {
            out.push(Vec::with_capacity(group));
        }
        let tokens = beams.iter().flat_map(|b| b.code.iter().enumerate().map(|(level, &i)| trie.tokens[level][usize::from(i)])).collect();
        let text = beams.iter().flat_map(|b| b.code.iter().enumerate().map(|(level, &i)| Codebook::token(level, usize::from(i)))).collect();
        out.last_mut().expect("pushed above").push(Completion { tokens, text, finish: FinishReason::Stop });
    }
    Ok(out)
}
