//! Training: the two stages and what they share.
//!
//! - [`sft`]: the SFT warm-up (`sft-warmup`); [`grpo`]: GRPO (`grpo-train`), with its
//!   objective, advantages and rewards.
//! - [`config`]: the run config both stages read, and the [`config::Stage`]s.
//! - [`schedule`]: the loop's settings and the learning-rate schedule; [`optim`]: AdamW on the
//!   adapter with saveable state, gradient accumulation, global-norm clipping.
//! - [`checkpoint`]: the run directory, atomic checkpoints, `best/`, `metrics.jsonl`.
//! - [`val`]: greedy validation on a fixed val sample through the eval harness.
//! - here: the stage loop's cadence, the data order, log-probabilities of target tokens in a
//!   padded batch (the shape of every loss), the stop flag (signals) and the progress bar.
//!
//! With several ranks ([`crate::dist`]), every rank runs the same loop on its share of each
//! step; rank 0 alone holds the lock and writes the run directory, and a stop request on any
//! rank stops all of them at the same step boundary.

pub mod checkpoint;
pub mod config;
pub mod grpo;
pub mod optim;
pub mod schedule;
pub mod sft;
pub mod val;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::data::{Dataset, Instance, Split};
use crate::dist::Dist;
use crate::lock::DirLock;
use crate::model::{self, AdapterBase, CausalLm, LoadedModel, Mode};
use crate::prompt::PromptConfig;
use crate::seed::{SEED_DATA, SEED_LORA_INIT, SEED_NEW_TOKENS, SEED_SUBSET, derive_seed, fnv_hex};
use checkpoint::{BestVal, MetricsLog, RunDir, TrainerState};
use config::{RunConfig, Stage};
use optim::AdamW;
use schedule::TrainConfig;

/// How a run is driven (beyond its config).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run directory's last checkpoint.
    pub resume: bool,
    pub quiet: bool,
    /// Stop after this many optimizer steps of this invocation (with a checkpoint); the run
    /// continues with `resume`.
    pub stop_after: Option<u64>,
    /// Raised by Ctrl-C, SIGTERM or SIGUSR1: stop before the next micro-batch (or group of
    /// micro-batches that train together), checkpoint the last completed step.
    pub stop: StopFlag,
    /// The ranks of a data-parallel run (one process by default).
    pub dist: Dist,
}

/// The training examples (instances) of a run: all train instances, or a fixed subset of
/// `data.train_instances` drawn with `seed`.
pub fn train_instances<'d>(ds: &'d Dataset, cfg: &RunConfig, seed: u64) -> Result<Vec<&'d Instance>> {
    let all = ds.instances(Split::Train);
    ensure!(!all.is_empty(), "{} has no train instances", cfg.data.dir.display());
    let n = cfg.data.train_instances;
    if n == 0 || n >= all.len() {
        return Ok(all.iter().collect());
    }
    let mut idx: Vec<usize> = (0..all.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(derive_seed(seed, SEED_SUBSET, 0)));
    idx.truncate(n);
    idx.sort_unstable();
    Ok(idx.into_iter().map(|i| &all[i]).collect())
}

/// The data order: a seeded permutation of the examples per epoch. Example number `g` of the
/// run (counting across epochs) is `example(g)`, so the order depends only on (seed, g) and a
/// resumed run continues it exactly.
pub struct EpochOrder {
    seed: u64,
    n: usize,
    current: Option<(u64, Vec<usize>)>,
}

impl EpochOrder {
    pub fn new(seed: u64, n: usize) -> Self {
        EpochOrder { seed, n, current: None }
    }

    /// The index (into the examples) of the run's `g`-th example.
    pub fn example(&mut self, g: u64) -> usize {
        let n = self.n.max(1) as u64;
        let epoch = g / n;
        if self.current.as_ref().is_none_or(|c| c.0 != epoch) {
            let mut order: Vec<usize> = (0..self.n).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(derive_seed(self.seed, SEED_DATA, epoch)));
            self.current = Some((epoch, order));
        }
        self.current.as_ref().map_or(0, |c| c.1[(g % n) as usize])
    }
}

