//! Answer-in-prompt: how often the prompt names the target POI at all, and in which of its
//! sections. A model that answers with POIs from its prompt cannot do better than this share,
//! so it belongs next to every model's numbers (`refine-poi prompt-stats`).

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use crate::answer::AnswerIds;
use crate::data::{Dataset, Instance, Split};
use crate::eval::sample;
use crate::history_prompt::next_checkin_prompt;
use crate::model::TextTokenizer;
use crate::prompt::{
    NEARBY_HEADER_START, PromptBuilder, PromptConfig, PromptContext, SIMILAR_HEADER, TRANSITIONS_HEADER, candidate_stats, poi_name,
};

/// The sections of a prompt's user message, named by their headers (see `src/prompt.rs`).
const SECTIONS: [(&str, &str); 7] = [
    ("Most visited POIs", "most_visited"),
    ("Visited around", "around_the_hour"),
    ("Earlier check-ins", "earlier"),
    ("Current trajectory", "trajectory"),
    (TRANSITIONS_HEADER, "cand_transitions"),
    (NEARBY_HEADER_START, "cand_nearby"),
    (SIMILAR_HEADER, "cand_similar"),
];

/// The column that counts any of the candidate lists.
const CANDIDATES: &str = "candidates";

/// The sections of `text` (a prompt's user message; blocks separated by a blank line) that
/// name the target by `name`, as the prompt writes it (`POI 12`, or a code `<a1><b0><c3>`);
/// `"other"` for a block without a known header.
pub fn sections_naming(text: &str, name: &str) -> Vec<&'static str> {
    let mut found = Vec::new();
    for block in text.split("\n\n") {
        if !names_poi(block, name) {
            continue;
        }
        let header = block.lines().next().unwrap_or("");
        let name = SECTIONS.iter().find(|(h, _)| header.starts_with(h)).map_or("other", |(_, n)| *n);
        if !found.contains(&name) {
            found.push(name);
        }
    }
    found
}

/// Whether `text` mentions `name` whole: `POI 12` is not the start of `POI 120`. (A code ends
/// with `>`, so no code is the start of another.)
fn names_poi(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(i, m)| !text[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// One group's shares.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GroupInPrompt {
    pub n: u64,
    /// Instances whose prompt names the target anywhere, and their share.
    pub in_prompt: u64,
    pub share: f64,
    /// Share of instances whose target is named in each section.
    pub by_section: BTreeMap<String, f64>,
}

/// Answer-in-prompt for all, return and discovery instances.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InPrompt {
    pub split: Split,
    pub instances: u64,
    /// Mean tokens of the rendered prompts (what the candidate lists cost).
    pub mean_prompt_tokens: f64,
    pub groups: BTreeMap<String, GroupInPrompt>,
}

/// Builds the prompt of every instance of `split` (a fixed sample with `limit`, as `eval`
/// takes) and counts where its target appears.
pub fn answer_in_prompt(ds: &Dataset, split: Split, prompts: &PromptBuilder, limit: Option<usize>) -> Result<InPrompt> {
    let stats = candidate_stats(prompts.config(), ds);
    let codebook = AnswerIds::new(prompts.config().ids, ds.codebook())?.codebook();
    count_in_prompt(ds, split, limit, |inst| {
        let built = prompts.build(&PromptContext::from_instance_with(ds, inst, stats.as_ref()))?;
        let user: String = built.messages.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n");
        let (name, _) = poi_name(prompts.config(), codebook, ds.pois(), inst.target.poi)?;
        Ok((built.ids.len(), sections_naming(&user, &name)))
    })
}

/// Answer-in-prompt of `eval --beam-next`'s prompts (the whole-history form within `budget`
/// tokens): whether the check-ins shown include the target, as section `history`.
pub fn answer_in_history_prompt(
    ds: &Dataset,
    split: Split,
    cfg: &PromptConfig,
    tokenizer: &TextTokenizer,
    budget: usize,
    limit: Option<usize>,
) -> Result<InPrompt> {
    let codebook = AnswerIds::new(cfg.ids, ds.codebook())?.codebook();
    count_in_prompt(ds, split, limit, |inst| {
        let ids = next_checkin_prompt(ds, cfg, tokenizer, inst, budget)?;
        let (name, _) = poi_name(cfg, codebook, ds.pois(), inst.target.poi)?;
        let named = names_poi(&tokenizer.decode(&ids, false)?, &name);
        Ok((ids.len(), if named { vec![HISTORY] } else { Vec::new() }))
    })
}

