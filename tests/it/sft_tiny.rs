//! The SFT warm-up on a tiny random model and a small preprocessed dataset: it overfits a
//! handful of examples, a stopped-and-resumed run equals an uninterrupted one bit for bit,
//! broken or mismatched checkpoints are clear errors, and the binary runs end to end.

use std::path::{Path, PathBuf};

use crate::common::{Setup, adapter_tensors, quiet, text};
use refine_poi::train::checkpoint::write_manifest;
use refine_poi::train::config::RunConfig;
use refine_poi::train::sft;
use refine_poi::train::{RunOptions, StopFlag};

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

#[test]
fn overfits_a_handful_of_examples() {
    let s = Setup::new();
    // Four examples, all in every step: the loss must fall far below its start.
    let cfg = s.cfg(&[
        "data.train_instances=4",
        "sft.max_steps=40",
        "sft.lr=2e-2",
        "sft.answer=single",
        "sft.min_lr_ratio=1.0",
        "lora.dropout=0.0",
        "sft.save_every=0",
        "sft.eval_every=40",
    ]);
    let summary = sft::run(&cfg, &quiet()).unwrap();
    assert!(summary.stage.finished && summary.stage.step == 40);
    let l = losses(&summary.stage.dir);
    assert_eq!(l.len(), 40);
    let (first, last) = (l[0], *l.last().unwrap());
    assert!(last < 0.2 * first, "loss went from {first} to {last}: {l:?}");
    assert!(summary.tokens_per_s > 0.0);
    // The final adapter, the best (the one validation) and one checkpoint are on disk.
    for f in [
        "final/adapter_config.json",
        "final/adapter_model.safetensors",
        "best/best.json",
        "checkpoints/last",
        "checkpoints/step-40/optimizer.safetensors",
        "checkpoints/step-40/trainer_state.json",
        "config.toml",
    ] {
        assert!(summary.stage.dir.join(f).exists(), "{f} missing");
    }
    let val_lines = std::fs::read_to_string(summary.stage.dir.join("metrics.jsonl")).unwrap();
    assert!(val_lines.contains("\"val\""), "a val line is logged");
}

