//! The answer format, written once: [`format_answer`] produces it (SFT targets) and
//! [`parse_answer`] reads a model's completion back into a ranked list of POI ids, tolerant of
//! the ways small models drift from the format, and reporting every fact that rewards and
//! metrics look at, so both see the same ones.
//!
//! The format: an optional `<think>...</think>` block, then `<answer>id, id, ...</answer>` with
//! the dataset's dense POI ids, best first.
//!
//! How a completion is read:
//! - Tags are matched case-insensitively. The answer block is the first `<answer>` after the last
//!   `</think>` (or in the whole text when there is none), up to the next `</answer>` or, when
//!   that is missing, the end of the text. Without an `<answer>` tag there is no answer: numbers
//!   in free text are never scraped.
//! - The reasoning ([`ParsedAnswer::think`]) is the text between `<think>` and the last
//!   `</think>` (from the start of the text when only the closing tag is there, as when a chat
//!   template opens the block), or after an unclosed `<think>` up to the answer block.
//! - The block is split into items on `,` `;` `|`, tabs and line breaks; empty items are
//!   skipped. An item made of several whitespace-separated numbers (`12 34 56`) counts as that
//!   many items.
//! - An item is *clean* when it is only ASCII digits. Decorations that are tolerated (the id is
//!   taken, the item is counted in [`ParsedAnswer::decorated`]): surrounding brackets or quotes
//!   (`[12`, `34]`, `(56)`), bullets (`- 12`, `* 12`, `• 12`), enumerations (`1. 12`, `2) 34`),
//!   labels (`POI 12`, `poi #12`, `POI: 12`, `id 12`, `#12`), and a trailing parenthetical or
//!   explanation (`12 (Bar)`, `12 - Bar`, `12: Bar`, `12.`).
//! - Anything else (`Bar`, `12a`, `1.5`, `-5`, non-ASCII digits) is *non-numeric*. A number is
//!   *out of range* when it is not below `num_pois` (however many digits it has); an in-range id
//!   seen before is a *duplicate*. Only the first occurrence of an id is kept.

use std::collections::HashSet;

use std::borrow::Cow;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::data::codebook::Codebook;

pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";
pub const ANSWER_OPEN: &str = "<answer>";
pub const ANSWER_CLOSE: &str = "</answer>";

/// What [`parse_answer`] read from a completion. Invariant:
/// `ids.len() + out_of_range + duplicates + non_numeric == items`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ParsedAnswer {
    /// The ranked list: in-range ids, in order, each id at its first occurrence only.
    pub ids: Vec<u32>,
    /// An `<answer>` tag was found (after the last `</think>`, if any).
    pub has_answer_tag: bool,
    /// The answer block was closed by `</answer>`.
    pub closed: bool,
    /// Items in the answer block (non-empty pieces between separators).
    pub items: usize,
    /// Items that are not an id (not a number, or a number in a form that is not tolerated).
    pub non_numeric: usize,
    /// Numeric items that are not a POI id (`>= num_pois`, including numbers beyond u64).
    pub out_of_range: usize,
    /// In-range ids that repeat an earlier one (dropped from `ids`).
    pub duplicates: usize,
    /// Numeric items that needed a tolerated decoration (anything but bare digits).
    pub decorated: usize,
    /// Non-whitespace text after `</answer>`.
    pub trailing_text: bool,
    /// Both tags, at least one item, and every item a clean in-range id seen once
    /// (`non_numeric == out_of_range == duplicates == decorated == 0`).
    pub well_formed: bool,
    /// The reasoning text (trimmed), when a `<think>` block or a `</think>` tag is present.
    pub think: Option<String>,
}

impl ParsedAnswer {
    /// 1-based position of `target` in [`ParsedAnswer::ids`] (its rank), or `None` for a miss.
    pub fn rank_of(&self, target: u32) -> Option<usize> {
        self.ids.iter().position(|&id| id == target).map(|i| i + 1)
    }
}

/// How prompts and answers name POIs (`[prompt] ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PoiIds {
    /// Dense ids in digits.
    #[default]
    Raw,
    /// Codes of new vocabulary tokens from the dataset's codebook.
    Semantic,
}

