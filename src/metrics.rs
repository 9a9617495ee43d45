//! The one metric implementation (`docs/protocol.md`, "Metrics"), used by every method: baselines now,
//! the LLM later.
//!
//! A method's answer for an instance becomes the target's rank `r` (1-based, possibly
//! fractional) or a miss:
//! - [`rank_from_scores`]: ties at the expected rank, `r = #{s > s*} + (#{s = s*} + 1) / 2`
//!   with the target in its own tie group; a score of 0 (or below, or NaN) means "not in the
//!   list", so a target scored 0 is a miss.
//! - [`rank_from_list`]: a ranked list (an LLM's answer); duplicates after the first occurrence
//!   are dropped and the target's 1-based position is its rank; absent is a miss.
//!
//! [`Metrics::from_rank`] gives Acc@1/5/10, NDCG@5/10 and MRR for one rank; [`Accumulator`]
//! averages them; [`GroupedAccumulator`] keeps all / return / discovery apart.

use serde::{Serialize, Serializer};

/// The target's rank among the method's answer, or `None` for a miss.
pub type Rank = Option<f64>;

/// Expected rank of `target` under `scores` (one score per POI id), or a miss when the target
/// has no positive score or its id is out of range.
pub fn rank_from_scores(scores: &[f64], target: u32) -> Rank {
    let s_t = *scores.get(target as usize)?;
    if s_t.is_nan() || s_t <= 0.0 {
        return None;
    }
    let (mut greater, mut equal) = (0usize, 0usize);
    for &s in scores {
        if s > s_t {
            greater += 1;
        } else if s == s_t {
            equal += 1;
        }
    }
    // `equal` includes the target itself.
    Some(greater as f64 + (equal as f64 + 1.0) / 2.0)
}

/// 1-based position of `target` in `list` after dropping repeated ids, or a miss.
pub fn rank_from_list(list: &[u32], target: u32) -> Rank {
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    let mut pos = 0usize;
    for &id in list {
        if seen.insert(id) {
            pos += 1;
            if id == target {
                return Some(pos as f64);
            }
        }
    }
    None
}

/// Drops repeated ids after their first occurrence (the list an LLM's answer is scored as).
pub fn dedup_list(list: &[u32]) -> Vec<u32> {
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    list.iter().copied().filter(|id| seen.insert(*id)).collect()
}

/// The metrics' names in reports, in [`Metrics::values`] order.
pub const METRIC_NAMES: [&str; 6] = ["acc@1", "acc@5", "acc@10", "ndcg@5", "ndcg@10", "mrr"];

/// The six metrics of one instance, or their means.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metrics {
    pub acc1: f64,
    pub acc5: f64,
    pub acc10: f64,
    pub ndcg5: f64,
    pub ndcg10: f64,
    pub mrr: f64,
}

impl Metrics {
    /// The values in [`METRIC_NAMES`] order.
    pub fn values(&self) -> [f64; 6] {
        [self.acc1, self.acc5, self.acc10, self.ndcg5, self.ndcg10, self.mrr]
    }

    /// Acc@k = 1 if r <= k; NDCG@k = 1 / log2(r + 1) if r <= k; MRR = 1 / r; all 0 for a miss.
    pub fn from_rank(rank: Rank) -> Metrics {
        let Some(r) = rank.filter(|r| r.is_finite() && *r >= 1.0) else {
            return Metrics::default();
        };
        let acc = |k: f64| if r <= k { 1.0 } else { 0.0 };
        let ndcg = |k: f64| if r <= k { 1.0 / (r + 1.0).log2() } else { 0.0 };
        Metrics { acc1: acc(1.0), acc5: acc(5.0), acc10: acc(10.0), ndcg5: ndcg(5.0), ndcg10: ndcg(10.0), mrr: 1.0 / r }
    }

    fn add(&mut self, o: &Metrics) {
        self.acc1 += o.acc1;
        self.acc5 += o.acc5;
        self.acc10 += o.acc10;
        self.ndcg5 += o.ndcg5;
        self.ndcg10 += o.ndcg10;
        self.mrr += o.mrr;
    }

