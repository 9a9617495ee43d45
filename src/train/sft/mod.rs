//! The SFT warm-up: LoRA fine-tuning on (prompt, target answer) pairs from the train split, the
//! loss on the answer tokens only, so the model learns the answer format before GRPO.
//!
//! An example is the instance's prompt ([`crate::prompt`], chat-templated, ending with the
//! assistant turn's opener) followed by the answer ([`crate::answer::format_answer`]) and the model's
//! end-of-turn token. Its target list is the ground truth alone, or a k-list with the ground
//! truth first ([`AnswerForm`]). The loss is the mean negative log-likelihood over all answer
//! tokens of an optimizer step (every micro-batch of it), prompts left-padded and masked.
//!
//! The loop ([`run`]) reads top to bottom: open the run directory, load the model and the
//! adapter, restore the last checkpoint when resuming, then for each optimizer step: gather
//! its examples, forward/backward each micro-batch, clip, step, log; validate and checkpoint
//! on their cadence. Examples come in a seeded permutation per epoch and dropout masks are
//! seeded by (seed, step, micro-batch), so a resumed run repeats an uninterrupted one exactly.
//! With several ranks, rank r runs micro-batches r, r + N, ... of each step and the gradients
//! are summed over ranks before clipping: the same micro-batches, dropout masks and loss as one
//! process (set `grad_accum` to a multiple of the rank count, or some ranks idle).

pub mod config;
pub mod history;

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::json;

use crate::answer::AnswerIds;
use crate::data::{Dataset, Instance};
use crate::model::{Mode, TextTokenizer};
use crate::prompt::{PromptBuilder, PromptConfig, PromptContext, candidate_stats};
use crate::retrieval::TrainStats;
use crate::seed::{SEED_DROPOUT, derive_seed};
use crate::train::config::{RunConfig, Stage};
use crate::train::optim::{AdamW, AdamWParams, GradAccum, clip_grad_norm};
use crate::train::schedule::lr_at;
use crate::train::{
    EpochOrder, RunOptions, ScoredSeq, StageLoop, StageStart, StageSummary, load_model, progress_bar, scored_logprobs, train_instances,
};
use crate::visits::{count_visits, hour_first_order};
use config::{AnswerForm, Examples};

const STAGE: Stage = Stage::Sft;

/// The target list of an instance's answer. The list form puts the ground truth first, then
/// the user's other visited POIs in the order the prompt's lists show them (around the hour
/// first when `prompt.hour_visits` is on, then by visits: [`crate::visits`]), then popular POIs.
pub fn target_ids(ds: &Dataset, inst: &Instance, form: AnswerForm, prompt: &PromptConfig, popular: &[u32]) -> Vec<u32> {
    let (target, k) = (inst.target.poi, prompt.k);
    match form {
        AnswerForm::Single => vec![target],
        AnswerForm::List => {
            let visits = count_visits(ds.history(inst), ds.pois(), inst.target.local_time(), prompt.hour_window_min);
            let visited = if prompt.shows_hour_list() { hour_first_order(&visits) } else { visits.iter().map(|v| v.poi).collect() };
            let mut out = vec![target];
            out.extend(visited.into_iter().filter(|&p| p != target).take(k.saturating_sub(1)));
            for &p in popular {
                if out.len() >= k {
                    break;
                }
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            out.truncate(k.max(1));
            out
        }
    }
}

/// POI ids by train popularity (most visited first, ties by id).
pub fn popularity_order(ds: &Dataset) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..ds.num_pois() as u32).collect();
    let pois = ds.pois();
    ids.sort_by(|a, b| pois[*b as usize].train_visits.cmp(&pois[*a as usize].train_visits).then(a.cmp(b)));
    ids
}

/// The token that ends the assistant's turn (`<|im_end|>` for ChatML models).
pub fn end_of_turn(tokenizer: &TextTokenizer) -> Result<u32> {
    tokenizer
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_id(t))
        .or_else(|| tokenizer.eos_ids.first().copied())
        .context("the model's tokenizer has no end-of-sequence token")
}

