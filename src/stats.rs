//! Uncertainty of the metrics: 95% percentile-bootstrap intervals of a group's means, and the
//! paired bootstrap of the difference between two methods on the same instances (resampling
//! instances, so that what the methods share cancels out).
//!
//! The resamples are drawn from a fixed seed: a report's intervals repeat exactly.

use rand::{Rng, SeedableRng};

use crate::metrics::{Metrics, Rank};

/// Resamples per interval.
pub const RESAMPLES: usize = 2000;

/// The seed every interval's resamples come from.
pub const SEED: u64 = 0x00B0_075E;

/// A 95% interval per metric, in [`crate::metrics::METRIC_NAMES`] order.
pub type Intervals = [(f64, f64); 6];

/// The six metrics of each instance.
pub fn per_instance(ranks: &[Rank]) -> Vec<[f64; 6]> {
    ranks.iter().map(|r| Metrics::from_rank(*r).values()).collect()
}

/// The 2.5% and 97.5% percentiles of the means of `RESAMPLES` resamples (with replacement, of
/// the same size) of `rows`; `None` for no rows.
pub fn bootstrap(rows: &[[f64; 6]]) -> Option<Intervals> {
    if rows.is_empty() {
        return None;
    }
    let n = rows.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let mut means: [Vec<f64>; 6] = Default::default();
    for _ in 0..RESAMPLES {
        let mut sum = [0f64; 6];
        for _ in 0..n {
            let row = &rows[rng.random_range(0..n)];
            for (s, v) in sum.iter_mut().zip(row) {
                *s += v;
            }
        }
        for (m, s) in means.iter_mut().zip(sum) {
            m.push(s / n as f64);
        }
    }
    Some(means.map(|mut m| {
        m.sort_by(f64::total_cmp);
        (percentile(&m, 0.025), percentile(&m, 0.975))
    }))
}

/// The `q` quantile of sorted values, interpolated between the two nearest.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Means of each metric over `rows`.
pub fn means(rows: &[[f64; 6]]) -> [f64; 6] {
    let mut sum = [0f64; 6];
    for row in rows {
        for (s, v) in sum.iter_mut().zip(row) {
            *s += v;
        }
    }
    sum.map(|s| s / rows.len().max(1) as f64)
}

/// The paired comparison of `a` and `b`, row i of each being the same instance: the mean
/// difference a − b of each metric and its 95% bootstrap interval.
pub fn paired(a: &[[f64; 6]], b: &[[f64; 6]]) -> Option<([f64; 6], Intervals)> {
    assert_eq!(a.len(), b.len(), "paired rows");
    let diff: Vec<[f64; 6]> = a.iter().zip(b).map(|(x, y)| std::array::from_fn(|i| x[i] - y[i])).collect();
    Some((means(&diff), bootstrap(&diff)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_intervals() {
        // All instances alike: no uncertainty.
        let same = vec![[1.0, 1.0, 1.0, 1.0, 1.0, 0.5]; 50];
        let ci = bootstrap(&same).unwrap();
        assert_eq!(ci[5], (0.5, 0.5));
        // Two instances, a hit and a miss: a resample's mean is 0, 1/2 or 1 with probabilities
        // 1/4, 1/2, 1/4, so the 2.5% and 97.5% percentiles are 0 and 1.
        let two = [Metrics::from_rank(Some(1.0)).values(), Metrics::from_rank(None).values()];
        assert_eq!(bootstrap(&two).unwrap()[0], (0.0, 1.0));
        // Many instances: the normal approximation, mean ± 1.96 sd / √n, within a few percent.
        let rows: Vec<[f64; 6]> = (0..1000).map(|i| Metrics::from_rank(Some(1.0 + (i % 7) as f64)).values()).collect();
        let m = means(&rows)[5];
        let sd = (rows.iter().map(|r| (r[5] - m).powi(2)).sum::<f64>() / 999.0).sqrt();
        let half = 1.96 * sd / 1000f64.sqrt();
        let (lo, hi) = bootstrap(&rows).unwrap()[5];
        assert!(((m - lo) - half).abs() < 0.1 * half && ((hi - m) - half).abs() < 0.1 * half, "{lo} {m} {hi} ±{half}");
        assert_eq!(bootstrap(&rows), bootstrap(&rows), "seeded");
        assert!(bootstrap(&[]).is_none());
    }

    #[test]
    fn a_paired_difference_cancels_what_both_share() {
        // b is a, but every tenth instance has its target at rank 1 instead of 2.
        let a: Vec<[f64; 6]> = (0..500).map(|i| Metrics::from_rank(Some(1.0 + (i % 5) as f64)).values()).collect();
        let b: Vec<[f64; 6]> =
            (0..500).map(|i| Metrics::from_rank(Some(if i % 10 == 1 { 1.0 } else { 1.0 + (i % 5) as f64 })).values()).collect();
        let (diff, ci) = paired(&b, &a).unwrap();
        assert!(diff[0] > 0.0 && ci[0].0 > 0.0, "{diff:?} {ci:?}");
        // The same rows: exactly zero.
        let (diff, ci) = paired(&a, &a).unwrap();
        assert_eq!((diff[5], ci[5]), (0.0, (0.0, 0.0)));
    }
}