/// Loads the model with a starting adapter (`adapter`, which must agree with `[lora]`; `key`
/// names the config key it came from) or a fresh one seeded by `seed`; the run's LoRA dropout
/// either way.
///
/// With `prompt.ids = "semantic"` the model gets the codebook's tokens: from the adapter, which
/// must have been trained with the same ones, or fresh.
pub fn load_model(cfg: &RunConfig, ds: &Dataset, adapter: Option<&Path>, key: &str, seed: u64) -> Result<LoadedModel> {
    let mut loaded = model::load(&cfg.model.path)?;
    let tokens = crate::prompt::added_tokens(&cfg.prompt, ds.codebook())?;
    match adapter {
        Some(dir) => {
            loaded.load_adapter(dir).with_context(|| format!("cannot load {key} = {}", dir.display()))?;
            let got = loaded.model.lora_config.clone().context("adapter did not load")?;
            let same_targets = got.target_modules()? == cfg.lora.target_modules()?;
            ensure!(
                got.r == cfg.lora.r && got.alpha == cfg.lora.alpha && same_targets,
                "{key} {} has r = {}, alpha = {}, targets {:?}, but [lora] says r = {}, alpha = {}, targets {:?}: make them agree",
                dir.display(),
                got.r,
                got.alpha,
                got.targets,
                cfg.lora.r,
                cfg.lora.alpha,
                cfg.lora.targets
            );
        }
        None => loaded.model.attach_lora(&cfg.lora, derive_seed(seed, SEED_LORA_INIT, 0))?,
    }
    match (tokens, &loaded.model.new_tokens) {
        (Some(names), Some(added)) => {
            ensure!(
                added.names == names,
                "{key} was trained with other added tokens than this prompt's: the dataset's codebook.json, plus the time tokens when prompt.time_tokens"
            )
        }
        (Some(names), None) => loaded.add_tokens(names, derive_seed(seed, SEED_NEW_TOKENS, 0))?,
        (None, Some(_)) => anyhow::bail!("{key} adds the tokens of semantic ids, but prompt.ids = \"raw\""),
        (None, None) => {}
    }
    loaded.model.set_lora_dropout(cfg.lora.dropout);
    Ok(loaded)
}

/// What a stage starts from: its run directory (created, or opened to resume with the same
/// config), the checkpoint to resume from, the config's hash, and the dataset.
pub struct StageStart {
    /// Held until the stage returns: no other run writes this run directory meanwhile (rank 0's;
    /// the other ranks hold none).
    pub lock: Option<DirLock>,
    pub run: RunDir,
    pub latest: Option<PathBuf>,
    pub config_hash: String,
    pub ds: Dataset,
}

impl StageStart {
    /// Opens `stage`'s run directory for `cfg`. A fresh run first passes `check_fresh`, so a
    /// run that cannot start leaves nothing behind. With several ranks, rank 0 opens it and
    /// tells the others which checkpoint to load (or why it could not start).
    pub fn open(cfg: &RunConfig, stage: Stage, opts: &RunOptions, check_fresh: impl FnOnce() -> Result<()>) -> Result<StageStart> {
        cfg.validate()?;
        let config_toml = cfg.stage_toml(stage)?;
        let root = cfg.stage_dir(stage);
        let dist = &opts.dist;
        let (lock, run, latest, config_hash) = if dist.is_writer() {
            let opened = Self::open_dir(&root, &config_toml, stage, opts.resume, check_fresh);
            if dist.size() > 1 {
                let news = match &opened {
                    Ok((_, _, latest, hash)) => serde_json::json!({"latest": latest, "config_hash": hash}),
                    Err(e) => serde_json::json!({"error": format!("{e:#}")}),
                };
                dist.broadcast_string(&news.to_string())?;
            }
            let (lock, run, latest, hash) = opened?;
            (Some(lock), run, latest, hash)
        } else {
            let news: serde_json::Value = serde_json::from_str(&dist.broadcast_string("")?)?;
            if let Some(e) = news["error"].as_str() {
                anyhow::bail!("rank 0 could not open {}: {e}", root.display());
            }
            let latest = news["latest"].as_str().map(PathBuf::from);
            let hash = news["config_hash"].as_str().context("rank 0 sent no config hash")?.to_string();
            (None, RunDir { root }, latest, hash)
        };
        let ds = Dataset::load(&cfg.data.dir).with_context(|| format!("cannot load the dataset in {}", cfg.data.dir.display()))?;
        Ok(StageStart { lock, run, latest, config_hash, ds })
    }

