//! A stage's run directory and its checkpoints, shared by SFT and GRPO.
//!
//! ```text
//! {run_dir}/{stage}/
//!   config.toml                 the resolved config (every key)
//!   metrics.jsonl               one line per optimizer step, plus val lines
//!   checkpoints/step-N/         adapter_config.json + adapter_model.safetensors (PEFT layout),
//!                               optimizer.safetensors (AdamW moments), trainer_state.json
//!   checkpoints/last            names the newest checkpoint folder (`step-N`)
//!   best/                       the adapter with the best val MRR, + best.json (its val line)
//!   final/                      the adapter at the end of the run, + final.json
//! ```
//!
//! A checkpoint is written into a temporary folder and renamed into place, then `last` is
//! replaced atomically, so a crash at any point leaves the previous checkpoint usable. Every
//! random draw of training is a pure function of (seed, step, ...), so the step count in
//! `trainer_state.json` is the whole RNG state: a resumed run repeats an uninterrupted one.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::config::Stage;
use super::optim::AdamW;
use crate::fsutil::{rename_durable, sync_folder, write_atomic};
use crate::model::{AdapterBase, CausalLm};
use crate::seed::fnv1a;

/// Name of the resolved config in a stage's run directory.
pub const CONFIG_FILE: &str = "config.toml";
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";
const STATE_VERSION: u32 = 1;

/// The best validation result so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestVal {
    pub step: u64,
    pub mrr: f64,
}

/// Everything besides tensors that a resumed run needs (`trainer_state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    pub format_version: u32,
    /// `sft` or `grpo`.
    pub stage: String,
    /// Optimizer steps completed.
    pub step: u64,
    pub total_steps: u64,
    /// The data cursor: training examples consumed so far (epoch = seen / n, position = seen % n
    /// in that epoch's seeded permutation).
    pub examples_seen: u64,
    /// The seed every random draw derives from, together with `step`.
    pub seed: u64,
    /// FNV-1a of the resolved config: a checkpoint only resumes the config that wrote it.
    pub config_hash: String,
    pub best: Option<BestVal>,
    /// Training time so far (excluding validation), and tokens trained on.
    pub elapsed_s: f64,
    pub tokens_seen: u64,
    /// Optimizer updates so far: fewer than steps when a step had nothing to learn from (every
    /// GRPO group without signal) or was skipped as non-finite, more with several updates a
    /// step. Absent in checkpoints written before it was recorded (then equal to `step`).
    #[serde(default)]
    pub optimizer_updates: Option<u64>,
    /// Steps whose loss or gradient was not finite, so their update was skipped.
    #[serde(default)]
    pub nonfinite_steps: u64,
    /// Stage-specific counters.
    #[serde(default)]
    pub extra: serde_json::Value,
}

impl TrainerState {
    pub fn new(stage: Stage, seed: u64, total_steps: u64, config_hash: String) -> Self {
        TrainerState {
            format_version: STATE_VERSION,
            stage: stage.name().to_string(),
            step: 0,
            total_steps,
            examples_seen: 0,
            seed,
            config_hash,
            best: None,
            optimizer_updates: Some(0),
            nonfinite_steps: 0,
            elapsed_s: 0.0,
            tokens_seen: 0,
            extra: serde_json::Value::Null,
        }
    }
}

