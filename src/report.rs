//! `refine-poi report`: training runs side by side. One table (text, Markdown, CSV) with each
//! run's config differences from the others and its evaluation metrics (all / return /
//! discovery), and training curves (reward terms, KL, loss, val MRR against step) as SVG.
//!
//! A run is a stage directory written by `sft-warmup` or `grpo-train` (`config.toml`,
//! `metrics.jsonl`), or a run root holding `grpo/` and/or `sft/` (the GRPO stage is reported
//! when present). Its evaluations are the `eval` reports (JSON) in `{stage}/eval/`, the folder
//! `scripts/sweep.sh` writes them to, plus the last validation logged during training.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::metrics::METRIC_NAMES;

/// The metric groups of an eval report, in table order.
pub const GROUPS: [&str; 3] = ["all", "return", "discovery"];

/// One evaluation of a run: where it came from and its `metrics` object.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The eval file's stem (`test`, `val`), or `val@N (training)` for the logged validation.
    pub name: String,
    pub metrics: Value,
}

/// What the report knows about one run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The path as given.
    pub name: String,
    pub stage_dir: PathBuf,
    /// Every config key, dotted (`grpo.beta`), with its value as TOML text.
    pub config: BTreeMap<String, String>,
    /// The `metrics.jsonl` records in order.
    pub log: Vec<Value>,
    pub evaluations: Vec<Evaluation>,
}

