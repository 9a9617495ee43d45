//! The three baselines of the evaluation protocol (`docs/protocol.md`, "Baselines"), and one more, each a [`Recommender`] answering with dense
//! scores:
//!
//! - [`Popularity`]: a POI's check-ins in train trajectories.
//! - [`Counter`]: the user's visits to the POI in the instance's history, plus
//!   `1e-6 × popularity / max popularity` as a tie-break (so unvisited POIs follow by
//!   popularity), in f64.
//! - [`Markov`]: first-order transition counts between consecutive check-ins of train
//!   trajectories, read from the prefix's last POI; POIs never reached from it score 0 (a miss).
//! - [`CounterHour`] (not in the protocol): the counter, but POIs visited around the target's time
//!   of day first ([`crate::visits::hour_first_order`], a 60-minute window), the order the
//!   prompt's around-the-hour list suggests; the yardstick for a model that reads that list.

use anyhow::Result;
use rayon::prelude::*;

use crate::data::{Dataset, Instance, Split};
use crate::eval::{Prediction, Recommender};
use crate::visits::{DEFAULT_WINDOW_MIN, count_visits};

/// The baselines by name, for the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    Popularity,
    Counter,
    Markov,
    CounterHour,
}

impl Baseline {
    pub fn as_str(self) -> &'static str {
        match self {
            Baseline::Popularity => "popularity",
            Baseline::Counter => "counter",
            Baseline::Markov => "markov",
            Baseline::CounterHour => "counter-hour",
        }
    }

    /// Fits the baseline on the dataset's train trajectories.
    pub fn build(self, ds: &Dataset) -> Box<dyn Recommender + Send> {
        match self {
            Baseline::Popularity => Box::new(Popularity::new(ds)),
            Baseline::Counter => Box::new(Counter::new(ds)),
            Baseline::Markov => Box::new(Markov::new(ds)),
            Baseline::CounterHour => Box::new(CounterHour { counter: Counter::new(ds) }),
        }
    }
}

/// Train visit counts as f64 scores.
fn popularity(ds: &Dataset) -> Vec<f64> {
    ds.pois().iter().map(|p| p.train_visits as f64).collect()
}

/// Same scores for every instance: train visit counts.
pub struct Popularity {
    scores: Vec<f64>,
}

impl Popularity {
    pub fn new(ds: &Dataset) -> Self {
        Popularity { scores: popularity(ds) }
    }
}

impl Recommender for Popularity {
    fn name(&self) -> String {
        "popularity".into()
    }

    fn predict(&mut self, _ds: &Dataset, batch: &[&Instance]) -> Result<Vec<Prediction>> {
        Ok(batch.iter().map(|_| Prediction::Scores(self.scores.clone())).collect())
    }
}

/// Per-user visit counter over the history with a popularity tie-break.
pub struct Counter {
    /// `1e-6 × train_visits / max train_visits` per POI (all 0 when there is no train data).
    tiebreak: Vec<f64>,
}

impl Counter {
    pub fn new(ds: &Dataset) -> Self {
        let pop = popularity(ds);
        let max = pop.iter().copied().fold(0.0, f64::max);
        let tiebreak = pop.iter().map(|p| if max > 0.0 { 1e-6 * p / max } else { 0.0 }).collect();
        Counter { tiebreak }
    }

    pub fn scores(&self, ds: &Dataset, inst: &Instance) -> Vec<f64> {
        let mut counts = vec![0.0f64; self.tiebreak.len()];
        for c in ds.history(inst) {
            counts[c.poi as usize] += 1.0;
        }
        for (s, t) in counts.iter_mut().zip(&self.tiebreak) {
            *s += t;
        }
        counts
    }
}

impl Recommender for Counter {
    fn name(&self) -> String {
        "counter".into()
    }

    fn predict(&mut self, ds: &Dataset, batch: &[&Instance]) -> Result<Vec<Prediction>> {
        let this = &*self;
        Ok(batch.par_iter().map(|inst| Prediction::Scores(this.scores(ds, inst))).collect())
    }
}

