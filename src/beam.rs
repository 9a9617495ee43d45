//! Ranking POIs by the code a model writes next: beam search over the codebook's codes.
//!
//! A code is one token per level (`<a12><b5><c4>`). After a prompt, a code's score is the sum
//! of its tokens' log-probabilities under the constrained distribution: at each level a softmax
//! over the tokens that continue some code of the dataset, as constrained decoding masks the
//! logits. Each level keeps the `beam` best prefixes of each prompt; the last level's `beam`
//! complete codes, best first, are the ranking. With at least as many beams as codes the search
//! is exhaustive, which the tests compare against scoring every code.
//!
//! GRPO's next-code form samples from the same distribution ([`sample_next_codes`]) and
//! takes its training log-probs under the same mask ([`CodeTrie::logit_mask`]).

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use candle_core::Tensor;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::data::codebook::Codebook;
use crate::generate::{Completion, FinishReason, prefill_each};
use crate::model::{CausalLm, KvCache, Mode, TextTokenizer};

/// The beam width chosen on val for ranking by the next code: 40 beams gave the same 10 POIs
/// in the same order as 20 on the fixed val sample of 200 (docs/results.md).
pub const DEFAULT_BEAMS: usize = 20;

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

    /// The additive logit mask (rows, levels, vocab) of codes written as token rows: 0 where a
    /// token continues the row's prefix to some code, −∞ elsewhere. Added to the logits before
    /// the log-softmax, it gives the distribution [`sample_next_codes`] samples from.
    pub fn logit_mask(&self, rows: &[Vec<u32>], vocab: usize) -> Result<Vec<f32>> {
        let width = self.levels;
        let mut mask = vec![f32::NEG_INFINITY; rows.len() * width * vocab];
        for (r, tokens) in rows.iter().enumerate() {
            let code = self
                .code_of_tokens(tokens)
                .filter(|c| self.poi.contains_key(c))
                .with_context(|| format!("row {r} ({tokens:?}) is not a code of the dataset"))?;
            for level in 0..width {
                let row = &mut mask[(r * width + level) * vocab..(r * width + level + 1) * vocab];
                for t in self.allowed(&code[..level]) {
                    ensure!((t as usize) < vocab, "code token {t} is outside a vocabulary of {vocab}");
                    row[t as usize] = 0.0;
                }
            }
        }
        Ok(mask)
    }
}

