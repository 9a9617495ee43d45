//! `grpo-train` on a tiny random model and a small preprocessed dataset: a stopped-and-resumed
//! run equals an uninterrupted one bit for bit, the log carries every documented statistic, the
//! KL reference is the starting adapter, and the binary reports a missing SFT start clearly.

use std::path::Path;

use crate::common::{Setup, WARM_UP, adapter_tensors, bin, quiet, text};
use refine_poi::train::{RunOptions, StopFlag};
use refine_poi::train::{grpo, sft};

fn records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("reward").is_some())
        .collect()
}

/// The warm-up ([`WARM_UP`]) run, and the sets of a GRPO run that starts from it.
fn warmed_up(s: &Setup) -> Vec<String> {
    let sets = WARM_UP;
    let cfg = s.cfg(&sets);
    assert!(sft::run(&cfg, &quiet()).unwrap().stage.finished);
    let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    sets.push("grpo.init_adapter=sft".into());
    sets
}

fn cfg_with(s: &Setup, base: &[String], more: &[&str]) -> refine_poi::train::config::RunConfig {
    let all: Vec<&str> = base.iter().map(String::as_str).chain(more.iter().copied()).collect();
    s.cfg(&all)
}

#[test]
fn stop_and_resume_equals_an_uninterrupted_run_and_the_log_is_complete() {
    let straight = Setup::new();
    let sets = warmed_up(&straight);
    let cfg = cfg_with(&straight, &sets, &[]);
    let full = grpo::run(&cfg, &quiet()).unwrap();
    assert!(full.stage.finished && full.stage.step == 4);
    let log = records(&full.stage.dir);
    assert_eq!(log.len(), 4);
    // The test means something only if some group carried signal and the adapter moved.
    assert!(
        log.iter().any(|r| r["zero_signal_groups"].as_u64() < r["groups"].as_u64() && r["grad_norm"].as_f64().unwrap() > 0.0),
        "no step had a learning signal: {log:?}"
    );
    for r in &log {
        for key in [
            "reward",
            "reward_std",
            "kl",
            "clip_fraction",
            "completion_tokens",
            "well_formed",
            "valid",
            "acc1",
            "acc_k",
            "loss",
            "grad_norm",
            "lr",
            "zero_signal_groups",
            "step_s",
        ] {
            assert!(r[key].is_number(), "{key} missing in {r}");
        }
        for term in ["format", "hit", "rank", "soft_accuracy", "diversity", "length"] {
            assert!(r["rewards"][term].is_number(), "rewards.{term} missing in {r}");
        }
        for part in ["sampling", "reward", "reference", "forward_backward", "optimizer"] {
            assert!(r["time"][part].is_number(), "time.{part} missing in {r}");
        }
    }
    // The first step samples from the starting policy, which is also the reference: KL 0.
    assert!(log[0]["kl"].as_f64().unwrap().abs() < 1e-6, "{}", log[0]);
    // The starting adapter is kept in the run directory.
    assert!(full.stage.dir.join("init/adapter_model.safetensors").is_file());

    let resumed = Setup::new();
    let sets = warmed_up(&resumed);
    let cfg = cfg_with(&resumed, &sets, &[]);
    let a = grpo::run(&cfg, &RunOptions { stop_after: Some(1), ..quiet() }).unwrap();
    assert!(!a.stage.finished && a.stage.step == 1);
    let e = format!("{:#}", grpo::run(&cfg, &quiet()).unwrap_err());
    assert!(e.contains("--resume"), "{e}");
    let stop = StopFlag::new();
    let b = grpo::run(&cfg, &RunOptions { resume: true, stop_after: Some(2), ..quiet() }).unwrap();
    assert_eq!(b.stage.step, 3);
    stop.raise();
    let c = grpo::run(&cfg, &RunOptions { resume: true, stop, ..quiet() }).unwrap();
    assert!(c.stage.interrupted && c.stage.step == 3);
    let d = grpo::run(&cfg, &RunOptions { resume: true, ..quiet() }).unwrap();
    assert!(d.stage.finished && d.stage.step == 4);
    let bytes = |dir: &Path| adapter_tensors(&dir.join("final"));
    assert_eq!(bytes(&full.stage.dir), bytes(&d.stage.dir), "final adapters differ");
    let strip = |mut v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        for r in &mut v {
            let o = r.as_object_mut().unwrap();
            for k in ["time", "step_s", "elapsed_s"] {
                o.remove(k);
            }
        }
        v
    };
    assert_eq!(strip(records(&full.stage.dir)), strip(records(&d.stage.dir)), "the logs differ");

    // Editing [sft] does not block resuming GRPO; editing [grpo] does, naming the key.
    let finished_sft = cfg_with(&resumed, &sets, &["sft.lr=1e-3"]);
    assert!(grpo::run(&finished_sft, &RunOptions { resume: true, ..quiet() }).unwrap().stage.finished);
    let changed = cfg_with(&resumed, &sets, &["grpo.beta=0.5"]);
    let e = format!("{:#}", grpo::run(&changed, &RunOptions { resume: true, ..quiet() }).unwrap_err());
    assert!(e.contains("config differs") && e.contains("grpo.beta"), "{e}");
}