/// The counter with the POIs visited around the target's time of day first: a POI scores
/// `near × (1 + the history's largest visit count) + visits + tie-break`, so more visits within
/// [`DEFAULT_WINDOW_MIN`] of the target's time of day always rank higher, and equal ones fall
/// back to the counter's order. The window is fixed at 60 minutes (the default of
/// `prompt.hour_window_min`), so the baseline's numbers never depend on a prompt config.
pub struct CounterHour {
    counter: Counter,
}

impl CounterHour {
    pub fn scores(&self, ds: &Dataset, inst: &Instance) -> Vec<f64> {
        // One pass over the history: the visit counts carry both the counter's totals and the
        // visits near the hour.
        let mut s = self.counter.tiebreak.clone();
        let visits = count_visits(ds.history(inst), ds.pois(), inst.target.local_time(), DEFAULT_WINDOW_MIN);
        let step = 1.0 + visits.iter().map(|v| v.total).max().unwrap_or(0) as f64;
        for v in &visits {
            s[v.poi as usize] += v.total as f64 + v.near as f64 * step;
        }
        s
    }
}

impl Recommender for CounterHour {
    fn name(&self) -> String {
        "counter-hour".into()
    }

    fn predict(&mut self, ds: &Dataset, batch: &[&Instance]) -> Result<Vec<Prediction>> {
        let this = &*self;
        Ok(batch.par_iter().map(|inst| Prediction::Scores(this.scores(ds, inst))).collect())
    }
}

/// First-order transitions counted over consecutive check-ins of train trajectories.
pub struct Markov {
    /// Per source POI: (next POI, count), sorted by next POI.
    next: Vec<Vec<(u32, f64)>>,
}

impl Markov {
    pub fn new(ds: &Dataset) -> Self {
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for t in ds.trajectories().iter().filter(|t| t.split == Split::Train) {
            for w in ds.trajectory_checkins(t).windows(2) {
                pairs.push((w[0].poi, w[1].poi));
            }
        }
        pairs.sort_unstable();
        let mut next = vec![Vec::new(); ds.num_pois()];
        for chunk in pairs.chunk_by(|a, b| a == b) {
            let (from, to) = chunk[0];
            next[from as usize].push((to, chunk.len() as f64));
        }
        Markov { next }
    }

    /// Transition counts from `from` to every POI.
    pub fn scores_from(&self, from: u32) -> Vec<f64> {
        let mut s = vec![0.0f64; self.next.len()];
        if let Some(row) = self.next.get(from as usize) {
            for &(to, n) in row {
                s[to as usize] = n;
            }
        }
        s
    }
}

impl Recommender for Markov {
    fn name(&self) -> String {
        "markov".into()
    }