/// `group` codes sampled for each prompt from the model's distribution over the codebook's
/// codes (temperature 1: at each level a softmax over the tokens that continue some code, the
/// distribution [`rank_next_codes`] ranks by). Each prompt is prefilled once; sample `s` of
/// prompt `p` draws from a generator seeded by (`seeds[p]`, `s`). A completion's tokens are one
/// code, its text the code (`<a1><b0><c3>`), its finish [`FinishReason::Stop`].
pub fn sample_next_codes(
    model: &CausalLm,
    trie: &CodeTrie,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    group: usize,
) -> Result<Vec<Vec<Completion>>> {
    ensure!(group > 0 && seeds.len() == prompts.len(), "one seed per prompt and at least one sample each");
    let (caches, first) = prefill_each(model, prompts, Mode::INFERENCE)?;
    let of_row: Vec<usize> = (0..prompts.len()).flat_map(|p| std::iter::repeat_n(p, group)).collect();
    let mut cache = KvCache::share(&caches.iter().collect::<Vec<_>>(), &of_row, trie.levels)?;
    drop(caches);
    let mut rngs: Vec<StdRng> =
        of_row.iter().enumerate().map(|(r, &p)| StdRng::seed_from_u64(crate::seed::derive_seed(seeds[p], 0, (r % group) as u64))).collect();
    let mut codes: Vec<Vec<u16>> = vec![Vec::new(); of_row.len()];
    let mut logits: Vec<Vec<f32>> = Vec::new();
    for level in 0..trie.levels {
        for (r, code) in codes.iter_mut().enumerate() {
            let row = if level == 0 { &first[of_row[r]] } else { &logits[r] };
            let allowed = &trie.children[code.as_slice()];
            let picked: Vec<f32> = allowed.iter().map(|&i| row[trie.tokens[level][usize::from(i)] as usize]).collect();
            let max = picked.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f64> = picked.iter().map(|&l| f64::from(l - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            ensure!(total.is_finite() && total > 0.0, "the model's logits over the codes are not finite");
            let mut u = rngs[r].random::<f64>() * total;
            let mut chosen = allowed[allowed.len() - 1];
            for (&i, &w) in allowed.iter().zip(&weights) {
                if u < w {
                    chosen = i;
                    break;
                }
                u -= w;
            }
            code.push(chosen);
        }
        if level + 1 < trie.levels {
            let next: Vec<u32> = codes.iter().map(|c| trie.tokens[level][usize::from(c[level])]).collect();
            let ids = Tensor::new(next.as_slice(), model.device())?.unsqueeze(1)?;
            logits = model.forward_last(&ids, None, Some(&mut cache), Mode::INFERENCE)?.to_vec2::<f32>()?;
        }
    }
    let completions: Vec<Completion> = codes
        .iter()
        .map(|code| {
            let tokens: Vec<u32> = code.iter().enumerate().map(|(level, &i)| trie.tokens[level][usize::from(i)]).collect();
            let text = code.iter().enumerate().map(|(level, &i)| Codebook::token(level, usize::from(i))).collect();
            Completion { tokens, text, finish: FinishReason::Stop }
        })
        .collect();
    let mut out = Vec::with_capacity(prompts.len());
    let mut rest = completions.into_iter();
    for _ in prompts {
        out.push(rest.by_ref().take(group).collect());
    }
    Ok(out)
}

/// A prefix being extended: the row of the cache whose last logits continue it.
struct Beam {
    row: usize,
    code: Vec<u16>,
    score: f32,
}

/// For each prompt, the POIs of the `beam` best codes that follow it, best first, with their
/// scores (log-probabilities, see the module comment). Ties go to the smaller code.
pub fn rank_next_codes(model: &CausalLm, trie: &CodeTrie, prompts: &[Vec<u32>], beam: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    ensure!(beam > 0, "beam search needs at least one beam");
    let (caches, mut logits) = prefill_each(model, prompts, Mode::INFERENCE)?;
    let mut cache = KvCache::share(&caches.iter().collect::<Vec<_>>(), &(0..prompts.len()).collect::<Vec<_>>(), trie.levels)?;
    drop(caches);
    let mut beams: Vec<Vec<Beam>> = (0..prompts.len()).map(|p| vec![Beam { row: p, code: Vec::new(), score: 0.0 }]).collect();
    for level in 0..trie.levels {
        let mut rows = Vec::new();
        let mut next = Vec::new();
        for prompt_beams in beams.iter_mut() {
            let mut extended = Vec::new();
            for b in prompt_beams.iter() {
                let allowed = &trie.children[&b.code];
                let row = &logits[b.row];
                let picked: Vec<f32> = allowed.iter().map(|&i| row[trie.tokens[level][usize::from(i)] as usize]).collect();
                let max = picked.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let log_sum = max + picked.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
                for (&i, &l) in allowed.iter().zip(&picked) {
                    let mut code = b.code.clone();
                    code.push(i);
                    extended.push(Beam { row: b.row, code, score: b.score + l - log_sum });
                }
            }
            extended.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.code.cmp(&b.code)));
            extended.truncate(beam);
            for b in &mut extended {
                rows.push(b.row);
                next.push(trie.tokens[level][usize::from(b.code[level])]);
                b.row = rows.len() - 1;
            }
            *prompt_beams = extended;
        }
        if level + 1 < trie.levels {
            cache = cache.select_rows(&rows)?;
            let ids = Tensor::new(next.as_slice(), model.device())?.unsqueeze(1)?;
            logits = model.forward_last(&ids, None, Some(&mut cache), Mode::INFERENCE)?.to_vec2::<f32>()?;
        }
    }
    Ok(beams.into_iter().map(|bs| bs.into_iter().map(|b| (trie.poi[&b.code], b.score)).collect()).collect())
}
