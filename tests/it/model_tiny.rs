//! The model code on tiny random Llama and Qwen2 models: loading, LoRA (B = 0 identity,
//! gradients against finite differences, PEFT round trip, mismatch errors), padding, and
//! batched generation against one-by-one generation.

use candle_core::{DType, Device, Tensor};
use refine_poi::generate::{LastPrompt, SamplingConfig, generate_seeded, prefill_each};
use refine_poi::model::tiny::{tiny_config, write_tiny_model};
use refine_poi::model::{KvCache, LoadedModel, LoraConfig, Mode, ModelSource, load_on};
use refine_poi::selfcheck::{lora_finite_differences, randomize_lora_b};

fn tiny(model_type: &str, dtype: DType) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &tiny_config(model_type), 7).unwrap();
    let m = load_on(&ModelSource::Folder(dir.path().to_path_buf()), &Device::Cpu, dtype).unwrap();
    (dir, m)
}

fn ids(m: &LoadedModel, text: &str) -> Vec<u32> {
    m.tokenizer.encode(text, false).unwrap()
}

fn logits(m: &LoadedModel, tokens: &[u32], mode: Mode) -> Vec<Vec<f32>> {
    let t = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.model.forward(&t, None, None, mode).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn tiny_llama_and_qwen2_load_and_run() {
    for family in ["llama", "qwen2"] {
        let (_d, m) = tiny(family, DType::F32);
        let out = logits(&m, &ids(&m, "hello world"), Mode::INFERENCE);
        assert_eq!(out.len(), 11);
        assert_eq!(out[0].len(), m.model.config.vocab_size);
        assert!(out.iter().flatten().all(|x| x.is_finite()));
        // The differentiable path computes the same function as the fused kernels.
        let slow = logits(&m, &ids(&m, "hello world"), Mode::TRAIN);
        assert!(max_diff(&out, &slow) < 1e-4, "{family}: fused vs differentiable ops");
    }
}

#[test]
fn zero_b_adapter_leaves_logits_unchanged() {
    let (_d, mut m) = tiny("qwen2", DType::F32);
    let tokens = ids(&m, "abc 123");
    let before = logits(&m, &tokens, Mode::INFERENCE);
    m.model.attach_lora(&LoraConfig::default(), 1).unwrap();
    assert_eq!(max_diff(&before, &logits(&m, &tokens, Mode::INFERENCE)), 0.0);
    randomize_lora_b(&m, 2, 0.3).unwrap();
    assert!(max_diff(&before, &logits(&m, &tokens, Mode::INFERENCE)) > 1e-3, "a non-zero adapter changes the output");
    assert_eq!(max_diff(&before, &logits(&m, &tokens, Mode::REFERENCE)), 0.0, "adapter off is the base model");
}

/// A pass without gradients records no backward graph, with an adapter and added tokens too:
/// a recorded graph keeps every layer's activations alive until the output is dropped (a
/// 500-token prefill of the default model held 1 GB more than without an adapter). Training
/// passes still record it.
#[test]
fn inference_with_an_adapter_records_no_graph() {
    let (_d, mut m) = tiny_with_an_adapter_and_added_tokens();
    // More rows than the few-row kernel takes, so the prefill runs candle's ops; an added token.
    let mut tokens = ids(&m, "a prompt long enough for the batched path, then <a1>");
    assert!(tokens.len() > refine_poi::model::skinny::MAX_ROWS);
    tokens.push(m.tokenizer.token_id("<a1>").unwrap());
    let input = Tensor::new(tokens.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    for (mode, graph) in [(Mode::INFERENCE, false), (Mode::REFERENCE, false), (Mode::TRAIN, true)] {
        let out = m.model.forward(&input, None, None, mode).unwrap();
        assert_eq!(out.track_op(), graph, "{mode:?}");
    }
    // A pinned reference adapter (GRPO's KL to its start) is a constant: GRPO keeps the
    // reference log-probs for the whole step, and with a graph they held every layer's
    // activations (2 GB of a 2.7 GB step of configs/nyc.toml).
    m.model.pin_reference_adapter().unwrap();
    assert!(!m.model.forward(&input, None, None, Mode::REFERENCE).unwrap().track_op(), "pinned reference");
}

/// A tiny llama with a LoRA adapter whose B is non-zero, and the added tokens `<a0>`, `<a1>`.
fn tiny_with_an_adapter_and_added_tokens() -> (tempfile::TempDir, LoadedModel) {
    let (d, mut m) = tiny("llama", DType::F32);
    m.model.attach_lora(&LoraConfig::default(), 1).unwrap();
    m.add_tokens(vec!["<a0>".into(), "<a1>".into()], 2).unwrap();
    randomize_lora_b(&m, 3, 0.3).unwrap();
    (d, m)
}

/// Logits over a few tokens (a code's next level in beam search) are the full logits' columns
/// at those tokens: base tokens, and added ones as each mode reads them.
#[test]
fn logits_over_some_tokens_are_those_columns_of_the_full_logits() {
    let (_d, m) = tiny_with_an_adapter_and_added_tokens();
    let added = m.tokenizer.token_id("<a1>").unwrap();
    let tokens = [added, 5, 0, added - 1];
    let input = Tensor::new(ids(&m, "a prompt, then a step").as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    for mode in [Mode::INFERENCE, Mode::REFERENCE] {
        let hidden = m.model.forward_last_hidden(&input, None, None, mode).unwrap();
        let full = m.model.logits(&hidden, mode).unwrap().to_vec2::<f32>().unwrap();
        let some = m.model.logits_over(&hidden, &m.model.head_rows(&tokens, mode).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (j, &t) in tokens.iter().enumerate() {
            assert!((some[0][j] - full[0][t as usize]).abs() < 1e-5, "{mode:?}, token {t}: {} against {}", some[0][j], full[0][t as usize]);
        }
    }
    let beyond = m.model.vocab_size() as u32;
    assert!(m.model.head_rows(&[beyond], Mode::INFERENCE).unwrap_err().to_string().contains("beyond the vocabulary"));
}

/// Sum of next-token log-likelihoods of the sequence: the shape of every training loss here.
#[test]
fn a_pinned_reference_adapter_is_what_adapter_off_computes() {
    let (dir, mut m) = tiny("llama", DType::F32);
    m.model.attach_lora(&LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, ..Default::default() }, 3).unwrap();
    randomize_lora_b(&m, 1, 0.3).unwrap();
    let tokens = ids(&m, "pinned reference");
    let base = logits(&m, &tokens, Mode::REFERENCE);
    let start = logits(&m, &tokens, Mode::INFERENCE);
    assert!(max_diff(&base, &start) > 1e-3, "the adapter must change the output");
    m.model.pin_reference_adapter().unwrap();
    assert_eq!(max_diff(&start, &logits(&m, &tokens, Mode::REFERENCE)), 0.0);
    // The trained adapter moves (and is reloaded from a checkpoint); the reference stays put.
    randomize_lora_b(&m, 2, 0.3).unwrap();
    let moved = logits(&m, &tokens, Mode::INFERENCE);
    assert!(max_diff(&moved, &start) > 1e-3);
    assert_eq!(max_diff(&start, &logits(&m, &tokens, Mode::REFERENCE)), 0.0);
    let saved = dir.path().join("moved");
    m.model.save_adapter(&saved, &refine_poi::model::AdapterBase::local("tiny")).unwrap();
    m.model.load_adapter(&saved).unwrap();
    assert_eq!(max_diff(&moved, &logits(&m, &tokens, Mode::INFERENCE)), 0.0);
    assert_eq!(max_diff(&start, &logits(&m, &tokens, Mode::REFERENCE)), 0.0);
}

/// The f64 finite-difference check `refine-poi selfcheck` runs on its device, here on the CPU.
#[test]
fn lora_gradients_match_finite_differences() {
    let report = lora_finite_differences(&Device::Cpu).unwrap();
    assert_eq!(report.checked, 2 * (3 + 7) * 2 * 3, "2 layers x (3 + 7) targets x (A, B) x 3 entries");
    assert!(report.passed, "max error {:.3e}", report.max_error);
}

#[test]
fn peft_round_trip_is_exact_and_mismatches_are_errors() {
    let (_dir, mut m) = tiny("qwen2", DType::F32);
    m.model
        .attach_lora(&LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, targets: vec!["q_proj".into(), "o_proj".into(), "up_proj".into()] }, 5)
        .unwrap();
    randomize_lora_b(&m, 6, 0.3).unwrap();
    let out = tempfile::tempdir().unwrap();
    m.model.save_adapter(out.path(), &refine_poi::model::AdapterBase::local("tiny")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let saved = candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(saved.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(saved.contains_key("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"));
    assert_eq!(saved.len(), 2 * 3 * 2);

    let (_d2, mut fresh) = tiny("qwen2", DType::F32);
    fresh.model.load_adapter(out.path()).unwrap();
    for ((n1, v1), (n2, v2)) in m.model.lora_vars().iter().zip(fresh.model.lora_vars()) {
        assert_eq!(n1, &n2);
        let a = v1.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = v2.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b, "{n1}");
    }
    let tokens = ids(&m, "round trip");
    assert_eq!(max_diff(&logits(&m, &tokens, Mode::INFERENCE), &logits(&fresh, &tokens, Mode::INFERENCE)), 0.0);

    // An adapter for a model of another shape is a clear error.
    let other_dir = tempfile::tempdir().unwrap();
    let mut other_cfg = tiny_config("qwen2");
    other_cfg.hidden_size = 48;
    write_tiny_model(other_dir.path(), &other_cfg, 1).unwrap();
    let mut other = load_on(&ModelSource::Folder(other_dir.path().to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    let err = format!("{:#}", other.model.load_adapter(out.path()).unwrap_err());
    assert!(err.contains("does not fit this model"), "{err}");
    let err = format!("{:#}", fresh.model.load_adapter(other_dir.path()).unwrap_err());
    assert!(err.contains("adapter_config.json"), "{err}");
}

#[test]
fn left_padded_batch_equals_single_rows() {
    let (_d, m) = tiny("llama", DType::F32);
    let a = ids(&m, "short");
    let b = ids(&m, "a longer prompt");
    let len = b.len();
    let pad_a = len - a.len();
    let mut batch = vec![0u32; pad_a];
    batch.extend(&a);
    batch.extend(&b);
    let input = Tensor::from_vec(batch, (2, len), &Device::Cpu).unwrap();
    let out = m.model.forward(&input, Some(&[pad_a, 0]), None, Mode::INFERENCE).unwrap().to_vec3::<f32>().unwrap();
    let single_a = logits(&m, &a, Mode::INFERENCE);
    let single_b = logits(&m, &b, Mode::INFERENCE);
    assert!(max_diff(&out[0][pad_a..], &single_a) < 1e-5);
    assert!(max_diff(&out[1], &single_b) < 1e-5);
}

#[test]
fn batched_generation_equals_one_by_one() {
    let (_d, mut m) = tiny("qwen2", DType::F32);
    m.model.attach_lora(&LoraConfig::default(), 9).unwrap();
    randomize_lora_b(&m, 10, 0.3).unwrap();
    let prompts = vec![ids(&m, "first prompt"), ids(&m, "2nd"), ids(&m, "and the third, longest prompt")];
    let seeds = [11, 22, 33];
    for cfg in [
        SamplingConfig { max_new_tokens: 12, seed: 5, temperature: 0.9, top_p: 0.95, top_k: 50, ..Default::default() },
        SamplingConfig::greedy(12),
    ] {
        let batched = generate_seeded(&m.model, &m.tokenizer, &prompts, &seeds, 3, &cfg, Mode::INFERENCE).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let alone =
                generate_seeded(&m.model, &m.tokenizer, std::slice::from_ref(prompt), &seeds[i..i + 1], 3, &cfg, Mode::INFERENCE).unwrap();
            for s in 0..3 {
                assert_eq!(batched[i][s].tokens, alone[0][s].tokens, "prompt {i} sample {s} (greedy: {})", cfg.greedy);
            }
        }
        if !cfg.greedy {
            assert_ne!(batched[0][0].tokens, batched[0][1].tokens, "samples of one prompt differ");
        } else {
            assert_eq!(batched[0][0].tokens, batched[0][1].tokens);
        }
    }
}

/// The decoding cache as `generate` uses it: prompts of different lengths prefilled alone,
/// shared as one prefix by several rows, rows dropped midway; every step's logits equal a full
/// forward of that row's sequence without a cache.
#[test]
fn shared_prefix_cache_with_dropped_rows_equals_full_forward() {
    let (_d, m) = tiny("llama", DType::F32);
    let dev = Device::Cpu;
    let prompts = [ids(&m, "a somewhat longer first prompt"), ids(&m, "second")];
    let mut caches = Vec::new();
    for p in &prompts {
        let mut c = m.model.new_cache(p.len());
        let t = Tensor::new(p.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        m.model.forward_last(&t, None, Some(&mut c), Mode::INFERENCE).unwrap();
        caches.push(c);
    }
    let of_row = [0usize, 1, 1];
    let mut cache = KvCache::share(&caches.iter().collect::<Vec<_>>(), &of_row, 1).unwrap();
    let mut seqs: Vec<Vec<u32>> = of_row.iter().map(|&p| prompts[p].clone()).collect();
    let mut rows: Vec<usize> = (0..3).collect();
    for step in 0..4u32 {
        if step == 2 {
            // Row 1 finishes; the others keep decoding (in a new order).
            cache = cache.select_rows(&[2, 0]).unwrap();
            rows = vec![2, 0];
        }
        let next: Vec<u32> = rows.iter().map(|&r| 3 + step + r as u32).collect();
        let t = Tensor::new(next.as_slice(), &dev).unwrap().unsqueeze(1).unwrap();
        let got = m.model.forward_last(&t, None, Some(&mut cache), Mode::INFERENCE).unwrap().to_vec2::<f32>().unwrap();
        for (slot, &r) in rows.iter().enumerate() {
            seqs[r].push(next[slot]);
            let want = logits(&m, &seqs[r], Mode::INFERENCE);
            let d = max_diff(&got[slot..slot + 1], &want[want.len() - 1..]);
            assert!(d < 1e-4, "step {step}, row {r}: {d}");
        }
    }
    assert!(KvCache::share(&[&caches[0]], &[1], 1).is_err(), "a row of a prompt that is not there");
}

/// Two levels of sharing, as `generate` does for a batch of prompts with a common beginning:
/// the beginning prefilled once, each prompt's rest prefilled reading it in place, then rows of
/// every prompt decoding from one shared prefix. Logits equal a full forward of each sequence.
#[test]
fn common_prompt_beginning_prefilled_once_equals_full_forward() {
    let (_d, m) = tiny("llama", DType::F32);
    let dev = Device::Cpu;
    let common = ids(&m, "the same long system text that every prompt of the batch starts with");
    let prompts: Vec<Vec<u32>> =
        ["then one user", "and another, longer user part"].iter().map(|s| [common.clone(), ids(&m, s)].concat()).collect();
    let mut first = m.model.new_cache(common.len());
    let t = Tensor::new(common.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
    m.model.forward_hidden(&t, None, Some(&mut first), Mode::INFERENCE).unwrap();
    let mut caches = Vec::new();
    for p in &prompts {
        let mut c = KvCache::share(&[&first], &[0], p.len() - common.len()).unwrap();
        let t = Tensor::new(&p[common.len()..], &dev).unwrap().unsqueeze(0).unwrap();
        let got = m.model.forward(&t, None, Some(&mut c), Mode::INFERENCE).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let want = logits(&m, p, Mode::INFERENCE);
        let d = max_diff(&got, &want[common.len()..]);
        assert!(d < 1e-4, "the prompt's own prefill: {d}");
        caches.push(c);
    }
    let of_row = [1usize, 0, 1];
    // Consumed: the prompts' own layers are released as the prefix is built.
    let mut cache = KvCache::share_consumed(caches, &of_row, 3).unwrap();
    let mut seqs: Vec<Vec<u32>> = of_row.iter().map(|&p| prompts[p].clone()).collect();
    for step in 0..3u32 {
        let next: Vec<u32> = (0..3).map(|r| 5 + step + r).collect();
        let t = Tensor::new(next.as_slice(), &dev).unwrap().unsqueeze(1).unwrap();
        let got = m.model.forward_last(&t, None, Some(&mut cache), Mode::INFERENCE).unwrap().to_vec2::<f32>().unwrap();
        for r in 0..3 {
            seqs[r].push(next[r]);
            let want = logits(&m, &seqs[r], Mode::INFERENCE);
            let d = max_diff(&got[r..r + 1], &want[want.len() - 1..]);
            assert!(d < 1e-4, "step {step}, row {r}: {d}");
        }
    }
}

/// Each prompt reads the keys and values of the beginning it shares with the prompt before it,
/// in its batch or (through `LastPrompt`) the batch before, as a user's consecutive instances
/// do: its last logits, and a step decoded after it, equal those of the prompt run alone.
#[test]
fn prompts_read_the_beginning_they_share_with_the_one_before() {
    let (_d, mut m) = tiny("llama", DType::F32);
    m.model.attach_lora(&LoraConfig::default(), 3).unwrap();
    randomize_lora_b(&m, 4, 0.3).unwrap();
    let dev = Device::Cpu;
    let history = ids(&m, "a user's check-ins, one after the other, long enough to share");
    assert!(history.len() >= 16, "the shared history must be long enough to be read");
    let mut prompts: Vec<Vec<u32>> = ["then e", "then e, f", "g"].iter().map(|s| [history.clone(), ids(&m, s)].concat()).collect();
    prompts.push(ids(&m, "another user, who shares nothing with them"));
    // The first batch's second prompt reads the first's; the second batch's first reads the
    // first batch's last, and its second (sharing nothing) is prefilled whole.
    let mut last = LastPrompt::default();
    let (_, first) = prefill_each(&m.model, &prompts[..2], Mode::INFERENCE, Some(&mut last)).unwrap();
    let (caches, second) = prefill_each(&m.model, &prompts[2..], Mode::INFERENCE, Some(&mut last)).unwrap();
    let last_logits = |h: &Tensor, mode| m.model.logits(h, mode).unwrap().to_vec2::<f32>().unwrap();
    for (i, (p, got)) in prompts.iter().zip(first.iter().chain(&second)).enumerate() {
        let want = logits(&m, p, Mode::INFERENCE);
        let d = max_diff(&last_logits(got, Mode::INFERENCE), &want[want.len() - 1..]);
        assert!(d < 1e-5, "prompt {i}: {d}");
    }
    // A pass in another mode (the adapter off) does not read the last prompt's keys and values.
    let (_, reference) = prefill_each(&m.model, &prompts[3..], Mode::REFERENCE, Some(&mut last)).unwrap();
    let want = logits(&m, &prompts[3], Mode::REFERENCE);
    assert!(
        max_diff(&last_logits(&reference[0], Mode::REFERENCE), &want[want.len() - 1..]) < 1e-5,
        "the reference pass read the adapter's keys"
    );
    let mut cache = KvCache::share_consumed(caches, &[0, 1], 1).unwrap();
    let t = Tensor::new(&[7u32, 9], &dev).unwrap().unsqueeze(1).unwrap();
    let got = m.model.forward_last(&t, None, Some(&mut cache), Mode::INFERENCE).unwrap().to_vec2::<f32>().unwrap();
    for (row, (p, next)) in [(2usize, 7u32), (3, 9)].into_iter().enumerate() {
        let want = logits(&m, &[prompts[p].clone(), vec![next]].concat(), Mode::INFERENCE);
        let d = max_diff(&got[row..row + 1], &want[want.len() - 1..]);
        assert!(d < 1e-5, "a step after prompt {p}: {d}");
    }
}

/// `generate` prefills a batch's common beginning once; its completions are those of each
/// prompt generated alone (where nothing is shared).
#[test]
fn prompts_with_a_common_beginning_generate_as_alone() {
    let (_d, mut m) = tiny("llama", DType::F32);
    m.model.attach_lora(&LoraConfig::default(), 3).unwrap();
    randomize_lora_b(&m, 4, 0.3).unwrap();
    let common = ids(&m, "a system text shared by every prompt, long enough to be prefilled once");
    assert!(common.len() >= 16, "the common beginning must be long enough to be shared");
    let prompts: Vec<Vec<u32>> =
        ["first user", "2nd", "and the third user"].iter().map(|s| [common.clone(), ids(&m, s)].concat()).collect();
    let seeds = [1, 2, 3];
    for cfg in [SamplingConfig { max_new_tokens: 10, seed: 8, temperature: 0.8, ..Default::default() }, SamplingConfig::greedy(10)] {
        let batched = generate_seeded(&m.model, &m.tokenizer, &prompts, &seeds, 2, &cfg, Mode::INFERENCE).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let alone =
                generate_seeded(&m.model, &m.tokenizer, std::slice::from_ref(prompt), &seeds[i..i + 1], 2, &cfg, Mode::INFERENCE).unwrap();
            for s in 0..2 {
                assert_eq!(batched[i][s].tokens, alone[0][s].tokens, "prompt {i} sample {s} (greedy: {})", cfg.greedy);
            }
        }
    }
}

#[test]
fn stop_strings_and_eos_end_generation() {
    let (_d, m) = tiny("llama", DType::F32);
    let prompt = ids(&m, "x");
    let free =
        generate_seeded(&m.model, &m.tokenizer, std::slice::from_ref(&prompt), &[0], 1, &SamplingConfig::greedy(20), Mode::INFERENCE)
            .unwrap();
    let text = &free[0][0].text;
    assert!(text.chars().count() >= 3, "tiny model produced {text:?}");
    // Stop at whatever the model writes at its third character: the text ends right there.
    let stop: String = text.chars().skip(2).take(1).collect();
    let cfg = SamplingConfig { stop: vec![stop.clone()], ..SamplingConfig::greedy(20) };
    let cut = generate_seeded(&m.model, &m.tokenizer, &[prompt], &[0], 1, &cfg, Mode::INFERENCE).unwrap();
    assert!(cut[0][0].text.ends_with(&stop));
    assert!(cut[0][0].text.len() <= text.len());
}

/// Logits of completion tokens from the full sequences, one at a time: what prefix sharing must equal.
fn unshared_group_logits(m: &LoadedModel, prompt: &[u32], completions: &[Vec<u32>], mode: Mode) -> Vec<Vec<Vec<f64>>> {
    completions
        .iter()
        .map(|c| {
            let mut seq = prompt.to_vec();
            seq.extend(c);
            let t = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let all = m.model.forward(&t, None, None, mode).unwrap().squeeze(0).unwrap();
            all.narrow(0, prompt.len() - 1, c.len()).unwrap().to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
        })
        .collect()
}

#[test]
fn prefix_shared_group_forward_equals_separate_sequences() {
    // Training: the attention node over the shared prefix (f64 through candle's ops on a
    // copied prefix, f32 through the inference kernel reading it in place); f32 inference:
    // the fused CPU kernel.
    for (dtype, mode, tol) in [(DType::F64, Mode::TRAIN, 1e-9), (DType::F32, Mode::TRAIN, 1e-4), (DType::F32, Mode::INFERENCE, 1e-4)] {
        let (_d, mut m) = tiny("qwen2", dtype);
        m.model.attach_lora(&LoraConfig::default(), 11).unwrap();
        randomize_lora_b(&m, 12, 0.3).unwrap();
        let prompt = ids(&m, "a shared prompt");
        let completions = vec![ids(&m, "one"), ids(&m, "two"), ids(&m, "six")];
        let flat: Vec<u32> = completions.concat();
        let ct = Tensor::from_vec(flat, (3, 3), &Device::Cpu).unwrap();
        let hidden = m.model.forward_group(&prompt, &ct, 0, mode).unwrap();
        let shared = m.model.logits(&hidden, mode).unwrap().to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap();
        let separate = unshared_group_logits(&m, &prompt, &completions, mode);
        for (a, b) in shared.iter().flatten().flatten().zip(separate.iter().flatten().flatten()) {
            assert!((a - b).abs() < tol * (1.0 + b.abs()), "{dtype:?}: {a} vs {b}");
        }
    }
}

#[test]
fn grpo_loss_gradient_matches_finite_differences() {
    use refine_poi::train::grpo::config::LossNorm;
    use refine_poi::train::grpo::loss::{LossConfig, group_logprobs, grpo_loss};
    let (_d, mut m) = tiny("llama", DType::F64);
    let cfg = LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec!["q".into(), "up".into()] };
    m.model.attach_lora(&cfg, 13).unwrap();
    randomize_lora_b(&m, 14, 0.3).unwrap();
    let prompt = ids(&m, "prompt");
    // Two completions, the second one token shorter (right padding, masked).
    let tokens = Tensor::from_vec(vec![10u32, 20, 30, 40, 50, 0], (2, 3), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(vec![1f64, 1., 1., 1., 1., 0.], (2, 3), &Device::Cpu).unwrap();
    let adv = Tensor::new(&[0.7f64, -0.7], &Device::Cpu).unwrap();
    // Old and reference log-probs away from the current ones, so clipping and KL both act.
    let old = Tensor::from_vec(vec![-5.0f64, -5.5, -5.2, -4.9, -5.8, 0.0], (2, 3), &Device::Cpu).unwrap();
    let reference = (&old - 0.3).unwrap();
    let loss_cfg = LossConfig { epsilon: 0.2, epsilon_high: Some(0.28), beta: 0.1, loss_norm: LossNorm::Token, max_completion_tokens: 3 };
    let loss = |m: &LoadedModel| {
        let logp = group_logprobs(&m.model, &prompt, &tokens, None, 0, Mode::TRAIN).unwrap();
        grpo_loss(&logp, &old, Some(&reference), &adv, &mask, &loss_cfg).unwrap().0
    };
    let grads = loss(&m).backward().unwrap();
    let eps = 1e-6;
    for (name, var) in m.model.lora_vars() {
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for idx in [0, base.len() - 1] {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                let l = loss(&m).to_scalar::<f64>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                l
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!((numeric - analytic[idx]).abs() < 1e-6 * (1.0 + numeric.abs()), "{name}[{idx}]: {} vs {numeric}", analytic[idx]);
        }
    }
}

#[test]
fn lora_dropout_is_seeded_and_training_only() {
    let (_d, mut m) = tiny("llama", DType::F32);
    m.model.attach_lora(&LoraConfig { dropout: 0.3, ..LoraConfig::default() }, 1).unwrap();
    randomize_lora_b(&m, 2, 0.3).unwrap();
    let tokens = ids(&m, "dropout test");
    let plain = logits(&m, &tokens, Mode::TRAIN);
    let a = logits(&m, &tokens, Mode::TRAIN.with_dropout(5));
    assert_eq!(max_diff(&a, &logits(&m, &tokens, Mode::TRAIN.with_dropout(5))), 0.0, "same seed, same masks");
    assert!(max_diff(&a, &plain) > 1e-4, "dropout changes the adapter's output");
    assert!(max_diff(&a, &logits(&m, &tokens, Mode::TRAIN.with_dropout(6))) > 1e-4, "another seed, other masks");
    // The modes without a dropout seed are untouched by the rate.
    assert!(max_diff(&plain, &logits(&m, &tokens, Mode::INFERENCE)) < 1e-4);
    m.model.set_lora_dropout(0.0);
    assert_eq!(max_diff(&plain, &logits(&m, &tokens, Mode::TRAIN.with_dropout(5))), 0.0, "rate 0 = no dropout");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Under the answer grammar a random model, sampling at any temperature or greedily, only
    /// ever writes `<answer>` and exactly k distinct in-range ids, and stops at `</answer>`.
    #[test]
    fn constrained_decoding_never_writes_an_invalid_answer(
        seed in 0u64..1000,
        num_pois in 1usize..300,
        k_wish in 1usize..8,
        temperature in 0.3f64..3.0,
        greedy in proptest::bool::weighted(0.25),
    ) {
        let (_d, mut m) = tiny("llama", DType::F32);
        m.model.attach_lora(&LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec!["q".into(), "down".into()] }, seed).unwrap();
        randomize_lora_b(&m, seed, 0.3).unwrap();
        let k = k_wish.min(num_pois);
        let constraint = refine_poi::constrain::AnswerConstraint::new(&m.tokenizer, k, num_pois, None).unwrap();
        let cfg = SamplingConfig { greedy, temperature, max_new_tokens: 20 + 6 * k, stop: vec!["</answer>".into()], seed, ..Default::default() };
        let prompts = [ids(&m, "user 7 visited 12, 40"), ids(&m, "next?")];
        let out = refine_poi::generate::generate_constrained(&m.model, &m.tokenizer, &prompts, &[seed, seed + 1], 3, &cfg, Mode::INFERENCE, Some(&constraint)).unwrap();
        for c in out.iter().flatten() {
            let parsed = refine_poi::answer::parse_answer(&c.text, num_pois);
            proptest::prop_assert_eq!(c.finish, refine_poi::generate::FinishReason::Stop, "{}", c.text);
            proptest::prop_assert_eq!(parsed.ids.len(), k, "{}", c.text);
            proptest::prop_assert_eq!((parsed.non_numeric, parsed.out_of_range, parsed.duplicates, parsed.decorated), (0, 0, 0, 0), "{}", c.text);
            proptest::prop_assert_eq!(&c.text, &refine_poi::answer::format_answer(&parsed.ids, None));
        }
    }
}

/// GRPO under the answer grammar stays on-policy: the log-probs its training forward computes
/// (prefix-shared, over the tokens the grammar allowed) are those of the masked distribution the
/// completions were sampled from, position by position; a forced token has log-prob 0.
#[test]
fn constrained_training_logprobs_are_the_masked_sampling_distribution() {
    use refine_poi::train::grpo::loss::{completion_tensors, group_logprobs};
    let (_d, mut m) = tiny("llama", DType::F32);
    m.model.attach_lora(&LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec!["q".into(), "v".into()] }, 5).unwrap();
    randomize_lora_b(&m, 6, 0.3).unwrap();
    let grammar = refine_poi::constrain::AnswerConstraint::new(&m.tokenizer, 2, 30, None).unwrap();
    let prompt = ids(&m, "user 3: 12, 7 ->");
    let cfg = SamplingConfig { max_new_tokens: 40, stop: vec!["</answer>".into()], ..Default::default() };
    let group = refine_poi::generate::generate_constrained(
        &m.model,
        &m.tokenizer,
        std::slice::from_ref(&prompt),
        &[9],
        4,
        &cfg,
        Mode::INFERENCE,
        Some(&grammar),
    )
    .unwrap()
    .remove(0);
    let eos = m.tokenizer.eos_ids.clone();
    let (tokens, _) = completion_tensors(&group, eos[0], eos[0], &Device::Cpu, DType::F32).unwrap();
    let (g, c) = tokens.dims2().unwrap();
    let rows: Vec<Vec<u32>> = group.iter().map(|x| x.tokens.clone()).collect();
    let support = grammar.supports(&rows, c, &eos, eos[0]).unwrap();
    assert_eq!(support.len(), g * c);
    let trained = group_logprobs(&m.model, &prompt, &tokens, Some(&support), 0, Mode::INFERENCE).unwrap().to_vec2::<f32>().unwrap();
    let free = group_logprobs(&m.model, &prompt, &tokens, None, 0, Mode::INFERENCE).unwrap().to_vec2::<f32>().unwrap();
    let mut forced = 0;
    for (r, completion) in group.iter().enumerate() {
        let mut state = grammar.start();
        for (i, &t) in completion.tokens.iter().enumerate() {
            // The sampler's view: the whole sequence so far, the logits masked to what the grammar allows.
            let seq: Vec<u32> = prompt.iter().chain(&completion.tokens[..i]).copied().collect();
            let input = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = m.model.forward_last(&input, None, None, Mode::INFERENCE).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            let allowed = grammar.allowed(&state, &eos);
            assert!(allowed.contains(&t), "row {r} position {i}: the sampled token is allowed");
            let max = allowed.iter().map(|&a| logits[a as usize] as f64).fold(f64::NEG_INFINITY, f64::max);
            let lse = max + allowed.iter().map(|&a| (logits[a as usize] as f64 - max).exp()).sum::<f64>().ln();
            let want = logits[t as usize] as f64 - lse;
            assert!((trained[r][i] as f64 - want).abs() < 1e-4, "row {r} position {i}: {} vs {want}", trained[r][i]);
            if allowed.len() == 1 {
                forced += 1;
                assert!(trained[r][i].abs() < 1e-6);
            }
            assert!(trained[r][i] >= free[r][i] - 1e-6, "masking only renormalises upwards");
            state = grammar.after_token(&state, t).unwrap();
        }
        assert!(state.done(), "row {r} wrote the whole list");
    }
    assert!(forced >= 4 * 8, "every `<answer>` byte is forced with the tiny tokenizer: {forced}");
}

/// candle's f32 matmul, on whichever kernels this CPU dispatches to (AVX-512, AVX2 + FMA or
/// scalar), against a plain f64 loop at the model's kinds of shapes: many rows (prefill), a few
/// (decoding), one, and a k that is not a multiple of any vector width.
#[test]
fn dispatched_matmul_agrees_with_a_plain_loop() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (m, k, n) in [(400, 576, 192), (8, 576, 1536), (1, 1536, 576), (37, 101, 29)] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let ta = Tensor::from_vec(a.clone(), (m, k), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b.clone(), (n, k), &Device::Cpu).unwrap();
        let got = ta.matmul(&tb.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|x| a[i * k + x] as f64 * b[j * k + x] as f64).sum();
                let d = (got[i][j] as f64 - want).abs();
                assert!(d < 1e-4 * (k as f64).sqrt(), "({m}, {k}, {n}) at [{i}][{j}]: {} vs {want}", got[i][j]);
            }
        }
    }
}