#[test]
fn stop_and_resume_equals_an_uninterrupted_run() {
    // Six examples, four per step: epochs wrap mid-step, dropout is on, validation runs.
    let sets = ["sft.eval_every=3"];
    let straight = Setup::new();
    let cfg = straight.cfg(&sets);
    let full = sft::run(&cfg, &quiet()).unwrap();
    assert!(full.stage.finished);

    let resumed = Setup::new();
    let cfg = resumed.cfg(&sets);
    // Stop after 1 step (a checkpoint is written there, off the save cadence) ...
    let a = sft::run(&cfg, &RunOptions { stop_after: Some(1), ..quiet() }).unwrap();
    assert!(!a.stage.finished && a.stage.step == 1);
    // ... a fresh start in the same folder is refused ...
    let e = format!("{:#}", sft::run(&cfg, &quiet()).unwrap_err());
    assert!(e.contains("--resume"), "{e}");
    // ... resume for 3 more steps, then a Ctrl-C before the next step ...
    let b = sft::run(&cfg, &RunOptions { resume: true, stop_after: Some(3), ..quiet() }).unwrap();
    assert_eq!(b.stage.step, 4);
    let stop = StopFlag::new();
    stop.raise();
    let c = sft::run(&cfg, &RunOptions { resume: true, stop: stop.clone(), ..quiet() }).unwrap();
    assert!(c.stage.interrupted && c.stage.step == 4);
    // ... and the rest.
    let d = sft::run(&cfg, &RunOptions { resume: true, ..quiet() }).unwrap();
    assert!(d.stage.finished && d.stage.step == 6);

    assert_eq!(adapter_tensors(&full.stage.dir.join("final")), adapter_tensors(&d.stage.dir.join("final")), "final adapters differ");
    assert_eq!(losses(&full.stage.dir), losses(&d.stage.dir), "the logs differ");
    assert_eq!(full.stage.best, d.stage.best);
    let opt = |dir: &Path| std::fs::read(dir.join("checkpoints/step-6/optimizer.safetensors")).unwrap();
    assert_eq!(opt(&full.stage.dir), opt(&d.stage.dir), "optimizer states differ");
    // keep_checkpoints = 2: older ones are pruned.
    let mut steps: Vec<String> = std::fs::read_dir(d.stage.dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    assert_eq!(steps, vec!["step-4", "step-6"]);
}

#[test]
fn broken_or_mismatched_checkpoints_are_clear_errors() {
    let s = Setup::new();
    let cfg = s.cfg(&[]);
    let run = sft::run(&cfg, &RunOptions { stop_after: Some(2), ..quiet() }).unwrap();
    let ckpt = run.stage.dir.join("checkpoints/step-2");
    let resume = |cfg: &RunConfig| format!("{:#}", sft::run(cfg, &RunOptions { resume: true, ..quiet() }).unwrap_err());
    let backup = s.tmp.path().join("backup");
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&ckpt, &backup);
    let restore = || copy(&backup, &ckpt);

    // Another config.
    let e = resume(&s.cfg(&["sft.lr=1e-3"]));
    assert!(e.contains("config differs") && e.contains("sft.lr"), "{e}");
    // Each damaged file is named by the checkpoint's manifest, and with only one checkpoint
    // there is nothing to fall back to.
    let damage: [(&str, &dyn Fn()); 4] = [
        ("trainer_state.json", &|| std::fs::write(ckpt.join("trainer_state.json"), "{\"step\": ").unwrap()),
        ("optimizer.safetensors", &|| {
            let opt = std::fs::read(ckpt.join("optimizer.safetensors")).unwrap();
            std::fs::write(ckpt.join("optimizer.safetensors"), &opt[..opt.len() / 2]).unwrap();
        }),
        ("adapter_config.json", &|| std::fs::remove_file(ckpt.join("adapter_config.json")).unwrap()),
        ("adapter_model.safetensors", &|| {
            let mut a = std::fs::read(ckpt.join("adapter_model.safetensors")).unwrap();
            let n = a.len();
            a[n - 1] ^= 1;
            std::fs::write(ckpt.join("adapter_model.safetensors"), a).unwrap();
        }),
    ];
    for (file, hurt) in damage {
        hurt();
        let e = resume(&cfg);
        assert!(e.contains("no intact checkpoint") && e.contains(file), "{file}: {e}");
        restore();
    }
    // Past the manifest (rewritten to match), the files themselves are checked.
    std::fs::write(ckpt.join("trainer_state.json"), "{\"step\": ").unwrap();
    write_manifest(&ckpt).unwrap();
    let e = resume(&cfg);
    assert!(e.contains("step-2") && e.contains("corrupt"), "{e}");
    restore();
    // A state written by another config.
    let state = std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&state).unwrap();
    v["config_hash"] = "0000".into();
    std::fs::write(ckpt.join("trainer_state.json"), v.to_string()).unwrap();
    write_manifest(&ckpt).unwrap();
    let e = resume(&cfg);
    assert!(e.contains("different config"), "{e}");
    restore();
    // A truncated optimizer file.
    let opt = std::fs::read(ckpt.join("optimizer.safetensors")).unwrap();
    std::fs::write(ckpt.join("optimizer.safetensors"), &opt[..opt.len() / 2]).unwrap();
    write_manifest(&ckpt).unwrap();
    let e = resume(&cfg);
    assert!(e.contains("optimizer state") && e.contains("step-2"), "{e}");
    restore();
    // An adapter of another shape.
    let mut other = refine_poi::model::load(cfg.model.path.as_str()).unwrap();
    other.model.attach_lora(&refine_poi::model::LoraConfig { r: 2, alpha: 8.0, dropout: 0.0, targets: vec!["q".into()] }, 1).unwrap();
    other.model.save_adapter(&ckpt, &refine_poi::model::AdapterBase::local("tiny")).unwrap();
    write_manifest(&ckpt).unwrap();
    let e = resume(&cfg);
    assert!(e.contains("step-2") && (e.contains("does not fit") || e.contains("lacks")), "{e}");
    restore();
    // `last` naming a missing checkpoint, or nonsense: the newest intact one is used.
    std::fs::write(run.stage.dir.join("checkpoints/last"), "step-99").unwrap();
    let done = sft::run(&cfg, &RunOptions { resume: true, ..quiet() }).unwrap();
    assert!(done.stage.finished);
    // Nothing to resume in an empty run_dir.
    let elsewhere = s.tmp.path().join("elsewhere");
    let e = resume(&s.cfg(&[&format!("run_dir={}", elsewhere.display())]));
    assert!(e.contains("nothing to resume"), "{e}");
    assert!(!elsewhere.exists(), "a failed resume leaves no folder behind");
}

