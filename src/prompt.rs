//! The prompt builder, one definition used by every command (recommend, eval, SFT, GRPO): a
//! user's context (the current trajectory, the long-term memory, the target's local time) into
//! chat messages, rendered through the model's chat template and fitted to a token budget.
//!
//! The user message, in order: the user; the most visited POIs with visit counts (long-term);
//! optionally the POIs visited around the target's time of day, with those visits and all
//! visits (long-term, `hour_visits`); the most recent earlier check-ins, i.e. the history before
//! the current trajectory (long-term); the current trajectory's check-ins (short-term); the
//! target's local time and weekday; and the instruction to answer with exactly k distinct POI
//! ids as `<answer>id, id, ...</answer>` (with reasoning, inside `<think>...</think>` first).
//! Each check-in is a line with its local time, POI id and category. POI ids are the dataset's
//! dense ids, the ones [`crate::answer::parse_answer`] reads back. Visit counts and their orders
//! are [`crate::visits`]'.
//!
//! The token budget counts the final chat-templated text. Over budget, context is dropped oldest
//! first, deterministically: the oldest earlier check-ins, then the oldest check-ins of the
//! trajectory (its last one is always kept), then the least visited entries of the most-visited
//! list, then the last entries of the around-the-hour list. The visit lists go last because
//! they carry the most signal: about three quarters of NYC targets are returns, the
//! most-visited list is the per-user counter's own ranking, and the around-the-hour list
//! ranks better still. Each line's tokens are counted once to estimate how much to drop; the
//! estimate is then verified on the rendered text and adjusted, so the result is within budget
//! and drops no more than it must (up to the tokenizer merging tokens across lines).

use std::collections::HashSet;

use anyhow::{Context, Result, bail, ensure};
use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

pub use crate::answer::format_answer;
use crate::answer::{ANSWER_CLOSE, ANSWER_OPEN, AnswerIds, PoiIds, THINK_CLOSE, THINK_OPEN};
use crate::data::codebook::Codebook;
use crate::data::{Checkin, Dataset, Instance, Poi};
use crate::model::{ChatMessage, TextTokenizer};
use crate::retrieval::{Candidate, CandidateConfig, Query, Source, TrainStats};
use crate::visits::{DEFAULT_WINDOW_MIN, around_the_hour, count_visits};

/// The system message unless [`PromptConfig::system_message`] replaces it.
pub const DEFAULT_SYSTEM_MESSAGE: &str = "You are a next point-of-interest (POI) recommender. \
    You read a user's check-ins and name the POIs they are most likely to visit next.";

/// Options of the prompt (a `[prompt]` table in configs). Every field has a default, and
/// unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptConfig {
    /// How many POI ids the model is asked for (the length of its ranked list).
    pub k: usize,
    /// Include the long-term memory: the most visited POIs and the earlier check-ins.
    pub long_term: bool,
    /// Show each POI's category next to its id.
    pub categories: bool,
    /// Show check-in times and the target's time and weekday.
    pub times: bool,
    /// Ask the model to reason briefly inside `<think>...</think>` before answering.
    pub reasoning: bool,
    /// Budget of the rendered prompt in tokens (chat template and generation prompt included);
    /// 0 = no limit.
    pub max_prompt_tokens: usize,
    /// At most this many entries in the most-visited list.
    pub top_visited: usize,
    /// At most this many earlier check-ins (the most recent ones).
    pub recent_checkins: usize,
    /// At most this many entries in the list of POIs visited around the target's time of day
    /// (0 = no such list). It is part of the long-term memory and names the target's time, so
    /// it is shown only with `long_term` and `times` on (an ablation of either removes it too).
    pub hour_visits: usize,
    /// The window of that list: visits within this many minutes of the target's time of day.
    pub hour_window_min: u32,
    /// Replaces the default system message ([`DEFAULT_SYSTEM_MESSAGE`]).
    pub system_message: Option<String>,
    /// POIs beyond the user's own lists, from all users' train check-ins
    /// (`[prompt.candidates]`, see [`crate::retrieval`]); none by default.
    pub candidates: CandidateConfig,
    /// How POIs are named in the prompt and the answer: dense ids (`POI 1234`) or semantic codes
    /// (`<a12><b3><c40>`, the dataset's `codebook.json`; the model needs an adapter that adds
    /// their tokens).
    pub ids: PoiIds,
    /// Check-in and target times as two added tokens, weekday and hour (`<Sat><17h>`), instead
    /// of text (`Sat 2012-12-08 17:31: `, about ten digit tokens). A check-in line is then its
    /// two time tokens and its code, `<Sat><17h><a12><b5><c4>`: six tokens with its newline
    /// where the text form takes 14 (trajectory) or 24 (earlier). Dates and minutes are left
    /// out. Needs `ids = "semantic"` and `times`; the tokens train with the adapter.
    pub time_tokens: bool,
    /// Which of the user's check-ins a whole-history prompt (`eval --beam-next`, next-code GRPO,
    /// `recommend --beam-next`) shows within `max_prompt_tokens`.
    pub history_window: HistoryWindow,
}

/// The check-ins a whole-history prompt shows ([`crate::history_prompt::next_checkin_prompt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryWindow {
    /// The latest check-ins that fit: the window slides with every check-in, so a user's
    /// consecutive prompts share little more than the header.
    #[default]
    Latest,
    /// From the latest of fixed starting check-ins (every half budget of a user's history) whose
    /// lines to the target fit: between half and all of the budget. A user's consecutive
    /// prompts then share everything before the newest line, which evaluation reads from the
    /// previous prompt's keys and values instead of computing again.
    Anchored,
}

impl Default for PromptConfig {
    fn default() -> Self {
        PromptConfig {
            k: 10,
            long_term: true,
            categories: true,
            times: true,
            reasoning: false,
            max_prompt_tokens: 512,
            top_visited: 10,
            recent_checkins: 20,
            hour_visits: 0,
            hour_window_min: DEFAULT_WINDOW_MIN,
            system_message: None,
            candidates: CandidateConfig::default(),
            ids: PoiIds::Raw,
            time_tokens: false,
            history_window: HistoryWindow::Latest,
        }
    }
}

impl PromptConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.k >= 1, "prompt.k must be at least 1");
        ensure!(self.hour_window_min <= 12 * 60, "prompt.hour_window_min is at most 720 (12 hours either way)");
        ensure!(
            !self.time_tokens || (self.ids == PoiIds::Semantic && self.times),
            "prompt.time_tokens = true needs prompt.ids = \"semantic\" and prompt.times = true"
        );
        self.candidates.validate().context("in [prompt.candidates]")
    }

    /// Whether prompts show the around-the-hour list (see [`PromptConfig::hour_visits`]).
    pub fn shows_hour_list(&self) -> bool {
        self.hour_visits > 0 && self.long_term && self.times
    }

    /// The chat messages without a token budget (nothing dropped).
    pub fn messages(&self, ctx: &PromptContext) -> Result<Vec<ChatMessage>> {
        self.validate()?;
        Ok(Parts::new(self, ctx)?.messages(self, Dropped::default()))
    }

    fn system(&self) -> &str {
        self.system_message.as_deref().unwrap_or(DEFAULT_SYSTEM_MESSAGE)
    }
}

