//! `refine-poi recommend`: one ranked top-k list for one user history, from a dataset user (at a
//! given time) or from a JSON file of check-ins.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;
use serde::Deserialize;
use serde_json::json;

use crate::commands::eval::LlmArgs;
use crate::data::readers::parse_iso_time_str;
use crate::data::{Checkin, Dataset, Split};
use crate::prompt::{PromptContext, candidate_stats};
use crate::ranker::Ranker;
use crate::retrieval::Query;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset directory written by `refine-poi preprocess` (its POI table and users).
    #[arg(long)]
    pub data: PathBuf,
    /// A user of the dataset, by the id in the raw data (users.csv's source_id).
    #[arg(long, conflicts_with = "history", required_unless_present = "history")]
    pub user: Option<String>,
    /// Recommend for this moment (ISO 8601, e.g. 2012-12-29T17:51:00Z); the history is the
    /// user's check-ins before it. Default: one hour after the user's last check-in.
    #[arg(long, requires = "user")]
    pub at: Option<String>,
    /// A JSON file (or - for stdin) with the history: {"at": "...", "tz_offset_min": -300,
    /// "checkins": [{"venue_id": "...", "time": "..."} or {"poi": 12, "time": "..."}, ...]}
    /// or just the list of check-ins.
    #[arg(long)]
    pub history: Option<String>,
    /// Who recommends: the model (+ adapter) or the learned ranker (fit on the dataset's train
    /// instances at start, a few seconds; `--ranker-config`).
    #[arg(long, value_enum, default_value = "llm")]
    pub method: RecommendMethod,
    /// `--method ranker`'s options: a TOML file with a `[ranker]` table or the bare keys.
    #[arg(long)]
    pub ranker_config: Option<PathBuf>,
    /// How many POIs `--method ranker` lists.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[command(flatten)]
    pub llm: LlmArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecommendMethod {
    Llm,
    Ranker,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HistoryFile {
    Full {
        #[serde(default)]
        at: Option<String>,
        #[serde(default)]
        tz_offset_min: Option<i32>,
        checkins: Vec<HistoryCheckin>,
    },
    List(Vec<HistoryCheckin>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryCheckin {
    #[serde(default)]
    venue_id: Option<String>,
    #[serde(default)]
    poi: Option<u32>,
    time: String,
    #[serde(default)]
    tz_offset_min: Option<i32>,
}

const HOUR: i64 = 3600;

fn parse_time(s: &str, what: &str) -> Result<i64> {
    parse_iso_time_str(s).with_context(|| format!("{what}: '{s}' is not an ISO 8601 time (e.g. 2012-12-29T17:51:00Z)"))
}

/// The history (in time order), the target time and its UTC offset.
fn history_from_file(ds: &Dataset, spec: &str) -> Result<(Vec<Checkin>, i64, i32)> {
    let text = if spec == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read the history from stdin")?;
        s
    } else {
        std::fs::read_to_string(spec).with_context(|| format!("cannot read history file {spec}"))?
    };
    let file: HistoryFile = serde_json::from_str(&text).with_context(|| format!("{spec}: not a history (see `recommend --help`)"))?;
    let (at, tz, raw) = match file {
        HistoryFile::Full { at, tz_offset_min, checkins } => (at, tz_offset_min, checkins),
        HistoryFile::List(list) => (None, None, list),
    };
    ensure!(!raw.is_empty(), "{spec}: the history has no check-ins");
    let by_venue: std::collections::HashMap<&str, u32> = ds.pois().iter().map(|p| (p.venue_id.as_str(), p.id)).collect();
    let mut checkins = Vec::with_capacity(raw.len());
    for (i, c) in raw.iter().enumerate() {
        let n = i + 1;
        let poi = match (&c.venue_id, c.poi) {
            (Some(v), None) => {
                *by_venue.get(v.as_str()).with_context(|| format!("{spec}: check-in {n}: venue '{v}' is not in the dataset's POI table"))?
            }
            (None, Some(p)) => {
                ensure!((p as usize) < ds.num_pois(), "{spec}: check-in {n}: POI {p} is not in the dataset (ids 0..{})", ds.num_pois());
                p
            }
            _ => bail!("{spec}: check-in {n} needs exactly one of venue_id and poi"),
        };
        let utc = parse_time(&c.time, &format!("{spec}: check-in {n}"))?;
        checkins.push(Checkin { poi, utc, tz_offset_min: c.tz_offset_min.or(tz).unwrap_or(0) });
    }
    checkins.sort_by_key(|c| c.utc);
    let last = checkins.last().expect("non-empty");
    let target = match at {
        Some(at) => parse_time(&at, &format!("{spec}: at"))?,
        None => last.utc + HOUR,
    };
    Ok((checkins.clone(), target, tz.unwrap_or(last.tz_offset_min)))
}

pub fn run(args: Args) -> Result<()> {
    // The ranker is fit on the train instances.
    let splits: &[Split] = if args.method == RecommendMethod::Ranker { &[Split::Train] } else { &[] };
    let ds = Dataset::load_splits(&args.data, splits)?;
    let gap_hours = Dataset::read_stats(&args.data)?.pointer("/params/gap_hours").and_then(|v| v.as_f64()).unwrap_or(24.0);
    let (user, history, target, tz) = match (&args.user, &args.history) {
        (Some(user), _) => {
            let u = ds
                .users()
                .iter()
                .find(|u| &u.source_id == user)
                .with_context(|| format!("user '{user}' is not in the dataset {} (see its users.csv)", args.data.display()))?;
            let all = ds.user_checkins(u.id);
            let last = all.last().with_context(|| format!("user '{user}' has no check-ins"))?;
            let target = match &args.at {
                Some(at) => parse_time(at, "--at")?,
                None => last.utc + HOUR,
            };
            let before: Vec<Checkin> = all.iter().filter(|c| c.utc < target).cloned().collect();
            ensure!(!before.is_empty(), "user '{user}' has no check-ins before {}", crate::data::format_utc(target));
            let tz = before.last().map_or(0, |c| c.tz_offset_min);
            (Some(u.id), before, target, tz)
        }
        (None, Some(spec)) => {
            let (h, t, tz) = history_from_file(&ds, spec)?;
            (None, h, t, tz)
        }
        (None, None) => bail!("give --user or --history"),
    };
    let label = user.map_or(String::new(), |u| u.to_string());
    // A dataset user's own train check-ins from the target on are left out of the statistics,
    // as for the dataset's instances.
    let query = |ctx: &PromptContext| Query { user, history: &history, target_utc: target, target_local: ctx.target_local };
    let (ids, k, answer) = match args.method {
        RecommendMethod::Llm if args.llm.beam_next.is_some() => {
            // The whole-history prompt names the user by dense id and shows the dataset's
            // trajectories, as whole-history training did.
            let user = user.context("--beam-next ranks from a dataset user's check-ins: give --user, not --history")?;
            let rec = args.llm.recommender(1)?;
            let at = PromptContext::from_checkins(ds.pois(), label, &history, target, tz, gap_hours)?.target_local;
            let (ids, _) = rec.rank_next_for_user(&ds, user, target, at)?;
            (ids, rec.prompt.k, None)
        }
        RecommendMethod::Llm => {
            let rec = args.llm.recommender(1)?;
            let stats = candidate_stats(&rec.prompt, &ds);
            let mut ctx = PromptContext::from_checkins(ds.pois(), label, &history, target, tz, gap_hours)?;
            ctx.retrieval = stats.as_ref().map(|s| (s, query(&ctx)));
            ctx.codebook = ds.codebook();
            let answer = rec.answer(&[ctx], ds.num_pois())?.remove(0);
            (answer.parsed.ids.clone(), rec.prompt.k, Some(answer))
        }
        RecommendMethod::Ranker => {
            ensure!(args.top >= 1, "--top must be at least 1");
            let ranker = Ranker::fit(&ds, &super::eval::ranker_config(args.ranker_config.as_deref())?)?;
            let ctx = PromptContext::from_checkins(ds.pois(), label, &history, target, tz, gap_hours)?;
            (ranker.rank(ds.pois(), &query(&ctx)), args.top, None)
        }
    };
    let list: Vec<serde_json::Value> = ids
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, &id)| {
            let p = &ds.pois()[id as usize];
            json!({ "rank": i + 1, "poi": id, "venue_id": p.venue_id, "category": p.category, "latitude": p.lat, "longitude": p.lon })
        })
        .collect();
    if args.json {
        let out = json!({
            "at": crate::data::format_utc(target),
            "history_checkins": history.len(),
            "method": args.method.to_possible_value().map(|v| v.get_name().to_string()),
            "recommendations": list,
            "completion": answer.as_ref().map(|a| &a.completion),
            "parsed": answer.as_ref().map(|a| &a.parsed),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("top {k} for {} check-ins before {}:", history.len(), crate::data::format_utc(target));
        println!("{:>4}  {:>6}  {:<26} {:<28} {:>10} {:>11}", "rank", "poi", "venue_id", "category", "latitude", "longitude");
        for r in &list {
            println!(
                "{:>4}  {:>6}  {:<26} {:<28} {:>10.5} {:>11.5}",
                r["rank"].as_u64().unwrap_or(0),
                r["poi"].as_u64().unwrap_or(0),
                r["venue_id"].as_str().unwrap_or(""),
                r["category"].as_str().unwrap_or(""),
                r["latitude"].as_f64().unwrap_or(f64::NAN),
                r["longitude"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    if let Some(answer) = &answer {
        ensure!(
            !list.is_empty(),
            "the model's answer holds no valid POI id (raw answer: {:?}); a fine-tuned adapter (--adapter) answers in the expected format",
            answer.completion
        );
    }
    Ok(())
}