/// Builds training examples: prompt ids, then the answer's ids and the end-of-turn token (scored).
pub struct ExampleBuilder<'a> {
    ds: &'a Dataset,
    prompts: PromptBuilder<'a>,
    tokenizer: &'a TextTokenizer,
    form: AnswerForm,
    naming: AnswerIds<'a>,
    eot: u32,
    popular: Vec<u32>,
    /// The candidate lists' statistics (when the prompt asks for them).
    stats: Option<TrainStats>,
}

impl<'a> ExampleBuilder<'a> {
    pub fn new(ds: &'a Dataset, cfg: &RunConfig, tokenizer: &'a TextTokenizer) -> Result<Self> {
        ensure!(!cfg.prompt.reasoning, "sft-warmup has no reasoning to teach: set prompt.reasoning = false");
        Ok(ExampleBuilder {
            ds,
            prompts: PromptBuilder::new(cfg.prompt.clone(), tokenizer)?,
            tokenizer,
            form: cfg.sft.answer,
            naming: AnswerIds::new(cfg.prompt.ids, ds.codebook())?,
            eot: end_of_turn(tokenizer)?,
            popular: popularity_order(ds),
            stats: candidate_stats(&cfg.prompt, ds),
        })
    }

    pub fn answer_text(&self, inst: &Instance) -> String {
        self.naming.format(&target_ids(self.ds, inst, self.form, self.prompts.config(), &self.popular), None)
    }

    pub fn build(&self, inst: &Instance) -> Result<ScoredSeq> {
        let prompt = self.prompts.build(&PromptContext::from_instance_with(self.ds, inst, self.stats.as_ref()))?;
        let mut ids = prompt.ids;
        let score_from = ids.len();
        ids.extend(self.tokenizer.encode(&self.answer_text(inst), false)?);
        ids.push(self.eot);
        Ok(ScoredSeq::answer(ids, score_from))
    }
}

/// A run's examples, in a fixed order that [`EpochOrder`] permutes.
enum SftExamples<'d> {
    Prompts(Vec<&'d Instance>),
    Histories(Vec<ScoredSeq>),
}

