//! Semantic POI ids on a tiny model: `preprocess` writes a codebook that covers every POI; an
//! adapter that adds the codes' tokens trains, resumes bit for bit, reloads and exports, in
//! PEFT's trainable-tokens layout; GRPO and `eval` read answers written in codes; whole-history
//! examples score every train check-in once.

use std::path::Path;

use candle_core::{DType, Tensor};
use refine_poi::beam::{CodeTrie, rank_next_codes};
use refine_poi::data::Dataset;
use refine_poi::data::codebook::Codebook;
use refine_poi::history_prompt::next_checkin_prompt;
use refine_poi::model::peft::{ADDED_TOKENS_FILE, TRAINABLE_TOKENS_KEY};
use refine_poi::model::{self, Mode};
use refine_poi::train::config::RunConfig;
use refine_poi::train::sft::history::history_examples;
use refine_poi::train::{RunOptions, ScoredSeq, grpo, scored_logprobs, sft};

use crate::common::{Setup, adapter_f32, adapter_tensors, bin, error_line, quiet, text};

const SEMANTIC: &[&str] = &["prompt.ids=semantic", "sft.eval_every=3"];

fn codebook(s: &Setup) -> Codebook {
    let ds = Dataset::load(&s.cfg(&[]).data.dir).unwrap();
    ds.codebook().expect("preprocess writes codebook.json").clone()
}

#[test]
fn preprocess_writes_a_deterministic_codebook_of_every_poi() {
    let s = Setup::new();
    let ds = Dataset::load(&s.cfg(&[]).data.dir).unwrap();
    let cb = ds.codebook().expect("preprocess writes codebook.json");
    cb.check(ds.num_pois()).unwrap();
    assert_eq!(cb.levels(), cb.config.levels.len() + 1);
    // Rebuilt from the loaded dataset (another process, the same train split): the same codes.
    assert_eq!(&Codebook::build(&ds, &cb.config).unwrap(), cb);

    // The warm-up's prompts and answers name POIs by code only.
    let cfg = s.cfg(&["prompt.ids=semantic"]);
    let mut loaded = model::load(cfg.model.path.as_str()).unwrap();
    loaded.add_tokens(cb.tokens(), 0).unwrap();
    let builder = sft::ExampleBuilder::new(&ds, &cfg, &loaded.tokenizer).unwrap();
    let inst = &ds.instances(refine_poi::data::Split::Train)[0];
    let answer = builder.answer_text(inst);
    assert!(answer.starts_with(&format!("<answer>{}", cb.code_text(inst.target.poi))), "{answer}");
    let seq = builder.build(inst).unwrap();
    let prompt = loaded.tokenizer.decode(&seq.ids, false).unwrap();
    let raw_id = prompt.split("POI ").skip(1).any(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    assert!(prompt.contains(&cb.code_text(inst.prefix[0].poi)) && !raw_id, "{prompt}");
}

/// Answer-in-prompt finds targets named by code: on the same instances, a semantic prompt names
/// the target exactly where the raw prompt does (a large budget keeps every line in both).
#[test]
fn answer_in_prompt_finds_codes_where_it_finds_raw_ids() {
    let s = Setup::new();
    let ds = Dataset::load(&s.cfg(&[]).data.dir).unwrap();
    let mut loaded = model::load(s.cfg(&[]).model.path.as_str()).unwrap();
    loaded.add_tokens(ds.codebook().unwrap().tokens(), 0).unwrap();
    let shares = |ids: &str| {
        let cfg = s.cfg(&[ids, "prompt.max_prompt_tokens=100000"]);
        let prompts = refine_poi::prompt::PromptBuilder::new(cfg.prompt.clone(), &loaded.tokenizer).unwrap();
        refine_poi::prompt_stats::answer_in_prompt(&ds, refine_poi::data::Split::Val, &prompts, None).unwrap()
    };
    let (raw, semantic) = (shares("prompt.ids=raw"), shares("prompt.ids=semantic"));
    assert!(raw.groups["all"].in_prompt > 0, "{raw:?}");
    assert_eq!(raw.groups, semantic.groups);
}

#[test]
fn an_adapter_with_added_tokens_trains_resumes_and_keeps_pefts_layout() {
    let straight = Setup::new();
    let cfg = straight.cfg(SEMANTIC);
    let full = sft::run(&cfg, &quiet()).unwrap();
    assert!(full.stage.finished);
    let fin = full.stage.dir.join("final");

    // PEFT's trainable tokens: the new rows right after the base vocabulary, under the input
    // embedding's key only (the head is tied), named by added_tokens.json.
    let cb = codebook(&straight);
    let names = cb.tokens();
    let base = model::load(cfg.model.path.as_str()).unwrap();
    let (vocab, hidden) = (base.model.config.vocab_size, base.model.config.hidden_size);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fin.join("adapter_config.json")).unwrap()).unwrap();
    let indices: Vec<usize> = (vocab..vocab + names.len()).collect();
    assert_eq!(config["trainable_token_indices"], serde_json::json!({ "embed_tokens": indices }));
    let added: std::collections::HashMap<String, usize> =
        serde_json::from_str(&std::fs::read_to_string(fin.join(ADDED_TOKENS_FILE)).unwrap()).unwrap();
    for (i, name) in names.iter().enumerate() {
        assert_eq!(added[name], vocab + i);
    }
    let bytes = std::fs::read(fin.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rows = st.tensor(TRAINABLE_TOKENS_KEY).unwrap();
    assert_eq!(rows.shape(), [names.len(), hidden]);
    assert_eq!(rows.dtype(), safetensors::Dtype::F32);
    for key in st.names() {
        assert!(key == TRAINABLE_TOKENS_KEY || key.contains(".lora_A.") || key.contains(".lora_B."), "unexpected key {key}");
    }
    // The rows trained: they moved between the first checkpoint and the end.
    let rows_of = |dir: &Path| adapter_f32(dir).into_iter().find(|(k, _)| k == TRAINABLE_TOKENS_KEY).unwrap().1;
    assert_ne!(rows_of(&full.stage.dir.join("checkpoints/step-4")), rows_of(&fin));

    // Stopped after 2 steps and resumed: the same adapter, rows included, bit for bit.
    let resumed = Setup::new();
    let cfg = resumed.cfg(SEMANTIC);
    let a = sft::run(&cfg, &RunOptions { stop_after: Some(2), ..quiet() }).unwrap();
    assert_eq!(a.stage.step, 2);
    let d = sft::run(&cfg, &RunOptions { resume: true, ..quiet() }).unwrap();
    assert!(d.stage.finished);
    assert_eq!(adapter_tensors(&fin), adapter_tensors(&d.stage.dir.join("final")), "resumed adapter differs");

    // Reloaded, the tokenizer reads a code as its tokens.
    let mut loaded = model::load(cfg.model.path.as_str()).unwrap();
    loaded.load_adapter(&fin).unwrap();
    assert_eq!(loaded.model.vocab_size(), vocab + names.len());
    let ids = loaded.tokenizer.encode(&cb.code_text(0), false).unwrap();
    assert_eq!(ids.len(), cb.levels());
    assert!(ids.iter().all(|&i| i as usize >= vocab), "{ids:?}");
    assert_eq!(loaded.tokenizer.decode(&ids, true).unwrap(), cb.code_text(0));

    // Exported: a plain model with the resized vocabulary gives the same logits, new tokens in
    // the input and in the output.
    let out = straight.tmp.path().join("export");
    let run = bin().args(["export", "--model", cfg.model.path.as_str(), "--adapter"]).arg(&fin).arg("--out").arg(&out).output().unwrap();
    assert!(run.status.success(), "{}", text(&run.stderr));
    let exported = model::load(out.to_str().unwrap()).unwrap();
    assert_eq!(exported.model.config.vocab_size, vocab + names.len());
    assert_eq!(exported.tokenizer.encode(&cb.code_text(0), false).unwrap(), ids);
    let mut input = loaded.tokenizer.encode("next: ", false).unwrap();
    input.extend(&ids);
    let input = Tensor::new(input.as_slice(), loaded.model.device()).unwrap().unsqueeze(0).unwrap();
    let logits = |m: &model::CausalLm| m.forward(&input, None, None, Mode::INFERENCE).unwrap().to_dtype(DType::F32).unwrap();
    let diff = (logits(&loaded.model) - logits(&exported.model)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "max |logit difference| = {diff}");
}

