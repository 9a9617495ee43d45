//! The whole-history form: a user's check-ins as lines, `- Mon 12:20: <a1><b0><c3>` (with
//! ` (Bar)` when `prompt.categories` is on; `<Mon><12h><a1><b0><c3>` with `prompt.time_tokens`),
//! a blank line between trajectories, after a header naming the user. Whole-history SFT
//! ([`crate::train::sft::history`]) trains on windows of it; `eval --beam-next` prompts with it,
//! cut before the target and ended with the target's line start, so that what the model writes
//! next is the target's POI name ([`next_checkin_prompt`]).

use std::ops::Range;

use anyhow::{Context, Result, ensure};
use chrono::NaiveDateTime;

use crate::answer::AnswerIds;
use crate::data::codebook::Codebook;
use crate::data::{Checkin, Dataset, Instance, Poi};
use crate::model::TextTokenizer;
use crate::prompt::{HistoryWindow, PromptConfig, checkin_line_start, poi_name};

/// The prompt of ranking `inst`'s target by what the model writes next: its user's header, as
/// many of the user's latest check-ins before the target as fit in `max_tokens` (their
/// trajectories of every split, each line encoded alone, as whole-history windows encode
/// them), then the target's line start (`<Sat><17h>`). Its continuation is the target's POI
/// name.
pub fn next_checkin_prompt(
    ds: &Dataset,
    cfg: &PromptConfig,
    tokenizer: &TextTokenizer,
    inst: &Instance,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    user_next_checkin_prompt(ds, cfg, tokenizer, inst.user, inst.target.utc, inst.target.local_time(), max_tokens)
        .with_context(|| format!("instance {}", inst.id))
}

/// [`next_checkin_prompt`] for dataset user `user` (dense id) at `before` (UTC seconds; the
/// check-ins before it are shown), whose local time is `at`: what `recommend --beam-next` asks.
pub fn user_next_checkin_prompt(
    ds: &Dataset,
    cfg: &PromptConfig,
    tokenizer: &TextTokenizer,
    user: u32,
    before: i64,
    at: NaiveDateTime,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let codebook = AnswerIds::new(cfg.ids, ds.codebook())?.codebook();
    let header = tokenizer.encode(&header(user), false)?;
    let start = tokenizer.encode(&checkin_line_start(cfg, at, false), false)?;
    ensure!(header.len() + start.len() < max_tokens, "a budget of {max_tokens} tokens cannot hold a header and the target's time");
    let trajectories = ds.trajectories().iter().filter(|t| t.user == user).map(|t| ds.trajectory_checkins(t)).collect();
    let checkins = in_time_order(trajectories, before);
    ensure!(!checkins.is_empty(), "user {user} has no check-in before {}", crate::data::format_utc(before));
    let room = max_tokens - header.len() - start.len();
    let line = |&(c, opens): &(&Checkin, bool)| tokenizer.encode(&checkin_line(cfg, codebook, ds.pois(), c, opens)?.0, false);
    let lines: Vec<Vec<u32>> = match cfg.history_window {
        HistoryWindow::Latest => {
            let (mut lines, mut room) = (Vec::new(), room);
            for c in checkins.iter().rev() {
                let ids = line(c)?;
                if ids.len() > room {
                    break;
                }
                room -= ids.len();
                lines.push(ids);
            }
            lines.reverse();
            lines
        }
        HistoryWindow::Anchored => {
            let mut lines = checkins.iter().map(line).collect::<Result<Vec<_>>>()?;
            let first = anchored_start(&lines.iter().map(Vec::len).collect::<Vec<_>>(), room);
            lines.drain(..first);
            lines
        }
    };
    Ok(header.into_iter().chain(lines.into_iter().flatten()).chain(start).collect())
}

