//! `refine-poi generate`: a sanity tool — complete one prompt, optionally showing the first
//! step's top logits.

use candle_core::Tensor;
use clap::Args as ClapArgs;
use serde_json::json;

use crate::generate::{SamplingConfig, generate};
use crate::model::{ChatMessage, Mode};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Argmax decoding instead of sampling.
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop once the completion contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Also print the first step's K most likely next tokens with their logits.
    #[arg(long)]
    pub top_logits: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (loaded, _) = args.model.load()?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let text = if args.chat {
        tokenizer.apply_chat_template(&[ChatMessage::new("user", args.prompt.clone())], true)?
    } else {
        args.prompt.clone()
    };
    let ids = tokenizer.encode(&text, !args.chat)?;
    anyhow::ensure!(!ids.is_empty(), "the prompt is empty");
    let mut top = Vec::new();
    if let Some(k) = args.top_logits {
        let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward_last(&input, None, None, Mode::INFERENCE)?.squeeze(0)?.to_vec1::<f32>()?;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        for &id in order.iter().take(k) {
            top.push(json!({ "id": id, "token": tokenizer.decode(&[id], false)?, "logit": logits[id as usize] }));
        }
    }
    let cfg = SamplingConfig {
        greedy: args.greedy,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        max_new_tokens: args.max_new_tokens,
        stop: args.stop.clone(),
        seed: args.seed,
    };
    let out = generate(model, tokenizer, std::slice::from_ref(&ids), 1, &cfg, Mode::INFERENCE)?;
    let completion = &out[0][0];
    if args.json {
        let value = json!({
            "prompt_tokens": ids,
            "completion": completion.text,
            "completion_tokens": completion.tokens,
            "finish": completion.finish,
            "top_logits": top,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("{}", completion.text);
        if !top.is_empty() {
            println!("\nfirst-step top {} tokens:", top.len());
            for t in &top {
                println!("  {:>7}  {:>10.4}  {:?}", t["id"], t["logit"].as_f64().unwrap_or(f64::NAN), t["token"].as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}
