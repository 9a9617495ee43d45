//! Drives the model-facing commands (`generate`, `eval --method llm`, `recommend`) on a tiny
//! random model, including the hub path in offline mode and bad inputs.

use std::path::{Path, PathBuf};

use refine_poi::model::tiny::{tiny_config, write_tiny_model};

use crate::common::{bin, error_line, ok};

/// A tiny model folder and a small preprocessed dataset.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_tiny_model(&model, &tiny_config("llama"), 3).unwrap();
    let data = tmp.path().join("data");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tsmc2014_synthetic.txt");
    ok(bin().args(["preprocess", "--format", "foursquare", "--quiet", "--input"]).arg(&fixture).arg("--out").arg(&data).output().unwrap());
    (tmp, model, data)
}

#[test]
fn generate_with_a_model_folder() {
    let (_tmp, model, _) = setup();
    let out = ok(bin()
        .args(["generate", "--greedy", "--chat", "--max-new-tokens", "5", "--top-logits", "3", "--json", "--prompt", "hi", "--model"])
        .arg(&model)
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["top_logits"].as_array().unwrap().len(), 3);
    assert!(v["completion_tokens"].as_array().unwrap().len() <= 5);
}

#[test]
fn eval_llm_reports_like_the_baselines_on_the_same_sample() {
    let (tmp, model, data) = setup();
    let report = tmp.path().join("llm.json");
    let preds = tmp.path().join("llm.jsonl");
    ok(bin()
        .args([
            "eval",
            "--method",
            "llm",
            "--split",
            "test",
            "--limit",
            "4",
            "--batch-size",
            "3",
            "--max-new-tokens",
            "8",
            "--quiet",
            "--data",
        ])
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&report)
        .arg("--predictions")
        .arg(&preds)
        .output()
        .unwrap());
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["instances"], 4);
    assert_eq!(r["metrics"]["all"]["n"], 4);
    assert!(r["invalid_rate"].as_f64().is_some());
    for key in ["acc@1", "acc@5", "acc@10", "ndcg@5", "ndcg@10", "mrr"] {
        assert!(r["metrics"]["all"].get(key).is_some(), "{key}");
    }
    // Answer-in-prompt on the same instances, per group; it agrees with the prompts written.
    let in_prompt = &r["answer_in_prompt"];
    assert_eq!(in_prompt["instances"], 4);
    assert_eq!(in_prompt["groups"]["all"]["n"], 4);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&preds).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    let names = |text: &str, id: u64| {
        let want = id.to_string();
        text.split("POI ").skip(1).any(|rest| rest.chars().take_while(char::is_ascii_digit).collect::<String>() == want)
    };
    let named = lines.iter().filter(|l| names(l["detail"]["prompt"].as_str().unwrap(), l["target"].as_u64().unwrap())).count();
    assert_eq!(in_prompt["groups"]["all"]["in_prompt"], named as u64, "{in_prompt}");
    for l in &lines {
        assert!(l["detail"]["prompt"].as_str().unwrap().contains("<|im_start|>assistant"));
        assert!(l["detail"]["completion"].is_string());
        assert!(l["detail"]["parsed"]["items"].is_u64());
    }

    // The counter with the same --limit evaluates the same instances.
    let counter = tmp.path().join("counter.jsonl");
    ok(bin()
        .args(["eval", "--method", "counter", "--split", "test", "--limit", "4", "--quiet", "--out"])
        .arg(tmp.path().join("counter.json"))
        .arg("--predictions")
        .arg(&counter)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap());
    let ids = |p: &Path| -> Vec<u64> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids(&preds), ids(&counter));
}

