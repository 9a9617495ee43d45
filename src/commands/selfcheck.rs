//! `refine-poi selfcheck`: is the model computed right on this device and dtype? The default
//! model's logits against the reference's golden values, LoRA gradients of a tiny f64 model
//! against finite differences, and the default model's LoRA gradient against the CPU's in f32.
//! Prints one line per check and the whole report as JSON; fails when any check does.

use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::Args as ClapArgs;
use serde_json::json;

use crate::model::{self, ModelSource};
use crate::selfcheck::{golden_logits, lora_finite_differences, lora_gradient_against_cpu};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The default model (the golden values are its own).
    #[arg(long, default_value = model::DEFAULT_MODEL)]
    pub model: String,
    /// The reference files (golden token ids and logits).
    #[arg(long, default_value = "tests/fixtures/reference")]
    pub reference: PathBuf,
    /// Also write the report here (JSON).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut loaded = model::load(&args.model)?;
    let device = loaded.model.device().clone();
    let golden = golden_logits(&loaded, &args.reference)?;
    for p in &golden.positions {
        eprintln!(
            "selfcheck: golden logits, {}: top-1 {}, top-5 {}, max |diff| {:.4}",
            p.what,
            if p.top1_same { "same" } else { "DIFFERENT" },
            if p.top5_same { "same" } else { "different" },
            p.max_abs_diff
        );
    }
    eprintln!(
        "selfcheck: golden logits on {device:?} in {}: {} (tolerance {}; greedy continuation {})",
        golden.dtype,
        verdict(golden.passed),
        golden.tolerance,
        if golden.greedy_same { "same" } else { "different" }
    );
    let fd = lora_finite_differences(&device)?;
    eprintln!(
        "selfcheck: LoRA gradients of a tiny f64 model against finite differences: {} entries, max error {:.2e}: {}",
        fd.checked,
        fd.max_error,
        verdict(fd.passed)
    );
    let mut cpu = model::load_on(&ModelSource::parse(&args.model)?, &Device::Cpu, DType::F32)?;
    let agree = lora_gradient_against_cpu(&mut loaded, &mut cpu)?;
    eprintln!(
        "selfcheck: LoRA gradient in {} on {} against f32 on the CPU: relative error {:.2e}, cosine {:.6}, norm ratio {:.4}: {}",
        agree.dtype,
        agree.device,
        agree.relative_error,
        agree.cosine,
        agree.norm_ratio,
        verdict(agree.passed)
    );
    let passed = golden.passed && fd.passed && agree.passed;
    let report = json!({ "model": loaded.source, "passed": passed, "golden_logits": golden, "finite_differences": fd, "gradient_against_cpu": agree });
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        crate::fsutil::write_atomic(out, text.as_bytes())?;
    }
    println!("{text}");
    anyhow::ensure!(passed, "selfcheck failed (see the lines above)");
    Ok(())
}

fn verdict(passed: bool) -> &'static str {
    if passed { "pass" } else { "FAIL" }
}