    /// Locks and creates (or opens to resume) the run directory.
    fn open_dir(
        root: &Path,
        config_toml: &str,
        stage: Stage,
        resume: bool,
        check_fresh: impl FnOnce() -> Result<()>,
    ) -> Result<(DirLock, RunDir, Option<PathBuf>, String)> {
        // Resuming what is not there must not leave an empty run folder behind.
        ensure!(!resume || root.is_dir(), "nothing to resume in {}: no such folder", root.display());
        let lock = DirLock::acquire(root, stage.command())?;
        let (run, latest, config_hash) = if resume {
            RunDir::open_for_resume(root, config_toml, |saved| RunConfig::from_toml(saved)?.stage_toml(stage))?
        } else {
            check_fresh()?;
            (RunDir::create(root, config_toml)?, None, fnv_hex(config_toml))
        };
        Ok((lock, run, latest, config_hash))
    }
}

/// How a stage's run ended (each stage's summary adds its own figures).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageSummary {
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
    pub best: Option<BestVal>,
}

/// The cadence every stage's loop follows: when to stop, validate and checkpoint, and what it
/// writes at the end (a checkpoint of the last completed step, `final/` when all steps ran).
pub struct StageLoop<'a> {
    run: &'a RunDir,
    t: &'a TrainConfig,
    /// The base model's name, recorded in every adapter written.
    base: AdapterBase,
    total: u64,
    /// `--stop-after`: the step this invocation stops at.
    stop_at: Option<u64>,
    saved_at: Option<u64>,
    interrupted: bool,
    /// Steps in a row whose update was skipped as non-finite.
    nonfinite_in_a_row: usize,
    /// The newest checkpoint.
    pub checkpoint: Option<PathBuf>,
    dist: Dist,
    /// How validation runs (from `t`; the stage may hold its answers to the grammar).
    pub val: val::ValSettings,
}

impl<'a> StageLoop<'a> {
    /// `latest` is the checkpoint resumed from (at `step`), if any; `opts` gives `--stop-after`
    /// and the ranks.
    pub fn new(
        run: &'a RunDir,
        t: &'a TrainConfig,
        base: AdapterBase,
        total: u64,
        step: u64,
        latest: Option<PathBuf>,
        opts: &RunOptions,
    ) -> Self {
        StageLoop {
            run,
            t,
            base,
            total,
            stop_at: opts.stop_after.map(|n| step + n),
            saved_at: latest.as_ref().map(|_| step),
            interrupted: false,
            nonfinite_in_a_row: 0,
            checkpoint: latest,
            dist: opts.dist.clone(),
            val: val::ValSettings::from_train(t),
        }
    }

    /// A stop was requested or `--stop-after` is reached at `step`.
    fn stopping(&self, stop: &StopFlag, step: u64) -> bool {
        stop.raised() || self.stop_at.is_some_and(|s| step >= s)
    }

