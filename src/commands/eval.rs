//! `refine-poi eval`: a method's metrics on a split of a dataset directory (see [`crate::eval`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::answer::PoiIds;
use crate::baselines::Baseline;
use crate::data::{Dataset, Split};
use crate::eval::{EvalOptions, Recommender, evaluate, format_table, write_predictions};
use crate::llm_rec::LlmRecommender;
use crate::prompt::PromptConfig;

/// A baseline or the language model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Popularity,
    Counter,
    Markov,
    /// The counter, POIs visited around the target's time of day first.
    CounterHour,
    /// The learned ranker over visited and retrieved POIs, fit on train (`--ranker-config`).
    Ranker,
    /// The model (+ adapter), prompted per instance and decoded greedily.
    Llm,
}

/// How `--method llm` runs: the model, the adapter and the prompt.
#[derive(clap::Args, Debug, Clone)]
pub struct LlmArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Tokens the model may generate per answer.
    #[arg(long, default_value_t = 96)]
    pub max_new_tokens: usize,
    /// Prompt options from a TOML file: a `[prompt]` table (as in training configs) or the bare
    /// keys (k, long_term, categories, times, reasoning, max_prompt_tokens, ...).
    #[arg(long)]
    pub prompt_config: Option<PathBuf>,
    /// Length of the list the prompt asks for (overrides the prompt config).
    #[arg(long)]
    pub k: Option<usize>,
    /// Constrained decoding: the answer can only be `<answer>`, k distinct POI ids of the
    /// dataset, `</answer>` (no invalid, out-of-range or repeated id). Needs reasoning = false.
    #[arg(long)]
    pub constrained: bool,
    /// Rank instead of generating a list: write the user's check-ins as whole-history training
    /// does (`sft.examples = "histories"`), then the target's time, and rank the POIs whose codes
    /// the model would write next, by beam search with this many beams (at least k). Semantic
    /// ids only; the prompt's budget is max_prompt_tokens. With `--run`, a run that trained the
    /// next code (whole-history SFT, next-form GRPO) ranks this way with 20 beams by default, as
    /// its validation did.
    #[arg(long, conflicts_with = "constrained")]
    pub beam_next: Option<usize>,
    /// How POIs are named (overrides the prompt config): raw dense ids, or the dataset's
    /// semantic codes, which need an adapter trained with them.
    #[arg(long, value_enum)]
    pub ids: Option<PoiIds>,
}

