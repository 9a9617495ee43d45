//! Layered TOML configuration, for any serde type: the defaults, then a file, then each
//! `--set key.path=value` (its value parsed as TOML, or taken as a string when it is not TOML,
//! so `--set data.dir=/tmp/nyc` needs no quotes). Unknown keys and bad values are errors that
//! name the key (`unknown config key `sft.lrr``, `config key `sft.lr`: ...`).
//!
//! This module knows no project type: the run config that uses it is
//! [`crate::train::config::RunConfig`].

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// `defaults`, overlaid with `file` (if any) and then with each `key.path=value` of `sets`, as
/// one TOML value; and where it came from, for error messages.
pub fn layered<T: Serialize>(defaults: &T, file: Option<&Path>, sets: &[String]) -> Result<(toml::Value, String)> {
    let mut value = toml::Value::try_from(defaults).context("serialising the default config")?;
    let origin = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not valid TOML: {e}", path.display()))?;
            merge(&mut value, toml::Value::Table(table));
            path.display().to_string()
        }
        None => "the defaults".to_string(),
    };
    for set in sets {
        apply_set(&mut value, set)?;
    }
    let origin = if sets.is_empty() { origin } else { format!("{origin} with --set {}", sets.join(" --set ")) };
    Ok((value, origin))
}

/// `defaults` overlaid with a TOML text (e.g. a resolved config that leaves sections out).
pub fn overlaid<T: Serialize>(defaults: &T, text: &str) -> Result<toml::Value> {
    let table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("not valid TOML: {e}"))?;
    let mut value = toml::Value::try_from(defaults).context("serialising the default config")?;
    merge(&mut value, toml::Value::Table(table));
    Ok(value)
}

/// Deserialises with the offending key named: `unknown config key `sft.lrr``, or
/// `config key `sft.lr`: invalid type: string "x", expected f64`.
pub fn from_value<T: DeserializeOwned>(value: toml::Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        // toml appends `in `table`` lines of its own: keep the message itself.
        let msg = e.inner().to_string().lines().next().unwrap_or_default().to_string();
        let prefix = if path == "." || path.is_empty() { String::new() } else { format!("{path}.") };
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            let key = rest.split('`').next().unwrap_or_default();
            let expected = rest.split_once(", ").map(|(_, e)| format!(" ({e})")).unwrap_or_default();
            // The path ends at the key itself, except inside a flattened table.
            let full = if path.rsplit('.').next() == Some(key) { path.clone() } else { format!("{prefix}{key}") };
            anyhow::anyhow!("unknown config key `{full}`{expected}")
        } else if path == "." || path.is_empty() {
            anyhow::anyhow!("{msg}")
        } else {
            anyhow::anyhow!("config key `{path}`: {msg}")
        }
    })
}

/// serde reports a bad value of a `#[serde(flatten)]`ed struct `I` at the section that holds
/// it (`sft`), not at the key. This names the key (`sft.lr`): it deserialises the section's
/// keys that belong to `I` (those of `inner_keys`, serialised from an `I`) on their own.
pub fn explain_flattened<I: DeserializeOwned + Serialize>(
    value: &toml::Value,
    err: anyhow::Error,
    section: &str,
    inner: &I,
) -> anyhow::Error {
    if !err.to_string().starts_with(&format!("config key `{section}`:")) {
        return err;
    }
    let (Some(table), Ok(toml::Value::Table(own))) = (value.get(section).and_then(|v| v.as_table()), toml::Value::try_from(inner)) else {
        return err;
    };
    let keys: toml::Table = table.iter().filter(|(k, _)| own.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    match from_value::<I>(toml::Value::Table(keys)) {
        Ok(_) => err,
        Err(e) => {
            let inner = e.to_string();
            match inner.strip_prefix("config key `") {
                Some(rest) => anyhow::anyhow!("config key `{section}.{rest}"),
                None => anyhow::anyhow!("config key `{section}`: {inner}"),
            }
        }
    }
}

/// Recursively overlays `top` on `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Value, top: toml::Value) {
    match (base, top) {
        (toml::Value::Table(b), toml::Value::Table(t)) => {
            for (k, v) in t {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, t) => *b = t,
    }
}

/// Parses a `--set` value: TOML when it is (`3`, `1e-4`, `true`, `["q", "v"]`, `"x"`), else the
/// raw text as a string (`list`, `/tmp/nyc`).
pub fn parse_set_value(raw: &str) -> toml::Value {
    #[derive(Deserialize)]
    struct Wrap {
        v: toml::Value,
    }
    match toml::from_str::<Wrap>(&format!("v = {raw}")) {
        Ok(w) => w.v,
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Applies one `key.path=value` override. Tables on the way must exist (a misspelt section is
/// an error naming it); the last key is checked when the whole config is deserialised.
fn apply_set(value: &mut toml::Value, set: &str) -> Result<()> {
    let (key, raw) = set.split_once('=').with_context(|| format!("--set {set}: expected key.path=value"))?;
    let key = key.trim();
    ensure!(!key.is_empty(), "--set {set}: empty key");
    let parts: Vec<&str> = key.split('.').collect();
    ensure!(parts.iter().all(|p| !p.is_empty()), "--set {set}: malformed key `{key}`");
    let mut node = value;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let here = parts[..=i].join(".");
        let table = node.as_table_mut().with_context(|| format!("--set {set}: `{}` is not a section", parts[..i].join(".")))?;
        node = match table.get_mut(*part) {
            Some(t) if t.is_table() => t,
            Some(_) => bail!("--set {set}: `{here}` is a value, not a section"),
            None => bail!("--set {set}: unknown config key `{here}`"),
        };
    }
    let table = node.as_table_mut().context("config root is not a table")?;
    table.insert(parts[parts.len() - 1].to_string(), parse_set_value(raw.trim()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_values_parse_as_toml_or_strings() {
        assert_eq!(parse_set_value("3"), toml::Value::Integer(3));
        assert_eq!(parse_set_value("1e-4"), toml::Value::Float(1e-4));
        assert_eq!(parse_set_value("true"), toml::Value::Boolean(true));
        assert_eq!(parse_set_value("\"a b\""), toml::Value::String("a b".into()));
        assert_eq!(parse_set_value("runs/x"), toml::Value::String("runs/x".into()));
        assert_eq!(parse_set_value("list"), toml::Value::String("list".into()));
    }
}