/// The stage directory a user names: `path` itself when it holds `config.toml`, else its
/// `grpo/`, else its `sft/` (a run root with both stages means its GRPO stage).
pub fn find_stage_dir(path: &Path) -> Result<PathBuf> {
    if path.join(CONFIG_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for stage in [Stage::Grpo.name(), Stage::Sft.name()] {
        if path.join(stage).join(CONFIG_FILE).is_file() {
            return Ok(path.join(stage));
        }
    }
    anyhow::bail!("{} is not a training run: no config.toml in it or in its grpo/ or sft/", path.display())
}

pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// A fresh run: the folder must not hold checkpoints already; writes the resolved config.
    pub fn create(root: &Path, config_toml: &str) -> Result<RunDir> {
        let dir = RunDir { root: root.to_path_buf() };
        if !dir.step_dirs()?.is_empty() {
            bail!(
                "{} already holds a run with checkpoints: pass --resume to continue it, or choose another run_dir (--set run_dir=...)",
                root.display()
            );
        }
        std::fs::create_dir_all(dir.checkpoints()).with_context(|| format!("cannot create {}", dir.checkpoints().display()))?;
        write_atomic(&root.join(CONFIG_FILE), config_toml.as_bytes())?;
        Ok(dir)
    }

    /// An existing run to resume: its recorded config, spelled out again by `normalize` (so
    /// that keys added since with their defaults do not count as changes), must equal
    /// `config_toml` (the differing keys are named otherwise). Returns the checkpoint to resume
    /// from, if any, and the hash of the recorded config (what its checkpoints carry).
    pub fn open_for_resume(
        root: &Path,
        config_toml: &str,
        normalize: impl FnOnce(&str) -> Result<String>,
    ) -> Result<(RunDir, Option<PathBuf>, String)> {
        let dir = RunDir { root: root.to_path_buf() };
        let path = root.join(CONFIG_FILE);
        let saved = std::fs::read_to_string(&path)
            .with_context(|| format!("nothing to resume in {}: cannot read {}", root.display(), path.display()))?;
        let normalized = normalize(&saved).with_context(|| format!("malformed {}", path.display()))?;
        let diffs = config_diff(&normalized, config_toml).with_context(|| format!("malformed {}", path.display()))?;
        ensure!(
            diffs.is_empty(),
            "the config differs from the one {} was started with ({}): resume with the same config, or start a new run_dir",
            root.display(),
            diffs.join("; ")
        );
        std::fs::create_dir_all(dir.checkpoints())?;
        let latest = dir.resume_point()?;
        Ok((dir, latest, crate::seed::fnv_hex(&saved)))
    }

    /// The checkpoint a resumed run starts from: the newest whose files match its manifest.
    /// `checkpoints/last` names the newest written; a damaged or missing one is passed over,
    /// with a warning, for the next older checkpoint. `None` when there is none at all.
    pub fn resume_point(&self) -> Result<Option<PathBuf>> {
        let mut candidates = self.step_dirs()?;
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut names: Vec<PathBuf> = candidates.into_iter().map(|(_, p)| p).collect();
        if let Some(named) = self.named_last() {
            names.retain(|p| *p != named);
            names.insert(0, named);
        }
        let mut damaged = Vec::new();
        for dir in names {
            match verify_manifest(&dir) {
                Ok(checked) => {
                    if !checked {
                        eprintln!(
                            "warning: checkpoint {} has no manifest (written by an earlier version): its files are not checked",
                            dir.display()
                        );
                    }
                    // Damaged ones leave the rotation (they would count towards keep_checkpoints
                    // and never be pruned, being the newest).
                    for (d, why) in &damaged {
                        let aside = Path::new(d)
                            .with_file_name(format!("damaged-{}", Path::new(d).file_name().map_or("".into(), |n| n.to_string_lossy())));
                        let moved = std::fs::rename(d, &aside).map_or(String::new(), |_| format!("; moved to {}", aside.display()));
                        eprintln!("warning: checkpoint {d} is damaged ({why:#}){moved}: resuming from {} instead", dir.display());
                    }
                    return Ok(Some(dir));
                }
                Err(e) => damaged.push((dir.display().to_string(), e)),
            }
        }
        match damaged.into_iter().next() {
            Some((dir, why)) => Err(why.context(format!("no intact checkpoint to resume from: the newest, {dir}, is damaged"))),
            None => Ok(None),
        }
    }

    /// The folder `checkpoints/last` names, if it names a step folder at all.
    fn named_last(&self) -> Option<PathBuf> {
        let name = std::fs::read_to_string(self.checkpoints().join("last")).ok()?;
        let name = name.trim();
        (name.starts_with("step-") && !name.contains('/') && !name.contains("..")).then(|| self.checkpoints().join(name))
    }

    /// The `step-N` folders, with N.
    fn step_dirs(&self) -> Result<Vec<(u64, PathBuf)>> {
        let Ok(entries) = std::fs::read_dir(self.checkpoints()) else { return Ok(Vec::new()) };
        Ok(entries
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().strip_prefix("step-")?.parse::<u64>().ok()?;
                Some((n, e.path()))
            })
            .collect())
    }

    /// Writes checkpoint `step` (adapter, optimizer, state) atomically, points `last` at it,
    /// and keeps only the newest `keep` checkpoints (0 = all).
    pub fn save_checkpoint(
        &self,
        model: &CausalLm,
        base_model: &AdapterBase,
        opt: &AdamW,
        state: &TrainerState,
        keep: usize,
    ) -> Result<PathBuf> {
        let name = format!("step-{}", state.step);
        let ckpts = self.checkpoints();
        let tmp = ckpts.join(format!(".tmp-{name}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        model.save_adapter(&tmp, base_model)?;
        opt.save(&tmp.join(OPTIMIZER_FILE))?;
        let state = TrainerState { optimizer_updates: Some(opt.updates()), ..state.clone() };
        write_atomic(&tmp.join(STATE_FILE), serde_json::to_string_pretty(&state)?.as_bytes())?;
        write_manifest(&tmp)?;
        sync_folder(&tmp)?;
        let dir = ckpts.join(&name);
        if dir.exists() {
            // The same step written again (a resumed run passing it once more): replace it.
            std::fs::remove_dir_all(&dir)?;
        }
        rename_durable(&tmp, &dir)?;
        write_atomic(&ckpts.join("last"), name.as_bytes())?;
        if keep > 0 {
            let mut steps = self.step_dirs()?;
            steps.sort();
            let excess = steps.len().saturating_sub(keep);
            for (n, path) in steps.into_iter().take(excess) {
                if n != state.step {
                    std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove old checkpoint {}", path.display()))?;
                }
            }
        }
        Ok(dir)
    }

    /// The state and log a stage's loop starts from: restored from the checkpoint `latest` (which
    /// must plan the same `total` steps) with the log cut back to it, or fresh. A rank that does
    /// not write (`writer` false) gets a log that discards its lines.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_or_start(
        &self,
        writer: bool,
        latest: Option<&Path>,
        model: &mut CausalLm,
        opt: &mut AdamW,
        stage: Stage,
        seed: u64,
        total: u64,
        config_hash: &str,
    ) -> Result<(TrainerState, MetricsLog)> {
        match latest {
            Some(dir) => {
                let state = RunDir::load_checkpoint(dir, model, opt, stage, config_hash)?;
                ensure!(state.total_steps == total, "checkpoint {} plans {} steps, this config {total}", dir.display(), state.total_steps);
                let log = if writer { MetricsLog::resume(&self.metrics(), state.step)? } else { MetricsLog::discard() };
                Ok((state, log))
            }
            None => {
                let log = if writer { MetricsLog::create(&self.metrics())? } else { MetricsLog::discard() };
                Ok((TrainerState::new(stage, seed, total, config_hash.to_string()), log))
            }
        }
    }

    /// Restores the checkpoint in `dir` into `model` (its adapter), `opt` and returns its state;
    /// `config_hash` and `stage` must match. A missing, malformed or mismatched piece is an
    /// error naming the checkpoint.
    pub fn load_checkpoint(dir: &Path, model: &mut CausalLm, opt: &mut AdamW, stage: Stage, config_hash: &str) -> Result<TrainerState> {
        let ctx = || format!("cannot resume from checkpoint {}", dir.display());
        verify_manifest(dir).with_context(ctx)?;
        let state_path = dir.join(STATE_FILE);
        let text =
            std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display())).with_context(ctx)?;
        let state: TrainerState =
            serde_json::from_str(&text).with_context(|| format!("{} is corrupt", state_path.display())).with_context(ctx)?;
        ensure!(
            state.format_version == STATE_VERSION,
            "{}: format version {} (expected {STATE_VERSION})",
            state_path.display(),
            state.format_version
        );
        ensure!(state.stage == stage.name(), "{} is a {} checkpoint, not {}", dir.display(), state.stage, stage.name());
        ensure!(
            state.config_hash == config_hash,
            "checkpoint {} was written with a different config (hash {} vs {config_hash})",
            dir.display(),
            state.config_hash
        );
        model.load_adapter(dir).with_context(ctx)?;
        // The optimizer must track the freshly loaded variables.
        let hp = opt.hp;
        *opt = AdamW::new(model.lora_vars(), hp)?;
        opt.load(&dir.join(OPTIMIZER_FILE)).with_context(ctx)?;
        let updates = state.optimizer_updates.unwrap_or(state.step);
        ensure!(
            opt.updates() == updates,
            "checkpoint {} is inconsistent: the optimizer has {} updates, the state says {updates}",
            dir.display(),
            opt.updates(),
        );
        Ok(state)
    }

    /// Replaces `{root}/{name}/` (`best`, `final`) with the current adapter and `info` (as
    /// `{name}.json`, e.g. the val metrics), through a temporary folder.
    pub fn save_adapter_copy(&self, name: &str, model: &CausalLm, base_model: &AdapterBase, info: &serde_json::Value) -> Result<PathBuf> {
        let dest = self.root.join(name);
        let tmp = self.root.join(format!(".tmp-{name}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        model.save_adapter(&tmp, base_model)?;
        write_atomic(&tmp.join(format!("{name}.json")), serde_json::to_string_pretty(info)?.as_bytes())?;
        sync_folder(&tmp)?;
        let old = self.root.join(format!(".old-{name}"));
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        if dest.exists() {
            std::fs::rename(&dest, &old)?;
        }
        rename_durable(&tmp, &dest)?;
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        Ok(dest)
    }
}

/// What a checkpoint holds, written last into it: each file's size and FNV-1a hash, so that a
/// truncated, edited or missing file is found before anything is loaded.
const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FileEntry {
    bytes: u64,
    fnv1a: String,
}

fn file_entry(path: &Path) -> Result<FileEntry> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(FileEntry { bytes: bytes.len() as u64, fnv1a: format!("{:016x}", fnv1a(&bytes)) })
}

