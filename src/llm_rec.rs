//! A language model as a recommender: prompt each instance, decode greedily until
//! `</answer>`, parse the list; or, with `--beam-next`, prompt with the user's check-ins in the
//! whole-history form and rank the POIs whose codes the model would write next
//! ([`crate::beam`]). The eval harness ranks and scores its lists exactly like the baselines'
//! scores; this module only turns instances into answers.

use anyhow::{Context, Result};
use chrono::NaiveDateTime;
use serde_json::json;

use crate::answer::{ANSWER_CLOSE, AnswerIds};
use crate::beam::{CodeTrie, Ranking, rank_next_checkins, rank_next_codes};
use crate::constrain::AnswerConstraint;
use crate::data::codebook::Codebook;
use crate::data::{Dataset, Instance};
use crate::eval::{Prediction, Recommender};
use crate::generate::{LastPrompt, SamplingConfig, generate_constrained};
use crate::history_prompt::{next_checkin_budget, user_next_checkin_prompt};
use crate::model::{LoadedModel, Mode};
use crate::prompt::{PromptBuilder, PromptConfig, PromptContext, candidate_stats};
use crate::prompt_stats::{InPrompt, answer_in_history_prompt, answer_in_prompt};
use crate::retrieval::TrainStats;

pub struct LlmRecommender {
    pub loaded: LoadedModel,
    pub prompt: PromptConfig,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    /// The name in reports, e.g. `llm:SmolLM2…+adapter`.
    pub name: String,
    details: Vec<serde_json::Value>,
    /// The candidate lists' statistics, counted at the first `predict` (when the prompt asks for them).
    stats: Option<TrainStats>,
    /// Constrained decoding: the answer grammar for the dataset's POIs, built at the first answer.
    constrained: bool,
    grammar: std::sync::OnceLock<(usize, AnswerConstraint)>,
    /// Rank by beam search over the next code instead of generating a list (`--beam-next`): the
    /// number of beams, and the codebook's trie, built at the first batch.
    beam_next: Option<usize>,
    trie: std::sync::OnceLock<CodeTrie>,
    /// The last prompt ranked by the next code, whose prefill the next batch may read.
    last_prompt: std::sync::Mutex<LastPrompt>,
}

impl LlmRecommender {
    pub fn new(loaded: LoadedModel, prompt: PromptConfig, batch_size: usize, max_new_tokens: usize, name: String) -> Result<Self> {
        prompt.validate()?;
        anyhow::ensure!(batch_size > 0 && max_new_tokens > 0, "batch size and max new tokens must be positive");
        Ok(LlmRecommender {
            loaded,
            prompt,
            batch_size,
            max_new_tokens,
            name,
            details: Vec::new(),
            stats: None,
            constrained: false,
            grammar: std::sync::OnceLock::new(),
            beam_next: None,
            trie: std::sync::OnceLock::new(),
            last_prompt: std::sync::Mutex::default(),
        })
    }

    /// Holds every answer to the answer grammar ([`crate::constrain`]) when `on`.
    pub fn constrained(mut self, on: bool) -> Result<Self> {
        anyhow::ensure!(!(on && self.prompt.reasoning), "constrained decoding needs reasoning = false: the grammar has no <think> part");
        self.constrained = on;
        Ok(self)
    }

    /// Ranks by what the model writes next after the user's check-ins in the whole-history form
    /// ([`crate::history_prompt::next_checkin_prompt`]): the POIs of the `beams` best codes ([`rank_next_codes`]), at
    /// least k. Needs semantic ids; the list is always k distinct valid POIs.
    pub fn beam_next(mut self, beams: Option<usize>) -> Result<Self> {
        if let Some(b) = beams {
            anyhow::ensure!(self.prompt.ids == crate::answer::PoiIds::Semantic, "--beam-next ranks codes: it needs semantic ids");
            anyhow::ensure!(b >= self.prompt.k, "--beam-next {b} keeps fewer codes than the k = {} the list needs", self.prompt.k);
            anyhow::ensure!(!self.constrained, "--beam-next and --constrained are two ways of decoding: choose one");
        }
        self.beam_next = beams;
        Ok(self)
    }