/// How answers name POIs: dense ids, or a codebook's semantic codes, which are read back as
/// dense ids before parsing (so parsing, rewards and metrics see one form).
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerIds<'a> {
    codebook: Option<&'a Codebook>,
}

impl<'a> AnswerIds<'a> {
    /// `Semantic` needs the codebook (`None`: the dataset has no `codebook.json`).
    pub fn new(ids: PoiIds, codebook: Option<&'a Codebook>) -> anyhow::Result<Self> {
        match ids {
            PoiIds::Raw => Ok(AnswerIds { codebook: None }),
            PoiIds::Semantic => {
                let cb = codebook.context("prompt.ids = \"semantic\" needs the dataset's codebook.json (run `preprocess` again)")?;
                Ok(AnswerIds { codebook: Some(cb) })
            }
        }
    }

    pub fn codebook(&self) -> Option<&'a Codebook> {
        self.codebook
    }

    /// The text a model is trained to produce for `ids` ([`format_answer`] in this naming).
    pub fn format(&self, ids: &[u32], reasoning: Option<&str>) -> String {
        match self.codebook {
            Some(cb) => wrap_answer(&cb.list_text(ids), reasoning),
            None => format_answer(ids, reasoning),
        }
    }

    /// A completion in dense ids: codes rewritten ([`Codebook::to_raw_ids`]), raw text as it is.
    pub fn to_raw<'t>(&self, text: &'t str) -> Cow<'t, str> {
        match self.codebook {
            Some(cb) => Cow::Owned(cb.to_raw_ids(text)),
            None => Cow::Borrowed(text),
        }
    }

    /// [`parse_answer`] of a completion in this naming.
    pub fn parse(&self, text: &str, num_pois: usize) -> ParsedAnswer {
        parse_answer(&self.to_raw(text), num_pois)
    }
}

/// The text a model is trained to produce: `<answer>3, 1, 4</answer>`, preceded by
/// `<think>\n{reasoning}\n</think>\n` when reasoning is given. With distinct in-range ids (at
/// least one) it parses as well-formed, with the same ids and the trimmed reasoning.
pub fn format_answer(ids: &[u32], reasoning: Option<&str>) -> String {
    wrap_answer(&ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "), reasoning)
}

fn wrap_answer(list: &str, reasoning: Option<&str>) -> String {
    match reasoning {
        Some(r) => format!("{THINK_OPEN}\n{}\n{THINK_CLOSE}\n{ANSWER_OPEN}{list}{ANSWER_CLOSE}", r.trim()),
        None => format!("{ANSWER_OPEN}{list}{ANSWER_CLOSE}"),
    }
}

/// Reads a completion (see the module docs for the rules). Never panics.
pub fn parse_answer(text: &str, num_pois: usize) -> ParsedAnswer {
    // ASCII lowercasing keeps every byte offset, so positions found in `lower` index `text`.
    let lower = text.to_ascii_lowercase();
    let think_close = lower.rfind(THINK_CLOSE);
    let search_from = think_close.map_or(0, |i| i + THINK_CLOSE.len());
    let answer_open = lower[search_from..].find(ANSWER_OPEN).map(|i| search_from + i);

    let think = match think_close {
        Some(end) => {
            let start = lower[..end].find(THINK_OPEN).map_or(0, |i| i + THINK_OPEN.len());
            Some(text[start..end].trim().to_string())
        }
        None => lower.find(THINK_OPEN).map(|i| {
            let start = i + THINK_OPEN.len();
            let end = answer_open.filter(|&a| a >= start).unwrap_or(text.len());
            text[start..end].trim().to_string()
        }),
    };

    let mut out = ParsedAnswer { think, ..Default::default() };
    let Some(open) = answer_open else {
        return out;
    };
    out.has_answer_tag = true;
    let body_start = open + ANSWER_OPEN.len();
    let body = match lower[body_start..].find(ANSWER_CLOSE) {
        Some(i) => {
            out.closed = true;
            let after = &text[body_start + i + ANSWER_CLOSE.len()..];
            out.trailing_text = !after.trim().is_empty();
            &text[body_start..body_start + i]
        }
        None => &text[body_start..],
    };

    let mut seen = HashSet::new();
    for piece in body.split(is_separator) {
        let piece = piece.trim();
        if piece.is_empty() {
            continue;
        }
        for item in parse_piece(piece) {
            out.items += 1;
            let Item::Number { digits, clean } = item else {
                out.non_numeric += 1;
                continue;
            };
            if !clean {
                out.decorated += 1;
            }
            match to_id(digits, num_pois) {
                None => out.out_of_range += 1,
                Some(id) if !seen.insert(id) => out.duplicates += 1,
                Some(id) => out.ids.push(id),
            }
        }
    }
    out.well_formed =
        out.closed && out.items > 0 && out.non_numeric == 0 && out.out_of_range == 0 && out.duplicates == 0 && out.decorated == 0;
    out
}

fn is_separator(c: char) -> bool {
    matches!(c, ',' | ';' | '|' | '\n' | '\r' | '\t' | '，' | '、' | '；')
}

enum Item<'a> {
    /// The id's ASCII digits; `clean` when the item was nothing else.
    Number {
        digits: &'a str,
        clean: bool,
    },
    NonNumeric,
}

