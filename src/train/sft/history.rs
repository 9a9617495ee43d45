//! Whole-history examples (`sft.examples = "histories"`): a user's train trajectories written as
//! the prompt's trajectory lines, `- Mon 12:20: <a1><b0><c3>` (with ` (Bar)` when
//! `prompt.categories` is on; `<Mon><12h><a1><b0><c3>` with `prompt.time_tokens`), a blank line
//! between trajectories, where every check-in's POI name is a target. One forward pass scores
//! every check-in of a window, so one epoch covers the whole train split; the list answer is
//! taught afterwards (list SFT, GRPO).
//!
//! A user's check-ins are cut into windows of at most `sft.history_tokens` tokens, each opening
//! with the user's header line; a check-in's tokens never straddle two windows.
//!
//! The form itself is [`crate::history_prompt`]'s, which `eval --beam-next` prompts with too.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};

use crate::answer::AnswerIds;
use crate::data::{Checkin, Dataset, Split};
use crate::history_prompt::{checkin_line, header, in_time_order};
use crate::model::TextTokenizer;
use crate::prompt::PromptConfig;
use crate::train::ScoredSeq;

/// Every window of every user's train check-ins, users in id order.
pub fn history_examples(ds: &Dataset, cfg: &PromptConfig, tokenizer: &TextTokenizer, max_tokens: usize) -> Result<Vec<ScoredSeq>> {
    let codebook = AnswerIds::new(cfg.ids, ds.codebook())?.codebook();
    let mut by_user: BTreeMap<u32, Vec<&[Checkin]>> = BTreeMap::new();
    for t in ds.trajectories().iter().filter(|t| t.split == Split::Train) {
        by_user.entry(t.user).or_default().push(ds.trajectory_checkins(t));
    }
    let mut out = Vec::new();
    for (user, trajectories) in by_user {
        let header = tokenizer.encode(&header(user), false)?;
        let mut window = ScoredSeq { ids: header.clone(), targets: Vec::new() };
        for (c, opens) in in_time_order(trajectories, i64::MAX) {
            let (text, named) = checkin_line(cfg, codebook, ds.pois(), c, opens)?;
            // The line is encoded whole, as a prompt's line is (` POI 12` starts with the token
            // ` POI`, not with a space token and `POI`); the targets are the tokens that cover
            // any byte of the name.
            let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
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
