//! `refine-poi prompt-stats`: answer-in-prompt for a split and a prompt config, without running
//! the model (only its tokenizer and chat template are used, for the token budget).

use std::path::PathBuf;

use anyhow::Result;

use crate::data::{Dataset, Split};
use crate::prompt::PromptBuilder;
use crate::prompt_stats::{answer_in_prompt, format_in_prompt};

use super::eval::{EvalSplit, LlmArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset directory written by `refine-poi preprocess`.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value = "test")]
    pub split: EvalSplit,
    /// A fixed sample of this many instances (the one `eval --limit N` uses).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also write the shares as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub llm: LlmArgs,
}

pub fn run(args: Args) -> Result<()> {
    let split: Split = args.split.into();
    let ds = Dataset::load_splits(&args.data, &[split])?;
    let (loaded, _) = args.llm.model.load()?;
    let prompts = PromptBuilder::new(args.llm.prompt_config()?, &loaded.tokenizer)?;
    let r = answer_in_prompt(&ds, split, &prompts, args.limit)?;
    if let Some(out) = &args.out {
        crate::fsutil::write_atomic(out, format!("{}\n", serde_json::to_string_pretty(&r)?).as_bytes())?;
    }
    print!("{}", format_in_prompt(&r));
    Ok(())
}