#[test]
fn recommend_errors_are_clear() {
    let (tmp, model, data) = setup();
    let run = |args: &[&str]| {
        bin().args(args).arg("--data").arg(&data).arg("--model").arg(&model).arg("--max-new-tokens").arg("4").output().unwrap()
    };
    assert!(error_line(&run(&["recommend", "--user", "no-such-user"])).contains("not in the dataset"));
    let history = tmp.path().join("history.json");
    std::fs::write(&history, r#"{"checkins": [{"venue_id": "unknown-venue", "time": "2012-05-01T10:00:00Z"}]}"#).unwrap();
    assert!(error_line(&run(&["recommend", "--history", history.to_str().unwrap()])).contains("unknown-venue"));
    std::fs::write(&history, r#"{"checkins": [{"poi": 0, "time": "yesterday"}]}"#).unwrap();
    assert!(error_line(&run(&["recommend", "--history", history.to_str().unwrap()])).contains("ISO 8601"));
    // A random tiny model answers nothing parsable: said plainly, with its raw answer.
    let users = std::fs::read_to_string(data.join("users.csv")).unwrap();
    let user = users.lines().nth(1).unwrap().split(',').nth(1).unwrap().to_string();
    let err = error_line(&run(&["recommend", "--user", &user]));
    assert!(err.contains("no valid POI id"), "{err}");
    assert!(error_line(&run(&["recommend", "--user", &user, "--beam-next", "10"])).contains("--beam-next"));
}

#[test]
fn hub_models_load_from_the_cache_offline_and_say_what_is_missing() {
    let (tmp, model, _) = setup();
    // hf-hub's cache layout: hub/models--owner--name/{refs/main, snapshots/<rev>/...}.
    let hf_home = tmp.path().join("hf");
    let repo = hf_home.join("hub/models--acme--tiny");
    let snapshot = repo.join("snapshots/0123abc");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abc").unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snapshot.join(f.file_name().unwrap())).unwrap();
    }
    let generate = |repo_id: &str| {
        bin()
            .env("HF_HOME", &hf_home)
            .env("HF_HUB_OFFLINE", "1")
            .args(["generate", "--greedy", "--max-new-tokens", "2", "--prompt", "x", "--model", repo_id])
            .output()
            .unwrap()
    };
    ok(generate("acme/tiny"));
    let err = error_line(&generate("acme/missing"));
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("huggingface-cli download acme/missing"), "{err}");
}

#[test]
fn a_missing_model_says_how_to_get_it() {
    let out = bin().args(["generate", "--prompt", "x", "--model", "no/such/path.gguf"]).output().unwrap();
    assert!(error_line(&out).contains("neither a GGUF file"));
}

/// The export merges the adapter: the exported folder alone gives the logits of base + adapter,
/// for Llama (tied embeddings) and Qwen2 (q/k/v bias).
#[test]
fn export_writes_a_merged_hugging_face_folder() {
    use candle_core::{Device, Tensor};
    use refine_poi::model::{LoraConfig, Mode, load};
    for model_type in ["llama", "qwen2"] {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        write_tiny_model(&base, &tiny_config(model_type), 5).unwrap();
        let mut m = load(base.to_str().unwrap()).unwrap();
        m.model
            .attach_lora(&LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: vec!["q".into(), "v".into(), "down".into()] }, 2)
            .unwrap();
        // B = 0 at init: give it values so the merge matters.
        for (name, var) in m.model.lora_vars() {
            if name.contains("lora_B") {
                let n = var.elem_count();
                let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.02).collect();
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        let adapter = tmp.path().join("adapter");
        m.model.save_adapter(&adapter, &refine_poi::model::AdapterBase::local("tiny")).unwrap();
        let out = tmp.path().join("merged");
        ok(bin()
            .args(["export", "--model", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .output()
            .unwrap());
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert!(config["architectures"][0].as_str().unwrap().ends_with("ForCausalLM"), "{config}");
        // A pad token (the end-of-sequence token) for batched use in transformers.
        let tok_cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
        assert_eq!(tok_cfg["pad_token"], tok_cfg["eos_token"], "{tok_cfg}");
        assert!(config["pad_token_id"].is_u64(), "{config}");
        let merged = load(out.to_str().unwrap()).unwrap();
        let ids = m.tokenizer.encode("merge me 42", false).unwrap();
        assert_eq!(ids, merged.tokenizer.encode("merge me 42", false).unwrap(), "same tokenizer");
        let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let want = m.model.forward(&t, None, None, Mode::INFERENCE).unwrap();
        let got = merged.model.forward(&t, None, None, Mode::INFERENCE).unwrap();
        let base_logits = m.model.forward(&t, None, None, Mode::REFERENCE).unwrap();
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&want, &base_logits) > 1e-3, "the adapter changes the logits");
        assert!(diff(&want, &got) < 1e-4, "{model_type}: merged logits differ by {}", diff(&want, &got));
        // A non-empty --out is refused.
        let again = bin().args(["export", "--model", base.to_str().unwrap(), "--out", out.to_str().unwrap()]).output().unwrap();
        assert!(error_line(&again).contains("not empty"));
    }
}

