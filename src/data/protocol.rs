//! The evaluation protocol (`docs/protocol.md`), step by step, on interned raw rows:
//!
//! 1. [`kcore`]: users with fewer than `min_user` and POIs with fewer than `min_poi` check-ins
//!    are dropped, repeatedly, until nothing changes (counts over the whole data set).
//! 2. [`trajectories`]: per user in time order (equal times keep input order), a new trajectory
//!    when the gap to the previous check-in is more than `gap_hours` (exactly `gap_hours`
//!    continues); trajectories with fewer than 2 check-ins are dropped with their check-ins.
//! 3. [`cutoffs`]: with the n remaining check-in times sorted, `c1 = t[floor(0.8 n)]`,
//!    `c2 = t[floor(0.9 n)]`; a trajectory whose first check-in is before c1 is train, before c2
//!    val, else test.
//! 4. [`run`] builds instances: train, every check-in after the first of a train trajectory with
//!    its prefix; val/test, one per trajectory with its last check-in as target, dropped when the
//!    user has no train trajectory or the target POI never occurs in a train trajectory.
//! 5. History (in [`Dataset::history`]): the user's kept check-ins strictly before the target.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde::Serialize;

use super::dataset::{Dataset, Poi, Trajectory, User};
use super::readers::{RawCheckin, RawData};
use super::{Checkin, Instance, Split, format_utc};

/// A fraction written as a decimal (`0.8`), kept exact so that `floor(0.8 n)` is the
/// mathematical floor, not a floating-point accident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    pub num: u64,
    pub den: u64,
}

impl Fraction {
    /// `floor(self * n)`.
    pub fn floor_mul(self, n: usize) -> usize {
        ((self.num as u128 * n as u128) / self.den as u128) as usize
    }

    fn add(self, o: Fraction) -> Fraction {
        Fraction { num: self.num * o.den + o.num * self.den, den: self.den * o.den }
    }

    fn as_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

impl std::str::FromStr for Fraction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let err = || format!("'{s}' is not a decimal fraction between 0 and 1 (like 0.8)");
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty() && frac.is_empty()
            || frac.len() > 9
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let den = 10u64.pow(frac.len() as u32);
        let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| err())? };
        let f: u64 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| err())? };
        let num = int.checked_mul(den).and_then(|x| x.checked_add(f)).ok_or_else(err)?;
        if num > den {
            return Err(err());
        }
        Ok(Fraction { num, den })
    }
}

/// `--split train,val`: the train and validation fractions of the check-in times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitFractions {
    pub train: Fraction,
    pub val: Fraction,
}

impl Default for SplitFractions {
    fn default() -> Self {
        SplitFractions { train: Fraction { num: 8, den: 10 }, val: Fraction { num: 1, den: 10 } }
    }
}

impl std::str::FromStr for SplitFractions {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((a, b)) = s.split_once(',') else {
            return Err(format!("expected TRAIN,VAL fractions like 0.8,0.1, got '{s}'"));
        };
        let train: Fraction = a.parse()?;
        let val: Fraction = b.parse()?;
        let sum = train.add(val);
        if train.num == 0 {
            return Err("the train fraction must be positive".into());
        }
        if sum.num > sum.den {
            return Err(format!("train + val fractions exceed 1 in '{s}'"));
        }
        Ok(SplitFractions { train, val })
    }
}

impl std::fmt::Display for SplitFractions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.train.as_f64(), self.val.as_f64())
    }
}

/// The protocol's parameters (defaults: 10, 10, 24 h, 0.8/0.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProtocolConfig {
    pub min_user: usize,
    pub min_poi: usize,
    pub gap_hours: f64,
    pub split: SplitFractions,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig { min_user: 10, min_poi: 10, gap_hours: 24.0, split: SplitFractions::default() }
    }
}

/// Per-split counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PerSplit<T> {
    pub train: T,
    pub val: T,
    pub test: T,
}

impl<T> PerSplit<T> {
    pub fn get_mut(&mut self, s: Split) -> &mut T {
        match s {
            Split::Train => &mut self.train,
            Split::Val => &mut self.val,
            Split::Test => &mut self.test,
        }
    }

    pub fn get(&self, s: Split) -> &T {
        match s {
            Split::Train => &self.train,
            Split::Val => &self.val,
            Split::Test => &self.test,
        }
    }
}