/// A frozen head of the prompt (`grpo.grad_prompt_tokens`) changes no value, and of the
/// gradient only what flows through the frozen tokens: in a one-layer model their queries feed
/// only their own outputs, which nothing reads, so the q adapter's gradient is exact; their
/// values are read by the completions, so the v adapter's gradient loses that part.
#[test]
fn a_frozen_prompt_head_keeps_the_values_and_drops_only_its_own_gradient() {
    use refine_poi::train::grpo::loss::group_logprobs;
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config("llama");
    config.num_hidden_layers = 1;
    write_tiny_model(dir.path(), &config, 7).unwrap();
    let mut m = load_on(&ModelSource::Folder(dir.path().to_path_buf()), &Device::Cpu, DType::F64).unwrap();
    m.model.attach_lora(&LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec!["q".into(), "v".into()] }, 21).unwrap();
    randomize_lora_b(&m, 22, 0.3).unwrap();
    let prompt = ids(&m, "a longer shared prompt");
    let p = prompt.len();
    let tokens = Tensor::from_vec(vec![10u32, 20, 30, 40, 50, 60], (2, 3), &Device::Cpu).unwrap();
    let run = |frozen: usize| {
        let logp = group_logprobs(&m.model, &prompt, &tokens, None, frozen, Mode::TRAIN).unwrap();
        let grads = logp.sum_all().unwrap().backward().unwrap();
        let values = logp.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let grad_of = |target: &str| -> Vec<f64> {
            m.model
                .lora_vars()
                .iter()
                .filter(|(name, _)| name.contains(target))
                .flat_map(|(_, v)| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap())
                .collect()
        };
        (values, grad_of("q_proj"), grad_of("v_proj"))
    };
    let (values, q, v) = run(0);
    assert!(!q.is_empty() && !v.is_empty());
    for frozen in [1, p - 1] {
        let (values_f, q_f, v_f) = run(frozen);
        for (a, b) in values.iter().zip(&values_f) {
            assert!((a - b).abs() < 1e-10, "frozen {frozen}: log-prob {a} vs {b}");
        }
        for (a, b) in q.iter().zip(&q_f) {
            assert!((a - b).abs() < 1e-9 * (1.0 + a.abs()), "frozen {frozen}: q gradient {a} vs {b}");
        }
        let dropped = v.iter().zip(&v_f).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(dropped > 1e-6, "frozen {frozen}: the values' gradient through the frozen tokens is left out");
    }
    assert!(m.model.forward_group(&prompt, &tokens, p, Mode::TRAIN).is_err(), "the last prompt token must stay live");
}

