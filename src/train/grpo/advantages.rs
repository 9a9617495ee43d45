//! Group-relative advantages for GRPO: the rewards of the G completions sampled for one prompt
//! are compared with each other, never with other prompts'.
//!
//! For each consecutive group of G rewards (prompt-major: completions `0..G` belong to the first
//! prompt, `G..2G` to the second, ...), with `mean_g` and `std_g` its mean and standard
//! deviation:
//! - `scale_by_std = true` (GRPO): `A = (r − mean_g) / (std_g + eps)`;
//! - `scale_by_std = false` (Dr. GRPO): `A = r − mean_g`.
//!
//! `std_g` is the *sample* standard deviation (Bessel's correction, divisor G − 1), as TRL's
//! `GRPOTrainer` computes it with `torch.std`; its default `eps` is 1e-4 ([`DEFAULT_EPS`]).
//! Rewards `[1, 1, 0, 0]` thus give `±0.5 / (0.57735 + eps) ≈ ±0.866`.
//!
//! A group whose rewards are all equal (`std_g <= ZERO_STD_TOL`, TRL's `torch.isclose(std, 0)`)
//! carries no signal: its advantages are exactly 0 (not rounding noise), and it is flagged in
//! [`GroupStats::zero_signal`] so the trainer can count it and optionally skip it.

use serde::Serialize;
use thiserror::Error;

/// TRL's default `epsilon` in the advantage denominator.
pub const DEFAULT_EPS: f64 = 1e-4;

/// A group's standard deviation at or below this is zero (the absolute tolerance of
/// `torch.isclose`, which TRL uses to flag zero-std groups).
pub const ZERO_STD_TOL: f64 = 1e-8;

#[derive(Debug, Clone, PartialEq, Error)]
pub enum AdvantageError {
    #[error(
        "group size {0}: GRPO needs at least 2 completions per prompt (a lone completion is its \
         group's mean, so its advantage is always 0)"
    )]
    GroupTooSmall(usize),
    #[error("{len} rewards do not split into groups of {group} (prompts × completions per prompt)")]
    Ragged { len: usize, group: usize },
    #[error("reward {index} is {value}: every reward must be a finite number")]
    NonFinite { index: usize, value: f64 },
    #[error("eps must be a finite number >= 0, got {0}")]
    BadEps(f64),
}

/// Per-group statistics of one batch of rewards, for logging and for skipping groups.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupStats {
    /// Completions per prompt (G).
    pub group_size: usize,
    /// Each group's mean reward.
    pub means: Vec<f64>,
    /// Each group's sample standard deviation (divisor G − 1).
    pub stds: Vec<f64>,
    /// Whether each group's rewards are all equal (`std <= ZERO_STD_TOL`): no signal.
    pub zero_signal: Vec<bool>,
    /// How many groups carry no signal.
    pub zero_signal_groups: usize,
}

impl GroupStats {
    /// Number of groups (prompts).
    pub fn groups(&self) -> usize {
        self.means.len()
    }

    /// Fraction of groups without signal (TRL logs it as `frac_reward_zero_std`); 0 for no groups.
    pub fn zero_signal_fraction(&self) -> f64 {
        if self.means.is_empty() { 0.0 } else { self.zero_signal_groups as f64 / self.means.len() as f64 }
    }

    /// Mean over groups of the within-group standard deviation (0 for no groups).
    pub fn mean_std(&self) -> f64 {
        if self.stds.is_empty() { 0.0 } else { self.stds.iter().sum::<f64>() / self.stds.len() as f64 }
    }
}