/// The number of a run of ASCII digits when it is a POI id (`< num_pois`, fits u32).
fn to_id(digits: &str, num_pois: usize) -> Option<u32> {
    let significant = digits.trim_start_matches('0');
    if significant.len() > 10 {
        return None;
    }
    let v: u64 = if significant.is_empty() { 0 } else { significant.parse().ok()? };
    let id = u32::try_from(v).ok()?;
    ((id as u64) < num_pois as u64).then_some(id)
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

const OPENERS: &[char] = &['[', '(', '{', '"', '\'', '`'];
const CLOSERS: &[char] = &[']', ')', '}', '"', '\'', '`'];

/// One separator-delimited, trimmed, non-empty piece: usually one item.
fn parse_piece(piece: &str) -> Vec<Item<'_>> {
    if all_digits(piece) {
        return vec![Item::Number { digits: piece, clean: true }];
    }
    // `12 34 56` (possibly bracketed): several items.
    let inner = piece.trim_matches(|c| OPENERS.contains(&c) || CLOSERS.contains(&c));
    let words: Vec<&str> = inner.split_whitespace().collect();
    if words.len() >= 2 && words.iter().all(|w| all_digits(w)) {
        return words.into_iter().map(|w| Item::Number { digits: w, clean: false }).collect();
    }
    vec![parse_decorated(piece)]
}

/// A piece that is not bare digits: strip the tolerated decorations around one number.
fn parse_decorated(piece: &str) -> Item<'_> {
    let mut s = piece.trim();
    // Leading brackets, quotes and bullets, in any order; one enumeration marker.
    let mut enumerated = false;
    loop {
        if let Some(r) = s.strip_prefix(OPENERS) {
            s = r.trim_start();
        } else if let Some(r) = strip_bullet(s) {
            s = r;
        } else if let Some(r) = strip_enumeration(s).filter(|_| !enumerated) {
            enumerated = true;
            s = r;
        } else {
            break;
        }
    }
    s = strip_label(s);
    let end = s.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return Item::NonNumeric;
    }
    let (digits, rest) = s.split_at(end);
    if tolerated_rest(rest) { Item::Number { digits, clean: false } } else { Item::NonNumeric }
}

/// `- `, `* `, `+ `, `• ` (a bullet needs whitespace after it, so `-5` is not `5`).
fn strip_bullet(s: &str) -> Option<&str> {
    let rest = s.strip_prefix(['-', '*', '+', '•', '·', '–', '—'])?;
    rest.starts_with(char::is_whitespace).then(|| rest.trim_start())
}

/// `1. `, `2) ` followed by something (so `12.` alone stays the number 12).
fn strip_enumeration(s: &str) -> Option<&str> {
    let end = s.bytes().position(|b| !b.is_ascii_digit())?;
    if end == 0 {
        return None;
    }
    let rest = s[end..].strip_prefix(['.', ')'])?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = rest.trim_start();
    (!rest.is_empty()).then_some(rest)
}

