//! `refine-poi report RUN...`: the runs compared in one table (text on stdout; with `--out`,
//! also `report.txt`, `report.md`, `report.csv` and the training curves `curves.svg`). See
//! [`crate::report`].

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::report;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run directories: a stage folder (`runs/x/grpo`) or a run root (`runs/x`: its grpo/, else sft/).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Write report.txt, report.md, report.csv and curves.svg into this folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// What to print on stdout.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Format {
    Text,
    Markdown,
    Csv,
}

pub fn run(args: Args) -> Result<()> {
    let mut runs = args.runs.iter().map(|p| report::load_run(p)).collect::<Result<Vec<_>>>()?;
    report::short_names(&mut runs);
    let (header, rows) = report::table(&runs);
    let text = report::render_text(&header, &rows);
    let markdown = report::render_markdown(&header, &rows);
    let csv = report::render_csv(&header, &rows)?;
    print!(
        "{}",
        match args.format {
            Format::Text => &text,
            Format::Markdown => &markdown,
            Format::Csv => &csv,
        }
    );
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        for (name, body) in [("report.txt", &text), ("report.md", &markdown), ("report.csv", &csv)] {
            std::fs::write(out.join(name), body).with_context(|| format!("cannot write {}", out.join(name).display()))?;
        }
        let panels = report::plot_curves(&runs, &out.join("curves.svg"))?;
        eprintln!("wrote {}/report.{{txt,md,csv}} and curves.svg ({})", out.display(), panels.join(", "));
    }
    Ok(())
}