/// The first line of an anchored window over lines of `lens` tokens that must fit in `room`:
/// the earliest of the anchors (line 0, then the first line after each stretch of at least
/// `room / 2` tokens) whose lines to the end fit. Anchors depend only on the lines before
/// them, so a user's next prompt, one line longer, starts at the same line or a later anchor.
/// With no anchor whose lines fit (lines near the room's size), none of the lines. Every line
/// is encoded for this, each prompt: linear in the user's history.
fn anchored_start(lens: &[usize], room: usize) -> usize {
    let mut anchors = vec![0];
    let mut stretch = 0;
    for (i, &len) in lens.iter().enumerate() {
        if stretch >= room / 2 && stretch > 0 {
            anchors.push(i);
            stretch = 0;
        }
        stretch += len;
    }
    let mut after = lens.iter().sum::<usize>();
    let mut at = 0;
    for a in anchors {
        after -= lens[at..a].iter().sum::<usize>();
        at = a;
        if after <= room {
            return a;
        }
    }
    lens.len()
}

/// The token budget of a next-check-in prompt: `max_prompt_tokens`, or with none the model's
/// positions less a code's.
pub fn next_checkin_budget(cfg: &PromptConfig, model: &crate::model::CausalLm, codebook: &Codebook) -> usize {
    match cfg.max_prompt_tokens {
        0 => model.config.max_position_embeddings - codebook.levels(),
        n => n,
    }
}

/// The first line of every whole-history window and next-check-in prompt.
pub fn header(user: u32) -> String {
    format!("Check-ins of user {user}, in local time.\n")
}

/// The check-ins of `trajectories` before `before` (UTC seconds), in time order, each with
/// whether it opens a trajectory other than the first.
pub fn in_time_order(mut trajectories: Vec<&[Checkin]>, before: i64) -> Vec<(&Checkin, bool)> {
    trajectories.sort_by_key(|t| t.first().map_or(i64::MAX, |c| c.utc));
    trajectories
        .into_iter()
        .enumerate()
        .flat_map(|(n, t)| t.iter().take_while(move |c| c.utc < before).enumerate().map(move |(i, c)| (c, n > 0 && i == 0)))
        .collect()
}

/// A check-in's line (after a blank line when it `opens` a trajectory) and the byte range of
/// its POI's name in it.
pub fn checkin_line(
    cfg: &PromptConfig,
    codebook: Option<&Codebook>,
    pois: &[Poi],
    c: &Checkin,
    opens: bool,
) -> Result<(String, Range<usize>)> {
    let (name, suffix) = poi_name(cfg, codebook, pois, c.poi)?;
    let before = format!("{}{}", if opens { "\n" } else { "" }, checkin_line_start(cfg, c.local_time(), false));
    let named = before.len()..before.len() + name.len();
    Ok((format!("{before}{name}{suffix}\n"), named))
}

#[cfg(test)]
mod tests {
    use super::anchored_start;

    /// Hand-worked windows: anchors every half room from the first line; the earliest whose
    /// lines to the end fit; a line too long for the room leaves none.
    #[test]
    fn anchored_windows_start_at_the_earliest_anchor_that_fits() {
        // Lines of 5 tokens, room 20: anchors at lines 0, 2, 4, 6, 8 (every 10 tokens).
        assert_eq!(anchored_start(&[5; 10], 20), 6, "50 tokens: from line 6, 20 fit");
        assert_eq!(anchored_start(&[5; 11], 20), 8, "55 tokens: from 6 would be 25; from 8, 15");
        assert_eq!(anchored_start(&[5; 4], 20), 0, "the whole history fits");
        assert_eq!(anchored_start(&[], 20), 0);
        assert_eq!(anchored_start(&[30], 20), 1, "a line longer than the room: none shown");
        // One line more never moves the start back, and the window keeps at least half the room
        // less a line.
        let lens: Vec<usize> = (0..200).map(|i| 4 + (i * 7) % 5).collect();
        let mut last = 0;
        for n in 0..=lens.len() {
            let first = anchored_start(&lens[..n], 40);
            let shown: usize = lens[first..n].iter().sum();
            assert!(first >= last && shown <= 40, "n {n}: from {first} ({shown} tokens), before from {last}");
            assert!(shown + 8 >= 20 || first == 0, "n {n}: {shown} tokens shown");
            last = first;
        }
    }
}