    /// Whether the loop stops before `step` (a stop request on any rank, or `--stop-after`); a
    /// stop request marks the run interrupted.
    pub fn stop_before(&mut self, stop: &StopFlag, step: u64) -> Result<bool> {
        // Every rank stops at the same step: the signal seen by any (the largest number) stops all.
        let mine = if stop.raised() { stop.signal().max(1) } else { 0 };
        let seen = self.dist.gather_f64(&[f64::from(mine)])?.into_iter().fold(0.0, f64::max) as i32;
        if seen > 0 && !stop.raised() {
            stop.raise_by(if seen == 1 { 0 } else { seen });
        }
        self.interrupted |= stop.raised();
        Ok(self.stopping(stop, step))
    }

    /// Counts a completed step whose update was skipped because its loss or gradient was not
    /// finite; too many in a row are an error (nothing non-finite was ever applied, so the
    /// checkpoints hold the last good adapter).
    pub fn record_finite(&mut self, finite: bool, state: &mut TrainerState) -> Result<()> {
        if finite {
            self.nonfinite_in_a_row = 0;
            return Ok(());
        }
        self.nonfinite_in_a_row += 1;
        state.nonfinite_steps += 1;
        let limit = self.t.max_nonfinite_steps;
        ensure!(
            self.nonfinite_in_a_row < limit,
            "{limit} steps in a row (up to step {}) had a non-finite loss or gradient and were skipped: stopping; {} holds the last good adapter (lower the learning rate, or check the data)",
            state.step,
            self.checkpoint.as_ref().map_or("no checkpoint yet".to_string(), |c| c.display().to_string())
        );
        Ok(())
    }

    /// A step abandoned midway by a stop request.
    pub fn interrupt(&mut self) {
        self.interrupted = true;
    }

    /// Validation is due after `step` (every `eval_every` steps and at the end).
    pub fn val_due(&self, step: u64) -> bool {
        self.t.eval_every > 0 && (step.is_multiple_of(self.t.eval_every as u64) || step == self.total)
    }

    /// After a completed step: validation when due (`status` says what the bar showed), then a
    /// checkpoint every `save_every` steps, at the end, and when stopping.
    #[allow(clippy::too_many_arguments)]
    pub fn end_step(
        &mut self,
        loaded: &LoadedModel,
        opt: &AdamW,
        ds: &Dataset,
        prompt: &PromptConfig,
        stop: &StopFlag,
        state: &mut TrainerState,
        log: &mut MetricsLog,
        bar: &indicatif::ProgressBar,
        status: &str,
    ) -> Result<()> {
        if self.val_due(state.step) && self.dist.is_writer() {
            bar.set_message(format!("{status}, validating on {} val instances", self.t.eval_instances));
            validate_and_keep_best(loaded, ds, prompt, self.val, stop, state, self.run, log, bar)?;
        }
        self.after_step(&loaded.model, opt, state, stop)
    }

    /// After a completed step: a checkpoint every `save_every` steps, at the end, and when stopping.
    pub fn after_step(&mut self, model: &CausalLm, opt: &AdamW, state: &TrainerState, stop: &StopFlag) -> Result<()> {
        let due = self.t.save_every > 0 && state.step.is_multiple_of(self.t.save_every as u64);
        if due || state.step == self.total || self.stopping(stop, state.step) {
            self.save(model, opt, state)?;
        }
        Ok(())
    }

    /// Writes the checkpoint of `state.step` (rank 0; the other ranks only note the step); a
    /// failed write names the checkpoint that is left.
    fn save(&mut self, model: &CausalLm, opt: &AdamW, state: &TrainerState) -> Result<()> {
        if !self.dist.is_writer() {
            self.saved_at = Some(state.step);
            return Ok(());
        }
        let saved = self.run.save_checkpoint(model, &self.base, opt, state, self.t.keep_checkpoints).with_context(|| {
            let kept = self.checkpoint.as_ref().map_or("no earlier checkpoint".to_string(), |c| format!("{} is intact", c.display()));
            format!("cannot write the checkpoint of step {} ({kept})", state.step)
        })?;
        self.checkpoint = Some(saved);
        self.saved_at = Some(state.step);
        Ok(())
    }

