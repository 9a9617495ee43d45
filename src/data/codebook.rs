//! Semantic POI ids: each POI gets a short code of new vocabulary tokens, e.g. `<a12><b3><c40>`,
//! learned from the train split only, so that nearby and similar POIs share prefixes.
//!
//! - Level `a` clusters every POI by location (k-means on kilometres).
//! - Each later learned level splits its parent cluster by what a POI is and how it is used:
//!   its category (one-hot), a random projection of its train transitions (which POIs train
//!   trajectories go to from it and come to it from), and, with less weight, its position.
//! - The last level numbers the POIs of a leaf, most train visits first, which makes every code
//!   unique.
//!
//! Everything is a pure function of the train split, the POI table and the seed: `preprocess`
//! writes the result to the dataset directory as `codebook.json`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{Dataset, Split};
use crate::seed::{SEED_CODEBOOK, derive_seed};

/// The file name inside a dataset directory.
pub const FILE: &str = "codebook.json";

/// One letter per level: `<a..>`, `<b..>`, ...
const LETTERS: &[u8] = b"abcdefgh";

/// Dimensions of the random projection of a POI's transitions, per direction.
const TRANSITION_DIMS: usize = 16;

/// Weight per kilometre of a POI's position in the later levels' features: next to a category
/// (1 apart) and the transitions (unit length), POIs of one kind still split by place.
const DETAIL_KM_WEIGHT: f64 = 0.5;

/// Lloyd iterations at most per k-means run (it stops earlier when no point moves).
const KMEANS_ITERATIONS: usize = 50;

/// `[codebook]`: how `preprocess` learns the semantic ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodebookConfig {
    /// Clusters per learned level, coarse first; the disambiguating level comes on top.
    pub levels: Vec<usize>,
    /// The k-means initialisations and the transition projection.
    pub seed: u64,
}

impl Default for CodebookConfig {
    fn default() -> Self {
        CodebookConfig { levels: vec![32, 16], seed: 0 }
    }
}

impl CodebookConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.levels.is_empty(), "codebook.levels needs at least one learned level");
        ensure!(self.levels.len() < LETTERS.len(), "codebook.levels: at most {} learned levels", LETTERS.len() - 1);
        ensure!(self.levels.iter().all(|&k| (1..=4096).contains(&k)), "codebook.levels: each level has 1 to 4096 clusters");
        Ok(())
    }
}

/// Every POI's code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Codebook {
    pub config: CodebookConfig,
    /// Tokens per level, the disambiguating level last.
    pub sizes: Vec<usize>,
    /// The code of POI `i`: one index per level.
    pub codes: Vec<Vec<u16>>,
}

impl Codebook {
    /// Learns the codes of `ds`'s POIs from its train split.
    pub fn build(ds: &Dataset, config: &CodebookConfig) -> Result<Codebook> {
        config.validate()?;
        let n = ds.num_pois();
        ensure!(n > 0, "the codebook needs at least one POI");
        let location = location_features(ds);
        let mut detail = detail_features(ds, config.seed);
        for (d, loc) in detail.iter_mut().zip(&location) {
            d.extend(loc.iter().map(|x| x * DETAIL_KM_WEIGHT));
        }
        let mut codes: Vec<Vec<u16>> = vec![Vec::new(); n];
        let mut groups: Vec<Vec<usize>> = vec![(0..n).collect()];
        let mut sizes = Vec::new();
        for (level, &k) in config.levels.iter().enumerate() {
            let mut next = Vec::new();
            let mut used = 0;
            for (g, members) in groups.iter().enumerate() {
                let points: Vec<&[f64]> = members.iter().map(|&p| if level == 0 { &location[p][..] } else { &detail[p][..] }).collect();
                let seed = derive_seed(config.seed, SEED_CODEBOOK, ((level as u64) << 32) | g as u64);
                let clusters = kmeans(&points, k, seed);
                used = used.max(clusters.len());
                for (c, cluster) in clusters.into_iter().enumerate() {
                    let cluster: Vec<usize> = cluster.into_iter().map(|i| members[i]).collect();
                    for &p in &cluster {
                        codes[p].push(c as u16);
                    }
                    next.push(cluster);
                }
            }
            sizes.push(used);
            groups = next;
        }
        let pois = ds.pois();
        let mut leaf_size = 0;
        for mut leaf in groups {
            leaf.sort_by_key(|&p| (std::cmp::Reverse(pois[p].train_visits), p));
            ensure!(leaf.len() <= usize::from(u16::MAX), "a codebook leaf holds {} POIs: use more clusters", leaf.len());
            leaf_size = leaf_size.max(leaf.len());
            for (i, &p) in leaf.iter().enumerate() {
                codes[p].push(i as u16);
            }
        }
        sizes.push(leaf_size);
        Ok(Codebook { config: config.clone(), sizes, codes })
    }

