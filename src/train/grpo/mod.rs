//! The `grpo-train` loop: group-relative policy optimisation of the LoRA adapter on the
//! recommendation rewards ([`rewards`]), one [`loss::step`] per optimizer step.
//!
//! Each step takes the next `prompts_per_step` train instances (a seeded order per epoch),
//! builds their prompts ([`crate::prompt`]), samples `group` completions each (one shared
//! prefill per prompt, seeded by the run seed and the instance's position in the run), parses
//! them ([`parse_answer`]) and scores every reward term against the instance's ground truth.
//! The weighted total drives the update; every term, the sampled lists' Acc@1/Acc@k and the
//! well-formed rate are logged. Validation, `best/`, checkpoints, resume and Ctrl-C work as in
//! the SFT warm-up ([`crate::train`]).
//!
//! With `grpo.form = "next"` a prompt is instead the user's check-ins in the whole-history
//! form and a completion is one POI code, or with `grpo.codes_per_sample > 1` a ranked list of
//! distinct codes, sampled under the codebook's trie and scored as a list ([`score_codes`]);
//! validation then ranks by the next code, as `eval --beam-next` does.
//!
//! The policy starts from `grpo.init_adapter` (by default the SFT warm-up's `best/`), copied
//! into the run directory as `init/` so a resumed run keeps the same start even if the SFT
//! run changes. The KL reference is that starting policy, frozen (`grpo.reference = "init"`),
//! or the base model (`"base"`). LoRA dropout is off in GRPO: the probability ratio of the
//! surrogate must be exactly 1 for the policy that sampled.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

pub mod advantages;
pub mod config;
pub mod loss;
pub mod rewards;

use anyhow::{Context, Result, ensure};
use serde_json::{Map, Value, json};

use crate::answer::{ANSWER_CLOSE, AnswerIds, ParsedAnswer, parse_answer};
use crate::beam::CodeTrie;
use crate::constrain::AnswerConstraint;
use crate::data::{Dataset, Instance};
use crate::dist::Dist;
use crate::generate::{Completion, SamplingConfig};
use crate::history_prompt::{next_checkin_budget, next_checkin_prompt};
use crate::prompt::{PromptBuilder, PromptContext, candidate_stats};
use crate::seed::{SEED_SAMPLING, derive_seed};
use crate::train::config::{RunConfig, Stage};
use crate::train::optim::{AdamW, AdamWParams};
use crate::train::schedule::lr_at;
use crate::train::{EpochOrder, RunOptions, StageLoop, StageStart, StageSummary, load_model, progress_bar, train_instances};
use config::{GrpoForm, ReferencePolicy};
use loss::{LossConfig, NextCodes, StepConfig, StepReport};
use rewards::{RewardBreakdown, RewardInput, score};

const STAGE: Stage = Stage::Grpo;

/// The copy of the starting adapter inside the run directory.
const INIT_DIR: &str = "init";

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrpoSummary {
    #[serde(flatten)]
    pub stage: StageSummary,
    /// Mean total reward of the first and the last step of this invocation.
    pub first_reward: Option<f64>,
    pub last_reward: Option<f64>,
    /// Mean seconds per optimizer step over the whole run.
    pub step_seconds: f64,
}

/// The adapter `grpo.init_adapter` names: `sft` (the warm-up's `best/`, or its `final/` when
/// it never validated), `none`, or a folder.
pub fn init_adapter(cfg: &RunConfig) -> Result<Option<PathBuf>> {
    match cfg.grpo.init_adapter.as_str() {
        "none" => Ok(None),
        "sft" => {
            // best/ when the warm-up validated, else its final adapter.
            let sft = cfg.stage_dir(Stage::Sft);
            let found = ["best", "final"].iter().map(|d| sft.join(d)).find(|d| d.join("adapter_config.json").is_file());
            let dir = found.with_context(|| {
                format!(
                    "grpo.init_adapter = \"sft\" starts from the SFT warm-up's adapter, but {} has neither best/ nor final/: run `refine-poi sft-warmup` with this config first, or set grpo.init_adapter to \"none\" (a fresh adapter) or an adapter folder",
                    sft.display()
                )
            })?;
            Ok(Some(dir))
        }
        path => {
            let dir = PathBuf::from(path);
            ensure!(
                dir.join("adapter_config.json").is_file(),
                "grpo.init_adapter: {} is not a PEFT adapter folder (no adapter_config.json)",
                dir.display()
            );
            Ok(Some(dir))
        }
    }
}

