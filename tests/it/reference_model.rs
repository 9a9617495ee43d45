//! The real default model against golden values from the reference implementation
//! (transformers loading the same GGUF in f32), copied into tests/fixtures/reference.
//! Runs when `scripts/fetch-model.sh` has fetched the model; in CI its absence is a failure.

use std::path::{Path, PathBuf};

use refine_poi::generate::{SamplingConfig, generate};
use refine_poi::model::{self, ChatMessage, LoadedModel, LoraConfig, Mode, ModelSource};
use refine_poi::selfcheck::golden_logits;
use serde_json::Value;

fn default_model_path() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(model::DEFAULT_MODEL);
    if !path.exists() {
        assert!(std::env::var("CI").is_err(), "CI must fetch the default model (scripts/fetch-model.sh)");
        eprintln!("skipping: {} not fetched (run scripts/fetch-model.sh)", path.display());
        return None;
    }
    Some(path)
}

fn default_model() -> Option<LoadedModel> {
    Some(model::load(default_model_path()?.to_str().unwrap()).expect("default model loads"))
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
        assert_eq!(report["finite_differences"]["checked"], 120, "2 layers x (3 + 7) targets x (A, B) x 3 entries");
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

/// `--quantized-base`: decoding reads the GGUF's Q4_1 and Q8_0 blocks, and computes what the
/// f32 weights give, bit for bit: the same decode-step logits and the same sampled tokens, with
/// an adapter folded in (the tolerance is zero).
#[test]
fn the_quantised_base_decodes_exactly_as_the_f32_weights() {
    let Some(path) = default_model_path() else { return };
    let load = |quantized| {
        let mut m =
            model::load_with(&ModelSource::Gguf(path.clone()), &candle_core::Device::Cpu, candle_core::DType::F32, quantized).unwrap();
        attach_a_wave_adapter(&mut m);
        m
    };
    let (dense, quant) = (load(false), load(true));
    // Every linear layer (Q4_1) and the tied output projection (Q8_0): about a sixth of f32.
    let blocks = quant.model.quantized_base_bytes();
    assert_eq!(dense.model.quantized_base_bytes(), 0);
    assert!((80_000_000..110_000_000).contains(&blocks), "{blocks} bytes of blocks");

    let prompt = ids(&fixture("smollm2_135m_tokenizer_and_logits.json")["long_prompt"]["ids"]);
    let cfg = SamplingConfig { max_new_tokens: 16, seed: 11, ..Default::default() };
    let sample =
        |m: &LoadedModel, rows| generate(&m.model, &m.tokenizer, std::slice::from_ref(&prompt), rows, &cfg, Mode::INFERENCE).unwrap();
    for rows in [1, 8] {
        let (a, b) = (sample(&dense, rows), sample(&quant, rows));
        let tokens = |c: &Vec<Vec<refine_poi::generate::Completion>>| c[0].iter().map(|x| x.tokens.clone()).collect::<Vec<_>>();
        assert_eq!(tokens(&a), tokens(&b), "{rows} samples");
    }
    // One decoding step's logits after the prompt, for one row and for two.
    for rows in [1usize, 2] {
        let step = |m: &LoadedModel| {
            let mut cache = m.model.new_cache(prompt.len() + 1);
            let batch: Vec<u32> = prompt.iter().copied().cycle().take(prompt.len() * rows).collect();
            let dev = m.model.device();
            let ids = candle_core::Tensor::from_vec(batch, (rows, prompt.len()), dev).unwrap();
            m.model.forward_last(&ids, None, Some(&mut cache), Mode::INFERENCE).unwrap();
            let next = candle_core::Tensor::from_vec(vec![1u32; rows], (rows, 1), dev).unwrap();
            m.model.forward_last(&next, None, Some(&mut cache), Mode::INFERENCE).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(step(&dense), step(&quant), "{rows} rows");
    }
}

/// `--bf16-prefill`: a prompt's products in bf16 (AMX tiles or AVX512-BF16) move the next-token
/// log-probs by the rounding of the weights and activations to bf16, within the tolerance
/// docs/performance.md states, and leave the greedy continuation the reference gives. Counted as
/// skipped on CPUs with neither.
#[test]
fn the_bf16_prefill_stays_within_its_tolerance_of_f32() {
    let Some(path) = default_model_path() else { return };
    let Some(isa) = model::bf16::Isa::detect() else {
        eprintln!("skipped: this CPU has neither AMX-BF16 nor AVX512-BF16");
        return;
    };
    let load = |bf16, adapter| {
        let mut m = model::load_on(&ModelSource::Gguf(path.clone()), &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
        if adapter {
            attach_a_wave_adapter(&mut m);
        }
        if bf16 {
            let bytes = m.model.attach_bf16_prefill().unwrap();
            assert!((200_000_000..220_000_000).contains(&bytes), "{bytes} bytes of bf16 layers");
        }
        m
    };
    let long = fixture("smollm2_135m_tokenizer_and_logits.json")["long_prompt"].clone();
    let prompt = ids(&long["ids"]);
    let logprobs = |m: &LoadedModel| {
        let ids = candle_core::Tensor::new(prompt.as_slice(), m.model.device()).unwrap().unsqueeze(0).unwrap();
        let logits = m.model.forward_last(&ids, None, None, Mode::INFERENCE).unwrap();
        candle_nn::ops::log_softmax(&logits, 1).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap()
    };
    for adapter in [false, true] {
        let (dense, tiles) = (load(false, adapter), load(true, adapter));
        let (a, b) = (logprobs(&dense), logprobs(&tiles));
        // The 50 likeliest tokens under f32.
        let mut order: Vec<usize> = (0..a.len()).collect();
        order.sort_by(|&i, &j| a[j].total_cmp(&a[i]));
        let worst = order[..50].iter().map(|&i| (a[i] - b[i]).abs()).fold(0f32, f32::max);
        eprintln!("bf16 prefill on {} (adapter: {adapter}): largest log-prob change among the 50 likeliest tokens {worst}", isa.name());
        assert!(worst < BF16_PREFILL_TOLERANCE, "log-probs moved by {worst} (adapter: {adapter})");
        let greedy = |m: &LoadedModel| {
            generate(&m.model, &m.tokenizer, std::slice::from_ref(&prompt), 1, &SamplingConfig::greedy(12), Mode::INFERENCE).unwrap()[0][0]
                .tokens
                .clone()
        };
        let continuation = greedy(&tiles);
        assert_eq!(continuation, greedy(&dense), "adapter: {adapter}");
        if !adapter {
            assert_eq!(continuation, ids(&long["greedy_12_ids"]));
        }
    }
}

/// `--quantized-base --bf16-prefill`: with both, no linear layer keeps its dense weight (the
/// few-row products read the blocks, the wider ones the bf16 copy), and what it computes is
/// what `--bf16-prefill` over the dense weights computes, bit for bit: the same sampled tokens
/// and decode-step logits, with an adapter. What needs the dense weight (export) is a clear
/// error. Counted as skipped on CPUs with neither bf16 instruction set.
#[test]
fn the_bf16_prefill_over_the_quantised_base_keeps_no_dense_weight() {
    let Some(path) = default_model_path() else { return };
    if model::bf16::Isa::detect().is_none() {
        eprintln!("skipped: this CPU has neither AMX-BF16 nor AVX512-BF16");
        return;
    }
    let load = |quantized| {
        let mut m =
            model::load_with(&ModelSource::Gguf(path.clone()), &candle_core::Device::Cpu, candle_core::DType::F32, quantized).unwrap();
        attach_a_wave_adapter(&mut m);
        m.model.attach_bf16_prefill().unwrap();
        m
    };
    let (dense, quant) = (load(false), load(true));
    assert!(dense.model.linears().all(|l| l.weight().is_ok()));
    for lin in quant.model.linears() {
        assert!(lin.weight().unwrap_err().to_string().contains("released"), "{}", lin.path);
    }
    let export = quant.model.merged_weights().unwrap_err().to_string();
    assert!(export.contains("dense weight was released"), "{export}");

    let prompt = ids(&fixture("smollm2_135m_tokenizer_and_logits.json")["long_prompt"]["ids"]);
    assert!(prompt.len() > refine_poi::model::skinny::MAX_ROWS, "the prompt runs in bf16");
    let cfg = SamplingConfig { max_new_tokens: 16, seed: 11, ..Default::default() };
    let sample = |m: &LoadedModel| generate(&m.model, &m.tokenizer, std::slice::from_ref(&prompt), 8, &cfg, Mode::INFERENCE).unwrap();
    let tokens = |c: &Vec<Vec<refine_poi::generate::Completion>>| c[0].iter().map(|x| x.tokens.clone()).collect::<Vec<_>>();
    assert_eq!(tokens(&sample(&dense)), tokens(&sample(&quant)));
    let step = |m: &LoadedModel| {
        let mut cache = m.model.new_cache(prompt.len() + 1);
        let ids = candle_core::Tensor::new(prompt.as_slice(), m.model.device()).unwrap().unsqueeze(0).unwrap();
        m.model.forward_last(&ids, None, Some(&mut cache), Mode::INFERENCE).unwrap();
        let next = candle_core::Tensor::new(&[[1u32]], m.model.device()).unwrap();
        m.model.forward_last(&next, None, Some(&mut cache), Mode::INFERENCE).unwrap().to_vec2::<f32>().unwrap()
    };
    assert_eq!(step(&dense), step(&quant));
}

/// A rank-8 adapter on every linear layer with a non-zero B (PEFT starts it at zero), so that
/// its terms change the products.
fn attach_a_wave_adapter(m: &mut LoadedModel) {
    m.model.attach_lora(&LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, ..Default::default() }, 5).unwrap();
    for (i, lin) in m.model.linears_mut().enumerate() {
        let b = &lin.lora.as_ref().unwrap().b;
        let wave =
            candle_core::Tensor::arange(0f32, b.elem_count() as f32, b.device()).unwrap().affine(0.37, i as f64).unwrap().sin().unwrap();
        b.set(&(wave * 0.02).unwrap().reshape(b.shape()).unwrap()).unwrap();
    }
}

/// The largest change of a next-token log-prob (among the likeliest) that bf16 prefill may
/// make on the reference prompt (docs/performance.md).
const BF16_PREFILL_TOLERANCE: f32 = 0.1;