/// Val/test instances dropped in step 4, by reason. A user without a train trajectory is
/// checked first; only instances passing it are checked for an unseen target POI.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Dropped {
    pub user_not_in_train: u64,
    pub poi_not_in_train: u64,
}

/// The time cut-offs of step 3.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cutoffs {
    /// n, the number of check-ins whose times are sorted.
    pub n: usize,
    pub c1_index: usize,
    pub c2_index: usize,
    /// `t[c1_index]` in unix seconds (`i64::MAX` when the index is n: everything is before it).
    pub c1: i64,
    pub c2: i64,
    pub c1_utc: String,
    pub c2_utc: String,
}

/// What each step did; written into `stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProtocolStats {
    /// Rounds of the k-core filter that removed something.
    pub kcore_rounds: usize,
    pub checkins_after_kcore: u64,
    pub users_after_kcore: u64,
    pub pois_after_kcore: u64,
    pub short_trajectories_dropped: u64,
    pub short_trajectory_checkins_dropped: u64,
    /// Final counts (after step 2).
    pub users: u64,
    pub pois: u64,
    /// Distinct non-empty category names among the final POIs.
    pub categories: u64,
    pub checkins: u64,
    pub cutoffs: Cutoffs,
    pub checkins_per_split: PerSplit<u64>,
    pub trajectories: PerSplit<u64>,
    pub instances: PerSplit<u64>,
    pub return_instances: PerSplit<u64>,
    /// Share of instances whose target is in the user's history (0 when there are none).
    pub return_share: PerSplit<f64>,
    pub dropped_instances: BTreeMap<String, Dropped>,
}

/// Step 1. Returns which rows survive and how many rounds removed something.
pub fn kcore(rows: &[RawCheckin], n_users: usize, n_venues: usize, min_user: usize, min_poi: usize) -> (Vec<bool>, usize) {
    let mut keep = vec![true; rows.len()];
    let mut rounds = 0;
    loop {
        let mut uc = vec![0usize; n_users];
        let mut vc = vec![0usize; n_venues];
        for (r, _) in rows.iter().zip(&keep).filter(|(_, k)| **k) {
            uc[r.user as usize] += 1;
            vc[r.venue as usize] += 1;
        }
        let mut changed = false;
        for (r, k) in rows.iter().zip(keep.iter_mut()) {
            if *k && (uc[r.user as usize] < min_user || vc[r.venue as usize] < min_poi) {
                *k = false;
                changed = true;
            }
        }
        if !changed {
            return (keep, rounds);
        }
        rounds += 1;
    }
}

/// One trajectory as row indices into the raw rows, in time order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTrajectory {
    pub user: u32,
    pub rows: Vec<usize>,
}

/// Step 2. Trajectories of kept rows, grouped by raw user (ascending) and in time order within
/// a user; equal timestamps keep input order. Returns the trajectories with at least 2
/// check-ins, and the number of dropped trajectories and their check-ins.
pub fn trajectories(rows: &[RawCheckin], keep: &[bool], n_users: usize, gap_hours: f64) -> (Vec<RawTrajectory>, u64, u64) {
    let mut by_user: Vec<Vec<usize>> = vec![Vec::new(); n_users];
    for (i, r) in rows.iter().enumerate() {
        if keep[i] {
            by_user[r.user as usize].push(i);
        }
    }
    let gap_secs = gap_hours * 3600.0;
    let mut out = Vec::new();
    let (mut dropped, mut dropped_rows) = (0u64, 0u64);
    for (u, mut idx) in by_user.into_iter().enumerate() {
        // Stable: ties keep input order, since indices were pushed in input order.
        idx.sort_by_key(|&i| rows[i].utc);
        let mut cur: Vec<usize> = Vec::new();
        let mut flush = |cur: &mut Vec<usize>| {
            if cur.len() >= 2 {
                out.push(RawTrajectory { user: u as u32, rows: std::mem::take(cur) });
            } else if !cur.is_empty() {
                dropped += 1;
                dropped_rows += cur.len() as u64;
                cur.clear();
            }
        };
        for i in idx {
            if let Some(&prev) = cur.last()
                && (rows[i].utc - rows[prev].utc) as f64 > gap_secs
            {
                flush(&mut cur);
            }
            cur.push(i);
        }
        flush(&mut cur);
    }
    (out, dropped, dropped_rows)
}