/// What a prompt is built from: one user's check-ins before a target time.
#[derive(Debug, Clone)]
pub struct PromptContext<'a> {
    /// How the user is named (`user 42`); empty for "the user".
    pub user: String,
    /// Local wall-clock time of the check-in to predict.
    pub target_local: NaiveDateTime,
    /// Short-term memory: the current trajectory's check-ins so far, oldest first.
    pub trajectory: &'a [Checkin],
    /// The user's check-ins before the current trajectory, oldest first. The most-visited list
    /// counts these and the trajectory's.
    pub earlier: &'a [Checkin],
    /// The POI table (`pois[id]` has that id).
    pub pois: &'a [Poi],
    /// The statistics and query of the candidate lists (none: no candidate lists, whatever the
    /// config asks; see [`candidate_stats`]).
    pub retrieval: Option<(&'a TrainStats, Query<'a>)>,
    /// The POIs' semantic codes (needed when the config names POIs by [`PoiIds::Semantic`]).
    pub codebook: Option<&'a Codebook>,
}

impl<'a> PromptContext<'a> {
    /// The context of a dataset instance: its prefix is the trajectory, and the history
    /// ([`Dataset::history`]) before the trajectory's first check-in is the earlier check-ins.
    /// The user is named by the dense user id.
    pub fn from_instance(ds: &'a Dataset, inst: &'a Instance) -> PromptContext<'a> {
        let history = ds.history(inst);
        let start = inst.prefix.first().map_or(inst.target.utc, |c| c.utc);
        let earlier = &history[..history.partition_point(|c| c.utc < start)];
        PromptContext {
            user: inst.user.to_string(),
            target_local: inst.target.local_time(),
            trajectory: &inst.prefix,
            earlier,
            pois: ds.pois(),
            retrieval: None,
            codebook: ds.codebook(),
        }
    }

    /// [`PromptContext::from_instance`] with the statistics of the candidate lists (`None`: no
    /// lists), which leave out the instance's own target and what its user did after it.
    pub fn from_instance_with(ds: &'a Dataset, inst: &'a Instance, stats: Option<&'a TrainStats>) -> PromptContext<'a> {
        let ctx = PromptContext::from_instance(ds, inst);
        PromptContext { retrieval: stats.map(|s| (s, Query::from_instance(ds, inst))), ..ctx }
    }

    /// The context of raw check-ins (`recommend --history`): `history` in time order, all
    /// before the target, with known POIs. It is split like the protocol splits trajectories:
    /// the current trajectory is the history's last run of check-ins with gaps of at most
    /// `gap_hours` (24 in the protocol), even when the target comes later than that after it,
    /// so that the prompt always has a trajectory, as every dataset instance does.
    pub fn from_checkins(
        pois: &'a [Poi],
        user: impl Into<String>,
        history: &'a [Checkin],
        target_utc: i64,
        target_tz_offset_min: i32,
        gap_hours: f64,
    ) -> Result<PromptContext<'a>> {
        ensure!(!history.is_empty(), "the history has no check-ins");
        for (i, c) in history.iter().enumerate() {
            ensure!((c.poi as usize) < pois.len(), "check-in {} names POI {}, but the dataset has POI ids 0..{}", i + 1, c.poi, pois.len());
            ensure!(
                c.utc < target_utc,
                "check-in {} ({}) is not before the target time ({})",
                i + 1,
                c.utc_iso(),
                crate::data::format_utc(target_utc)
            );
            if i > 0 {
                ensure!(history[i - 1].utc <= c.utc, "the history is not in time order (check-in {})", i + 1);
            }
        }
        let gap_secs = gap_hours * 3600.0;
        let start = (1..history.len()).rev().find(|&i| (history[i].utc - history[i - 1].utc) as f64 > gap_secs).unwrap_or(0);
        let target = Checkin { poi: 0, utc: target_utc, tz_offset_min: target_tz_offset_min };
        Ok(PromptContext {
            user: user.into(),
            target_local: target.local_time(),
            trajectory: &history[start..],
            earlier: &history[..start],
            pois,
            retrieval: None,
            codebook: None,
        })
    }
}

/// How many items the token budget dropped, per section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Dropped {
    /// Earlier check-ins (oldest first).
    pub earlier: usize,
    /// Entries of the most-visited list (least visited first).
    pub top_visited: usize,
    /// Check-ins of the current trajectory (oldest first; never its last one).
    pub trajectory: usize,
    /// Entries of the around-the-hour list (last first).
    pub hour_visits: usize,
    /// Entries of the candidate lists (the last list's last entry first).
    pub candidates: usize,
}

impl Dropped {
    pub fn total(&self) -> usize {
        self.earlier + self.top_visited + self.trajectory + self.hour_visits + self.candidates
    }
}

/// A rendered prompt: the messages, the chat-templated text (ending with the assistant turn's
/// opener), its token ids (`encode(text, false)`: the template writes any BOS itself), and what
/// the budget dropped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuiltPrompt {
    pub messages: Vec<ChatMessage>,
    pub text: String,
    pub ids: Vec<u32>,
    pub dropped: Dropped,
}

/// Builds prompts for one model (its chat template and tokenizer) with one configuration.
pub struct PromptBuilder<'t> {
    config: PromptConfig,
    tokenizer: &'t TextTokenizer,
}

impl<'t> PromptBuilder<'t> {
    pub fn new(config: PromptConfig, tokenizer: &'t TextTokenizer) -> Result<Self> {
        config.validate()?;
        ensure!(tokenizer.chat_template.is_some(), "the model has no chat template: prompts need one");
        Ok(PromptBuilder { config, tokenizer })
    }

    pub fn config(&self) -> &PromptConfig {
        &self.config
    }

