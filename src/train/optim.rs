//! The optimiser side of training, shared by SFT and GRPO: AdamW over the adapter's `Var`s with
//! explicit moment tensors (so its state saves and loads exactly), gradient accumulation over
//! micro-batches, global-norm clipping.
//! The learning-rate schedule is [`super::schedule`].

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::schedule::TrainConfig;

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` semantics: decoupled weight decay,
/// bias-corrected moments, eps added after the square root).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWParams {
    pub fn from_train(t: &TrainConfig) -> Self {
        AdamWParams { beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_eps, weight_decay: t.weight_decay }
    }
}

/// AdamW on named variables (the adapter's `lora_vars()`, in their fixed order). The moments
/// are kept in f32 whatever the variables' dtype.
pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    updates: u64,
    pub hp: AdamWParams,
}

const STEP_KEY: &str = "adamw.step";

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, hp: AdamWParams) -> Result<Self> {
        ensure!(!params.is_empty(), "nothing to optimise: the model has no adapter");
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = params.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<Vec<_>>>()?;
        let v = params.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW { params, m, v, updates: 0, hp })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Updates applied so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// One update with `grads` (aligned with [`AdamW::params`]) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        ensure!(grads.len() == self.params.len(), "{} gradients for {} parameters", grads.len(), self.params.len());
        self.updates += 1;
        let t = self.updates as i32;
        let AdamWParams { beta1, beta2, eps, weight_decay } = self.hp;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        for (i, ((_, var), g)) in self.params.iter().zip(grads).enumerate() {
            let g = g.to_dtype(DType::F32)?;
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + eps)?;
            let update = ((&m / bc1)? / denom)?;
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let p = if weight_decay > 0.0 { (&p * (1.0 - lr * weight_decay))? } else { p };
            let p = (p - (update * lr)?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes the moments and the update count to a safetensors file (through a temporary name).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            tensors.insert(format!("{name}.exp_avg"), self.m[i].clone());
            tensors.insert(format!("{name}.exp_avg_sq"), self.v[i].clone());
        }
        tensors.insert(STEP_KEY.to_string(), Tensor::new(&[self.updates as i64], &Device::Cpu)?);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        candle_core::safetensors::save(&tensors, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Restores the state written by [`AdamW::save`]; every tensor must be there with the
    /// parameters' shapes, and nothing else.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read optimizer state {}", path.display()))?;
        let step = tensors.remove(STEP_KEY).with_context(|| format!("{}: no {STEP_KEY}", path.display()))?;
        let step = step.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        ensure!(step.len() == 1 && step[0] >= 0, "{}: malformed {STEP_KEY}", path.display());
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (name, var) in &self.params {
            let device = var.device();
            let mut take = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = tensors.remove(&key).with_context(|| format!("{} does not fit this adapter: it lacks {key}", path.display()))?;
                ensure!(
                    t.dims() == var.dims(),
                    "{} does not fit this adapter: {key} has shape {:?}, the parameter has {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
                Ok(t.to_dtype(DType::F32)?.to_device(device)?)
            };
            m.push(take("exp_avg")?);
            v.push(take("exp_avg_sq")?);
        }
        if let Some(extra) = tensors.keys().next() {
            anyhow::bail!("{} does not fit this adapter: unexpected tensor {extra}", path.display());
        }
        self.m = m;
        self.v = v;
        self.updates = step[0] as u64;
        Ok(())
    }
}

/// Sums gradients over the micro-batches of one optimizer step.
pub struct GradAccum {
    sums: Vec<Option<Tensor>>,
}

impl GradAccum {
    pub fn new(n_params: usize) -> Self {
        GradAccum { sums: vec![None; n_params] }
    }

    /// Adds one backward pass's gradients of `params` (a parameter the loss did not reach adds 0).
    pub fn add(&mut self, grads: &GradStore, params: &[(String, Var)]) -> Result<()> {
        ensure!(params.len() == self.sums.len(), "parameter count changed during accumulation");
        for (sum, (_, var)) in self.sums.iter_mut().zip(params) {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The summed gradients, zeros where none arrived; resets the accumulator.
    pub fn take(&mut self, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
        self.sums
            .iter_mut()
            .zip(params)
            .map(|(s, (_, var))| match s.take() {
                Some(g) => Ok(g),
                None => Ok(Tensor::zeros(var.shape(), DType::F32, var.device())?),
            })
            .collect()
    }
}

/// The global L2 norm of `grads` (accumulated in f64).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (PyTorch's `clip_grad_norm_`:
/// factor `max_norm / (norm + 1e-6)` when that is below 1); 0 disables clipping. Returns the
/// norm before clipping. A non-finite norm is returned as it is, the gradients untouched: the
/// caller skips that update.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_hand_computed_updates() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let hp = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], hp).unwrap();
        let g = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&g), 0.01).unwrap();
        // First step: m_hat = g, v_hat = g^2, so the update is sign(g) (up to eps).
        let p = var.as_tensor().to_vec1::<f32>().unwrap();
        let expect = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (a, b) in p.iter().zip(expect) {
            assert!((*a as f64 - b).abs() < 1e-6, "{p:?} vs {expect:?}");
        }
        // Save + load round trip restores the exact state.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let var2 = Var::from_tensor(var.as_tensor()).unwrap();
        let mut opt2 = AdamW::new(vec![("p".into(), var2.clone())], hp).unwrap();
        opt2.load(&path).unwrap();
        assert_eq!(opt2.updates(), 1);
        opt.step(std::slice::from_ref(&g), 0.01).unwrap();
        opt2.step(std::slice::from_ref(&g), 0.01).unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), var2.as_tensor().to_vec1::<f32>().unwrap());
        // Another parameter set does not fit.
        let other = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt3 = AdamW::new(vec![("p".into(), other)], hp).unwrap();
        let e = format!("{:#}", opt3.load(&path).unwrap_err());
        assert!(e.contains("does not fit") && e.contains("shape"), "{e}");
        let mut opt4 = AdamW::new(vec![("q".into(), var2)], hp).unwrap();
        let e = format!("{:#}", opt4.load(&path).unwrap_err());
        assert!(e.contains("lacks q.exp_avg"), "{e}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![Tensor::new(&[3.0f32], &Device::Cpu).unwrap(), Tensor::new(&[4.0f32], &Device::Cpu).unwrap()];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let norm = clip_grad_norm(&mut g, 0.0).unwrap();
        assert!((norm - 1.0).abs() < 1e-5, "0 = no clipping, just the norm");
    }
}