impl Run {
    /// The last optimizer step logged.
    pub fn last_step(&self) -> u64 {
        self.log.iter().filter_map(|r| r.get("step").and_then(Value::as_u64)).max().unwrap_or(0)
    }
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        toml::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Reads a run (see the module doc).
pub fn load_run(path: &Path) -> Result<Run> {
    let dir = crate::train::checkpoint::find_stage_dir(path)?;
    let config_path = dir.join(crate::train::checkpoint::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let table: toml::Value = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", config_path.display()))?;
    let mut config = BTreeMap::new();
    flatten("", &table, &mut config);

    let metrics_path = dir.join(crate::train::checkpoint::METRICS_FILE);
    let mut log: Vec<Value> = Vec::new();
    if let Ok(text) = std::fs::read_to_string(&metrics_path) {
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            log.push(serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", metrics_path.display(), i + 1))?);
        }
    }

    let mut evaluations = Vec::new();
    let eval_dir = dir.join("eval");
    if eval_dir.is_dir() {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&eval_dir)?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
        files.sort();
        for f in files {
            let v: Value =
                serde_json::from_str(&std::fs::read_to_string(&f)?).with_context(|| format!("{} is not an eval report", f.display()))?;
            let metrics = v.get("metrics").cloned().with_context(|| format!("{} has no metrics: not an eval report", f.display()))?;
            let name = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            evaluations.push(Evaluation { name, metrics });
        }
    }
    if let Some(last_val) = log.iter().rev().find(|r| r.get("val").is_some()) {
        let step = last_val.get("step").and_then(Value::as_u64).unwrap_or(0);
        evaluations.push(Evaluation { name: format!("val@{step} (training)"), metrics: last_val["val"].clone() });
    }
    Ok(Run { name: path.display().to_string(), stage_dir: dir, config, log, evaluations })
}

/// Keys that every run has and whose values differ between them (the run's own folder aside).
/// A key only some runs have belongs to one stage's section: the stage column tells those apart.
pub fn config_differences(runs: &[Run]) -> Vec<String> {
    let Some(first) = runs.first() else { return Vec::new() };
    first
        .config
        .iter()
        .filter(|(k, _)| k.as_str() != "run_dir")
        .filter(|(k, _)| runs.iter().all(|r| r.config.contains_key(*k)))
        .filter(|(k, v)| runs.iter().any(|r| r.config.get(*k) != Some(v)))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Names the runs by their paths without the folder they all share (`runs/sweep/a`,
/// `runs/sweep/b` → `a`, `b`); a single run keeps its path.
pub fn short_names(runs: &mut [Run]) {
    if runs.len() < 2 {
        return;
    }
    let parts: Vec<Vec<String>> =
        runs.iter().map(|r| Path::new(&r.name).components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect()).collect();
    let shortest = parts.iter().map(Vec::len).min().unwrap_or(0);
    let shared = (0..shortest.saturating_sub(1)).take_while(|&i| parts.iter().all(|p| p[i] == parts[0][i])).count();
    for (run, p) in runs.iter_mut().zip(&parts) {
        run.name = p[shared..].join("/");
    }
}

/// The comparison table: a header and one row per (run, evaluation, group).
pub fn table(runs: &[Run]) -> (Vec<String>, Vec<Vec<String>>) {
    let diff = config_differences(runs);
    let mut header: Vec<String> = ["run", "stage", "config", "steps", "evaluation", "group", "n"].map(String::from).to_vec();
    header.extend(METRIC_NAMES.iter().map(|m| m.to_string()));
    header.push("mrr 95% CI".into());
    let mut rows = Vec::new();
    for run in runs {
        let differences =
            diff.iter().map(|k| format!("{k}={}", run.config.get(k).map_or("-", String::as_str))).collect::<Vec<_>>().join(" ");
        let stage = run.stage_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut base = vec![run.name.clone(), stage, differences, run.last_step().to_string()];
        if run.evaluations.is_empty() {
            base.extend(["(none)".to_string(), String::new(), String::new()]);
            base.extend(METRIC_NAMES.iter().map(|_| String::new()));
            base.push(String::new());
            rows.push(base);
            continue;
        }
        for e in &run.evaluations {
            for g in GROUPS {
                let m = &e.metrics[g];
                let mut row = base.clone();
                row.extend([e.name.clone(), g.to_string(), m["n"].as_u64().map_or(String::new(), |n| n.to_string())]);
                row.extend(METRIC_NAMES.iter().map(|name| m[*name].as_f64().map_or("-".to_string(), |x| format!("{x:.4}"))));
                // Reports from before the intervals were computed have none.
                let ci = &m["ci95"]["mrr"];
                row.push(match (ci[0].as_f64(), ci[1].as_f64()) {
                    (Some(lo), Some(hi)) => format!("[{lo:.4}, {hi:.4}]"),
                    _ => "-".to_string(),
                });
                rows.push(row);
            }
        }
    }
    (header, rows)
}

/// Columns padded to their widest cell.
pub fn render_text(header: &[String], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| std::iter::once(header).chain(rows.iter().map(Vec::as_slice)).map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let line =
        |r: &[String]| r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string();
    let mut out = line(header);
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

pub fn render_markdown(header: &[String], rows: &[Vec<String>]) -> String {
    let line = |r: &[String]| format!("| {} |", r.iter().map(|c| c.replace('|', "\\|")).collect::<Vec<_>>().join(" | "));
    let mut out = line(header);
    out.push('\n');
    out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

pub fn render_csv(header: &[String], rows: &[Vec<String>]) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)?;
    for r in rows {
        w.write_record(r)?;
    }
    Ok(String::from_utf8(w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?)
}

/// Reads a panel's value from a `metrics.jsonl` record (`None`: the record has none).
type Reader = Box<dyn Fn(&Value) -> Option<f64>>;

/// One panel of the curves: a title and a way to read its value from a log record.
struct Panel {
    title: String,
    /// Smoothed with a trailing moving average (noisy per-step training values).
    smooth: bool,
    read: Reader,
}

/// Trailing moving average over `window` points.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            let slice = &points[from..=i];
            (points[i].0, slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64)
        })
        .collect()
}

/// Points a run contributes to a panel: (step, value) for each record that has one.
fn series(run: &Run, panel: &Panel) -> Vec<(f64, f64)> {
    let pts: Vec<(f64, f64)> =
        run.log.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, (panel.read)(r)?))).filter(|p| p.1.is_finite()).collect();
    if panel.smooth { moving_average(&pts, SMOOTHING) } else { pts }
}

/// Steps of the trailing moving average of training curves.
pub const SMOOTHING: usize = 10;

