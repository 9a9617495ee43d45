//! The GRPO objective: per-token log-probabilities of sampled completions, the clipped
//! surrogate with group-relative advantages, and the k3 KL estimate against the reference
//! policy (the same model with its adapter switched off).
//!
//! Per completion token t of sample i, with ratio ρ = exp(logp − logp_old):
//!   loss_it = −min(ρ·A_i, clip(ρ, 1−ε_low, 1+ε_high)·A_i) + β·(exp(ref − logp) − (ref − logp) − 1)
//! normalised over tokens as configured (see [`LossNorm`]).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// How per-token losses are averaged into one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossNorm {
    /// Mean over each sequence's tokens, then over sequences (the original GRPO).
    Sequence,
    /// Sum over all tokens of the batch / their number (DAPO).
    Token,
    /// Sum over all tokens / (sequences × max new tokens), a constant (Dr. GRPO).
    Constant,
}

/// The objective's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Lower clip range ε of the ratio.
    pub epsilon: f64,
    /// Upper clip range (DAPO's clip-higher); defaults to `epsilon`.
    pub epsilon_high: Option<f64>,
    /// Weight β of the KL penalty (0 skips the reference forward entirely).
    pub beta: f64,
    pub loss_norm: LossNorm,
    /// The constant of `loss_norm = constant`: usually the max new tokens.
    pub max_completion_tokens: usize,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { epsilon: 0.2, epsilon_high: None, beta: 0.04, loss_norm: LossNorm::Sequence, max_completion_tokens: 64 }
    }
}

/// What one loss evaluation measured (all means over real completion tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LossStats {
    pub loss: f64,
    pub kl: f64,
    /// Share of tokens whose ratio was clipped (the clipped branch was the active one).
    pub clip_fraction: f64,
    pub tokens: f64,
}

/// log p(token) under `logits`: (G, C, V) logits and (G, C) token ids give (G, C).
pub fn token_logprobs(logits: &Tensor, tokens: &Tensor) -> candle_core::Result<Tensor> {
    let logits = match logits.dtype() {
        DType::F16 | DType::BF16 => logits.to_dtype(DType::F32)?,
        _ => logits.clone(),
    };
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    logp.gather(&tokens.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)
}