    /// The prompt of `ctx`, within the token budget. Fails when even the parts that are never
    /// dropped (system message, instruction, the trajectory's last check-in) exceed it.
    pub fn build(&self, ctx: &PromptContext) -> Result<BuiltPrompt> {
        let parts = Parts::new(&self.config, ctx)?;
        let first = self.render(&parts, 0)?;
        let budget = self.config.max_prompt_tokens;
        if budget == 0 || first.ids.len() <= budget {
            return Ok(first);
        }

        // Estimate: cumulative tokens freed by dropping the first d units.
        let units = parts.drop_units();
        let mut freed = vec![0usize; units.len() + 1];
        for (i, u) in units.iter().enumerate() {
            freed[i + 1] = freed[i] + self.tokenizer.encode(u, false)?.len();
        }
        let max_d = units.len();

        // Up: from the last measured (d, tokens) over budget, drop the fewest units the estimate
        // says are enough, then measure again.
        let (mut over_d, mut over_n) = (0usize, first.ids.len());
        let mut fit = loop {
            let d = (over_d + 1..=max_d).find(|&d| over_n.saturating_sub(freed[d] - freed[over_d]) <= budget).unwrap_or(max_d);
            let p = self.render(&parts, d)?;
            if p.ids.len() <= budget {
                break (d, p);
            }
            if d == max_d {
                bail!(
                    "the prompt needs {} tokens even with all droppable context removed, more than \
                     max_prompt_tokens = {budget}",
                    p.ids.len()
                );
            }
            (over_d, over_n) = (d, p.ids.len());
        };
        // Down: the estimate may have dropped more than needed; keep back what still fits.
        while fit.0 > over_d + 1 {
            let p = self.render(&parts, fit.0 - 1)?;
            if p.ids.len() > budget {
                break;
            }
            fit = (fit.0 - 1, p);
        }
        Ok(fit.1)
    }

    fn render(&self, parts: &Parts, d: usize) -> Result<BuiltPrompt> {
        let dropped = parts.dropped(d);
        let messages = parts.messages(&self.config, dropped);
        let text = self.tokenizer.apply_chat_template(&messages, true)?;
        let ids = self.tokenizer.encode(&text, false)?;
        Ok(BuiltPrompt { messages, text, ids, dropped })
    }
}

/// How an earlier check-in's time is shown: `Mon 2012-04-09 12:20`.
const DATED_TIME: &str = "%a %Y-%m-%d %H:%M";

/// How a current-trajectory check-in's time is shown: `Mon 12:20`.
const TRAJECTORY_TIME: &str = "%a %H:%M";

/// The weekday tokens of [`PromptConfig::time_tokens`], Monday first, as chrono's `%a` writes
/// them.
const WEEKDAY_TOKENS: [&str; 7] = ["<Mon>", "<Tue>", "<Wed>", "<Thu>", "<Fri>", "<Sat>", "<Sun>"];

/// The tokens [`PromptConfig::time_tokens`] adds: the weekdays, then the hours `<0h>`..`<23h>`.
/// None of them reads as a code token (`<` and a level letter, then digits).
pub fn time_token_names() -> Vec<String> {
    WEEKDAY_TOKENS.iter().map(|t| t.to_string()).chain((0..24).map(|h| format!("<{h}h>"))).collect()
}

/// `at` as its two time tokens, `<Sat><17h>`.
fn time_tokens(at: NaiveDateTime) -> String {
    use chrono::{Datelike, Timelike};
    format!("{}<{}h>", WEEKDAY_TOKENS[at.weekday().num_days_from_monday() as usize], at.hour())
}

/// The vocabulary a prompt of `cfg` adds to the model, in the adapter's order: the codebook's
/// code tokens, then the time tokens when `cfg.time_tokens`. None for raw ids.
pub fn added_tokens(cfg: &PromptConfig, codebook: Option<&Codebook>) -> Result<Option<Vec<String>>> {
    let Some(cb) = AnswerIds::new(cfg.ids, codebook)?.codebook() else { return Ok(None) };
    let mut names = cb.tokens();
    if cfg.time_tokens {
        names.extend(time_token_names());
    }
    Ok(Some(names))
}

/// What a check-in's line shows before its POI's name (the whole line is `{this}{name}{suffix}`):
/// `- Mon 2012-04-09 12:20: ` (`dated`), `- Mon 12:20: `, `- ` without times, and `<Mon><12h>`
/// with time tokens. Prompts and whole-history examples write check-ins alike through it.
pub fn checkin_line_start(cfg: &PromptConfig, at: NaiveDateTime, dated: bool) -> String {
    match (cfg.times, cfg.time_tokens) {
        (false, _) => "- ".to_string(),
        (true, true) => time_tokens(at),
        (true, false) => format!("- {}: ", at.format(if dated { DATED_TIME } else { TRAJECTORY_TIME })),
    }
}

/// How a prompt names POI `id`: its name (`POI 12`, or its code `<a1><b0><c3>` with `codebook`)
/// and what follows it (` (Bar)` with categories on, else nothing).
pub fn poi_name(cfg: &PromptConfig, codebook: Option<&Codebook>, pois: &[Poi], id: u32) -> Result<(String, String)> {
    let p = pois.get(id as usize).with_context(|| format!("POI {id} is not in the POI table"))?;
    let name = match codebook {
        Some(cb) => cb.code_text(id),
        None => format!("POI {id}"),
    };
    let category = one_line(&p.category);
    let suffix = if cfg.categories && !category.is_empty() { format!(" ({category})") } else { String::new() };
    Ok((name, suffix))
}

const TOP_HEADER: &str = "Most visited POIs:";
const EARLIER_HEADER: &str = "Earlier check-ins (oldest first):";
const TRAJECTORY_HEADER: &str = "Current trajectory (oldest first):";

/// The around-the-hour list's header names the time and window, so it is built per prompt.
fn hour_header(cfg: &PromptConfig, at: NaiveDateTime) -> String {
    format!("Visited around {} (within {} min, any day):", at.format("%H:%M"), cfg.hour_window_min)
}

/// The lines of a prompt before the budget: every section's lines, in display order.
struct Parts {
    head: String,
    /// Most visited first.
    top: Vec<String>,
    hour_header: String,
    /// Most visits around the hour first.
    hour: Vec<String>,
    /// Oldest first.
    earlier: Vec<String>,
    /// Oldest first; never empty.
    trajectory: Vec<String>,
    /// The candidate lists (header, lines), in [`Source::ALL`] order, each best first.
    candidates: Vec<(String, Vec<String>)>,
    tail: String,
}