/// Writes `dir`'s manifest: every file in it but the manifest itself.
pub fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != MANIFEST_FILE && e.path().is_file() {
            files.insert(name, file_entry(&e.path())?);
        }
    }
    write_atomic(&dir.join(MANIFEST_FILE), serde_json::to_string_pretty(&files)?.as_bytes())
}

/// Checks every file `dir`'s manifest lists; the first that is missing or differs is named.
/// `false`: the checkpoint has no manifest at all (written before they were recorded), so
/// nothing could be checked.
pub fn verify_manifest(dir: &Path) -> Result<bool> {
    ensure!(dir.is_dir(), "{} does not exist", dir.display());
    let path = dir.join(MANIFEST_FILE);
    if !path.exists() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let files: std::collections::BTreeMap<String, FileEntry> =
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
    for (name, want) in &files {
        let file = dir.join(name);
        ensure!(file.is_file(), "{} is missing", file.display());
        let got = file_entry(&file)?;
        ensure!(
            got.bytes == want.bytes,
            "{} has {} bytes, its manifest says {}: truncated or changed",
            file.display(),
            got.bytes,
            want.bytes
        );
        ensure!(
            got == *want,
            "{} does not match its manifest (hash {} vs {}): changed after it was written",
            file.display(),
            got.fnv1a,
            want.fnv1a
        );
    }
    Ok(true)
}

