//! Constrained decoding of the answer list: the model can only write `<answer>`, then exactly k
//! distinct POI ids below `num_pois` (canonical decimals, `, `-separated), or k distinct codes of
//! the dataset's codebook (back to back, with semantic ids), then `</answer>`. Invalid,
//! out-of-range and repeated ids become impossible, not just penalised.
//!
//! With codes, each code piece must be its own vocabulary token (`<a12>`, as the model writes
//! and was trained on), never spelled out in bytes. Otherwise the grammar runs on characters,
//! so any tokenisation of the answer is allowed: at each step a
//! token is allowed when its whole text can be read from the row's state. Only the few thousand
//! tokens made of the answer's characters are ever tried (digits, `,`, space, and the letters
//! of the tags). An id prefix is allowed only while some unused valid id still starts with it,
//! so a row can never walk into a dead end. When one token alone is allowed it is appended
//! without sampling.
//!
//! Token texts are read by decoding each token alone, which is exact for byte-level BPE
//! tokenizers (SmolLM2, Qwen2, the tiny test models).

use anyhow::Context;

use crate::answer::{ANSWER_CLOSE, ANSWER_OPEN};
use crate::data::codebook::Codebook;
use crate::model::TextTokenizer;

/// The grammar of one answer list, and the tokens that can spell it.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerConstraint {
    k: usize,
    num_pois: u64,
    /// Every POI's code text, when the answer names POIs by code (index = POI id).
    codes: Option<Vec<Vec<u8>>>,
    /// The code texts sorted, with their POI: for counting the codes that start with a prefix,
    /// and for finding a complete one.
    sorted_codes: Vec<(Vec<u8>, u64)>,
    /// (token id, its text) for every token whose text only uses the answer's characters.
    tokens: Vec<(u32, Vec<u8>)>,
    /// The ids of the codebook's tokens, sorted: the only tokens a code is written with.
    code_tokens: Vec<u32>,
}

/// Where a row is in the answer.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Bytes of `<answer>` written so far.
    Open(usize),
    /// The digits of the id being written (empty: none yet).
    Id(Vec<u8>),
    /// After an id's comma: the space comes next.
    Space,
    /// Bytes of `</answer>` written so far.
    Close(usize),
    Done,
}

/// One row's progress through the grammar.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerState {
    phase: Phase,
    /// The ids completed so far.
    used: Vec<u64>,
}

impl AnswerState {
    /// The whole list has been written (`</answer>` included).
    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }
}

fn parse_digits(digits: &[u8]) -> Option<u64> {
    // Canonical decimals only: no leading zero (except `0` itself), and short enough for u64.
    if digits.is_empty() || digits.len() > 18 || (digits[0] == b'0' && digits.len() > 1) {
        return None;
    }
    Some(digits.iter().fold(0u64, |v, d| v * 10 + (d - b'0') as u64))
}

impl AnswerConstraint {
    /// The grammar for lists of `k` ids below `num_pois` (or, with `codebook`, of `k` codes of
    /// its POIs), over `tokenizer`'s vocabulary.
    pub fn new(tokenizer: &TextTokenizer, k: usize, num_pois: usize, codebook: Option<&Codebook>) -> anyhow::Result<AnswerConstraint> {
        anyhow::ensure!(k > 0, "a constrained answer needs k > 0");
        anyhow::ensure!(k <= num_pois, "a list of {k} distinct ids needs at least {k} POIs, not {num_pois}");
        let codes: Option<Vec<Vec<u8>>> = codebook.map(|cb| (0..num_pois as u32).map(|p| cb.code_text(p).into_bytes()).collect());
        let mut alphabet: Vec<u8> = format!("0123456789, {ANSWER_OPEN}{ANSWER_CLOSE}").into_bytes();
        if let Some(codes) = &codes {
            alphabet.extend(codes.iter().flatten());
        }
        let mut tokens = Vec::new();
        for id in 0..tokenizer.vocab_size() as u32 {
            if tokenizer.eos_ids.contains(&id) {
                continue;
            }
            let Ok(text) = tokenizer.decode(&[id], false) else { continue };
            if !text.is_empty() && text.bytes().all(|b| alphabet.contains(&b)) {
                tokens.push((id, text.into_bytes()));
            }
        }
        anyhow::ensure!(
            codes.is_some() || (0..10).all(|d| tokens.iter().any(|(_, t)| t == &[b'0' + d])),
            "the tokenizer has no token for each single digit: it cannot spell every POI id"
        );
        let mut sorted_codes: Vec<(Vec<u8>, u64)> = codes.iter().flatten().enumerate().map(|(p, c)| (c.clone(), p as u64)).collect();
        sorted_codes.sort();
        let mut code_tokens = Vec::new();
        for name in codebook.map(Codebook::tokens).unwrap_or_default() {
            let id = tokenizer
                .token_id(&name)
                .with_context(|| format!("the tokenizer has no token {name}: load the adapter that adds the codebook's tokens"))?;
            code_tokens.push(id);
        }
        code_tokens.sort_unstable();
        Ok(AnswerConstraint { k, num_pois: num_pois as u64, codes, sorted_codes, tokens, code_tokens })
    }