    /// After the loop: the last completed step checkpointed and, when every step ran, `final/`.
    /// Stopping early without a request is an error.
    pub fn finish(mut self, model: &CausalLm, opt: &AdamW, state: &TrainerState) -> Result<StageSummary> {
        if self.saved_at != Some(state.step) {
            self.save(model, opt, state)?;
        }
        let finished = state.step == self.total;
        if finished && self.dist.is_writer() {
            self.run.save_adapter_copy("final", model, &self.base, &serde_json::json!({"step": state.step, "best": state.best}))?;
        }
        ensure!(finished || self.interrupted || self.stop_at.is_some(), "training stopped early at step {} of {}", state.step, self.total);
        Ok(StageSummary {
            dir: self.run.root.clone(),
            step: state.step,
            total_steps: self.total,
            finished,
            interrupted: self.interrupted,
            checkpoint: self.checkpoint,
            best: state.best,
        })
    }
}

/// Validates the model at `state.step` on the fixed val sample, logs the record to
/// `metrics.jsonl` and a line above the bar, and replaces `best/` when val MRR improved. A stop
/// request during validation skips it (the caller checkpoints and returns).
#[allow(clippy::too_many_arguments)]
pub fn validate_and_keep_best(
    loaded: &LoadedModel,
    ds: &Dataset,
    prompt: &PromptConfig,
    settings: val::ValSettings,
    stop: &StopFlag,
    state: &mut TrainerState,
    run: &RunDir,
    log: &mut MetricsLog,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let report = match val::validate(&loaded.model, &loaded.tokenizer, ds, prompt, settings, Some(stop.flag())) {
        Ok(r) => r,
        Err(e) if e.is::<val::Interrupted>() => return Ok(()),
        Err(e) => return Err(e.context(format!("validation at step {}", state.step))),
    };
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
        run.save_adapter_copy("best", &loaded.model, &loaded.adapter_base(), &record)?;
    }
    Ok(())
}

/// One row of a training forward: `ids[..score_from]` is context, and every token from
/// `score_from` on is scored (predicted from the tokens before it).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredSeq {
    pub ids: Vec<u32>,
    /// Positions of the tokens whose log-probabilities count, ascending, each at least 1.
    pub targets: Vec<usize>,
}

impl ScoredSeq {
    /// A prompt and its answer: every token from `score_from` on counts.
    pub fn answer(ids: Vec<u32>, score_from: usize) -> ScoredSeq {
        let targets = (score_from..ids.len()).collect();
        ScoredSeq { ids, targets }
    }

    pub fn scored(&self) -> usize {
        self.targets.len()
    }
}

/// log p(token) under `logits`: (..., V) logits and (...) token ids give (...), in f32 at
/// least (half-precision logits are widened first).
pub fn token_logprobs(logits: &Tensor, tokens: &Tensor) -> candle_core::Result<Tensor> {
    let logits = match logits.dtype() {
        DType::F16 | DType::BF16 => logits.to_dtype(DType::F32)?,
        _ => logits.clone(),
    };
    crate::model::train_ops::target_logprobs(&logits, tokens)
}

