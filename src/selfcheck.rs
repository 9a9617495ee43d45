//! Checks that the model computes what it should on whatever device it runs: the default model's
//! logits against the golden values of the reference implementation, and LoRA gradients against
//! finite differences and against the CPU. The tests run them on the CPU; `refine-poi selfcheck`
//! runs them on `--device`, which is how a GPU is checked (scripts/device-check.sh).

use std::path::Path;

use anyhow::Context;
use candle_core::{D, DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

use crate::generate::{SamplingConfig, generate};
use crate::model::tiny::{tiny_config, write_tiny_model};
use crate::model::{LoadedModel, LoraConfig, Mode, ModelSource, load_on};

/// One position's next-token logits against the reference's top five.
#[derive(Debug, Clone, Serialize)]
pub struct PositionCheck {
    pub what: String,
    pub top1_same: bool,
    pub top5_same: bool,
    /// Largest |logit - reference| over the reference's top five tokens.
    pub max_abs_diff: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct GoldenReport {
    pub dtype: String,
    pub positions: Vec<PositionCheck>,
    /// The 12-token greedy continuation of the long prompt equals the reference's.
    pub greedy_same: bool,
    /// The bound on `max_abs_diff` this dtype is held to.
    pub tolerance: f32,
    pub passed: bool,
}

/// How close a dtype's logits must come to the f32 reference. f32 must match the top five and
/// their values to 1e-2, and continue greedily token for token. Half precision (8 or 11 bits of
/// mantissa through 30 layers) must keep every top-1 token, with logits within 1.0 (measured on
/// the CPU in bf16: 0.20 to 0.58); its greedy continuation is reported, not required.
fn golden_tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 { 1e-2 } else { 1.0 }
}

fn fixture(dir: &Path, name: &str) -> anyhow::Result<Value> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the reference file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("malformed JSON in {}", path.display()))
}

fn ids(v: &Value) -> anyhow::Result<Vec<u32>> {
    v.as_array().context("expected a list of token ids")?.iter().map(|x| x.as_u64().map(|x| x as u32).context("not a token id")).collect()
}

fn floats(v: &Value) -> anyhow::Result<Vec<f32>> {
    v.as_array().context("expected a list of logits")?.iter().map(|x| x.as_f64().map(|x| x as f32).context("not a number")).collect()
}

fn top5(row: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.truncate(5);
    idx
}

fn position_check(what: String, row: &[f32], want_ids: &[u32], want_logits: &[f32]) -> PositionCheck {
    let got = top5(row);
    let max_abs_diff = want_ids.iter().zip(want_logits).map(|(&i, &w)| (row[i as usize] - w).abs()).fold(0.0, f32::max);
    PositionCheck { what, top1_same: got.first() == want_ids.first(), top5_same: got == want_ids, max_abs_diff }
}

/// The default model (`m`, on any device and dtype) against the reference files in `dir`
/// (tests/fixtures/reference): the next-token logits after "The capital of France is", at three
/// positions of a long check-in prompt, and that prompt's greedy continuation. Token ids are
/// checked first: a tokenizer mismatch is an error, not a failed comparison.
pub fn golden_logits(m: &LoadedModel, dir: &Path) -> anyhow::Result<GoldenReport> {
    let (model, tokenizer) = (&m.model, &m.tokenizer);
    let device = model.device();
    let logits_of = |row: Tensor| -> anyhow::Result<Vec<f32>> { Ok(row.to_dtype(DType::F32)?.to_vec1::<f32>()?) };
    let mut positions = Vec::new();

    let r = fixture(dir, "smollm2_135m_reference.json")?;
    let prompt = ids(&r["prompt_token_ids"])?;
    let text = r["prompt"].as_str().context("no prompt in the reference")?;
    anyhow::ensure!(
        tokenizer.encode(text, false)? == prompt,
        "the tokenizer's ids of {text:?} differ from the reference: not the default model?"
    );
    let input = Tensor::new(prompt.as_slice(), device)?.unsqueeze(0)?;
    let last = logits_of(model.forward_last(&input, None, None, Mode::INFERENCE)?.squeeze(0)?)?;
    positions.push(position_check(
        format!("after {text:?}"),
        &last,
        &ids(&r["top5_next_token_ids"])?,
        &floats(&r["top5_next_token_logits"])?,
    ));

    let long = &fixture(dir, "smollm2_135m_tokenizer_and_logits.json")?["long_prompt"];
    let long_ids = ids(&long["ids"])?;
    anyhow::ensure!(
        tokenizer.encode(long["text"].as_str().unwrap_or_default(), false)? == long_ids,
        "the long prompt's token ids differ from the reference"
    );
    let input = Tensor::new(long_ids.as_slice(), device)?.unsqueeze(0)?;
    let all = model.forward(&input, None, None, Mode::INFERENCE)?.squeeze(0)?;
    for p in long["positions"].as_array().context("no positions in the reference")? {
        let pos = p["position"].as_u64().context("no position")? as usize;
        let row = logits_of(all.get(pos)?)?;
        positions.push(position_check(format!("long prompt, position {pos}"), &row, &ids(&p["top5_ids"])?, &floats(&p["top5_logits"])?));
    }
    let out = generate(model, tokenizer, &[long_ids], 1, &SamplingConfig::greedy(12), Mode::INFERENCE)?;
    let greedy_same = out[0][0].tokens == ids(&long["greedy_12_ids"])?;

    let dtype = model.dtype();
    let tolerance = golden_tolerance(dtype);
    let within = positions.iter().all(|p| p.top1_same && p.max_abs_diff <= tolerance);
    let passed = if dtype == DType::F32 { within && greedy_same && positions.iter().all(|p| p.top5_same) } else { within };
    Ok(GoldenReport { dtype: format!("{dtype:?}"), positions, greedy_same, tolerance, passed })
}

