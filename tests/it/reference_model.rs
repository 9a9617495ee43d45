//! The real default model against golden values from the reference implementation
//! (transformers loading the same GGUF in f32), copied into tests/fixtures/reference.
//! Runs when `scripts/fetch-model.sh` has fetched the model; in CI its absence is a failure.

use std::path::Path;

use refine_poi::generate::{SamplingConfig, generate};
use refine_poi::model::{self, ChatMessage, LoadedModel, Mode};
use refine_poi::selfcheck::golden_logits;
use serde_json::Value;

fn default_model() -> Option<LoadedModel> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(model::DEFAULT_MODEL);
    if !path.exists() {
        assert!(std::env::var("CI").is_err(), "CI must fetch the default model (scripts/fetch-model.sh)");
        eprintln!("skipping: {} not fetched (run scripts/fetch-model.sh)", path.display());
        return None;
    }
    Some(model::load(path.to_str().unwrap()).expect("default model loads"))
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn default_model_matches_reference() {
    let Some(m) = default_model() else { return };
    let LoadedModel { model, tokenizer, .. } = &m;
    // Adapters trained on it name its hub repo, which PEFT's loaders can find.
    assert_eq!(m.adapter_base().repo.as_deref(), Some("HuggingFaceTB/SmolLM2-135M-Instruct"));

    // Token ids of the ten strings, exactly.
    let tok = fixture("smollm2_135m_tokenizer_and_logits.json");
    for s in tok["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text, false).unwrap(), ids(&s["ids"]), "token ids of {text:?}");
        // And the default special tokens add nothing for SmolLM2.
        assert_eq!(tokenizer.encode(text, true).unwrap(), ids(&s["ids"]));
    }

    // Top-5 next-token logits after "The capital of France is" and at three positions of a long
    // check-in prompt, within 1e-2, and its 12-token greedy continuation: what `refine-poi
    // selfcheck` checks on any device.
    let golden = golden_logits(&m, &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")).unwrap();
    assert_eq!(golden.positions.len(), 4);
    assert!(golden.passed, "{golden:#?}");
    let r = fixture("smollm2_135m_reference.json");
    let input = candle_core::Tensor::new(ids(&r["prompt_token_ids"]).as_slice(), model.device()).unwrap().unsqueeze(0).unwrap();
    let last = model.forward_last(&input, None, None, Mode::INFERENCE).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    let best = (0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
    assert_eq!(tokenizer.decode(&[best], true).unwrap(), " Paris");
    let long = &tok["long_prompt"];
    let out = generate(model, tokenizer, &[ids(&long["ids"])], 1, &SamplingConfig::greedy(12), Mode::INFERENCE).unwrap();
    assert_eq!(out[0][0].text, long["greedy_12_text"].as_str().unwrap());

    // The chat template renders as transformers does, and greedy decoding answers Paris.
    let chat = &r["chat_sanity"];
    let messages: Vec<ChatMessage> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let templated = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(templated, chat["templated_prompt"].as_str().unwrap());
    let chat_ids = tokenizer.encode(&templated, false).unwrap();
    assert_eq!(chat_ids, ids(&chat["prompt_token_ids"]));
    let out = generate(model, tokenizer, &[chat_ids], 1, &SamplingConfig::greedy(20), Mode::INFERENCE).unwrap();
    let mut want = ids(&chat["greedy_20_token_ids"]);
    assert_eq!(want.pop(), Some(2), "reference ends with <|im_end|>");
    assert_eq!(out[0][0].tokens, want);
    assert_eq!(out[0][0].text, chat["greedy_20_text"].as_str().unwrap());
}

/// The check can fail: a random adapter moves the logits off the reference.
#[test]
fn golden_logits_fail_for_a_changed_model() {
    let Some(mut m) = default_model() else { return };
    let lora = refine_poi::model::LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: vec!["q".into()] };
    m.model.attach_lora(&lora, 1).unwrap();
    refine_poi::selfcheck::randomize_lora_b(&m, 2, 0.3).unwrap();
    let golden = golden_logits(&m, &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")).unwrap();
    assert!(!golden.passed && golden.positions.iter().any(|p| p.max_abs_diff > 0.1), "{golden:#?}");
}

/// `refine-poi selfcheck` on the CPU: every check passes, in f32 and in bf16 (the portable ops),
/// and the report says so.
#[test]
fn selfcheck_passes_on_the_cpu_in_f32_and_bf16() {
    if default_model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for dtype in ["f32", "bf16"] {
        let out = dir.path().join(format!("{dtype}.json"));
        let run = crate::common::run(&["selfcheck", "--device", "cpu", "--dtype", dtype, "--out", out.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{stderr}");
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(report["passed"], true);
        assert_eq!(report["finite_differences"]["checked"], 36);
        let error = report["gradient_against_cpu"]["relative_error"].as_f64().unwrap();
        if dtype == "f32" {
            assert!(error < 1e-6, "the CPU against itself: {error}");
        } else {
            assert!(error > 0.0, "bf16 differs from f32");
        }
        eprintln!("{stderr}");
    }
}

/// Whole-history windows on raw ids tokenize as the same text does in a prompt (the real
/// tokenizer merges the space into ` POI`), and each check-in's targets are its name's tokens.
#[test]
fn raw_history_windows_tokenize_like_prompt_text() {
    let Some(m) = default_model() else { return };
    let s = crate::common::Setup::new();
    let cfg = s.cfg(&["prompt.times=true", "prompt.categories=true"]);
    let ds = refine_poi::data::Dataset::load(&cfg.data.dir).unwrap();
    let windows = refine_poi::train::sft::history::history_examples(&ds, &cfg.prompt, &m.tokenizer, 200).unwrap();
    assert!(windows.len() > 1);
    for w in &windows {
        let text = m.tokenizer.decode(&w.ids, false).unwrap();
        assert_eq!(m.tokenizer.encode(&text, false).unwrap(), w.ids, "{text}");
        // Runs of consecutive targets: one per check-in line, each ` POI n`.
        let mut runs: Vec<Vec<u32>> = Vec::new();
        for (i, &j) in w.targets.iter().enumerate() {
            if i == 0 || w.targets[i - 1] + 1 != j {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(w.ids[j]);
        }
        assert_eq!(runs.len(), text.lines().filter(|l| l.starts_with("- ")).count(), "{text}");
        for run in runs {
            let name = m.tokenizer.decode(&run, false).unwrap();
            let id = name.strip_prefix(" POI ").unwrap_or_else(|| panic!("{name:?}"));
            assert!(id.parse::<u32>().is_ok(), "{name:?}");
        }
    }
}
