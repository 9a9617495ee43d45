//! The code a GPU runs, run on the CPU: a tiny Qwen2 (q/k/v biases, untied head) through the SFT
//! warm-up and GRPO, once in f32 (the fused CPU kernels) and once with `--dtype bf16`, where
//! every op is candle's portable one, as on a GPU. The adapter stays f32 either way.

use std::path::Path;

use crate::common::{Setup, WARM_UP, adapter_f32, bin, logged, text};

fn train(s: &Setup, dtype: &str, stage: &str, run_dir: &Path, sets: &[String]) {
    let mut c = bin();
    c.args(["--dtype", dtype, stage, "--quiet", "--config"]).arg(&s.config).arg("--set").arg(format!("run_dir=\"{}\"", run_dir.display()));
    for set in sets {
        c.args(["--set", set]);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{dtype} {stage}: {}", text(&out.stderr));
}

#[test]
fn a_tiny_qwen2_trains_in_f32_and_in_bf16_with_an_f32_adapter() {
    let s = Setup::of("qwen2");
    let warm_up: Vec<String> = WARM_UP.iter().map(|s| s.to_string()).collect();
    for dtype in ["f32", "bf16"] {
        let run = s.tmp.path().join(dtype);
        train(&s, dtype, "sft-warmup", &run, &warm_up);
        let losses = logged(&run.join("sft"), "loss");
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < 0.3 * first, "{dtype}: SFT loss went from {first} to {last}");
        let sft = adapter_f32(&run.join("sft/final"));
        assert!(sft.iter().any(|(n, x)| n.contains("lora_B") && x.iter().any(|v| v.abs() > 1e-3)), "{dtype}: B never moved");

        let init = format!("grpo.init_adapter=\"{}\"", run.join("sft/final").display());
        // A tiny model's samples rarely differ in reward, so every group stays in the update and
        // the KL to the base model (which the warm-up moved away from) gives the gradient.
        let more = [init, "grpo.skip_zero_signal=false".into(), "grpo.reference=\"base\"".into(), "grpo.beta=0.1".into()];
        let grpo_sets: Vec<String> = warm_up.iter().cloned().chain(more).collect();
        train(&s, dtype, "grpo-train", &run, &grpo_sets);
        let grads = logged(&run.join("grpo"), "grad_norm");
        assert!(logged(&run.join("grpo"), "kl").iter().any(|&k| k > 0.0), "{dtype}: no KL to the base model");
        assert_eq!(grads.len(), 4, "{dtype}: 4 GRPO steps logged");
        assert!(grads.iter().all(|g| g.is_finite()) && grads.iter().any(|&g| g > 0.0), "{dtype}: no GRPO gradient: {grads:?}");
        let grpo = adapter_f32(&run.join("grpo/final"));
        // Small updates survive: an f32 master copy, not bf16 that rounds them away.
        let moved = sft.iter().zip(&grpo).any(|((_, x), (_, y))| x.iter().zip(y).any(|(p, q)| p != q));
        assert!(moved, "{dtype}: GRPO did not move the adapter");
    }
}