/// Gives every LoRA B factor seeded random values in ±`scale`, so that the adapter changes the
/// output and every factor has a non-zero gradient (B = 0 at initialisation zeroes A's).
pub fn randomize_lora_b(m: &LoadedModel, seed: u64, scale: f64) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, var) in m.model.lora_vars() {
        if name.contains("lora_B") {
            let values: Vec<f64> = (0..var.elem_count()).map(|_| rng.random_range(-scale..scale)).collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
    }
    Ok(())
}

/// The log-likelihood of `tokens` (each predicted from those before it), summed, in the
/// logits' dtype (f32 for half-precision models, f64 for f64 ones).
pub fn log_likelihood(m: &LoadedModel, tokens: &[u32]) -> anyhow::Result<Tensor> {
    let device = m.model.device();
    let input = Tensor::new(&tokens[..tokens.len() - 1], device)?.unsqueeze(0)?;
    let targets = Tensor::new(&tokens[1..], device)?.unsqueeze(0)?.unsqueeze(D::Minus1)?;
    let logits = m.model.forward(&input, None, None, Mode::TRAIN)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    Ok(logp.gather(&targets, D::Minus1)?.sum_all()?)
}

#[derive(Debug, Clone, Serialize)]
pub struct FiniteDifferenceReport {
    pub device: String,
    /// Entries checked: three of each A and B factor.
    pub checked: usize,
    /// Largest |analytic - numeric| / (1 + |numeric|).
    pub max_error: f64,
    pub tolerance: f64,
    pub passed: bool,
}

fn f64_values(var: &Var) -> anyhow::Result<Vec<f64>> {
    Ok(var.as_tensor().flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn set_values(var: &Var, values: Vec<f64>) -> anyhow::Result<()> {
    Ok(var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?.to_dtype(var.dtype())?.to_device(var.device())?)?)
}

/// LoRA gradients of a tiny random Llama in f64 on `device`, against central finite differences
/// (step 1e-6) at three entries of every factor: what backpropagation computes through the
/// attention, the MLP and the adapter's scaling, on that device's kernels. Twice: with adapters
/// on q, v and down (each layer its own node), and on all seven layers (on the CPU, q, k and v
/// are then one node, and gate and up another).
pub fn lora_finite_differences(device: &Device) -> anyhow::Result<FiniteDifferenceReport> {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path(), &tiny_config("llama"), 7)?;
    let eps = 1e-6;
    let (mut checked, mut max_error) = (0, 0.0f64);
    for targets in [vec!["q".to_string(), "v".into(), "down".into()], LoraConfig::default().targets] {
        let mut m = load_on(&ModelSource::Folder(dir.path().to_path_buf()), device, DType::F64)?;
        m.model.attach_lora(&LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets }, 3)?;
        randomize_lora_b(&m, 4, 0.3)?;
        let (c, e) = finite_differences(&m, eps)?;
        checked += c;
        max_error = max_error.max(e);
    }
    let tolerance = 1e-6;
    Ok(FiniteDifferenceReport { device: format!("{device:?}"), checked, max_error, tolerance, passed: max_error < tolerance })
}