/// The settings of one step, from the config; `constraint` is the answer grammar when
/// `grpo.constrained` is on.
pub fn step_config(cfg: &RunConfig, constraint: Option<AnswerConstraint>) -> StepConfig {
    let g = &cfg.grpo;
    StepConfig {
        group: g.group,
        loss: LossConfig {
            epsilon: g.epsilon,
            epsilon_high: g.epsilon_high,
            beta: g.beta,
            loss_norm: g.loss_norm,
            max_completion_tokens: g.max_new_tokens,
        },
        sampling: SamplingConfig {
            greedy: false,
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
            max_new_tokens: g.max_new_tokens,
            stop: vec![ANSWER_CLOSE.to_string()],
            seed: 0,
        },
        constraint,
        next_code: None,
        grad_prompt_tokens: g.grad_prompt_tokens,
        scale_rewards: g.scale_rewards,
        skip_zero_signal: g.skip_zero_signal,
        updates_per_batch: g.updates_per_batch,
        max_grad_norm: g.train.max_grad_norm,
    }
}

/// What the reward function saw of one sampled completion.
struct Scored {
    breakdown: RewardBreakdown,
    /// The target's rank in the parsed list (1-based), if listed.
    rank: Option<usize>,
    /// At least one in-range id was read (eval's notion of a valid answer).
    valid: bool,
    well_formed: bool,
}

impl Scored {
    /// As numbers, to gather across ranks: prompt index, total, rank (0: not listed), valid,
    /// well-formed, then every term in [`rewards::REWARDS`] order.
    fn encode(&self, prompt: usize, out: &mut Vec<f64>) {
        out.extend([prompt as f64, self.breakdown.total, self.rank.unwrap_or(0) as f64]);
        out.extend([self.valid, self.well_formed].map(|b| f64::from(u8::from(b))));
        out.extend(self.breakdown.terms.iter().map(|t| t.1));
    }

    fn decode(row: &[f64]) -> Scored {
        let terms = rewards::REWARDS.iter().zip(&row[5..]).map(|(r, &v)| (r.name, v)).collect();
        Scored {
            breakdown: RewardBreakdown { terms, total: row[1] },
            rank: (row[2] > 0.0).then_some(row[2] as usize),
            valid: row[3] > 0.0,
            well_formed: row[4] > 0.0,
        }
    }
}

/// Every rank's scored completions, in prompt order (each prompt's in sampling order).
fn gather_scored(dist: &Dist, mine: Vec<(usize, Scored)>) -> Result<Vec<Scored>> {
    if dist.size() == 1 {
        return Ok(mine.into_iter().map(|(_, s)| s).collect());
    }
    let width = 5 + rewards::REWARDS.len();
    let mut rows = Vec::with_capacity(mine.len() * width);
    for (p, s) in &mine {
        s.encode(*p, &mut rows);
    }
    let all = dist.gather_f64(&rows)?;
    let mut rows: Vec<&[f64]> = all.chunks_exact(width).collect();
    rows.sort_by_key(|r| r[0] as usize);
    Ok(rows.into_iter().map(Scored::decode).collect())
}