#[test]
fn grpo_and_eval_read_answers_in_codes() {
    let s = Setup::new();
    let sft_cfg = s.cfg(&["prompt.ids=semantic", "sft.max_steps=2"]);
    let warm = sft::run(&sft_cfg, &quiet()).unwrap();
    let fin = warm.stage.dir.join("final");
    let fin_s = fin.to_str().unwrap().to_string();

    // GRPO from the warm-up: the starting adapter's tokens are the codebook's, and it runs.
    let init = format!("grpo.init_adapter={fin_s}");
    let cfg = s.cfg(&["prompt.ids=semantic", &init, "grpo.max_steps=2", "grpo.eval_every=2"]);
    let done = grpo::run(&cfg, &quiet()).unwrap();
    assert!(done.stage.finished);
    // A raw-id run cannot start from it, nor can a KL to the base model.
    let raw_dir = format!("run_dir={}", s.tmp.path().join("raw-run").display());
    let e = format!("{:#}", grpo::run(&s.cfg(&[&init, &raw_dir]), &quiet()).unwrap_err());
    assert!(e.contains("semantic"), "{e}");
    let e = format!("{:#}", RunConfig::load(Some(&s.config), &["prompt.ids=semantic".into(), "grpo.reference=base".into()]).unwrap_err());
    assert!(e.contains("reference"), "{e}");

    // eval --ids semantic with the adapter: answers are read back as dense ids.
    let data = sft_cfg.data.dir.to_str().unwrap().to_string();
    let model = sft_cfg.model.path.clone();
    let report = s.tmp.path().join("eval.json");
    let eval = |adapter: Option<&str>| {
        let mut cmd = bin();
        cmd.args(["eval", "--method", "llm", "--split", "val", "--limit", "3", "--max-new-tokens", "12", "--quiet"])
            .args(["--ids", "semantic", "--prompt-config", s.config.to_str().unwrap(), "--data", &data, "--model", &model, "--out"])
            .arg(&report);
        if let Some(a) = adapter {
            cmd.args(["--adapter", a]);
        }
        cmd.output().unwrap()
    };
    let out = eval(Some(&fin_s));
    let r = report_of(&out, &report);
    assert_eq!(r["instances"], 3, "{r}");
    assert!(r["invalid"].as_u64().is_some(), "{r}");
    // Constrained to the codebook: every answer is k distinct codes of the dataset's POIs.
    let preds = s.tmp.path().join("constrained.jsonl");
    let out = bin()
        .args(["eval", "--method", "llm", "--split", "val", "--limit", "3", "--max-new-tokens", "40", "--quiet", "--constrained"])
        .args(["--ids", "semantic", "--prompt-config", s.config.to_str().unwrap(), "--data", &data, "--model", &model])
        .args(["--adapter", &fin_s, "--out"])
        .arg(&report)
        .arg("--predictions")
        .arg(&preds)
        .output()
        .unwrap();
    let r = report_of(&out, &report);
    assert_eq!(r["invalid"], 0, "{r}");
    for line in std::fs::read_to_string(&preds).unwrap().lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        let parsed = &p["detail"]["parsed"];
        assert!(parsed["well_formed"].as_bool().unwrap() && parsed["ids"].as_array().unwrap().len() == 3, "{p}");
    }
    // GRPO samples under the same grammar.
    let constrained = s.cfg(&["prompt.ids=semantic", &init, "grpo.constrained=true", "grpo.max_steps=1", "grpo.max_new_tokens=40"]);
    let constrained = RunConfig { run_dir: s.tmp.path().join("constrained"), ..constrained };
    assert!(grpo::run(&constrained, &quiet()).unwrap().stage.finished);

    // Without an adapter that adds the tokens: one clear error.
    let out = eval(None);
    assert!(!out.status.success());
    assert!(error_line(&out).contains("adapter"), "{}", error_line(&out));
}

