//! GRPO end to end on a tiny random model: a synthetic reward (the first completion token is in
//! a chosen set) must become more likely within a few dozen steps.

use candle_core::{DType, Device, Tensor};
use refine_poi::dist::Dist;
use refine_poi::generate::SamplingConfig;
use refine_poi::model::tiny::{tiny_config, write_tiny_model};
use refine_poi::model::{LoadedModel, LoraConfig, Mode, ModelSource, load_on};
use refine_poi::train::grpo::config::LossNorm;
use refine_poi::train::grpo::loss::{LossConfig, StepConfig, step};
use refine_poi::train::optim::{AdamW, AdamWParams};

fn first_token_probs(m: &LoadedModel, prompt: &[u32]) -> Vec<f32> {
    let t = Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = m.model.forward_last(&t, None, None, Mode::INFERENCE).unwrap();
    candle_nn::ops::softmax_last_dim(&logits).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn a_tiny_model_learns_a_synthetic_reward() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &tiny_config("llama"), 21).unwrap();
    let mut m = load_on(&ModelSource::Folder(dir.path().to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    m.model.attach_lora(&LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, ..Default::default() }, 1).unwrap();
    let prompts: Vec<Vec<u32>> = ["where next?", "and now?"].iter().map(|p| m.tokenizer.encode(p, false).unwrap()).collect();

    // The rewarded set: tokens ranked 5th to 24th by the initial model, for the first prompt.
    let probs = first_token_probs(&m, &prompts[0]);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let rewarded: Vec<u32> = order[4..24].iter().map(|&i| i as u32).collect();
    let p_set = |m: &LoadedModel| -> f32 {
        let p = first_token_probs(m, &prompts[0]);
        rewarded.iter().map(|&t| p[t as usize]).sum()
    };
    let before = p_set(&m);

    let cfg = StepConfig {
        group: 8,
        loss: LossConfig { beta: 0.01, loss_norm: LossNorm::Sequence, max_completion_tokens: 2, ..Default::default() },
        sampling: SamplingConfig { max_new_tokens: 2, temperature: 1.0, ..Default::default() },
        constraint: None,
        next_code: None,
        grad_prompt_tokens: 0,
        scale_rewards: true,
        skip_zero_signal: true,
        updates_per_batch: 1,
        max_grad_norm: 1.0,
    };
    let mut opt = AdamW::new(m.model.lora_vars(), AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }).unwrap();
    let mut mean_reward = Vec::new();
    for s in 0..30u64 {
        let seeds = [2 * s, 2 * s + 1];
        let mut reward = |_: usize, c: &refine_poi::generate::Completion| -> anyhow::Result<f64> {
            Ok(if c.tokens.first().is_some_and(|t| rewarded.contains(t)) { 1.0 } else { 0.0 })
        };
        let report = step(&m.model, &m.tokenizer, &prompts, &seeds, &mut reward, &cfg, &mut opt, 2e-2, None, &Dist::single()).unwrap();
        assert!(report.loss.loss.is_finite());
        mean_reward.push(report.rewards.iter().sum::<f64>() / report.rewards.len() as f64);
    }
    let after = p_set(&m);
    let early: f64 = mean_reward[..5].iter().sum::<f64>() / 5.0;
    let late: f64 = mean_reward[25..].iter().sum::<f64>() / 5.0;
    eprintln!("P(rewarded first token) {before:.3} -> {after:.3}; mean reward {early:.3} -> {late:.3}");
    assert!(after > 2.0 * before && after > 0.5, "P(rewarded first token): {before} -> {after}");
    assert!(late > early, "mean reward {early} -> {late}");
}
