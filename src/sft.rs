//! The SFT warm-up: LoRA fine-tuning on (prompt, target answer) pairs from the train split, the
//! loss on the answer tokens only, so the model learns the answer format before GRPO.
//!
//! An example is the instance's prompt ([`crate::prompt`], chat-templated, ending with the
//! assistant turn's opener) followed by the answer ([`format_answer`]) and the model's
//! end-of-turn token. Its target list is the ground truth alone, or a k-list with the ground
//! truth first ([`AnswerForm`]). The loss is the mean negative log-likelihood over all answer
//! tokens of an optimizer step (every micro-batch of it), prompts left-padded and masked.
//!
//! The loop ([`run`]) reads top to bottom: open the run directory, load the model and the
//! adapter, restore the last checkpoint when resuming, then for each optimizer step: gather
//! its examples, forward/backward each micro-batch, clip, step, log; validate and checkpoint
//! on their cadence. Examples come in a seeded permutation per epoch and dropout masks are
//! seeded by (seed, step, micro-batch), so a resumed run repeats an uninterrupted one exactly.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;

use crate::answer::format_answer;
use crate::config::{AnswerForm, RunConfig};
use crate::data::{Dataset, Instance, Split};
use crate::model::{self, LoadedModel, Mode, TextTokenizer};
use crate::prompt::{PromptBuilder, PromptContext};
use crate::train::checkpoint::{fnv_hex, BestVal, MetricsLog, RunDir, TrainerState};
use crate::train::optim::{clip_grad_norm, lr_at, AdamW, AdamWParams, GradAccum};
use crate::train::{derive_seed, progress_bar, token_logprobs, val, ScoredSeq, StopFlag};

pub const STAGE: &str = "sft";

/// Keys of the derived seeds (see [`derive_seed`]).
const SEED_DATA: u64 = 1;
const SEED_SUBSET: u64 = 2;
const SEED_DROPOUT: u64 = 3;
const SEED_LORA_INIT: u64 = 4;

/// The target list of an instance's answer.
pub fn target_ids(ds: &Dataset, inst: &Instance, form: AnswerForm, k: usize, popular: &[u32]) -> Vec<u32> {
    let target = inst.target.poi;
    match form {
        AnswerForm::Single => vec![target],
        AnswerForm::List => {
            let mut out = vec![target];
            // The user's history by visit count, ties by train popularity, then id (the counter
            // baseline's order, and the prompt's most-visited list).
            let mut counts: HashMap<u32, u64> = HashMap::new();
            for c in ds.history(inst) {
                *counts.entry(c.poi).or_default() += 1;
            }
            let pois = ds.pois();
            let mut ranked: Vec<(u32, u64)> = counts.into_iter().filter(|&(p, _)| p != target).collect();
            ranked.sort_by(|a, b| {
                b.1.cmp(&a.1).then(pois[b.0 as usize].train_visits.cmp(&pois[a.0 as usize].train_visits)).then(a.0.cmp(&b.0))
            });
            out.extend(ranked.iter().map(|r| r.0).take(k.saturating_sub(1)));
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
    eot: u32,
    popular: Vec<u32>,
}

impl<'a> ExampleBuilder<'a> {
    pub fn new(ds: &'a Dataset, cfg: &RunConfig, tokenizer: &'a TextTokenizer) -> Result<Self> {
        ensure!(!cfg.prompt.reasoning, "sft-warmup has no reasoning to teach: set prompt.reasoning = false");
        Ok(ExampleBuilder {
            ds,
            prompts: PromptBuilder::new(cfg.prompt.clone(), tokenizer)?,
            tokenizer,
            form: cfg.sft.answer,
            eot: end_of_turn(tokenizer)?,
            popular: popularity_order(ds),
        })
    }

    pub fn answer_text(&self, inst: &Instance) -> String {
        format_answer(&target_ids(self.ds, inst, self.form, self.prompts.config().k, &self.popular), None)
    }

    pub fn build(&self, inst: &Instance) -> Result<ScoredSeq> {
        let prompt = self.prompts.build(&PromptContext::from_instance(self.ds, inst))?;
        let mut ids = prompt.ids;
        let score_from = ids.len();
        ids.extend(self.tokenizer.encode(&self.answer_text(inst), false)?);
        ids.push(self.eot);
        Ok(ScoredSeq { ids, score_from })
    }
}

/// How a run is driven (beyond its config).
#[derive(Debug, Clone, Default)]
pub struct SftOptions {
    /// Continue from the run directory's last checkpoint.
    pub resume: bool,
    pub quiet: bool,
    /// Stop after this many optimizer steps of this invocation (with a checkpoint); the run
    /// continues with `resume`.
    pub stop_after: Option<u64>,
    /// Raised by Ctrl-C: stop at the next micro-batch, checkpoint the last completed step.
    pub stop: StopFlag,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct SftSummary {
    /// The stage's run directory.
    pub dir: PathBuf,
    pub step: u64,
    pub total_steps: u64,
    /// All steps done (`final/` written).
    pub finished: bool,
    /// Stopped by the stop flag.
    pub interrupted: bool,
    /// The newest checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// Loss of the first and the last step of this invocation.
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub best: Option<BestVal>,
    /// Training throughput over the whole run (tokens through forward + backward per second).
    pub tokens_per_s: f64,
}

/// The training examples (instances) of a run: all train instances, or a seeded subset.
fn train_instances<'d>(ds: &'d Dataset, cfg: &RunConfig) -> Result<Vec<&'d Instance>> {
    let all = ds.instances(Split::Train);
    ensure!(!all.is_empty(), "{} has no train instances", cfg.data.dir.display());
    let n = cfg.data.train_instances;
    if n == 0 || n >= all.len() {
        return Ok(all.iter().collect());
    }
    let mut idx: Vec<usize> = (0..all.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(derive_seed(cfg.sft.train.seed, SEED_SUBSET, 0)));
    idx.truncate(n);
    idx.sort_unstable();
    Ok(idx.into_iter().map(|i| &all[i]).collect())
}

/// The seeded order of epoch `epoch` over `n` examples.
fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(derive_seed(seed, SEED_DATA, epoch)));
    order
}