    fn scaled(&self, f: f64) -> Metrics {
        Metrics {
            acc1: self.acc1 * f,
            acc5: self.acc5 * f,
            acc10: self.acc10 * f,
            ndcg5: self.ndcg5 * f,
            ndcg10: self.ndcg10 * f,
            mrr: self.mrr * f,
        }
    }
}

/// Sums per-instance metrics (in f64, in the order added) and reports their means.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accumulator {
    sum: Metrics,
    n: u64,
}

impl Accumulator {
    pub fn add(&mut self, rank: Rank) {
        self.sum.add(&Metrics::from_rank(rank));
        self.n += 1;
    }

    pub fn n(&self) -> u64 {
        self.n
    }

    /// Means, or `None` when nothing was added.
    pub fn mean(&self) -> Option<Metrics> {
        (self.n > 0).then(|| self.sum.scaled(1.0 / self.n as f64))
    }

    /// The means as a report group (`null` metrics when empty).
    pub fn summary(&self) -> GroupSummary {
        GroupSummary { metrics: self.mean(), n: self.n, ci95: None }
    }
}

/// One group of a report: `{"acc@1", "acc@5", "acc@10", "ndcg@5", "ndcg@10", "mrr", "n",
/// "ci95"}`; each metric is `null` when the group is empty; `ci95` holds each metric's 95%
/// bootstrap interval `[lo, hi]` ([`crate::stats`]) where the harness computed them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupSummary {
    pub metrics: Option<Metrics>,
    pub n: u64,
    pub ci95: Option<[(f64, f64); 6]>,
}

impl Serialize for GroupSummary {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(8))?;
        for (i, name) in METRIC_NAMES.iter().enumerate() {
            m.serialize_entry(name, &self.metrics.map(|x| x.values()[i]))?;
        }
        m.serialize_entry("n", &self.n)?;
        if let Some(ci) = &self.ci95 {
            let by_name: std::collections::BTreeMap<&str, [f64; 2]> =
                METRIC_NAMES.iter().zip(ci).map(|(n, (lo, hi))| (*n, [*lo, *hi])).collect();
            m.serialize_entry("ci95", &by_name)?;
        }
        m.end()
    }
}

/// All / return / discovery accumulators.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GroupedAccumulator {
    pub all: Accumulator,
    pub returns: Accumulator,
    pub discovery: Accumulator,
}

impl GroupedAccumulator {
    /// Adds one instance's rank; `is_return` is whether its target is in the user's history.
    pub fn add(&mut self, rank: Rank, is_return: bool) {
        self.all.add(rank);
        if is_return {
            self.returns.add(rank);
        } else {
            self.discovery.add(rank);
        }
    }

    pub fn summary(&self) -> GroupedSummary {
        GroupedSummary { all: self.all.summary(), returns: self.returns.summary(), discovery: self.discovery.summary() }
    }
}

