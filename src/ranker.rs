//! `--method ranker`: a learned ranker over the user's visited POIs and the retrieval
//! candidates ([`crate::retrieval`]), the strongest non-LLM method the tool ships.
//!
//! Each candidate is a row of [`FEATURES`]: the user's visit counts (all, around the target's
//! time of day, their recency), counter-hour's own rank, the user's and everyone's transitions
//! from the current POI, distance, popularity (all and around the hour), category affinity and
//! the similar users' visits. A linear score `w·x` ranks the candidates.
//!
//! **Fitting.** `w` is fit on the train instances (whose statistics leave out their own target
//! and everything after it, see [`crate::retrieval`]) as a pairwise ranker: for each instance,
//! the target's row minus a sampled candidate's row is a positive example and its negation a
//! negative one, and an L2-regularised logistic regression without intercept (linfa's, L-BFGS)
//! learns `w`. Features are divided by their standard deviation over the sampled rows first,
//! so the penalty treats them alike. The negatives are drawn from the seed, so a fit is a pure
//! function of the data and the config. Half of the negatives are the user's visited POIs and
//! half the others ([`NegativeSampling`]). The settings are chosen on val (`docs/results.md`).

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use linfa::prelude::*;
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Instance, Poi, Split};
use crate::eval::{Prediction, Recommender};
use crate::retrieval::{CandidateConfig, Found, Query, TrainStats, pick};
use crate::seed::{SEED_RANKER, derive_seed};
use crate::visits::clock_distance_min;

/// Options of the ranker (a `[ranker]` table in configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RankerConfig {
    /// The candidates beyond the user's visited POIs (which are always candidates).
    pub candidates: CandidateConfig,
    /// Candidates sampled per train instance to pair with its target.
    pub negatives: usize,
    /// How they are drawn.
    pub negative_sampling: NegativeSampling,
    /// L2 penalty of the logistic regression.
    pub alpha: f64,
    pub max_iterations: u64,
    /// Fit on this many train instances, the latest ones (0 = all): their histories are as long
    /// as val's and test's.
    pub train_instances: usize,
    pub seed: u64,
}

impl Default for RankerConfig {
    fn default() -> Self {
        RankerConfig {
            candidates: CandidateConfig { transitions: 30, nearby: 30, similar: 30, ..Default::default() },
            negatives: 20,
            negative_sampling: NegativeSampling::Stratified,
            alpha: 1e-3,
            max_iterations: 50,
            train_instances: 20_000,
            seed: 0,
        }
    }
}

impl RankerConfig {
    pub fn validate(&self) -> Result<()> {
        self.candidates.validate()?;
        ensure!(self.negatives >= 1, "ranker.negatives must be at least 1");
        ensure!(self.alpha.is_finite() && self.alpha >= 0.0, "ranker.alpha must be a non-negative number");
        ensure!(self.max_iterations >= 1, "ranker.max_iterations must be at least 1");
        Ok(())
    }
}

/// How a train instance's negatives are drawn from its candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativeSampling {
    /// Uniformly: most candidates are POIs the user never visited, so most pairs teach "a
    /// visited POI beats a new one", and new POIs rarely reach the top 10.
    Uniform,
    /// Half from the user's visited POIs, half from the others, so that the pairs also compare
    /// POIs within each kind. On NYC val (10 negatives) it trades .006 of MRR for discovery
    /// Acc@10 .058 instead of .024 (docs/results.md).
    Stratified,
}

/// `count` of `candidates` (indices into `rows`, never `target`) drawn as `how` says.
fn draw_negatives(rows: &[[f64; F]], target: usize, count: usize, how: NegativeSampling, rng: &mut impl rand::Rng) -> Vec<usize> {
    let others: Vec<usize> = (0..rows.len()).filter(|&i| i != target).collect();
    match how {
        NegativeSampling::Uniform => others.choose_multiple(rng, count).copied().collect(),
        NegativeSampling::Stratified => {
            let (seen, new): (Vec<usize>, Vec<usize>) = others.iter().partition(|&&i| rows[i][VISITED] == 1.0);
            let mut drawn: Vec<usize> = seen.choose_multiple(rng, count / 2).copied().collect();
            let rest = count - drawn.len();
            drawn.extend(new.choose_multiple(rng, rest).copied());
            drawn
        }
    }
}