/// `POI 12`, `poi #12`, `POI: 12`, `POI id 12`, `poi_id=12`, `id 12`, `#12`.
fn strip_label(s: &str) -> &str {
    let mut s = s;
    for label in ["poi_id", "poi id", "poi", "id"] {
        if let Some(head) = s.get(..label.len())
            && head.eq_ignore_ascii_case(label)
            && !s[label.len()..].starts_with(|c: char| c.is_ascii_alphabetic())
        {
            s = s[label.len()..].trim_start();
            // `POI id 12`: a second label word.
            if let Some(head) = s.get(..2)
                && head.eq_ignore_ascii_case("id")
                && !s[2..].starts_with(|c: char| c.is_ascii_alphanumeric())
            {
                s = s[2..].trim_start();
            }
            break;
        }
    }
    for _ in 0..2 {
        if let Some(r) = s.strip_prefix(['#', ':', '=', '_']) {
            s = r.trim_start();
        }
    }
    s
}

/// What may follow the number: nothing, closing brackets/quotes/a period, a parenthetical, or a
/// separated explanation (`- Bar`, `: Bar`).
fn tolerated_rest(rest: &str) -> bool {
    let r = rest.trim_start();
    let stripped = r.trim_end().trim_end_matches(|c| CLOSERS.contains(&c) || c == '.');
    if stripped.is_empty() || r.starts_with(['(', '[']) {
        return true;
    }
    // `12: Bar`, but not `12:30`.
    if let Some(after) = r.strip_prefix(':') {
        return after.is_empty() || after.starts_with(char::is_whitespace);
    }
    // A dash explanation needs whitespace on its right (`12 - Bar`, `12 -- Bar`), so that
    // `12-34` is not read as 12.
    let dash = r.trim_start_matches(['-', '–', '—']);
    dash.len() < r.len() && dash.starts_with(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const N: usize = 1000;

    fn ids(text: &str) -> Vec<u32> {
        parse_answer(text, N).ids
    }

    #[test]
    fn plain_answer_is_well_formed() {
        let p = parse_answer("<answer>3, 1, 4</answer>", N);
        assert_eq!(p.ids, vec![3, 1, 4]);
        assert!(p.has_answer_tag && p.closed && p.well_formed && !p.trailing_text);
        assert_eq!((p.items, p.non_numeric, p.out_of_range, p.duplicates, p.decorated), (3, 0, 0, 0, 0));
        assert_eq!(p.think, None);
        assert_eq!(p.rank_of(3), Some(1));
        assert_eq!(p.rank_of(4), Some(3));
        assert_eq!(p.rank_of(5), None);
    }

    #[test]
    fn whitespace_and_newlines() {
        let p = parse_answer("  <answer>\n  3 ,1,\n\n 4 \n</answer>\n", N);
        assert_eq!(p.ids, vec![3, 1, 4]);
        assert!(p.well_formed, "{p:?}");
        assert_eq!(ids("<answer>3;1;4</answer>"), vec![3, 1, 4]);
        assert_eq!(ids("<answer>3\t1\r\n4</answer>"), vec![3, 1, 4]);
        // A trailing comma is an empty item, not an item.
        let p = parse_answer("<answer>3, 1, 4,</answer>", N);
        assert_eq!((p.items, p.well_formed), (3, true));
    }

    #[test]
    fn brackets() {
        for text in ["<answer>[3, 1, 4]</answer>", "<answer>(3, 1, 4)</answer>", "<answer>{3,1,4}</answer>"] {
            let p = parse_answer(text, N);
            assert_eq!(p.ids, vec![3, 1, 4], "{text}");
            assert_eq!(p.decorated, 2, "{text}");
            assert!(!p.well_formed);
            assert_eq!(p.non_numeric, 0);
        }
        assert_eq!(ids("<answer>[3], [1], [4]</answer>"), vec![3, 1, 4]);
        assert_eq!(ids("<answer>\"3\", '1'</answer>"), vec![3, 1]);
    }

    #[test]
    fn poi_and_id_labels() {
        let p = parse_answer("<answer>POI 3, poi #1, id 4, POI: 5, #9, POI id 2, poi_id=7, POI12</answer>", N);
        assert_eq!(p.ids, vec![3, 1, 4, 5, 9, 2, 7, 12]);
        assert_eq!((p.items, p.decorated, p.non_numeric), (8, 8, 0));
        assert!(!p.well_formed);
        // A word that merely starts like a label is not one.
        let p = parse_answer("<answer>identity 3, points 4</answer>", N);
        assert_eq!((p.ids.len(), p.non_numeric), (0, 2));
    }

    #[test]
    fn bullets_and_enumerations() {
        let text = "<answer>\n1. POI 30\n2. POI 10\n3) 40\n- 50\n* 60\n• 70\n</answer>";
        let p = parse_answer(text, N);
        assert_eq!(p.ids, vec![30, 10, 40, 50, 60, 70]);
        assert_eq!((p.items, p.decorated, p.non_numeric), (6, 6, 0));
        // `-5` is not a bullet: a negative number is not an id.
        let p = parse_answer("<answer>-5</answer>", N);
        assert_eq!((p.ids.len(), p.non_numeric), (0, 1));
        // `12.` is the number 12 with a period, not an enumeration marker.
        assert_eq!(ids("<answer>12.</answer>"), vec![12]);
    }

    #[test]
    fn parentheticals_and_explanations() {
        let p = parse_answer("<answer>3 (Bar), 1 (Coffee Shop, again), 4 - Gym, 5: Office, 6 [Park]</answer>", N);
        // The comma inside the parenthetical splits it: ` again)` is a non-numeric item.
        assert_eq!(p.ids, vec![3, 1, 4, 5, 6]);
        assert_eq!((p.items, p.non_numeric, p.decorated), (6, 1, 5));
        let p = parse_answer("<answer>12-34, 1.5, 7a, 12:30, 8 9</answer>", N);
        assert_eq!(p.ids, vec![8, 9]);
        assert_eq!((p.items, p.non_numeric, p.decorated), (6, 4, 2));
    }

    #[test]
    fn space_separated_numbers() {
        let p = parse_answer("<answer>3 1 4</answer>", N);
        assert_eq!(p.ids, vec![3, 1, 4]);
        assert_eq!((p.items, p.decorated, p.well_formed), (3, 3, false));
        assert_eq!(ids("<answer>[3 1 4]</answer>"), vec![3, 1, 4]);
    }

    #[test]
    fn trailing_text_and_missing_close() {
        let p = parse_answer("<answer>3, 1</answer> I hope this helps! 99", N);
        assert_eq!(p.ids, vec![3, 1]);
        assert!(p.closed && p.trailing_text && p.well_formed);

        let p = parse_answer("<answer>3, 1, 4", N);
        assert_eq!(p.ids, vec![3, 1, 4]);
        assert!(p.has_answer_tag && !p.closed && !p.well_formed);
        assert_eq!(p.non_numeric, 0);

        // Without the closing tag the rest of the text is in the block.
        let p = parse_answer("<answer>3, 1\nThese are my picks.", N);
        assert_eq!((p.ids.clone(), p.non_numeric), (vec![3, 1], 1));
    }

    #[test]
    fn no_answer_tag_means_no_answer() {
        for text in ["3, 1, 4", "I think POI 3 and then 1.", "", "answer: 3, 1", "<think>3, 1</think>", "</answer>3"] {
            let p = parse_answer(text, N);
            assert!(!p.has_answer_tag && p.ids.is_empty() && p.items == 0 && !p.well_formed, "{text}: {p:?}");
        }
    }

    #[test]
    fn think_block() {
        let p = parse_answer("<think>\nThey like coffee.\n</think>\n<answer>3, 1</answer>", N);
        assert_eq!(p.think.as_deref(), Some("They like coffee."));
        assert_eq!(p.ids, vec![3, 1]);
        assert!(p.well_formed);

        // The answer block is taken after the (last) `</think>`.
        let p = parse_answer("<think>maybe <answer>7</answer>?</think> <answer>3</answer>", N);
        assert_eq!(p.ids, vec![3]);
        assert_eq!(p.think.as_deref(), Some("maybe <answer>7</answer>?"));
        let p = parse_answer("<think>a</think><think>b</think><answer>2</answer>", N);
        assert_eq!(p.think.as_deref(), Some("a</think><think>b"));
        assert_eq!(p.ids, vec![2]);

        // An answer only inside the reasoning is no answer.
        let p = parse_answer("<think><answer>7</answer></think> so 7", N);
        assert!(!p.has_answer_tag && p.ids.is_empty());

        // `</think>` without an opening tag (the template opened it): reasoning from the start.
        let p = parse_answer("weighing options</think><answer>5</answer>", N);
        assert_eq!(p.think.as_deref(), Some("weighing options"));
        assert_eq!(p.ids, vec![5]);

        // An unclosed `<think>`: reasoning up to the answer block, which is still read.
        let p = parse_answer("<think>hmm <answer>5, 6</answer>", N);
        assert_eq!(p.think.as_deref(), Some("hmm"));
        assert_eq!(p.ids, vec![5, 6]);
        let p = parse_answer("<think>ran out of tokens", N);
        assert_eq!(p.think.as_deref(), Some("ran out of tokens"));
        assert!(!p.has_answer_tag);
    }

    #[test]
    fn first_answer_block_after_think() {
        let p = parse_answer("<answer>1</answer><answer>2</answer>", N);
        assert_eq!((p.ids.clone(), p.trailing_text), (vec![1], true));
    }

    #[test]
    fn tags_are_case_insensitive() {
        let p = parse_answer("<THINK>x</Think><Answer>3, 1</ANSWER>", N);
        assert_eq!(p.ids, vec![3, 1]);
        assert_eq!(p.think.as_deref(), Some("x"));
        assert!(p.well_formed);
    }

    #[test]
    fn out_of_range_and_huge_numbers() {
        let text = format!("<answer>3, 1000, 999, {}, {}, 99999999999999999999999999, 0</answer>", u32::MAX, u64::MAX);
        let p = parse_answer(&text, N);
        assert_eq!(p.ids, vec![3, 999, 0]);
        assert_eq!((p.items, p.out_of_range, p.non_numeric), (7, 4, 0));
        assert!(!p.well_formed);
        // Leading zeros do not make a small number huge.
        assert_eq!(ids("<answer>0000000000000000000000007</answer>"), vec![7]);
        // With no POIs every number is out of range.
        let p = parse_answer("<answer>0, 1</answer>", 0);
        assert_eq!((p.ids.len(), p.out_of_range), (0, 2));
    }

    #[test]
    fn duplicates_keep_the_first_occurrence() {
        let p = parse_answer("<answer>3, 1, 3, 4, 1, POI 3</answer>", N);
        assert_eq!(p.ids, vec![3, 1, 4]);
        assert_eq!((p.items, p.duplicates, p.decorated), (6, 3, 1));
        assert!(!p.well_formed);
        // An out-of-range repeat counts as out of range each time.
        let p = parse_answer("<answer>5000, 5000</answer>", N);
        assert_eq!((p.out_of_range, p.duplicates), (2, 0));
    }

    #[test]
    fn non_numeric_items() {
        let p = parse_answer("<answer>Central Park, 3, ٣, １２, </answer>", N);
        assert_eq!(p.ids, vec![3]);
        assert_eq!((p.items, p.non_numeric), (4, 3));
        assert!(!p.well_formed);
    }

    #[test]
    fn empty_answer_is_not_well_formed() {
        let p = parse_answer("<answer></answer>", N);
        assert!(p.has_answer_tag && p.closed && p.items == 0 && !p.well_formed);
        let p = parse_answer("<answer> , ,\n</answer>", N);
        assert!(p.items == 0 && !p.well_formed);
    }

    #[test]
    fn serializes_to_json() {
        let p = parse_answer("<think>t</think><answer>3, x</answer>", N);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["ids"], serde_json::json!([3]));
        assert_eq!(v["non_numeric"], 1);
        assert_eq!(v["well_formed"], false);
        assert_eq!(v["think"], "t");
    }

    #[test]
    fn format_answer_shapes() {
        assert_eq!(format_answer(&[3, 1, 4], None), "<answer>3, 1, 4</answer>");
        assert_eq!(format_answer(&[3], Some("  why \n")), "<think>\nwhy\n</think>\n<answer>3</answer>");
    }

    fn check_invariants(text: &str, n: usize) {
        let p = parse_answer(text, n);
        assert_eq!(p.ids.len() + p.out_of_range + p.duplicates + p.non_numeric, p.items, "{text:?}: {p:?}");
        assert!(p.decorated <= p.items - p.non_numeric);
        assert!(p.ids.iter().all(|&id| (id as usize) < n));
        let distinct: HashSet<_> = p.ids.iter().collect();
        assert_eq!(distinct.len(), p.ids.len());
        if !p.has_answer_tag {
            assert!(p.items == 0 && !p.closed && !p.trailing_text && !p.well_formed);
        }
        if p.well_formed {
            assert!(p.has_answer_tag && p.closed && p.items > 0 && p.ids.len() == p.items && p.decorated == 0);
        }
        for (i, &id) in p.ids.iter().enumerate() {
            assert_eq!(p.rank_of(id), Some(i + 1));
        }
        // Deterministic.
        assert_eq!(parse_answer(text, n), p);
    }

    /// Fragments that stress the parser: tags (whole, partial, nested, odd case), separators,
    /// decorations, numbers at and past every integer width, and non-ASCII text.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "<answer>",
                "</answer>",
                "<think>",
                "</think>",
                "<ANSWER>",
                "</Answer>",
                "<answer",
                "answer>",
                "</",
                "<",
                ">",
                "<<answer>>",
                ",",
                ", ",
                ";",
                "\n",
                " ",
                "\t",
                "|",
                "，",
                "POI ",
                "poi #",
                "id ",
                "#",
                "1. ",
                "2) ",
                "- ",
                "* ",
                "• ",
                "[",
                "]",
                "(",
                ")",
                "{",
                "}",
                "\"",
                "'",
                "(Bar)",
                " - Gym",
                ": ",
                ".",
                "-",
                "0",
                "00",
                "4294967295",
                "4294967296",
                "18446744073709551615",
                "18446744073709551616",
                "340282366920938463463374607431768211456",
                "٣",
                "１２",
                "é",
                "🙂",
                "\u{200b}",
                "\u{0}",
            ])
            .prop_map(str::to_string),
            (0u64..2000).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "\\PC{0,6}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_unicode_never_panics(text in "\\PC*", n in 0usize..5000) {
            check_invariants(&text, n);
            check_invariants(&format!("<answer>{text}"), n);
            check_invariants(&format!("<think>{text}</think><answer>{text}</answer>{text}"), n);
        }

        #[test]
        fn any_string_never_panics(text in any::<String>(), n in 0usize..5000) {
            check_invariants(&text, n);
        }

        #[test]
        fn adversarial_fragments(parts in prop::collection::vec(fragment(), 0..40), n in 0usize..5000) {
            check_invariants(&parts.concat(), n);
            check_invariants(&format!("<answer>{}", parts.concat()), n);
        }

        #[test]
        fn many_separators(ids in prop::collection::vec(0u32..100, 0..30), seps in prop::collection::vec("[,;| \n\t]{1,5}", 30)) {
            let mut body = String::new();
            for (id, sep) in ids.iter().zip(&seps) {
                body.push_str(&id.to_string());
                body.push_str(sep);
            }
            let text = format!("<answer>{body}</answer>");
            check_invariants(&text, 100);
            let p = parse_answer(&text, 100);
            let mut want = Vec::new();
            for &id in &ids {
                if !want.contains(&id) {
                    want.push(id);
                }
            }
            prop_assert_eq!(p.ids, want);
            prop_assert_eq!(p.non_numeric, 0);
        }

        #[test]
        fn format_answer_round_trips(
            ids in prop::collection::hash_set(0u32..10_000, 1..30),
            reasoning in prop::option::of("\\PC*"),
        ) {
            let ids: Vec<u32> = ids.into_iter().collect();
            let text = format_answer(&ids, reasoning.as_deref());
            let p = parse_answer(&text, 10_000);
            prop_assert!(p.well_formed, "{text:?}: {p:?}");
            prop_assert_eq!(&p.ids, &ids);
            prop_assert_eq!(p.items, ids.len());
            prop_assert!(!p.trailing_text);
            prop_assert_eq!(p.think, reasoning.map(|r| r.trim().to_string()));
        }
    }
}