/// The GRPO loss of one group or batch. `logp` (G, C) carries gradients; `old_logp` and
/// `ref_logp` are constants; `advantages` (G); `mask` (G, C) is 1 on real completion tokens.
pub fn grpo_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    cfg: &LossConfig,
) -> candle_core::Result<(Tensor, LossStats)> {
    let (g, _) = logp.dims2()?;
    let adv = advantages.unsqueeze(1)?.broadcast_as(logp.shape())?;
    let ratio = (logp - old_logp.detach())?.exp()?;
    let hi = 1.0 + cfg.epsilon_high.unwrap_or(cfg.epsilon);
    let clipped = ratio.clamp(1.0 - cfg.epsilon, hi)?;
    let unclipped_obj = (&ratio * &adv)?;
    let clipped_obj = (&clipped * &adv)?;
    let objective = unclipped_obj.minimum(&clipped_obj)?;
    let mut per_token = objective.neg()?;
    let mut kl_mean = 0.0;
    let scalar = |t: Tensor| -> candle_core::Result<f64> { t.to_dtype(DType::F64)?.to_scalar::<f64>() };
    let tokens = scalar(mask.sum_all()?)?;
    if let (Some(r), true) = (ref_logp, cfg.beta > 0.0) {
        let diff = (r.detach() - logp)?;
        let kl = ((diff.exp()? - &diff)? - 1.0)?;
        kl_mean = scalar((&kl * mask)?.sum_all()?)? / tokens.max(1.0);
        per_token = (per_token + (kl * cfg.beta)?)?;
    }
    let masked = (per_token * mask)?;
    let loss = match cfg.loss_norm {
        LossNorm::Sequence => {
            let lens = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
            (masked.sum(1)? / lens)?.mean_all()?
        }
        LossNorm::Token => (masked.sum_all()? / tokens.max(1.0))?,
        LossNorm::Constant => (masked.sum_all()? / (g * cfg.max_completion_tokens.max(1)) as f64)?,
    };
    // A token is "clipped" when the clipped branch is strictly the smaller objective.
    let was_clipped = clipped_obj.lt(&unclipped_obj)?.to_dtype(mask.dtype())?;
    let clip_fraction = scalar((was_clipped * mask)?.sum_all()?)? / tokens.max(1.0);
    let stats = LossStats { loss: scalar(loss.clone())?, kl: kl_mean, clip_fraction, tokens };
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t2(v: &[f32], g: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (g, v.len() / g), &Device::Cpu).unwrap()
    }

    #[test]
    fn on_policy_loss_is_minus_the_mean_advantage_and_kl_is_zero() {
        // ρ = 1 everywhere: loss = −mean_i A_i (sequence norm), KL(ref = logp) = 0.
        let logp = t2(&[-1.0, -2.0, -0.5, -0.3], 2);
        let adv = Tensor::new(&[1.5f32, -0.5], &Device::Cpu).unwrap();
        let mask = t2(&[1.0, 1.0, 1.0, 0.0], 2);
        let (loss, s) = grpo_loss(&logp, &logp, Some(&logp), &adv, &mask, &LossConfig::default()).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - (-(1.5 - 0.5) / 2.0)).abs() < 1e-6);
        assert_eq!(s.kl, 0.0);
        assert_eq!(s.clip_fraction, 0.0);
        assert_eq!(s.tokens, 3.0);
    }

    #[test]
    fn clipping_and_k3_kl_by_hand() {
        // One token, A = 1, logp − old = ln 1.5 → ρ = 1.5, clipped to 1.2: objective 1.2.
        // ref − logp = −0.1: k3 = e^−0.1 + 0.1 − 1 = 0.0048374.
        let old = t2(&[0.0], 1);
        let logp = t2(&[1.5f32.ln()], 1);
        let reference = t2(&[1.5f32.ln() - 0.1], 1);
        let adv = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        let mask = t2(&[1.0], 1);
        let cfg = LossConfig { beta: 0.5, ..Default::default() };
        let (loss, s) = grpo_loss(&logp, &old, Some(&reference), &adv, &mask, &cfg).unwrap();
        let k3 = (-0.1f64).exp() + 0.1 - 1.0;
        assert!((s.kl - k3).abs() < 1e-6);
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - (-1.2 + 0.5 * k3)).abs() < 1e-6);
        assert_eq!(s.clip_fraction, 1.0);
        // A negative advantage is not clipped at 1.5 (min picks the unclipped −1.5).
        let adv = Tensor::new(&[-1.0f32], &Device::Cpu).unwrap();
        let (loss, s) = grpo_loss(&logp, &old, None, &adv, &mask, &cfg).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - 1.5).abs() < 1e-6);
        assert_eq!(s.clip_fraction, 0.0);
    }

    #[test]
    fn normalisations_differ_as_documented() {
        // Sequence lengths 2 and 1; per-token losses −A: row 0: −1, −1; row 1: −4.
        let logp = t2(&[0.0, 0.0, 0.0, 0.0], 2);
        let adv = Tensor::new(&[1.0f32, 4.0], &Device::Cpu).unwrap();
        let mask = t2(&[1.0, 1.0, 1.0, 0.0], 2);
        let loss = |norm| {
            let cfg = LossConfig { loss_norm: norm, beta: 0.0, max_completion_tokens: 4, ..Default::default() };
            grpo_loss(&logp, &logp, None, &adv, &mask, &cfg).unwrap().0.to_scalar::<f32>().unwrap()
        };
        assert!((loss(LossNorm::Sequence) - (-(1.0 + 4.0) / 2.0)).abs() < 1e-6);
        assert!((loss(LossNorm::Token) - (-6.0 / 3.0)).abs() < 1e-6);
        assert!((loss(LossNorm::Constant) - (-6.0 / 8.0)).abs() < 1e-6);
    }
}