/// The features of a candidate, in row order.
pub const FEATURES: [&str; 25] = [
    "visited",
    "ln1p_visits",
    "ln1p_visits_near_hour",
    "visit_share",
    "counter_hour_reciprocal_rank",
    "recency_week",
    "recency_day",
    "is_current",
    "in_trajectory",
    "ln1p_user_transitions",
    "ln1p_transitions",
    "transition_share",
    "transition_reciprocal_rank",
    "ln1p_distance_km",
    "ln1p_popularity",
    "ln1p_popularity_near_hour",
    "category_share",
    "similar_users",
    "new_x_ln1p_transitions",
    "new_x_ln1p_popularity_near_hour",
    "new_x_similar_users",
    "new_x_ln1p_distance_km",
    "new_x_transition_share",
    "new_x_exploration",
    "new_x_short_history",
];
const F: usize = FEATURES.len();
/// The row index of `visited`.
const VISITED: usize = 0;

/// One instance's candidates (visited POIs first, then the retrieved ones) and their rows.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateRows {
    pub pois: Vec<u32>,
    pub rows: Vec<[f64; F]>,
}

/// What a user's history says about one POI.
#[derive(Default, Clone, Copy)]
struct Visit {
    total: u32,
    near: u32,
    last_utc: i64,
}

/// The candidates of `q` and their features, from statistics that leave `q`'s own check-ins
/// out ([`TrainStats::view`]).
pub fn candidate_rows(stats: &TrainStats, pois: &[Poi], q: &Query, cfg: &CandidateConfig) -> CandidateRows {
    let view = stats.view(q);
    let Some(current) = q.current() else { return CandidateRows { pois: Vec::new(), rows: Vec::new() } };
    let mut visits: HashMap<u32, Visit> = HashMap::new();
    let mut categories: HashMap<&str, u32> = HashMap::new();
    let mut user_transitions: HashMap<u32, u32> = HashMap::new();
    for (i, c) in q.history.iter().enumerate() {
        let v = visits.entry(c.poi).or_default();
        v.total += 1;
        v.near += u32::from(clock_distance_min(c.local_time(), q.target_local) <= cfg.hour_window_min);
        v.last_utc = c.utc;
        *categories.entry(pois[c.poi as usize].category.as_str()).or_default() += 1;
        if i > 0 && q.history[i - 1].poi == current {
            *user_transitions.entry(c.poi).or_default() += 1;
        }
    }
    // Counter-hour's order: more visits around the hour, then more visits, then popularity.
    let mut visited: Vec<u32> = visits.keys().copied().collect();
    let popularity: HashMap<u32, u32> = visited.iter().map(|&p| (p, view.popularity(p))).collect();
    visited.sort_by(|a, b| {
        let (va, vb) = (visits[a], visits[b]);
        vb.near.cmp(&va.near).then(vb.total.cmp(&va.total)).then(popularity[b].cmp(&popularity[a])).then(a.cmp(b))
    });
    let counter_hour_rank: HashMap<u32, usize> = visited.iter().enumerate().map(|(i, &p)| (p, i + 1)).collect();

    // The transitions and similar users are features of every candidate, whatever the sizes
    // of their candidate lists: found once, for both.
    let found = Found {
        transitions: view.transitions_from(current),
        similar: view.similar_users_pois(q.history, cfg.similar_users),
        ..view.find(pois, q, &CandidateConfig { transitions: 0, similar: 0, ..cfg.clone() })
    };
    let out_degree: u32 = found.transitions.iter().map(|t| t.1).sum();
    let transition: HashMap<u32, (u32, usize)> = found.transitions.iter().enumerate().map(|(i, &(p, n))| (p, (n, i + 1))).collect();
    let similar_max = found.similar.first().map_or(0.0, |s| s.1);
    let similar: HashMap<u32, f64> = found.similar.iter().copied().collect();

    let mut candidates = visited.clone();
    candidates.extend(pick(pois, q, cfg, &found, |p| visits.contains_key(&p)).iter().map(|c| c.poi));
    let trajectory_start = trajectory_start(q);
    let history_len = q.history.len() as f64;
    // How often this user goes somewhere new: first visits per check-in of the history.
    let exploration = visits.len() as f64 / history_len;
    let short_history = 1.0 / (2.0 + history_len).ln();
    let origin = &pois[current as usize];
    let rows = candidates
        .iter()
        .map(|&p| {
            let v = visits.get(&p).copied().unwrap_or_default();
            let seen = f64::from(u8::from(v.total > 0));
            let hours_ago = (q.target_utc - v.last_utc) as f64 / 3600.0;
            let (t_count, t_rank) = transition.get(&p).copied().unwrap_or((0, 0));
            let poi = &pois[p as usize];
            let distance = crate::data::haversine_km(origin.lat, origin.lon, poi.lat, poi.lon);
            let ln_transitions = f64::from(t_count).ln_1p();
            let ln_near_popularity = f64::from(view.popularity_around(p, q.target_local, cfg.hour_window_min)).ln_1p();
            let similar = if similar_max > 0.0 { similar.get(&p).copied().unwrap_or(0.0) / similar_max } else { 0.0 };
            let new = 1.0 - seen;
            let transition_share = if out_degree > 0 { f64::from(t_count) / f64::from(out_degree) } else { 0.0 };
            [
                seen,
                f64::from(v.total).ln_1p(),
                f64::from(v.near).ln_1p(),
                f64::from(v.total) / history_len,
                counter_hour_rank.get(&p).map_or(0.0, |&r| 1.0 / r as f64),
                if v.total > 0 { (-hours_ago / (7.0 * 24.0)).exp() } else { 0.0 },
                if v.total > 0 { (-hours_ago / 24.0).exp() } else { 0.0 },
                f64::from(u8::from(p == current)),
                f64::from(u8::from(q.history[trajectory_start..].iter().any(|c| c.poi == p))),
                f64::from(user_transitions.get(&p).copied().unwrap_or(0)).ln_1p(),
                ln_transitions,
                transition_share,
                if t_rank > 0 { 1.0 / t_rank as f64 } else { 0.0 },
                distance.ln_1p(),
                f64::from(view.popularity(p)).ln_1p(),
                ln_near_popularity,
                f64::from(categories.get(poi.category.as_str()).copied().unwrap_or(0)) / history_len,
                similar,
                new * ln_transitions,
                new * ln_near_popularity,
                new * similar,
                new * distance.ln_1p(),
                new * transition_share,
                new * exploration,
                new * short_history,
            ]
        })
        .collect();
    CandidateRows { pois: candidates, rows }
}