/// The section of a whole-history prompt.
const HISTORY: &str = "history";

/// Counts, over the instances of `split` (`limit`: eval's fixed sample), the sections that
/// `prompt` says name each target, and its prompts' mean length.
fn count_in_prompt(
    ds: &Dataset,
    split: Split,
    limit: Option<usize>,
    mut prompt: impl FnMut(&Instance) -> Result<(usize, Vec<&'static str>)>,
) -> Result<InPrompt> {
    let instances = sample(ds.instances(split), limit);
    let mut counts: BTreeMap<String, (u64, u64, BTreeMap<String, u64>)> = BTreeMap::new();
    let mut tokens = 0usize;
    for inst in &instances {
        let (len, sections) = prompt(inst)?;
        tokens += len;
        let group = if inst.is_return { "return" } else { "discovery" };
        for g in ["all", group] {
            let c = counts.entry(g.to_string()).or_default();
            c.0 += 1;
            c.1 += u64::from(!sections.is_empty());
            for s in &sections {
                *c.2.entry(s.to_string()).or_default() += 1;
            }
            if sections.iter().any(|s| s.starts_with("cand_")) {
                *c.2.entry(CANDIDATES.to_string()).or_default() += 1;
            }
        }
    }
    let groups = counts
        .into_iter()
        .map(|(g, (n, hit, by))| {
            let by_section = by.into_iter().map(|(s, k)| (s, k as f64 / n as f64)).collect();
            (g, GroupInPrompt { n, in_prompt: hit, share: hit as f64 / n as f64, by_section })
        })
        .collect();
    let mean_prompt_tokens = tokens as f64 / instances.len().max(1) as f64;
    Ok(InPrompt { split, instances: instances.len() as u64, mean_prompt_tokens, groups })
}

/// The shares as a table for people.
pub fn format_in_prompt(r: &InPrompt) -> String {
    let mut s = format!(
        "target named in the prompt, {} ({} instances, {:.0} prompt tokens on average)\n",
        r.split, r.instances, r.mean_prompt_tokens
    );
    s.push_str(&format!("{:<10} {:>6} {:>9}", "group", "n", "anywhere"));
    let history = r.groups.values().any(|g| g.by_section.contains_key(HISTORY));
    let columns: Vec<&str> = SECTIONS.iter().map(|(_, n)| *n).chain([CANDIDATES]).chain(history.then_some(HISTORY)).collect();
    for name in &columns {
        s.push_str(&format!(" {name:>16}"));
    }
    s.push('\n');
    for g in ["all", "return", "discovery"] {
        let Some(x) = r.groups.get(g) else { continue };
        s.push_str(&format!("{g:<10} {:>6} {:>9.4}", x.n, x.share));
        for name in &columns {
            s.push_str(&format!(" {:>16.4}", x.by_section.get(*name).copied().unwrap_or(0.0)));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_target_by_whole_id_and_section() {
        let text = "Check-ins of user 5.\n\nMost visited POIs:\n- POI 12 (Bar): 3 visits\n- POI 7 (Park): 1 visit\n\n\
                    Current trajectory (oldest first):\n- Fri 17:59: POI 120 (Bar)\n- Fri 18:30: POI 7 (Park)\n\n\
                    Answer with exactly 10 distinct POI ids.";
        assert_eq!(sections_naming(text, "POI 7"), vec!["most_visited", "trajectory"]);
        assert_eq!(sections_naming(text, "POI 12"), vec!["most_visited"]);
        assert_eq!(sections_naming(text, "POI 120"), vec!["trajectory"]);
        // Not a prefix of another id, and not the "10" of the instruction.
        assert!(sections_naming(text, "POI 1").is_empty());
        assert!(sections_naming(text, "POI 10").is_empty());
    }

    #[test]
    fn finds_a_semantic_code() {
        let text = "Most visited POIs:\n- <a12><b3><c40> (Bar): 3 visits\n\n\
                    Current trajectory (oldest first):\n- Fri 17:59: <a1><b3><c4> (Park)";
        assert_eq!(sections_naming(text, "<a12><b3><c40>"), vec!["most_visited"]);
        assert_eq!(sections_naming(text, "<a1><b3><c4>"), vec!["trajectory"]);
        assert!(sections_naming(text, "<a1><b3><c40>").is_empty());
    }
}