    /// How many codes start with `prefix`, less the used ones that do.
    fn free_codes_with_prefix(&self, codes: &[Vec<u8>], prefix: &[u8], used: &[u64]) -> u64 {
        let from = self.sorted_codes.partition_point(|(c, _)| c.as_slice() < prefix);
        let total = self.sorted_codes[from..].iter().take_while(|(c, _)| c.starts_with(prefix)).count();
        let taken = used.iter().filter(|&&u| codes[u as usize].starts_with(prefix)).count();
        (total - taken) as u64
    }

    /// A byte of a code: allowed while an unused code starts with the text so far; a complete
    /// code (codes end with `>`, so none is a prefix of another) is an item of the list.
    fn step_code(&self, codes: &[Vec<u8>], s: &mut AnswerState, b: u8) -> bool {
        let Phase::Id(text) = &s.phase else { return false };
        let mut longer = text.clone();
        longer.push(b);
        if self.free_codes_with_prefix(codes, &longer, &s.used) == 0 {
            return false;
        }
        match self.sorted_codes.binary_search_by(|(c, _)| c.as_slice().cmp(&longer)) {
            Ok(i) => {
                s.used.push(self.sorted_codes[i].1);
                s.phase = if s.used.len() == self.k { Phase::Close(0) } else { Phase::Id(Vec::new()) };
            }
            Err(_) => s.phase = Phase::Id(longer),
        }
        true
    }

    pub fn start(&self) -> AnswerState {
        AnswerState { phase: Phase::Open(0), used: Vec::new() }
    }

    /// How many valid ids start with the canonical digits `prefix`, and how many of those are used.
    fn free_with_prefix(&self, prefix: &[u8], used: &[u64]) -> u64 {
        let Some(p) = parse_digits(prefix) else { return 0 };
        let mut total = 0u64;
        // Ids with this prefix and j more digits: [p * 10^j, (p + 1) * 10^j), below num_pois.
        // `0` takes no more digits.
        let (mut lo, mut hi) = (p, p + 1);
        while lo < self.num_pois {
            total += hi.min(self.num_pois) - lo;
            if p == 0 {
                break;
            }
            (lo, hi) = (lo * 10, hi * 10);
        }
        let taken = used.iter().filter(|&&u| u.to_string().as_bytes().starts_with(prefix)).count() as u64;
        total.saturating_sub(taken)
    }