/// Log-probabilities of the scored tokens of `rows`, run as one left-padded batch: a flat
/// (N,) tensor in row order (row 0's scored tokens, then row 1's, ...), differentiable when
/// `mode.grad`. Only the scored positions go through the last layer's output projection and
/// MLP ([`CausalLm::forward_hidden_at`]) and the LM head.
pub fn scored_logprobs(model: &CausalLm, rows: &[ScoredSeq], mode: Mode) -> Result<Tensor> {
    ensure!(!rows.is_empty(), "empty batch");
    for (i, r) in rows.iter().enumerate() {
        ensure!(!r.targets.is_empty(), "row {i}: nothing to score");
        ensure!(
            r.targets[0] >= 1 && r.targets.windows(2).all(|w| w[0] < w[1]) && r.targets[r.targets.len() - 1] < r.ids.len(),
            "row {i}: its scored positions must ascend within 1..{}",
            r.ids.len()
        );
    }
    // The input runs up to the last scored token; position t predicts token t + 1.
    let input_len = |r: &ScoredSeq| r.targets[r.targets.len() - 1];
    let t = rows.iter().map(input_len).max().unwrap_or(0);
    let mut input = Vec::with_capacity(rows.len() * t);
    let mut pads = Vec::with_capacity(rows.len());
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    for (b, r) in rows.iter().enumerate() {
        let len = input_len(r);
        let pad = t - len;
        pads.push(pad);
        input.extend(std::iter::repeat_n(0u32, pad));
        input.extend_from_slice(&r.ids[..len]);
        for &j in &r.targets {
            positions.push((b * t + pad + j - 1) as u32);
            targets.push(r.ids[j]);
        }
    }
    let input = Tensor::from_vec(input, (rows.len(), t), model.device())?;
    let picked = model.forward_hidden_at(&input, &pads, &positions, mode)?;
    model.target_logprobs(&picked, &targets, None, mode)
}

/// A stop request: Ctrl-C (SIGINT), SIGTERM (`kill`, `scancel`, Slurm's preemption) or SIGUSR1
/// (Slurm's `--signal=USR1@N` warning). The loop finishes or abandons the current step, writes a
/// checkpoint of the last completed one, and returns; the command then exits with
/// 128 + the signal's number (130, 143, 138), so a job script can tell a stop from a failure.
#[derive(Debug, Clone, Default)]
pub struct StopFlag {
    raised: Arc<AtomicBool>,
    /// The signal that raised it (0: raised by the program itself).
    signal: Arc<AtomicI32>,
}

impl StopFlag {
    pub fn new() -> Self {
        StopFlag::default()
    }

    pub fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
    }

    /// Raises the flag as `signal` would have (0: by the program itself).
    pub fn raise_by(&self, signal: i32) {
        self.signal.store(signal, Ordering::SeqCst);
        self.raise();
    }

    /// The signal that raised the flag (0: none, or the program itself).
    pub fn signal(&self) -> i32 {
        self.signal.load(Ordering::SeqCst)
    }

    pub fn raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// The flag itself, for loops that poll it (validation).
    pub fn flag(&self) -> &Arc<AtomicBool> {
        &self.raised
    }

    /// The exit status after a stop: 128 + the signal (130 when the program raised it).
    pub fn exit_code(&self) -> i32 {
        let sig = self.signal.load(Ordering::SeqCst);
        128 + if sig == 0 { SIGINT } else { sig }
    }

    /// A flag raised by SIGINT, SIGTERM or SIGUSR1. A second Ctrl-C exits at once with status
    /// 130; a repeated SIGTERM or SIGUSR1 does not cut the checkpoint short.
    pub fn on_signals() -> Result<StopFlag> {
        let flag = StopFlag::new();
        let inner = flag.clone();
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1]).context("cannot install the signal handlers")?;
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if inner.raised() {
                    if sig == SIGINT {
                        let _ = writeln!(std::io::stderr(), "\nsecond interrupt: exiting without a checkpoint");
                        std::process::exit(128 + SIGINT);
                    }
                    continue;
                }
                // The flag first: a message that cannot be written (a closed pipe) must not
                // stop the checkpoint.
                inner.signal.store(sig, Ordering::SeqCst);
                inner.raise();
                let name = match sig {
                    SIGINT => "interrupt",
                    SIGTERM => "SIGTERM",
                    _ => "SIGUSR1",
                };
                let _ = writeln!(
                    std::io::stderr(),
                    "\n{name}: writing a checkpoint of the last completed step, then exiting with {}",
                    128 + sig
                );
            }
        });
        Ok(flag)
    }
}

/// A progress bar over optimizer steps (hidden when quiet).
pub fn progress_bar(total: u64, done: u64, quiet: bool, label: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_string());
    bar.set_position(done);
    bar
}
