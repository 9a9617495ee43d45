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
//! process (set `grad_accum` to a multiple of the rank count, or some ranks idle). Short
//! neighbouring windows train at the same time on the process's threads; their gradients are
//! added in micro-batch order, so the sums are those of one at a time, bit for bit.

pub mod config;
pub mod history;

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;
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

    /// The most tokens micro-batches of `batch_size` examples may hold together to train at the
    /// same time: a micro-batch of the longest window, so the peak memory stays that of the
    /// largest micro-batch alone. Prompt examples are built as they are drawn, with no such
    /// bound known: they run one at a time.
    fn concurrent_tokens(&self, batch_size: usize) -> usize {
        match self {
            SftExamples::Prompts(_) => 0,
            SftExamples::Histories(v) => batch_size * v.iter().map(|w| w.ids.len()).max().unwrap_or(0),
        }
    }

    /// The tokens of one epoch of whole-history windows; prompt examples are built as they are
    /// drawn, with no such count known.
    fn epoch_tokens(&self) -> Option<usize> {
        match self {
            SftExamples::Prompts(_) => None,
            SftExamples::Histories(v) => Some(v.iter().map(|w| w.ids.len()).sum()),
        }
    }

    /// What one epoch of whole-history windows holds (`, 1234 tokens with 567 targets`); prompt
    /// examples say nothing.
    fn epoch_size(&self) -> String {
        match self {
            SftExamples::Prompts(_) => String::new(),
            SftExamples::Histories(v) => {
                format!(
                    " ({} tokens with {} targets an epoch)",
                    self.epoch_tokens().unwrap_or(0),
                    v.iter().map(|w| w.targets.len()).sum::<usize>()
                )
            }
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
    /// Examples in one epoch, and their tokens when they are whole-history windows (prompt
    /// examples are built as they are drawn).
    pub epoch_examples: usize,
    pub epoch_tokens: Option<usize>,
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
    let concurrent_tokens = examples.concurrent_tokens(cfg.sft.batch_size);
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
        // The model reads each row up to its last scored token (padding within a micro-batch
        // is not counted).
        let flops: f64 = rows.iter().map(|r| loaded.model.config.training_flops(r.targets.last().map_or(0, |&t| t), r.scored())).sum();

        // Forward/backward per micro-batch (this rank's), short windows at the same time
        // ([`concurrent_groups`]); the loss is the mean over the step's answer tokens.
        let micros: Vec<(usize, &[ScoredSeq])> =
            rows.chunks(cfg.sft.batch_size).enumerate().filter(|&(micro, _)| dist.owns(micro)).collect();
        // Mid-step, only a lone process may abandon the step (ranks agree at step boundaries).
        let stop = || dist.size() == 1 && opts.stop.raised();
        let micro_grads = |micro: usize, chunk: &[ScoredSeq]| -> Result<(f64, GradStore)> {
            let mode = Mode::TRAIN.with_dropout(derive_seed(t.seed, SEED_DROPOUT, step * 1_000_003 + micro as u64));
            let logp = scored_logprobs(&loaded.model, chunk, mode)?;
            let loss = (logp.sum_all()?.neg()? / answer_tokens as f64)?;
            Ok((loss.to_scalar::<f32>()? as f64, loss.backward()?))
        };
        let Some((loss_sum, mut grads)) = step_micro_batches(&micros, concurrent_tokens, opt.params(), stop, micro_grads)? else {
            cadence.interrupt();
            break;
        };
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
            "gflop": flops / 1e9,
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
        epoch_examples: examples.len(),
        epoch_tokens: examples.epoch_tokens(),
    })
}

