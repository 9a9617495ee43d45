//! `refine-poi bench --sft --config FILE`: the SFT warm-up's own loop (`sft-warmup`) timed on
//! this machine. Each of `--repeats` runs trains the config's starting adapter (a fresh one, or
//! `model.adapter`) for `--steps` optimizer steps in the config's epoch order, in a temporary
//! run directory, with no validation and no checkpoint before the last step. A run's first step
//! allocates and faults in its memory and is left out: its figure is the training tokens of the
//! other steps over their seconds, and the median run's is reported (of an even number, the
//! faster middle one), with the FLOP rate it reaches, its share of this machine's GEMM rate at
//! the model's shapes, and the hours one epoch of whole-history windows would take.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde_json::json;

use super::bench_gemm::{Weights, cpu_features, gemm_at_model_shapes};
use crate::model;
use crate::train::config::RunConfig;
use crate::train::{RunOptions, StopFlag, sft};

/// What `bench --sft` trains.
#[derive(clap::Args, Debug)]
pub struct SftBenchArgs {
    /// The run config (TOML) whose `[sft]` stage is timed, e.g. configs/nyc.toml.
    #[arg(long, requires = "sft")]
    pub config: Option<PathBuf>,
    /// Override a config key, as `sft-warmup --set` (repeatable). The bench sets run_dir,
    /// sft.max_steps, sft.eval_every and sft.save_every itself.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "sft")]
    pub sets: Vec<String>,
    /// Optimizer steps per run; the first is not timed.
    #[arg(long, default_value_t = 12, requires = "sft")]
    pub steps: u64,
}

/// One run's timed steps (all but the first).
struct TimedRun {
    tokens: f64,
    examples: f64,
    gflop: f64,
    seconds: f64,
    last_loss: f64,
}

impl TimedRun {
    fn tokens_per_s(&self) -> f64 {
        self.tokens / self.seconds
    }
}

/// Sums the steps after the first of a run's `metrics.jsonl`, which must log all `steps`.
fn timed_steps(metrics: &Path, steps: u64, examples_per_step: usize) -> Result<TimedRun> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
    let mut run = TimedRun { tokens: 0.0, examples: 0.0, gflop: 0.0, seconds: 0.0, last_loss: f64::NAN };
    let mut logged = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON: {line}", metrics.display()))?;
        // Step lines carry step_s; validation lines do not.
        if v.get("step_s").is_none() {
            continue;
        }
        let field = |key: &str| v[key].as_f64().with_context(|| format!("{}: a step without `{key}`: {line}", metrics.display()));
        logged += 1;
        run.last_loss = field("loss")?;
        if field("step")? > 1.0 {
            run.tokens += field("tokens")?;
            run.gflop += field("gflop")?;
            run.examples += examples_per_step as f64;
            run.seconds += field("step_s")?;
        }
    }
    ensure!(logged == steps && run.seconds > 0.0, "{}: {logged} steps logged, {steps} asked for", metrics.display());
    Ok(run)
}

pub fn run(args: &SftBenchArgs, repeats: usize) -> Result<()> {
    let config = args.config.as_deref().context("bench --sft needs --config")?;
    ensure!(args.steps >= 2, "--steps must be at least 2: a run's first step is not timed");
    let tmp = tempfile::tempdir()?;
    let run_dir = tmp.path().join("run");
    let mut sets = args.sets.clone();
    sets.extend([format!("sft.max_steps={}", args.steps), "sft.eval_every=0".to_string(), "sft.save_every=0".to_string()]);
    let mut cfg = RunConfig::load(Some(config), &sets)?;
    cfg.run_dir = run_dir.clone();
    let mut runs: Vec<TimedRun> = Vec::with_capacity(repeats);
    // One epoch's examples and (whole-history windows) tokens.
    let mut epoch = (0, None);
    for _ in 0..repeats {
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)?;
        }
        let opts = RunOptions { resume: false, quiet: true, stop_after: None, stop: StopFlag::new(), dist: crate::dist::Dist::single() };
        let summary = sft::run(&cfg, &opts)?;
        epoch = (summary.epoch_examples, summary.epoch_tokens);
        runs.push(timed_steps(&summary.stage.dir.join("metrics.jsonl"), args.steps, cfg.sft.examples_per_step())?);
    }
    let peak = super::bench::peak_rss_mib();
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| runs[a].tokens_per_s().total_cmp(&runs[b].tokens_per_s()));
    let median = &runs[order[runs.len() / 2]];
    let tps = median.tokens_per_s();
    let gflops = median.gflop / median.seconds;
    // The GEMM rate at the timed windows' mean length, the model's f32 weights.
    let mean_window = (median.tokens / median.examples).round() as usize;
    let loaded = model::load(&cfg.model.path)?;
    let m = &loaded.model;
    let gemm = gemm_at_model_shapes(&m.config, mean_window.max(1), repeats, m.device(), m.dtype(), Weights::Dense)?;
    let report = json!({
        "model": cfg.model.path,
        "config": config,
        "threads": rayon::current_num_threads(),
        "cpu": cpu_features(),
        "examples": format!("{:?}", cfg.sft.examples).to_lowercase(),
        "examples_per_step": cfg.sft.examples_per_step(),
        "steps": args.steps,
        "timed_steps": format!("2..={}", args.steps),
        "repeats": repeats,
        "tokens_per_s": tps,
        "tokens_per_s_runs": runs.iter().map(TimedRun::tokens_per_s).collect::<Vec<_>>(),
        "timed_tokens": median.tokens,
        "mean_window_tokens": median.tokens / median.examples,
        "epoch_examples": epoch.0,
        "epoch_tokens": epoch.1,
        "epoch_mean_window_tokens": epoch.1.map(|t| t as f64 / epoch.0 as f64),
        "projected_epoch_hours": epoch.1.map(|t| t as f64 / tps / 3600.0),
        "gflops": gflops,
        "gemm_at_window_shapes": gemm,
        "share_of_gemm": gflops / gemm["gflops_layer"].as_f64().unwrap_or(f64::NAN),
        // The loop is deterministic: every run ends at the same loss.
        "last_loss_runs": runs.iter().map(|r| r.last_loss).collect::<Vec<_>>(),
        "peak_rss_mib": peak,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