/// Scores a sample of the next-code form (one code, or a ranked list of distinct codes) for
/// `inst` with every reward of the config, as a list of its POIs with k its length: hit and
/// rank read the target's position, soft accuracy credits a near miss.
fn score_codes(ds: &Dataset, cfg: &RunConfig, trie: &CodeTrie, inst: &Instance, c: &Completion) -> Result<Scored> {
    let ids = c
        .tokens
        .chunks(trie.levels())
        .map(|code| trie.poi_of_tokens(code).with_context(|| format!("sampled tokens {:?} are not codes", c.tokens)))
        .collect::<Result<Vec<u32>>>()?;
    let items = ids.len();
    let parsed = ParsedAnswer { ids, has_answer_tag: true, closed: true, items, well_formed: true, ..Default::default() };
    let input = RewardInput {
        answer: &parsed,
        completion: &c.text,
        completion_tokens: c.tokens.len(),
        target: inst.target.poi,
        k: items,
        pois: ds.pois(),
        history: ds.history(inst),
        reasoning: false,
        params: &cfg.rewards.params,
    };
    let breakdown = score(&input, &cfg.rewards.weights);
    Ok(Scored { breakdown, rank: parsed.rank_of(inst.target.poi), valid: true, well_formed: true })
}

/// Scores a completion for `inst` with every reward of the config; the rewards read it in dense
/// ids (`naming`).
fn score_completion(ds: &Dataset, cfg: &RunConfig, naming: AnswerIds, inst: &Instance, c: &Completion) -> Scored {
    let text = naming.to_raw(&c.text);
    let parsed = parse_answer(&text, ds.num_pois());
    let input = RewardInput {
        answer: &parsed,
        completion: &text,
        completion_tokens: c.tokens.len(),
        target: inst.target.poi,
        k: cfg.prompt.k,
        pois: ds.pois(),
        history: ds.history(inst),
        reasoning: cfg.prompt.reasoning,
        params: &cfg.rewards.params,
    };
    let breakdown = score(&input, &cfg.rewards.weights);
    let well_formed = breakdown.get("format") == Some(1.0);
    Scored { breakdown, rank: parsed.rank_of(inst.target.poi), valid: !parsed.ids.is_empty(), well_formed }
}

/// The `metrics.jsonl` line of a step: rewards (total and per term), the sampled lists'
/// quality, the objective's statistics and the time split.
fn step_record(step: u64, lr: f64, k: usize, scored: &[Scored], report: &StepReport, step_s: f64, elapsed_s: f64) -> Value {
    let n = scored.len().max(1) as f64;
    let mean = |f: &dyn Fn(&Scored) -> f64| scored.iter().map(f).sum::<f64>() / n;
    let totals: Vec<f64> = scored.iter().map(|s| s.breakdown.total).collect();
    let reward_mean = totals.iter().sum::<f64>() / n;
    let reward_std = (totals.iter().map(|r| (r - reward_mean).powi(2)).sum::<f64>() / n).sqrt();
    let mut terms = Map::new();
    if let Some(first) = scored.first() {
        for (i, (name, _)) in first.breakdown.terms.iter().enumerate() {
            terms.insert((*name).to_string(), json!(mean(&|s| s.breakdown.terms[i].1)));
        }
    }
    let lens = &report.completion_tokens;
    json!({
        "step": step,
        "lr": lr,
        "reward": reward_mean,
        "reward_std": reward_std,
        "rewards": terms,
        "acc1": mean(&|s| f64::from(u8::from(s.rank == Some(1)))),
        "acc_k": mean(&|s| f64::from(u8::from(s.rank.is_some_and(|r| r <= k)))),
        "valid": mean(&|s| f64::from(u8::from(s.valid))),
        "well_formed": mean(&|s| f64::from(u8::from(s.well_formed))),
        "completion_tokens": lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
        "loss": report.loss.loss,
        "kl": report.loss.kl,
        "clip_fraction": report.loss.clip_fraction,
        "grad_norm": report.grad_norm,
        "skipped_nonfinite": report.skipped_updates > 0,
        "groups": report.groups.groups(),
        "zero_signal_groups": report.groups.zero_signal_groups,
        "reward_group_std": report.groups.mean_std(),
        "time": report.times,
        "step_s": step_s,
        "elapsed_s": elapsed_s,
    })
}

