//! GRPO rewards: each a pure function of one [`RewardInput`] (the parsed answer, the target,
//! the POI table, ...) returning a number, registered by name in [`REWARDS`], and weighted from
//! the `[rewards]` table of the run config ([`RewardsConfig`]). [`score`] gives every term and
//! the weighted total of one completion.
//!
//! As in TRL's `GRPOTrainer`, the total is the plain weighted sum `Σ wᵢ·rᵢ` (weights are not
//! renormalised), every reward is computed and logged whatever its weight, and a reward with
//! weight 0 is logged but does not train.
//!
//! Adding a reward: write a `fn(&RewardInput) -> f64` and add one line to [`REWARDS`] (its
//! name, which is also its key under `[rewards.weights]`, default weight and formula). A
//! parameter it needs goes in [`RewardParams`] (one field, its default in
//! `RewardParams::default`).
//!
//! Conventions shared by all rewards:
//! - "The list" is [`ParsedAnswer::ids`]: the in-range ids of the answer block in order, each at
//!   its first occurrence (duplicates, out-of-range numbers and non-numeric items dropped), the
//!   same list evaluation scores. "The first k" are its first `k` entries.
//! - `r` is the target's 1-based position in the list ([`ParsedAnswer::rank_of`]); a target
//!   past position `k`, or absent, is a miss.
//! - Every reward lies in `[0, 1]`, never panics, and is 0 for a completion with no answer.
//!
//! [`rewards_markdown`] renders the reward and parameter tables of `docs/rewards.md`.

use std::fmt::Write as _;

use anyhow::{Result, ensure};
use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::answer::ParsedAnswer;
use crate::data::haversine_km;
use crate::data::{Checkin, Poi};

/// Everything a reward may look at for one completion.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// The completion as [`crate::answer::parse_answer`] read it (with `num_pois = pois.len()`).
    pub answer: &'a ParsedAnswer,
    /// The raw completion text.
    pub completion: &'a str,
    /// Tokens the policy generated for this completion (reasoning and answer together).
    pub completion_tokens: usize,
    /// The ground-truth POI id.
    pub target: u32,
    /// The list length the prompt asked for (expected `>= 1`).
    pub k: usize,
    /// The POI table, indexed by id.
    pub pois: &'a [Poi],
    /// The user's history before the target (no built-in reward uses it yet).
    pub history: &'a [Checkin],
    /// Whether the prompt asked for a `<think>` block before the answer.
    pub reasoning: bool,
    pub params: &'a RewardParams,
}

/// The one signature of a reward.
pub type RewardFn = fn(&RewardInput<'_>) -> f64;

/// One registered reward.
#[derive(Debug, Clone, Copy)]
pub struct RewardSpec {
    /// Its name: the key under `[rewards.weights]` and in logged metrics.
    pub name: &'static str,
    pub func: RewardFn,
    /// Weight when the config does not set one.
    pub default_weight: f64,
    /// The formula, as Markdown (`docs/rewards.md`, through [`rewards_markdown`]).
    pub formula: &'static str,
}

/// Every reward, in the order they are logged. Adding a reward is one line here.
pub const REWARDS: &[RewardSpec] = &[
    RewardSpec {
        name: "format",
        func: format_reward,
        default_weight: 0.2,
        formula: "1 if the answer is well-formed (`<answer>…</answer>` closed, every item a bare \
                  in-range id, no duplicates, nothing after `</answer>`) with exactly k ids, and, \
                  with reasoning on, a non-empty `<think>` block; 0.5 if an `<answer>` block holds \
                  at least one in-range id but is otherwise imperfect; 0 otherwise",
    },
    RewardSpec { name: "hit", func: hit_reward, default_weight: 1.0, formula: "1 if r ≤ k (hit@k), else 0" },
    RewardSpec {
        name: "rank",
        func: rank_reward,
        default_weight: 1.0,
        formula: "`rank = \"reciprocal\"`: 1/r; `rank = \"ndcg\"`: 1/log₂(r+1); 0 on a miss (r > k or absent)",
    },
    RewardSpec {
        name: "soft_accuracy",
        func: soft_accuracy_reward,
        default_weight: 0.5,
        formula: "1 on a hit; on a miss, max over the first k listed POIs p of \
                  (1−c)·exp(−d(p,t)/s) + c·[cat(p) = cat(t)], with d the haversine distance in km \
                  to the target t, s = `soft_scale_km`, c = `soft_category_weight` (an empty \
                  category never matches); 0 for an empty list",
    },
    RewardSpec {
        name: "diversity",
        func: diversity_reward,
        default_weight: 0.1,
        formula: "distinct in-range ids / in-range ids listed = len(ids) / (len(ids) + duplicates); \
                  0 when no in-range id is listed",
    },
    RewardSpec {
        name: "length",
        func: length_reward,
        default_weight: 0.2,
        formula: "max(0, 1 − abs(n−k)/k) with n the items in the answer block (0 without one); with \
                  reasoning on and B = `reasoning_budget_tokens` > 0, times \
                  max(0, 1 − (T−B)/B) when the completion's T tokens exceed B",
    },
];

/// Looks a reward up by name.
pub fn reward_by_name(name: &str) -> Option<&'static RewardSpec> {
    REWARDS.iter().find(|r| r.name == name)
}

/// The names in [`REWARDS`], comma-separated (for error messages).
fn reward_names() -> String {
    REWARDS.iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
}

