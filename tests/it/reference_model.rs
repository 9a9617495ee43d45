//! The real default model against golden values from the reference implementation
//! (transformers loading the same GGUF in f32), copied into tests/fixtures/reference.
//! Runs when `scripts/fetch-model.sh` has fetched the model; in CI its absence is a failure.

use std::path::Path;

use refine_poi::generate::{SamplingConfig, generate};
use refine_poi::model::{self, ChatMessage, LoadedModel, Mode};
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

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn top5(row: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.truncate(5);
    let vals = idx.iter().map(|&i| row[i as usize]).collect();
    (idx, vals)
}

fn assert_top5(row: &[f32], want_ids: &[u32], want_logits: &[f32], what: &str) {
    let (got_ids, got_logits) = top5(row);
    assert_eq!(got_ids, want_ids, "{what}: top-5 ids");
    for (g, w) in got_logits.iter().zip(want_logits) {
        assert!((g - w).abs() < 1e-2, "{what}: logit {g} vs reference {w}");
    }
}

#[test]
fn default_model_matches_reference() {
    let Some(m) = default_model() else { return };
    let LoadedModel { model, tokenizer, .. } = &m;
    let device = model.device();
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

    // Top-5 next-token logits after "The capital of France is".
    let r = fixture("smollm2_135m_reference.json");
    let prompt = ids(&r["prompt_token_ids"]);
    assert_eq!(tokenizer.encode(r["prompt"].as_str().unwrap(), false).unwrap(), prompt);
    let input = candle_core::Tensor::new(prompt.as_slice(), device).unwrap().unsqueeze(0).unwrap();
    let last = model.forward_last(&input, None, None, Mode::INFERENCE).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    assert_top5(&last, &ids(&r["top5_next_token_ids"]), &floats(&r["top5_next_token_logits"]), "France");
    assert_eq!(tokenizer.decode(&[top5(&last).0[0]], true).unwrap(), " Paris");

    // Top-5 at three positions of the long prompt, and its 12-token greedy continuation.
    let long = &tok["long_prompt"];
    let long_ids = ids(&long["ids"]);
    assert_eq!(tokenizer.encode(long["text"].as_str().unwrap(), false).unwrap(), long_ids);
    let input = candle_core::Tensor::new(long_ids.as_slice(), device).unwrap().unsqueeze(0).unwrap();
    let all = model.forward(&input, None, None, Mode::INFERENCE).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    for p in long["positions"].as_array().unwrap() {
        let pos = p["position"].as_u64().unwrap() as usize;
        assert_top5(&all[pos], &ids(&p["top5_ids"]), &floats(&p["top5_logits"]), &format!("position {pos}"));
    }
    let out = generate(model, tokenizer, &[long_ids], 1, &SamplingConfig::greedy(12), Mode::INFERENCE).unwrap();
    assert_eq!(out[0][0].tokens, ids(&long["greedy_12_ids"]));
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
