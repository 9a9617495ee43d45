//! What the training tests share: the binary, and a tiny model with a small preprocessed
//! dataset and a run config using both (short prompts, a few steps of each stage).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use refine_poi::model::tiny::{tiny_config, write_tiny_model};
use refine_poi::train::RunOptions;
use refine_poi::train::config::RunConfig;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_refine-poi"))
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

/// A success: its stdout.
pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    text(&out.stdout)
}

/// A user error: non-zero exit, exactly one `error:` line, no panic; returns that line.
pub fn error_line(out: &Output) -> String {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line: {err}");
    errors[0].to_string()
}

/// An adapter's tensors, bit for bit, by name: what two runs must agree on (the file's
/// metadata also records where the base model was loaded from, which differs between setups).
pub fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(k, v)| (k, v.data().to_vec())).collect();
    out.sort();
    out
}

/// A tiny SFT warm-up that teaches `<answer>id</answer>` (4 examples, 30 steps), so that sampled
/// answers parse and their rewards can differ within a group: a random tiny model never writes
/// an answer tag.
pub const WARM_UP: [&str; 7] = [
    "data.train_instances=4",
    "sft.max_steps=30",
    "sft.lr=2e-2",
    "sft.answer=single",
    "sft.min_lr_ratio=1.0",
    "sft.save_every=0",
    "lora.dropout=0.0",
];

/// The values of `key` in a run's `metrics.jsonl`, in order (lines without it skipped).
pub fn logged(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64())
        .collect()
}

/// An adapter folder's tensors as f32 values by name (sorted); every one must be stored as f32.
pub fn adapter_f32(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{k} is not f32");
            (k, v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Training options without a progress bar.
pub fn quiet() -> RunOptions {
    RunOptions { quiet: true, ..Default::default() }
}

/// A tiny model folder, a small preprocessed dataset, and a config file using both.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub config: PathBuf,
}

impl Setup {
    pub fn new() -> Setup {
        Setup::of("llama")
    }

    /// The same with a tiny model of another family (`qwen2`: q/k/v biases, untied head).
    pub fn of(model_type: &str) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("tiny");
        write_tiny_model(&model, &tiny_config(model_type), 3).unwrap();
        let data = tmp.path().join("data");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tsmc2014_synthetic.txt");
        let out = bin()
            .args(["preprocess", "--format", "foursquare", "--quiet", "--input"])
            .arg(&fixture)
            .arg("--out")
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        // Short prompts (the tiny tokenizer has one token per byte), small steps, no validation.
        let config = tmp.path().join("sft.toml");
        let body = format!(
            r#"run_dir = "{run}"
[model]
path = "{model}"
[data]
dir = "{data}"
train_instances = 6
[prompt]
k = 3
long_term = false
categories = false
times = false
max_prompt_tokens = 0
system_message = "Next POI."
[lora]
r = 4
alpha = 8
dropout = 0.1
targets = ["q", "k", "v", "o", "gate", "up", "down"]
[sft]
answer = "list"
lr = 5e-3
warmup_steps = 2
batch_size = 2
grad_accum = 2
max_steps = 6
eval_every = 0
eval_instances = 4
eval_batch_size = 4
eval_max_new_tokens = 12
save_every = 2
keep_checkpoints = 2
seed = 11
[grpo]
init_adapter = "none"
group = 4
prompts_per_step = 2
max_new_tokens = 10
temperature = 1.5
lr = 1e-2
max_steps = 4
eval_every = 0
eval_instances = 4
eval_batch_size = 4
eval_max_new_tokens = 12
save_every = 2
keep_checkpoints = 2
seed = 5
"#,
            run = tmp.path().join("runs").display(),
            model = model.display(),
            data = data.display()
        );
        std::fs::write(&config, body).unwrap();
        Setup { tmp, config }
    }

    pub fn cfg(&self, sets: &[&str]) -> RunConfig {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::load(Some(&self.config), &sets).unwrap()
    }
}
