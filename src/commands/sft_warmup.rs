//! `refine-poi sft-warmup`: LoRA supervised warm-up from a run config (see [`crate::sft`] and
//! [`crate::config`]).

use std::path::PathBuf;

use anyhow::Result;

use crate::config::RunConfig;
use crate::sft::{self, SftOptions};
use crate::train::StopFlag;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run config (TOML); its keys not given take the defaults.
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set sft.lr=1e-4 --set data.dir=/tmp/nyc` (repeatable;
    /// the value is TOML, or a plain string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue the run in `{run_dir}/sft` from its last checkpoint (same config required).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many optimizer steps (writing a checkpoint); continue later with --resume.
    #[arg(long, value_name = "STEPS")]
    pub stop_after: Option<u64>,
    /// No progress bar or messages on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = RunConfig::load(Some(&args.config), &args.sets)?;
    let opts = SftOptions { resume: args.resume, quiet: args.quiet, stop_after: args.stop_after, stop: StopFlag::on_ctrl_c()? };
    let summary = sft::run(&cfg, &opts)?;
    let report = serde_json::json!({
        "run_dir": summary.dir,
        "step": summary.step,
        "total_steps": summary.total_steps,
        "finished": summary.finished,
        "interrupted": summary.interrupted,
        "checkpoint": summary.checkpoint,
        "first_loss": summary.first_loss,
        "last_loss": summary.last_loss,
        "best": summary.best,
        "tokens_per_s": summary.tokens_per_s,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !args.quiet {
        if summary.finished {
            eprintln!("done: adapter in {}/final, best val in {}/best", summary.dir.display(), summary.dir.display());
        } else {
            eprintln!("stopped at step {} of {}: continue with --resume", summary.step, summary.total_steps);
        }
    }
    if summary.interrupted {
        std::process::exit(130);
    }
    Ok(())
}