/// Whole-history examples on codes: every train check-in is one line of one window, its code is
/// the scored part, and a window's loss is the sum of what each target scores as the end of
/// its own prefix (one forward, many targets, the same numbers).
#[test]
fn whole_histories_score_every_train_checkin_once() {
    let s = Setup::new();
    let cfg = s.cfg(&["prompt.ids=semantic", "prompt.times=true", "prompt.categories=true"]);
    let ds = Dataset::load(&cfg.data.dir).unwrap();
    let cb = ds.codebook().unwrap();
    let mut loaded = model::load(cfg.model.path.as_str()).unwrap();
    loaded.model.attach_lora(&cfg.lora, 1).unwrap();
    loaded.add_tokens(cb.tokens(), 2).unwrap();
    refine_poi::selfcheck::randomize_lora_b(&loaded, 3, 0.05).unwrap();
    let max_tokens = 160;
    let windows = history_examples(&ds, &cfg.prompt, &loaded.tokenizer, max_tokens).unwrap();

    let mut scored = String::new();
    for w in &windows {
        assert!(w.ids.len() <= max_tokens);
        assert!(loaded.tokenizer.decode(&w.ids, false).unwrap().starts_with("Check-ins of user "));
        let targets: Vec<u32> = w.targets.iter().map(|&j| w.ids[j]).collect();
        scored.push_str(&loaded.tokenizer.decode(&targets, false).unwrap());
    }
    // Users in id order, each one's train check-ins in time order: their codes, nothing else.
    let mut expected = String::new();
    for u in 0..ds.users().len() as u32 {
        let mut train: Vec<_> = ds
            .trajectories()
            .iter()
            .filter(|t| t.user == u && t.split == refine_poi::data::Split::Train)
            .flat_map(|t| ds.trajectory_checkins(t).to_vec())
            .collect();
        train.sort_by_key(|c| c.utc);
        train.iter().for_each(|c| expected.push_str(&cb.code_text(c.poi)));
    }
    assert_eq!(scored, expected);
    assert!(windows.len() > ds.users().len(), "long histories are cut into windows");

    // Two windows in one padded batch against each target alone.
    let batch = &windows[..2];
    assert_ne!(batch[0].ids.len(), batch[1].ids.len(), "the batch needs padding");
    let together = scored_logprobs(&loaded.model, batch, Mode::TRAIN).unwrap().to_vec1::<f32>().unwrap();
    let mut alone = Vec::new();
    for w in batch {
        for &j in &w.targets {
            let prefix = ScoredSeq::answer(w.ids[..=j].to_vec(), j);
            alone.extend(scored_logprobs(&loaded.model, &[prefix], Mode::TRAIN).unwrap().to_vec1::<f32>().unwrap());
        }
    }
    assert_eq!(together.len(), alone.len());
    for (i, (a, b)) in together.iter().zip(&alone).enumerate() {
        assert!((a - b).abs() < 1e-4, "target {i}: {a} in the window, {b} alone");
    }
    let (sum_a, sum_b): (f32, f32) = (together.iter().sum(), alone.iter().sum());
    assert!((sum_a - sum_b).abs() < 1e-3 * sum_b.abs().max(1.0), "{sum_a} vs {sum_b}");

    // A whole-history warm-up runs, one example a window.
    let run =
        s.cfg(&["prompt.ids=semantic", "sft.examples=histories", "data.train_instances=0", "sft.history_tokens=160", "sft.max_steps=2"]);
    let done = sft::run(&run, &quiet()).unwrap();
    assert!(done.stage.finished && done.first_loss.is_some_and(f64::is_finite));
    let bad = s.cfg(&["sft.examples=histories", "data.train_instances=6", "sft.max_steps=1"]);
    let bad = RunConfig { run_dir: s.tmp.path().join("bad"), ..bad };
    assert!(format!("{:#}", sft::run(&bad, &quiet()).unwrap_err()).contains("train_instances"));
}