/// The newest checkpoint damaged (here: its optimizer file cut short, as a full disk or a
/// killed copy would leave it): `--resume` warns and starts from the one before, and the run
/// ends exactly where an uninterrupted one does.
#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let straight = Setup::new();
    let full = sft::run(&straight.cfg(&[]), &quiet()).unwrap();
    let s = Setup::new();
    let cfg = s.cfg(&[]);
    let a = sft::run(&cfg, &RunOptions { stop_after: Some(4), ..quiet() }).unwrap();
    let newest = a.stage.dir.join("checkpoints/step-4");
    assert!(a.stage.dir.join("checkpoints/step-2").is_dir() && newest.is_dir());
    let opt = std::fs::read(newest.join("optimizer.safetensors")).unwrap();
    std::fs::write(newest.join("optimizer.safetensors"), &opt[..opt.len() - 7]).unwrap();
    let out = crate::common::run(&["sft-warmup", "--config", s.config.to_str().unwrap(), "--resume", "--quiet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: checkpoint") && err.contains("step-4") && err.contains("optimizer.safetensors") && err.contains("step-2"),
        "{err}"
    );
    assert!(a.stage.dir.join("checkpoints/damaged-step-4").is_dir(), "the damaged checkpoint is moved aside");
    assert_eq!(adapter_tensors(&full.stage.dir.join("final")), adapter_tensors(&a.stage.dir.join("final")));
    assert_eq!(losses(&full.stage.dir), losses(&a.stage.dir), "the log reads as if the run had never stopped");
}

