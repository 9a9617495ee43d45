//! `eval --compare A.jsonl B.jsonl`: two methods' predictions (`eval --predictions`) on the same
//! instances, compared metric by metric with the paired bootstrap ([`crate::stats::paired`]),
//! for all instances and for the return and discovery groups.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::metrics::{METRIC_NAMES, Rank};
use crate::stats;

/// An instance of a predictions file: its id in its split, its user and its target POI (ids
/// alone repeat across splits).
type InstanceKey = (u64, u64, u64);

/// What the comparison needs of an instance's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Outcome {
    is_return: bool,
    rank: Rank,
}

fn read(path: &Path) -> Result<BTreeMap<InstanceKey, Outcome>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let field =
            |k: &str| v.get(k).with_context(|| format!("{} line {}: no `{k}` (not an `eval --predictions` file?)", path.display(), i + 1));
        let number = |k: &str| field(k).and_then(|v| v.as_u64().with_context(|| format!("{} line {}: bad {k}", path.display(), i + 1)));
        let key = (number("id")?, number("user")?, number("target")?);
        let outcome = Outcome {
            is_return: field("is_return")?.as_bool().with_context(|| format!("{} line {}: bad is_return", path.display(), i + 1))?,
            rank: field("rank")?.as_f64(),
        };
        ensure!(out.insert(key, outcome).is_none(), "{} line {}: instance {} appears twice", path.display(), i + 1, key.0);
    }
    ensure!(!out.is_empty(), "{} holds no predictions", path.display());
    Ok(out)
}

/// One metric of one group: both methods' means, and the paired difference a − b with its 95%
/// bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MetricComparison {
    pub a: f64,
    pub b: f64,
    pub diff: f64,
    pub ci95: [f64; 2],
}

/// The comparison of two prediction files: per group (`all`, `return`, `discovery`), its size
/// and each metric.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub groups: BTreeMap<String, (u64, BTreeMap<String, MetricComparison>)>,
}

/// Compares the predictions in `a` and `b`; they must cover the same instances (the same
/// dataset and split, and the same `--limit` sample).
pub fn compare(a: &Path, b: &Path) -> Result<Comparison> {
    let (ra, rb) = (read(a)?, read(b)?);
    let only_a = ra.keys().filter(|k| !rb.contains_key(k)).count();
    let only_b = rb.keys().filter(|k| !ra.contains_key(k)).count();
    if only_a + only_b > 0 {
        bail!(
            "{} and {} cover different instances ({only_a} only in the first, {only_b} only in the second): compare predictions of the same split and --limit",
            a.display(),
            b.display()
        );
    }
    if let Some(key) = ra.iter().find(|(k, o)| rb[k].is_return != o.is_return).map(|(k, _)| k) {
        bail!("{} and {} disagree on whether instance {} is a return: they come from different datasets", a.display(), b.display(), key.0);
    }
    let mut groups = BTreeMap::new();
    for (name, keep) in [("all", None), ("return", Some(true)), ("discovery", Some(false))] {
        let ids: Vec<InstanceKey> = ra.iter().filter(|(_, o)| keep.is_none_or(|k| o.is_return == k)).map(|(id, _)| *id).collect();
        let rows = |r: &BTreeMap<InstanceKey, Outcome>| stats::per_instance(&ids.iter().map(|id| r[id].rank).collect::<Vec<_>>());
        let (xa, xb) = (rows(&ra), rows(&rb));
        let Some((diff, ci)) = stats::paired(&xa, &xb) else { continue };
        let (ma, mb) = (stats::means(&xa), stats::means(&xb));
        let metrics = METRIC_NAMES
            .iter()
            .enumerate()
            .map(|(i, m)| (m.to_string(), MetricComparison { a: ma[i], b: mb[i], diff: diff[i], ci95: [ci[i].0, ci[i].1] }))
            .collect();
        groups.insert(name.to_string(), (ids.len() as u64, metrics));
    }
    Ok(Comparison { a: a.display().to_string(), b: b.display().to_string(), groups })
}

/// The comparison as a table for people.
pub fn format_comparison(c: &Comparison) -> String {
    let mut s = format!(
        "A = {}\nB = {}\npaired bootstrap, {} resamples; a difference whose 95% interval excludes 0 is marked *\n",
        c.a,
        c.b,
        stats::RESAMPLES
    );
    s.push_str(&format!("{:<10} {:>6} {:<8} {:>7} {:>7} {:>8}  {}\n", "group", "n", "metric", "A", "B", "A - B", "95% CI"));
    for name in ["all", "return", "discovery"] {
        let Some((n, metrics)) = c.groups.get(name) else { continue };
        for m in METRIC_NAMES {
            let x = &metrics[m];
            let sure = if x.ci95[0] > 0.0 || x.ci95[1] < 0.0 { " *" } else { "" };
            s.push_str(&format!(
                "{name:<10} {n:>6} {m:<8} {:>7.4} {:>7.4} {:>+8.4}  [{:+.4}, {:+.4}]{sure}\n",
                x.a, x.b, x.diff, x.ci95[0], x.ci95[1]
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, rows: &[(u64, u64, bool, Option<f64>)]) -> std::path::PathBuf {
        let p = dir.join(name);
        let text: String = rows
            .iter()
            .map(|(id, target, is_return, rank)| {
                format!("{}\n", serde_json::json!({"id": id, "user": 1, "target": target, "is_return": is_return, "rank": rank}))
            })
            .collect();
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn compares_the_same_instances_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.jsonl", &[(1, 5, true, Some(1.0)), (2, 6, false, None), (3, 7, true, Some(2.0))]);
        let b = write(dir.path(), "b.jsonl", &[(3, 7, true, Some(4.0)), (1, 5, true, Some(1.0)), (2, 6, false, Some(1.0))]);
        let c = compare(&a, &b).unwrap();
        let (n, all) = &c.groups["all"];
        assert_eq!(*n, 3);
        // MRR: a = (1 + 0 + 1/2) / 3, b = (1 + 1 + 1/4) / 3, matched by id whatever the order.
        assert!((all["mrr"].diff - (1.5 - 2.25) / 3.0).abs() < 1e-12, "{:?}", all["mrr"]);
        assert_eq!(c.groups["discovery"].0, 1);
        assert!(format_comparison(&c).contains("discovery"));
        // Another instance set: one clear error.
        let other = write(dir.path(), "c.jsonl", &[(1, 5, true, Some(1.0)), (4, 6, false, None)]);
        let e = format!("{:#}", compare(&a, &other).unwrap_err());
        assert!(e.contains("cover different instances") && e.contains("2 only in the first") && e.contains("1 only in the second"), "{e}");
        // The same ids with other targets (another split or dataset): other instances.
        let moved = write(dir.path(), "d.jsonl", &[(1, 9, true, Some(1.0)), (2, 6, false, None), (3, 7, true, Some(2.0))]);
        assert!(format!("{:#}", compare(&a, &moved).unwrap_err()).contains("1 only in the first"));
    }
}