/// Loads the model with the run's adapter: `model.adapter` (which must agree with `[lora]`) or
/// a fresh one; the run's LoRA dropout either way.
pub fn load_model(cfg: &RunConfig) -> Result<LoadedModel> {
    let mut loaded = model::load(&cfg.model.path)?;
    match &cfg.model.adapter {
        Some(dir) => {
            loaded.model.load_adapter(dir)?;
            let got = loaded.model.lora_config.clone().context("adapter did not load")?;
            let same_targets = got.target_modules()? == cfg.lora.target_modules()?;
            ensure!(
                got.r == cfg.lora.r && got.alpha == cfg.lora.alpha && same_targets,
                "model.adapter {} has r = {}, alpha = {}, targets {:?}, but [lora] says r = {}, alpha = {}, targets {:?}: make them agree",
                dir.display(),
                got.r,
                got.alpha,
                got.targets,
                cfg.lora.r,
                cfg.lora.alpha,
                cfg.lora.targets
            );
        }
        None => loaded.model.attach_lora(&cfg.lora, derive_seed(cfg.sft.train.seed, SEED_LORA_INIT, 0))?,
    }
    loaded.model.set_lora_dropout(cfg.lora.dropout);
    Ok(loaded)
}

/// Runs (or resumes) the warm-up described by `cfg`.
pub fn run(cfg: &RunConfig, opts: &SftOptions) -> Result<SftSummary> {
    cfg.validate()?;
    let t = &cfg.sft.train;
    let config_toml = cfg.to_toml()?;
    let config_hash = fnv_hex(&config_toml);
    let root = cfg.stage_dir(STAGE);
    let (run, latest) = if opts.resume {
        RunDir::open_for_resume(&root, &config_toml)?
    } else {
        (RunDir::create(&root, &config_toml)?, None)
    };

    let ds = Dataset::load(&cfg.data.dir).with_context(|| format!("cannot load the dataset in {}", cfg.data.dir.display()))?;
    let examples = train_instances(&ds, cfg)?;
    let mut loaded = load_model(cfg)?;
    let builder = ExampleBuilder::new(&ds, cfg, &loaded.tokenizer)?;
    let total = t.total_steps(examples.len()) as u64;
    let mut opt = AdamW::new(loaded.model.lora_vars(), AdamWParams::from_train(t))?;
    let (mut state, mut log) = match &latest {
        Some(dir) => {
            let state = RunDir::load_checkpoint(dir, &mut loaded.model, &mut opt, STAGE, &config_hash)?;
            ensure!(state.total_steps == total, "checkpoint {} plans {} steps, this config {total}", dir.display(), state.total_steps);
            let log = MetricsLog::resume(&run.metrics(), state.step)?;
            (state, log)
        }
        None => (TrainerState::new(STAGE, t.seed, total, config_hash.clone()), MetricsLog::create(&run.metrics())?),
    };
    if !opts.quiet {
        let from = latest.as_ref().map_or("a fresh adapter".to_string(), |d| d.display().to_string());
        eprintln!(
            "sft-warmup: {} examples, {} steps of {} x {} examples, from {from}; writing {}",
            examples.len(),
            total,
            t.batch_size,
            t.grad_accum,
            root.display()
        );
    }

    let base = loaded.source.clone();
    let bar = progress_bar(total, state.step, opts.quiet, "sft");
    let stop_at = opts.stop_after.map(|n| state.step + n);
    let mut saved_at = latest.as_ref().map(|_| state.step);
    let mut checkpoint = latest.clone();
    let (mut first_loss, mut last_loss) = (None, None);
    let mut interrupted = false;
    let mut order: Option<(u64, Vec<usize>)> = None;
    let n = examples.len() as u64;
    let per_step = t.examples_per_step() as u64;

    while state.step < total {
        if opts.stop.raised() || stop_at.is_some_and(|s| state.step >= s) {
            interrupted = opts.stop.raised();
            break;
        }
        let step = state.step;
        let started = Instant::now();
        let lr = lr_at(t, step as usize, total as usize);

        // This step's examples: the next ones in the epoch's seeded order.
        let mut rows = Vec::with_capacity(per_step as usize);
        for g in state.examples_seen..state.examples_seen + per_step {
            let epoch = g / n;
            if order.as_ref().is_none_or(|o| o.0 != epoch) {
                order = Some((epoch, epoch_order(t.seed, epoch, examples.len())));
            }
            let idx = order.as_ref().map(|o| o.1[(g % n) as usize]).unwrap_or_default();
            rows.push(builder.build(examples[idx])?);
        }
        let answer_tokens: usize = rows.iter().map(ScoredSeq::scored).sum();
        let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();

        // Forward/backward per micro-batch; the loss is the mean over the step's answer tokens.
        let mut accum = GradAccum::new(opt.params().len());
        let mut loss_sum = 0f64;
        let mut abandoned = false;
        for (micro, chunk) in rows.chunks(t.batch_size).enumerate() {
            if opts.stop.raised() {
                abandoned = true;
                break;
            }
            let mode = Mode::TRAIN.with_dropout(derive_seed(t.seed, SEED_DROPOUT, step * 1_000_003 + micro as u64));
            let logp = token_logprobs(&loaded.model, chunk, mode)?;
            let loss = (logp.sum_all()?.neg()? / answer_tokens as f64)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            accum.add(&loss.backward()?, opt.params())?;
        }
        if abandoned {
            interrupted = true;
            break;
        }
        let mut grads = accum.take(opt.params())?;
        let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm).with_context(|| format!("step {}", step + 1))?;
        opt.step(&grads, lr)?;
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
            "elapsed_s": state.elapsed_s,
        }))?;
        bar.set_position(state.step);
        bar.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tps:.0} tok/s"));

        let last = state.step == total;
        if t.eval_every > 0 && (state.step % t.eval_every as u64 == 0 || last) {
            bar.set_message(format!("loss {loss_sum:.4}, validating on {} val instances", t.eval_instances));
            let report = match val::validate(&loaded.model, &loaded.tokenizer, &ds, &cfg.prompt, val::ValSettings::from_train(t), Some(&opts.stop.0)) {
                Ok(r) => Some(r),
                Err(e) if e.is::<val::Interrupted>() => None,
                Err(e) => return Err(e.context(format!("validation at step {}", state.step))),
            };
            if let Some(report) = report {
                let record = val::val_record(state.step, &report);
                log.log(&record)?;
                let mrr = val::mrr(&report);
                let m = report.metrics.all.metrics.unwrap_or_default();
                bar.println(format!(
                    "step {}: val MRR {mrr:.4}, Acc@1 {:.4}, Acc@5 {:.4}, Acc@10 {:.4}, invalid {:.1}% ({} instances)",
                    state.step,
                    m.acc1,
                    m.acc5,
                    m.acc10,
                    100.0 * report.invalid_rate.unwrap_or(0.0),
                    report.instances
                ));
                if state.best.is_none_or(|b| mrr > b.mrr) {
                    state.best = Some(BestVal { step: state.step, mrr });
                    run.save_adapter_copy("best", &loaded.model, &base, &record)?;
                }
            }
        }
        let save_due = t.save_every > 0 && state.step % t.save_every as u64 == 0;
        let stopping = opts.stop.raised() || stop_at.is_some_and(|s| state.step >= s);
        if save_due || last || stopping {
            checkpoint = Some(run.save_checkpoint(&loaded.model, &base, &opt, &state, t.keep_checkpoints)?);
            saved_at = Some(state.step);
        }
    }
    if saved_at != Some(state.step) {
        checkpoint = Some(run.save_checkpoint(&loaded.model, &base, &opt, &state, t.keep_checkpoints)?);
    }
    let finished = state.step == total;
    if finished {
        run.save_adapter_copy("final", &loaded.model, &base, &json!({"step": state.step, "best": state.best}))?;
    }
    bar.finish_and_clear();
    if !finished && !interrupted && stop_at.is_none() {
        bail!("training stopped early at step {} of {total}", state.step);
    }
    Ok(SftSummary {
        dir: root,
        step: state.step,
        total_steps: total,
        finished,
        interrupted,
        checkpoint,
        first_loss,
        last_loss,
        best: state.best,
        tokens_per_s: if state.elapsed_s > 0.0 { state.tokens_seen as f64 / state.elapsed_s } else { 0.0 },
    })
}