/// The panels some run has data for: loss (SFT), total reward, KL, every reward term
/// (GRPO), val MRR.
fn panels(runs: &[Run]) -> Vec<Panel> {
    let mut all = vec![
        Panel {
            title: "loss (SFT)".into(),
            smooth: true,
            read: Box::new(|r| r.get("loss").filter(|_| r.get("reward").is_none())?.as_f64()),
        },
        Panel { title: "total reward".into(), smooth: true, read: Box::new(|r| r.get("reward")?.as_f64()) },
        Panel { title: "KL to the reference".into(), smooth: true, read: Box::new(|r| r.get("kl")?.as_f64()) },
        Panel { title: "val MRR".into(), smooth: false, read: Box::new(|r| r.get("val")?.get("all")?.get("mrr")?.as_f64()) },
    ];
    for spec in crate::train::grpo::rewards::REWARDS {
        let name = spec.name;
        all.push(Panel { title: format!("reward: {name}"), smooth: true, read: Box::new(move |r| r.get("rewards")?.get(name)?.as_f64()) });
    }
    all.into_iter().filter(|p| runs.iter().any(|r| !series(r, p).is_empty())).collect()
}

/// Writes the training curves of `runs` to `path` (SVG), one panel per quantity, one line per
/// run. Returns the panel titles.
pub fn plot_curves(runs: &[Run], path: &Path) -> Result<Vec<String>> {
    use plotters::prelude::*;
    let panels = panels(runs);
    if panels.is_empty() {
        bail!("no run has training curves to plot");
    }
    let cols = panels.len().min(3);
    let rows = panels.len().div_ceil(cols);
    let root = SVGBackend::new(path, (420 * cols as u32, 300 * rows as u32)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(&panels) {
        let lines: Vec<(String, Vec<(f64, f64)>)> =
            runs.iter().map(|r| (r.name.clone(), series(r, panel))).filter(|(_, s)| !s.is_empty()).collect();
        let pts = lines.iter().flat_map(|(_, s)| s.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in pts {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        let (y0, y1) = (y0 - pad, y1 + pad);
        let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("step").light_line_style(WHITE).draw().map_err(|e| err(&e))?;
        for (i, (name, s)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let drawn = if s.len() == 1 {
                chart.draw_series(s.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?
            } else {
                chart.draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2))).map_err(|e| err(&e))?
            };
            drawn.label(name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(panels.into_iter().map(|p| p.title).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, config: &[(&str, &str)]) -> Run {
        Run {
            name: name.into(),
            stage_dir: PathBuf::from(name).join("grpo"),
            config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            log: vec![serde_json::json!({"step": 3, "reward": 1.0})],
            evaluations: vec![Evaluation {
                name: "test".into(),
                metrics: serde_json::json!({"all": {"n": 2, "acc@1": 0.5, "mrr": 0.75, "ci95": {"mrr": [0.5, 1.0]}}}),
            }],
        }
    }

    #[test]
    fn differences_names_and_table() {
        let mut runs = vec![
            run("runs/sweep/a", &[("run_dir", "x"), ("grpo.beta", "0.04"), ("prompt.k", "10"), ("sft.lr", "1")]),
            run("runs/sweep/b", &[("run_dir", "y"), ("grpo.beta", "0"), ("prompt.k", "10")]),
        ];
        // run_dir always differs; sft.lr is in one run only.
        assert_eq!(config_differences(&runs), vec!["grpo.beta"]);
        short_names(&mut runs);
        assert_eq!((runs[0].name.as_str(), runs[1].name.as_str()), ("a", "b"));
        let (header, rows) = table(&runs);
        assert_eq!(rows.len(), 2 * 3);
        let mrr = header.iter().position(|h| h == "mrr").unwrap();
        assert_eq!(rows[0][..7], ["a", "grpo", "grpo.beta=0.04", "3", "test", "all", "2"]);
        assert_eq!(rows[0][mrr], "0.7500");
        assert_eq!(rows[1][mrr], "-", "a group the report lacks");
        assert_eq!(rows[0][mrr + 1], "[0.5000, 1.0000]");
        assert_eq!(rows[1][mrr + 1], "-");
        let md = render_markdown(&header, &rows);
        assert!(md.lines().nth(1).unwrap().starts_with("|---|"));
        assert_eq!(render_csv(&header, &rows).unwrap().lines().count(), 7);
        assert!(render_text(&header, &rows).lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn moving_average_is_trailing() {
        let pts = [(1.0, 1.0), (2.0, 3.0), (3.0, 5.0)];
        assert_eq!(moving_average(&pts, 2), vec![(1.0, 1.0), (2.0, 2.0), (3.0, 4.0)]);
    }
}