/// The report's `"metrics"` object.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GroupedSummary {
    pub all: GroupSummary,
    #[serde(rename = "return")]
    pub returns: GroupSummary,
    pub discovery: GroupSummary,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn expected_rank_with_ties() {
        // Scores of POIs 0..6; target 2 ties with POIs 3 and 4 below one higher score.
        let s = [0.0, 5.0, 2.0, 2.0, 2.0, 1.0];
        // greater = 1, equal = 3 (target included): r = 1 + (3 + 1) / 2 = 3.
        assert_eq!(rank_from_scores(&s, 2), Some(3.0));
        assert_eq!(rank_from_scores(&s, 1), Some(1.0));
        // One tie partner: r = 0 + (2 + 1) / 2 = 1.5.
        assert_eq!(rank_from_scores(&[3.0, 3.0, 1.0], 0), Some(1.5));
        // Unique lowest positive score: 1 + 3 + 1 = rank 5.
        assert_eq!(rank_from_scores(&s, 5), Some(5.0));
        // Everything tied: (n + 1) / 2.
        assert_eq!(rank_from_scores(&[1.0; 10], 7), Some(5.5));
    }

    #[test]
    fn score_zero_is_a_miss() {
        let s = [0.0, 5.0, 2.0];
        assert_eq!(rank_from_scores(&s, 0), None);
        assert_eq!(rank_from_scores(&[0.0; 4], 1), None);
        assert_eq!(rank_from_scores(&[f64::NAN, 1.0], 0), None);
        assert_eq!(rank_from_scores(&s, 9), None); // out of range
        assert_eq!(Metrics::from_rank(None), Metrics::default());
    }

    #[test]
    fn list_rank_drops_duplicates() {
        assert_eq!(rank_from_list(&[4, 4, 4, 7], 7), Some(2.0));
        assert_eq!(rank_from_list(&[1, 2, 1, 3], 3), Some(3.0));
        assert_eq!(rank_from_list(&[1, 2, 3], 1), Some(1.0));
        assert_eq!(rank_from_list(&[1, 2, 3], 9), None);
        assert_eq!(rank_from_list(&[], 9), None);
        assert_eq!(dedup_list(&[3, 1, 3, 2, 1]), vec![3, 1, 2]);
    }

    #[test]
    fn metric_values_by_hand() {
        let m = Metrics::from_rank(Some(1.0));
        assert_eq!(m, Metrics { acc1: 1.0, acc5: 1.0, acc10: 1.0, ndcg5: 1.0, ndcg10: 1.0, mrr: 1.0 });
        // r = 3: 1 / log2(4) = 0.5.
        let m = Metrics::from_rank(Some(3.0));
        assert_eq!((m.acc1, m.acc5, m.acc10), (0.0, 1.0, 1.0));
        assert!(close(m.ndcg5, 0.5) && close(m.ndcg10, 0.5) && close(m.mrr, 1.0 / 3.0));
        // r = 7: outside @5, 1 / log2(8) = 1/3 for @10.
        let m = Metrics::from_rank(Some(7.0));
        assert_eq!((m.acc5, m.acc10, m.ndcg5), (0.0, 1.0, 0.0));
        assert!(close(m.ndcg10, 1.0 / 3.0) && close(m.mrr, 1.0 / 7.0));
        // r = 5.5 (a tie): not within 5, within 10; 1 / log2(6.5).
        let m = Metrics::from_rank(Some(5.5));
        assert_eq!((m.acc5, m.acc10, m.ndcg5), (0.0, 1.0, 0.0));
        assert!(close(m.ndcg10, 1.0 / 6.5f64.log2()));
        // r = 1.5: Acc@1 = 0, 1 / log2(2.5).
        let m = Metrics::from_rank(Some(1.5));
        assert_eq!((m.acc1, m.acc5), (0.0, 1.0));
        assert!(close(m.ndcg5, 1.0 / 2.5f64.log2()) && close(m.mrr, 2.0 / 3.0));
        // r = 15: only MRR.
        let m = Metrics::from_rank(Some(15.0));
        assert_eq!((m.acc10, m.ndcg10), (0.0, 0.0));
        assert!(close(m.mrr, 1.0 / 15.0));
    }

    #[test]
    fn accumulators_split_return_and_discovery() {
        let mut g = GroupedAccumulator::default();
        g.add(Some(1.0), true);
        g.add(Some(3.0), true);
        g.add(None, false);
        let s = g.summary();
        assert_eq!((s.all.n, s.returns.n, s.discovery.n), (3, 2, 1));
        let all = s.all.metrics.unwrap();
        assert!(close(all.acc1, 1.0 / 3.0) && close(all.ndcg5, 1.5 / 3.0) && close(all.mrr, (1.0 + 1.0 / 3.0) / 3.0));
        let r = s.returns.metrics.unwrap();
        assert!(close(r.acc1, 0.5) && close(r.ndcg10, 0.75));
        assert_eq!(s.discovery.metrics.unwrap(), Metrics::default());
        let j = serde_json::to_value(s).unwrap();
        assert_eq!(j["return"]["n"], 2);
        assert_eq!(j["all"]["acc@10"], 2.0 / 3.0);
        assert!(j["discovery"]["ndcg@5"].is_number());
        let empty = serde_json::to_value(Accumulator::default().summary()).unwrap();
        assert!(empty["mrr"].is_null() && empty["n"] == 0);
    }
}