/// Advantages of `rewards` in consecutive groups of `group` (see the module docs), and the
/// groups' statistics. Errors: `group < 2`, a length that is not a multiple of `group`, a
/// non-finite reward, or a negative/non-finite `eps`. No rewards give no advantages.
pub fn group_advantages(rewards: &[f64], group: usize, scale_by_std: bool, eps: f64) -> Result<(Vec<f64>, GroupStats), AdvantageError> {
    if group < 2 {
        return Err(AdvantageError::GroupTooSmall(group));
    }
    if !rewards.len().is_multiple_of(group) {
        return Err(AdvantageError::Ragged { len: rewards.len(), group });
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(AdvantageError::BadEps(eps));
    }
    if let Some((index, &value)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(AdvantageError::NonFinite { index, value });
    }

    let n_groups = rewards.len() / group;
    let mut stats = GroupStats {
        group_size: group,
        means: Vec::with_capacity(n_groups),
        stds: Vec::with_capacity(n_groups),
        zero_signal: Vec::with_capacity(n_groups),
        zero_signal_groups: 0,
    };
    let mut adv = Vec::with_capacity(rewards.len());
    for g in rewards.chunks_exact(group) {
        let mean = g.iter().sum::<f64>() / group as f64;
        let var = g.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (group - 1) as f64;
        let std = var.sqrt();
        let zero = std <= ZERO_STD_TOL;
        if zero {
            adv.extend(std::iter::repeat_n(0.0, group));
            stats.zero_signal_groups += 1;
        } else if scale_by_std {
            adv.extend(g.iter().map(|r| (r - mean) / (std + eps)));
        } else {
            adv.extend(g.iter().map(|r| r - mean));
        }
        stats.means.push(mean);
        stats.stds.push(std);
        stats.zero_signal.push(zero);
    }
    Ok((adv, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_all_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn two_ones_two_zeros() {
        // mean 0.5, deviations ±0.5, Σ(r − m)² = 1, sample variance 1/3, std = 0.5773502691896257.
        // eps = 0: ±0.5 / 0.57735... = ±√3/2 = ±0.8660254037844386.
        let (a, s) = group_advantages(&[1.0, 1.0, 0.0, 0.0], 4, true, 0.0).unwrap();
        let h = 3f64.sqrt() / 2.0;
        assert_all_close(&a, &[h, h, -h, -h]);
        assert_all_close(&s.means, &[0.5]);
        assert_all_close(&s.stds, &[(1.0f64 / 3.0).sqrt()]);
        assert_eq!((s.groups(), s.group_size, s.zero_signal_groups), (1, 4, 0));
        // TRL's eps = 1e-4: 0.5 / 0.5774502691896257 = 0.8658754...
        let (a, _) = group_advantages(&[1.0, 1.0, 0.0, 0.0], 4, true, DEFAULT_EPS).unwrap();
        let v = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
        assert_all_close(&a, &[v, v, -v, -v]);
        assert!((v - 0.865_875_4).abs() < 1e-6, "{v}");
        // Dr. GRPO: r − mean.
        let (a, _) = group_advantages(&[1.0, 1.0, 0.0, 0.0], 4, false, DEFAULT_EPS).unwrap();
        assert_all_close(&a, &[0.5, 0.5, -0.5, -0.5]);
    }

    #[test]
    fn zero_one_two() {
        // mean 1, Σ(r − m)² = 2, sample variance 2/2 = 1, std 1 (population std would be 0.816).
        let (a, s) = group_advantages(&[0.0, 1.0, 2.0], 3, true, 0.0).unwrap();
        assert_all_close(&a, &[-1.0, 0.0, 1.0]);
        assert_all_close(&s.stds, &[1.0]);
        // eps = 1: (r − 1) / 2.
        let (a, _) = group_advantages(&[0.0, 1.0, 2.0], 3, true, 1.0).unwrap();
        assert_all_close(&a, &[-0.5, 0.0, 0.5]);
        let (a, _) = group_advantages(&[0.0, 1.0, 2.0], 3, false, 1.0).unwrap();
        assert_all_close(&a, &[-1.0, 0.0, 1.0]);
    }

    #[test]
    fn groups_are_independent_and_zero_signal_is_counted() {
        // Group 1: 0.3 three times (its float mean may be off by an ulp): no signal, exactly 0.
        // Group 2: [0, 0, 3]: mean 1, deviations −1, −1, 2, Σ = 6, variance 3, std √3:
        //          −1/√3, −1/√3, 2/√3.
        // Group 3: [2, 2, 2]: no signal. Group 4: [5, 1, 3]: mean 3, Σ = 8, var 4, std 2: 1, −1, 0.
        let r = [0.3, 0.3, 0.3, 0.0, 0.0, 3.0, 2.0, 2.0, 2.0, 5.0, 1.0, 3.0];
        let (a, s) = group_advantages(&r, 3, true, 0.0).unwrap();
        let t = 1.0 / 3f64.sqrt();
        assert_all_close(&a, &[0.0, 0.0, 0.0, -t, -t, 2.0 * t, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0]);
        assert!(a[..3].iter().chain(&a[6..9]).all(|&x| x == 0.0), "zero-signal advantages are exactly 0");
        assert_eq!(s.zero_signal, vec![true, false, true, false]);
        assert_eq!(s.zero_signal_groups, 2);
        assert_eq!(s.zero_signal_fraction(), 0.5);
        assert_all_close(&s.means, &[0.3, 1.0, 2.0, 3.0]);
        assert_all_close(&s.stds, &[0.0, 3f64.sqrt(), 0.0, 2.0]);
        assert!((s.mean_std() - (3f64.sqrt() + 2.0) / 4.0).abs() < 1e-12);
        // Same groups without std scaling: r − mean; zero-signal groups still exactly 0.
        let (a, s2) = group_advantages(&r, 3, false, DEFAULT_EPS).unwrap();
        assert_all_close(&a, &[0.0, 0.0, 0.0, -1.0, -1.0, 2.0, 0.0, 0.0, 0.0, 2.0, -2.0, 0.0]);
        assert_eq!(s2, s);
        // Each group's advantages sum to 0.
        for g in a.chunks(3) {
            assert!(g.iter().sum::<f64>().abs() < 1e-12);
        }
    }

    #[test]
    fn ties_near_the_tolerance() {
        // A spread of 1e-6 is signal (std ≈ 5.8e-7 > 1e-8); 1e-12 is not.
        let (_, s) = group_advantages(&[1.0, 1.0, 1.0 + 1e-6, 1.0], 4, true, DEFAULT_EPS).unwrap();
        assert_eq!(s.zero_signal_groups, 0);
        let (a, s) = group_advantages(&[1.0, 1.0, 1.0 + 1e-12, 1.0], 4, true, DEFAULT_EPS).unwrap();
        assert_eq!((s.zero_signal_groups, a), (1, vec![0.0; 4]));
        // G = 2, one apart: mean 0.5, std = √(0.5) = 0.7071067811865476, A = ±0.5/0.7071 = ±√2/2.
        let (a, _) = group_advantages(&[0.0, 1.0], 2, true, 0.0).unwrap();
        let h = 2f64.sqrt() / 2.0;
        assert_all_close(&a, &[-h, h]);
    }

    #[test]
    fn errors_and_edge_cases() {
        assert_eq!(group_advantages(&[1.0], 1, true, DEFAULT_EPS), Err(AdvantageError::GroupTooSmall(1)));
        assert_eq!(group_advantages(&[], 0, true, DEFAULT_EPS), Err(AdvantageError::GroupTooSmall(0)));
        let msg = AdvantageError::GroupTooSmall(1).to_string();
        assert!(msg.contains("at least 2"), "{msg}");
        assert_eq!(group_advantages(&[1.0, 2.0, 3.0], 2, true, DEFAULT_EPS), Err(AdvantageError::Ragged { len: 3, group: 2 }));
        assert!(matches!(group_advantages(&[1.0, f64::NAN], 2, true, DEFAULT_EPS), Err(AdvantageError::NonFinite { index: 1, .. })));
        assert!(matches!(group_advantages(&[f64::INFINITY, 0.0], 2, false, DEFAULT_EPS), Err(AdvantageError::NonFinite { index: 0, .. })));
        assert_eq!(group_advantages(&[1.0, 2.0], 2, true, -1.0), Err(AdvantageError::BadEps(-1.0)));
        assert!(group_advantages(&[1.0, 2.0], 2, true, f64::NAN).is_err());
        // No rewards: no groups, no advantages.
        let (a, s) = group_advantages(&[], 4, true, DEFAULT_EPS).unwrap();
        assert!(a.is_empty());
        assert_eq!((s.groups(), s.zero_signal_groups, s.zero_signal_fraction(), s.mean_std()), (0, 0, 0.0, 0.0));
        // Stats serialise for metrics.jsonl.
        let (_, s) = group_advantages(&[1.0, 1.0], 2, true, DEFAULT_EPS).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["zero_signal_groups"], 1);
        assert_eq!(v["group_size"], 2);
    }

    #[test]
    fn scaling_invariance() {
        // With eps = 0, std scaling makes advantages invariant to an affine change of rewards
        // (a > 0); without it they scale by a.
        let r = [0.2, 0.9, 0.4, 0.4, 1.7, 0.0];
        let shifted: Vec<f64> = r.iter().map(|x| 3.0 * x + 7.0).collect();
        let (a, _) = group_advantages(&r, 6, true, 0.0).unwrap();
        let (b, _) = group_advantages(&shifted, 6, true, 0.0).unwrap();
        assert_all_close(&a, &b);
        let (a, _) = group_advantages(&r, 3, false, 0.0).unwrap();
        let (b, _) = group_advantages(&shifted, 3, false, 0.0).unwrap();
        assert_all_close(&a.iter().map(|x| 3.0 * x).collect::<Vec<_>>(), &b);
        // Normalised advantages of a signal group have sample std 1 (eps = 0).
        let (a, _) = group_advantages(&r, 6, true, 0.0).unwrap();
        let var = a.iter().map(|x| x * x).sum::<f64>() / 5.0;
        assert!((var - 1.0).abs() < 1e-12, "{var}");
    }
}