/// Runs one step's micro-batches (their indices and rows) through `grads`, which gives each
/// one's loss and gradients: several at the same time where together they hold at most `cap`
/// tokens ([`concurrent_groups`], within spans of [`GROUPING_SPAN`] neighbours), their losses
/// and gradients added in micro-batch order, so the sums are those of one at a time, bit for
/// bit. Returns the loss sum and the summed gradients of `params`, or None when `stop` asks to
/// abandon the step (asked between groups).
fn step_micro_batches(
    micros: &[(usize, &[ScoredSeq])],
    cap: usize,
    params: &[(String, Var)],
    stop: impl Fn() -> bool,
    grads: impl Fn(usize, &[ScoredSeq]) -> Result<(f64, GradStore)> + Sync,
) -> Result<Option<(f64, Vec<Tensor>)>> {
    // Outside a rayon pool (no command pool) the micro-batches would run on the global pool's
    // threads, whose stacks are too small for candle's recursive graph walk: one at a time.
    let cap = if rayon::current_thread_index().is_some() { cap } else { 0 };
    let mut accum = GradAccum::new(params.len());
    let mut loss_sum = 0f64;
    for span in micros.chunks(GROUPING_SPAN) {
        let tokens: Vec<usize> = span.iter().map(|(_, rows)| rows.len() * rows.iter().map(|r| r.ids.len()).max().unwrap_or(0)).collect();
        // Results wait here until every earlier micro-batch of the span has been added.
        let mut done: Vec<Option<(f64, GradStore)>> = span.iter().map(|_| None).collect();
        let mut next = 0;
        for group in concurrent_groups(&tokens, cap) {
            if stop() {
                return Ok(None);
            }
            let results: Vec<_> = group.par_iter().map(|&i| grads(span[i].0, span[i].1)).collect();
            for (i, result) in group.into_iter().zip(results) {
                done[i] = Some(result?);
            }
            while let Some((loss, g)) = done.get_mut(next).and_then(Option::take) {
                loss_sum += loss;
                accum.add(&g, params)?;
                next += 1;
            }
        }
        ensure!(next == span.len(), "{} of a span's {} micro-batches ran", next, span.len());
    }
    Ok(Some((loss_sum, accum.take(params)?)))
}

/// Micro-batches grouped together at most: their gradients wait for each other to be added in
/// order (a few adapters' worth of memory).
const GROUPING_SPAN: usize = 8;