    pub fn levels(&self) -> usize {
        self.sizes.len()
    }

    /// The token of index `i` at `level`, e.g. `<b3>`.
    pub fn token(level: usize, i: usize) -> String {
        format!("<{}{i}>", LETTERS[level] as char)
    }

    /// Every token of the codebook, level by level: the vocabulary it adds, in this order.
    pub fn tokens(&self) -> Vec<String> {
        self.sizes.iter().enumerate().flat_map(|(level, &size)| (0..size).map(move |i| Codebook::token(level, i))).collect()
    }

    /// POI `poi`'s code as text, e.g. `<a12><b3><c40>`.
    pub fn code_text(&self, poi: u32) -> String {
        self.codes[poi as usize].iter().enumerate().map(|(level, &i)| Codebook::token(level, usize::from(i))).collect()
    }

    /// The POI of each code, for reading answers back.
    pub fn index(&self) -> HashMap<&[u16], u32> {
        self.codes.iter().enumerate().map(|(p, c)| (&c[..], p as u32)).collect()
    }

    /// The answer list in codes, `<a1><b0><c2><a0><b3><c1>`: each code is self-delimiting, so
    /// no separator is spent between them.
    pub fn list_text(&self, ids: &[u32]) -> String {
        ids.iter().map(|&p| self.code_text(p)).collect()
    }

    /// `text` with every run of codes rewritten as the POIs' dense ids, `12, 40`, so that the
    /// answer parser, the rewards and the logs read one form. A code that names no POI, or a
    /// broken one (`<a1><c2>`), is kept as it is: the parser counts it as an item that is not
    /// an id.
    pub fn to_raw_ids(&self, text: &str) -> String {
        let index = self.index();
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find('<') {
            out.push_str(&rest[..start]);
            let run = &rest[start..];
            let tokens = code_tokens(run);
            if tokens.is_empty() {
                out.push('<');
                rest = &run[1..];
                continue;
            }
            let mut items = Vec::new();
            let mut i = 0;
            while i < tokens.len() {
                // A code: levels 0, 1, ... in order; it ends where the next level-0 token starts.
                let mut j = i + 1;
                while j < tokens.len() && tokens[j].level != 0 {
                    j += 1;
                }
                let group = &tokens[i..j];
                let code: Option<Vec<u16>> = (group.len() == self.levels() && group.iter().enumerate().all(|(l, t)| t.level == l))
                    .then(|| group.iter().map(|t| t.index).collect::<Option<_>>())
                    .flatten();
                let text_of_group = &run[group[0].start..group[group.len() - 1].end];
                items.push(match code.as_deref().and_then(|c| index.get(c)) {
                    Some(poi) => poi.to_string(),
                    None => text_of_group.to_string(),
                });
                i = j;
            }
            let after = &run[tokens[tokens.len() - 1].end..];
            // A digit beside the run would join the first or last id into another number
            // (`1<a0><b0><c0>` is not POI 10): such a run stays as written, an item that is not an id.
            let digit_beside = out.ends_with(|c: char| c.is_ascii_digit()) || after.starts_with(|c: char| c.is_ascii_digit());
            if digit_beside {
                out.push_str(&run[..tokens[tokens.len() - 1].end]);
            } else {
                out.push_str(&items.join(", "));
            }
            rest = after;
        }
        out.push_str(rest);
        out
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE);
        let text = serde_json::to_string(self)?;
        crate::fsutil::write_atomic(&path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
    }