/// Step 3's cut-offs from the (unsorted) times of all remaining check-ins.
pub fn cutoffs(mut times: Vec<i64>, split: SplitFractions) -> Cutoffs {
    times.sort_unstable();
    let n = times.len();
    let i1 = split.train.floor_mul(n);
    let i2 = split.train.add(split.val).floor_mul(n);
    let at = |i: usize| times.get(i).copied().unwrap_or(i64::MAX);
    let (c1, c2) = (at(i1), at(i2));
    let iso = |c: i64| {
        if c == i64::MAX { "end".to_string() } else { format_utc(c) }
    };
    Cutoffs { n, c1_index: i1, c2_index: i2, c1, c2, c1_utc: iso(c1), c2_utc: iso(c2) }
}

/// Step 3's rule for one trajectory, from the time of its first check-in.
pub fn split_of(first_utc: i64, c: &Cutoffs) -> Split {
    if first_utc < c.c1 {
        Split::Train
    } else if first_utc < c.c2 {
        Split::Val
    } else {
        Split::Test
    }
}

/// Sort key that orders numeric ids numerically, then everything else as strings.
fn id_order(s: &str) -> (bool, u128, &str) {
    match s.parse::<u128>() {
        Ok(n) => (false, n, s),
        Err(_) => (true, 0, s),
    }
}

