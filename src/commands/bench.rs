//! `refine-poi bench`: speed and memory of the model on this machine, printed as JSON.
//! Prefill of one long prompt, then decoding at batch 1 and at batch G (G samples sharing the
//! prompt's one prefill), every step running the full model (EOS is ignored so runs are equal).
//! Then this machine's own GEMM rate at the model's shapes ([`super::bench_gemm`]) and each
//! phase's share of it, with the instruction sets found. `--grpo` times one GRPO step,
//! `--eval` the evaluation of a val sample and `--sft` steps of the SFT warm-up.

use std::time::Instant;

use candle_core::Tensor;
use clap::Args as ClapArgs;
use serde_json::json;

use super::bench_gemm::{Weights, cpu_features, decode_weights, gemm_at_model_shapes, prefill_flops_per_token};
use crate::generate::argmax;
use crate::model::{self, CausalLm, KvCache, Mode};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[arg(long, default_value = model::DEFAULT_MODEL)]
    pub model: String,
    /// Length of the prefilled prompt.
    #[arg(long, default_value_t = 400)]
    pub prompt_tokens: usize,
    /// Decoding steps measured per run.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Batch size of the batched decode (samples of one prompt).
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Benchmark one GRPO step instead (G = --samples completions of each of --prompts
    /// prompts of --prompt-tokens, up to --new-tokens each, LoRA r = 8 on all seven projections, beta = 0.04), and
    /// the prefix-shared training forward against an unshared one.
    #[arg(long)]
    pub grpo: bool,
    /// Prompts (groups of --samples) in the benchmarked GRPO step.
    #[arg(long, default_value_t = 1)]
    pub prompts: usize,
    /// Time `eval` instead: the model (with --adapter) greedily answering the fixed sample of
    /// --limit instances of --data's val split, as `eval --limit` picks it, at eval's batch. Prints
    /// instances/s and the projected minutes for the dataset's full test split.
    #[arg(long, requires = "data", conflicts_with = "grpo")]
    pub eval: bool,
    #[command(flatten)]
    pub eval_args: EvalBenchArgs,
    /// Time `sft-warmup` instead: --steps optimizer steps of --config's SFT stage (its model and
    /// starting adapter), --repeats times, in a temporary run directory. Prints the training
    /// tokens/s of the steps after each run's first (the median run), its GFLOP/s and share of
    /// this machine's GEMM rate, and the projected hours of one epoch.
    #[arg(long, requires = "config", conflicts_with_all = ["grpo", "eval"])]
    pub sft: bool,
    #[command(flatten)]
    pub sft_args: super::bench_sft::SftBenchArgs,
}

/// What `bench --eval` evaluates.
#[derive(ClapArgs, Debug)]
pub struct EvalBenchArgs {
    /// Dataset directory written by `refine-poi preprocess`.
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// A LoRA adapter folder (PEFT layout).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// Prompt options from a TOML file, as `eval --prompt-config` (e.g. configs/nyc.toml).
    #[arg(long)]
    pub prompt_config: Option<std::path::PathBuf>,
    /// Val instances timed.
    #[arg(long, default_value_t = 32)]
    pub limit: usize,
    /// Tokens the model may generate per answer, as `eval --max-new-tokens`.
    #[arg(long, default_value_t = 96)]
    pub max_new_tokens: usize,
    /// Constrained decoding, as `eval --constrained`.
    #[arg(long)]
    pub constrained: bool,
    /// Rank by beam search over the next code, as `eval --beam-next`.
    #[arg(long, conflicts_with = "constrained")]
    pub beam_next: Option<usize>,
}

