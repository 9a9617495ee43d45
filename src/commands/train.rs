//! `refine-poi sft-warmup` and `refine-poi grpo-train`: the training stages, each driven by a
//! run config (see [`crate::train::config`], [`crate::train::sft`] and [`crate::train::grpo`]). Both take the
//! same arguments and print a JSON summary; Ctrl-C, SIGTERM and SIGUSR1 write a checkpoint and exit with
//! 128 + the signal (130, 143, 138).

use std::path::PathBuf;

use anyhow::Result;

use crate::train::config::RunConfig;
use crate::train::{RunOptions, StageSummary, StopFlag};
use crate::train::{grpo, sft};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run config (TOML); its keys not given take the defaults.
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set grpo.beta=0 --set data.dir=/tmp/nyc` (repeatable;
    /// the value is TOML, or a plain string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue the stage's run directory from its last checkpoint (same config required).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many optimizer steps (writing a checkpoint); continue later with --resume.
    #[arg(long, value_name = "STEPS")]
    pub stop_after: Option<u64>,
    /// No progress bar or messages on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

impl Args {
    fn load(&self) -> Result<(RunConfig, RunOptions)> {
        let cfg = RunConfig::load(Some(&self.config), &self.sets)?;
        let dist = crate::dist::from_env()?;
        // Rank 0 speaks for the run; the others stay quiet.
        let quiet = self.quiet || !dist.is_writer();
        let opts = RunOptions { resume: self.resume, quiet, stop_after: self.stop_after, stop: StopFlag::on_signals()?, dist };
        Ok((cfg, opts))
    }
}

/// Prints the summary (JSON; rank 0), says how the run ended, and after a stop request exits
/// with 128 + the signal's number. An error on one of several ranks ends them all.
fn finish<S: serde::Serialize>(result: Result<S>, stage: impl Fn(&S) -> &StageSummary, opts: RunOptions) -> Result<()> {
    let summary = match result {
        Ok(s) => s,
        Err(e) if opts.dist.size() > 1 => {
            eprintln!("error (rank {} of {}): {e:#}", opts.dist.rank(), opts.dist.size());
            opts.dist.abort(1)
        }
        Err(e) => return Err(e),
    };
    let stage = stage(&summary);
    if opts.dist.is_writer() {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    if !opts.quiet {
        let dir = stage.dir.display();
        if stage.finished {
            eprintln!("done: adapter in {dir}/final, best val in {dir}/best");
        } else {
            eprintln!("stopped at step {} of {}: continue with --resume", stage.step, stage.total_steps);
        }
    }
    if stage.interrupted {
        let code = opts.stop.exit_code();
        // Every rank stopped at the same step: leave MPI in order before exiting.
        drop(opts);
        std::process::exit(code);
    }
    Ok(())
}

pub fn run_sft(args: Args) -> Result<()> {
    let (cfg, opts) = args.load()?;
    let result = sft::run(&cfg, &opts);
    finish(result, |s| &s.stage, opts)
}

pub fn run_grpo(args: Args) -> Result<()> {
    let (cfg, opts) = args.load()?;
    let result = grpo::run(&cfg, &opts);
    finish(result, |s| &s.stage, opts)
}