/// Keys whose values differ between two TOML documents, as `key: a -> b`.
pub fn config_diff(a: &str, b: &str) -> Result<Vec<String>> {
    let a: toml::Value = toml::Value::Table(toml::from_str(a)?);
    let b: toml::Value = toml::Value::Table(toml::from_str(b)?);
    let mut out = Vec::new();
    fn walk(prefix: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&p, x.get(k), y.get(k), out);
                }
            }
            (x, y) if x == y => {}
            (x, y) => {
                let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
                out.push(format!("{prefix}: {} -> {}", show(x), show(y)));
            }
        }
    }
    walk("", Some(&a), Some(&b), &mut out);
    Ok(out)
}

/// `metrics.jsonl`: one JSON object per line, flushed as written.
pub struct MetricsLog {
    /// None: a log that discards (the ranks other than 0).
    file: Option<std::fs::File>,
}

impl MetricsLog {
    pub fn discard() -> MetricsLog {
        MetricsLog { file: None }
    }

    /// A new, empty log.
    pub fn create(path: &Path) -> Result<MetricsLog> {
        let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(MetricsLog { file: Some(file) })
    }

    /// The log of a resumed run: lines of steps after `step` (written after the checkpoint the
    /// run resumes from) are dropped, so the log reads as if the run had never stopped.
    pub fn resume(path: &Path, step: u64) -> Result<MetricsLog> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut kept = String::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s <= step) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsLog { file: Some(file) })
    }

    pub fn log(&mut self, value: &serde_json::Value) -> Result<()> {
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let mut line = serde_json::to_string(value)?;
        line.push('\n');
        file.write_all(line.as_bytes())?;
        file.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_diff_names_keys() {
        let d = config_diff("a = 1\n[s]\nx = 2\ny = 3\n", "a = 1\n[s]\nx = 5\nz = 1\n").unwrap();
        assert_eq!(d, vec!["s.x: 2 -> 5", "s.y: 3 -> (unset)", "s.z: (unset) -> 1"]);
        assert!(config_diff("a = 1", "a = 1").unwrap().is_empty());
    }

    #[test]
    fn metrics_log_resume_drops_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::create(&path).unwrap();
        for s in 1..=5u64 {
            log.log(&serde_json::json!({"step": s})).unwrap();
        }
        drop(log);
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"step\": 6, \"trunc").unwrap();
        let mut log = MetricsLog::resume(&path, 3).unwrap();
        log.log(&serde_json::json!({"step": 4, "again": true})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> =
            text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
    }
}