/// A run started by the previous version (its config without the keys added since, its
/// checkpoint without a manifest or an update count) resumes, with a warning, to the same end.
#[test]
fn a_run_of_the_previous_version_resumes() {
    let straight = Setup::new();
    let full = sft::run(&straight.cfg(&[]), &quiet()).unwrap();
    let s = Setup::new();
    let cfg = s.cfg(&[]);
    let a = sft::run(&cfg, &RunOptions { stop_after: Some(2), ..quiet() }).unwrap();
    let dir = &a.stage.dir;
    let config: String = std::fs::read_to_string(dir.join("config.toml"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("max_nonfinite_steps"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("config.toml"), &config).unwrap();
    let ckpt = dir.join("checkpoints/step-2");
    std::fs::remove_file(ckpt.join("manifest.json")).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    state["config_hash"] = refine_poi::seed::fnv_hex(&config).into();
    state.as_object_mut().unwrap().retain(|k, _| k != "optimizer_updates" && k != "nonfinite_steps");
    std::fs::write(ckpt.join("trainer_state.json"), state.to_string()).unwrap();
    let out = crate::common::run(&["sft-warmup", "--config", s.config.to_str().unwrap(), "--resume", "--quiet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("has no manifest"), "{}", text(&out.stderr));
    assert_eq!(adapter_tensors(&full.stage.dir.join("final")), adapter_tensors(&dir.join("final")));
}

#[test]
fn starting_adapter_must_agree_with_the_lora_section() {
    let s = Setup::new();
    let cfg = s.cfg(&[]);
    let first = sft::run(&cfg, &quiet()).unwrap();
    let adapter = first.stage.dir.join("final");
    let ok = s.cfg(&[&format!("model.adapter={}", adapter.display()), &format!("run_dir={}", s.tmp.path().join("second").display())]);
    assert!(sft::run(&ok, &quiet()).unwrap().stage.finished);
    let bad =
        s.cfg(&[&format!("model.adapter={}", adapter.display()), "lora.r=8", &format!("run_dir={}", s.tmp.path().join("third").display())]);
    let e = format!("{:#}", sft::run(&bad, &quiet()).unwrap_err());
    assert!(e.contains("make them agree"), "{e}");
}

#[test]
fn the_binary_trains_resumes_and_reports_config_errors() {
    let s = Setup::new();
    let config = s.config.to_str().unwrap();
    let out = crate::common::run(&["sft-warmup", "--config", config, "--set", "sft.max_steps=4", "--stop-after", "2", "--quiet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["step"], 2);
    assert_eq!(report["finished"], false);
    let out = crate::common::run(&["sft-warmup", "--config", config, "--set", "sft.max_steps=4", "--resume", "--quiet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["step"], 4);
    assert_eq!(report["finished"], true);
    let dir = PathBuf::from(report["run_dir"].as_str().unwrap());
    // The resolved config records the override; the log has one line per step.
    let resolved = RunConfig::from_toml(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
    assert_eq!(resolved.sft.train.max_steps, 4);
    assert_eq!(losses(&dir).len(), 4);
    for line in std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for k in ["step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"] {
            assert!(v.get(k).is_some(), "{k} missing in {line}");
        }
    }
    // The adapter is a PEFT adapter the eval command loads.
    let cfg = s.cfg(&[]);
    let out = crate::common::run(&[
        "eval",
        "--data",
        cfg.data.dir.to_str().unwrap(),
        "--split",
        "val",
        "--method",
        "llm",
        "--model",
        &cfg.model.path,
        "--adapter",
        dir.join("final").to_str().unwrap(),
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--quiet",
        "--out",
        s.tmp.path().join("eval.json").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Config mistakes: one error line naming the key, no panic.
    for (sets, expect) in [
        (vec!["--set", "sft.lrr=1"], "unknown config key `sft.lrr`"),
        (vec!["--set", "sft.batch_size=x"], "sft.batch_size"),
        (vec!["--set", "nosuch.key=1"], "unknown config key `nosuch`"),
    ] {
        let mut args = vec!["sft-warmup", "--config", config, "--quiet"];
        args.extend(sets);
        let out = crate::common::run(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked"), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(expect), "{err}");
    }
    let out = crate::common::run(&["sft-warmup", "--config", "/no/such.toml", "--quiet"]);
    assert!(text(&out.stderr).contains("cannot read config /no/such.toml"));
}

/// `bench --sft` times the warm-up's own loop: its runs end at the loss `sft-warmup` reaches in
/// as many steps, the timed tokens are those of the steps after the first, nothing is written to
/// the config's run directory, and bad arguments are one clear error.
#[test]
fn bench_sft_times_the_warm_up_loop() {
    let s = Setup::new();
    let config = s.config.to_str().unwrap();
    let out = crate::common::run(&["bench", "--sft", "--config", config, "--steps", "3", "--repeats", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!s.tmp.path().join("runs").exists(), "bench --sft wrote to the config's run_dir");
    let (runs, losses_) = (report["tokens_per_s_runs"].as_array().unwrap(), report["last_loss_runs"].as_array().unwrap());
    assert_eq!((runs.len(), losses_.len()), (2, 2));
    assert!(runs.iter().all(|r| r.as_f64().unwrap() > 0.0));
    assert_eq!(losses_[0], losses_[1], "the runs are deterministic");
    assert!(report["gflops"].as_f64().unwrap() > 0.0 && report["share_of_gemm"].as_f64().unwrap() > 0.0);
    assert_eq!(report["epoch_examples"], 6);
    assert!(report["epoch_tokens"].is_null(), "prompt examples have no epoch token count");

    let out = crate::common::run(&["sft-warmup", "--config", config, "--set", "sft.max_steps=3", "--set", "sft.save_every=0", "--quiet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = PathBuf::from(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["run_dir"].as_str().unwrap().to_string());
    assert_eq!(losses_[0].as_f64().unwrap(), *losses(&dir).last().unwrap());
    let tokens = crate::common::logged(&dir, "tokens");
    assert_eq!(report["timed_tokens"].as_f64().unwrap(), tokens[1] + tokens[2]);

    for (args, expect) in
        [(vec!["bench", "--sft"], "--config"), (vec!["bench", "--sft", "--config", config, "--steps", "1"], "--steps must be at least 2")]
    {
        let out = crate::common::run(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked") && err.contains(expect), "{err}");
    }
}