    fn predict(&mut self, _ds: &Dataset, batch: &[&Instance]) -> Result<Vec<Prediction>> {
        let this = &*self;
        Ok(batch
            .par_iter()
            .map(|inst| {
                let scores = match inst.prefix.last() {
                    Some(c) => this.scores_from(c.poi),
                    None => vec![0.0; this.next.len()],
                };
                Prediction::Scores(scores)
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::protocol::{ProtocolConfig, run, tests::raw};
    use crate::eval::{EvalOptions, evaluate};
    use crate::visits::hour_first_order;

    const H: i64 = 3600;

    /// 11 check-ins; split 0.6,0 puts c1 = c2 = t[6] = 101 h. Train: u1 a→b→a, u2 a→b,
    /// u2 c→b; test: u1 [a, a] and u2 [b, c], both returns.
    pub(crate) fn ds() -> Dataset {
        let rows = raw(&[
            ("1", "a", 0),
            ("1", "b", H),
            ("1", "a", 2 * H),
            ("2", "a", 0),
            ("2", "b", H),
            ("2", "c", 100 * H),
            ("2", "b", 101 * H),
            ("1", "a", 200 * H),
            ("1", "a", 201 * H),
            ("2", "b", 300 * H),
            ("2", "c", 301 * H),
        ]);
        let cfg = ProtocolConfig { min_user: 1, min_poi: 1, split: "0.6,0".parse().unwrap(), ..Default::default() };
        let (ds, st) = run(&rows, &cfg).unwrap();
        assert_eq!(st.instances.test, 2);
        ds
    }

    fn scores(b: Baseline, ds: &Dataset, i: usize) -> Vec<f64> {
        let inst = &ds.instances(Split::Test)[i];
        match &b.build(ds).predict(ds, &[inst]).unwrap()[0] {
            Prediction::Scores(s) => s.clone(),
            p => panic!("unexpected {p:?}"),
        }
    }

    #[test]
    fn popularity_counts_train_visits() {
        let d = ds();
        // a: u1 twice + u2 once; b: u1 once + u2 twice; c: u2 once.
        assert_eq!(scores(Baseline::Popularity, &d, 0), vec![3.0, 3.0, 1.0]);
    }

    #[test]
    fn counter_counts_history_plus_tiebreak() {
        let d = ds();
        // u1's test target a@201h: history a@0, b@1h, a@2h, a@200h.
        // Popularity 3, 3, 1 with max 3.
        let tb = |p: f64| 1e-6 * p / 3.0;
        let s = scores(Baseline::Counter, &d, 0);
        assert_eq!(s, vec![3.0 + tb(3.0), 1.0 + tb(3.0), tb(1.0)]);
        // u2 at 301 h: a, b, c, b, b -> counts 1, 3, 1.
        let s = scores(Baseline::Counter, &d, 1);
        assert_eq!(s, vec![1.0 + tb(3.0), 3.0 + tb(3.0), 1.0 + tb(1.0)]);
    }

    #[test]
    fn counter_hour_puts_visits_around_the_target_hour_first() {
        let d = ds();
        let tb = |p: f64| 1e-6 * p / 3.0;
        // u1's target a@201h (09:00 UTC): a@200h (08:00) is within the hour, b@1h (01:00) is
        // not; the largest count is 3, so a near-visit is worth 4.
        assert_eq!(scores(Baseline::CounterHour, &d, 0), vec![3.0 + 4.0 + tb(3.0), 1.0 + tb(3.0), tb(1.0)]);
        // u2's target c@301h (13:00): only b@300h (12:00) is within the hour; a@0 and c@100h
        // (04:00) are not.
        assert_eq!(scores(Baseline::CounterHour, &d, 1), vec![1.0 + tb(3.0), 3.0 + 4.0 + tb(3.0), 1.0 + tb(1.0)]);
    }

    #[test]
    fn counter_hour_ranks_fewer_visits_at_this_hour_first() {
        // Train: a at 00:00 and 01:00, b at 10:00 (day 0). Test: x at 04:00 on day 4, then the
        // target b at 10:00. The counter ranks a (2 visits) over b and x (1 each); around 10:00
        // only b was visited, so counter-hour puts b first, then a, then x.
        let rows = raw(&[("1", "a", 0), ("1", "a", H), ("1", "b", 10 * H), ("1", "x", 100 * H), ("1", "b", 106 * H)]);
        let cfg = ProtocolConfig { min_user: 1, min_poi: 1, split: "0.6,0".parse().unwrap(), ..Default::default() };
        let (d, st) = run(&rows, &cfg).unwrap();
        assert_eq!(st.instances.test, 1);
        let order = |s: Vec<f64>| {
            let mut ids: Vec<usize> = (0..s.len()).filter(|&i| s[i] >= 1.0).collect();
            ids.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
            ids.iter().map(|&i| d.pois()[i].venue_id.clone()).collect::<Vec<_>>()
        };
        assert_eq!(order(scores(Baseline::Counter, &d, 0)), ["a", "b", "x"]);
        assert_eq!(order(scores(Baseline::CounterHour, &d, 0)), ["b", "a", "x"]);
        // The same order as the SFT answers' and the prompt's (src/visits.rs).
        let inst = &d.instances(Split::Test)[0];
        let visits = count_visits(d.history(inst), d.pois(), inst.target.local_time(), DEFAULT_WINDOW_MIN);
        let by_visits: Vec<String> = hour_first_order(&visits).iter().map(|&p| d.pois()[p as usize].venue_id.clone()).collect();
        assert_eq!(by_visits, ["b", "a", "x"]);
    }

    #[test]
    fn markov_uses_train_transitions_from_the_last_prefix_poi() {
        let d = ds();
        // Train pairs: a→b, b→a, a→b, c→b. u1's prefix ends at a: a→b twice.
        assert_eq!(scores(Baseline::Markov, &d, 0), vec![0.0, 2.0, 0.0]);
        // u2's prefix ends at b: b→a once.
        assert_eq!(scores(Baseline::Markov, &d, 1), vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn harness_end_to_end_on_the_toy() {
        let d = ds();
        let opts = EvalOptions { keep_results: true, ..Default::default() };
        // Counter: u1 target a ranked 1; u2 target c: b 3, then a 1+1e-6 > c 1+1e-6/3: rank 3.
        let (r, res) = evaluate(&d, Split::Test, Baseline::Counter.build(&d).as_mut(), &opts).unwrap();
        assert_eq!(res.iter().map(|x| x.rank).collect::<Vec<_>>(), vec![Some(1.0), Some(3.0)]);
        assert_eq!(res[1].ranked, vec![1, 0, 2]);
        let all = r.metrics.all.metrics.unwrap();
        assert_eq!(all.acc1, 0.5);
        assert!((all.ndcg5 - 0.75).abs() < 1e-12);
        assert_eq!((r.metrics.returns.n, r.metrics.discovery.n), (2, 0));
        assert!(r.invalid_rate.is_none());
        // Popularity: a and b tie at 3: target a gets rank 1.5; c rank 3.
        let (_, res) = evaluate(&d, Split::Test, Baseline::Popularity.build(&d).as_mut(), &opts).unwrap();
        assert_eq!(res.iter().map(|x| x.rank).collect::<Vec<_>>(), vec![Some(1.5), Some(3.0)]);
        // Markov: u1 target a has score 0 from a -> miss; u2 target c has 0 from b -> miss.
        let (r, _) = evaluate(&d, Split::Test, Baseline::Markov.build(&d).as_mut(), &opts).unwrap();
        assert_eq!(r.metrics.all.metrics.unwrap().mrr, 0.0);
        let j = serde_json::to_value(&r).unwrap();
        for k in ["acc@1", "acc@5", "acc@10", "ndcg@5", "ndcg@10", "mrr", "n"] {
            assert!(j["metrics"]["all"][k].is_number(), "{k}");
        }
        assert_eq!(j["split"], "test");
        assert_eq!(j["method"], "markov");
    }

    struct Fixed(Vec<Prediction>);

    impl Recommender for Fixed {
        fn name(&self) -> String {
            "fixed".into()
        }
        fn batch_size(&self) -> usize {
            1
        }
        fn predict(&mut self, _: &Dataset, batch: &[&Instance]) -> Result<Vec<Prediction>> {
            Ok(batch.iter().map(|i| self.0[i.id as usize].clone()).collect())
        }
    }

    #[test]
    fn list_methods_report_the_invalid_rate() {
        let d = ds();
        let mut m = Fixed(vec![
            Prediction::List { ids: vec![1, 1, 0], valid: true }, // target a = 0 at rank 2
            Prediction::List { ids: vec![2], valid: false },      // unparsable: a miss
        ]);
        let (r, _) = evaluate(&d, Split::Test, &mut m, &EvalOptions::default()).unwrap();
        assert_eq!(r.invalid, Some(1));
        assert_eq!(r.invalid_rate, Some(0.5));
        assert_eq!(r.metrics.all.metrics.unwrap().mrr, 0.25);
    }
}
