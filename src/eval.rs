//! The evaluation harness: runs any [`Recommender`] over a split's instances in batches, turns
//! each answer into a rank with [`crate::metrics`], and builds the report (JSON + a table).
//!
//! A method answers with a [`Prediction`] per instance: a dense score per POI (baselines) or a
//! ranked id list (an LLM). The harness, not the method, decides ranks and metrics, so every
//! method is measured the same way.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{Dataset, Instance, Split};
use crate::metrics::{GroupedAccumulator, GroupedSummary, Rank, rank_from_list, rank_from_scores};
use crate::stats;

/// A method's answer for one instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// One score per POI id (length = number of POIs); higher is better, 0 = not listed.
    Scores(Vec<f64>),
    /// A ranked list of POI ids (repeats are dropped when ranking). `valid: false` means the
    /// answer could not be parsed: the instance is a miss and counts towards the invalid rate.
    List { ids: Vec<u32>, valid: bool },
}

/// Anything that recommends POIs for instances. `predict` gets up to `batch_size()` instances
/// at a time and returns one prediction per instance, in order.
pub trait Recommender {
    /// The method's name in reports.
    fn name(&self) -> String;

    /// How many instances `predict` should get at a time.
    fn batch_size(&self) -> usize {
        256
    }

    fn predict(&mut self, ds: &Dataset, batch: &[&Instance]) -> Result<Vec<Prediction>>;

    /// Extra per-instance facts of the last `predict` call, in batch order, for
    /// `--predictions` (an LLM's prompt, raw completion and parsed answer); none by default.
    fn take_details(&mut self) -> Vec<serde_json::Value> {
        Vec::new()
    }
}

/// Harness settings.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Overrides the method's batch size.
    pub batch_size: Option<usize>,
    /// How many top POIs of a score method to keep per instance in the results.
    pub top_n: usize,
    /// Keep per-instance results (for `--predictions`).
    pub keep_results: bool,
    /// No progress bar.
    pub quiet: bool,
    /// Evaluate a deterministic sample of this many instances (see [`sample`]).
    pub limit: Option<usize>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { batch_size: None, top_n: 20, keep_results: false, quiet: true, limit: None }
    }
}

/// The instances `--limit n` evaluates: a fixed pseudo-random sample (seed 0) of n instances, in
/// instance order, so every method with the same limit sees the same instances.
pub fn sample(instances: &[Instance], limit: Option<usize>) -> Vec<&Instance> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    match limit {
        Some(n) if n < instances.len() => {
            let mut idx: Vec<usize> = (0..instances.len()).collect();
            idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0));
            idx.truncate(n);
            idx.sort_unstable();
            idx.into_iter().map(|i| &instances[i]).collect()
        }
        _ => instances.iter().collect(),
    }
}

/// One instance's outcome (a line of `--predictions`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceResult {
    pub id: u32,
    pub user: u32,
    /// The target POI id.
    pub target: u32,
    pub is_return: bool,
    /// The target's rank, `null` for a miss.
    pub rank: Option<f64>,
    /// Score methods: the top POIs with a positive score, best first (ties by id). List
    /// methods: the list as answered.
    pub ranked: Vec<u32>,
    /// Score methods: the scores of `ranked`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<f64>>,
    /// List methods: whether the answer parsed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid: Option<bool>,
    /// The method's own facts about this answer ([`Recommender::take_details`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// The evaluation report (`--out`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub method: String,
    pub split: Split,
    /// Number of instances evaluated.
    pub instances: u64,
    pub metrics: GroupedSummary,
    /// List methods only: answers that did not parse, and their share of instances.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid_rate: Option<f64>,
    pub num_pois: u64,
    /// Seconds spent predicting and scoring (excluding loading and fitting).
    pub elapsed_s: f64,
    pub instances_per_s: f64,
}

/// Ranks one prediction; checks that score vectors have one entry per POI.
pub fn rank_of(pred: &Prediction, target: u32, num_pois: usize) -> Result<Rank> {
    match pred {
        Prediction::Scores(s) => {
            if s.len() != num_pois {
                bail!("a method returned {} scores for {num_pois} POIs", s.len());
            }
            Ok(rank_from_scores(s, target))
        }
        Prediction::List { valid: false, .. } => Ok(None),
        Prediction::List { ids, valid: true } => Ok(rank_from_list(ids, target)),
    }
}

/// Top `n` POIs by score (positive scores only), best first, ties by ascending id.
pub fn top_n(scores: &[f64], n: usize) -> Vec<(u32, f64)> {
    let mut v: Vec<(u32, f64)> = scores.iter().enumerate().filter(|(_, s)| **s > 0.0).map(|(i, s)| (i as u32, *s)).collect();
    let cmp = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if v.len() > n && n > 0 {
        v.select_nth_unstable_by(n - 1, cmp);
        v.truncate(n);
    }
    v.truncate(n);
    v.sort_unstable_by(cmp);
    v
}