/// 1 for a perfect answer (well-formed, exactly `k` ids, nothing after `</answer>`, and a
/// non-empty `<think>` block when reasoning is on); 0.5 for an `<answer>` block with at least
/// one in-range id that misses any of those; 0 when there is no answer tag or no in-range id.
///
/// ([`ParsedAnswer::well_formed`] does not check the count, hence the separate `== k`.)
pub fn format_reward(x: &RewardInput<'_>) -> f64 {
    let a = x.answer;
    if !a.has_answer_tag || a.ids.is_empty() {
        return 0.0;
    }
    let think_ok = !x.reasoning || a.think.as_deref().is_some_and(|t| !t.trim().is_empty());
    if a.well_formed && a.ids.len() == x.k && !a.trailing_text && think_ok { 1.0 } else { 0.5 }
}

/// The target's rank within the first `k` of the list, or `None` for a miss.
fn rank_within_k(x: &RewardInput<'_>) -> Option<usize> {
    x.answer.rank_of(x.target).filter(|&r| r <= x.k)
}

/// hit@k: 1 if the target is among the first `k` ids of the list, else 0.
pub fn hit_reward(x: &RewardInput<'_>) -> f64 {
    if rank_within_k(x).is_some() { 1.0 } else { 0.0 }
}

/// The target's rank `r` within the first `k`: `1/r` ([`RankKind::Reciprocal`]) or
/// `1/log2(r + 1)` ([`RankKind::Ndcg`], NDCG@k with one relevant item); 0 on a miss.
pub fn rank_reward(x: &RewardInput<'_>) -> f64 {
    match rank_within_k(x) {
        None => 0.0,
        Some(r) => match x.params.rank {
            RankKind::Reciprocal => 1.0 / r as f64,
            RankKind::Ndcg => 1.0 / (r as f64 + 1.0).log2(),
        },
    }
}

/// Partial credit for near misses. 1 on a hit (target within the first `k`). On a miss, the
/// best over the first `k` listed POIs `p` of
/// `(1 − c)·exp(−d(p, t) / s) + c·[category(p) = category(t)]`, where `d` is the haversine
/// distance in km to the target `t`, `s` = [`RewardParams::soft_scale_km`] and `c` =
/// [`RewardParams::soft_category_weight`]. An empty (unknown) category matches nothing. 0 for
/// an empty list or a target id outside the POI table. A miss can reach 1 only through a listed
/// POI at the target's exact location with its category.
pub fn soft_accuracy_reward(x: &RewardInput<'_>) -> f64 {
    if rank_within_k(x).is_some() {
        return 1.0;
    }
    let Some(t) = x.pois.get(x.target as usize) else {
        return 0.0;
    };
    let c = x.params.soft_category_weight;
    let s = x.params.soft_scale_km;
    x.answer
        .ids
        .iter()
        .take(x.k)
        .filter_map(|&id| x.pois.get(id as usize))
        .map(|p| {
            let geo = (-haversine_km(p.lat, p.lon, t.lat, t.lon) / s).exp();
            let same = !t.category.is_empty() && p.category == t.category;
            (1.0 - c) * geo + c * if same { 1.0 } else { 0.0 }
        })
        .fold(0.0, f64::max)
}

/// Distinct in-range ids over in-range ids listed: `|ids| / (|ids| + duplicates)`; 0 when no
/// in-range id is listed. Out-of-range and non-numeric items are the format reward's concern.
pub fn diversity_reward(x: &RewardInput<'_>) -> f64 {
    let distinct = x.answer.ids.len();
    let listed = distinct + x.answer.duplicates;
    if listed == 0 { 0.0 } else { distinct as f64 / listed as f64 }
}

/// The list's length against `k`: `max(0, 1 − |n − k| / k)` with `n` = items in the answer
/// block (every item, valid or not; 0 without an answer tag). With reasoning on and a budget
/// `B` = [`RewardParams::reasoning_budget_tokens`] > 0, multiplied by `max(0, 1 − (T − B) / B)`
/// when the completion's `T` tokens exceed `B` (linear down to 0 at `2B`). With `k = 0`, the
/// list term is 1 for an empty list and 0 otherwise.
pub fn length_reward(x: &RewardInput<'_>) -> f64 {
    let n = x.answer.items as f64;
    let k = x.k as f64;
    let list = if x.k == 0 { if x.answer.items == 0 { 1.0 } else { 0.0 } } else { (1.0 - (n - k).abs() / k).max(0.0) };
    let budget = x.params.reasoning_budget_tokens;
    let over = x.completion_tokens.saturating_sub(budget);
    if x.reasoning && budget > 0 && over > 0 { list * (1.0 - over as f64 / budget as f64).max(0.0) } else { list }
}

/// How the rank reward scores the target's position `r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankKind {
    /// `1/r` (the instance's MRR).
    Reciprocal,
    /// `1/log2(r + 1)` (NDCG with one relevant item).
    Ndcg,
}

/// `[rewards.params]`: the knobs of the rewards. Defaults are in `RewardParams::default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardParams {
    /// Rank reward: `"reciprocal"` (1/r, default) or `"ndcg"` (1/log2(r+1)).
    pub rank: RankKind,
    /// Soft accuracy: distance scale `s` in km of `exp(−d/s)` (a listed POI `s` km from the
    /// target gets `e⁻¹ ≈ 0.37` of the distance credit). Default 1.0, must be > 0.
    pub soft_scale_km: f64,
    /// Soft accuracy: weight `c` in `[0, 1]` of the category match against `1 − c` for
    /// closeness (0 = distance only, 1 = category only). Default 0.5.
    pub soft_category_weight: f64,
    /// Length: with reasoning on, completions longer than this many tokens lose length reward
    /// (linearly, to 0 at twice the budget). 0 = no budget. Default 256.
    pub reasoning_budget_tokens: usize,
}