impl Parts {
    fn new(cfg: &PromptConfig, ctx: &PromptContext) -> Result<Parts> {
        ensure!(!ctx.trajectory.is_empty(), "the prompt needs at least one check-in in the current trajectory");
        let codebook = AnswerIds::new(cfg.ids, ctx.codebook)?.codebook();
        let poi = |id: u32| -> Result<String> {
            let (name, suffix) = poi_name(cfg, codebook, ctx.pois, id)?;
            Ok(format!("{name}{suffix}"))
        };
        let user = if ctx.user.trim().is_empty() { "the user".to_string() } else { format!("user {}", one_line(&ctx.user)) };

        let (mut top, mut hour, mut earlier) = (Vec::new(), Vec::new(), Vec::new());
        // Every POI the user's own lists name: the candidate lists leave them out.
        let mut shown: HashSet<u32> = ctx.trajectory.iter().map(|c| c.poi).collect();
        if cfg.long_term {
            let visits = count_visits(ctx.earlier.iter().chain(ctx.trajectory), ctx.pois, ctx.target_local, cfg.hour_window_min);
            let plural = |n: u64| if n == 1 { "" } else { "s" };
            for v in visits.iter().take(cfg.top_visited) {
                top.push(format!("- {}: {} visit{}", poi(v.poi)?, v.total, plural(v.total)));
                shown.insert(v.poi);
            }
            let hour_entries = if cfg.shows_hour_list() { cfg.hour_visits } else { 0 };
            for v in around_the_hour(&visits).iter().take(hour_entries) {
                hour.push(format!("- {}: {} of {} visit{}", poi(v.poi)?, v.near, v.total, plural(v.total)));
                shown.insert(v.poi);
            }
            let from = ctx.earlier.len().saturating_sub(cfg.recent_checkins);
            for c in &ctx.earlier[from..] {
                earlier.push(format!("{}{}", checkin_line_start(cfg, c.local_time(), true), poi(c.poi)?));
                shown.insert(c.poi);
            }
        }
        let mut trajectory = Vec::new();
        for c in ctx.trajectory {
            trajectory.push(format!("{}{}", checkin_line_start(cfg, c.local_time(), false), poi(c.poi)?));
        }

        let head = if cfg.times { format!("Check-ins of {user}, in local time.") } else { format!("Check-ins of {user}.") };
        let question = if cfg.time_tokens {
            format!("The next check-in is at {}. Which POI will it be?", time_tokens(ctx.target_local))
        } else if cfg.times {
            format!("The next check-in is on {}. Which POI will it be?", ctx.target_local.format("%A %Y-%m-%d at %H:%M"))
        } else {
            "Which POI will be the next check-in?".to_string()
        };
        let (what, format) = match cfg.ids {
            PoiIds::Raw => ("id", format!("{ANSWER_OPEN}id, id, ...{ANSWER_CLOSE}")),
            PoiIds::Semantic => ("code", format!("{ANSWER_OPEN}code code ...{ANSWER_CLOSE}")),
        };
        let ids = if cfg.k == 1 { format!("1 POI {what}") } else { format!("{} distinct POI {what}s", cfg.k) };
        let instruction = if cfg.reasoning {
            format!(
                "First think briefly inside {THINK_OPEN}...{THINK_CLOSE}. Then answer with exactly {ids}, \
                 most likely first, in this format:\n{format}"
            )
        } else {
            format!("Answer with exactly {ids}, most likely first, in this format:\n{format}")
        };
        let hour_header = hour_header(cfg, ctx.target_local);
        let candidates = match &ctx.retrieval {
            Some((stats, query)) if cfg.candidates.any() => {
                let found = stats.view(query).candidates(ctx.pois, query, &cfg.candidates, |p| shown.contains(&p));
                candidate_sections(cfg, ctx.target_local, &found, &poi)?
            }
            _ => Vec::new(),
        };
        Ok(Parts { head, top, hour_header, hour, earlier, trajectory, candidates, tail: format!("{question}\n{instruction}") })
    }

    /// The first `d` units in drop order, as counts per section.
    fn dropped(&self, d: usize) -> Dropped {
        let earlier = d.min(self.earlier.len());
        let candidates = (d - earlier).min(self.candidate_lines());
        let d = d - earlier - candidates;
        let trajectory = d.min(self.trajectory.len() - 1);
        let top_visited = (d - trajectory).min(self.top.len());
        let hour_visits = (d - trajectory - top_visited).min(self.hour.len());
        Dropped { earlier, top_visited, trajectory, hour_visits, candidates }
    }

    fn candidate_lines(&self) -> usize {
        self.candidates.iter().map(|(_, lines)| lines.len()).sum()
    }

    /// The text each droppable unit takes, in drop order (a section's header goes with its last
    /// line), for the token estimate.
    fn drop_units(&self) -> Vec<String> {
        let mut units = Vec::new();
        for (i, line) in self.earlier.iter().enumerate() {
            let header = if i + 1 == self.earlier.len() { format!("\n{EARLIER_HEADER}\n") } else { String::new() };
            units.push(format!("{header}{line}\n"));
        }
        for (header, lines) in self.candidates.iter().rev() {
            for (i, line) in lines.iter().enumerate().rev() {
                let header = if i == 0 { format!("\n{header}\n") } else { String::new() };
                units.push(format!("{header}{line}\n"));
            }
        }
        for line in &self.trajectory[..self.trajectory.len() - 1] {
            units.push(format!("{line}\n"));
        }
        for (i, line) in self.top.iter().enumerate().rev() {
            let header = if i == 0 { format!("\n{TOP_HEADER}\n") } else { String::new() };
            units.push(format!("{header}{line}\n"));
        }
        for (i, line) in self.hour.iter().enumerate().rev() {
            let header = if i == 0 { format!("\n{}\n", self.hour_header) } else { String::new() };
            units.push(format!("{header}{line}\n"));
        }
        units
    }

    fn messages(&self, cfg: &PromptConfig, dropped: Dropped) -> Vec<ChatMessage> {
        let mut sections = vec![self.head.clone()];
        let mut section = |header: &str, lines: &[String]| {
            if !lines.is_empty() {
                sections.push(format!("{header}\n{}", lines.join("\n")));
            }
        };
        section(TOP_HEADER, &self.top[..self.top.len() - dropped.top_visited]);
        section(&self.hour_header, &self.hour[..self.hour.len() - dropped.hour_visits]);
        section(EARLIER_HEADER, &self.earlier[dropped.earlier..]);
        section(TRAJECTORY_HEADER, &self.trajectory[dropped.trajectory..]);
        let mut keep = self.candidate_lines() - dropped.candidates;
        for (header, lines) in &self.candidates {
            let n = keep.min(lines.len());
            section(header, &lines[..n]);
            keep -= n;
        }
        sections.push(self.tail.clone());
        vec![ChatMessage::new("system", cfg.system()), ChatMessage::new("user", sections.join("\n\n"))]
    }
}

/// The train statistics that `cfg`'s candidate lists need, if it asks for any.
pub fn candidate_stats(cfg: &PromptConfig, ds: &Dataset) -> Option<TrainStats> {
    cfg.candidates.any().then(|| TrainStats::new(ds))
}

/// The headers of the candidate lists; none names a POI id (answer-in-prompt reads ids by section).
pub const TRANSITIONS_HEADER: &str = "Often visited next from the current POI, by all users:";
pub const SIMILAR_HEADER: &str = "Visited by users with similar histories:";
pub const NEARBY_HEADER_START: &str = "Popular within";