    /// Reads one byte; false (state unchanged in meaning) when the grammar forbids it.
    fn step(&self, s: &mut AnswerState, b: u8) -> bool {
        let open = ANSWER_OPEN.as_bytes();
        let close = ANSWER_CLOSE.as_bytes();
        match &mut s.phase {
            Phase::Open(i) => {
                if open[*i] != b {
                    return false;
                }
                *i += 1;
                if *i == open.len() {
                    s.phase = Phase::Id(Vec::new());
                }
                true
            }
            Phase::Id(_) if self.codes.is_some() => {
                let codes = self.codes.as_deref().expect("checked");
                self.step_code(codes, s, b)
            }
            Phase::Id(digits) => {
                if b.is_ascii_digit() {
                    let mut longer = digits.clone();
                    longer.push(b);
                    if self.free_with_prefix(&longer, &s.used) == 0 {
                        return false;
                    }
                    *digits = longer;
                    return true;
                }
                let Some(id) = parse_digits(digits).filter(|&v| v < self.num_pois && !s.used.contains(&v)) else { return false };
                let last = s.used.len() + 1 == self.k;
                match (b, last) {
                    (b',', false) => s.phase = Phase::Space,
                    (b'<', true) => s.phase = Phase::Close(1),
                    _ => return false,
                }
                s.used.push(id);
                true
            }
            Phase::Space => {
                if b != b' ' {
                    return false;
                }
                s.phase = Phase::Id(Vec::new());
                true
            }
            Phase::Close(i) => {
                if close[*i] != b {
                    return false;
                }
                *i += 1;
                if *i == close.len() {
                    s.phase = Phase::Done;
                }
                true
            }
            Phase::Done => false,
        }
    }

    /// The state after `text`, or None when the grammar forbids it.
    pub fn advance(&self, state: &AnswerState, text: &[u8]) -> Option<AnswerState> {
        let mut s = state.clone();
        text.iter().all(|&b| self.step(&mut s, b)).then_some(s)
    }

    /// The tokens allowed next, in id order: once the list is done, the end-of-sequence ids.
    pub fn allowed(&self, state: &AnswerState, eos: &[u32]) -> Vec<u32> {
        if state.done() {
            return eos.to_vec();
        }
        self.tokens.iter().filter(|(id, text)| self.advance_token(state, *id, text).is_some()).map(|(id, _)| *id).collect()
    }

    /// The state after token `id` whose text is `text`. With codes, the bytes read inside a
    /// code must all come from a codebook token, and a codebook token only writes inside one:
    /// `><` may close `<answer` but not open a code in bytes.
    fn advance_token(&self, state: &AnswerState, id: u32, text: &[u8]) -> Option<AnswerState> {
        if self.codes.is_none() {
            return self.advance(state, text);
        }
        let is_code = self.code_tokens.binary_search(&id).is_ok();
        let mut s = state.clone();
        for &b in text {
            if matches!(s.phase, Phase::Id(_)) != is_code || !self.step(&mut s, b) {
                return None;
            }
        }
        Some(s)
    }

    /// The tokens the grammar allowed at each position of completions sampled under it, as
    /// (rows · width) lists in row order, for rows right-padded with `pad` to `width`. A
    /// log-softmax over each position's list gives the log-probabilities of the masked
    /// distribution the completions were sampled from, so GRPO's ratios and KL stay on-policy.
    /// The position after a finished answer gets the end-of-sequence tokens, all the sampler
    /// allowed there (`pad` must be one of them, as GRPO's rows pad with EOS): a forced end has
    /// log-prob 0. Later padding positions, which the loss masks out, get `pad` alone.
    pub fn supports(&self, completions: &[Vec<u32>], width: usize, eos: &[u32], pad: u32) -> anyhow::Result<Vec<Vec<u32>>> {
        let mut out = Vec::with_capacity(completions.len() * width);
        for (r, tokens) in completions.iter().enumerate() {
            anyhow::ensure!(tokens.len() <= width, "a completion of {} tokens in rows of {width}", tokens.len());
            let mut state = self.start();
            for (i, &t) in tokens.iter().enumerate() {
                out.push(self.allowed(&state, eos));
                state = self
                    .after_token(&state, t)
                    .with_context(|| format!("completion {r}: token {t} at position {i} is outside the answer grammar"))?;
            }
            for i in tokens.len()..width {
                out.push(if i == tokens.len() && state.done() { self.allowed(&state, eos) } else { vec![pad] });
            }
        }
        Ok(out)
    }

