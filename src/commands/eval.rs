//! `refine-poi eval`: a method's metrics on a split of a dataset directory (see [`crate::eval`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::baselines::Baseline;
use crate::data::{Dataset, Split};
use crate::eval::{EvalOptions, evaluate, format_table, write_predictions};

/// The splits that can be evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalSplit {
    Val,
    Test,
}

impl From<EvalSplit> for Split {
    fn from(s: EvalSplit) -> Split {
        match s {
            EvalSplit::Val => Split::Val,
            EvalSplit::Test => Split::Test,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset directory written by `refine-poi preprocess`.
    #[arg(long)]
    pub data: PathBuf,
    /// Split to evaluate.
    #[arg(long, value_enum, default_value = "test")]
    pub split: EvalSplit,
    /// Method to evaluate.
    #[arg(long, value_enum)]
    pub method: Baseline,
    /// Where to write the JSON report.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write each instance's ranked list (JSONL) here.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// How many top POIs per instance `--predictions` keeps for score methods.
    #[arg(long, default_value_t = 20)]
    pub top_n: usize,
    /// Instances per `predict` call (default: the method's own).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    let split: Split = args.split.into();
    let t0 = Instant::now();
    let ds = Dataset::load_splits(&args.data, &[split])?;
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut method = args.method.build(&ds);
    let fit_s = t1.elapsed().as_secs_f64();
    let opts = EvalOptions {
        batch_size: args.batch_size,
        top_n: args.top_n,
        keep_results: args.predictions.is_some(),
        quiet: args.quiet,
    };
    let (report, results) = evaluate(&ds, split, method.as_mut(), &opts)?;

    let mut json = serde_json::to_value(&report)?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("dataset".into(), args.data.display().to_string().into());
        obj.insert("load_s".into(), load_s.into());
        obj.insert("fit_s".into(), fit_s.into());
    }
    for path in std::iter::once(&args.out).chain(&args.predictions) {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    let mut text = serde_json::to_string_pretty(&json)?;
    text.push('\n');
    crate::fsutil::write_atomic(&args.out, text.as_bytes())?;
    if let Some(p) = &args.predictions {
        write_predictions(p, &results)?;
    }
    print!("{}", format_table(&report));
    println!(
        "(loaded in {load_s:.2} s, fitted in {fit_s:.3} s; report: {})",
        args.out.display()
    );
    Ok(())
}