/// The candidate lists' sections, each candidate with its category, its distance from the
/// current POI, and its source's count.
fn candidate_sections(
    cfg: &PromptConfig,
    at: NaiveDateTime,
    found: &[Candidate],
    poi: &dyn Fn(u32) -> Result<String>,
) -> Result<Vec<(String, Vec<String>)>> {
    let mut sections = Vec::new();
    for source in Source::ALL {
        let mut lines = Vec::new();
        for c in found.iter().filter(|c| c.source == source) {
            let evidence = match source {
                Source::Transitions => format!("{} times, ", c.evidence),
                Source::Nearby => format!("{} check-ins, ", c.evidence),
                Source::SimilarUsers => String::new(),
            };
            lines.push(format!("- {}: {evidence}{:.1} km", poi(c.poi)?, c.distance_km));
        }
        if lines.is_empty() {
            continue;
        }
        let header = match source {
            Source::Transitions => TRANSITIONS_HEADER.to_string(),
            Source::Nearby => format!(
                "{NEARBY_HEADER_START} {} km around {}, by all users (within {} min, any day):",
                cfg.candidates.radius_km,
                at.format("%H:%M"),
                cfg.candidates.hour_window_min
            ),
            Source::SimilarUsers => SIMILAR_HEADER.to_string(),
        };
        sections.push((header, lines));
    }
    Ok(sections)
}

