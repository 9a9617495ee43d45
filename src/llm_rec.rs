//! A language model as a recommender: prompt each instance, decode greedily until
//! `</answer>`, parse the list. The eval harness ranks and scores its lists exactly like the
//! baselines' scores; this module only turns instances into answers.

use anyhow::Result;
use serde_json::json;

use crate::answer::{ANSWER_CLOSE, AnswerIds};
use crate::constrain::AnswerConstraint;
use crate::data::codebook::Codebook;
use crate::data::{Dataset, Instance};
use crate::eval::{Prediction, Recommender};
use crate::generate::{SamplingConfig, generate_constrained};
use crate::model::{LoadedModel, Mode};
use crate::prompt::{PromptBuilder, PromptConfig, PromptContext, candidate_stats};
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
        })
    }

    /// Holds every answer to the answer grammar ([`crate::constrain`]) when `on`.
    pub fn constrained(mut self, on: bool) -> Result<Self> {
        anyhow::ensure!(!(on && self.prompt.reasoning), "constrained decoding needs reasoning = false: the grammar has no <think> part");
        self.constrained = on;
        Ok(self)
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
        if let Some(wanted) = crate::prompt::added_tokens(&self.prompt, naming.codebook())? {
            let added = self.loaded.model.new_tokens.as_ref().map(|t| &t.names);
            anyhow::ensure!(
                added == Some(&wanted),
                "semantic ids need an adapter trained with this dataset's codebook (and the time tokens when prompt.time_tokens): \
                 it adds {} tokens; this model has {}",
                wanted.len(),
                added.map_or("none".to_string(), |n| format!("{} other tokens", n.len()))
            );
        }
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