impl Default for RewardParams {
    fn default() -> Self {
        RewardParams { rank: RankKind::Reciprocal, soft_scale_km: 1.0, soft_category_weight: 0.5, reasoning_budget_tokens: 256 }
    }
}

impl RewardParams {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.soft_scale_km.is_finite() && self.soft_scale_km > 0.0,
            "rewards.params.soft_scale_km must be a positive number of km, got {}",
            self.soft_scale_km
        );
        ensure!(
            (0.0..=1.0).contains(&self.soft_category_weight),
            "rewards.params.soft_category_weight must be in [0, 1], got {}",
            self.soft_category_weight
        );
        Ok(())
    }
}

/// `[rewards.weights]`: one weight per reward of [`REWARDS`], by name. A name left out keeps
/// its default weight; an unknown name is an error that lists the known ones. Serialised with
/// every name, in [`REWARDS`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardWeights {
    /// `values[i]` weighs `REWARDS[i]`.
    values: Vec<f64>,
}

impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights { values: REWARDS.iter().map(|r| r.default_weight).collect() }
    }
}

impl RewardWeights {
    /// The weight of reward `name`, or `None` when there is no such reward.
    pub fn get(&self, name: &str) -> Option<f64> {
        REWARDS.iter().position(|r| r.name == name).map(|i| self.values[i])
    }

    /// Sets the weight of reward `name`; an error for an unknown name.
    pub fn set(&mut self, name: &str, weight: f64) -> Result<()> {
        let Some(i) = REWARDS.iter().position(|r| r.name == name) else {
            anyhow::bail!("unknown reward `{name}`, expected one of: {}", reward_names());
        };
        self.values[i] = weight;
        Ok(())
    }

    /// `(name, weight)` in [`REWARDS`] order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        REWARDS.iter().zip(&self.values).map(|(r, &w)| (r.name, w))
    }

    /// All weights zero after the defaults and the config: nothing would train.
    pub fn all_zero(&self) -> bool {
        self.values.iter().all(|&w| w == 0.0)
    }

    pub fn validate(&self) -> Result<()> {
        for (name, w) in self.iter() {
            ensure!(w.is_finite(), "rewards.weights.{name} must be a finite number, got {w}");
        }
        ensure!(!self.all_zero(), "every reward weight in [rewards.weights] is 0: nothing to train on");
        Ok(())
    }
}

impl Serialize for RewardWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.values.len()))?;
        for (name, w) in self.iter() {
            m.serialize_entry(name, &w)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for RewardWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let given = std::collections::BTreeMap::<String, f64>::deserialize(d)?;
        let mut w = RewardWeights::default();
        for (name, weight) in given {
            w.set(&name, weight).map_err(D::Error::custom)?;
        }
        Ok(w)
    }
}

/// The `[rewards]` table of the run config: `[rewards.weights]` (see [`RewardWeights`]) and
/// `[rewards.params]` (see [`RewardParams`]). Every key is optional; unknown keys are rejected.
///
/// ```toml
/// [rewards.weights]
/// hit = 1.0
/// soft_accuracy = 0.0   # off (still logged)
///
/// [rewards.params]
/// rank = "ndcg"
/// soft_scale_km = 2.0
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardsConfig {
    pub weights: RewardWeights,
    pub params: RewardParams,
}

impl RewardsConfig {
    pub fn validate(&self) -> Result<()> {
        self.weights.validate()?;
        self.params.validate()
    }
}

/// Every reward's value for one completion, in [`REWARDS`] order, and their weighted sum.
/// Serialises as `{"terms": {"format": 1.0, ...}, "total": 2.5}`.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardBreakdown {
    pub terms: Vec<(&'static str, f64)>,
    /// `Σ weight(name) · value(name)`.
    pub total: f64,
}

impl RewardBreakdown {
    /// The (unweighted) value of reward `name`.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.terms.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
    }
}

impl Serialize for RewardBreakdown {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        struct Terms<'a>(&'a [(&'static str, f64)]);
        impl Serialize for Terms<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(self.0.len()))?;
                for (n, v) in self.0 {
                    m.serialize_entry(n, v)?;
                }
                m.end()
            }
        }
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("terms", &Terms(&self.terms))?;
        m.serialize_entry("total", &self.total)?;
        m.end()
    }
}

/// Every reward of [`REWARDS`] on `input`, and the weighted total.
pub fn score(input: &RewardInput<'_>, weights: &RewardWeights) -> RewardBreakdown {
    let mut total = 0.0;
    let terms = REWARDS
        .iter()
        .zip(&weights.values)
        .map(|(r, &w)| {
            let v = (r.func)(input);
            total += w * v;
            (r.name, v)
        })
        .collect();
    RewardBreakdown { terms, total }
}

