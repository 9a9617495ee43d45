//! `adapter_config.json` read as PEFT reads it: which modules an adapter targets (a list of
//! names matched as suffixes, a regex string matched against the whole module name,
//! `layers_to_transform` / `layers_pattern`) and each module's rank and alpha
//! (`rank_pattern`, `alpha_pattern`, rsLoRA). A key this reader does not apply is refused
//! unless it holds its "off" value, so an adapter is never applied differently from PEFT.
//!
//! Module names are the model's own (`model.layers.0.self_attn.q_proj`), as PEFT matches them.

use anyhow::{Context, Result, bail, ensure};
use regex::Regex;
use serde_json::Value;

use super::lora::ALL_TARGETS;

/// Keys that describe how an adapter was made or where its base lives, not what it computes.
const METADATA_KEYS: &[&str] = &[
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    // Initialisation only: a saved adapter's factors are what they are.
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    // Megatron's parallel layers, and QALoRA's group size (QALoRA itself must be off).
    "megatron_config",
    "megatron_core",
    "qalora_group_size",
];

/// The keys applied below.
const APPLIED_KEYS: &[&str] = &[
    "peft_type",
    "trainable_token_indices",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "use_rslora",
    "bias",
];

/// Which modules get an adapter.
#[derive(Debug)]
enum Targets {
    /// Module names (or their last dotted parts): a module matches one exactly, or ends with
    /// `.name`; only the latter is filtered by `layers_to_transform`.
    Names(Vec<String>),
    /// A regex the whole module name must match.
    Regex(Regex),
}

/// An adapter's configuration, as it applies to each module.
#[derive(Debug)]
pub struct PeftSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    targets: Targets,
    /// `(key, its regex)` in the file's (sorted) key order: the first match wins, as in PEFT.
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
    layers: Option<Vec<usize>>,
    layers_pattern: Vec<Regex>,
    /// `trainable_token_indices`: embedding rows the adapter replaces (PEFT's trainable
    /// tokens; a tied output head follows the embedding).
    pub trainable_tokens: Vec<u32>,
}

/// A value that switches nothing on.
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

/// PEFT's pattern match (`get_pattern_key`): the key as a regex matching the whole name or
/// its part after a dot.
fn pattern_regex(key: &str) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).with_context(|| format!("pattern key `{key}` is not a regex this reader accepts"))
}

/// `trainable_token_indices` as PEFT writes it: a list (the input embedding's rows), or
/// `{"embed_tokens": [...]}`, with an `lm_head` entry only when it names the same rows (tied).
fn trainable_token_indices(v: Option<&Value>, what: &str) -> Result<Vec<u32>> {
    let ids = |v: &Value| -> Result<Vec<u32>> {
        let list = v.as_array().with_context(|| format!("{what}: trainable_token_indices must list token ids"))?;
        list.iter()
            .map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()).with_context(|| format!("{what}: trainable token id {i} is not an id")))
            .collect()
    };
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(_)) => ids(v.unwrap()),
        Some(Value::Object(o)) => {
            let embed = o.get("embed_tokens").map(ids).transpose()?.unwrap_or_default();
            for (k, val) in o {
                ensure!(
                    k == "embed_tokens" || (k == "lm_head" && ids(val)? == embed),
                    "{what}: trainable tokens of `{k}` are not supported (only the input embedding, with a tied output head)"
                );
            }
            Ok(embed)
        }
        Some(other) => bail!("{what}: trainable_token_indices must be a list or an object, not {other}"),
    }
}