/// With `prompt.time_tokens`, a check-in is its weekday and hour tokens and its code, in
/// history windows and prompts alike; the target's time is tokens too; a warm-up adds the time
/// tokens after the codes and its adapter evaluates, while an adapter without them is refused.
#[test]
fn time_tokens_write_each_checkin_as_two_tokens_and_its_code() {
    let s = Setup::new();
    let on = ["prompt.ids=semantic", "prompt.times=true", "prompt.time_tokens=true", "prompt.categories=false"];
    let cfg = s.cfg(&on);
    let ds = Dataset::load(&cfg.data.dir).unwrap();
    let cb = ds.codebook().unwrap();
    let names = refine_poi::prompt::added_tokens(&cfg.prompt, Some(cb)).unwrap().unwrap();
    assert_eq!(names[..cb.tokens().len()], cb.tokens()[..]);
    assert_eq!(names[cb.tokens().len()..], refine_poi::prompt::time_token_names()[..]);
    for t in refine_poi::prompt::time_token_names() {
        assert_eq!(cb.to_raw_ids(&t), t, "a time token reads as no code");
    }
    let mut loaded = model::load(cfg.model.path.as_str()).unwrap();
    loaded.model.attach_lora(&cfg.lora, 1).unwrap();
    loaded.add_tokens(names.clone(), 2).unwrap();

    // A check-in line: `<Sat><17h>`, then the code (its targets), then a newline: 2 + levels + 1 tokens.
    let line = regex_lite(cb.levels());
    let newline = loaded.tokenizer.encode("\n", false).unwrap();
    let windows = history_examples(&ds, &cfg.prompt, &loaded.tokenizer, 160).unwrap();
    let mut checkins = 0;
    for w in &windows {
        let text = loaded.tokenizer.decode(&w.ids, false).unwrap();
        let (_, body) = text.split_once(", in local time.\n").expect("a window opens with its header");
        for l in body.lines().filter(|l| !l.is_empty()) {
            assert!(line(l), "{l:?} is not a time-token check-in line");
            let (ids, _) = loaded.tokenizer.encode_with_offsets(&format!("{l}\n")).unwrap();
            assert_eq!(ids.len(), 2 + cb.levels() + newline.len(), "{l:?}");
            checkins += 1;
        }
        assert_eq!(w.targets.len() % cb.levels(), 0);
    }
    assert_eq!(windows.iter().map(|w| w.targets.len()).sum::<usize>(), checkins * cb.levels());

    // A prompt: the trajectory's and earlier check-ins' lines are time tokens and codes, and the
    // question names the target's time in tokens.
    let builder = refine_poi::prompt::PromptBuilder::new(cfg.prompt.clone(), &loaded.tokenizer).unwrap();
    let inst = &ds.instances(refine_poi::data::Split::Val)[0];
    let built = builder.build(&refine_poi::prompt::PromptContext::from_instance(&ds, inst)).unwrap();
    let (_, trajectory) = built.text.split_once("Current trajectory (oldest first):\n").unwrap();
    let lines: Vec<&str> = trajectory.lines().take_while(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty() && lines.iter().all(|l| line(l)), "{lines:?}");
    let at = inst.target.local_time();
    let weekday = at.format("<%a>").to_string();
    assert!(built.text.contains(&format!("The next check-in is at {weekday}<{}h>.", chrono::Timelike::hour(&at))), "{}", built.text);
    let text_form = refine_poi::prompt::PromptBuilder::new(
        refine_poi::prompt::PromptConfig { time_tokens: false, ..cfg.prompt.clone() },
        &loaded.tokenizer,
    )
    .unwrap()
    .build(&refine_poi::prompt::PromptContext::from_instance(&ds, inst))
    .unwrap();
    assert!(built.ids.len() < text_form.ids.len(), "{} vs {} tokens", built.ids.len(), text_form.ids.len());

    // Raw ids cannot have time tokens.
    let e = format!("{:#}", RunConfig::load(Some(&s.config), &["prompt.time_tokens=true".into()]).unwrap_err());
    assert!(e.contains("time_tokens"), "{e}");

    // A whole-history warm-up with time tokens: its adapter adds codes then times, and evaluates.
    // Its validation ranks by the next code, as the model trained: every answer is valid.
    let history = ["sft.examples=histories", "data.train_instances=0", "sft.history_tokens=160", "sft.max_steps=1"];
    let run = s.cfg(&[&on[..], &history, &["sft.eval_every=1", "sft.eval_instances=2"]].concat());
    let done = sft::run(&run, &quiet()).unwrap();
    let metrics = std::fs::read_to_string(done.stage.dir.join("metrics.jsonl")).unwrap();
    let val: serde_json::Value = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .find(|l: &serde_json::Value| l.get("val").is_some())
        .expect("a validation");
    assert_eq!(val["val_invalid_rate"], 0.0, "{val}");
    let fin = done.stage.dir.join("final");
    let added: Vec<String> =
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&std::fs::read_to_string(fin.join(ADDED_TOKENS_FILE)).unwrap())
            .unwrap()
            .keys()
            .cloned()
            .collect();
    assert_eq!(added.len(), names.len());
    let report = s.tmp.path().join("eval.json");
    let out = bin()
        .args(["eval", "--run"])
        .arg(&done.stage.dir)
        .args(["--split", "val", "--limit", "3", "--max-new-tokens", "20", "--constrained", "--quiet", "--out"])
        .arg(&report)
        .output()
        .unwrap();
    let r = report_of(&out, &report);
    assert_eq!((r["instances"].as_u64(), r["invalid"].as_u64()), (Some(3), Some(0)), "{r}");
    // Ranked by beam search over the next code instead: k distinct POIs for every instance.
    let preds = s.tmp.path().join("beam.jsonl");
    let out = bin()
        .args(["eval", "--run"])
        .arg(&done.stage.dir)
        .args(["--split", "val", "--limit", "3", "--beam-next", "5", "--quiet", "--out"])
        .arg(&report)
        .arg("--predictions")
        .arg(&preds)
        .output()
        .unwrap();
    let r = report_of(&out, &report);
    assert_eq!((r["instances"].as_u64(), r["invalid"].as_u64()), (Some(3), Some(0)), "{r}");
    assert!(r["method"].as_str().unwrap().ends_with("+beam-next5"), "{r}");
    // Answer-in-prompt counts the beam's own prompts: the check-ins shown.
    let in_prompt = &r["answer_in_prompt"]["groups"]["all"];
    assert_eq!(in_prompt["n"], 3, "{r}");
    assert!(in_prompt["by_section"].as_object().unwrap().keys().all(|k| k == "history"), "{r}");
    for line in std::fs::read_to_string(&preds).unwrap().lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        let ranked: Vec<u64> = p["ranked"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(ranked.len(), 3);
        assert_eq!(p["detail"]["beam"].as_array().unwrap().len(), 5, "{p}");
    }
    // Told nothing, `eval --run` ranks this run as its validation did: by the next code, 20 beams.
    let out = bin()
        .args(["eval", "--run"])
        .arg(&done.stage.dir)
        .args(["--split", "val", "--limit", "2", "--quiet", "--out"])
        .arg(&report)
        .output()
        .unwrap();
    let r = report_of(&out, &report);
    assert!(r["method"].as_str().unwrap().ends_with("+beam-next20"), "{r}");
    // recommend --beam-next, for an instance's user at its target's time, ranks as eval did.
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&preds).unwrap().lines().next().unwrap()).unwrap();
    let ds = Dataset::load(&run.data.dir).unwrap();
    let inst = &ds.instances(refine_poi::data::Split::Val)[first["id"].as_u64().unwrap() as usize];
    let recommend = |who: &[&str]| {
        bin()
            .arg("recommend")
            .args(who)
            .args(["--model", run.model.path.as_str(), "--beam-next", "5", "--json", "--data"])
            .arg(&run.data.dir)
            .arg("--adapter")
            .arg(&fin)
            .arg("--prompt-config")
            .arg(done.stage.dir.join("config.toml"))
            .output()
            .unwrap()
    };
    let at = refine_poi::data::format_utc(inst.target.utc);
    let out = recommend(&["--user", &ds.users()[inst.user as usize].source_id, "--at", &at]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pois: Vec<&serde_json::Value> = r["recommendations"].as_array().unwrap().iter().map(|x| &x["poi"]).collect();
    assert_eq!(pois, first["ranked"].as_array().unwrap().iter().collect::<Vec<_>>(), "{r}");
    let history = s.tmp.path().join("history.json");
    std::fs::write(&history, format!(r#"[{{"poi": 0, "time": "{at}"}}]"#)).unwrap();
    assert!(error_line(&recommend(&["--history", history.to_str().unwrap()])).contains("give --user"));

    // An adapter with the codes alone, asked for time tokens: one clear error.
    let plain = s.cfg(&["prompt.ids=semantic", "sft.max_steps=1"]);
    let plain = RunConfig { run_dir: s.tmp.path().join("plain"), ..plain };
    let plain = sft::run(&plain, &quiet()).unwrap().stage.dir.join("final");
    let prompt = s.tmp.path().join("prompt.toml");
    std::fs::write(&prompt, "ids = \"semantic\"\ntime_tokens = true\ncategories = false\n").unwrap();
    let out = bin()
        .args(["eval", "--method", "llm", "--split", "val", "--limit", "2", "--max-new-tokens", "8", "--quiet", "--data"])
        .arg(&run.data.dir)
        .args(["--model", &run.model.path, "--prompt-config"])
        .arg(&prompt)
        .arg("--adapter")
        .arg(&plain)
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(error_line(&out).contains("time tokens"), "{}", error_line(&out));
}

/// Whether `l` is one time-token check-in line: `<Sat><17h>` and a code of `levels` tokens.
fn regex_lite(levels: usize) -> impl Fn(&str) -> bool {
    move |l: &str| {
        let Some(rest) = ["<Mon>", "<Tue>", "<Wed>", "<Thu>", "<Fri>", "<Sat>", "<Sun>"].iter().find_map(|d| l.strip_prefix(d)) else {
            return false;
        };
        let Some((hour, code)) = rest.strip_prefix('<').and_then(|r| r.split_once("h>")) else { return false };
        let hour_ok = hour.parse::<u32>().is_ok_and(|h| h < 24);
        let parts: Vec<&str> = code.split('>').filter(|p| !p.is_empty()).collect();
        hour_ok
            && code.ends_with('>')
            && parts.len() == levels
            && parts.iter().enumerate().all(|(i, p)| {
                p.strip_prefix('<').and_then(|p| p.strip_prefix((b'a' + i as u8) as char)).is_some_and(|d| d.parse::<u16>().is_ok())
            })
    }
}

/// The next-check-in prompt is the whole-history form cut before the target: the user's header,
/// check-ins before the target only (the instance's prefix last), then the target's time tokens;
/// it keeps the newest lines within its budget.
#[test]
fn next_checkin_prompt_ends_with_the_prefix_and_the_targets_time() {
    let s = Setup::new();
    let cfg = s.cfg(&["prompt.ids=semantic", "prompt.times=true", "prompt.time_tokens=true", "prompt.categories=false"]);
    let ds = Dataset::load(&cfg.data.dir).unwrap();
    let cb = ds.codebook().unwrap();
    let mut loaded = model::load(cfg.model.path.as_str()).unwrap();
    loaded.add_tokens(refine_poi::prompt::added_tokens(&cfg.prompt, Some(cb)).unwrap().unwrap(), 2).unwrap();
    for inst in ds.instances(refine_poi::data::Split::Test).iter().take(5) {
        let line = |c: &refine_poi::data::Checkin| {
            let at = c.local_time();
            format!("{}<{}h>{}", at.format("<%a>"), chrono::Timelike::hour(&at), cb.code_text(c.poi))
        };
        let mut shown: Vec<Vec<String>> = Vec::new();
        for budget in [400, 60] {
            let ids = next_checkin_prompt(&ds, &cfg.prompt, &loaded.tokenizer, inst, budget).unwrap();
            assert!(ids.len() <= budget);
            let text = loaded.tokenizer.decode(&ids, false).unwrap();
            assert!(text.starts_with(&format!("Check-ins of user {}, in local time.\n", inst.user)), "{text}");
            let at = inst.target.local_time();
            let (body, end) = text.rsplit_once('\n').unwrap();
            assert_eq!(end, format!("{}<{}h>", at.format("<%a>"), chrono::Timelike::hour(&at)));
            shown.push(body.lines().filter(|l| l.starts_with('<')).map(str::to_string).collect());
        }
        // The large budget: the prefix last, earlier check-ins before it, none at or after the target.
        let expected: Vec<String> = inst.prefix.iter().map(line).collect();
        let (all, newest) = (&shown[0], &shown[1]);
        assert!(all.len() > expected.len() && all.ends_with(&expected), "{all:?}\n{expected:?}");
        assert!(all.len() <= ds.history(inst).len());
        // The small one keeps the newest lines.
        assert!(!newest.is_empty() && newest.len() < all.len() && all.ends_with(newest), "{newest:?}");
    }
    let e = next_checkin_prompt(&ds, &cfg.prompt, &loaded.tokenizer, &ds.instances(refine_poi::data::Split::Test)[0], 12).unwrap_err();
    assert!(format!("{e:#}").contains("budget"), "{e:#}");
}

/// With `prompt.history_window = "anchored"`, a user's next prompt mostly extends the one
/// before: it holds that prompt, less the target's time, as its beginning (unless it starts at a
/// later anchor), within the budget, ending with the prefix and the target's time as the latest
/// window does. The latest window, sliding, seldom does.
#[test]
fn anchored_prompts_of_a_user_extend_each_other() {
    let s = Setup::new();
    let semantic = ["prompt.ids=semantic", "prompt.times=true", "prompt.time_tokens=true", "prompt.categories=false"];
    let latest = s.cfg(&semantic);
    let cfg = s.cfg(&[&semantic[..], &["prompt.history_window=anchored"]].concat());
    let ds = Dataset::load(&cfg.data.dir).unwrap();
    let cb = ds.codebook().unwrap();
    let mut loaded = model::load(cfg.model.path.as_str()).unwrap();
    loaded.add_tokens(refine_poi::prompt::added_tokens(&cfg.prompt, Some(cb)).unwrap().unwrap(), 2).unwrap();
    // Short of the users' histories, so that both windows leave check-ins out.
    let budget = 240;
    let (mut pairs, mut shared) = (0, [0, 0]);
    for split in [refine_poi::data::Split::Val, refine_poi::data::Split::Test] {
        let instances = ds.instances(split);
        let prompts = |prompt: &refine_poi::prompt::PromptConfig| -> Vec<Vec<u32>> {
            instances.iter().map(|inst| next_checkin_prompt(&ds, prompt, &loaded.tokenizer, inst, budget).unwrap()).collect()
        };
        let (anchored, sliding) = (prompts(&cfg.prompt), prompts(&latest.prompt));
        for (inst, ids) in instances.iter().zip(&anchored) {
            assert!(ids.len() <= budget);
            // The same end as the latest window's: the prefix's lines and the target's time.
            let header = loaded.tokenizer.encode(&refine_poi::history_prompt::header(inst.user), false).unwrap().len();
            let newest = next_checkin_prompt(&ds, &latest.prompt, &loaded.tokenizer, inst, header + 2 + 12).unwrap();
            assert!(ids.ends_with(&newest[header..]), "instance {}", inst.id);
        }
        for (i, pair) in instances.windows(2).enumerate() {
            if pair[0].user != pair[1].user || pair[0].target.utc >= pair[1].target.utc {
                continue;
            }
            pairs += 1;
            for (count, prompts) in shared.iter_mut().zip([&anchored, &sliding]) {
                // Less the target's two time tokens.
                let before = &prompts[i][..prompts[i].len() - 2];
                *count += usize::from(prompts[i + 1].starts_with(before));
            }
        }
    }
    let [anchored, sliding] = shared;
    assert!(
        pairs > 10 && anchored * 4 > pairs * 3 && sliding * 4 < pairs,
        "of {pairs} consecutive prompts, {anchored} anchored and {sliding} latest ones extend the one before"
    );
}

/// The tiny model with a random adapter that adds the codebook's and the time tokens, the
/// dataset, and its code trie: what ranking and sampling next codes need.
fn next_code_model(s: &Setup) -> (RunConfig, Dataset, model::LoadedModel, CodeTrie) {
    let cfg = s.cfg(&["prompt.ids=semantic", "prompt.times=true", "prompt.time_tokens=true", "prompt.categories=false"]);
    let ds = Dataset::load(&cfg.data.dir).unwrap();
    let cb = ds.codebook().unwrap();
    let mut loaded = model::load(cfg.model.path.as_str()).unwrap();
    loaded.model.attach_lora(&cfg.lora, 1).unwrap();
    loaded.add_tokens(refine_poi::prompt::added_tokens(&cfg.prompt, Some(cb)).unwrap().unwrap(), 2).unwrap();
    refine_poi::selfcheck::randomize_lora_b(&loaded, 3, 0.05).unwrap();
    let trie = CodeTrie::new(cb, &loaded.tokenizer).unwrap();
    (cfg, ds, loaded, trie)
}

/// Beam search over the next code: with as many beams as codes it ranks every POI exactly as
/// scoring each code after the prompt does (at each level a log-softmax over the tokens that
/// continue some code); a narrow beam gives that many distinct POIs with the same scores; a
/// batch ranks as each prompt alone.
#[test]
fn beam_next_ranks_every_code_as_scoring_each_does() {
    let s = Setup::new();
    let (cfg, ds, loaded, trie) = next_code_model(&s);
    let cb = ds.codebook().unwrap();
    let prompts: Vec<Vec<u32>> = ds.instances(refine_poi::data::Split::Val)[..2]
        .iter()
        .map(|inst| next_checkin_prompt(&ds, &cfg.prompt, &loaded.tokenizer, inst, 120).unwrap())
        .collect();
    let all = ds.num_pois();
    let ranked = rank_next_codes(&loaded.model, &trie, &prompts, all).unwrap();

    let token = |level: usize, i: u16| loaded.tokenizer.token_id(&Codebook::token(level, usize::from(i))).unwrap();
    for (prompt, got) in prompts.iter().zip(&ranked) {
        // Every code scored alone: one forward over the prompt and the code.
        let mut expected = std::collections::HashMap::new();
        for (poi, code) in cb.codes.iter().enumerate() {
            let ids: Vec<u32> = prompt.iter().copied().chain(code.iter().enumerate().map(|(l, &i)| token(l, i))).collect();
            let input = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = loaded.model.forward(&input, None, None, Mode::INFERENCE).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            let mut score = 0.0f64;
            for level in 0..code.len() {
                let row = &logits[prompt.len() - 1 + level];
                let mut next: Vec<u16> = cb.codes.iter().filter(|c| c[..level] == code[..level]).map(|c| c[level]).collect();
                next.sort_unstable();
                next.dedup();
                let log_sum = next.iter().map(|&i| f64::from(row[token(level, i) as usize]).exp()).sum::<f64>().ln();
                score += f64::from(row[token(level, code[level]) as usize]) - log_sum;
            }
            expected.insert(poi as u32, score);
        }
        assert_eq!(got.len(), all);
        let distinct: std::collections::HashSet<u32> = got.iter().map(|&(p, _)| p).collect();
        assert_eq!(distinct.len(), all, "every POI once");
        for w in got.windows(2) {
            assert!(w[0].1 >= w[1].1, "best first");
        }
        for &(p, score) in got {
            assert!((f64::from(score) - expected[&p]).abs() < 1e-3, "POI {p}: {score} by beam, {} alone", expected[&p]);
        }
        let total: f64 = expected.values().map(|s| s.exp()).sum();
        assert!((total - 1.0).abs() < 1e-3, "the code distribution sums to {total}");
    }

    // Three beams: three distinct POIs, scored as above; one prompt alone ranks as in the batch.
    let narrow = rank_next_codes(&loaded.model, &trie, &prompts, 3).unwrap();
    for (n, full) in narrow.iter().zip(&ranked) {
        assert_eq!(n.len(), 3);
        assert_eq!(n.iter().map(|&(p, _)| p).collect::<std::collections::HashSet<_>>().len(), 3);
        for &(p, score) in n {
            let (_, s) = full.iter().find(|&&(q, _)| q == p).unwrap();
            assert!((score - s).abs() < 1e-4);
        }
    }
    let alone = rank_next_codes(&loaded.model, &trie, &prompts[1..], all).unwrap();
    for ((p, a), (q, b)) in alone[0].iter().zip(&ranked[1]) {
        assert_eq!(p, q);
        assert!((a - b).abs() < 1e-4);
    }
}

/// GRPO's next-code form samples from the distribution the beam ranks by, only ever a code of
/// the dataset, and trains on the log-probs of that same masked distribution (on-policy), with
/// or without a frozen prompt head.
#[test]
fn sampled_codes_follow_the_beams_distribution_and_train_on_it() {
    use refine_poi::beam::sample_next_codes;
    use refine_poi::train::grpo::loss::{completion_tensors, group_logprobs};
    let s = Setup::new();
    let (cfg, ds, loaded, trie) = next_code_model(&s);
    let cb = ds.codebook().unwrap();
    let prompt = next_checkin_prompt(&ds, &cfg.prompt, &loaded.tokenizer, &ds.instances(refine_poi::data::Split::Val)[0], 120).unwrap();
    let ranked = rank_next_codes(&loaded.model, &trie, std::slice::from_ref(&prompt), ds.num_pois()).unwrap().remove(0);
    let prob: std::collections::HashMap<u32, f64> = ranked.iter().map(|&(p, score)| (p, f64::from(score).exp())).collect();

    let n = 3000;
    let samples = sample_next_codes(&loaded.model, &trie, std::slice::from_ref(&prompt), &[5], n, 1).unwrap().remove(0);
    let again = sample_next_codes(&loaded.model, &trie, std::slice::from_ref(&prompt), &[5], 8, 1).unwrap().remove(0);
    assert_eq!(again.iter().map(|c| &c.tokens).collect::<Vec<_>>(), samples[..8].iter().map(|c| &c.tokens).collect::<Vec<_>>(), "seeded");
    let mut counts = std::collections::HashMap::new();
    for c in &samples {
        assert_eq!(c.tokens.len(), cb.levels());
        let poi = trie.poi_of_tokens(&c.tokens).expect("every sample is a code of the dataset");
        *counts.entry(poi).or_insert(0usize) += 1;
    }
    for (poi, p) in &prob {
        let freq = counts.get(poi).copied().unwrap_or(0) as f64 / n as f64;
        assert!((freq - p).abs() < 0.03, "POI {poi}: sampled {freq}, probability {p}");
    }

    // The training forward under the trie's mask gives each sample its code's probability, in
    // the training pass and in the inference passes of the old and reference policies, with
    // or without a frozen prompt head; sampled beside a longer prompt (left-padded sharing) too.
    let longer = next_checkin_prompt(&ds, &cfg.prompt, &loaded.tokenizer, &ds.instances(refine_poi::data::Split::Val)[1], 160).unwrap();
    assert_ne!(longer.len(), prompt.len());
    let both = [prompt.clone(), longer];
    let groups = sample_next_codes(&loaded.model, &trie, &both, &[5, 6], 8, 1).unwrap();
    assert_eq!(groups[0].iter().map(|c| &c.tokens).collect::<Vec<_>>(), samples[..8].iter().map(|c| &c.tokens).collect::<Vec<_>>());
    for (prompt, group) in both.iter().zip(&groups) {
        let ranked = rank_next_codes(&loaded.model, &trie, std::slice::from_ref(prompt), ds.num_pois()).unwrap().remove(0);
        let prob: std::collections::HashMap<u32, f64> = ranked.iter().map(|&(p, score)| (p, f64::from(score).exp())).collect();
        let (tokens, mask) = completion_tensors(group, 0, 0, &candle_core::Device::Cpu, DType::F32).unwrap();
        assert_eq!(mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as usize, 8 * cb.levels(), "no end token after a code");
        let rows: Vec<Vec<u32>> = group.iter().map(|c| c.tokens.clone()).collect();
        let grammar = trie.supports(&rows).unwrap();
        for mode in [Mode::TRAIN, Mode::INFERENCE] {
            for frozen in [0, prompt.len() - 4] {
                let logp = group_logprobs(&loaded.model, prompt, &tokens, Some(&grammar), frozen, mode).unwrap().to_vec2::<f32>().unwrap();
                for (c, row) in group.iter().zip(&logp) {
                    let poi = trie.poi_of_tokens(&c.tokens).unwrap();
                    let trained: f64 = row.iter().map(|&l| f64::from(l)).sum::<f64>().exp();
                    assert!(
                        (trained - prob[&poi]).abs() < 1e-4,
                        "{mode:?}, frozen {frozen}, POI {poi}: {trained} trained, {} sampled",
                        prob[&poi]
                    );
                }
            }
        }
    }
    let mut swapped = samples[0].tokens.clone();
    swapped.swap(0, 1);
    assert_eq!(trie.poi_of_tokens(&swapped), None, "each token at its own level");
    assert!(trie.supports(&[vec![1, 2, 3]]).is_err(), "a row that is not a code");
}

/// With several codes per sample, GRPO's next-code form samples lists of distinct codes in
/// Plackett–Luce order (stochastic beam search): over 12,000 seeded samples of two codes, each
/// ordered pair's frequency matches p(a) · p(b) / (1 − p(a)) under the beam's probabilities
/// within .012 (the two likeliest codes have .39 and .37 here, so the order matters).
/// The training rows give each sampled list exactly that probability, with or without a frozen
/// prompt head.
#[test]
fn sampled_code_lists_follow_plackett_luce_and_train_on_it() {
    use refine_poi::beam::sample_next_codes;
    use refine_poi::train::grpo::loss::CodeLists;
    let s = Setup::new();
    let (cfg, ds, loaded, trie) = next_code_model(&s);
    let levels = ds.codebook().unwrap().levels();
    let prompt = next_checkin_prompt(&ds, &cfg.prompt, &loaded.tokenizer, &ds.instances(refine_poi::data::Split::Val)[0], 120).unwrap();
    let ranked = rank_next_codes(&loaded.model, &trie, std::slice::from_ref(&prompt), ds.num_pois()).unwrap().remove(0);
    let prob: std::collections::HashMap<u32, f64> = ranked.iter().map(|&(p, score)| (p, f64::from(score).exp())).collect();
    let pois = |c: &refine_poi::generate::Completion| -> Vec<u32> {
        c.tokens.chunks(levels).map(|code| trie.poi_of_tokens(code).expect("every listed code is a code of the dataset")).collect()
    };

    let n = 12_000;
    let samples = sample_next_codes(&loaded.model, &trie, std::slice::from_ref(&prompt), &[9], n, 2).unwrap().remove(0);
    let mut counts = std::collections::HashMap::new();
    for c in &samples {
        let listed = pois(c);
        assert_eq!(listed.len(), 2);
        assert_ne!(listed[0], listed[1], "without replacement");
        *counts.entry((listed[0], listed[1])).or_insert(0usize) += 1;
    }
    let mut checked = 0.0;
    for (&a, &pa) in &prob {
        for (&b, &pb) in &prob {
            if a != b {
                let expected = pa * pb / (1.0 - pa);
                let freq = counts.get(&(a, b)).copied().unwrap_or(0) as f64 / n as f64;
                assert!((freq - expected).abs() < 0.012, "({a}, {b}): sampled {freq}, Plackett–Luce {expected}");
                checked += expected;
            }
        }
    }
    assert!((checked - 1.0).abs() < 1e-3, "the ordered pairs' probabilities sum to {checked}");

    let lists = sample_next_codes(&loaded.model, &trie, std::slice::from_ref(&prompt), &[9], 6, 3).unwrap().remove(0);
    let again = sample_next_codes(&loaded.model, &trie, std::slice::from_ref(&prompt), &[9], 6, 3).unwrap().remove(0);
    assert_eq!(lists.iter().map(|c| &c.tokens).collect::<Vec<_>>(), again.iter().map(|c| &c.tokens).collect::<Vec<_>>(), "seeded");
    let rows = CodeLists::new(&trie, &lists, 3, &candle_core::Device::Cpu).unwrap();
    for mode in [Mode::TRAIN, Mode::INFERENCE] {
        for frozen in [0, prompt.len() - 4] {
            let trained = rows.logprobs(&loaded.model, &prompt, frozen, mode).unwrap().squeeze(1).unwrap().to_vec1::<f32>().unwrap();
            for (c, got) in lists.iter().zip(trained) {
                let listed = pois(c);
                let mut expected = 0.0f64;
                let mut taken = 0.0f64;
                for poi in &listed {
                    expected += (prob[poi] / (1.0 - taken)).ln();
                    taken += prob[poi];
                }
                assert!(
                    (f64::from(got) - expected).abs() < 1e-3,
                    "{mode:?}, frozen {frozen}, {listed:?}: {got} trained, {expected} sampled"
                );
            }
        }
    }
    assert!(sample_next_codes(&loaded.model, &trie, std::slice::from_ref(&prompt), &[9], 1, ds.num_pois() + 1).is_err());
}

/// `grpo-train` in the next-code form: it runs from a semantic adapter, validates by ranking
/// the next code, and refuses raw ids.
#[test]
fn grpo_trains_on_next_codes_and_validates_by_the_beam() {
    let s = Setup::new();
    let warm = sft::run(&s.cfg(&["prompt.ids=semantic", "sft.max_steps=1"]), &quiet()).unwrap();
    let init = format!("grpo.init_adapter={}", warm.stage.dir.join("final").display());
    let sets = [
        "prompt.ids=semantic",
        &init,
        "grpo.form=next",
        "grpo.temperature=1",
        "grpo.grad_prompt_tokens=8",
        "grpo.max_steps=2",
        "grpo.eval_every=2",
    ];
    let cfg = s.cfg(&sets);
    let done = grpo::run(&cfg, &quiet()).unwrap();
    assert!(done.stage.finished);
    let metrics = std::fs::read_to_string(done.stage.dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("reward").is_some()).collect();
    assert_eq!(steps.len(), 2);
    for st in &steps {
        assert_eq!(st["valid"], 1.0, "{st}");
        assert_eq!(st["completion_tokens"].as_f64().unwrap(), codebook(&s).levels() as f64, "{st}");
    }
    let val = lines.iter().find(|l| l.get("val").is_some()).expect("a validation");
    assert_eq!(val["val_invalid_rate"], 0.0, "the beam always ranks valid codes: {val}");

    // Lists of three codes per sample: scored as lists, trained on their probability.
    let run_dir = format!("run_dir={}", s.tmp.path().join("lists").display());
    let lists = grpo::run(&s.cfg(&[&sets[..], &["grpo.codes_per_sample=3", &run_dir]].concat()), &quiet()).unwrap();
    let metrics = std::fs::read_to_string(lists.stage.dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> =
        metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|l| l.get("reward").is_some()).collect();
    assert_eq!(steps.len(), 2);
    for st in &steps {
        assert_eq!(st["valid"], 1.0, "{st}");
        assert_eq!(st["completion_tokens"].as_f64().unwrap(), 3.0 * codebook(&s).levels() as f64, "{st}");
        assert!(st["loss"].as_f64().unwrap().is_finite() && !st["skipped_nonfinite"].as_bool().unwrap(), "{st}");
    }
    let listed = RunConfig::load(Some(&s.config), &["grpo.codes_per_sample=3".into()]).unwrap_err();
    assert!(format!("{listed:#}").contains("grpo.form"), "{listed:#}");

    let raw = RunConfig::load(Some(&s.config), &[init.clone(), "grpo.form=next".into(), "grpo.temperature=1".into()]).unwrap_err();
    assert!(format!("{raw:#}").contains("semantic"), "{raw:#}");
    let hot = RunConfig::load(Some(&s.config), &["prompt.ids=semantic".into(), "grpo.form=next".into(), "grpo.temperature=0.7".into()]);
    assert!(format!("{:#}", hot.unwrap_err()).contains("temperature"));
}

/// The JSON report of an `eval` run that had to succeed.
fn report_of(out: &std::process::Output, report: &Path) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

/// The shipped NYC adapters (`adapters/nyc`, the SFT model, and `adapters/nyc-grpo`, GRPO on
/// ranked lists from it) name POIs by the codes of their `codebook.json`: `preprocess` of the
/// shipped NYC data with configs/nyc.toml rebuilds that file bit for bit, and each adapter adds a
/// token for every code. With the default model, each ranks the fixed test sample of 4 as
/// recorded (the same 10 POIs in the same order, log-probabilities within 1e-3; neighbours in
/// those lists are at least 4e-3 apart): the README's headline rows stay reproducible.
#[test]
fn the_shipped_adapters_rank_as_recorded() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let out = bin()
        .current_dir(root)
        .args(["preprocess", "--config", "configs/nyc.toml", "--quiet", "--set"])
        .arg(format!("data.dir={}", tmp.path().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let num_pois = Dataset::load(tmp.path()).unwrap().num_pois();
    let model = root.join(model::DEFAULT_MODEL);
    for (adapter, fixture) in [("adapters/nyc", "adapters-nyc-test4.json"), ("adapters/nyc-grpo", "adapters-nyc-grpo-test4.json")] {
        let shipped = root.join(adapter);
        assert_eq!(
            std::fs::read(tmp.path().join("codebook.json")).unwrap(),
            std::fs::read(shipped.join("codebook.json")).unwrap(),
            "{adapter}"
        );
        let codebook = Codebook::load(&shipped, num_pois).unwrap();
        let added: std::collections::HashMap<String, u32> =
            serde_json::from_slice(&std::fs::read(shipped.join(ADDED_TOKENS_FILE)).unwrap()).unwrap();
        for token in codebook.tokens() {
            assert!(added.contains_key(&token), "{adapter} adds no token {token}");
        }
        if !model.exists() {
            assert!(std::env::var("CI").is_err(), "CI must fetch the default model (scripts/fetch-model.sh)");
            continue;
        }
        let preds = tmp.path().join("test4.jsonl");
        let out = bin()
            .current_dir(root)
            .args(["--device", "cpu", "--dtype", "f32", "eval", "--split", "test", "--method", "llm", "--limit", "4", "--beam-next", "20"])
            .args(["--adapter", adapter, "--prompt-config", &format!("{adapter}/prompt.toml"), "--quiet", "--data"])
            .arg(tmp.path())
            .arg("--out")
            .arg(tmp.path().join("test4.json"))
            .arg("--predictions")
            .arg(&preds)
            .output()
            .unwrap();
        assert!(out.status.success(), "{adapter}: {}", text(&out.stderr));
        let recorded: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("tests/fixtures").join(fixture)).unwrap()).unwrap();
        let recorded = recorded["instances"].as_object().unwrap();
        let lines = std::fs::read_to_string(&preds).unwrap();
        assert_eq!(lines.lines().count(), recorded.len());
        for line in lines.lines() {
            let p: serde_json::Value = serde_json::from_str(line).unwrap();
            let want = recorded[&p["id"].to_string()].as_array().unwrap();
            let got = &p["detail"]["beam"].as_array().unwrap()[..want.len()];
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g[0], w[0], "{adapter}, instance {}: {got:?} against {want:?}", p["id"]);
                assert!((g[1].as_f64().unwrap() - w[1].as_f64().unwrap()).abs() < 1e-3, "{adapter}, instance {}: {g} against {w}", p["id"]);
            }
        }
    }
}