    /// The adapter must add the tokens this prompt writes (the codebook's, and the time tokens).
    fn check_added_tokens(&self, codebook: Option<&Codebook>) -> Result<()> {
        if let Some(wanted) = crate::prompt::added_tokens(&self.prompt, codebook)? {
            let added = self.loaded.model.new_tokens.as_ref().map(|t| &t.names);
            anyhow::ensure!(
                added == Some(&wanted),
                "semantic ids need an adapter trained with this dataset's codebook (and the time tokens when prompt.time_tokens): \
                 it adds {} tokens; this model has {}",
                wanted.len(),
                added.map_or("none".to_string(), |n| format!("{} other tokens", n.len()))
            );
        }
        Ok(())
    }

    /// [`LlmRecommender::beam_next`]'s ranking of `batch`: the k best POIs and every kept code's
    /// score, with the prompts.
    fn rank_next(&self, ds: &Dataset, batch: &[&Instance], beams: usize) -> Result<Vec<(Vec<u32>, serde_json::Value)>> {
        let mut last = self.last_prompt.lock().map_err(|_| anyhow::anyhow!("a ranking thread panicked"))?;
        let (prompts, ranked) = rank_next_checkins(
            &self.loaded.model,
            &self.loaded.tokenizer,
            self.trie(ds)?,
            ds,
            &self.prompt,
            batch,
            beams,
            Some(&mut last),
        )?;
        self.with_details(&prompts, ranked)
    }

    /// The same ranking for dataset user `user` (dense id) from the check-ins before `before`
    /// (UTC seconds), whose local time is `at`: `recommend --beam-next`.
    pub fn rank_next_for_user(&self, ds: &Dataset, user: u32, before: i64, at: NaiveDateTime) -> Result<(Vec<u32>, serde_json::Value)> {
        let beams = self.beam_next.context("ranking by the next code needs --beam-next")?;
        let budget = self.next_checkin_budget(Self::codebook(ds)?);
        let prompt = user_next_checkin_prompt(ds, &self.prompt, &self.loaded.tokenizer, user, before, at, budget)?;
        let ranked = rank_next_codes(&self.loaded.model, self.trie(ds)?, std::slice::from_ref(&prompt), beams)?;
        Ok(self.with_details(&[prompt], ranked)?.remove(0))
    }

    fn codebook(ds: &Dataset) -> Result<&Codebook> {
        ds.codebook().context("--beam-next needs the dataset's codebook.json (preprocess writes it)")
    }

    /// The codebook's trie over this model's tokens, built at the first use.
    fn trie(&self, ds: &Dataset) -> Result<&CodeTrie> {
        let codebook = Self::codebook(ds)?;
        self.check_added_tokens(Some(codebook))?;
        if self.trie.get().is_none() {
            let _ = self.trie.set(CodeTrie::new(codebook, &self.loaded.tokenizer)?);
        }
        let trie = self.trie.get().expect("set above");
        anyhow::ensure!(trie.num_codes() == ds.num_pois(), "the code trie was built for another dataset");
        Ok(trie)
    }

    /// The k best POIs of each ranking, with its prompt and every kept code's score.
    fn with_details(&self, prompts: &[Vec<u32>], ranked: Vec<Ranking>) -> Result<Vec<(Vec<u32>, serde_json::Value)>> {
        prompts
            .iter()
            .zip(ranked)
            .map(|(prompt, codes)| {
                let ids = codes.iter().take(self.prompt.k).map(|&(p, _)| p).collect();
                let detail = json!({
                    "prompt": self.loaded.tokenizer.decode(prompt, false)?,
                    "prompt_tokens": prompt.len(),
                    "beam": codes.iter().map(|&(p, score)| json!([p, score])).collect::<Vec<_>>(),
                });
                Ok((ids, detail))
            })
            .collect()
    }

    fn next_checkin_budget(&self, codebook: &Codebook) -> usize {
        next_checkin_budget(&self.prompt, &self.loaded.model, codebook)
    }