impl SftExamples<'_> {
    fn len(&self) -> usize {
        match self {
            SftExamples::Prompts(v) => v.len(),
            SftExamples::Histories(v) => v.len(),
        }
    }

    /// What one epoch of whole-history windows holds (`, 1234 tokens with 567 targets`); prompt
    /// examples are built as they are drawn, so they say nothing.
    fn epoch_size(&self) -> String {
        match self {
            SftExamples::Prompts(_) => String::new(),
            SftExamples::Histories(v) => format!(
                " ({} tokens with {} targets an epoch)",
                v.iter().map(|w| w.ids.len()).sum::<usize>(),
                v.iter().map(|w| w.targets.len()).sum::<usize>()
            ),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SftSummary {
    #[serde(flatten)]
    pub stage: StageSummary,
    /// Loss of the first and the last step of this invocation.
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    /// Training throughput over the whole run (tokens through forward + backward per second).
    pub tokens_per_s: f64,
}

/// Runs (or resumes) the warm-up described by `cfg`.
pub fn run(cfg: &RunConfig, opts: &RunOptions) -> Result<SftSummary> {
    let t = &cfg.sft.train;
    let StageStart { lock: _lock, run, latest, config_hash, ds } = StageStart::open(cfg, STAGE, opts, || Ok(()))?;
    let root = run.root.clone();
    let mut loaded = load_model(cfg, &ds, cfg.model.adapter.as_deref(), "model.adapter", t.seed)?;
    let builder = ExampleBuilder::new(&ds, cfg, &loaded.tokenizer)?;
    let examples = match cfg.sft.examples {
        Examples::Prompts => SftExamples::Prompts(train_instances(&ds, cfg, t.seed)?),
        Examples::Histories => {
            ensure!(cfg.data.train_instances == 0, "data.train_instances subsets prompt examples; histories cover every user");
            SftExamples::Histories(history::history_examples(&ds, &cfg.prompt, &loaded.tokenizer, cfg.sft.history_tokens)?)
        }
    };
    let total = t.total_steps(examples.len(), cfg.sft.examples_per_step()) as u64;
    let mut opt = AdamW::new(loaded.model.lora_vars(), AdamWParams::from_train(t))?;
    let dist = &opts.dist;
    let (mut state, mut log) =
        run.restore_or_start(dist.is_writer(), latest.as_deref(), &mut loaded.model, &mut opt, STAGE, t.seed, total, &config_hash)?;
    if !opts.quiet {
        let from = latest.as_ref().map_or("a fresh adapter".to_string(), |d| d.display().to_string());
        eprintln!(
            "sft-warmup: {} examples{}, {} steps of {} x {} examples, from {from}; writing {}",
            examples.len(),
            examples.epoch_size(),
            total,
            cfg.sft.batch_size,
            cfg.sft.grad_accum,
            root.display()
        );
    }

    let base = loaded.adapter_base();
    let bar = progress_bar(total, state.step, opts.quiet, "sft");
    let mut cadence = StageLoop::new(&run, t, base, total, state.step, latest.clone(), opts);
    cadence.val.beam_next = cfg.next_code_beams(STAGE);
    let (mut first_loss, mut last_loss) = (None, None);
    let mut order = EpochOrder::new(t.seed, examples.len());
    let n = examples.len() as u64;
    let per_step = cfg.sft.examples_per_step() as u64;

    while state.step < total {
        if cadence.stop_before(&opts.stop, state.step)? {
            break;
        }
        let step = state.step;
        let started = Instant::now();
        let lr = lr_at(t, step as usize, total as usize);

        // This step's examples: the next ones in the epoch's seeded order.
        let mut rows = Vec::with_capacity(per_step as usize);
        for g in state.examples_seen..state.examples_seen + per_step {
            rows.push(match &examples {
                SftExamples::Prompts(insts) => builder.build(insts[order.example(g)])?,
                SftExamples::Histories(seqs) => seqs[order.example(g)].clone(),
            });
        }
        let answer_tokens: usize = rows.iter().map(ScoredSeq::scored).sum();
        let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();

        // Forward/backward per micro-batch (this rank's); the loss is the mean over the step's
        // answer tokens.
        let mut accum = GradAccum::new(opt.params().len());
        let mut loss_sum = 0f64;
        let mut abandoned = false;
        for (micro, chunk) in rows.chunks(cfg.sft.batch_size).enumerate() {
            if !dist.owns(micro) {
                continue;
            }
            // Mid-step, only a lone process may abandon the step (ranks agree at step boundaries).
            if dist.size() == 1 && opts.stop.raised() {
                abandoned = true;
                break;
            }
            let mode = Mode::TRAIN.with_dropout(derive_seed(t.seed, SEED_DROPOUT, step * 1_000_003 + micro as u64));
            let logp = scored_logprobs(&loaded.model, chunk, mode)?;
            let loss = (logp.sum_all()?.neg()? / answer_tokens as f64)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            accum.add(&loss.backward()?, opt.params())?;
        }
        if abandoned {
            cadence.interrupt();
            break;
        }
        let mut grads = accum.take(opt.params())?;
        let allreduce_s = dist.sum_tensors(&mut grads)?;
        let mut summed = [loss_sum];
        dist.sum_f64(&mut summed)?;
        let loss_sum = summed[0];
        let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
        let finite = loss_sum.is_finite() && grad_norm.is_finite();
        if finite {
            opt.step(&grads, lr)?;
        }
        let step_s = started.elapsed().as_secs_f64();

        state.step += 1;
        state.examples_seen += per_step;
        state.tokens_seen += tokens as u64;
        state.elapsed_s += step_s;
        first_loss.get_or_insert(loss_sum);
        last_loss = Some(loss_sum);
        let tps = tokens as f64 / step_s;
        log.log(&json!({
            "step": state.step,
            "epoch": state.examples_seen as f64 / n as f64,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "answer_tokens": answer_tokens,
            "tokens_per_s": tps,
            "step_s": step_s,
            "allreduce_s": allreduce_s,
            "ranks": dist.size(),
            "elapsed_s": state.elapsed_s,
            "skipped_nonfinite": !finite,
        }))?;
        cadence.record_finite(finite, &mut state)?;
        bar.set_position(state.step);
        bar.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tps:.0} tok/s"));

        cadence.end_step(&loaded, &opt, &ds, &cfg.prompt, &opts.stop, &mut state, &mut log, &bar, &format!("loss {loss_sum:.4}"))?;
    }
    let stage = cadence.finish(&loaded.model, &opt, &state)?;
    bar.finish_and_clear();
    Ok(SftSummary {
        stage,
        first_loss,
        last_loss,
        tokens_per_s: if state.elapsed_s > 0.0 { state.tokens_seen as f64 / state.elapsed_s } else { 0.0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Checkin, Poi, Split, Trajectory, User};

    /// One user: a train trajectory POI 1 at 08:00 and 09:00, POI 2 at 18:00 (day 0); a test
    /// trajectory POI 3 at 18:00 on day 3, then the target POI 0 at 18:30. No train popularity.
    fn dataset() -> Dataset {
        let at = |poi, day: i64, h: i64, m: i64| Checkin { poi, utc: 1_333_324_800 + day * 86_400 + h * 3600 + m * 60, tz_offset_min: 0 };
        let checkins = vec![at(1, 0, 8, 0), at(1, 0, 9, 0), at(2, 0, 18, 0), at(3, 3, 18, 0), at(0, 3, 18, 30)];
        let pois =
            (0..5).map(|id| Poi { id, venue_id: format!("v{id}"), category: "c".into(), lat: 0.0, lon: 0.0, train_visits: 0 }).collect();
        let trajectories = vec![
            Trajectory { id: 0, user: 0, split: Split::Train, start: 0, len: 3 },
            Trajectory { id: 1, user: 0, split: Split::Test, start: 3, len: 2 },
        ];
        let inst = Instance {
            id: 0,
            split: Split::Test,
            user: 0,
            trajectory: 1,
            target: checkins[4],
            prefix: vec![checkins[3]],
            is_return: false,
        };
        let users = vec![User { id: 0, source_id: "u0".into() }];
        Dataset::new(pois, users, checkins, trajectories, [vec![], vec![], vec![inst]]).unwrap()
    }

    #[test]
    fn list_answers_follow_the_prompts_order() {
        let ds = dataset();
        let inst = &ds.instances(Split::Test)[0];
        let popular = popularity_order(&ds);
        let prompt = PromptConfig { k: 5, ..Default::default() };
        assert_eq!(target_ids(&ds, inst, AnswerForm::Single, &prompt, &popular), [0]);
        // Ground truth, then by visits (POI 1 twice; 2 and 3 once, by id), then popularity.
        assert_eq!(target_ids(&ds, inst, AnswerForm::List, &prompt, &popular), [0, 1, 2, 3, 4]);
        // With the around-the-hour list: POIs 2 and 3 were visited at 18:00, within the hour of
        // 18:30, so they come before POI 1.
        let hour = PromptConfig { hour_visits: 10, ..prompt.clone() };
        assert_eq!(target_ids(&ds, inst, AnswerForm::List, &hour, &popular), [0, 2, 3, 1, 4]);
        // An ablation that hides the list (no times) falls back to the order by visits.
        let no_times = PromptConfig { times: false, ..hour.clone() };
        assert_eq!(target_ids(&ds, inst, AnswerForm::List, &no_times, &popular), [0, 1, 2, 3, 4]);
        // k caps the list.
        let short = PromptConfig { k: 2, ..hour };
        assert_eq!(target_ids(&ds, inst, AnswerForm::List, &short, &popular), [0, 2]);
    }
}