/// (entries checked, largest relative error) of [`lora_finite_differences`] for one adapter.
fn finite_differences(m: &LoadedModel, eps: f64) -> anyhow::Result<(usize, f64)> {
    let tokens = m.tokenizer.encode("lora grad", false)?;
    let grads = log_likelihood(m, &tokens)?.backward()?;
    let (mut checked, mut max_error) = (0, 0.0f64);
    for (name, var) in m.model.lora_vars() {
        let grad = grads.get(var.as_tensor()).with_context(|| format!("no gradient for {name}"))?;
        let analytic = grad.flatten_all()?.to_vec1::<f64>()?;
        let base = f64_values(&var)?;
        for idx in [0, base.len() / 2, base.len() - 1] {
            let shifted = |delta: f64| -> anyhow::Result<f64> {
                let mut v = base.clone();
                v[idx] += delta;
                set_values(&var, v)?;
                let l = log_likelihood(m, &tokens)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                set_values(&var, base.clone())?;
                Ok(l)
            };
            let numeric = (shifted(eps)? - shifted(-eps)?) / (2.0 * eps);
            max_error = max_error.max((numeric - analytic[idx]).abs() / (1.0 + numeric.abs()));
            checked += 1;
        }
    }
    Ok((checked, max_error))
}

#[derive(Debug, Clone, Serialize)]
pub struct CpuAgreementReport {
    pub device: String,
    pub dtype: String,
    pub tokens: usize,
    /// ‖g − g_cpu‖ / ‖g_cpu‖ over all LoRA factors, g_cpu from the same model in f32 on the CPU.
    pub relative_error: f64,
    pub cosine: f64,
    /// ‖g‖ / ‖g_cpu‖.
    pub norm_ratio: f64,
    /// What passes: half precision is held to its direction, f32 to its values.
    pub min_cosine: Option<f64>,
    pub max_relative_error: Option<f64>,
    pub passed: bool,
}

/// The LoRA gradient of `m` (any device and dtype) on one check-in sentence against the same
/// model's in f32 on the CPU (`cpu`), with identical adapter values copied over. f32 must agree
/// to 1e-2 relative (other kernels sum in other orders). Half precision must point the same
/// way (cosine ≥ 0.9): its rounding errors grow with depth, and more so in a real model's
/// large activations (on the CPU, the default model in f16: relative error 0.05; in bf16, with
/// 3 bits of mantissa fewer, 0.3 to 1.0 at cosine 0.96 to 0.99). A broken kernel gives
/// unrelated gradients (cosine near 0) or non-finite ones.
pub fn lora_gradient_against_cpu(m: &mut LoadedModel, cpu: &mut LoadedModel) -> anyhow::Result<CpuAgreementReport> {
    let cfg = LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, ..Default::default() };
    cpu.model.attach_lora(&cfg, 5)?;
    // Small, as after some training: a large random adapter would throw the model off the
    // regime it was trained in, where rounding errors grow.
    randomize_lora_b(cpu, 6, 0.01)?;
    m.model.attach_lora(&cfg, 5)?;
    for ((name, from), (to_name, to)) in cpu.model.lora_vars().iter().zip(m.model.lora_vars()) {
        anyhow::ensure!(*name == to_name, "adapter layouts differ: {name} vs {to_name}");
        set_values(&to, f64_values(from)?)?;
    }
    let text = "At 2012-04-03 18:00 (Tuesday), user 185 visited POI 3695 (Coffee Shop); next POI 252";
    let tokens = cpu.tokenizer.encode(text, false)?;
    let gradient = |m: &LoadedModel| -> anyhow::Result<Vec<f64>> {
        let grads = log_likelihood(m, &tokens)?.backward()?;
        let mut all = Vec::new();
        for (name, var) in m.model.lora_vars() {
            let g = grads.get(var.as_tensor()).with_context(|| format!("no gradient for {name}"))?;
            all.extend(g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        Ok(all)
    };
    let (g, want) = (gradient(m)?, gradient(cpu)?);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let diff: Vec<f64> = g.iter().zip(&want).map(|(a, b)| a - b).collect();
    let relative_error = dot(&diff, &diff).sqrt() / dot(&want, &want).sqrt();
    let cosine = dot(&g, &want) / (dot(&g, &g).sqrt() * dot(&want, &want).sqrt());
    let dtype = m.model.dtype();
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let norm_ratio = (dot(&g, &g) / dot(&want, &want)).sqrt();
    Ok(CpuAgreementReport {
        device: format!("{:?}", m.model.device()),
        dtype: format!("{dtype:?}"),
        tokens: tokens.len(),
        relative_error,
        cosine,
        norm_ratio,
        min_cosine: if half { Some(0.9) } else { None },
        max_relative_error: if half { None } else { Some(1e-2) },
        passed: relative_error.is_finite() && if half { cosine >= 0.9 } else { relative_error < 1e-2 },
    })
}