/// `prompt-stats`: the share of instances whose prompt names the target, by group and section;
/// a discovery target (never visited) is in no prompt built from the user's own history.
#[test]
fn prompt_stats_counts_the_target_in_the_prompt() {
    let (tmp, model, data) = setup();
    let out_json = tmp.path().join("in-prompt.json");
    let out = ok(bin()
        .args(["prompt-stats", "--split", "test", "--data"])
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out_json)
        .output()
        .unwrap());
    assert!(out.contains("anywhere") && out.contains("most_visited"), "{out}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap();
    let g = |name: &str| &r["groups"][name];
    assert_eq!(g("all")["n"].as_u64().unwrap(), r["instances"].as_u64().unwrap());
    assert!(g("return")["share"].as_f64().unwrap() > 0.0, "{r}");
    if !g("discovery").is_null() {
        assert_eq!(g("discovery")["in_prompt"], 0, "{r}");
    }
    for section in g("all")["by_section"].as_object().unwrap().values() {
        assert!(section.as_f64().unwrap() <= g("all")["share"].as_f64().unwrap());
    }
}

/// `eval --constrained`: a random model's answers are all valid lists of k distinct POI ids,
/// against 100% invalid answers without the grammar; with reasoning on it is one clear error.
#[test]
fn eval_constrained_answers_are_never_invalid() {
    let (tmp, model, data) = setup();
    let run = |extra: &[&str], name: &str| {
        let report = tmp.path().join(format!("{name}.json"));
        let preds = tmp.path().join(format!("{name}.jsonl"));
        let out = bin()
            .args(["eval", "--method", "llm", "--split", "test", "--limit", "4", "--k", "3", "--max-new-tokens", "40", "--quiet", "--data"])
            .arg(&data)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&report)
            .arg("--predictions")
            .arg(&preds)
            .args(extra)
            .output()
            .unwrap();
        (out, report, preds)
    };
    let (out, free, _) = run(&[], "free");
    ok(out);
    let (out, constrained, preds) = run(&["--constrained"], "constrained");
    ok(out);
    let rate = |p: &Path| {
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap()["invalid_rate"].as_f64().unwrap()
    };
    assert_eq!(rate(&free), 1.0, "a random model writes no valid list");
    assert_eq!(rate(&constrained), 0.0);
    for line in std::fs::read_to_string(&preds).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let parsed = &v["detail"]["parsed"];
        assert_eq!(parsed["ids"].as_array().unwrap().len(), 3, "{v}");
        assert_eq!((parsed["out_of_range"].as_u64(), parsed["duplicates"].as_u64()), (Some(0), Some(0)));
    }
    let reasoning = tmp.path().join("reasoning.toml");
    std::fs::write(&reasoning, "reasoning = true\n").unwrap();
    let (out, _, _) = run(&["--constrained", "--prompt-config", reasoning.to_str().unwrap()], "reasoning");
    assert!(error_line(&out).contains("constrained decoding needs reasoning = false"));
}

/// `recommend --constrained`: the same random model that answers nothing parsable above now
/// answers k distinct POIs of the dataset.
#[test]
fn recommend_constrained_answers_k_dataset_pois() {
    let (_tmp, model, data) = setup();
    let users = std::fs::read_to_string(data.join("users.csv")).unwrap();
    let user = users.lines().nth(1).unwrap().split(',').nth(1).unwrap().to_string();
    let out = ok(bin()
        .args(["recommend", "--user", &user, "--constrained", "--k", "3", "--max-new-tokens", "40", "--json", "--data"])
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["parsed"]["well_formed"], true, "{v}");
    let recs = v["recommendations"].as_array().unwrap();
    assert_eq!(recs.len(), 3, "{v}");
    let mut pois: Vec<u64> = recs.iter().map(|r| r["poi"].as_u64().unwrap()).collect();
    pois.sort_unstable();
    pois.dedup();
    assert_eq!(pois.len(), 3);
    assert!(recs.iter().all(|r| r["venue_id"].is_string()), "every id is a dataset POI: {v}");
}
