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

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::answer::format_answer;
use crate::config::{AnswerForm, RunConfig};
use crate::data::{Dataset, Instance};
use crate::model::{Mode, TextTokenizer};
use crate::prompt::{PromptBuilder, PromptContext};
use crate::train::checkpoint::{fnv_hex, BestVal, RunDir};
use crate::train::optim::{clip_grad_norm, lr_at, AdamW, AdamWParams, GradAccum};
use crate::train::{derive_seed, load_model, progress_bar, token_logprobs, train_instances, validate_and_keep_best, EpochOrder, RunOptions, ScoredSeq, StageLoop, SEED_DROPOUT};

pub const STAGE: &str = "sft";


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

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SftSummary {
    /// The stage's run directory.
    #[serde(rename = "run_dir")]
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

/// Runs (or resumes) the warm-up described by `cfg`.
pub fn run(cfg: &RunConfig, opts: &RunOptions) -> Result<SftSummary> {
    cfg.validate()?;
    let t = &cfg.sft.train;
    let config_toml = cfg.stage_toml(STAGE)?;
    let config_hash = fnv_hex(&config_toml);
    let root = cfg.stage_dir(STAGE);
    let (run, latest) = if opts.resume {
        RunDir::open_for_resume(&root, &config_toml)?
    } else {
        (RunDir::create(&root, &config_toml)?, None)
    };

    let ds = Dataset::load(&cfg.data.dir).with_context(|| format!("cannot load the dataset in {}", cfg.data.dir.display()))?;
    let examples = train_instances(&ds, cfg, t.seed)?;
    let mut loaded = load_model(cfg, cfg.model.adapter.as_deref(), "model.adapter", t.seed)?;
    let builder = ExampleBuilder::new(&ds, cfg, &loaded.tokenizer)?;
    let total = t.total_steps(examples.len(), cfg.sft.examples_per_step()) as u64;
    let mut opt = AdamW::new(loaded.model.lora_vars(), AdamWParams::from_train(t))?;
    let (mut state, mut log) = run.restore_or_start(latest.as_deref(), &mut loaded.model, &mut opt, STAGE, t.seed, total, &config_hash)?;
    if !opts.quiet {
        let from = latest.as_ref().map_or("a fresh adapter".to_string(), |d| d.display().to_string());
        eprintln!(
            "sft-warmup: {} examples, {} steps of {} x {} examples, from {from}; writing {}",
            examples.len(),
            total,
            cfg.sft.batch_size,
            cfg.sft.grad_accum,
            root.display()
        );
    }

    let base = loaded.source.clone();
    let bar = progress_bar(total, state.step, opts.quiet, "sft");
    let mut cadence = StageLoop::new(&run, t, base, total, state.step, latest.clone(), opts.stop_after);
    let (mut first_loss, mut last_loss) = (None, None);
    let mut interrupted = false;
    let mut order = EpochOrder::new(t.seed, examples.len());
    let n = examples.len() as u64;
    let per_step = cfg.sft.examples_per_step() as u64;

    while state.step < total {
        if cadence.stopping(&opts.stop, state.step) {
            interrupted = opts.stop.raised();
            break;
        }
        let step = state.step;
        let started = Instant::now();
        let lr = lr_at(t, step as usize, total as usize);

        // This step's examples: the next ones in the epoch's seeded order.
        let mut rows = Vec::with_capacity(per_step as usize);
        for g in state.examples_seen..state.examples_seen + per_step {
            rows.push(builder.build(examples[order.example(g)])?);
        }
        let answer_tokens: usize = rows.iter().map(ScoredSeq::scored).sum();
        let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();

        // Forward/backward per micro-batch; the loss is the mean over the step's answer tokens.
        let mut accum = GradAccum::new(opt.params().len());
        let mut loss_sum = 0f64;
        let mut abandoned = false;
        for (micro, chunk) in rows.chunks(cfg.sft.batch_size).enumerate() {
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

        if cadence.val_due(state.step) {
            bar.set_message(format!("loss {loss_sum:.4}, validating on {} val instances", t.eval_instances));
            validate_and_keep_best(&loaded, &ds, &cfg.prompt, t, &opts.stop, &mut state, &run, &mut log, &bar)?;
        }
        cadence.after_step(&loaded.model, &opt, &state, &opts.stop)?;
    }
    let finished = cadence.finish(&loaded.model, &opt, &state, interrupted)?;
    bar.finish_and_clear();
    Ok(SftSummary {
        dir: root,
        step: state.step,
        total_steps: total,
        finished,
        interrupted,
        checkpoint: cadence.checkpoint,
        first_loss,
        last_loss,
        best: state.best,
        tokens_per_s: if state.elapsed_s > 0.0 { state.tokens_seen as f64 / state.elapsed_s } else { 0.0 },
    })
}
