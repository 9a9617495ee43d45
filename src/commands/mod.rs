//! Subcommands of the `refine-poi` binary: each module owns its clap `Args` and a `run`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::model;

pub mod bench;
pub mod bench_gemm;
pub mod bench_sft;
pub mod eval;
pub mod export;
pub mod generate;
pub mod preprocess;
pub mod prompt_stats;
pub mod recommend;
pub mod report;
pub mod selfcheck;
pub mod train;

#[derive(Parser, Debug)]
#[command(name = "refine-poi", version, about = "Reinforcement fine-tuning of an LLM for next-POI recommendation")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Where the model runs: cpu, cuda (this rank's local GPU) or cuda:N. Default: the first GPU
    /// when built with the `cuda` feature and one is present, else cpu.
    #[arg(long, global = true, value_name = "cpu|cuda|cuda:N")]
    pub device: Option<String>,
    /// Weights and activations: f32, bf16 or f16. Default: f32 on cpu, bf16 on a GPU (the
    /// adapter and the optimizer state stay f32).
    #[arg(long, global = true, value_name = "f32|bf16|f16")]
    pub dtype: Option<String>,
    /// Decoding and sampling (up to 16 rows a step) read the GGUF's own quantised weight blocks
    /// (Q4_1, Q8_0) instead of their f32 copies: the same values, bit for bit, at a fraction of
    /// the memory traffic. Prompts (prefill), wider steps and training stay on the f32 weights.
    /// CPU, f32 and GGUF models only.
    #[arg(long, global = true)]
    pub quantized_base: bool,
    /// Prompts (prefill) and other products of more than 16 rows without gradients (the wide
    /// steps of `eval --beam-next`) multiply in bf16, on the CPU's AMX tiles or with AVX512-BF16:
    /// the base's weights and the rows entering them rounded to bf16, the sums f32, the adapter
    /// f32. For CPUs with AMX-BF16 or AVX512-BF16 (an error elsewhere); log-probs move by the rounding
    /// (docs/performance.md). Inference only: training stays f32.
    #[arg(long, global = true)]
    pub bf16_prefill: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Turn raw check-ins into a dataset directory (POI table, instances per split, stats).
    Preprocess(preprocess::Args),
    /// Evaluate a method on a split with the protocol's metrics.
    Eval(eval::Args),
    /// A top-k list for one user history (a dataset user, or a JSON file / stdin).
    Recommend(recommend::Args),
    /// LoRA supervised warm-up: teach the answer format from a run config (TOML).
    SftWarmup(train::Args),
    /// GRPO on recommendation rewards from a run config (TOML): the `[grpo]` and `[rewards]` tables.
    GrpoTrain(train::Args),
    /// Compare training runs: config differences, eval metrics, training curves (SVG).
    Report(report::Args),
    /// Merge a LoRA adapter into the model and write a Hugging Face model folder.
    Export(export::Args),
    /// Measure the model's prefill and decode speed and peak memory (JSON).
    Bench(bench::Args),
    /// Complete one prompt with a model (+ adapter): a sanity tool.
    Generate(generate::Args),
    /// Answer-in-prompt: how often the prompt names the target POI, per group and section.
    PromptStats(prompt_stats::Args),
    /// Check the model on --device/--dtype: golden logits, LoRA gradients (JSON; fails if off).
    Selfcheck(selfcheck::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.bf16_prefill && matches!(cli.command, Command::SftWarmup(_) | Command::GrpoTrain(_)) {
        anyhow::bail!("--bf16-prefill is for inference: training and its sampling stay f32");
    }
    let placement = model::Placement {
        quantized_base: cli.quantized_base,
        bf16_prefill: cli.bf16_prefill,
        ..model::Placement::parse(cli.device.as_deref(), cli.dtype.as_deref())?
    };
    placement.install();
    match cli.command {
        Command::Preprocess(args) => preprocess::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Recommend(args) => recommend::run(args),
        Command::Generate(args) => generate::run(args),
        Command::PromptStats(args) => prompt_stats::run(args),
        Command::Export(args) => export::run(args),
        Command::Report(args) => report::run(args),
        Command::Selfcheck(args) => selfcheck::run(args),
        Command::SftWarmup(args) => train::run_sft(args),
        Command::GrpoTrain(args) => train::run_grpo(args),
    }
}

/// `--model` and `--adapter`, shared by every command that runs the model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face model folder, or a hub repo id.
    #[arg(long, default_value = model::DEFAULT_MODEL)]
    pub model: String,
    /// A LoRA adapter folder (PEFT layout).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    /// The model with the adapter (if any) loaded, and a name for reports.
    pub fn load(&self) -> anyhow::Result<(model::LoadedModel, String)> {
        let mut loaded = model::load(&self.model)?;
        let mut name = loaded.source.clone();
        if let Some(adapter) = &self.adapter {
            loaded.load_adapter(adapter)?;
            name.push_str(&format!("+{}", adapter.display()));
        }
        Ok((loaded, name))
    }
}