impl LlmArgs {
    pub fn prompt_config(&self) -> Result<PromptConfig> {
        let mut cfg = match &self.prompt_config {
            None => PromptConfig::default(),
            Some(path) => read_table(path, "prompt")?,
        };
        if let Some(k) = self.k {
            cfg.k = k;
        }
        if let Some(ids) = self.ids {
            cfg.ids = ids;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Prompts decoded or ranked together unless `--batch-size` says otherwise. Next-code
    /// ranking takes 4: each prompt's beams already fill the matrix products, and 4 prompts'
    /// keys and values instead of 8 keep an evaluation under 1 GB (docs/performance.md).
    pub fn default_batch_size(&self) -> usize {
        if self.beam_next.is_some() { 4 } else { 8 }
    }

    /// Loads the model (and adapter) as a recommender.
    pub fn recommender(&self, batch_size: usize) -> Result<LlmRecommender> {
        self.recommender_with(batch_size, self.prompt_config()?)
    }

    /// [`LlmArgs::recommender`] with the prompt options given.
    pub fn recommender_with(&self, batch_size: usize, prompt: PromptConfig) -> Result<LlmRecommender> {
        let (loaded, name) = self.model.load()?;
        let name = match (self.constrained, self.beam_next) {
            (true, _) => format!("llm:{name}+constrained"),
            (false, Some(b)) => format!("llm:{name}+beam-next{b}"),
            (false, None) => format!("llm:{name}"),
        };
        LlmRecommender::new(loaded, prompt, batch_size, self.max_new_tokens, name)?.constrained(self.constrained)?.beam_next(self.beam_next)
    }
}

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
    /// Dataset directory written by `refine-poi preprocess` (with --run: the run's data.dir).
    #[arg(long, required_unless_present_any = ["run", "compare"])]
    pub data: Option<PathBuf>,
    /// Compare two `--predictions` files of the same instances: each metric's paired-bootstrap
    /// difference A − B with its 95% interval, per group (`--out`: also as JSON).
    #[arg(long, num_args = 2, value_names = ["A.jsonl", "B.jsonl"], conflicts_with_all = ["run", "method", "data", "predictions", "limit"])]
    pub compare: Option<Vec<PathBuf>>,
    /// Evaluate a training run (`runs/x/grpo`, or `runs/x`: its grpo/, else sft/): its adapter
    /// (best/, else final/) with the run's model, data and prompt from its config.toml.
    /// Implies --method llm; the report goes to `{run}/eval/{split}[-{limit}].json` by default.
    #[arg(long, conflicts_with_all = ["method", "prompt_config", "model", "adapter"])]
    pub run: Option<PathBuf>,
    /// Split to evaluate.
    #[arg(long, value_enum, default_value = "test")]
    pub split: EvalSplit,
    /// Method to evaluate.
    #[arg(long, value_enum, required_unless_present_any = ["run", "compare"])]
    pub method: Option<Method>,
    /// Where to write the JSON report.
    #[arg(long, required_unless_present_any = ["run", "compare"])]
    pub out: Option<PathBuf>,
    /// Also write each instance's ranked list (JSONL) here.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// How many top POIs per instance `--predictions` keeps for score methods.
    #[arg(long, default_value_t = 20)]
    pub top_n: usize,
    /// Instances per `predict` call (default: the method's own).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Evaluate a fixed sample of this many instances (the same sample for every method).
    #[arg(long)]
    pub limit: Option<usize>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// `--method ranker`'s options from a TOML file: a `[ranker]` table (as in configs/nyc.toml)
    /// or the bare keys; the defaults otherwise.
    #[arg(long)]
    pub ranker_config: Option<PathBuf>,
    #[command(flatten)]
    pub llm: LlmArgs,
}

/// A table of a TOML file (`[name]`), or the whole file when it has no such table.
pub fn read_table<T: serde::de::DeserializeOwned>(path: &std::path::Path, name: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: toml::Value = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let table = value.get(name).cloned().unwrap_or(value);
    serde_path_to_error::deserialize(table).with_context(|| format!("bad {name} options in {}", path.display()))
}

/// The ranker's options: `path`'s `[ranker]` table, or the defaults.
pub fn ranker_config(path: Option<&std::path::Path>) -> Result<crate::ranker::RankerConfig> {
    let cfg = match path {
        Some(p) => read_table(p, "ranker")?,
        None => crate::ranker::RankerConfig::default(),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// What `--run` resolves to: the data, the recommender's settings, and the default report path.
struct RunTarget {
    data: PathBuf,
    llm: LlmArgs,
    prompt: PromptConfig,
    out: PathBuf,
}

fn run_target(dir: &std::path::Path, args: &Args) -> Result<RunTarget> {
    let stage = crate::train::checkpoint::find_stage_dir(dir)?;
    let path = stage.join(crate::train::checkpoint::CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let (cfg, trained) =
        crate::train::config::RunConfig::from_stage_toml(&text).with_context(|| format!("bad run config {}", path.display()))?;
    let adapter = ["best", "final"]
        .iter()
        .map(|d| stage.join(d))
        .find(|d| d.join("adapter_config.json").is_file())
        .with_context(|| format!("{} has no best/ or final/ adapter yet", stage.display()))?;
    let mut prompt = cfg.prompt.clone();
    if let Some(k) = args.llm.k {
        prompt.k = k;
    }
    let split = match args.split {
        EvalSplit::Val => "val",
        EvalSplit::Test => "test",
    };
    let name = match args.limit {
        Some(n) => format!("{split}-{n}.json"),
        None => format!("{split}.json"),
    };
    // The run's model ranks as its validation did, unless told otherwise (`--beam-next`).
    let beam_next = if args.llm.constrained { args.llm.beam_next } else { args.llm.beam_next.or(cfg.next_code_beams(trained)) };
    let llm = LlmArgs { model: super::ModelArgs { model: cfg.model.path.clone(), adapter: Some(adapter) }, beam_next, ..args.llm.clone() };
    Ok(RunTarget {
        data: args.data.clone().unwrap_or(cfg.data.dir),
        llm,
        prompt,
        out: args.out.clone().unwrap_or(stage.join("eval").join(name)),
    })
}

pub fn run(args: Args) -> Result<()> {
    if let Some([a, b]) = args.compare.as_deref() {
        let c = crate::compare::compare(a, b)?;
        if let Some(out) = &args.out {
            crate::fsutil::write_atomic(out, format!("{}\n", serde_json::to_string_pretty(&c)?).as_bytes())?;
        }
        print!("{}", crate::compare::format_comparison(&c));
        return Ok(());
    }
    let split: Split = args.split.into();
    let target = args.run.as_deref().map(|dir| run_target(dir, &args)).transpose()?;
    let data = match &target {
        Some(t) => t.data.clone(),
        None => args.data.clone().context("--data is required")?,
    };
    let out = match &target {
        Some(t) => t.out.clone(),
        None => args.out.clone().context("--out is required")?,
    };
    let t0 = Instant::now();
    // The ranker is fit on the train instances.
    let splits: &[Split] = if args.method == Some(Method::Ranker) { &[split, Split::Train] } else { &[split] };
    let ds = Dataset::load_splits(&data, splits)?;
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let batch = args.batch_size.unwrap_or_else(|| target.as_ref().map_or(&args.llm, |t| &t.llm).default_batch_size());
    let llm = match (&target, args.method) {
        (Some(t), _) => Some(t.llm.recommender_with(batch, t.prompt.clone())?),
        (None, Some(Method::Llm)) => Some(args.llm.recommender(batch)?),
        _ => None,
    };
    // Answer-in-prompt goes with every model report: the ceiling of a model that answers from
    // its prompt, on the same instances (no model run: seconds).
    let t_prompts = Instant::now();
    let in_prompt = match &llm {
        Some(l) => Some(l.answer_in_prompt(&ds, split, args.limit)?),
        None => None,
    };
    let in_prompt_s = t_prompts.elapsed().as_secs_f64();
    let mut method: Box<dyn Recommender> = match (llm, args.method) {
        (Some(l), _) => Box::new(l),
        (None, Some(Method::Popularity)) => Baseline::Popularity.build(&ds),
        (None, Some(Method::Counter)) => Baseline::Counter.build(&ds),
        (None, Some(Method::Markov)) => Baseline::Markov.build(&ds),
        (None, Some(Method::CounterHour)) => Baseline::CounterHour.build(&ds),
        (None, Some(Method::Ranker)) => {
            let ranker = crate::ranker::Ranker::fit(&ds, &ranker_config(args.ranker_config.as_deref())?)?;
            eprintln!(
                "ranker: fit on {} train instances ({} without their target among the candidates)",
                ranker.fit_instances, ranker.fit_skipped
            );
            Box::new(ranker)
        }
        (None, Some(Method::Llm)) | (None, None) => anyhow::bail!("--method is required"),
    };
    let fit_s = t1.elapsed().as_secs_f64() - in_prompt_s;
    let opts = EvalOptions {
        batch_size: args.batch_size,
        top_n: args.top_n,
        keep_results: args.predictions.is_some(),
        quiet: args.quiet,
        limit: args.limit,
    };
    let (report, results) = evaluate(&ds, split, method.as_mut(), &opts)?;

    let mut json = serde_json::to_value(&report)?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("dataset".into(), data.display().to_string().into());
        obj.insert("load_s".into(), load_s.into());
        obj.insert("fit_s".into(), fit_s.into());
        if let Some(p) = &in_prompt {
            obj.insert("answer_in_prompt".into(), serde_json::to_value(p)?);
        }
    }
    for path in std::iter::once(&out).chain(&args.predictions) {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    let mut text = serde_json::to_string_pretty(&json)?;
    text.push('\n');
    crate::fsutil::write_atomic(&out, text.as_bytes())?;
    if let Some(p) = &args.predictions {
        write_predictions(p, &results)?;
    }
    print!("{}", format_table(&report));
    if let Some(p) = &in_prompt {
        print!("{}", crate::prompt_stats::format_in_prompt(p));
    }
    println!("(loaded in {load_s:.2} s, fitted in {fit_s:.3} s; report: {})", out.display());
    Ok(())
}