    /// Answer-in-prompt on the prompts this recommender writes: the list prompt's sections, or
    /// with `--beam-next` whether the check-ins shown include the target.
    pub fn answer_in_prompt(&self, ds: &Dataset, split: crate::data::Split, limit: Option<usize>) -> Result<InPrompt> {
        match (self.beam_next, ds.codebook()) {
            (Some(_), Some(cb)) => {
                answer_in_history_prompt(ds, split, &self.prompt, &self.loaded.tokenizer, self.next_checkin_budget(cb), limit)
            }
            _ => answer_in_prompt(ds, split, &PromptBuilder::new(self.prompt.clone(), &self.loaded.tokenizer)?, limit),
        }
    }

    fn grammar(&self, num_pois: usize, codebook: Option<&Codebook>) -> Result<Option<&AnswerConstraint>> {
        if !self.constrained {
            return Ok(None);
        }
        if self.grammar.get().is_none() {
            let built = AnswerConstraint::new(&self.loaded.tokenizer, self.prompt.k, num_pois, codebook)?;
            let _ = self.grammar.set((num_pois, built));
        }
        let (n, grammar) = self.grammar.get().expect("set above");
        anyhow::ensure!(*n == num_pois, "the answer grammar was built for {n} POIs, not {num_pois}");
        Ok(Some(grammar))
    }

    /// Greedy answers for `contexts`: the raw completion, the parsed answer, and the prompt.
    pub fn answer(&self, contexts: &[PromptContext], num_pois: usize) -> Result<Vec<LlmAnswer>> {
        let builder = PromptBuilder::new(self.prompt.clone(), &self.loaded.tokenizer)?;
        let naming = AnswerIds::new(self.prompt.ids, contexts.first().and_then(|c| c.codebook))?;
        self.check_added_tokens(naming.codebook())?;
        let prompts = contexts.iter().map(|c| builder.build(c)).collect::<Result<Vec<_>>>()?;
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let cfg = SamplingConfig { stop: vec![ANSWER_CLOSE.to_string()], ..SamplingConfig::greedy(self.max_new_tokens) };
        let seeds: Vec<u64> = (0..ids.len() as u64).collect();
        let grammar = self.grammar(num_pois, naming.codebook())?;
        let out = generate_constrained(&self.loaded.model, &self.loaded.tokenizer, &ids, &seeds, 1, &cfg, Mode::INFERENCE, grammar)?;
        Ok(prompts
            .into_iter()
            .zip(out)
            .map(|(prompt, mut completions)| {
                let completion = completions.remove(0);
                let parsed = naming.parse(&completion.text, num_pois);
                LlmAnswer {
                    prompt_text: prompt.text,
                    prompt_tokens: prompt.ids.len(),
                    completion_tokens: completion.tokens.len(),
                    completion: completion.text,
                    parsed,
                }
            })
            .collect())
    }
}

pub struct LlmAnswer {
    pub prompt_text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub completion: String,
    pub parsed: crate::answer::ParsedAnswer,
}

impl Recommender for LlmRecommender {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn predict(&mut self, ds: &Dataset, batch: &[&Instance]) -> Result<Vec<Prediction>> {
        if let Some(beams) = self.beam_next {
            let ranked = self.rank_next(ds, batch, beams)?;
            self.details = ranked.iter().map(|(_, d)| d.clone()).collect();
            return Ok(ranked.into_iter().map(|(ids, _)| Prediction::List { ids, valid: true }).collect());
        }
        if self.stats.is_none() {
            self.stats = candidate_stats(&self.prompt, ds);
        }
        let stats = self.stats.as_ref();
        let contexts: Vec<PromptContext> = batch.iter().map(|inst| PromptContext::from_instance_with(ds, inst, stats)).collect();
        let answers = self.answer(&contexts, ds.num_pois())?;
        self.details.clear();
        Ok(answers
            .into_iter()
            .map(|a| {
                // A list the parser could not read at all is a miss and counts as invalid.
                let valid = !a.parsed.ids.is_empty();
                self.details.push(json!({
                    "prompt": a.prompt_text,
                    "prompt_tokens": a.prompt_tokens,
                    "completion_tokens": a.completion_tokens,
                    "completion": a.completion,
                    "parsed": a.parsed,
                }));
                Prediction::List { ids: a.parsed.ids, valid }
            })
            .collect())
    }

    fn take_details(&mut self) -> Vec<serde_json::Value> {
        std::mem::take(&mut self.details)
    }
}