/// Evaluates `method` on `split`. Returns the report and, with `keep_results`, one result per
/// instance in instance order.
pub fn evaluate(ds: &Dataset, split: Split, method: &mut dyn Recommender, opts: &EvalOptions) -> Result<(EvalReport, Vec<InstanceResult>)> {
    let instances = sample(ds.instances(split), opts.limit);
    if instances.is_empty() {
        bail!("split {split} has no instances to evaluate");
    }
    let batch_size = opts.batch_size.unwrap_or_else(|| method.batch_size()).max(1);
    let num_pois = ds.num_pois();
    let bar = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(instances.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(format!("eval {} on {split}", method.name()));
        b
    };

    let start = Instant::now();
    let mut acc = GroupedAccumulator::default();
    // Each instance's rank, for the bootstrap intervals.
    let mut ranks: Vec<(Rank, bool)> = Vec::with_capacity(instances.len());
    let (mut lists, mut invalid) = (0u64, 0u64);
    let mut results = Vec::new();
    for chunk in instances.chunks(batch_size) {
        let batch: Vec<&Instance> = chunk.to_vec();
        let preds = method.predict(ds, &batch)?;
        let mut details = method.take_details().into_iter();
        if preds.len() != batch.len() {
            bail!("{} returned {} predictions for a batch of {}", method.name(), preds.len(), batch.len());
        }
        let keep = opts.keep_results;
        let top = opts.top_n;
        let outcomes: Vec<Result<(Rank, Option<InstanceResult>)>> = preds
            .par_iter()
            .zip(batch.par_iter())
            .map(|(p, inst)| {
                let rank = rank_of(p, inst.target.poi, num_pois)?;
                let res = keep.then(|| {
                    let (ranked, scores, valid) = match p {
                        Prediction::Scores(s) => {
                            let t = top_n(s, top);
                            (t.iter().map(|x| x.0).collect(), Some(t.iter().map(|x| x.1).collect()), None)
                        }
                        Prediction::List { ids, valid } => (ids.clone(), None, Some(*valid)),
                    };
                    InstanceResult {
                        id: inst.id,
                        user: inst.user,
                        target: inst.target.poi,
                        is_return: inst.is_return,
                        rank,
                        ranked,
                        scores,
                        valid,
                        detail: None,
                    }
                });
                Ok((rank, res))
            })
            .collect();
        // Accumulate sequentially, in instance order, so the sums are deterministic.
        for ((o, p), inst) in outcomes.into_iter().zip(&preds).zip(&batch) {
            let (rank, res) = o?;
            if let Prediction::List { valid, .. } = p {
                lists += 1;
                if !valid {
                    invalid += 1;
                }
            }
            acc.add(rank, inst.is_return);
            ranks.push((rank, inst.is_return));
            results.extend(res.map(|r| InstanceResult { detail: details.next(), ..r }));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let n = instances.len() as u64;
    let report = EvalReport {
        method: method.name(),
        split,
        instances: n,
        metrics: with_intervals(acc.summary(), &ranks),
        invalid: (lists > 0).then_some(invalid),
        invalid_rate: (lists > 0).then(|| invalid as f64 / n as f64),
        num_pois: num_pois as u64,
        elapsed_s: elapsed,
        instances_per_s: if elapsed > 0.0 { n as f64 / elapsed } else { f64::INFINITY },
    };
    Ok((report, results))
}

/// The summary with each group's 95% bootstrap intervals.
fn with_intervals(mut s: GroupedSummary, ranks: &[(Rank, bool)]) -> GroupedSummary {
    let group = |keep: &dyn Fn(bool) -> bool| {
        stats::bootstrap(&stats::per_instance(&ranks.iter().filter(|r| keep(r.1)).map(|r| r.0).collect::<Vec<_>>()))
    };
    s.all.ci95 = group(&|_| true);
    s.returns.ci95 = group(&|is_return| is_return);
    s.discovery.ci95 = group(&|is_return| !is_return);
    s
}

/// The report as a table for people.
pub fn format_table(r: &EvalReport) -> String {
    let mut s = format!(
        "{} on {} ({} instances, {} POIs, {:.2} s, {:.3} instances/s)\n",
        r.method, r.split, r.instances, r.num_pois, r.elapsed_s, r.instances_per_s
    );
    s.push_str(&format!(
        "{:<10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}  {}\n",
        "group", "n", "Acc@1", "Acc@5", "Acc@10", "NDCG@5", "NDCG@10", "MRR", "MRR 95% CI"
    ));
    for (name, g) in [("all", &r.metrics.all), ("return", &r.metrics.returns), ("discovery", &r.metrics.discovery)] {
        match g.metrics {
            Some(m) => s.push_str(&format!(
                "{:<10} {:>7} {:>7.4} {:>7.4} {:>7.4} {:>7.4} {:>7.4} {:>7.4}  {}\n",
                name,
                g.n,
                m.acc1,
                m.acc5,
                m.acc10,
                m.ndcg5,
                m.ndcg10,
                m.mrr,
                g.ci95.map_or(String::new(), |ci| format!("[{:.4}, {:.4}]", ci[5].0, ci[5].1))
            )),
            None => s.push_str(&format!("{:<10} {:>7} {:>7}\n", name, g.n, "-")),
        }
    }
    if let Some(rate) = r.invalid_rate {
        s.push_str(&format!("invalid answers: {} ({:.2}%)\n", r.invalid.unwrap_or(0), rate * 100.0));
    }
    s
}

/// Writes results as JSONL, one instance per line.
pub fn write_predictions(path: &Path, results: &[InstanceResult]) -> Result<()> {
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::new(f);
    for r in results {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n")?;
    }
    w.flush().with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_orders_by_score_then_id_and_skips_zero() {
        let s = [0.0, 2.0, 5.0, 2.0, 0.5, 0.0];
        assert_eq!(top_n(&s, 3), vec![(2, 5.0), (1, 2.0), (3, 2.0)]);
        assert_eq!(top_n(&s, 10).len(), 4);
        assert!(top_n(&s, 0).is_empty());
    }

    #[test]
    fn invalid_lists_are_misses_and_scores_must_cover_all_pois() {
        let p = Prediction::List { ids: vec![3, 4], valid: false };
        assert_eq!(rank_of(&p, 3, 10).unwrap(), None);
        let p = Prediction::List { ids: vec![3, 3, 4], valid: true };
        assert_eq!(rank_of(&p, 4, 10).unwrap(), Some(2.0));
        assert!(rank_of(&Prediction::Scores(vec![1.0; 3]), 0, 10).is_err());
    }
}