/// The reward documentation of `docs/rewards.md`: a Markdown table of the rewards (name, default weight,
/// formula) and one of the parameters (key, default), generated from [`REWARDS`] and
/// [`RewardParams::default`].
pub fn rewards_markdown() -> String {
    let mut s = String::from("| reward (`[rewards.weights]` key) | default weight | value in [0, 1] |\n|---|---|---|\n");
    for r in REWARDS {
        let _ = writeln!(s, "| `{}` | {:?} | {} |", r.name, r.default_weight, r.formula);
    }
    let p = RewardParams::default();
    let rank = match p.rank {
        RankKind::Reciprocal => "reciprocal",
        RankKind::Ndcg => "ndcg",
    };
    s.push_str("\n| `[rewards.params]` key | default | meaning |\n|---|---|---|\n");
    let _ = writeln!(s, "| `rank` | `\"{rank}\"` | rank reward: `\"reciprocal\"` (1/r) or `\"ndcg\"` (1/log₂(r+1)) |");
    let _ = writeln!(s, "| `soft_scale_km` | {:?} | distance scale s of soft accuracy, km (> 0) |", p.soft_scale_km);
    let _ = writeln!(
        s,
        "| `soft_category_weight` | {:?} | weight c of the category match in soft accuracy, in [0, 1] |",
        p.soft_category_weight
    );
    let _ = writeln!(
        s,
        "| `reasoning_budget_tokens` | {} | completion tokens allowed with reasoning on before the \
         length reward decays (0 = no budget) |",
        p.reasoning_budget_tokens
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::parse_answer;
    use crate::data::EARTH_RADIUS_KM;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    macro_rules! assert_close {
        ($a:expr, $b:expr) => {{
            let (a, b): (f64, f64) = ($a, $b);
            assert!(close(a, b), "{} = {a}, want {b}", stringify!($a));
        }};
        ($a:expr, $b:expr, $($msg:tt)+) => {{
            let (a, b): (f64, f64) = ($a, $b);
            assert!(close(a, b), "{} = {a}, want {b}: {}", stringify!($a), format!($($msg)+));
        }};
    }

    fn poi(id: u32, category: &str, lat: f64, lon: f64) -> Poi {
        Poi { id, venue_id: format!("v{id}"), category: category.into(), lat, lon, train_visits: 1 }
    }

    /// On the equator, so the haversine distance is exactly `R·Δλ`: POI 1 and 2 are one unit
    /// `U = R·0.01°` (≈ 1.112 km) from POI 0, POI 3 two units, POI 5 a thousand.
    fn pois() -> Vec<Poi> {
        vec![
            poi(0, "Cafe", 0.0, 0.0),
            poi(1, "Cafe", 0.0, 0.01),
            poi(2, "Bar", 0.0, 0.01),
            poi(3, "Bar", 0.0, 0.02),
            poi(4, "", 0.0, 0.0),
            poi(5, "Gym", 0.0, 10.0),
        ]
    }

    /// One distance unit of the fixture.
    fn unit_km() -> f64 {
        EARTH_RADIUS_KM * 0.01f64.to_radians()
    }

    /// A fixture: target 0, k = 3, reasoning off, 10 completion tokens, soft scale = one unit.
    struct Case {
        text: String,
        target: u32,
        k: usize,
        tokens: usize,
        reasoning: bool,
        params: RewardParams,
        pois: Vec<Poi>,
    }

    fn case(text: &str) -> Case {
        Case {
            text: text.into(),
            target: 0,
            k: 3,
            tokens: 10,
            reasoning: false,
            params: RewardParams { soft_scale_km: unit_km(), ..RewardParams::default() },
            pois: pois(),
        }
    }

    impl Case {
        fn k(mut self, k: usize) -> Self {
            self.k = k;
            self
        }
        fn target(mut self, t: u32) -> Self {
            self.target = t;
            self
        }
        fn reasoning(mut self, tokens: usize) -> Self {
            self.reasoning = true;
            self.tokens = tokens;
            self
        }
        fn params(mut self, f: impl FnOnce(&mut RewardParams)) -> Self {
            f(&mut self.params);
            self
        }
        fn run(&self, f: RewardFn) -> f64 {
            let answer = parse_answer(&self.text, self.pois.len());
            f(&self.input(&answer))
        }
        fn input<'a>(&'a self, answer: &'a ParsedAnswer) -> RewardInput<'a> {
            RewardInput {
                answer,
                completion: &self.text,
                completion_tokens: self.tokens,
                target: self.target,
                k: self.k,
                pois: &self.pois,
                history: &[],
                reasoning: self.reasoning,
                params: &self.params,
            }
        }
    }

    fn r(f: RewardFn, text: &str) -> f64 {
        case(text).run(f)
    }

    #[test]
    fn haversine_by_hand() {
        // Along the equator the distance is R·Δλ: 1° = 6371·π/180 = 111.19492664455873 km.
        assert_close!(haversine_km(0.0, 0.0, 0.0, 1.0), 6371.0 * std::f64::consts::PI / 180.0);
        assert!((haversine_km(0.0, 0.0, 0.0, 1.0) - 111.194_926_644_558_73).abs() < 1e-9);
        // Along a meridian too: 1° of latitude is the same arc.
        assert!((haversine_km(10.0, 5.0, 11.0, 5.0) - 111.194_926_644_558_73).abs() < 1e-9);
        // Antipodes: half the circumference, π·R (the clamp keeps asin defined).
        assert!((haversine_km(0.0, 0.0, 0.0, 180.0) - std::f64::consts::PI * 6371.0).abs() < 1e-6);
        assert!((haversine_km(90.0, 0.0, -90.0, 0.0) - std::f64::consts::PI * 6371.0).abs() < 1e-6);
        // Zero, symmetric, and longitude wraps (179° to −179° is 2°).
        assert_eq!(haversine_km(40.7, -74.0, 40.7, -74.0), 0.0);
        let (a, b) = (haversine_km(40.758, -73.985, 40.641, -73.778), haversine_km(40.641, -73.778, 40.758, -73.985));
        assert_close!(a, b);
        // Times Square to JFK is about 21.7 km.
        assert!((a - 21.7).abs() < 0.3, "{a}");
        assert!((haversine_km(0.0, 179.0, 0.0, -179.0) - 2.0 * 111.194_926_644_558_73).abs() < 1e-9);
        // The fixture's unit.
        assert_close!(haversine_km(0.0, 0.0, 0.0, 0.01), unit_km());
    }

    #[test]
    fn format_reward_cases() {
        let f = format_reward;
        // Perfect: closed, bare in-range distinct ids, exactly k = 3.
        assert_eq!(r(f, "<answer>1, 2, 3</answer>"), 1.0);
        assert_eq!(r(f, "<answer>\n3,1,2\n</answer>"), 1.0);
        // Parsable but imperfect: 0.5.
        for text in [
            "<answer>1, 2</answer>",             // too few (well_formed, but 2 != k)
            "<answer>1, 2, 3, 4</answer>",       // too many
            "<answer>1, 2, 2, 3</answer>",       // duplicate (3 distinct ids, still not clean)
            "<answer>1, 2, 9</answer>",          // out of range
            "<answer>1, 2, Bar</answer>",        // non-numeric item
            "<answer>[1, 2, 3]</answer>",        // decorated
            "<answer>1 2 3</answer>",            // space-separated
            "<answer>1, 2, 3",                   // unclosed (ran out of tokens)
            "<answer>1, 2, 3</answer> and more", // trailing text
        ] {
            assert_eq!(r(f, text), 0.5, "{text}");
        }
        // Nothing usable: 0.
        for text in [
            "1, 2, 3",                       // no tag
            "",                              // empty completion
            "<answer></answer>",             // empty block
            "<answer>9, 77</answer>",        // only out-of-range ids
            "<answer>Central Park</answer>", // only non-numeric
            "<think>1, 2, 3</think>",        // ids only in the reasoning
        ] {
            assert_eq!(r(f, text), 0.0, "{text:?}");
        }
        // Reasoning on: the perfect answer also needs a non-empty think block.
        assert_eq!(case("<think>likes coffee</think><answer>1, 2, 3</answer>").reasoning(10).run(f), 1.0);
        assert_eq!(case("likes coffee</think><answer>1, 2, 3</answer>").reasoning(10).run(f), 1.0);
        assert_eq!(case("<answer>1, 2, 3</answer>").reasoning(10).run(f), 0.5);
        assert_eq!(case("<think>  </think><answer>1, 2, 3</answer>").reasoning(10).run(f), 0.5);
        // Reasoning off: a think block is neither needed nor penalised.
        assert_eq!(r(f, "<think>x</think><answer>1, 2, 3</answer>"), 1.0);
        // k = 1.
        assert_eq!(case("<answer>4</answer>").k(1).run(f), 1.0);
    }

    #[test]
    fn hit_reward_cases() {
        let f = hit_reward;
        assert_eq!(r(f, "<answer>0, 1, 2</answer>"), 1.0); // r = 1
        assert_eq!(r(f, "<answer>1, 2, 0</answer>"), 1.0); // r = 3 = k
        assert_eq!(r(f, "<answer>1, 2, 3, 0</answer>"), 0.0); // r = 4 > k
        assert_eq!(r(f, "<answer>1, 2, 3</answer>"), 0.0); // absent
        // Dropped items do not count towards the position: ids = [1, 0], r = 2.
        assert_eq!(r(f, "<answer>1, 1, 9, Bar, 0</answer>"), 1.0);
        // A duplicated target counts once, at its first position: ids = [1, 2, 3, 0], r = 4.
        assert_eq!(r(f, "<answer>1, 2, 3, 0, 0</answer>"), 0.0);
        // Out-of-range numbers are not the target even when they "look" like it mod num_pois.
        assert_eq!(r(f, "<answer>6, 12</answer>"), 0.0);
        // No answer, unclosed answer (still read).
        assert_eq!(r(f, "0, 1, 2"), 0.0);
        assert_eq!(r(f, "<answer>0"), 1.0);
        assert_eq!(r(f, "<answer></answer>"), 0.0);
        // Another target, and k = 1.
        assert_eq!(case("<answer>4, 5</answer>").target(5).run(f), 1.0);
        assert_eq!(case("<answer>4, 5</answer>").target(5).k(1).run(f), 0.0);
        // k = 0: no first-0 ids can hold the target.
        assert_eq!(case("<answer>0</answer>").k(0).run(f), 0.0);
    }

    #[test]
    fn rank_reward_cases() {
        let f = rank_reward;
        // Reciprocal: 1/r.
        assert_eq!(r(f, "<answer>0, 1, 2</answer>"), 1.0);
        assert_eq!(r(f, "<answer>1, 0, 2</answer>"), 0.5);
        assert_close!(r(f, "<answer>1, 2, 0</answer>"), 1.0 / 3.0);
        assert_eq!(r(f, "<answer>1, 2, 3, 0</answer>"), 0.0); // r = 4 > k
        assert_eq!(r(f, "<answer>1, 2</answer>"), 0.0);
        assert_eq!(r(f, "nothing"), 0.0);
        // Duplicates and junk before the target are dropped: ids = [1, 0], r = 2.
        assert_eq!(r(f, "<answer>1, 1, Bar, 0</answer>"), 0.5);
        // NDCG: 1/log2(r+1): r = 1 → 1, r = 2 → 1/log2(3) = 0.6309297535714575, r = 3 → 1/2.
        let ndcg = |text: &str| case(text).params(|p| p.rank = RankKind::Ndcg).run(f);
        assert_eq!(ndcg("<answer>0, 1, 2</answer>"), 1.0);
        assert_close!(ndcg("<answer>1, 0, 2</answer>"), 0.630_929_753_571_457_5);
        assert_close!(ndcg("<answer>1, 2, 0</answer>"), 0.5);
        assert_eq!(ndcg("<answer>1, 2, 3, 0</answer>"), 0.0);
        // Larger k: ids = [1, 2, 3, 4, 5, 0] (9 and Bar dropped), r = 6 → 1/6.
        let text = "<answer>1, 2, 3, 4, 5, 9, Bar, 0</answer>";
        assert_close!(case(text).k(10).run(f), 1.0 / 6.0);
        // NDCG at r = 7 (eight POIs): 1/log2(8) = 1/3.
        let pois7: Vec<Poi> = (0..8).map(|i| poi(i, "C", 0.0, 0.0)).collect();
        let mut c = case("<answer>1, 2, 3, 4, 5, 6, 0</answer>").k(10).params(|p| p.rank = RankKind::Ndcg);
        c.pois = pois7;
        assert_close!(c.run(f), 1.0 / 3.0);
    }

    #[test]
    fn soft_accuracy_cases() {
        let f = soft_accuracy_reward;
        let e1 = (-1.0f64).exp(); // 0.36787944117144233
        let e2 = (-2.0f64).exp(); // 0.1353352832366127
        // Hit within k: 1, whatever else is listed.
        assert_eq!(r(f, "<answer>5, 0</answer>"), 1.0);
        // c = 0.5, s = one unit. POI 1: one unit away, same category (Cafe):
        // 0.5·e⁻¹ + 0.5·1 = 0.6839397205857212.
        assert_close!(r(f, "<answer>1</answer>"), 0.5 * e1 + 0.5);
        assert_close!(r(f, "<answer>1</answer>"), 0.683_939_720_585_721_2);
        // POI 2: one unit away, other category (Bar): 0.5·e⁻¹ = 0.18393972058572117.
        assert_close!(r(f, "<answer>2</answer>"), 0.5 * e1);
        // POI 3: two units, Bar: 0.5·e⁻² = 0.06766764161830635.
        assert_close!(r(f, "<answer>3</answer>"), 0.5 * e2);
        // POI 4: same spot, unknown category (never matches): 0.5·1 + 0 = 0.5.
        assert_close!(r(f, "<answer>4</answer>"), 0.5);
        // POI 5: 1000 units (≈ 1112 km), Gym: 0.5·e⁻¹⁰⁰⁰ + 0 = 0 (underflows).
        assert_eq!(r(f, "<answer>5</answer>"), 0.0);
        // The best listed POI counts, wherever it is in the first k; order does not matter.
        assert_close!(r(f, "<answer>3, 2, 5</answer>"), 0.5 * e1);
        assert_close!(r(f, "<answer>5, 2, 1</answer>"), 0.5 * e1 + 0.5);
        assert_close!(r(f, "<answer>1, 2, 5</answer>"), r(f, "<answer>5, 2, 1</answer>"));
        // Ties: two POIs worth the same (1 and 2 with category weight 0) give that value once.
        let dist_only = |text: &str| case(text).params(|p| p.soft_category_weight = 0.0).run(f);
        assert_close!(dist_only("<answer>1, 2</answer>"), e1);
        assert_close!(dist_only("<answer>2, 1</answer>"), e1);
        assert_close!(dist_only("<answer>3</answer>"), e2);
        assert_close!(dist_only("<answer>4</answer>"), 1.0); // same spot, distance only
        // Category only (c = 1): 1 for the same category, 0 otherwise, whatever the distance.
        let cat_only = |text: &str| case(text).params(|p| p.soft_category_weight = 1.0).run(f);
        assert_eq!(cat_only("<answer>1</answer>"), 1.0);
        assert_eq!(cat_only("<answer>2, 3, 4</answer>"), 0.0);
        // A larger scale gives more credit: s = 2 units, POI 3 (two units, Bar): 0.5·e⁻¹.
        let s2 = unit_km() * 2.0;
        assert_close!(case("<answer>3</answer>").params(|p| p.soft_scale_km = s2).run(f), 0.5 * e1);
        // Only the first k count: the target and POI 1 past position 3 earn nothing.
        assert_close!(r(f, "<answer>2, 3, 5, 0, 1</answer>"), 0.5 * e1);
        // Empty lists: 0.
        for text in ["", "<answer></answer>", "<answer>9, Bar</answer>", "0, 1"] {
            assert_eq!(r(f, text), 0.0, "{text:?}");
        }
        // Target with an unknown category: only distance can count (POI 4 is the target here).
        assert_close!(case("<answer>1</answer>").target(4).run(f), 0.5 * e1);
        // A target id outside the table (should not happen): 0 on a miss.
        assert_eq!(case("<answer>1</answer>").target(99).run(f), 0.0);
    }

    #[test]
    fn diversity_cases() {
        let f = diversity_reward;
        assert_eq!(r(f, "<answer>1, 2, 3</answer>"), 1.0);
        // ids = [1, 2], duplicates = 2: 2 / 4.
        assert_eq!(r(f, "<answer>1, 1, 2, 2</answer>"), 0.5);
        // ids = [1], duplicates = 2: 1/3.
        assert_close!(r(f, "<answer>1, 1, 1</answer>"), 1.0 / 3.0);
        // Out-of-range and non-numeric items do not count either way: ids = [1, 2], dup 1: 2/3.
        assert_close!(r(f, "<answer>1, 9, 9, Bar, 2, 1</answer>"), 2.0 / 3.0);
        assert_eq!(r(f, "<answer>1, 9, Bar</answer>"), 1.0);
        // No in-range id: 0.
        for text in ["<answer>9, 9</answer>", "<answer></answer>", "", "1, 1"] {
            assert_eq!(r(f, text), 0.0, "{text:?}");
        }
    }

    #[test]
    fn length_cases() {
        let f = length_reward;
        // k = 3, n items: max(0, 1 − |n − 3| / 3).
        assert_eq!(r(f, "<answer>1, 2, 3</answer>"), 1.0);
        assert_close!(r(f, "<answer>1, 2</answer>"), 2.0 / 3.0);
        assert_close!(r(f, "<answer>1</answer>"), 1.0 / 3.0);
        assert_close!(r(f, "<answer>1, 2, 3, 4</answer>"), 2.0 / 3.0);
        assert_close!(r(f, "<answer>1, 2, 3, 4, 5</answer>"), 1.0 / 3.0);
        assert_eq!(r(f, "<answer>1, 2, 3, 4, 5, 0</answer>"), 0.0); // |6 − 3| / 3 = 1
        assert_eq!(r(f, "<answer>1, 2, 3, 4, 5, 0, 1, 2, 3</answer>"), 0.0); // clamped at 0
        // Every item counts, valid or not.
        assert_eq!(r(f, "<answer>1, Bar, 9</answer>"), 1.0);
        assert_eq!(r(f, "<answer>1, 1, 1</answer>"), 1.0);
        // No list: 0.
        assert_eq!(r(f, "<answer></answer>"), 0.0);
        assert_eq!(r(f, "1, 2, 3"), 0.0);
        // Reasoning budget B = 100: factor max(0, 1 − (T − B) / B).
        let budget =
            |tokens: usize| case("<think>x</think><answer>1, 2, 3</answer>").reasoning(tokens).params(|p| p.reasoning_budget_tokens = 100);
        assert_eq!(budget(100).run(f), 1.0);
        assert_eq!(budget(150).run(f), 0.5);
        assert_close!(budget(175).run(f), 0.25);
        assert_eq!(budget(200).run(f), 0.0);
        assert_eq!(budget(250).run(f), 0.0);
        // Combined: 2 items (2/3) and T = 150 (1/2): 1/3.
        let c = case("<think>x</think><answer>1, 2</answer>").reasoning(150).params(|p| p.reasoning_budget_tokens = 100);
        assert_close!(c.run(f), 1.0 / 3.0);
        // Budget 0 = none; reasoning off = no budget.
        let c = case("<answer>1, 2, 3</answer>").reasoning(10_000).params(|p| p.reasoning_budget_tokens = 0);
        assert_eq!(c.run(f), 1.0);
        let mut c = budget(250);
        c.reasoning = false;
        assert_eq!(c.run(f), 1.0);
        // k = 1 and k = 0.
        assert_eq!(case("<answer>1, 2</answer>").k(1).run(f), 0.0);
        assert_eq!(case("<answer></answer>").k(0).run(f), 1.0);
        assert_eq!(case("<answer>1</answer>").k(0).run(f), 0.0);
    }

    #[test]
    fn every_reward_is_zero_without_an_answer_and_in_unit_range() {
        for text in ["", "no answer here 0, 1, 2", "<think>0</think>", "<answer>", "<answer></answer>"] {
            let c = case(text);
            let answer = parse_answer(text, c.pois.len());
            for spec in REWARDS {
                assert_eq!((spec.func)(&c.input(&answer)), 0.0, "{} on {text:?}", spec.name);
            }
        }
        for text in ["<answer>0, 1, 2</answer>", "<answer>5, 5, 9, 3, 2, 1, 0</answer>", "<answer>[4]"] {
            for k in [1, 3, 10] {
                let c = case(text).k(k).reasoning(300);
                let answer = parse_answer(text, c.pois.len());
                for spec in REWARDS {
                    let v = (spec.func)(&c.input(&answer));
                    assert!((0.0..=1.0).contains(&v), "{} = {v} on {text:?}, k = {k}", spec.name);
                }
            }
        }
    }

    #[test]
    fn score_weighted_total() {
        let c = case("<answer>1, 0, 2</answer>");
        let answer = parse_answer(&c.text, c.pois.len());
        let w = RewardWeights::default();
        let b = score(&c.input(&answer), &w);
        let names: Vec<_> = b.terms.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["format", "hit", "rank", "soft_accuracy", "diversity", "length"]);
        // format 1, hit 1, rank 1/2, soft 1 (hit), diversity 1, length 1; default weights
        // 0.2, 1, 1, 0.5, 0.1, 0.2: 0.2 + 1 + 0.5 + 0.5 + 0.1 + 0.2 = 2.5.
        assert_eq!(b.get("rank"), Some(0.5));
        assert_eq!(b.get("nope"), None);
        assert_close!(b.total, 2.5);

        // A miss: "<answer>2, 2, 9</answer>": ids = [2], dup 1, oor 1, items 3.
        // format 0.5, hit 0, rank 0, soft 0.5·e⁻¹, diversity 1/2, length 1.
        // Weights: format 1, hit 2, rank 0, soft 4, diversity −1, length 0.5:
        // 0.5 + 0 + 0 + 2·e⁻¹ − 0.5 + 0.5 = 0.5 + 2·e⁻¹ = 1.2357588823428847.
        let mut w = RewardWeights::default();
        let custom = [("format", 1.0), ("hit", 2.0), ("rank", 0.0), ("soft_accuracy", 4.0), ("diversity", -1.0), ("length", 0.5)];
        for (n, v) in custom {
            w.set(n, v).unwrap();
        }
        let c = case("<answer>2, 2, 9</answer>");
        let answer = parse_answer(&c.text, c.pois.len());
        let b = score(&c.input(&answer), &w);
        let want = [0.5, 0.0, 0.0, 0.5 * (-1.0f64).exp(), 0.5, 1.0];
        for ((n, v), want) in b.terms.iter().zip(want) {
            assert_close!(*v, want, "{n}");
        }
        assert_close!(b.total, 0.5 + 2.0 * (-1.0f64).exp());
        assert_close!(b.total, 1.235_758_882_342_884_7);

        // Zero weights: terms still reported, total 0.
        let mut w = RewardWeights::default();
        for spec in REWARDS {
            w.set(spec.name, 0.0).unwrap();
        }
        let b = score(&c.input(&answer), &w);
        assert_eq!(b.total, 0.0);
        assert_eq!(b.get("format"), Some(0.5));

        let json = serde_json::to_value(&b).unwrap();
        assert_eq!(json["terms"]["format"], 0.5);
        assert_eq!(json["total"], 0.0);
        assert_eq!(json["terms"].as_object().unwrap().len(), REWARDS.len());
    }

    #[test]
    fn registry_is_consistent() {
        let mut names: Vec<_> = REWARDS.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REWARDS.len(), "reward names must be unique");
        for spec in REWARDS {
            assert!(reward_by_name(spec.name).is_some());
            assert!(!spec.formula.is_empty() && spec.default_weight.is_finite());
        }
        assert!(reward_by_name("nope").is_none());
        let md = rewards_markdown();
        for spec in REWARDS {
            assert!(md.contains(&format!("| `{}` |", spec.name)), "{md}");
        }
        // A `|` inside a formula would split its table cell: every row has exactly 4.
        for line in md.lines().filter(|l| l.starts_with('|')) {
            assert_eq!(line.matches('|').count(), 4, "{line}");
        }
        for key in ["rank", "soft_scale_km", "soft_category_weight", "reasoning_budget_tokens"] {
            assert!(md.contains(&format!("| `{key}` |")), "{key} missing from {md}");
        }
        // The params table lists every field of RewardParams.
        let fields = toml::Value::try_from(RewardParams::default()).unwrap();
        assert_eq!(fields.as_table().unwrap().len(), 4);
    }

    /// `docs/rewards.md` shows the registry's tables as they are: every reward with its default
    /// weight and formula, every parameter. `REFINE_POI_BLESS=1` rewrites the doc's table.
    #[test]
    fn the_docs_show_every_reward_with_its_formula() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/rewards.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let (begin, end) =
            ("<!-- rewards-table: generated from src/train/grpo/rewards.rs, checked by a test -->\n", "<!-- /rewards-table -->");
        let start = doc.find(begin).expect("docs/rewards.md lacks the table's begin marker") + begin.len();
        let stop = doc[start..].find(end).expect("docs/rewards.md lacks the table's end marker") + start;
        let want = rewards_markdown();
        if std::env::var_os("REFINE_POI_BLESS").is_some() {
            std::fs::write(&path, format!("{}{want}{}", &doc[..start], &doc[stop..])).unwrap();
            return;
        }
        assert_eq!(doc[start..stop], want, "docs/rewards.md is out of date: rerun this test with REFINE_POI_BLESS=1");
        for spec in REWARDS {
            assert!(doc.contains(spec.formula), "docs/rewards.md lacks the formula of {}", spec.name);
        }
    }

    #[test]
    fn config_defaults_overrides_and_errors() {
        // Empty table: every default.
        let c: RewardsConfig = toml::from_str("").unwrap();
        assert_eq!(c, RewardsConfig::default());
        c.validate().unwrap();
        assert_eq!(c.weights.get("hit"), Some(1.0));
        assert_eq!(c.weights.get("format"), Some(0.2));

        // Partial weights keep the other defaults.
        let c: RewardsConfig =
            toml::from_str("[weights]\nhit = 2.0\nsoft_accuracy = 0\n[params]\nrank = \"ndcg\"\nsoft_scale_km = 2.5\n").unwrap();
        assert_eq!(c.weights.get("hit"), Some(2.0));
        assert_eq!(c.weights.get("soft_accuracy"), Some(0.0));
        assert_eq!(c.weights.get("rank"), Some(1.0));
        assert_eq!(c.params.rank, RankKind::Ndcg);
        assert_eq!(c.params.soft_scale_km, 2.5);
        assert_eq!(c.params.soft_category_weight, 0.5);

        // Round trip: every key spelled out, in table order.
        let text = toml::to_string(&c).unwrap();
        for spec in REWARDS {
            assert!(text.contains(&format!("{} = ", spec.name)), "{text}");
        }
        assert!(text.find("format").unwrap() < text.find("length").unwrap());
        assert_eq!(toml::from_str::<RewardsConfig>(&text).unwrap(), c);

        // Unknown keys are rejected, naming the key.
        let err = toml::from_str::<RewardsConfig>("[weights]\nhitt = 1.0\n").unwrap_err().to_string();
        assert!(err.contains("unknown reward `hitt`") && err.contains("soft_accuracy"), "{err}");
        let err = toml::from_str::<RewardsConfig>("[params]\nscale = 1.0\n").unwrap_err().to_string();
        assert!(err.contains("scale"), "{err}");
        let err = toml::from_str::<RewardsConfig>("hit = 1.0\n").unwrap_err().to_string();
        assert!(err.contains("hit"), "{err}");
        assert!(toml::from_str::<RewardsConfig>("[params]\nrank = \"mrr\"\n").is_err());
        let mut w = RewardWeights::default();
        assert!(w.set("nope", 1.0).is_err());

        // Validation.
        let bad = |f: fn(&mut RewardsConfig)| {
            let mut c = RewardsConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.params.soft_scale_km = 0.0).contains("soft_scale_km"));
        assert!(bad(|c| c.params.soft_scale_km = f64::NAN).contains("soft_scale_km"));
        assert!(bad(|c| c.params.soft_category_weight = 1.5).contains("soft_category_weight"));
        assert!(bad(|c| c.params.soft_category_weight = -0.1).contains("soft_category_weight"));
        assert!(bad(|c| c.weights.set("rank", f64::INFINITY).unwrap()).contains("rewards.weights.rank"));
        let msg = bad(|c| {
            for spec in REWARDS {
                c.weights.set(spec.name, 0.0).unwrap();
            }
        });
        assert!(msg.contains("0"), "{msg}");
    }
}