/// Where the current trajectory starts in the history: after the last gap over 24 hours (the
/// protocol's trajectory gap), as [`crate::prompt::PromptContext::from_checkins`] splits it.
fn trajectory_start(q: &Query) -> usize {
    let h = q.history;
    (1..h.len()).rev().find(|&i| h[i].utc - h[i - 1].utc > 24 * 3600).unwrap_or(0)
}

/// A fitted ranker: the train statistics and the weights of the standardised features.
#[derive(Debug)]
pub struct Ranker {
    config: RankerConfig,
    stats: TrainStats,
    /// Per feature: weight / standard deviation, so that `score = weights · row`.
    weights: [f64; F],
    /// Train instances used, and those skipped because no candidate was their target.
    pub fit_instances: usize,
    pub fit_skipped: usize,
}

impl Ranker {
    /// Fits on the train instances of `ds` (which must be loaded).
    pub fn fit(ds: &Dataset, config: &RankerConfig) -> Result<Ranker> {
        config.validate()?;
        let train = ds.instances(Split::Train);
        ensure!(!train.is_empty(), "the ranker is fit on the train instances, and the dataset has none loaded");
        let stats = TrainStats::new(ds);
        // Instances are in (user, time) order; the latest ones by target time go first when capped.
        let mut chosen: Vec<&Instance> = train.iter().collect();
        if config.train_instances > 0 && config.train_instances < chosen.len() {
            chosen.sort_by_key(|i| std::cmp::Reverse((i.target.utc, i.id)));
            chosen.truncate(config.train_instances);
            chosen.sort_by_key(|i| i.id);
        }
        let pairs: Vec<Option<Vec<[f64; F]>>> = chosen
            .par_iter()
            .map(|inst| {
                let c = candidate_rows(&stats, ds.pois(), &Query::from_instance(ds, inst), &config.candidates);
                let target = c.pois.iter().position(|&p| p == inst.target.poi)?;
                let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(config.seed, SEED_RANKER, u64::from(inst.id)));
                let negatives = draw_negatives(&c.rows, target, config.negatives, config.negative_sampling, &mut rng);
                Some(negatives.iter().map(|&n| std::array::from_fn(|f| c.rows[target][f] - c.rows[n][f])).collect())
            })
            .collect();
        let fit_skipped = pairs.iter().filter(|p| p.is_none()).count();
        let diffs: Vec<[f64; F]> = pairs.into_iter().flatten().flatten().collect();
        ensure!(!diffs.is_empty(), "no train instance has its target among its candidates: nothing to fit the ranker on");
        // Scale: the standard deviation of each feature's pairwise differences (1 where constant).
        let n = diffs.len() as f64;
        let scale: [f64; F] = std::array::from_fn(|f| {
            let mean = diffs.iter().map(|d| d[f]).sum::<f64>() / n;
            let var = diffs.iter().map(|d| (d[f] - mean).powi(2)).sum::<f64>() / n;
            if var > 1e-12 { var.sqrt() } else { 1.0 }
        });
        // Each difference is a positive example and its negation a negative one.
        let mut x = ndarray::Array2::<f64>::zeros((2 * diffs.len(), F));
        let mut y = Vec::with_capacity(2 * diffs.len());
        for (i, d) in diffs.iter().enumerate() {
            for f in 0..F {
                x[[2 * i, f]] = d[f] / scale[f];
                x[[2 * i + 1, f]] = -d[f] / scale[f];
            }
            y.extend([true, false]);
        }
        let data = linfa::Dataset::new(x, ndarray::Array1::from(y));
        let model = linfa_logistic::LogisticRegression::default()
            .with_intercept(false)
            .alpha(config.alpha)
            .max_iterations(config.max_iterations)
            .fit(&data)
            .context("fitting the ranker's logistic regression")?;
        let sign = if model.labels().pos.class { 1.0 } else { -1.0 };
        let params = model.params();
        let weights = std::array::from_fn(|f| sign * params[f] / scale[f]);
        Ok(Ranker { config: config.clone(), stats, weights, fit_instances: chosen.len() - fit_skipped, fit_skipped })
    }

    /// The weight of each feature (per unit of the raw feature).
    pub fn weights(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        FEATURES.iter().copied().zip(self.weights)
    }

    /// The candidates of `q`, best first.
    pub fn rank(&self, pois: &[Poi], q: &Query) -> Vec<u32> {
        let c = candidate_rows(&self.stats, pois, q, &self.config.candidates);
        let mut scored: Vec<(u32, f64)> =
            c.pois.iter().zip(&c.rows).map(|(&p, row)| (p, row.iter().zip(&self.weights).map(|(x, w)| x * w).sum())).collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.into_iter().map(|s| s.0).collect()
    }
}

