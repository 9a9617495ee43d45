//! `refine-poi preprocess`: raw check-ins → a dataset directory (see [`crate::data::dataset`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use crate::data::codebook::{Codebook, CodebookConfig};
use crate::data::protocol::{self, ProtocolConfig, SplitFractions};
use crate::data::readers::{self, BBox, Format, ReadOptions};
use crate::data::{Split, dataset::FORMAT_VERSION};
use crate::train::config::RunConfig;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Take every setting from a run config's `[preprocess]` table and write to its `data.dir`
    /// (e.g. `--config configs/tky.toml --set preprocess.input=raw/TKY.txt`).
    #[arg(long, conflicts_with_all = ["format", "input", "out", "min_user", "min_poi", "gap_hours", "split", "strict", "bbox", "categories", "tz_offset_min", "codebook_levels"])]
    pub config: Option<PathBuf>,
    /// Override a config key (with --config), e.g. `--set preprocess.input=raw.txt`.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
    pub sets: Vec<String>,
    /// Input format: foursquare (TSMC2014 raw), gowalla (SNAP), csv (with a header).
    #[arg(long, value_enum, required_unless_present = "config")]
    pub format: Option<Format>,
    /// Raw check-in file (gzip is detected and decompressed automatically).
    #[arg(long, required_unless_present = "config")]
    pub input: Option<PathBuf>,
    /// Output dataset directory (created; existing dataset files in it are replaced).
    #[arg(long, required_unless_present = "config")]
    pub out: Option<PathBuf>,
    /// k-core: minimum check-ins per user.
    #[arg(long, default_value_t = 10)]
    pub min_user: usize,
    /// k-core: minimum check-ins per POI.
    #[arg(long, default_value_t = 10)]
    pub min_poi: usize,
    /// A gap longer than this (hours) starts a new trajectory.
    #[arg(long, default_value_t = 24.0)]
    pub gap_hours: f64,
    /// Train and validation fractions of the sorted check-in times (the rest is test).
    #[arg(long, default_value = "0.8,0.1")]
    pub split: SplitFractions,
    /// Fail on the first bad row (naming its line) instead of skipping and counting it.
    #[arg(long)]
    pub strict: bool,
    /// Keep only check-ins inside min_lat,min_lon,max_lat,max_lon (e.g. Gowalla-CA).
    #[arg(long, allow_hyphen_values = true)]
    pub bbox: Option<BBox>,
    /// Gowalla: a CSV with header `venue_id,category` giving each location's category.
    #[arg(long)]
    pub categories: Option<PathBuf>,
    /// Gowalla: local offset (minutes) of every check-in; default round(longitude / 15) hours.
    #[arg(long, allow_hyphen_values = true)]
    pub tz_offset_min: Option<i32>,
    /// Clusters per learned level of the semantic POI ids (`codebook.json`), coarse first.
    #[arg(long, value_delimiter = ',', default_value = "32,16")]
    pub codebook_levels: Vec<usize>,
    /// No progress output on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The settings of one run, from the flags or from a config.
struct Settings {
    format: Format,
    input: PathBuf,
    out: PathBuf,
    read: ReadOptions,
    protocol: ProtocolConfig,
    codebook: CodebookConfig,
}

fn settings(args: &Args) -> Result<Settings> {
    if let Some(path) = &args.config {
        let cfg = RunConfig::load(Some(path), &args.sets)?;
        let p = &cfg.preprocess;
        let read = ReadOptions {
            format: p.format,
            strict: p.strict,
            bbox: p.bbox()?,
            tz_offset_min: p.tz_offset_min,
            categories: p.categories.clone(),
        };
        let protocol = ProtocolConfig { min_user: p.min_user, min_poi: p.min_poi, gap_hours: p.gap_hours, split: p.split_fractions()? };
        let codebook = p.codebook.clone();
        return Ok(Settings { format: p.format, input: p.input.clone(), out: cfg.data.dir.clone(), read, protocol, codebook });
    }
    let (Some(format), Some(input), Some(out)) = (args.format, args.input.clone(), args.out.clone()) else {
        anyhow::bail!("give --format, --input and --out, or --config");
    };
    let read = ReadOptions {
        format,
        strict: args.strict,
        bbox: args.bbox,
        tz_offset_min: args.tz_offset_min,
        categories: args.categories.clone(),
    };
    let protocol = ProtocolConfig { min_user: args.min_user, min_poi: args.min_poi, gap_hours: args.gap_hours, split: args.split };
    let codebook = CodebookConfig { levels: args.codebook_levels.clone(), ..CodebookConfig::default() };
    Ok(Settings { format, input, out, read, protocol, codebook })
}

pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    let Settings { format, input, out, read: ropts, protocol: cfg, codebook } = settings(&args)?;
    codebook.validate()?;
    // No two preprocess runs write one dataset directory at once.
    let _lock = crate::lock::DirLock::acquire(&out, "preprocess")?;
    let spinner = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!("reading {}", input.display()));
        s.enable_steady_tick(std::time::Duration::from_millis(200));
        s
    };
    let raw = readers::read(&input, &ropts);
    spinner.finish_and_clear();
    let raw = raw?;
    let rep = &raw.report;
    if !args.quiet {
        eprintln!(
            "read {} rows from {}: {} valid, {} skipped, {} outside the box",
            rep.rows_read,
            input.display(),
            rep.rows_valid,
            rep.rows_skipped(),
            rep.rows_outside_bbox
        );
    }
    // Skipped rows are always reported, even with --quiet: no silent data loss.
    for l in rep.summary_lines() {
        eprintln!("skipped {l}");
    }

    let (ds, st) = protocol::run(&raw, &cfg)?;
    let codebook = Codebook::build(&ds, &codebook)?;

    let stats = json!({
        "format_version": FORMAT_VERSION,
        "params": {
            "format": format,
            "input": input.display().to_string(),
            "min_user": cfg.min_user,
            "min_poi": cfg.min_poi,
            "gap_hours": cfg.gap_hours,
            "split": [cfg.split.train.num as f64 / cfg.split.train.den as f64,
                      cfg.split.val.num as f64 / cfg.split.val.den as f64],
            "strict": ropts.strict,
            "bbox": ropts.bbox,
            "tz_offset_min": ropts.tz_offset_min,
            "categories": ropts.categories.as_ref().map(|p| p.display().to_string()),
        },
        "users": st.users,
        "pois": st.pois,
        "categories": st.categories,
        "checkins": st.checkins,
        "trajectories": st.trajectories,
        "instances": st.instances,
        "return_instances": st.return_instances,
        "return_share": st.return_share,
        "checkins_per_split": st.checkins_per_split,
        "dropped_instances": st.dropped_instances,
        "cutoffs": st.cutoffs,
        "codebook": { "levels": codebook.config.levels, "seed": codebook.config.seed, "sizes": codebook.sizes, "tokens": codebook.tokens().len() },
        "input": raw.report,
        "filtering": {
            "kcore_rounds": st.kcore_rounds,
            "checkins_after_kcore": st.checkins_after_kcore,
            "users_after_kcore": st.users_after_kcore,
            "pois_after_kcore": st.pois_after_kcore,
            "short_trajectories_dropped": st.short_trajectories_dropped,
            "short_trajectory_checkins_dropped": st.short_trajectory_checkins_dropped,
        },
    });
    ds.save(&out, &stats)?;
    codebook.save(&out)?;

    println!(
        "{}: {} users, {} POIs, {} categories, {} check-ins ({:.1} s)",
        out.display(),
        st.users,
        st.pois,
        st.categories,
        st.checkins,
        start.elapsed().as_secs_f64()
    );
    println!("{:<6} {:>12} {:>10} {:>8} {:>14}", "split", "trajectories", "instances", "return", "dropped");
    for s in Split::ALL {
        let dropped = st
            .dropped_instances
            .get(s.as_str())
            .map(|d| format!("{}+{}", d.user_not_in_train, d.poi_not_in_train))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<6} {:>12} {:>10} {:>7.1}% {:>14}",
            s.as_str(),
            st.trajectories.get(s),
            st.instances.get(s),
            st.return_share.get(s) * 100.0,
            dropped
        );
    }
    println!("(dropped = val/test instances whose user + whose target POI is not in train)");
    println!(
        "semantic ids: {} tokens, sizes {:?} per level (learned on train, seed {})",
        codebook.tokens().len(),
        codebook.sizes,
        codebook.config.seed
    );
    Ok(())
}