impl PeftSpec {
    /// Parses and checks `adapter_config.json`'s JSON; `what` names the file in errors.
    pub fn parse(v: &Value, what: &str) -> Result<PeftSpec> {
        let obj = v.as_object().with_context(|| format!("{what} is not a JSON object"))?;
        for (k, val) in obj {
            if !APPLIED_KEYS.contains(&k.as_str()) && !METADATA_KEYS.contains(&k.as_str()) && !is_off(val) {
                bail!("{what}: `{k}` = {val} is not supported: this adapter would not be applied as PEFT applies it");
            }
        }
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let peft_type = get("peft_type").and_then(Value::as_str).unwrap_or("");
        ensure!(peft_type == "LORA", "{what}: peft_type is '{peft_type}', only LORA adapters are supported");
        if let Some(bias) = get("bias") {
            ensure!(bias.as_str() == Some("none"), "{what}: bias = {bias} is not supported (only \"none\")");
        }
        let r = get("r").and_then(Value::as_u64).filter(|&r| r > 0).with_context(|| format!("{what}: `r` must be a positive integer"))?
            as usize;
        let alpha = get("lora_alpha").and_then(Value::as_f64).with_context(|| format!("{what}: `lora_alpha` must be a number"))?;
        let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let use_rslora = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        let targets = match get("target_modules") {
            Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => {
                Targets::Names(ALL_TARGETS.iter().map(|t| t.to_string()).collect())
            }
            Some(Value::String(s)) => Targets::Regex(
                Regex::new(&format!("^(?:{s})$"))
                    .with_context(|| format!("{what}: target_modules `{s}` is not a regex this reader accepts"))?,
            ),
            Some(Value::Array(a)) => Targets::Names(
                a.iter()
                    .map(|t| t.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .with_context(|| format!("{what}: target_modules must be strings"))?,
            ),
            _ => bail!("{what}: `target_modules` must be a list of module names or a regex string"),
        };
        let pattern = |k: &str| -> Result<Vec<(Regex, Value)>> {
            match get(k) {
                None => Ok(Vec::new()),
                Some(Value::Object(m)) => {
                    m.iter().map(|(key, val)| Ok((pattern_regex(key).with_context(|| format!("{what}: {k}"))?, val.clone()))).collect()
                }
                Some(other) => bail!("{what}: `{k}` must be an object, not {other}"),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(re, v)| {
                Ok((
                    re,
                    v.as_u64().filter(|&r| r > 0).with_context(|| format!("{what}: rank_pattern ranks must be positive integers"))?
                        as usize,
                ))
            })
            .collect::<Result<_>>()?;
        let alpha_pattern = pattern("alpha_pattern")?
            .into_iter()
            .map(|(re, v)| Ok((re, v.as_f64().with_context(|| format!("{what}: alpha_pattern values must be numbers"))?)))
            .collect::<Result<_>>()?;
        let layers = match get("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => {
                Some(vec![n.as_u64().with_context(|| format!("{what}: layers_to_transform must be layer numbers"))? as usize])
            }
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|i| i as usize))
                    .collect::<Option<_>>()
                    .with_context(|| format!("{what}: layers_to_transform must be layer numbers"))?,
            ),
            Some(other) => bail!("{what}: `layers_to_transform` must be a number or a list, not {other}"),
        };
        let layers_pattern = match get("layers_pattern") {
            None => Vec::new(),
            Some(Value::String(p)) => vec![p.clone()],
            Some(Value::Array(a)) => a.iter().filter_map(|p| p.as_str().map(str::to_string)).collect(),
            Some(other) => bail!("{what}: `layers_pattern` must be a string or a list, not {other}"),
        };
        let layers_pattern = layers_pattern
            .iter()
            .map(|p| {
                Regex::new(&format!(r"^(?:.*?\.)?{p}\.(\d+)\."))
                    .with_context(|| format!("{what}: layers_pattern `{p}` is not a regex this reader accepts"))
            })
            .collect::<Result<_>>()?;
        ensure!(
            layers.is_none() || matches!(targets, Targets::Names(_)),
            "{what}: layers_to_transform cannot go with a regex target_modules (PEFT refuses it too)"
        );
        let trainable_tokens = trainable_token_indices(get("trainable_token_indices"), what)?;
        Ok(PeftSpec { r, alpha, dropout, use_rslora, targets, rank_pattern, alpha_pattern, layers, layers_pattern, trainable_tokens })
    }

    /// Whether the module named `path` carries an adapter (PEFT's `check_target_module_exists`).
    pub fn targets(&self, path: &str) -> bool {
        match &self.targets {
            Targets::Regex(re) => re.is_match(path),
            Targets::Names(names) if names.iter().any(|n| n == path) => true,
            Targets::Names(names) => names.iter().any(|n| path.ends_with(&format!(".{n}"))) && self.in_layers(path),
        }
    }

    /// `layers_to_transform`: the module's layer number (the first numbered part, or the one
    /// after `layers_pattern`) is one of them.
    fn in_layers(&self, path: &str) -> bool {
        let Some(layers) = &self.layers else { return true };
        let index = if self.layers_pattern.is_empty() {
            Regex::new(r"^.*?\.[^.]*\.(\d+)\.").ok().and_then(|re| re.captures(path).map(|c| c[1].to_string()))
        } else {
            self.layers_pattern.iter().find_map(|re| re.captures(path).map(|c| c[1].to_string()))
        };
        index.and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| layers.contains(&i))
    }

    /// The module's rank and its update's scale: the first matching pattern key's rank and
    /// alpha, else `r` and `lora_alpha`; alpha / r, or alpha / √r with rsLoRA.
    pub fn rank_and_scale(&self, path: &str) -> (usize, f64) {
        let r = self.rank_pattern.iter().find(|(re, _)| re.is_match(path)).map_or(self.r, |(_, r)| *r);
        let alpha = self.alpha_pattern.iter().find(|(re, _)| re.is_match(path)).map_or(self.alpha, |(_, a)| *a);
        let scale = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<PeftSpec> {
        PeftSpec::parse(&serde_json::from_str(json).unwrap(), "adapter_config.json")
    }

    const Q0: &str = "model.layers.0.self_attn.q_proj";
    const Q1: &str = "model.layers.1.self_attn.q_proj";
    const V1: &str = "model.layers.1.self_attn.v_proj";
    const O1: &str = "model.layers.1.self_attn.o_proj";

    #[test]
    fn patterns_layers_and_regex_targets_follow_peft() {
        let s = spec(r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj","o_proj"],"rank_pattern":{"o_proj":2},"alpha_pattern":{"q_proj":64},"megatron_core":"megatron.core","loftq_config":{}}"#).unwrap();
        assert!(s.targets(Q0) && s.targets(O1) && !s.targets(V1));
        assert_eq!(s.rank_and_scale(Q0), (4, 16.0));
        assert_eq!(s.rank_and_scale(O1), (2, 4.0));
        // A pattern key matches whole dotted parts only: `proj` is not `q_proj`.
        let s = spec(r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"alpha_pattern":{"proj":1}}"#).unwrap();
        assert_eq!(s.rank_and_scale(Q0), (4, 2.0));
        let s = spec(r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj","v_proj"],"layers_to_transform":[1],"layers_pattern":"layers"}"#).unwrap();
        assert!(!s.targets(Q0) && s.targets(Q1) && s.targets(V1));
        let s = spec(r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"layers_to_transform":0}"#).unwrap();
        assert!(s.targets(Q0) && !s.targets(Q1));
        let s = spec(r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":".*\\.1\\.self_attn\\.(q|v)_proj"}"#).unwrap();
        assert!(!s.targets(Q0) && s.targets(Q1) && s.targets(V1) && !s.targets(O1));
        let s =
            spec(r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"use_rslora":true,"rank_pattern":{"q_proj":16}}"#)
                .unwrap();
        assert_eq!(s.rank_and_scale(Q0), (16, 2.0));
    }

    #[test]
    fn keys_that_would_change_the_result_are_refused() {
        for (json, key) in [
            (r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"use_dora":true}"#, "use_dora"),
            (r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#, "modules_to_save"),
            (r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"fan_in_fan_out":true}"#, "fan_in_fan_out"),
            (r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"some_future_key":3}"#, "some_future_key"),
            (r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"bias":"all"}"#, "bias"),
        ] {
            let e = format!("{:#}", spec(json).unwrap_err());
            assert!(e.contains(key), "{key}: {e}");
        }
        // Off values of unknown keys are fine (PEFT writes dozens of them).
        spec(r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"use_dora":false,"exclude_modules":null,"layer_replication":[]}"#).unwrap();
        assert!(
            format!("{:#}", spec(r#"{"peft_type":"IA3","r":4,"lora_alpha":8,"target_modules":["q_proj"]}"#).unwrap_err()).contains("IA3")
        );
    }
}
