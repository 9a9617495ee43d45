//! Periodic validation during training: the model being trained answers a fixed val subset
//! (the sample `eval --limit N` uses) greedily, or ranks by the next code as `eval --beam-next
//! B` does, through the same harness as `eval` ([`crate::eval::evaluate`]), so the numbers in
//! `metrics.jsonl` are the numbers `eval --method llm --adapter DIR --limit N --split val`
//! (with `--beam-next B`) reports for that checkpoint. The only difference from
//! [`crate::llm_rec::LlmRecommender`] is that the model is borrowed, not owned.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

use crate::answer::{ANSWER_CLOSE, AnswerIds};
use crate::beam::{CodeTrie, rank_next_checkins};
use crate::constrain::AnswerConstraint;
use crate::data::{Dataset, Instance, Split};
use crate::eval::{EvalOptions, EvalReport, Prediction, Recommender, evaluate};
use crate::generate::{SamplingConfig, generate_constrained};
use crate::model::{CausalLm, Mode, TextTokenizer};
use crate::prompt::{PromptBuilder, PromptConfig, PromptContext, candidate_stats};
use crate::retrieval::TrainStats;

/// Returned (as the error) when a stop was requested during validation.
#[derive(Debug, thiserror::Error)]
#[error("validation interrupted")]
pub struct Interrupted;

struct BorrowedLlm<'a> {
    model: &'a CausalLm,
    tokenizer: &'a TextTokenizer,
    prompt: PromptConfig,
    max_new_tokens: usize,
    batch_size: usize,
    stop: Option<&'a AtomicBool>,
    stats: Option<TrainStats>,
    grammar: Option<AnswerConstraint>,
    /// Ranking by the next code: the codebook's trie and the beams.
    beam_next: Option<(CodeTrie, usize)>,
}

impl Recommender for BorrowedLlm<'_> {
    fn name(&self) -> String {
        "llm:training".to_string()
    }

    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn predict(&mut self, ds: &Dataset, batch: &[&Instance]) -> Result<Vec<Prediction>> {
        if self.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            bail!(Interrupted);
        }
        if let Some((trie, beams)) = &self.beam_next {
            let (_, ranked) = rank_next_checkins(self.model, self.tokenizer, trie, ds, &self.prompt, batch, *beams, None)?;
            let k = self.prompt.k;
            return Ok(ranked
                .into_iter()
                .map(|codes| Prediction::List { ids: codes.iter().take(k).map(|&(p, _)| p).collect(), valid: true })
                .collect());
        }
        let builder = PromptBuilder::new(self.prompt.clone(), self.tokenizer)?;
        let ids = batch
            .iter()
            .map(|inst| Ok(builder.build(&PromptContext::from_instance_with(ds, inst, self.stats.as_ref()))?.ids))
            .collect::<Result<Vec<_>>>()?;
        let cfg = SamplingConfig { stop: vec![ANSWER_CLOSE.to_string()], ..SamplingConfig::greedy(self.max_new_tokens) };
        let seeds: Vec<u64> = (0..ids.len() as u64).collect();
        let out = generate_constrained(self.model, self.tokenizer, &ids, &seeds, 1, &cfg, Mode::INFERENCE, self.grammar.as_ref())?;
        let naming = AnswerIds::new(self.prompt.ids, ds.codebook())?;
        Ok(out
            .into_iter()
            .map(|mut c| {
                let parsed = naming.parse(&c.remove(0).text, ds.num_pois());
                // As in `eval --method llm`: an answer with no readable id is invalid (a miss).
                let valid = !parsed.ids.is_empty();
                Prediction::List { ids: parsed.ids, valid }
            })
            .collect())
    }
}

/// How validation runs: the size of the fixed val sample, prompts decoded together, tokens
/// per answer, whether the answers are held to the answer grammar, and whether the model ranks
/// by the next code instead (with this many beams).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValSettings {
    pub instances: usize,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub constrained: bool,
    pub beam_next: Option<usize>,
}

impl ValSettings {
    pub fn from_train(t: &crate::train::schedule::TrainConfig) -> Self {
        ValSettings {
            instances: t.eval_instances,
            batch_size: t.eval_batch_size,
            max_new_tokens: t.eval_max_new_tokens,
            constrained: false,
            beam_next: None,
        }
    }
}

/// Greedy answers of `model` (adapter on) for the val sample of `settings.instances` instances,
/// scored by the eval harness. Fails with [`Interrupted`] when `stop` is raised between batches.
pub fn validate(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    ds: &Dataset,
    prompt: &PromptConfig,
    settings: ValSettings,
    stop: Option<&AtomicBool>,
) -> Result<EvalReport> {
    let ValSettings { instances, batch_size, max_new_tokens, constrained, beam_next } = settings;
    let stats = candidate_stats(prompt, ds);
    let grammar = if constrained {
        Some(AnswerConstraint::new(tokenizer, prompt.k, ds.num_pois(), AnswerIds::new(prompt.ids, ds.codebook())?.codebook())?)
    } else {
        None
    };
    let beam_next = match (beam_next, ds.codebook()) {
        (Some(beams), Some(codebook)) => {
            anyhow::ensure!(beams >= prompt.k, "ranking by the next code with {beams} beams keeps fewer codes than k = {}", prompt.k);
            Some((CodeTrie::new(codebook, tokenizer)?, beams))
        }
        (Some(_), None) => bail!("ranking by the next code needs the dataset's codebook.json (preprocess writes it)"),
        (None, _) => None,
    };
    let mut rec = BorrowedLlm { model, tokenizer, prompt: prompt.clone(), max_new_tokens, batch_size, stop, stats, grammar, beam_next };
    let opts = EvalOptions { batch_size: Some(batch_size), limit: Some(instances), quiet: true, ..Default::default() };
    Ok(evaluate(ds, Split::Val, &mut rec, &opts)?.0)
}

/// The line `metrics.jsonl` gets for a validation: step, the metrics (all / return /
/// discovery), invalid-answer rate, instances and seconds.
pub fn val_record(step: u64, report: &EvalReport) -> serde_json::Value {
    serde_json::json!({
        "step": step,
        "val": report.metrics,
        "val_invalid_rate": report.invalid_rate,
        "val_instances": report.instances,
        "val_elapsed_s": report.elapsed_s,
    })
}

/// The report's overall MRR (0 when the sample was empty).
pub fn mrr(report: &EvalReport) -> f64 {
    report.metrics.all.metrics.map_or(0.0, |m| m.mrr)
}