    /// The state after token `id` (an end-of-sequence token leaves a done state as it is).
    pub fn after_token(&self, state: &AnswerState, id: u32) -> Option<AnswerState> {
        if state.done() {
            return Some(state.clone());
        }
        let (_, text) = self.tokens.iter().find(|(t, _)| *t == id)?;
        self.advance_token(state, id, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_config, write_tiny_model};

    fn constraint(k: usize, num_pois: usize) -> (tempfile::TempDir, AnswerConstraint) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &tiny_config("llama"), 1).unwrap();
        let m = crate::model::load_on(
            &crate::model::ModelSource::Folder(dir.path().to_path_buf()),
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        let c = AnswerConstraint::new(&m.tokenizer, k, num_pois, None).unwrap();
        (dir, c)
    }

    fn reads(c: &AnswerConstraint, text: &str) -> Option<AnswerState> {
        c.advance(&c.start(), text.as_bytes())
    }

    #[test]
    fn accepts_exactly_k_distinct_canonical_ids_in_range() {
        let (_d, c) = constraint(3, 125);
        assert!(reads(&c, "<answer>12, 0, 124</answer>").unwrap().done());
        assert!(!reads(&c, "<answer>12, 0").unwrap().done());
        for bad in [
            "<answer>012",               // leading zero
            "<answer>00",                // likewise
            "<answer>125",               // out of range
            "<answer>1250",              // likewise
            "<answer>12, 12,",           // repeated (`12, 12` may still become `12, 120`)
            "<answer>12,0",              // no space
            "<answer>12, 0</answer>",    // two ids where three are asked for
            "<answer>12, 0, 1, 2",       // a fourth
            "<answer>1 2",               // a space inside an id
            "<answer>, 1",               // an empty item
            "answer",                    // no tag
            "<answer>1, 2, 3</answer>x", // anything after the list
        ] {
            assert!(reads(&c, bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_prefix_is_allowed_only_while_an_unused_id_starts_with_it() {
        // Ids 0..13: after 1, 10, 11 and 12 are used, `1` leads nowhere.
        let (_d, c) = constraint(6, 13);
        let s = reads(&c, "<answer>10, 11, 12, ").unwrap();
        assert!(c.advance(&s, b"1").is_some(), "1 itself is free");
        let s = reads(&c, "<answer>10, 11, 12, 1, ").unwrap();
        assert!(c.advance(&s, b"1").is_none(), "every id starting with 1 is used");
        assert!(c.advance(&s, b"0").is_some() && c.advance(&s, b"9").is_some());
        assert_eq!(c.free_with_prefix(b"1", &[]), 4);
        assert_eq!(c.free_with_prefix(b"0", &[]), 1);
        assert_eq!(c.free_with_prefix(b"2", &[]), 1);
        assert_eq!(c.free_with_prefix(b"13", &[]), 0);
    }

    #[test]
    fn allowed_tokens_follow_the_grammar_and_eos_ends_it() {
        let (_d, c) = constraint(1, 5);
        let eos = [2u32];
        // The tiny tokenizer spells one byte per token: `<` alone opens the answer.
        let open = c.allowed(&c.start(), &eos);
        assert_eq!(open.len(), 1);
        let s = reads(&c, "<answer>").unwrap();
        let digits: Vec<u32> = c.allowed(&s, &eos);
        assert_eq!(digits.len(), 5, "ids 0..5, one digit each");
        let s = reads(&c, "<answer>4").unwrap();
        assert_eq!(c.allowed(&s, &eos).len(), 1, "only `<` of the closing tag: k = 1 is reached");
        let s = reads(&c, "<answer>4</answer>").unwrap();
        assert_eq!(c.allowed(&s, &eos), eos);
        let m = crate::model::load_on(
            &crate::model::ModelSource::Folder(_d.path().to_path_buf()),
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        assert!(AnswerConstraint::new(&m.tokenizer, 6, 5, None).is_err(), "6 distinct ids of 5");
    }

    /// Each position's support is what the sampler allowed there: the grammar's tokens inside
    /// the answer, the end-of-sequence tokens right after a finished one, `pad` after that and
    /// after an unfinished one.
    #[test]
    fn supports_replay_what_the_sampler_allowed() {
        let (d, c) = constraint(1, 5);
        let m = crate::model::load_on(
            &crate::model::ModelSource::Folder(d.path().to_path_buf()),
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        let (eos, pad) = ([2u32, 3], 2u32);
        let done = m.tokenizer.encode("<answer>4</answer>", false).unwrap();
        let cut = m.tokenizer.encode("<answer>4", false).unwrap();
        let width = done.len() + 2;
        let support = c.supports(&[done.clone(), cut.clone()], width, &eos, pad).unwrap();
        assert_eq!(support.len(), 2 * width);
        let mut state = c.start();
        for (i, &t) in done.iter().enumerate() {
            assert_eq!(support[i], c.allowed(&state, &eos), "position {i}");
            state = c.after_token(&state, t).unwrap();
        }
        assert_eq!(support[done.len()], eos.to_vec(), "the forced end");
        assert_eq!(support[done.len() + 1], vec![pad], "padding");
        assert_eq!(support[width + cut.len()], vec![pad], "after an unfinished answer: padding");
        assert!(c.supports(&[done], 3, &eos, pad).is_err(), "a completion wider than its rows");
        assert!(c.supports(&[m.tokenizer.encode("answer", false).unwrap()], width, &eos, pad).is_err(), "outside the grammar");
    }

    #[test]
    fn with_a_codebook_only_distinct_known_codes_are_written() {
        use crate::data::codebook::{Codebook, CodebookConfig};
        let (d, _) = constraint(1, 5);
        let mut m = crate::model::load_on(
            &crate::model::ModelSource::Folder(d.path().to_path_buf()),
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        let cb = Codebook {
            config: CodebookConfig::default(),
            sizes: vec![2, 1, 12],
            codes: vec![vec![0, 0, 0], vec![1, 0, 2], vec![1, 0, 0], vec![1, 0, 11]],
        };
        let e = format!("{:#}", AnswerConstraint::new(&m.tokenizer, 3, 4, Some(&cb)).unwrap_err());
        assert!(e.contains("adapter"), "{e}");
        for name in cb.tokens() {
            m.tokenizer.add_token(&name).unwrap();
        }
        let c = AnswerConstraint::new(&m.tokenizer, 3, 4, Some(&cb)).unwrap();
        let reads = |text: &str| c.advance(&c.start(), text.as_bytes());
        assert!(reads("<answer><a1><b0><c2><a0><b0><c0><a1><b0><c11></answer>").unwrap().done());
        for bad in [
            "<answer><a1><b0><c1>",                           // names no POI
            "<answer><a1><b0><c2><a1><b0><c2>",               // repeated
            "<answer><a1><c2>",                               // a level skipped
            "<answer><a1><b0><c2>, ",                         // separators are not part of it
            "<answer><a1><b0><c2><a0><b0><c0></answer>",      // two codes where three are asked for
            "<answer><a1><b0><c2><a0><b0><c0><a1><b0><c0><a", // a fourth
        ] {
            assert!(reads(bad).is_none(), "{bad}");
        }
        // `<c1` may still become `<c11>`; once `<a1><b0><c11>` is used, `<a1><b0><c1` leads nowhere.
        assert!(reads("<answer><a1><b0><c1").is_some());
        assert!(reads("<answer><a1><b0><c11><a1><b0><c1").is_none());
        // After `<answer>`, only the first-level tokens of unused codes: never the byte `<`.
        let s = reads("<answer>").unwrap();
        let first: Vec<u32> = ["<a0>", "<a1>"].iter().map(|t| m.tokenizer.token_id(t).unwrap()).collect();
        assert_eq!(c.allowed(&s, &[2]), first);
        let lt = m.tokenizer.encode("<", false).unwrap()[0];
        assert!(c.after_token(&s, lt).is_none());
        assert_eq!(c.after_token(&s, first[1]).unwrap(), reads("<answer><a1>").unwrap());
        // A token that closes `<answer` and starts a code in bytes leads nowhere: never allowed.
        let joint = m.tokenizer.add_token("><").unwrap();
        let c = AnswerConstraint::new(&m.tokenizer, 3, 4, Some(&cb)).unwrap();
        let open = c.advance(&c.start(), b"<answer").unwrap();
        assert!(c.after_token(&open, joint).is_none());
        assert!(!c.allowed(&open, &[2]).contains(&joint));
        assert!(!c.allowed(&open, &[2]).is_empty());
    }
}