    /// The codebook in dataset directory `dir`, checked against its `num_pois` POIs.
    pub fn load(dir: &Path, num_pois: usize) -> Result<Codebook> {
        let path = dir.join(FILE);
        if !path.exists() {
            bail!("{} has no {FILE}: semantic ids need a dataset written by this version's `preprocess`", dir.display());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let cb: Codebook = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cb.check(num_pois).with_context(|| format!("{}", path.display()))?;
        Ok(cb)
    }

    /// Every POI has a code of one index per level, within the level's size, and no two share one.
    pub fn check(&self, num_pois: usize) -> Result<()> {
        ensure!(self.codes.len() == num_pois, "the codebook has {} codes for {num_pois} POIs", self.codes.len());
        ensure!((1..=LETTERS.len()).contains(&self.levels()), "the codebook has {} levels", self.levels());
        for (p, code) in self.codes.iter().enumerate() {
            ensure!(code.len() == self.levels(), "POI {p}'s code has {} levels, not {}", code.len(), self.levels());
            for (level, &i) in code.iter().enumerate() {
                ensure!(usize::from(i) < self.sizes[level], "POI {p}'s code is out of range at level {level}");
            }
        }
        ensure!(self.index().len() == num_pois, "two POIs share a code");
        Ok(())
    }
}

/// One code token found in a text: its level, index (`None` beyond u16) and byte range.
struct CodeToken {
    level: usize,
    index: Option<u16>,
    start: usize,
    end: usize,
}

/// The code tokens at the start of `text`, back to back (`<a1><b22>...`), up to the first
/// byte that does not continue them.
fn code_tokens(text: &str) -> Vec<CodeToken> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.get(at) == Some(&b'<') {
        let Some(level) = bytes.get(at + 1).and_then(|b| LETTERS.iter().position(|l| l == b)) else { break };
        let digits = bytes[at + 2..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || bytes.get(at + 2 + digits) != Some(&b'>') {
            break;
        }
        // Only canonical indices (`<a1>`, never `<a01>`): the ones `code_text` writes.
        let digits_text = &text[at + 2..at + 2 + digits];
        let index = (digits == 1 || !digits_text.starts_with('0')).then(|| digits_text.parse::<u16>().ok()).flatten();
        out.push(CodeToken { level, index, start: at, end: at + 3 + digits });
        at += 3 + digits;
    }
    out
}

/// Each POI's position in kilometres east and north of the POIs' mean position.
fn location_features(ds: &Dataset) -> Vec<Vec<f64>> {
    let pois = ds.pois();
    let n = pois.len() as f64;
    let lat0 = pois.iter().map(|p| p.lat).sum::<f64>() / n;
    let lon0 = pois.iter().map(|p| p.lon).sum::<f64>() / n;
    let km_per_deg = super::EARTH_RADIUS_KM * std::f64::consts::PI / 180.0;
    let east = km_per_deg * lat0.to_radians().cos();
    pois.iter().map(|p| vec![(p.lon - lon0) * east, (p.lat - lat0) * km_per_deg]).collect()
}

/// Each POI's category (one-hot) beside a random projection of its train transitions, out of
/// it and into it; each part has unit length (an unvisited POI's transition part is zero).
fn detail_features(ds: &Dataset, seed: u64) -> Vec<Vec<f64>> {
    let pois = ds.pois();
    let categories = ds.categories();
    let category_index: HashMap<&str, usize> = categories.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    // A fixed random ±1 vector per POI: its transition profile is the sum of its neighbours'.
    let sign = |poi: u32, d: usize| -> f64 {
        if derive_seed(seed, SEED_CODEBOOK, (u64::from(poi) << 8) | d as u64) & 1 == 0 { 1.0 } else { -1.0 }
    };
    let mut transitions = vec![vec![0f64; 2 * TRANSITION_DIMS]; pois.len()];
    for t in ds.trajectories().iter().filter(|t| t.split == Split::Train) {
        for pair in ds.trajectory_checkins(t).windows(2) {
            let (from, to) = (pair[0].poi, pair[1].poi);
            for d in 0..TRANSITION_DIMS {
                transitions[from as usize][d] += sign(to, d);
                transitions[to as usize][TRANSITION_DIMS + d] += sign(from, d);
            }
        }
    }
    pois.iter()
        .zip(transitions)
        .map(|(p, mut tr)| {
            let mut f = vec![0f64; categories.len()];
            if let Some(&c) = category_index.get(p.category.as_str()) {
                f[c] = 1.0;
            }
            let norm = tr.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                tr.iter_mut().for_each(|x| *x /= norm);
            }
            f.extend(tr);
            f
        })
        .collect()
}

fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// k-means (k-means++ seeding, then Lloyd) of `points` into at most `k` clusters: each cluster
/// is a list of indices into `points`, ascending; empty clusters are dropped. Deterministic in
/// `seed`: one thread, sums in a fixed order.
fn kmeans(points: &[&[f64]], k: usize, seed: u64) -> Vec<Vec<usize>> {
    let n = points.len();
    if n <= k {
        return (0..n).map(|i| vec![i]).collect();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut centroids: Vec<Vec<f64>> = vec![points[rng.random_range(0..n)].to_vec()];
    let mut nearest: Vec<f64> = points.iter().map(|p| squared_distance(p, &centroids[0])).collect();
    while centroids.len() < k {
        let total: f64 = nearest.iter().sum();
        if total <= 0.0 {
            break; // fewer distinct points than k
        }
        let mut r = rng.random::<f64>() * total;
        let mut pick = n - 1;
        for (i, &d) in nearest.iter().enumerate() {
            if r < d {
                pick = i;
                break;
            }
            r -= d;
        }
        centroids.push(points[pick].to_vec());
        for (i, p) in points.iter().enumerate() {
            nearest[i] = nearest[i].min(squared_distance(p, centroids.last().unwrap()));
        }
    }
    let closest = |p: &[f64], centroids: &[Vec<f64>]| -> usize {
        let mut best = (f64::INFINITY, 0);
        for (c, centroid) in centroids.iter().enumerate() {
            let d = squared_distance(p, centroid);
            if d < best.0 {
                best = (d, c);
            }
        }
        best.1
    };
    let mut assignment: Vec<usize> = points.iter().map(|p| closest(p, &centroids)).collect();
    for _ in 0..KMEANS_ITERATIONS {
        let dims = points[0].len();
        let mut sums = vec![vec![0f64; dims]; centroids.len()];
        let mut counts = vec![0usize; centroids.len()];
        for (p, &c) in points.iter().zip(&assignment) {
            counts[c] += 1;
            sums[c].iter_mut().zip(p.iter()).for_each(|(s, x)| *s += x);
        }
        for (c, sum) in sums.into_iter().enumerate() {
            if counts[c] > 0 {
                centroids[c] = sum.into_iter().map(|s| s / counts[c] as f64).collect();
            }
        }
        let next: Vec<usize> = points.iter().map(|p| closest(p, &centroids)).collect();
        if next == assignment {
            break;
        }
        assignment = next;
    }
    let mut clusters = vec![Vec::new(); centroids.len()];
    for (i, &c) in assignment.iter().enumerate() {
        clusters[c].push(i);
    }
    clusters.retain(|c| !c.is_empty());
    clusters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_separates_clear_groups_and_is_deterministic() {
        let raw: Vec<Vec<f64>> = (0..30).map(|i| vec![(i / 10) as f64 * 100.0 + (i % 10) as f64 * 0.1, 0.0]).collect();
        let points: Vec<&[f64]> = raw.iter().map(|p| &p[..]).collect();
        let a = kmeans(&points, 3, 7);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, vec![(0..10).collect::<Vec<_>>(), (10..20).collect(), (20..30).collect()]);
        assert_eq!(a, kmeans(&points, 3, 7));
        // Fewer points than clusters: one each; identical points: one cluster.
        assert_eq!(kmeans(&points[..2], 5, 0), vec![vec![0], vec![1]]);
        let same: Vec<&[f64]> = vec![&raw[0][..]; 6];
        assert_eq!(kmeans(&same, 3, 0), vec![(0..6).collect::<Vec<_>>()]);
    }

    #[test]
    fn tokens_and_code_text() {
        let cb =
            Codebook { config: CodebookConfig::default(), sizes: vec![2, 1, 3], codes: vec![vec![0, 0, 0], vec![1, 0, 2], vec![1, 0, 0]] };
        assert_eq!(cb.tokens(), ["<a0>", "<a1>", "<b0>", "<c0>", "<c1>", "<c2>"]);
        assert_eq!(cb.code_text(1), "<a1><b0><c2>");
        cb.check(3).unwrap();
        assert!(cb.check(4).is_err());
        let mut clash = cb.clone();
        clash.codes[2] = vec![1, 0, 2];
        assert!(clash.check(3).unwrap_err().to_string().contains("share a code"));
        let mut out_of_range = cb;
        out_of_range.codes[0] = vec![0, 1, 0];
        assert!(out_of_range.check(3).is_err());
    }

    #[test]
    fn only_the_train_split_shapes_the_codes() {
        use crate::data::protocol::{ProtocolConfig, run, tests::raw};
        const H: i64 = 3600;
        let train = [
            ("1", "a", 0),
            ("1", "b", H),
            ("1", "c", 2 * H),
            ("2", "a", 0),
            ("2", "c", H),
            ("2", "d", 2 * H),
            ("3", "b", 0),
            ("3", "d", H),
            ("3", "a", 2 * H),
            ("3", "e", 3 * H),
        ];
        // Two futures over the same POIs, in other orders.
        let later = [
            [("1", "d", 100 * H), ("1", "a", 101 * H), ("2", "b", 100 * H), ("2", "e", 101 * H)],
            [("1", "a", 100 * H), ("1", "d", 101 * H), ("2", "e", 100 * H), ("2", "b", 101 * H)],
        ];
        let cfg = ProtocolConfig { min_user: 1, min_poi: 1, split: "0.7,0.15".parse().unwrap(), ..Default::default() };
        let built: Vec<(Dataset, Codebook)> = later
            .iter()
            .map(|l| {
                let rows: Vec<_> = train.iter().chain(l).copied().collect();
                let (ds, _) = run(&raw(&rows), &cfg).unwrap();
                let cb = Codebook::build(&ds, &CodebookConfig { levels: vec![2, 2], seed: 3 }).unwrap();
                (ds, cb)
            })
            .collect();
        let train_checkins = |ds: &Dataset| -> Vec<(u32, i64)> {
            ds.trajectories()
                .iter()
                .filter(|t| t.split == Split::Train)
                .flat_map(|t| ds.trajectory_checkins(t).iter().map(|c| (c.poi, c.utc)))
                .collect()
        };
        let (a, b) = (&built[0], &built[1]);
        assert_eq!(train_checkins(&a.0), train_checkins(&b.0), "the two datasets share their train split");
        assert_ne!(a.0.checkins(), b.0.checkins(), "and differ after it");
        assert_eq!(a.1, b.1);
        a.1.check(a.0.num_pois()).unwrap();
        // Deterministic in the seed.
        assert_eq!(Codebook::build(&a.0, &a.1.config).unwrap(), a.1);
    }

    #[test]
    fn codes_read_back_as_dense_ids() {
        let cb =
            Codebook { config: CodebookConfig::default(), sizes: vec![2, 1, 3], codes: vec![vec![0, 0, 0], vec![1, 0, 2], vec![1, 0, 0]] };
        let list = cb.list_text(&[1, 0, 2]);
        assert_eq!(list, "<a1><b0><c2><a0><b0><c0><a1><b0><c0>");
        assert_eq!(cb.to_raw_ids(&format!("<answer>{list}</answer>")), "<answer>1, 0, 2</answer>");
        // Unknown and broken codes stay as they are, each its own item (a code runs from one
        // level-a token to the next).
        assert_eq!(
            cb.to_raw_ids("<answer><a1><b0><c1><a0><b0><c0><a1><c2><b0></answer>"),
            "<answer><a1><b0><c1>, 0, <a1><c2><b0></answer>"
        );
        assert_eq!(cb.to_raw_ids("<b0><c0><a0><b0><c0>"), "<b0><c0>, 0");
        assert_eq!(cb.to_raw_ids("<think>x < y</think><a0><b0><c0>, <a99999><b0><c0> <a"), "<think>x < y</think>0, <a99999><b0><c0> <a");
        assert_eq!(cb.to_raw_ids("no codes"), "no codes");
        // A digit beside a run would make another id of it; a non-canonical index names no POI.
        assert_eq!(cb.to_raw_ids("<answer>1<a0><b0><c0></answer>"), "<answer>1<a0><b0><c0></answer>");
        assert_eq!(cb.to_raw_ids("<a1><b0><c2>5"), "<a1><b0><c2>5");
        assert_eq!(cb.to_raw_ids("<a01><b0><c2>"), "<a01><b0><c2>");
        assert!(!crate::answer::parse_answer(&cb.to_raw_ids("<answer>1<a0><b0><c0></answer>"), 1).well_formed);
        // The round trip through the answer parser: the same ranked list, well formed.
        let parsed = crate::answer::parse_answer(&cb.to_raw_ids(&format!("<answer>{list}</answer>")), 3);
        assert_eq!(parsed.ids, vec![1, 0, 2]);
        assert!(parsed.well_formed);
    }
}
