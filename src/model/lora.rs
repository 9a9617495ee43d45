//! LoRA: its settings (`[lora]`, [`LoraConfig`]) and the low-rank factors a linear layer
//! carries ([`Lora`]). Attaching, saving and loading adapters in PEFT's layout is
//! [`super::peft`].

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// Short names of the projections LoRA can target, as PEFT's `target_modules` spells them.
pub const ALL_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scale numerator: the update is multiplied by alpha / r.
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Which projections get an adapter: any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    /// (or the short forms q, k, v, o, gate, up, down).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { r: 8, alpha: 16.0, dropout: 0.05, targets: ALL_TARGETS.iter().map(|s| s.to_string()).collect() }
    }
}

impl LoraConfig {
    /// Targets normalised to PEFT's names; unknown names are errors.
    pub fn target_modules(&self) -> anyhow::Result<Vec<String>> {
        anyhow::ensure!(self.r > 0, "LoRA rank r must be positive");
        anyhow::ensure!(!self.targets.is_empty(), "LoRA needs at least one target module");
        self.targets
            .iter()
            .map(|t| {
                let full = if t.ends_with("_proj") { t.clone() } else { format!("{t}_proj") };
                anyhow::ensure!(ALL_TARGETS.contains(&full.as_str()), "unknown LoRA target '{t}' (expected one of {ALL_TARGETS:?})");
                Ok(full)
            })
            .collect()
    }
}

/// Low-rank update `dropout(x) A^T B^T * scale` on top of a frozen linear layer (PEFT's LoRA:
/// dropout on the adapter's input only, inverted scaling, active only in modes that ask for it).
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    /// Probability of zeroing an input element of the adapter branch in a dropout pass.
    pub dropout: f64,
    /// A frozen copy of (A, B, scale) that adapter-off passes apply: the reference policy when
    /// it is not the base model (e.g. GRPO's KL kept against its SFT start). It belongs to the
    /// layer: loading another adapter (a checkpoint) keeps it.
    pub reference: Option<(Tensor, Tensor, f64)>,
}
