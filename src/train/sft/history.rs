//! Whole-history examples (`sft.examples = "histories"`): a user's train trajectories written as
//! the prompt's trajectory lines, `- Mon 12:20: <a1><b0><c3>` (with ` (Bar)` when
//! `prompt.categories` is on; `<Mon><12h><a1><b0><c3>` with `prompt.time_tokens`), a blank line
//! between trajectories, where every check-in's POI
//! name is a target. One forward pass scores every check-in of a window, so one epoch covers the
//! whole train split; the list answer is taught afterwards (list SFT, GRPO).
//!
//! A user's check-ins are cut into windows of at most `sft.history_tokens` tokens, each opening
//! with the user's header line; a check-in's tokens never straddle two windows.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};

use crate::answer::AnswerIds;
use crate::data::{Checkin, Dataset, Split};
use crate::model::TextTokenizer;
use crate::prompt::{PromptConfig, checkin_line_start, poi_name};
use crate::train::ScoredSeq;

/// Every window of every user's train check-ins, users in id order.
pub fn history_examples(ds: &Dataset, cfg: &PromptConfig, tokenizer: &TextTokenizer, max_tokens: usize) -> Result<Vec<ScoredSeq>> {
    let codebook = AnswerIds::new(cfg.ids, ds.codebook())?.codebook();
    let mut by_user: BTreeMap<u32, Vec<&[Checkin]>> = BTreeMap::new();
    for t in ds.trajectories().iter().filter(|t| t.split == Split::Train) {
        by_user.entry(t.user).or_default().push(ds.trajectory_checkins(t));
    }
    let mut out = Vec::new();
    for (user, mut trajectories) in by_user {
        trajectories.sort_by_key(|t| t[0].utc);
        let header = tokenizer.encode(&format!("Check-ins of user {user}, in local time.\n"), false)?;
        let mut window = ScoredSeq { ids: header.clone(), targets: Vec::new() };
        let starts = trajectories.iter().scan(0, |n, t| {
            *n += t.len();
            Some(*n - t.len())
        });
        let first_of_trajectory: std::collections::HashSet<usize> = starts.collect();
        for (i, c) in trajectories.into_iter().flatten().enumerate() {
            let (name, suffix) = poi_name(cfg, codebook, ds.pois(), c.poi)?;
            let gap = if i > 0 && first_of_trajectory.contains(&i) { "\n" } else { "" };
            let before = format!("{gap}{}", checkin_line_start(cfg, c.local_time(), false));
            // The line is encoded whole, as a prompt's line is (` POI 12` starts with the token
            // ` POI`, not with a space token and `POI`); the targets are the tokens that cover
            // any byte of the name.
            let text = format!("{before}{name}{suffix}\n");
            let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
            let named = before.len()..before.len() + name.len();
            ensure!(header.len() + ids.len() <= max_tokens, "sft.history_tokens = {max_tokens} cannot hold a header and one check-in line");
            if window.ids.len() + ids.len() > max_tokens {
                out.push(std::mem::replace(&mut window, ScoredSeq { ids: header.clone(), targets: Vec::new() }));
            }
            let start = window.ids.len();
            window
                .targets
                .extend(offsets.iter().enumerate().filter(|(_, (a, b))| *a < named.end && *b > named.start).map(|(j, _)| start + j));
            window.ids.extend(ids);
        }
        if !window.targets.is_empty() {
            out.push(window);
        }
    }
    ensure!(!out.is_empty(), "{} has no train check-ins", "the dataset");
    Ok(out)
}