/// `bench --eval`: `eval`'s own loop on a fixed val sample, timed.
fn eval_bench(args: &Args) -> anyhow::Result<()> {
    use crate::data::{Dataset, Split};
    use crate::eval::{EvalOptions, evaluate};
    let e = &args.eval_args;
    let data = e.data.as_deref().ok_or_else(|| anyhow::anyhow!("bench --eval needs --data"))?;
    anyhow::ensure!(e.limit > 0, "--limit must be positive");
    let ds = Dataset::load_splits(data, &[Split::Val, Split::Test])?;
    let llm = super::eval::LlmArgs {
        model: super::ModelArgs { model: args.model.clone(), adapter: e.adapter.clone() },
        max_new_tokens: e.max_new_tokens,
        prompt_config: e.prompt_config.clone(),
        k: None,
        constrained: e.constrained,
        beam_next: e.beam_next,
        ids: None,
    };
    let batch = llm.default_batch_size();
    let mut rec = llm.recommender(batch)?;
    let opts = EvalOptions { batch_size: None, top_n: 0, keep_results: true, quiet: true, limit: Some(e.limit) };
    let (report, results) = evaluate(&ds, Split::Val, &mut rec, &opts)?;
    let mean = |key: &str| -> f64 {
        let xs: Vec<f64> = results.iter().filter_map(|r| r.detail.as_ref()?.get(key)?.as_f64()).collect();
        xs.iter().sum::<f64>() / xs.len().max(1) as f64
    };
    let test = ds.instances(Split::Test).len();
    let out = json!({
        "model": rec.name,
        "device": format!("{:?}", rec.loaded.model.device()),
        "dtype": format!("{:?}", rec.loaded.model.dtype()),
        "threads": rayon::current_num_threads(),
        "cpu": cpu_features(),
        "split": "val",
        "instances": report.instances,
        "batch_size": batch,
        "max_new_tokens": e.max_new_tokens,
        "constrained": e.constrained,
        "mean_prompt_tokens": mean("prompt_tokens"),
        "mean_completion_tokens": mean("completion_tokens"),
        "invalid_rate": report.invalid_rate,
        "seconds": report.elapsed_s,
        "instances_per_s": report.instances_per_s,
        "test_instances": test,
        "projected_test_minutes": test as f64 / report.instances_per_s / 60.0,
        "peak_rss_mib": peak_rss_mib(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Peak resident memory of this process in MiB (Linux), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn prefill(model: &CausalLm, prompt: &[u32], extra: usize) -> anyhow::Result<(KvCache, u32, f64)> {
    let mut cache = model.new_cache(prompt.len() + extra);
    let ids = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let start = Instant::now();
    let logits = model.forward_last(&ids, None, Some(&mut cache), Mode::INFERENCE)?.squeeze(0)?.to_vec1::<f32>()?;
    Ok((cache, argmax(&logits), start.elapsed().as_secs_f64()))
}

/// Seconds for `steps` decoding steps of `rows` rows continuing `cache`.
fn decode(model: &CausalLm, mut cache: KvCache, first: u32, rows: usize, steps: usize) -> anyhow::Result<f64> {
    let mut next = vec![first; rows];
    let start = Instant::now();
    for _ in 0..steps {
        let ids = Tensor::new(next.as_slice(), model.device())?.unsqueeze(1)?;
        let logits = model.forward_last(&ids, None, Some(&mut cache), Mode::INFERENCE)?.to_vec2::<f32>()?;
        next = logits.iter().map(|row| argmax(row)).collect();
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds for the forward and backward of one group's completion log-likelihood, with the
/// prompt shared (computed once for the group) or not: each of the G sequences (prompt +
/// completion) run on its own, the prompt recomputed every time, gradients accumulated.
fn training_forward_seconds(model: &CausalLm, prompt: &[u32], tokens: &Tensor, shared: bool) -> anyhow::Result<f64> {
    let start = Instant::now();
    if shared {
        let logp = crate::train::grpo::loss::group_logprobs(model, prompt, tokens, None, 0, Mode::TRAIN)?;
        let _grads = logp.sum_all()?.backward()?;
    } else {
        let (g, c) = tokens.dims2()?;
        for row in 0..g {
            let completion = tokens.get(row)?.to_vec1::<u32>()?;
            let ids: Vec<u32> = prompt.iter().copied().chain(completion).collect();
            let seq = crate::train::ScoredSeq::answer(ids, prompt.len());
            let logp = crate::train::scored_logprobs(model, &[seq], Mode::TRAIN)?;
            debug_assert_eq!(logp.dim(0)?, c);
            let _grads = logp.sum_all()?.backward()?;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

fn grpo_bench(args: &Args, mut loaded: crate::model::LoadedModel, prompt: Vec<u32>) -> anyhow::Result<()> {
    use crate::train::grpo::loss::{LossConfig, StepConfig, completion_tensors, step};
    use crate::train::optim::{AdamW, AdamWParams};
    let lora = crate::model::LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, ..Default::default() };
    loaded.model.attach_lora(&lora, 0)?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let cfg = StepConfig {
        group: args.samples,
        loss: LossConfig { beta: 0.04, max_completion_tokens: args.new_tokens, ..Default::default() },
        sampling: crate::generate::SamplingConfig { max_new_tokens: args.new_tokens, temperature: 1.0, ..Default::default() },
        constraint: None,
        next_code: None,
        grad_prompt_tokens: 0,
        scale_rewards: true,
        skip_zero_signal: false,
        updates_per_batch: 1,
        max_grad_norm: 1.0,
    };
    let mut opt = AdamW::new(model.lora_vars(), AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 })?;
    // A reward that varies between samples (digits in the completion), so no group is skipped.
    let mut reward = |_: usize, c: &crate::generate::Completion| -> anyhow::Result<f64> {
        Ok(c.text.chars().filter(char::is_ascii_digit).count() as f64)
    };
    let prompts = vec![prompt.clone(); args.prompts];
    let mut steps = Vec::new();
    for r in 0..args.repeats {
        let seeds: Vec<u64> = (0..args.prompts).map(|p| (r * args.prompts + p) as u64).collect();
        let start = Instant::now();
        let report = step(model, tokenizer, &prompts, &seeds, &mut reward, &cfg, &mut opt, 1e-5, None, &crate::dist::Dist::single())?;
        steps.push((start.elapsed().as_secs_f64(), report));
    }
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (secs, report) = &steps[steps.len() / 2];
    // Shared against unshared training forward on the same sampled completions.
    let completions = crate::generate::generate(model, tokenizer, &prompts[..1], args.samples, &cfg.sampling, Mode::INFERENCE)?;
    let eos = tokenizer.eos_ids.first().copied().unwrap_or(0);
    let (tokens, _) = completion_tensors(&completions[0], eos, eos, model.device(), model.dtype())?;
    let shared = training_forward_seconds(model, &prompt, &tokens, true)?;
    let shared_rss = peak_rss_mib();
    let unshared = training_forward_seconds(model, &prompt, &tokens, false)?;
    let report = json!({
        "model": loaded.source,
        "device": format!("{:?}", model.device()),
        "dtype": format!("{:?}", model.dtype()),
        // `--quantized-base`: decoding (up to 16 rows) read the GGUF's blocks, prefill the f32 weights.
        "quantized_base_bytes": model.quantized_base_bytes(),
        "threads": rayon::current_num_threads(),
        "prompts": args.prompts,
        "group": args.samples,
        "prompt_tokens": prompt.len(),
        "max_new_tokens": args.new_tokens,
        "mean_completion_tokens": report.completion_tokens.iter().sum::<usize>() as f64 / report.completion_tokens.len() as f64,
        "lora": { "r": 8, "targets": 7 },
        "beta": 0.04,
        "step_seconds": secs,
        "breakdown_seconds": report.times,
        "training_forward_backward_seconds": { "prefix_shared": shared, "unshared": unshared, "speedup": unshared / shared },
        "peak_rss_mib_step_and_shared_forward": shared_rss,
        "peak_rss_mib_with_unshared_forward": peak_rss_mib(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.repeats > 0 && args.samples > 0 && args.new_tokens > 0 && args.prompts > 0,
        "repeats, samples, prompts and new-tokens must be positive"
    );
    if args.eval {
        return eval_bench(&args);
    }
    if args.sft {
        return super::bench_sft::run(&args.sft_args, args.repeats);
    }
    let load_start = Instant::now();
    let loaded = model::load(&args.model)?;
    let load_s = load_start.elapsed().as_secs_f64();
    let model = &loaded.model;
    // A check-in history like the prompts refine-poi builds, cut to the requested length.
    let sentence = "At 2012-04-03 18:00 (Tuesday), POI 3695 (Coffee Shop); ";
    let mut prompt = Vec::new();
    while prompt.len() < args.prompt_tokens {
        prompt.extend(loaded.tokenizer.encode(sentence, false)?);
    }
    prompt.truncate(args.prompt_tokens);
    // Warm-up: first calls allocate and fault in the weights.
    let (cache, first, _) = prefill(model, &prompt, args.new_tokens)?;
    decode(model, cache, first, 1, 2)?;

    if args.grpo {
        return grpo_bench(&args, loaded, prompt);
    }
    let (mut prefill_s, mut decode1_s, mut decode_g_s) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        let (cache, first, secs) = prefill(model, &prompt, args.new_tokens)?;
        prefill_s.push(secs);
        let batch = KvCache::share(&[&cache], &vec![0; args.samples], args.new_tokens)?;
        decode1_s.push(decode(model, cache, first, 1, args.new_tokens)?);
        decode_g_s.push(decode(model, batch, first, args.samples, args.new_tokens)?);
    }
    let (p, d1, dg) = (median(prefill_s), median(decode1_s), median(decode_g_s));
    let prefill_tps = args.prompt_tokens as f64 / p;
    let decode1 = args.new_tokens as f64 / d1;
    let decode_g = (args.new_tokens * args.samples) as f64 / dg;
    // This machine's GEMM rate at the model's shapes, and how much of it each phase reaches.
    let cfg = &model.config;
    let gemm = |rows: usize, weights: Weights| gemm_at_model_shapes(cfg, rows, args.repeats, model.device(), model.dtype(), weights);
    let gemm_prefill = gemm(args.prompt_tokens, Weights::Dense)?;
    let gemm_decode = gemm(args.samples, Weights::Dense)?;
    // The same products on Q8_0 weights (CPU): a quantised base pays only where these beat the
    // dense rates, which on 2 AVX2/AVX-512 cores is at one row only (docs/performance.md).
    let quantized = if model.device().is_cpu() {
        json!({
            "gemm_at_one_row": gemm(1, Weights::Q8_0)?,
            "gemm_at_decode_batch_shapes": gemm(args.samples, Weights::Q8_0)?,
            "gemm_at_prefill_shapes": gemm(args.prompt_tokens, Weights::Q8_0)?,
        })
    } else {
        serde_json::Value::Null
    };
    // The same products in bf16 (AMX tiles or AVX512-BF16), where the CPU has either: the
    // rate `--bf16-prefill` prefills against.
    let tiles = if model.device().is_cpu() && crate::model::bf16::Isa::detect().is_some() {
        gemm(args.prompt_tokens, Weights::Bf16)?
    } else {
        serde_json::Value::Null
    };
    let prefill_gflops = prefill_tps * prefill_flops_per_token(cfg, args.prompt_tokens) / 1e9;
    // A decoding step's FLOPs per row: the linear layers and the LM head (attention is small).
    let decode_flops = 2.0 * decode_weights(cfg);
    let decode_g_gflops = decode_g * decode_flops / 1e9;
    let limit = |g: &serde_json::Value| g["gflops_layer"].as_f64().unwrap_or(f64::NAN);
    let report = json!({
        "model": loaded.source,
        "device": format!("{:?}", model.device()),
        "dtype": format!("{:?}", model.dtype()),
        // `--quantized-base`: decoding (up to 16 rows) read the GGUF's blocks, prefill the f32 weights.
        "quantized_base_bytes": model.quantized_base_bytes(),
        // `--bf16-prefill`: prompts multiplied in bf16 (`cpu.bf16_kernels`) from these weights.
        "bf16_prefill_bytes": model.bf16_prefill_bytes(),
        "threads": rayon::current_num_threads(),
        "load_seconds": load_s,
        "prompt_tokens": args.prompt_tokens,
        "prefill_tokens_per_s": args.prompt_tokens as f64 / p,
        "decode_batch1_tokens_per_s": decode1,
        "decode_batch_samples": args.samples,
        "decode_batch_tokens_per_s": decode_g,
        "decode_batch_speedup": decode_g / decode1,
        "new_tokens": args.new_tokens,
        "peak_rss_mib": peak_rss_mib(),
        "cpu": cpu_features(),
        "gemm_at_prefill_shapes": gemm_prefill,
        "gemm_at_decode_batch_shapes": gemm_decode,
        "gemm_at_one_row": gemm(1, Weights::Dense)?,
        "q8_0_weights": quantized,
        "bf16_at_prefill_shapes": tiles,
        "prefill_gflops": prefill_gflops,
        "prefill_share_of_gemm": prefill_gflops / limit(&gemm_prefill),
        "prefill_share_of_bf16": prefill_gflops / limit(&tiles),
        "decode_batch_gflops": decode_g_gflops,
        "decode_batch_share_of_gemm": decode_g_gflops / limit(&gemm_decode),
        // Batch 1 is bound by reading the weights: their bytes read per second.
        "decode_batch1_weight_gb_per_s": decode1 * model.decode_weight_bytes() as f64 / 1e9,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