/// Runs steps 1–4 (step 5 lives in [`Dataset::history`]) and builds the dataset.
///
/// Dense ids: users and POIs that keep at least one check-in, ordered by source id (numeric
/// ids numerically). A POI's category and coordinates are those of its first valid row.
pub fn run(raw: &RawData, cfg: &ProtocolConfig) -> Result<(Dataset, ProtocolStats)> {
    if !(cfg.gap_hours.is_finite() && cfg.gap_hours >= 0.0) {
        bail!("--gap-hours must be a non-negative number, got {}", cfg.gap_hours);
    }
    let rows = &raw.rows;
    let mut st = ProtocolStats::default();

    // 1. k-core.
    let (keep, rounds) = kcore(rows, raw.users.len(), raw.venues.len(), cfg.min_user, cfg.min_poi);
    st.kcore_rounds = rounds;
    st.checkins_after_kcore = keep.iter().filter(|k| **k).count() as u64;
    if st.checkins_after_kcore == 0 {
        bail!(
            "nothing left after the k-core filter (users >= {} and POIs >= {} check-ins) on {} valid rows; lower --min-user/--min-poi",
            cfg.min_user,
            cfg.min_poi,
            rows.len()
        );
    }
    {
        let mut u = vec![false; raw.users.len()];
        let mut v = vec![false; raw.venues.len()];
        for (r, _) in rows.iter().zip(&keep).filter(|(_, k)| **k) {
            u[r.user as usize] = true;
            v[r.venue as usize] = true;
        }
        st.users_after_kcore = u.iter().filter(|x| **x).count() as u64;
        st.pois_after_kcore = v.iter().filter(|x| **x).count() as u64;
    }

    // 2. Trajectories.
    let (trajs, dropped, dropped_rows) = trajectories(rows, &keep, raw.users.len(), cfg.gap_hours);
    st.short_trajectories_dropped = dropped;
    st.short_trajectory_checkins_dropped = dropped_rows;
    if trajs.is_empty() {
        bail!("nothing left after splitting into trajectories: every trajectory (gap > {} h) has fewer than 2 check-ins", cfg.gap_hours);
    }

    // 3. Split by time.
    let times: Vec<i64> = trajs.iter().flat_map(|t| t.rows.iter().map(|&i| rows[i].utc)).collect();
    st.cutoffs = cutoffs(times, cfg.split);
    let splits: Vec<Split> = trajs.iter().map(|t| split_of(rows[t.rows[0]].utc, &st.cutoffs)).collect();

    // Dense ids.
    let mut user_used = vec![false; raw.users.len()];
    let mut venue_used = vec![false; raw.venues.len()];
    for t in &trajs {
        user_used[t.user as usize] = true;
        for &i in &t.rows {
            venue_used[rows[i].venue as usize] = true;
        }
    }
    let mut user_order: Vec<usize> = (0..raw.users.len()).filter(|&u| user_used[u]).collect();
    user_order.sort_by(|&a, &b| id_order(&raw.users[a]).cmp(&id_order(&raw.users[b])));
    let mut venue_order: Vec<usize> = (0..raw.venues.len()).filter(|&v| venue_used[v]).collect();
    venue_order.sort_by(|&a, &b| id_order(&raw.venues[a].id).cmp(&id_order(&raw.venues[b].id)));
    let mut user_dense = vec![u32::MAX; raw.users.len()];
    for (d, &u) in user_order.iter().enumerate() {
        user_dense[u] = d as u32;
    }
    let mut venue_dense = vec![u32::MAX; raw.venues.len()];
    for (d, &v) in venue_order.iter().enumerate() {
        venue_dense[v] = d as u32;
    }
    let to_checkin =
        |i: usize| Checkin { poi: venue_dense[rows[i].venue as usize], utc: rows[i].utc, tz_offset_min: rows[i].tz_offset_min };

    // Trajectories in dense-user order (raw trajectories of a user are already in time order).
    let mut by_dense_user: Vec<Vec<usize>> = vec![Vec::new(); user_order.len()];
    for (ti, t) in trajs.iter().enumerate() {
        by_dense_user[user_dense[t.user as usize] as usize].push(ti);
    }
    let mut checkins = Vec::with_capacity(st.cutoffs.n);
    let mut trajectories_out = Vec::with_capacity(trajs.len());
    let mut train_visits = vec![0u64; venue_order.len()];
    let mut user_has_train = vec![false; user_order.len()];
    for (u, tis) in by_dense_user.iter().enumerate() {
        for &ti in tis {
            let split = splits[ti];
            let start = checkins.len();
            for &i in &trajs[ti].rows {
                let c = to_checkin(i);
                if split == Split::Train {
                    train_visits[c.poi as usize] += 1;
                }
                checkins.push(c);
            }
            if split == Split::Train {
                user_has_train[u] = true;
            }
            *st.checkins_per_split.get_mut(split) += trajs[ti].rows.len() as u64;
            *st.trajectories.get_mut(split) += 1;
            trajectories_out.push(Trajectory {
                id: trajectories_out.len() as u32,
                user: u as u32,
                split,
                start,
                len: trajs[ti].rows.len(),
            });
        }
    }

    // 4. Instances.
    let mut instances: [Vec<Instance>; 3] = Default::default();
    let mut dropped_val = Dropped::default();
    let mut dropped_test = Dropped::default();
    for t in &trajectories_out {
        let cs = &checkins[t.start..t.start + t.len];
        let make = |j: usize, id: usize| Instance {
            id: id as u32,
            split: t.split,
            user: t.user,
            trajectory: t.id,
            target: cs[j],
            prefix: cs[..j].to_vec(),
            is_return: false, // filled in by Dataset::new from the history
        };
        match t.split {
            Split::Train => {
                let v = &mut instances[Split::Train.index()];
                for j in 1..cs.len() {
                    let id = v.len();
                    v.push(make(j, id));
                }
            }
            Split::Val | Split::Test => {
                let dropped = if t.split == Split::Val { &mut dropped_val } else { &mut dropped_test };
                let j = cs.len() - 1;
                if !user_has_train[t.user as usize] {
                    dropped.user_not_in_train += 1;
                } else if train_visits[cs[j].poi as usize] == 0 {
                    dropped.poi_not_in_train += 1;
                } else {
                    let v = &mut instances[t.split.index()];
                    let id = v.len();
                    v.push(make(j, id));
                }
            }
        }
    }
    st.dropped_instances.insert("val".into(), dropped_val);
    st.dropped_instances.insert("test".into(), dropped_test);

    let pois: Vec<Poi> = venue_order
        .iter()
        .enumerate()
        .map(|(d, &v)| {
            let ven = &raw.venues[v];
            Poi {
                id: d as u32,
                venue_id: ven.id.clone(),
                category: ven.category.clone(),
                lat: ven.lat,
                lon: ven.lon,
                train_visits: train_visits[d],
            }
        })
        .collect();
    let users: Vec<User> = user_order.iter().enumerate().map(|(d, &u)| User { id: d as u32, source_id: raw.users[u].clone() }).collect();

    let ds = Dataset::new(pois, users, checkins, trajectories_out, instances)?;
    st.users = ds.users().len() as u64;
    st.pois = ds.pois().len() as u64;
    st.categories = ds.categories().len() as u64;
    st.checkins = ds.checkins().len() as u64;
    for s in Split::ALL {
        let inst = ds.instances(s);
        let ret = inst.iter().filter(|i| i.is_return).count() as u64;
        *st.instances.get_mut(s) = inst.len() as u64;
        *st.return_instances.get_mut(s) = ret;
        *st.return_share.get_mut(s) = if inst.is_empty() { 0.0 } else { ret as f64 / inst.len() as f64 };
    }
    Ok((ds, st))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::readers::Venue;

    const H: i64 = 3600;

    /// Raw data from (user, venue, utc) triples, all at offset 0; ids are the given strings.
    pub(crate) fn raw(rows: &[(&str, &str, i64)]) -> RawData {
        let mut d = RawData::default();
        for &(u, v, t) in rows {
            let ui = match d.users.iter().position(|x| x == u) {
                Some(i) => i,
                None => {
                    d.users.push(u.to_string());
                    d.users.len() - 1
                }
            };
            let vi = match d.venues.iter().position(|x| x.id == v) {
                Some(i) => i,
                None => {
                    d.venues.push(Venue { id: v.to_string(), category: format!("cat-{v}"), lat: 1.0, lon: 2.0 });
                    d.venues.len() - 1
                }
            };
            d.rows.push(RawCheckin { user: ui as u32, venue: vi as u32, utc: t, tz_offset_min: 0 });
        }
        d
    }

    fn cfg(min_user: usize, min_poi: usize) -> ProtocolConfig {
        ProtocolConfig { min_user, min_poi, ..Default::default() }
    }

    #[test]
    fn kcore_needs_several_rounds_to_reach_its_fixed_point() {
        // min 2/2. Round 1 drops venue "c" (1 check-in). That leaves user "y" with a single
        // check-in, dropped in round 2, which leaves venue "b" with 1, dropped in round 3,
        // which leaves user "z" with 1 (round 4). "x" keeps a,a.
        let d =
            raw(&[("x", "a", 1), ("x", "a", 2), ("y", "b", 3), ("y", "c", 4), ("z", "b", 5), ("z", "d", 6), ("w", "d", 7), ("w", "d", 8)]);
        let (keep, rounds) = kcore(&d.rows, d.users.len(), d.venues.len(), 2, 2);
        assert_eq!(keep, vec![true, true, false, false, false, false, true, true]);
        assert_eq!(rounds, 4);
        // Removing in one pass only (no fixed point) would have kept y/b and z.
        let (keep1, _) = kcore(&d.rows, d.users.len(), d.venues.len(), 1, 1);
        assert!(keep1.iter().all(|k| *k));
    }

    #[test]
    fn trajectories_split_on_gaps_longer_than_24h_exactly_24h_continues() {
        let d = raw(&[
            ("u", "a", 0),
            ("u", "b", 24 * H),     // exactly 24 h: same trajectory
            ("u", "c", 48 * H + 1), // 24 h + 1 s: new trajectory
            ("u", "d", 49 * H),
            ("u", "e", 100 * H), // alone: dropped
        ]);
        let keep = vec![true; d.rows.len()];
        let (t, dropped, dropped_rows) = trajectories(&d.rows, &keep, 1, 24.0);
        assert_eq!(t, vec![RawTrajectory { user: 0, rows: vec![0, 1] }, RawTrajectory { user: 0, rows: vec![2, 3] },]);
        assert_eq!((dropped, dropped_rows), (1, 1));
    }

    #[test]
    fn trajectories_sort_by_time_and_keep_input_order_on_ties() {
        let d = raw(&[("u", "late", 50), ("u", "tie2", 10), ("u", "first", 5), ("u", "tie3", 10)]);
        let keep = vec![true; 4];
        let (t, _, _) = trajectories(&d.rows, &keep, 1, 24.0);
        assert_eq!(t[0].rows, vec![2, 1, 3, 0]);
    }

    #[test]
    fn split_cutoffs_use_floor_indices() {
        // n = 10: c1 = t[8], c2 = t[9].
        let times: Vec<i64> = (0..10).rev().map(|i| i * 100).collect();
        let c = cutoffs(times, SplitFractions::default());
        assert_eq!((c.c1_index, c.c2_index, c.c1, c.c2), (8, 9, 800, 900));
        // n = 7: floor(5.6) = 5, floor(6.3) = 6.
        let c = cutoffs((0..7).collect(), SplitFractions::default());
        assert_eq!((c.c1_index, c.c2_index), (5, 6));
        // n = 113344 (NYC): floor(90675.2), floor(102009.6).
        let c = cutoffs((0..113_344).collect(), SplitFractions::default());
        assert_eq!((c.c1_index, c.c2_index), (90_675, 102_009));
        // Exact decimals: floor(0.29 * 100) = 29 (floating point would give 28).
        let f: SplitFractions = "0.29,0.01".parse().unwrap();
        let c = cutoffs((0..100).collect(), f);
        assert_eq!((c.c1_index, c.c2_index), (29, 30));
        // A trajectory starting exactly at c1 is val; exactly at c2 test.
        let c = cutoffs((0..10).collect(), SplitFractions::default());
        assert_eq!(split_of(7, &c), Split::Train);
        assert_eq!(split_of(8, &c), Split::Val);
        assert_eq!(split_of(9, &c), Split::Test);
        // Index n (train fraction 1) means no val/test.
        let c = cutoffs((0..10).collect(), "1,0".parse().unwrap());
        assert_eq!(split_of(9, &c), Split::Train);
    }

    #[test]
    fn split_fraction_parsing() {
        assert!("0.8,0.1".parse::<SplitFractions>().is_ok());
        assert!("0.8,0.3".parse::<SplitFractions>().is_err());
        assert!("0,0.1".parse::<SplitFractions>().is_err());
        assert!("0.8".parse::<SplitFractions>().is_err());
        assert!("-0.1,0.1".parse::<SplitFractions>().is_err());
        assert!("x,0.1".parse::<SplitFractions>().is_err());
        assert!("1.5,0".parse::<SplitFractions>().is_err());
        assert_eq!(".5".parse::<Fraction>().unwrap(), Fraction { num: 5, den: 10 });
    }

    /// A small end-to-end case. Times in hours; n = 20 check-ins after step 2; with the split
    /// 0.5,0.2, c1 = t[10] = 300 h and c2 = t[14] = 400 h.
    fn toy() -> RawData {
        let h = |x: i64| x * H;
        raw(&[
            // user 1: two train trajectories, then a test one at the end.
            ("1", "a", h(0)),
            ("1", "b", h(1)),
            ("1", "c", h(2)),
            ("1", "a", h(100)),
            ("1", "b", h(101)),
            ("1", "b", h(400)), // test trajectory: prefix b, target a (a is in history: return)
            ("1", "a", h(401)),
            // user 2: a train trajectory, a val trajectory whose target d is unseen in train.
            ("2", "c", h(10)),
            ("2", "b", h(11)),
            ("2", "c", h(12)),
            ("2", "b", h(300)),
            ("2", "d", h(301)),
            // user 3: only val/test trajectories -> dropped (no train trajectory).
            ("3", "a", h(310)),
            ("3", "b", h(311)),
            ("3", "a", h(500)),
            ("3", "c", h(501)),
            // user 2 again: a test trajectory whose target c was visited (return)
            ("2", "b", h(450)),
            ("2", "c", h(451)),
            // user 1: a lone check-in, dropped in step 2
            ("1", "z", h(700)),
            // user 4: train trajectory with a discovery target
            ("4", "e", h(20)),
            ("4", "a", h(21)),
        ])
    }

    #[test]
    fn end_to_end_toy() {
        let c = ProtocolConfig { split: "0.5,0.2".parse().unwrap(), ..cfg(1, 1) };
        let (ds, st) = run(&toy(), &c).unwrap();
        assert_eq!(st.short_trajectories_dropped, 1);
        assert_eq!(st.cutoffs.n, 20);
        assert_eq!((st.cutoffs.c1, st.cutoffs.c2), (300 * H, 400 * H));
        assert_eq!(st.users, 4);
        assert_eq!(st.pois, 5); // a b c d e (z dropped with its lone check-in)
        assert_eq!(ds.pois().iter().map(|p| p.venue_id.as_str()).collect::<Vec<_>>(), ["a", "b", "c", "d", "e"]);
        // train trajectories: u1 [a b c], u1 [a b], u2 [c b c], u4 [e a]
        assert_eq!(st.trajectories, PerSplit { train: 4, val: 2, test: 3 });
        assert_eq!(ds.pois().iter().map(|p| p.train_visits).collect::<Vec<_>>(), [3, 3, 3, 0, 1]);
        assert_eq!(st.instances.train, 2 + 1 + 2 + 1);
        // val: u2 [b d] -> d unseen in train; u3 [a b] -> no train trajectory.
        assert_eq!(st.dropped_instances["val"], Dropped { user_not_in_train: 1, poi_not_in_train: 1 });
        assert_eq!(st.instances.val, 0);
        // test: u1 [b a] kept, u2 [b c] kept, u3 [a c] dropped (user).
        assert_eq!(st.dropped_instances["test"], Dropped { user_not_in_train: 1, poi_not_in_train: 0 });
        let test = ds.instances(Split::Test);
        assert_eq!(test.len(), 2);
        assert_eq!(ds.users()[test[0].user as usize].source_id, "1");
        assert_eq!(test[0].target, Checkin { poi: 0, utc: 401 * H, tz_offset_min: 0 });
        assert_eq!(test[0].prefix, vec![Checkin { poi: 1, utc: 400 * H, tz_offset_min: 0 }]);
        assert!(test[0].is_return);
        assert!(test[1].is_return);
        // u4's train instance: target a, history [e] -> discovery.
        let train = ds.instances(Split::Train);
        let u4 = train.iter().find(|i| ds.users()[i.user as usize].source_id == "4").unwrap();
        assert!(!u4.is_return);
        // History of u1's test instance: everything of u1 before 401 h (6 check-ins).
        assert_eq!(ds.history(&test[0]).len(), 6);
        assert_eq!(st.return_share.test, 1.0);
    }

    #[test]
    fn history_is_strictly_before_the_target_time() {
        // The prefix check-in shares the target's timestamp: it is in the prefix but not in
        // the history, so visiting the same POI at the same second is not a "return".
        let d = raw(&[("u", "a", 0), ("u", "b", 10), ("u", "c", 100), ("u", "c", 100)]);
        let (ds, _) = run(&d, &ProtocolConfig { split: "1,0".parse().unwrap(), ..cfg(1, 1) }).unwrap();
        let train = ds.instances(Split::Train);
        assert_eq!(train.len(), 3);
        let last = &train[2];
        assert_eq!(last.prefix.len(), 3);
        assert_eq!(ds.history(last).iter().map(|c| c.utc).collect::<Vec<_>>(), [0, 10]);
        assert!(!last.is_return);
        assert!(ds.history(&train[0]).iter().all(|c| c.utc < 10));
    }

    #[test]
    fn nothing_left_is_an_error() {
        let e = run(&toy(), &cfg(100, 1)).unwrap_err().to_string();
        assert!(e.contains("nothing left after the k-core filter"), "{e}");
        let lone = raw(&[("u", "a", 0), ("u", "b", 100 * H)]);
        let e = run(&lone, &cfg(1, 1)).unwrap_err().to_string();
        assert!(e.contains("fewer than 2 check-ins"), "{e}");
    }

    #[test]
    fn user_and_poi_ids_are_dense_and_sorted_numerically() {
        let d = raw(&[("10", "v2", 0), ("10", "v10", 1), ("9", "v10", 2), ("9", "v2", 3)]);
        let (ds, _) = run(&d, &cfg(1, 1)).unwrap();
        assert_eq!(ds.users().iter().map(|u| u.source_id.as_str()).collect::<Vec<_>>(), ["9", "10"]);
        assert_eq!(ds.pois().iter().map(|p| p.venue_id.as_str()).collect::<Vec<_>>(), ["v10", "v2"]);
        assert_eq!(ds.pois()[0].category, "cat-v10");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn rows_strategy() -> impl Strategy<Value = Vec<(u8, u8, i64)>> {
            prop::collection::vec((0u8..6, 0u8..8, 0i64..400), 0..80)
        }

        fn to_raw(rows: &[(u8, u8, i64)]) -> RawData {
            let owned: Vec<(String, String, i64)> = rows.iter().map(|&(u, v, t)| (u.to_string(), format!("v{v}"), t * H / 4)).collect();
            let refs: Vec<(&str, &str, i64)> = owned.iter().map(|(u, v, t)| (u.as_str(), v.as_str(), *t)).collect();
            raw(&refs)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]

            /// The k-core result equals removing one offending user or POI at a time.
            #[test]
            fn kcore_is_the_unique_fixed_point(rows in rows_strategy(), mu in 1usize..4, mp in 1usize..4) {
                let d = to_raw(&rows);
                let (keep, _) = kcore(&d.rows, d.users.len(), d.venues.len(), mu, mp);
                let mut alive = vec![true; d.rows.len()];
                loop {
                    let mut uc = vec![0; d.users.len()];
                    let mut vc = vec![0; d.venues.len()];
                    for (r, _) in d.rows.iter().zip(&alive).filter(|x| *x.1) {
                        uc[r.user as usize] += 1;
                        vc[r.venue as usize] += 1;
                    }
                    let bad = d.rows.iter().zip(&alive).position(|(r, a)| {
                        *a && (uc[r.user as usize] < mu || vc[r.venue as usize] < mp)
                    });
                    let Some(i) = bad else { break };
                    let r = d.rows[i];
                    if uc[r.user as usize] < mu {
                        for (x, a) in d.rows.iter().zip(alive.iter_mut()) {
                            if x.user == r.user { *a = false; }
                        }
                    } else {
                        for (x, a) in d.rows.iter().zip(alive.iter_mut()) {
                            if x.venue == r.venue { *a = false; }
                        }
                    }
                }
                prop_assert_eq!(keep, alive);
            }

            /// Whatever the input: no panic, and the built dataset satisfies the protocol's
            /// invariants and survives a save/load round trip unchanged.
            #[test]
            fn protocol_invariants_and_round_trip(rows in rows_strategy(), mu in 1usize..3, mp in 1usize..3) {
                let d = to_raw(&rows);
                let cfg = ProtocolConfig { min_user: mu, min_poi: mp, split: "0.5,0.25".parse().unwrap(), ..Default::default() };
                let Ok((ds, st)) = run(&d, &cfg) else { return Ok(()) };
                let train_traj: Vec<&Trajectory> = ds.trajectories().iter().filter(|t| t.split == Split::Train).collect();
                prop_assert_eq!(st.instances.train as usize, train_traj.iter().map(|t| t.len - 1).sum::<usize>());
                for s in [Split::Val, Split::Test] {
                    let dr = st.dropped_instances[s.as_str()];
                    prop_assert_eq!(st.instances.get(s) + dr.user_not_in_train + dr.poi_not_in_train, *st.trajectories.get(s));
                }
                for s in Split::ALL {
                    for inst in ds.instances(s) {
                        let t = ds.trajectories()[inst.trajectory as usize];
                        let cs = ds.trajectory_checkins(&t);
                        let j = inst.prefix.len();
                        prop_assert_eq!(&cs[..j], &inst.prefix[..]);
                        prop_assert_eq!(cs[j], inst.target);
                        if s != Split::Train {
                            prop_assert_eq!(j + 1, cs.len());
                            prop_assert!(ds.pois()[inst.target.poi as usize].train_visits > 0);
                        }
                        let h = ds.history(inst);
                        let all = ds.user_checkins(inst.user);
                        prop_assert!(h.iter().all(|c| c.utc < inst.target.utc));
                        prop_assert!(all[h.len()..].iter().all(|c| c.utc >= inst.target.utc));
                        prop_assert_eq!(inst.is_return, h.iter().any(|c| c.poi == inst.target.poi));
                    }
                }
                for t in ds.trajectories() {
                    let cs = ds.trajectory_checkins(t);
                    prop_assert!(cs.windows(2).all(|w| w[1].utc - w[0].utc <= 24 * H));
                    let first = cs[0].utc;
                    prop_assert_eq!(t.split, split_of(first, &st.cutoffs));
                }
                let dir = tempfile::tempdir().unwrap();
                ds.save(dir.path(), &serde_json::json!({})).unwrap();
                let back = Dataset::load(dir.path()).unwrap();
                prop_assert_eq!(back.pois(), ds.pois());
                prop_assert_eq!(back.users(), ds.users());
                prop_assert_eq!(back.checkins(), ds.checkins());
                prop_assert_eq!(back.trajectories(), ds.trajectories());
                for s in Split::ALL {
                    prop_assert_eq!(back.instances(s), ds.instances(s));
                }
            }
        }
    }
}