/// Groups micro-batches (their token counts) that train at the same time, their micro-batches
/// spread over the threads, each group holding at most `cap` tokens (a longer one alone): the
/// longest first, each joining the first group it fits (first-fit decreasing). Each group lists
/// its micro-batches in order, and the groups come in the order of their first, so that results
/// can be added as soon as those before them are (at cap 0, one at a time in order). One micro-batch
/// alone leaves a core idle while the other runs its serial parts (candle's graph walk,
/// element-wise ops); several at once fill it. Over an epoch of configs/nyc.toml's windows, 4
/// a step, this leaves 52% of the tokens alone, where grouping only neighbours left 61% (the
/// best grouping of each step: 50%).
fn concurrent_groups(tokens: &[usize], cap: usize) -> Vec<Vec<usize>> {
    let mut longest_first: Vec<usize> = (0..tokens.len()).collect();
    longest_first.sort_by_key(|&i| std::cmp::Reverse(tokens[i]));
    let mut groups: Vec<(Vec<usize>, usize)> = Vec::new();
    for i in longest_first {
        match groups.iter_mut().find(|(_, held)| held + tokens[i] <= cap) {
            Some((group, held)) => {
                group.push(i);
                *held += tokens[i];
            }
            None => groups.push((vec![i], tokens[i])),
        }
    }
    let mut groups: Vec<Vec<usize>> = groups.into_iter().map(|(group, _)| group).collect();
    for group in &mut groups {
        group.sort_unstable();
    }
    groups.sort_unstable_by_key(|group| group[0]);
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Checkin, Poi, Split, Trajectory, User};
    use crate::model::tiny::{tiny_config, write_tiny_model};
    use crate::model::{LoraConfig, ModelSource, load_on};

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

    #[test]
    fn longest_first_each_joins_the_first_group_it_fits() {
        // 1021 fills a group; 300, then 219 and 215 share the next.
        assert_eq!(concurrent_groups(&[215, 1021, 219, 300], 1021), [vec![0, 2, 3], vec![1]]);
        assert_eq!(concurrent_groups(&[331, 40, 172, 163], 1021), [vec![0, 1, 2, 3]]);
        // Exactly at the cap still fits; a later, shorter one goes back to an earlier group.
        assert_eq!(concurrent_groups(&[500, 521, 10, 20, 30], 1021), [vec![0, 1], vec![2, 3, 4]]);
        assert_eq!(concurrent_groups(&[600, 500, 421], 1021), [vec![0, 2], vec![1]]);
        // One longer than the cap runs alone.
        assert_eq!(concurrent_groups(&[10, 2000, 10], 1021), [vec![0, 2], vec![1]]);
        // Prompt examples (cap 0) run one at a time, in order.
        assert_eq!(concurrent_groups(&[3, 4, 2], 0), [vec![0], vec![1], vec![2]]);
        assert!(concurrent_groups(&[], 100).is_empty());
    }

    /// A step's micro-batches, run in groups at the same time on a 2-thread pool, give the loss
    /// sum and gradients of one at a time, bit for bit: with dropout on, windows long enough for
    /// several of the fused adapter's row blocks and backward chunks, in two groups that each
    /// skip a micro-batch. A raised stop abandons the step.
    #[test]
    fn micro_batches_at_the_same_time_give_the_same_sums() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &tiny_config("llama"), 5).unwrap();
        let mut loaded =
            load_on(&ModelSource::Folder(dir.path().to_path_buf()), &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
        loaded.model.attach_lora(&LoraConfig { dropout: 0.1, ..Default::default() }, 3).unwrap();
        // B starts at 0, which would leave A's gradients 0: give it values.
        for (i, (name, var)) in loaded.model.lora_vars().into_iter().enumerate() {
            if name.contains("lora_B") {
                var.set(&(Tensor::randn(0f32, 0.1, var.shape(), var.device()).unwrap() * (1.0 + i as f64 / 100.0)).unwrap()).unwrap();
            }
        }
        let model = &loaded.model;
        let params = model.lora_vars();
        let seq = |n: usize, salt: u32| ScoredSeq {
            ids: (0..n as u32).map(|i| 3 + (i * 7 + salt) % 250).collect(),
            targets: (1..n).step_by(3).collect(),
        };
        let rows = [seq(300, 1), seq(500, 4), seq(90, 3), seq(170, 2)];
        let micros: Vec<(usize, &[ScoredSeq])> = rows.chunks(1).enumerate().collect();
        let grads = |micro: usize, chunk: &[ScoredSeq]| -> Result<(f64, GradStore)> {
            let mode = Mode::TRAIN.with_dropout(derive_seed(9, SEED_DROPOUT, micro as u64));
            let loss = (scored_logprobs(model, chunk, mode)?.sum_all()?.neg()? / 100.0)?;
            Ok((loss.to_scalar::<f32>()? as f64, loss.backward()?))
        };
        let bits = |(loss, grads): (f64, Vec<Tensor>)| -> (f64, Vec<Vec<f32>>) {
            (loss, grads.iter().map(|g| g.flatten_all().unwrap().to_vec1().unwrap()).collect())
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let run = |cap| pool.install(|| bits(step_micro_batches(&micros, cap, &params, || false, grads).unwrap().unwrap()));
        // The first group's results wait for micro-batch 1, from the second group.
        assert_eq!(concurrent_groups(&[300, 500, 90, 170], 600), [vec![0, 3], vec![1, 2]]);
        let (one_at_a_time, together) = (run(0), run(600));
        assert!(one_at_a_time.1[0].iter().any(|&g| g != 0.0), "A's gradients are not all 0");
        assert!(one_at_a_time == together, "running micro-batches at the same time changed the sums");
        assert!(pool.install(|| step_micro_batches(&micros, 600, &params, || true, grads)).unwrap().is_none());
    }
}