impl Recommender for Ranker {
    fn name(&self) -> String {
        "ranker".into()
    }

    fn predict(&mut self, ds: &Dataset, batch: &[&Instance]) -> Result<Vec<Prediction>> {
        let this = &*self;
        Ok(batch
            .par_iter()
            .map(|inst| {
                // Dense scores from the order: no ties, and every non-candidate scores 0 (unlisted).
                let ranked = this.rank(ds.pois(), &Query::from_instance(ds, inst));
                let mut scores = vec![0.0; ds.num_pois()];
                for (i, &p) in ranked.iter().enumerate() {
                    scores[p as usize] = (ranked.len() - i) as f64;
                }
                Prediction::Scores(scores)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrieval::tests::{future_changed, random_dataset};

    fn small() -> RankerConfig {
        RankerConfig {
            candidates: CandidateConfig { transitions: 5, nearby: 5, similar: 5, radius_km: 5.0, hour_window_min: 90, similar_users: 3 },
            negatives: 4,
            train_instances: 0,
            ..Default::default()
        }
    }

    #[test]
    fn an_instances_own_target_and_later_checkins_never_change_its_features() {
        let ds = random_dataset(11);
        let cfg = small();
        let stats = TrainStats::new(&ds);
        let picks: Vec<&Instance> = ds.instances(Split::Train).iter().step_by(5).chain(ds.instances(Split::Test)).collect();
        for inst in picks {
            let other = future_changed(&ds, inst);
            let twin = &other.instances(inst.split)[inst.id as usize];
            let a = candidate_rows(&stats, ds.pois(), &Query::from_instance(&ds, inst), &cfg.candidates);
            let b = candidate_rows(&TrainStats::new(&other), other.pois(), &Query::from_instance(&other, twin), &cfg.candidates);
            assert!(!a.pois.is_empty());
            assert_eq!(a, b, "{:?} instance {}", inst.split, inst.id);
        }
    }

    #[test]
    fn features_by_hand() {
        let ds = random_dataset(11);
        let stats = TrainStats::new(&ds);
        let inst = &ds.instances(Split::Test)[0];
        let q = Query::from_instance(&ds, inst);
        let rows = candidate_rows(&stats, ds.pois(), &q, &small().candidates);
        let feature = |name: &str| FEATURES.iter().position(|f| *f == name).unwrap();
        let current = q.current().unwrap();
        let visits = |p: u32| q.history.iter().filter(|c| c.poi == p).count() as f64;
        for (p, row) in rows.pois.iter().zip(&rows.rows) {
            let seen = visits(*p) > 0.0;
            assert_eq!(row[feature("visited")], f64::from(u8::from(seen)));
            assert_eq!(row[feature("ln1p_visits")], visits(*p).ln_1p());
            assert_eq!(row[feature("is_current")], f64::from(u8::from(*p == current)));
            assert_eq!(row[feature("ln1p_distance_km")] == 0.0, *p == current);
            assert_eq!(row[feature("new_x_ln1p_distance_km")], if seen { 0.0 } else { row[feature("ln1p_distance_km")] });
        }
        // Visited POIs come first, in counter-hour's order (reciprocal ranks 1, 1/2, ...).
        let n_visited = rows.rows.iter().filter(|r| r[feature("visited")] == 1.0).count();
        for (i, row) in rows.rows.iter().take(n_visited).enumerate() {
            assert_eq!(row[feature("counter_hour_reciprocal_rank")], 1.0 / (i + 1) as f64);
        }
    }

    #[test]
    fn stratified_negatives_are_half_visited() {
        // Rows 0..4 visited, 4..20 not; the target is row 2.
        let rows: Vec<[f64; F]> =
            (0..20).map(|i| std::array::from_fn(|f| if f == VISITED { f64::from(u8::from(i < 4)) } else { 0.0 })).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let drawn = draw_negatives(&rows, 2, 6, NegativeSampling::Stratified, &mut rng);
        assert_eq!(drawn.len(), 6);
        assert!(!drawn.contains(&2));
        assert_eq!(drawn.iter().filter(|&&i| i < 4).count(), 3);
        // Fewer visited POIs than half: the rest come from the others.
        let drawn = draw_negatives(&rows, 2, 10, NegativeSampling::Stratified, &mut rng);
        assert_eq!((drawn.len(), drawn.iter().filter(|&&i| i < 4).count()), (10, 3));
        let mut distinct = drawn.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 10);
        assert_eq!(draw_negatives(&rows, 2, 50, NegativeSampling::Uniform, &mut rng).len(), 19);
    }

    #[test]
    fn the_fit_is_a_function_of_the_seed() {
        let ds = random_dataset(3);
        let weights = |seed| Ranker::fit(&ds, &RankerConfig { seed, ..small() }).unwrap().weights().map(|w| w.1).collect::<Vec<_>>();
        let a = weights(0);
        assert_eq!(a, weights(0));
        assert_ne!(a, weights(1));
        assert!(a.iter().all(|w| w.is_finite()));
    }

    #[test]
    fn ranks_every_candidate_once() {
        let ds = random_dataset(5);
        let mut ranker = Ranker::fit(&ds, &small()).unwrap();
        assert!(ranker.fit_instances > 0);
        let test: Vec<&Instance> = ds.instances(Split::Test).iter().collect();
        for (inst, pred) in test.iter().zip(ranker.predict(&ds, &test).unwrap()) {
            let Prediction::Scores(s) = pred else { panic!("scores expected") };
            let mut listed: Vec<f64> = s.iter().copied().filter(|&x| x > 0.0).collect();
            let n = listed.len();
            listed.sort_by(f64::total_cmp);
            assert_eq!(listed, (1..=n).map(|i| i as f64).collect::<Vec<_>>(), "distinct scores n..1");
            assert_eq!(ranker.rank(ds.pois(), &Query::from_instance(&ds, inst)).len(), n);
        }
    }

    #[test]
    fn bad_options_and_missing_train_data_are_errors() {
        let ds = random_dataset(5);
        assert!(Ranker::fit(&ds, &RankerConfig { negatives: 0, ..small() }).is_err());
        assert!(Ranker::fit(&ds, &RankerConfig { alpha: f64::NAN, ..small() }).is_err());
        let bad = RankerConfig { candidates: CandidateConfig { radius_km: -1.0, ..small().candidates }, ..small() };
        assert!(Ranker::fit(&ds, &bad).unwrap_err().to_string().contains("radius_km"));
        let no_train = Dataset::new(
            ds.pois().to_vec(),
            ds.users().to_vec(),
            ds.checkins().to_vec(),
            ds.trajectories().to_vec(),
            [vec![], vec![], ds.instances(Split::Test).to_vec()],
        )
        .unwrap();
        assert!(Ranker::fit(&no_train, &small()).unwrap_err().to_string().contains("train instances"));
    }
}
