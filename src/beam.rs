//! Ranking POIs by the code a model writes next: beam search over the codebook's codes.
//!
//! A code is one token per level (`<a12><b5><c4>`). After a prompt, a code's score is the sum
//! of its tokens' log-probabilities under the constrained distribution: at each level a softmax
//! over the tokens that continue some code of the dataset, as constrained decoding masks the
//! logits. Each level keeps the `beam` best prefixes of each prompt; the last level's `beam`
//! complete codes, best first, are the ranking. With at least as many beams as codes the search
//! is exhaustive, which the tests compare against scoring every code.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use candle_core::Tensor;

use crate::data::codebook::Codebook;
use crate::generate::prefill_each;
use crate::model::{CausalLm, KvCache, Mode, TextTokenizer};

/// The codebook as a trie over token ids.
pub struct CodeTrie {
    levels: usize,
    /// The token id of index `i` at `level`: `tokens[level][i]`.
    tokens: Vec<Vec<u32>>,
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
        Ok(CodeTrie { levels: codebook.levels(), tokens, children, poi })
    }

    pub fn num_codes(&self) -> usize {
        self.poi.len()
    }
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