/// Runs (or resumes) the GRPO stage described by `cfg`.
pub fn run(cfg: &RunConfig, opts: &RunOptions) -> Result<GrpoSummary> {
    let t = &cfg.grpo.train;
    let dist = &opts.dist;
    // A missing SFT start is an error before anything is written.
    let StageStart { lock: _lock, run, latest, config_hash, ds } = StageStart::open(cfg, STAGE, opts, || init_adapter(cfg).map(|_| ()))?;
    let root = run.root.clone();
    let examples = train_instances(&ds, cfg, t.seed)?;
    // The start: the run's own copy when it has one (a resumed run), else the configured
    // adapter, copied in (atomically: a run killed before the copy exists starts over from the
    // configured adapter, not from a fresh one).
    let init_copy = root.join(INIT_DIR);
    let copied = opts.resume && init_copy.join("adapter_model.safetensors").is_file();
    let start = if copied { Some(init_copy.clone()) } else { init_adapter(cfg)? };
    let mut loaded = load_model(cfg, &ds, start.as_deref(), "grpo.init_adapter", t.seed)?;
    loaded.model.set_lora_dropout(0.0);
    // Rank 0 keeps the copy; the other ranks read the same adapter it copies.
    if !copied && dist.is_writer() {
        let from = json!({ "init_adapter": start.as_ref().map(|p| p.display().to_string()) });
        run.save_adapter_copy(INIT_DIR, &loaded.model, &loaded.adapter_base(), &from)
            .with_context(|| format!("cannot write {}", init_copy.display()))?;
    }
    if cfg.grpo.reference == ReferencePolicy::Init {
        loaded.model.pin_reference_adapter()?;
    }
    let prompts = PromptBuilder::new(cfg.prompt.clone(), &loaded.tokenizer)?;
    let naming = AnswerIds::new(cfg.prompt.ids, ds.codebook())?;
    let stats = candidate_stats(&cfg.prompt, &ds);
    let per_step = cfg.grpo.prompts_per_step as u64;
    let total = t.total_steps(examples.len(), cfg.grpo.prompts_per_step) as u64;
    let mut opt = AdamW::new(loaded.model.lora_vars(), AdamWParams::from_train(t))?;
    let (mut state, mut log) =
        run.restore_or_start(dist.is_writer(), latest.as_deref(), &mut loaded.model, &mut opt, STAGE, t.seed, total, &config_hash)?;
    let constraint = if cfg.grpo.constrained {
        Some(AnswerConstraint::new(&loaded.tokenizer, cfg.prompt.k, ds.num_pois(), naming.codebook())?)
    } else {
        None
    };
    // The next-code form: what a sample is, and the token budget of its history prompts.
    let next = match cfg.grpo.form {
        GrpoForm::Next => {
            let codebook = ds.codebook().context("grpo.form = \"next\" needs the dataset's codebook.json (preprocess writes it)")?;
            let trie = Arc::new(CodeTrie::new(codebook, &loaded.tokenizer)?);
            Some((NextCodes { trie, per_sample: cfg.grpo.codes_per_sample }, next_checkin_budget(&cfg.prompt, &loaded.model, codebook)))
        }
        GrpoForm::List => None,
    };
    let mut step_cfg = StepConfig { next_code: next.as_ref().map(|(n, _)| n.clone()), ..step_config(cfg, constraint) };
    if let Some((n, _)) = &next {
        // Dr. GRPO's constant: a one-code completion's length, not max_new_tokens; a list of
        // codes is one term.
        step_cfg.loss.max_completion_tokens = if n.per_sample == 1 { n.trie.levels() } else { 1 };
    }
    if !opts.quiet {
        let from = start.as_ref().map_or("a fresh adapter".to_string(), |d| d.display().to_string());
        let reference = match cfg.grpo.reference {
            ReferencePolicy::Init => "the starting policy",
            ReferencePolicy::Base => "the base model",
        };
        eprintln!(
            "grpo-train: {} train instances, {total} steps of {per_step} prompt(s) x {} samples, from {from} (KL to {reference}); writing {}",
            examples.len(),
            cfg.grpo.group,
            root.display()
        );
    }

    let base = loaded.adapter_base();
    let bar = progress_bar(total, state.step, opts.quiet, "grpo");
    let mut cadence = StageLoop::new(&run, t, base, total, state.step, latest.clone(), opts);
    cadence.val.constrained = cfg.grpo.constrained;
    cadence.val.beam_next = cfg.next_code_beams(STAGE);
    let (mut first_reward, mut last_reward) = (None, None);
    let mut order = EpochOrder::new(t.seed, examples.len());
    let k = cfg.prompt.k;

    while state.step < total {
        if cadence.stop_before(&opts.stop, state.step)? {
            break;
        }
        let step = state.step;
        let started = Instant::now();
        let lr = lr_at(t, step as usize, total as usize);
        let positions: Vec<u64> = (state.examples_seen..state.examples_seen + per_step).collect();
        let insts: Vec<&Instance> = positions.iter().map(|&g| examples[order.example(g)]).collect();
        let prompt_ids = insts
            .iter()
            .map(|inst| match &next {
                Some((_, budget)) => next_checkin_prompt(&ds, &cfg.prompt, &loaded.tokenizer, inst, *budget),
                None => Ok(prompts.build(&PromptContext::from_instance_with(&ds, inst, stats.as_ref()))?.ids),
            })
            .collect::<Result<Vec<_>>>()?;
        let seeds: Vec<u64> = positions.iter().map(|&g| derive_seed(t.seed, SEED_SAMPLING, g)).collect();
        let mut mine = Vec::with_capacity(insts.len() * cfg.grpo.group);
        let mut reward = |p: usize, c: &Completion| -> Result<f64> {
            let s = match &next {
                Some((n, _)) => score_codes(&ds, cfg, &n.trie, insts[p], c)?,
                None => score_completion(&ds, cfg, naming, insts[p], c),
            };
            let total = s.breakdown.total;
            mine.push((p, s));
            Ok(total)
        };
        let report = loss::step(&loaded.model, &loaded.tokenizer, &prompt_ids, &seeds, &mut reward, &step_cfg, &mut opt, lr, None, dist)
            .with_context(|| format!("GRPO step {}", step + 1))?;
        let scored = gather_scored(dist, mine)?;
        let step_s = started.elapsed().as_secs_f64();

        state.step += 1;
        state.examples_seen += per_step;
        state.tokens_seen += report.completion_tokens.iter().sum::<usize>() as u64;
        state.elapsed_s += step_s;
        let record = step_record(state.step, lr, k, &scored, &report, step_s, state.elapsed_s);
        let reward_mean = record["reward"].as_f64().unwrap_or_default();
        first_reward.get_or_insert(reward_mean);
        last_reward = Some(reward_mean);
        log.log(&record)?;
        cadence.record_finite(report.skipped_updates == 0, &mut state)?;
        bar.set_position(state.step);
        bar.set_message(format!(
            "reward {reward_mean:.3} acc@{k} {:.2} kl {:.4} {step_s:.1}s/step",
            record["acc_k"].as_f64().unwrap_or_default(),
            report.loss.kl
        ));

        cadence.end_step(&loaded, &opt, &ds, &cfg.prompt, &opts.stop, &mut state, &mut log, &bar, &format!("reward {reward_mean:.3}"))?;
    }
    let stage = cadence.finish(&loaded.model, &opt, &state)?;
    bar.finish_and_clear();
    Ok(GrpoSummary {
        stage,
        first_reward,
        last_reward,
        step_seconds: if state.step > 0 { state.elapsed_s / state.step as f64 } else { 0.0 },
    })
}