#[test]
fn the_binary_trains_from_a_fresh_adapter_and_explains_a_missing_sft_start() {
    let s = Setup::new();
    let config = s.config.to_str().unwrap();
    let out = bin().args(["grpo-train", "--config", config, "--set", "grpo.init_adapter=sft", "--quiet"]).output().unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("sft-warmup") && err.contains("init_adapter"), "{err}");

    let out = bin()
        .args(["grpo-train", "--config", config, "--set", "grpo.max_steps=2", "--set", "grpo.eval_every=2", "--quiet"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["step"], 2);
    assert_eq!(report["finished"], true);
    let dir = std::path::PathBuf::from(report["run_dir"].as_str().unwrap());
    assert_eq!(records(&dir).len(), 2);
    // Validation ran at the end and best/ holds a PEFT adapter.
    assert!(std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().contains("\"val\""));
    assert!(dir.join("best/adapter_config.json").is_file() && dir.join("final/adapter_config.json").is_file());

    for (set, expect) in
        [("grpo.group=1", "grpo.group"), ("grpo.loss_norm=mean", "grpo.loss_norm"), ("rewards.weights.hitt=1", "unknown reward `hitt`")]
    {
        let out = bin().args(["grpo-train", "--config", config, "--set", set, "--quiet"]).output().unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked") && err.contains(expect), "{set}: {err}");
    }
}

/// `grpo.constrained`: from a fresh adapter (whose free answers are all invalid), every sampled
/// answer and every validation answer is a valid list, the reward's format term is always
/// earned, and the groups still carry a learning signal; with reasoning on it is a clear error.
#[test]
fn constrained_grpo_samples_and_validates_only_valid_lists() {
    let s = Setup::new();
    let sets = [
        "grpo.constrained=true",
        "grpo.init_adapter=none",
        "grpo.max_steps=3",
        "grpo.eval_every=3",
        "grpo.skip_zero_signal=false",
        "grpo.max_new_tokens=48",
        "grpo.eval_max_new_tokens=48",
    ];
    let done = grpo::run(&s.cfg(&sets), &quiet()).unwrap();
    assert!(done.stage.finished);
    let log = records(&done.stage.dir);
    assert_eq!(log.len(), 3);
    for r in &log {
        assert_eq!(r["valid"].as_f64(), Some(1.0), "{r}");
        assert_eq!(r["well_formed"].as_f64(), Some(1.0), "{r}");
    }
    assert!(log.iter().any(|r| r["grad_norm"].as_f64().unwrap() > 0.0), "{log:?}");
    assert_eq!(crate::common::logged(&done.stage.dir, "val_invalid_rate"), vec![0.0]);
    let sets = ["grpo.constrained=true".to_string(), "prompt.reasoning=true".to_string()];
    let e = format!("{:#}", refine_poi::train::config::RunConfig::load(Some(&s.config), &sets).unwrap_err());
    assert!(e.contains("grpo.constrained needs prompt.reasoning = false"), "{e}");
}