/// Category names and user labels on one line.
fn one_line(s: &str) -> String {
    s.split(|c: char| c.is_control()).map(str::trim).filter(|p| !p.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::parse_answer;
    use crate::data::{Split, Trajectory, User};
    use crate::model::tiny::{tiny_config, write_tiny_model};
    use crate::model::{LoadedModel, ModelSource, load_on};

    /// 2012-04-02 00:00 UTC, a Monday.
    const MONDAY: i64 = 1_333_324_800;
    const DAY: i64 = 86_400;
    const HOUR: i64 = 3600;
    /// New York in summer.
    const TZ: i32 = -240;

    fn tiny_model() -> (tempfile::TempDir, LoadedModel) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &tiny_config("llama"), 0).unwrap();
        let m = load_on(&ModelSource::Folder(dir.path().to_path_buf()), &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
        (dir, m)
    }

    const CATEGORIES: [&str; 8] = ["Coffee Shop", "Office", "Gym", "Bar", "Park", "Subway", "Bakery", "Museum"];

    fn pois() -> Vec<Poi> {
        (0..40u32)
            .map(|i| Poi {
                id: i,
                venue_id: format!("v{i}"),
                category: CATEGORIES[i as usize % CATEGORIES.len()].to_string(),
                lat: 40.7,
                lon: -74.0,
                train_visits: u64::from(i % 3),
            })
            .collect()
    }

    /// One user with five train trajectories (days 0, 2, 4, 6, 8; three check-ins each) and a
    /// test trajectory on day 10 (Thursday 2012-04-12) of four check-ins; the test instance's
    /// target is the fourth, at 14:00 local.
    fn dataset() -> Dataset {
        let mut checkins = Vec::new();
        let mut trajectories = Vec::new();
        // POI 0 in every trajectory, POI 2 in three, the rest distinct.
        let visits: [&[u32]; 6] = [&[0, 10, 2], &[0, 11, 2], &[12, 0, 2], &[0, 13, 14], &[15, 0, 16], &[0, 20, 21, 22]];
        for (t, pois) in visits.iter().enumerate() {
            let start = checkins.len();
            for (j, &poi) in pois.iter().enumerate() {
                // 08:00, 10:00, 12:00, 14:00 local.
                let utc = MONDAY + 2 * DAY * t as i64 + (12 + 2 * j as i64) * HOUR;
                checkins.push(Checkin { poi, utc, tz_offset_min: TZ });
            }
            let split = if t == 5 { Split::Test } else { Split::Train };
            trajectories.push(Trajectory { id: t as u32, user: 0, split, start, len: pois.len() });
        }
        let traj = &checkins[trajectories[5].start..];
        let inst =
            Instance { id: 0, split: Split::Test, user: 0, trajectory: 5, target: traj[3], prefix: traj[..3].to_vec(), is_return: false };
        let users = vec![User { id: 0, source_id: "u0".into() }];
        Dataset::new(pois(), users, checkins, trajectories, [vec![], vec![], vec![inst]]).unwrap()
    }

    fn build(m: &LoadedModel, cfg: PromptConfig, ds: &Dataset) -> BuiltPrompt {
        let inst = &ds.instances(Split::Test)[0];
        let ctx = PromptContext::from_instance(ds, inst);
        PromptBuilder::new(cfg, &m.tokenizer).unwrap().build(&ctx).unwrap()
    }

    fn unlimited() -> PromptConfig {
        PromptConfig { max_prompt_tokens: 0, ..Default::default() }
    }

    fn user_text(p: &BuiltPrompt) -> &str {
        &p.messages[1].content
    }

    #[test]
    fn context_from_instance_splits_history() {
        let ds = dataset();
        let inst = &ds.instances(Split::Test)[0];
        let ctx = PromptContext::from_instance(&ds, inst);
        assert_eq!(ctx.trajectory, &inst.prefix[..]);
        assert_eq!(ctx.earlier.len(), 15);
        assert!(ctx.earlier.iter().all(|c| c.utc < inst.prefix[0].utc));
        assert_eq!(ctx.user, "0");
        assert_eq!(ctx.target_local.to_string(), "2012-04-12 14:00:00");
    }

    #[test]
    fn fields_present() {
        let (_d, m) = tiny_model();
        let ds = dataset();
        let p = build(&m, unlimited(), &ds);
        assert_eq!(p.dropped, Dropped::default());
        assert_eq!(p.messages.len(), 2);
        assert_eq!(p.messages[0].role, "system");
        assert_eq!(p.messages[0].content, DEFAULT_SYSTEM_MESSAGE);
        let u = user_text(&p);
        // Target time and weekday.
        assert!(u.contains("The next check-in is on Thursday 2012-04-12 at 14:00."), "{u}");
        // Short-term: the prefix with local times, ids and categories.
        let traj = u.split(TRAJECTORY_HEADER).nth(1).unwrap();
        for line in ["- Thu 08:00: POI 0 (Coffee Shop)", "- Thu 10:00: POI 20 (Park)", "- Thu 12:00: POI 21 (Subway)"] {
            assert!(traj.contains(line), "{line} missing in {u}");
        }
        assert!(!u.contains("POI 22"), "the target must not leak: {u}");
        // Long-term: visit counts (POI 0: 5 earlier + 1 in the trajectory) and categories.
        assert!(u.contains("- POI 0 (Coffee Shop): 6 visits"), "{u}");
        assert!(u.contains("- POI 2 (Gym): 3 visits"), "{u}");
        assert!(u.contains("- POI 10 (Gym): 1 visit\n"), "{u}");
        // Earlier check-ins with dates; all 15 fit the default cap of 20.
        assert!(u.contains("- Mon 2012-04-02 08:00: POI 0 (Coffee Shop)"), "{u}");
        assert!(u.contains("- Tue 2012-04-10 12:00: POI 16 (Coffee Shop)"), "{u}");
        let earlier = u.split(EARLIER_HEADER).nth(1).unwrap().split(TRAJECTORY_HEADER).next().unwrap();
        assert_eq!(earlier.matches("\n- ").count(), 15);
        // Instruction.
        assert!(u.contains("Answer with exactly 10 distinct POI ids, most likely first"), "{u}");
        assert!(u.ends_with("<answer>id, id, ...</answer>"), "{u}");
        assert!(!u.contains("<think>"));
        // Rendered through the chat template, ending with the assistant's turn.
        assert!(p.text.starts_with("<|im_start|>system\n"));
        assert!(p.text.ends_with("<|im_end|>\n<|im_start|>assistant\n"));
        assert_eq!(p.ids, m.tokenizer.encode(&p.text, false).unwrap());
        // Section order: long-term, then the trajectory, then the question.
        let pos = |s: &str| u.find(s).unwrap();
        assert!(pos(TOP_HEADER) < pos(EARLIER_HEADER));
        assert!(pos(EARLIER_HEADER) < pos(TRAJECTORY_HEADER));
        assert!(pos(TRAJECTORY_HEADER) < pos("The next check-in"));
    }

    #[test]
    fn most_visited_order_and_caps() {
        let (_d, m) = tiny_model();
        let ds = dataset();
        let cfg = PromptConfig { top_visited: 3, recent_checkins: 4, ..unlimited() };
        let p = build(&m, cfg, &ds);
        let u = user_text(&p);
        let top = u.split(TOP_HEADER).nth(1).unwrap().split("\n\n").next().unwrap();
        let lines: Vec<&str> = top.trim().lines().collect();
        // 6 and 3 visits, then the 1-visit POIs by train popularity (id % 3 == 2 first), then id.
        assert_eq!(lines, ["- POI 0 (Coffee Shop): 6 visits", "- POI 2 (Gym): 3 visits", "- POI 11 (Bar): 1 visit"]);
        let earlier = u.split(EARLIER_HEADER).nth(1).unwrap().split("\n\n").next().unwrap();
        // The 4 most recent earlier check-ins, oldest first.
        let lines: Vec<&str> = earlier.trim().lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].contains("2012-04-08 12:00: POI 14"), "{earlier}");
        assert!(lines[3].contains("2012-04-10 12:00: POI 16"), "{earlier}");
    }

    #[test]
    fn ablation_switches() {
        let (_d, m) = tiny_model();
        let ds = dataset();
        let base = user_text(&build(&m, unlimited(), &ds)).to_string();

        let p = build(&m, PromptConfig { long_term: false, ..unlimited() }, &ds);
        let u = user_text(&p);
        assert!(!u.contains(TOP_HEADER) && !u.contains(EARLIER_HEADER) && !u.contains("visit"), "{u}");
        assert!(!u.contains("POI 10") && !u.contains("2012-04-02"));
        assert!(u.contains("- Thu 12:00: POI 21 (Subway)"));

        let p = build(&m, PromptConfig { categories: false, ..unlimited() }, &ds);
        let u = user_text(&p);
        assert!(CATEGORIES.iter().all(|c| !u.contains(c)), "{u}");
        assert!(u.contains("- Thu 12:00: POI 21\n") && u.contains("- POI 0: 6 visits"), "{u}");

        let p = build(&m, PromptConfig { times: false, ..unlimited() }, &ds);
        let u = user_text(&p);
        for s in ["Thu", "Thursday", "14:00", "08:00", "2012", "local time"] {
            assert!(!u.contains(s), "{s} in {u}");
        }
        assert!(u.contains("- POI 21 (Subway)") && u.contains("Which POI will be the next check-in?"), "{u}");

        let p = build(&m, PromptConfig { reasoning: true, ..unlimited() }, &ds);
        let u = user_text(&p);
        assert!(u.contains("First think briefly inside <think>...</think>."), "{u}");
        assert!(u.ends_with("<answer>id, id, ...</answer>"));
        assert!(!base.contains("think"));

        let p = build(&m, PromptConfig { k: 5, ..unlimited() }, &ds);
        assert!(user_text(&p).contains("exactly 5 distinct POI ids"));
        let p = build(&m, PromptConfig { k: 1, ..unlimited() }, &ds);
        assert!(user_text(&p).contains("exactly 1 POI id,"));

        let p = build(&m, PromptConfig { system_message: Some("Be brief.".into()), ..unlimited() }, &ds);
        assert_eq!(p.messages[0].content, "Be brief.");
        assert_eq!(user_text(&p), base);
    }

    #[test]
    fn budget_drops_oldest_first() {
        let (_d, m) = tiny_model();
        let ds = dataset();
        let full = build(&m, unlimited(), &ds);
        let n = full.ids.len();
        let mut last = Dropped::default();
        // Shrink the budget step by step: drops only grow, in section order.
        let mut budget = n;
        loop {
            let cfg = PromptConfig { max_prompt_tokens: budget, ..Default::default() };
            let inst = &ds.instances(Split::Test)[0];
            let ctx = PromptContext::from_instance(&ds, inst);
            let Ok(p) = PromptBuilder::new(cfg, &m.tokenizer).unwrap().build(&ctx) else { break };
            assert!(p.ids.len() <= budget, "{} tokens over budget {budget}", p.ids.len());
            assert_eq!(p.ids, m.tokenizer.encode(&p.text, false).unwrap());
            let d = p.dropped;
            assert!(d.earlier >= last.earlier && d.top_visited >= last.top_visited && d.trajectory >= last.trajectory);
            // Section order: nothing from a later section before the earlier one is gone.
            if d.trajectory > 0 {
                assert_eq!(d.earlier, 15, "{d:?}");
            }
            if d.top_visited > 0 {
                assert_eq!(d.trajectory, 2, "{d:?}");
            }
            assert!(d.trajectory <= 2);
            let u = user_text(&p);
            // The last check-in of the trajectory is always there.
            assert!(u.contains("- Thu 12:00: POI 21 (Subway)"), "{u}");
            // Oldest first: the kept earlier check-ins are the most recent ones.
            if d.earlier > 0 && d.earlier < 15 {
                assert!(!u.contains("2012-04-02 08:00"));
                assert!(u.contains("2012-04-10 12:00: POI 16"));
            }
            // Least visited first: the most visited survives while the list is there.
            if d.top_visited < 10 {
                assert!(u.contains("- POI 0 (Coffee Shop): 6 visits"));
            }
            // Minimal: keeping one more unit would not fit (a byte-level tokenizer counts
            // exactly, so the estimate is exact here).
            if d.total() > 0 {
                let bigger = PromptBuilder::new(unlimited(), &m.tokenizer).unwrap();
                let parts = Parts::new(bigger.config(), &ctx).unwrap();
                let p2 = bigger.render(&parts, d.total() - 1).unwrap();
                assert!(p2.ids.len() > budget, "dropping {} would have fit {budget}", d.total() - 1);
            }
            last = d;
            budget -= 7;
        }
        assert_eq!(last, Dropped { earlier: 15, top_visited: 10, trajectory: 2, hour_visits: 0, candidates: 0 });
        // Below the fixed part: a clear error.
        let cfg = PromptConfig { max_prompt_tokens: 50, ..Default::default() };
        let inst = &ds.instances(Split::Test)[0];
        let err = PromptBuilder::new(cfg, &m.tokenizer).unwrap().build(&PromptContext::from_instance(&ds, inst)).unwrap_err();
        assert!(err.to_string().contains("max_prompt_tokens = 50"), "{err}");
    }

    #[test]
    fn around_the_hour_list() {
        let (_d, m) = tiny_model();
        let ds = dataset();
        // The target is at 14:00; every check-in is at 08:00, 10:00, 12:00 or 14:00, so a
        // 60-minute window holds none of the history and the section is left out.
        let u = user_text(&build(&m, PromptConfig { hour_visits: 3, ..unlimited() }, &ds)).to_string();
        assert!(!u.contains("Visited around"), "{u}");
        // 120 minutes take in the 12:00 check-ins: POI 2 three times, POIs 14, 16, 21 once
        // (ties in the counter's order: train popularity id % 3, so 14, 16, 21).
        let cfg = PromptConfig { hour_visits: 3, hour_window_min: 120, ..unlimited() };
        let u = user_text(&build(&m, cfg.clone(), &ds)).to_string();
        let header = "Visited around 14:00 (within 120 min, any day):";
        let section = u.split(header).nth(1).unwrap().split("\n\n").next().unwrap();
        let lines: Vec<&str> = section.trim().lines().collect();
        assert_eq!(lines, ["- POI 2 (Gym): 3 of 3 visits", "- POI 14 (Bakery): 1 of 1 visit", "- POI 16 (Coffee Shop): 1 of 1 visit"]);
        let pos = |s: &str| u.find(s).unwrap();
        assert!(pos(TOP_HEADER) < pos(header) && pos(header) < pos(EARLIER_HEADER), "{u}");
        // It belongs to the long-term memory and names the time: ablating either removes it.
        for cfg in [PromptConfig { times: false, ..cfg.clone() }, PromptConfig { long_term: false, ..cfg.clone() }] {
            assert!(!cfg.shows_hour_list());
            let u = user_text(&build(&m, cfg, &ds)).to_string();
            assert!(!u.contains("Visited around") && !u.contains(" of 3 visits"), "{u}");
        }
        let err = PromptBuilder::new(PromptConfig { hour_window_min: 721, ..cfg }, &m.tokenizer).err().unwrap();
        assert!(err.to_string().contains("at most 720"), "{err}");
    }

    #[test]
    fn budget_drops_the_around_the_hour_list_last() {
        let (_d, m) = tiny_model();
        let ds = dataset();
        let hour = PromptConfig { hour_visits: 10, hour_window_min: 120, ..unlimited() };
        let n = build(&m, hour.clone(), &ds).ids.len();
        let mut budget = n;
        let mut last = Dropped::default();
        while let Ok(p) = PromptBuilder::new(PromptConfig { max_prompt_tokens: budget, ..hour.clone() }, &m.tokenizer)
            .unwrap()
            .build(&PromptContext::from_instance(&ds, &ds.instances(Split::Test)[0]))
        {
            assert!(p.ids.len() <= budget);
            if p.dropped.hour_visits > 0 {
                assert_eq!((p.dropped.earlier, p.dropped.trajectory, p.dropped.top_visited), (15, 2, 10), "{:?}", p.dropped);
                // The list loses its last entries first.
                let kept_first = user_text(&p).contains("- POI 2 (Gym): 3 of 3 visits");
                assert_eq!(kept_first, p.dropped.hour_visits < 4, "{:?}", p.dropped);
            }
            last = p.dropped;
            budget -= 5;
        }
        assert_eq!(last, Dropped { earlier: 15, top_visited: 10, trajectory: 2, hour_visits: 4, candidates: 0 });
    }

    #[test]
    fn candidate_lists_skip_shown_pois_and_go_after_the_earlier_checkins() {
        let (_d, m) = tiny_model();
        let ds = crate::retrieval::tests::random_dataset(7);
        let stats = TrainStats::new(&ds);
        let candidates = CandidateConfig { transitions: 3, nearby: 3, similar: 3, radius_km: 5.0, hour_window_min: 90, similar_users: 3 };
        let cfg = PromptConfig { top_visited: 3, recent_checkins: 4, candidates, ..unlimited() };
        let mut checked = 0;
        for inst in ds.instances(Split::Test) {
            let ctx = PromptContext::from_instance_with(&ds, inst, Some(&stats));
            let p = PromptBuilder::new(cfg.clone(), &m.tokenizer).unwrap().build(&ctx).unwrap();
            let text = user_text(&p);
            // Each candidate is named once, and never in the user's own sections.
            let blocks: Vec<&str> = text.split("\n\n").collect();
            let own: String = blocks
                .iter()
                .filter(|b| !b.starts_with(TRANSITIONS_HEADER) && !b.starts_with(NEARBY_HEADER_START) && !b.starts_with(SIMILAR_HEADER))
                .copied()
                .collect();
            let listed: Vec<&str> = blocks
                .iter()
                .filter(|b| b.starts_with(TRANSITIONS_HEADER) || b.starts_with(NEARBY_HEADER_START) || b.starts_with(SIMILAR_HEADER))
                .flat_map(|b| b.lines().skip(1))
                .collect();
            for line in &listed {
                let id = line.trim_start_matches("- POI ").split([' ', ':']).next().unwrap();
                assert!(!own.contains(&format!("POI {id} ")) && !own.contains(&format!("POI {id}:")), "{line} is also in the user's lists");
                assert_eq!(listed.iter().filter(|l| l.starts_with(&format!("- POI {id} "))).count(), 1);
            }
            checked += listed.len();
            // Without statistics there are no candidate lists, whatever the config says.
            let plain = PromptBuilder::new(cfg.clone(), &m.tokenizer).unwrap().build(&PromptContext::from_instance(&ds, inst)).unwrap();
            assert!(!user_text(&plain).contains(TRANSITIONS_HEADER) && !user_text(&plain).contains(NEARBY_HEADER_START));

            // Under a shrinking budget, the candidates go after the earlier check-ins and before the trajectory.
            let n = p.ids.len();
            let mut budget = n;
            while let Ok(q) =
                PromptBuilder::new(PromptConfig { max_prompt_tokens: budget, ..cfg.clone() }, &m.tokenizer).unwrap().build(&ctx)
            {
                let d = q.dropped;
                if d.candidates > 0 {
                    assert_eq!(d.earlier, ctx.earlier.len().min(4), "{d:?}");
                }
                if d.trajectory > 0 {
                    assert_eq!(d.candidates, listed.len(), "{d:?}");
                }
                budget -= 4;
            }
        }
        assert!(checked > 0, "the test saw no candidates");
    }

    #[test]
    fn budget_just_below_full_drops_one_line() {
        let (_d, m) = tiny_model();
        let ds = dataset();
        let n = build(&m, unlimited(), &ds).ids.len();
        let p = build(&m, PromptConfig { max_prompt_tokens: n - 1, ..Default::default() }, &ds);
        assert_eq!(p.dropped, Dropped { earlier: 1, top_visited: 0, trajectory: 0, hour_visits: 0, candidates: 0 });
        assert!(!user_text(&p).contains("2012-04-02 08:00"));
        assert!(user_text(&p).contains("2012-04-02 10:00"));
        let p = build(&m, PromptConfig { max_prompt_tokens: n, ..Default::default() }, &ds);
        assert_eq!(p.dropped.total(), 0);
    }

    /// With a real BPE tokenizer, lines merge across their boundaries (`\n\n` is one token), so
    /// the per-line estimate is off and the verify-and-adjust steps matter. Runs when the
    /// default model has been fetched.
    #[test]
    fn budget_with_the_default_model_tokenizer() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(crate::model::DEFAULT_MODEL);
        if !path.exists() {
            eprintln!("skipped: {} not fetched", path.display());
            return;
        }
        let m = load_on(&ModelSource::Gguf(path), &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
        let ds = dataset();
        let inst = &ds.instances(Split::Test)[0];
        let ctx = PromptContext::from_instance(&ds, inst);
        let full = build(&m, unlimited(), &ds).ids.len();
        let exact = PromptBuilder::new(unlimited(), &m.tokenizer).unwrap();
        let parts = Parts::new(exact.config(), &ctx).unwrap();
        let mut fitted = 0;
        for budget in (100..=full + 5).rev() {
            let cfg = PromptConfig { max_prompt_tokens: budget, ..Default::default() };
            let Ok(p) = PromptBuilder::new(cfg, &m.tokenizer).unwrap().build(&ctx) else { break };
            fitted += 1;
            assert!(p.ids.len() <= budget, "{} tokens over budget {budget}", p.ids.len());
            assert_eq!(p.ids, m.tokenizer.encode(&p.text, false).unwrap());
            let d = p.dropped.total();
            if d > 0 {
                let n = exact.render(&parts, d - 1).unwrap().ids.len();
                assert!(n > budget, "budget {budget}: dropping {} units would have fit ({n} tokens)", d - 1);
            }
        }
        assert!(fitted > 100, "only {fitted} budgets fit");
    }

    #[test]
    fn deterministic() {
        let (_d, m) = tiny_model();
        let ds = dataset();
        let n = build(&m, unlimited(), &ds).ids.len();
        for budget in [0, n, n - 30, n - 300, n - 600] {
            let cfg = PromptConfig { max_prompt_tokens: budget, ..Default::default() };
            assert_eq!(build(&m, cfg.clone(), &ds), build(&m, cfg, &ds));
        }
    }

    #[test]
    fn context_from_raw_checkins() {
        let pois = pois();
        let c = |poi, utc| Checkin { poi, utc, tz_offset_min: TZ };
        // Two runs split by a gap of more than 24 h; the target comes 3 days after the last.
        let history = [c(1, MONDAY), c(2, MONDAY + HOUR), c(3, MONDAY + 3 * DAY), c(4, MONDAY + 3 * DAY + 23 * HOUR)];
        let target = MONDAY + 7 * DAY;
        let ctx = PromptContext::from_checkins(&pois, "alice", &history, target, TZ, 24.0).unwrap();
        assert_eq!(ctx.earlier, &history[..2]);
        assert_eq!(ctx.trajectory, &history[2..]);
        assert_eq!(ctx.target_local.to_string(), "2012-04-08 20:00:00");
        let u = PromptConfig::default().messages(&ctx).unwrap()[1].content.clone();
        assert!(u.contains("Check-ins of user alice") && u.contains("Sunday 2012-04-08 at 20:00"), "{u}");
        // A shorter gap splits the trajectory further.
        let ctx = PromptContext::from_checkins(&pois, "", &history, target, TZ, 12.0).unwrap();
        assert_eq!(ctx.trajectory, &history[3..]);
        let u = PromptConfig::default().messages(&ctx).unwrap()[1].content.clone();
        assert!(u.contains("Check-ins of the user"), "{u}");

        let err = |h: &[Checkin], t: i64| PromptContext::from_checkins(&pois, "u", h, t, TZ, 24.0).unwrap_err().to_string();
        assert!(err(&[], target).contains("no check-ins"));
        assert!(err(&[c(99, MONDAY)], target).contains("POI 99"));
        assert!(err(&[c(1, target)], target).contains("not before the target"));
        assert!(err(&[c(1, MONDAY + HOUR), c(2, MONDAY)], target).contains("time order"));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (_d, m) = tiny_model();
        assert!(PromptBuilder::new(PromptConfig { k: 0, ..Default::default() }, &m.tokenizer).is_err());
        let pois = pois();
        let ctx = PromptContext {
            user: "1".into(),
            target_local: NaiveDateTime::default(),
            trajectory: &[],
            earlier: &[],
            pois: &pois,
            retrieval: None,
            codebook: None,
        };
        assert!(PromptConfig::default().messages(&ctx).is_err());
        let traj = [Checkin { poi: 400, utc: 0, tz_offset_min: 0 }];
        let ctx = PromptContext { trajectory: &traj, ..ctx };
        assert!(PromptConfig::default().messages(&ctx).unwrap_err().to_string().contains("POI 400"));
    }

    #[test]
    fn config_from_toml() {
        let cfg: PromptConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, PromptConfig::default());
        assert_eq!((cfg.k, cfg.max_prompt_tokens, cfg.top_visited, cfg.recent_checkins), (10, 512, 10, 20));
        assert!(cfg.long_term && cfg.categories && cfg.times && !cfg.reasoning && cfg.system_message.is_none());
        let cfg: PromptConfig = toml::from_str("k = 5\nreasoning = true\nsystem_message = \"hi\"").unwrap();
        assert_eq!((cfg.k, cfg.reasoning, cfg.system_message.as_deref()), (5, true, Some("hi")));
        let err = toml::from_str::<PromptConfig>("kk = 5").unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn sft_target_parses_as_well_formed() {
        let ds = dataset();
        let n = ds.num_pois();
        for reasoning in [None, Some("They start at the coffee shop and go to the park.")] {
            let text = format_answer(&[22, 0, 2], reasoning);
            let p = parse_answer(&text, n);
            assert!(p.well_formed, "{text}");
            assert_eq!(p.ids, vec![22, 0, 2]);
            assert_eq!(p.think.as_deref(), reasoning);
        }
    }
}