/// The hidden states of some positions (the last layer's projection and MLP on those rows
/// alone) are the full pass's rows, and so are the adapters' gradients through them (f32, the
/// training ops; left padding; positions in both rows, out of order).
#[test]
fn hidden_states_at_some_positions_are_the_full_passs_rows() {
    let (_d, mut m) = tiny("llama", DType::F32);
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    m.model.attach_lora(&LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: targets.map(String::from).to_vec() }, 5).unwrap();
    randomize_lora_b(&m, 6, 0.3).unwrap();
    let (a, b) = (ids(&m, "short"), ids(&m, "a longer prompt here"));
    let (t, pad) = (b.len(), b.len() - a.len());
    let mut batch = vec![0u32; pad];
    batch.extend(&a);
    batch.extend(&b);
    let input = Tensor::from_vec(batch, (2, t), &Device::Cpu).unwrap();
    let at = [(t + 1) as u32, (pad + 1) as u32, (t - 1) as u32, (2 * t - 1) as u32];
    let h = m.model.config.hidden_size;
    let weights = Tensor::rand(-1f32, 1.0, (at.len(), h), &Device::Cpu).unwrap();
    let run = |picked: Tensor| {
        let grads = (&picked * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Vec<f32>> = m
            .model
            .lora_vars()
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        (picked.to_vec2::<f32>().unwrap(), grads)
    };
    let full = m.model.forward_hidden(&input, Some(&[pad, 0]), None, Mode::TRAIN).unwrap();
    let index = Tensor::new(&at[..], &Device::Cpu).unwrap();
    let (want, want_grads) = run(full.reshape((2 * t, h)).unwrap().index_select(&index, 0).unwrap());
    let (got, got_grads) = run(m.model.forward_hidden_at(&input, &[pad, 0], &at, Mode::TRAIN).unwrap());
    assert_eq!(got.len(), at.len());
    assert!(max_diff(&got, &want) < 1e-6, "hidden states differ by {}", max_diff(&got, &want));
    assert_eq!(got_grads.len(), 2 * 2 * targets.len(), "2 layers x 7 targets x (A, B)");
    assert!(got_grads.iter().flatten().any(|g| g.abs() > 1e-4), "the adapters get gradients");
    let grad_diff = max_diff(&got_grads, &want_grads);
    assert!(grad_diff < 1e-5, "gradients differ by {grad_diff}");
}
