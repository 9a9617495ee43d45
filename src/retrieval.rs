//! Candidate retrieval: POIs beyond the user's own history, found in the train check-ins of all
//! users. A model that answers from its prompt can only name a POI the prompt shows, and a
//! discovery target (a POI the user never visited) is in none of the user's own lists; these
//! sources put some of them there (`[prompt.candidates]`), and they are the candidate set of the
//! learned ranker ([`crate::ranker`]).
//!
//! Three sources, each read from the current POI (the last check-in before the target):
//! - **transitions**: the POIs that followed the current POI in train trajectories, most often
//!   first (the `markov` baseline's counts);
//! - **nearby**: the POIs within a radius of the current POI, by their train check-ins around
//!   the target's time of day (the around-the-hour window of [`crate::visits`]);
//! - **similar users**: the POIs visited by the users whose train visits look most like the
//!   user's history (cosine of visit-count vectors), weighted by that similarity.
//!
//! **Leave-one-out.** The statistics count every train check-in, and a train instance's own
//! target is one of them: left in, the target would always look like a followed-and-popular POI,
//! and whatever learns from train instances would learn that (a ranker fit that way scored far
//! below one fit without it on NYC val). So a query by a dataset user leaves out that user's
//! train check-ins at or after the target's time: the target itself, everything the user did
//! later, and the transitions into them. For a val or test instance nothing is left out (their
//! users' train check-ins all come before), so train and test see the statistics the same way.

use std::collections::HashMap;

use chrono::{NaiveDateTime, Timelike};
use serde::{Deserialize, Serialize};

use crate::data::{Checkin, Dataset, Poi, Split, haversine_km};
use crate::visits::clock_distance_min;

const MINUTES_PER_DAY: u16 = 24 * 60;

/// How many candidates each source adds (`[prompt.candidates]` for prompts, `[ranker]` for the
/// ranker). Every size defaults to 0: no candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CandidateConfig {
    /// POIs that followed the current POI in train trajectories, most often first.
    pub transitions: usize,
    /// POIs within `radius_km` of the current POI, by train check-ins within `hour_window_min`
    /// of the target's time of day.
    pub nearby: usize,
    pub radius_km: f64,
    pub hour_window_min: u32,
    /// POIs visited by the `similar_users` users most like the user.
    pub similar: usize,
    pub similar_users: usize,
}

impl Default for CandidateConfig {
    fn default() -> Self {
        CandidateConfig { transitions: 0, nearby: 0, radius_km: 2.0, hour_window_min: 60, similar: 0, similar_users: 20 }
    }
}

impl CandidateConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.radius_km.is_finite() && self.radius_km > 0.0, "candidates.radius_km must be a positive number of km");
        anyhow::ensure!(self.hour_window_min <= 12 * 60, "candidates.hour_window_min is at most 720 (12 hours either way)");
        anyhow::ensure!(self.similar == 0 || self.similar_users > 0, "candidates.similar needs similar_users > 0");
        Ok(())
    }

    pub fn any(&self) -> bool {
        self.transitions + self.nearby + self.similar > 0
    }
}

/// The sources, in the order they are shown and de-duplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Transitions,
    Nearby,
    SimilarUsers,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Transitions, Source::Nearby, Source::SimilarUsers];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Transitions => "transitions",
            Source::Nearby => "nearby",
            Source::SimilarUsers => "similar_users",
        }
    }
}

/// One retrieved POI with the evidence its source found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub poi: u32,
    pub source: Source,
    /// The source's count: transitions from the current POI, check-ins around the hour nearby,
    /// or the similarity-weighted visits of similar users.
    pub evidence: f64,
    /// Distance from the current POI.
    pub distance_km: f64,
}

/// A train check-in with the POI before it in its trajectory (none for a trajectory's first).
#[derive(Debug, Clone, Copy)]
struct TrainCheckin {
    poi: u32,
    utc: i64,
    local: NaiveDateTime,
    prev: Option<u32>,
}

/// Counts over the train trajectories of a dataset, built once and queried per instance.
#[derive(Debug)]
pub struct TrainStats {
    /// Per POI: the local minute of day of each train check-in, sorted.
    minutes: Vec<Vec<u16>>,
    /// Per POI: (next POI, count) over consecutive train check-ins, most frequent first, then by id.
    transitions: Vec<Vec<(u32, u32)>>,
    /// Per user: train visit counts (POI, count), by POI.
    user_visits: Vec<Vec<(u32, u32)>>,
    user_norm: Vec<f64>,
    /// Per POI: (user, train visits).
    poi_users: Vec<Vec<(u32, u32)>>,
    /// Per user: train check-ins in time order, for leaving out a user's later ones.
    user_train: Vec<Vec<TrainCheckin>>,
}

fn minute_of_day(t: NaiveDateTime) -> u16 {
    (t.hour() * 60 + t.minute()) as u16
}

impl TrainStats {
    pub fn new(ds: &Dataset) -> TrainStats {
        let (n_pois, n_users) = (ds.num_pois(), ds.users().len());
        let mut minutes = vec![Vec::new(); n_pois];
        let mut pairs: HashMap<(u32, u32), u32> = HashMap::new();
        let mut user_train: Vec<Vec<TrainCheckin>> = vec![Vec::new(); n_users];
        for t in ds.trajectories().iter().filter(|t| t.split == Split::Train) {
            let mut prev = None;
            for c in ds.trajectory_checkins(t) {
                let local = c.local_time();
                minutes[c.poi as usize].push(minute_of_day(local));
                if let Some(p) = prev {
                    *pairs.entry((p, c.poi)).or_default() += 1;
                }
                user_train[t.user as usize].push(TrainCheckin { poi: c.poi, utc: c.utc, local, prev });
                prev = Some(c.poi);
            }
        }
        for m in &mut minutes {
            m.sort_unstable();
        }
        let mut transitions = vec![Vec::new(); n_pois];
        for ((from, to), n) in pairs {
            transitions[from as usize].push((to, n));
        }
        for row in &mut transitions {
            row.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        let mut poi_users = vec![Vec::new(); n_pois];
        let mut user_visits = Vec::with_capacity(n_users);
        for (u, checkins) in user_train.iter_mut().enumerate() {
            // Trajectories come by user then time, so each user's list is already in time order;
            // the sort only guards that invariant.
            checkins.sort_by_key(|c| c.utc);
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for c in checkins.iter() {
                *counts.entry(c.poi).or_default() += 1;
            }
            let mut counts: Vec<(u32, u32)> = counts.into_iter().collect();
            counts.sort_unstable();
            for &(p, n) in &counts {
                poi_users[p as usize].push((u as u32, n));
            }
            user_visits.push(counts);
        }
        let user_norm = user_visits.iter().map(|v| v.iter().map(|&(_, n)| f64::from(n).powi(2)).sum::<f64>().sqrt()).collect();
        TrainStats { minutes, transitions, user_visits, user_norm, poi_users, user_train }
    }

    /// The statistics as `q` may see them: without the querying user's train check-ins at or
    /// after the target's time.
    pub fn view<'s>(&'s self, q: &Query) -> View<'s> {
        let left_out = match q.user.and_then(|u| self.user_train.get(u as usize)) {
            Some(list) => &list[list.partition_point(|c| c.utc < q.target_utc)..],
            None => &[],
        };
        View { stats: self, left_out, user: q.user }
    }
}

/// What a candidate query knows: the user, the check-ins before the target, and when it is.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The dataset user, whose own train check-ins at or after the target are left out; `None`
    /// for a history from outside the dataset (`recommend --history`).
    pub user: Option<u32>,
    /// Every check-in of the user before the target, oldest first (never empty); the last one is
    /// the current POI.
    pub history: &'a [Checkin],
    pub target_utc: i64,
    pub target_local: NaiveDateTime,
}

impl<'a> Query<'a> {
    /// The query of a dataset instance: its history ([`Dataset::history`]) and target time.
    pub fn from_instance(ds: &'a Dataset, inst: &'a crate::data::Instance) -> Query<'a> {
        Query { user: Some(inst.user), history: ds.history(inst), target_utc: inst.target.utc, target_local: inst.target.local_time() }
    }

    pub fn current(&self) -> Option<u32> {
        self.history.last().map(|c| c.poi)
    }
}

/// [`TrainStats`] with one query's own check-ins left out.
pub struct View<'s> {
    stats: &'s TrainStats,
    left_out: &'s [TrainCheckin],
    user: Option<u32>,
}

impl View<'_> {
    /// Train check-ins at `poi`.
    pub fn popularity(&self, poi: u32) -> u32 {
        let all = self.stats.minutes.get(poi as usize).map_or(0, Vec::len) as u32;
        all.saturating_sub(self.left_out.iter().filter(|c| c.poi == poi).count() as u32)
    }

    /// Train check-ins at `poi` whose local time of day is within `window_min` of `at`'s.
    pub fn popularity_around(&self, poi: u32, at: NaiveDateTime, window_min: u32) -> u32 {
        let Some(minutes) = self.stats.minutes.get(poi as usize) else { return 0 };
        let (m, w) = (i32::from(minute_of_day(at)), window_min.min(720) as i32);
        let day = i32::from(MINUTES_PER_DAY);
        let count =
            |lo: i32, hi: i32| (minutes.partition_point(|&m| i32::from(m) <= hi) - minutes.partition_point(|&m| i32::from(m) < lo)) as u32;
        let all = if 2 * w + 1 >= day {
            minutes.len() as u32
        } else if m - w < 0 {
            count(0, m + w) + count(m - w + day, day - 1)
        } else if m + w >= day {
            count(m - w, day - 1) + count(0, m + w - day)
        } else {
            count(m - w, m + w)
        };
        let gone = self.left_out.iter().filter(|c| c.poi == poi && clock_distance_min(c.local, at) <= window_min).count() as u32;
        all.saturating_sub(gone)
    }

    /// (next POI, count) of train transitions out of `from`, most frequent first, then by id.
    pub fn transitions_from(&self, from: u32) -> Vec<(u32, u32)> {
        let mut row = self.stats.transitions.get(from as usize).cloned().unwrap_or_default();
        let gone: Vec<u32> = self.left_out.iter().filter(|c| c.prev == Some(from)).map(|c| c.poi).collect();
        if gone.is_empty() {
            return row;
        }
        for (to, n) in &mut row {
            *n = n.saturating_sub(gone.iter().filter(|&&g| g == *to).count() as u32);
        }
        row.retain(|&(_, n)| n > 0);
        row.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        row
    }

    /// POIs by the similarity-weighted train visits of the `users` users most like `history`
    /// (cosine of visit counts; the querying user is never among them), best first.
    pub fn similar_users_pois(&self, history: &[Checkin], users: usize) -> Vec<(u32, f64)> {
        let mut mine: HashMap<u32, f64> = HashMap::new();
        for c in history {
            *mine.entry(c.poi).or_default() += 1.0;
        }
        let norm = mine.values().map(|n| n * n).sum::<f64>().sqrt();
        let mut dot: HashMap<u32, f64> = HashMap::new();
        for (&p, &n) in &mine {
            for &(v, m) in self.stats.poi_users.get(p as usize).map_or(&[][..], Vec::as_slice) {
                if Some(v) != self.user {
                    *dot.entry(v).or_default() += n * f64::from(m);
                }
            }
        }
        let mut sims: Vec<(u32, f64)> = dot.into_iter().map(|(v, d)| (v, d / (norm * self.stats.user_norm[v as usize]))).collect();
        sims.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        sims.truncate(users);
        let mut scores: HashMap<u32, f64> = HashMap::new();
        for (v, sim) in sims {
            for &(p, m) in &self.stats.user_visits[v as usize] {
                *scores.entry(p).or_default() += sim * f64::from(m);
            }
        }
        let mut scores: Vec<(u32, f64)> = scores.into_iter().collect();
        scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scores
    }

    /// POIs within `radius_km` of `from` with train check-ins around `at`, most first (then
    /// nearest, then by id), as (POI, check-ins around the hour, distance).
    pub fn nearby(&self, pois: &[Poi], from: u32, at: NaiveDateTime, cfg: &CandidateConfig) -> Vec<(u32, u32, f64)> {
        let Some(origin) = pois.get(from as usize) else { return Vec::new() };
        // A box a little larger than the circle skips most POIs before the haversine.
        let dlat = cfg.radius_km / 110.0;
        let dlon = dlat / origin.lat.to_radians().cos().abs().max(0.01);
        let mut found: Vec<(u32, u32, f64)> = pois
            .iter()
            .filter(|p| (p.lat - origin.lat).abs() <= dlat && (p.lon - origin.lon).abs() <= dlon)
            .filter_map(|p| {
                let d = haversine_km(origin.lat, origin.lon, p.lat, p.lon);
                let n = if d <= cfg.radius_km { self.popularity_around(p.id, at, cfg.hour_window_min) } else { 0 };
                (n > 0).then_some((p.id, n, d))
            })
            .collect();
        found.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.total_cmp(&b.2)).then(a.0.cmp(&b.0)));
        found
    }

    /// Each source's full list for `q`, best first; a source whose size in `cfg` is 0 is not
    /// searched (its list stays empty).
    pub fn find(&self, pois: &[Poi], q: &Query, cfg: &CandidateConfig) -> Found {
        let Some(current) = q.current() else { return Found::default() };
        Found {
            transitions: if cfg.transitions > 0 { self.transitions_from(current) } else { Vec::new() },
            nearby: if cfg.nearby > 0 { self.nearby(pois, current, q.target_local, cfg) } else { Vec::new() },
            similar: if cfg.similar > 0 { self.similar_users_pois(q.history, cfg.similar_users) } else { Vec::new() },
        }
    }

    /// Each source's best POIs for `q`, sizes from `cfg`: a POI is listed once, by the first
    /// source that finds it, and never when `skip` says the prompt already shows it.
    pub fn candidates(&self, pois: &[Poi], q: &Query, cfg: &CandidateConfig, skip: impl Fn(u32) -> bool) -> Vec<Candidate> {
        pick(pois, q, cfg, &self.find(pois, q, cfg), skip)
    }
}

/// What the sources found for one query, each list best first (see [`View::find`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Found {
    /// (next POI, transitions from the current POI).
    pub transitions: Vec<(u32, u32)>,
    /// (POI, check-ins around the hour, distance in km).
    pub nearby: Vec<(u32, u32, f64)>,
    /// (POI, similarity-weighted visits).
    pub similar: Vec<(u32, f64)>,
}

/// The first `cfg`-sized share of each of `found`'s lists, in [`Source::ALL`] order, each POI
/// once and none that `skip` names.
pub fn pick(pois: &[Poi], q: &Query, cfg: &CandidateConfig, found: &Found, skip: impl Fn(u32) -> bool) -> Vec<Candidate> {
    let Some(current) = q.current() else { return Vec::new() };
    let distance = |p: u32| match (pois.get(current as usize), pois.get(p as usize)) {
        (Some(a), Some(b)) => haversine_km(a.lat, a.lon, b.lat, b.lon),
        _ => f64::NAN,
    };
    let mut out: Vec<Candidate> = Vec::new();
    let mut take = |source: Source, size: usize, list: &mut dyn Iterator<Item = (u32, f64)>| {
        let start = out.len();
        for (poi, evidence) in list {
            if out.len() - start == size {
                break;
            }
            if !skip(poi) && !out.iter().any(|c| c.poi == poi) {
                out.push(Candidate { poi, source, evidence, distance_km: distance(poi) });
            }
        }
    };
    take(Source::Transitions, cfg.transitions, &mut found.transitions.iter().map(|&(p, n)| (p, f64::from(n))));
    take(Source::Nearby, cfg.nearby, &mut found.nearby.iter().map(|&(p, n, _)| (p, f64::from(n))));
    take(Source::SimilarUsers, cfg.similar, &mut found.similar.iter().copied());
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::Instance;
    use crate::data::protocol::{ProtocolConfig, run, tests::raw};
    use crate::seed::splitmix64;

    const H: i64 = 3600;

    /// The baselines' toy: train u1 a→b→a (0–2 h), u2 a→b (0–1 h), u2 c→b (100–101 h); test
    /// u1 [a, a] at 200 h and u2 [b, c] at 300 h. Ids: a 0, b 1, c 2.
    fn toy() -> Dataset {
        crate::baselines::tests::ds()
    }

    fn train_instance(ds: &Dataset, user: u32, target_utc: i64) -> &Instance {
        ds.instances(Split::Train).iter().find(|i| i.user == user && i.target.utc == target_utc).unwrap()
    }

    #[test]
    fn counts_by_hand_and_leaves_out_the_users_own_future() {
        let ds = toy();
        let stats = TrainStats::new(&ds);
        // u1's train instance with target b at 1 h: u1's b@1h and a@2h (and the transitions a→b,
        // b→a into them) are left out; u2's are not.
        let inst = train_instance(&ds, 0, H);
        let view = stats.view(&Query::from_instance(&ds, inst));
        assert_eq!(view.transitions_from(0), vec![(1, 1)]);
        assert_eq!(view.transitions_from(1), vec![]);
        assert_eq!((view.popularity(0), view.popularity(1), view.popularity(2)), (2, 2, 1));
        // A test instance of u1 (at 201 h) sees every train check-in.
        let test = &ds.instances(Split::Test)[0];
        let view = stats.view(&Query::from_instance(&ds, test));
        assert_eq!(view.transitions_from(0), vec![(1, 2)]);
        assert_eq!(view.transitions_from(1), vec![(0, 1)]);
        assert_eq!((view.popularity(0), view.popularity(1), view.popularity(2)), (3, 3, 1));
        // b's train check-ins are at 01:00, 01:00 and 05:00 (UTC = local here).
        let at = |h: i64, m: i64| crate::data::Checkin { poi: 0, utc: 10 * 24 * H + h * H + m * 60, tz_offset_min: 0 }.local_time();
        assert_eq!(view.popularity_around(1, at(0, 30), 30), 2);
        assert_eq!(view.popularity_around(1, at(0, 30), 29), 0);
        assert_eq!(view.popularity_around(1, at(23, 30), 90), 2, "the window wraps around midnight");
        assert_eq!(view.popularity_around(1, at(4, 0), 60), 1);
        assert_eq!(view.popularity_around(1, at(13, 0), 720), 3);
        // The same window for u1's train instance at 1 h drops its own b@01:00.
        let view = stats.view(&Query::from_instance(&ds, inst));
        assert_eq!(view.popularity_around(1, at(0, 30), 30), 1);
    }

    #[test]
    fn candidates_follow_the_sources_without_repeats_or_shown_pois() {
        let ds = toy();
        let stats = TrainStats::new(&ds);
        // u2's test instance: current POI b (at 300 h); from b, train transitions go to a (u1).
        let test = &ds.instances(Split::Test)[1];
        let q = Query::from_instance(&ds, test);
        let view = stats.view(&q);
        let cfg = CandidateConfig { transitions: 5, nearby: 5, similar: 5, radius_km: 1.0, hour_window_min: 720, similar_users: 5 };
        let found = view.candidates(ds.pois(), &q, &cfg, |_| false);
        let listed: Vec<(u32, Source)> = found.iter().map(|c| (c.poi, c.source)).collect();
        // Transitions first (a); every POI of the toy is at the same place, so nearby adds the
        // others by popularity (a and b 3, c 1: b, then c); similar users (u1 only) add nothing new.
        assert_eq!(listed, vec![(0, Source::Transitions), (1, Source::Nearby), (2, Source::Nearby)]);
        assert_eq!(found[0].evidence, 1.0);
        // POIs the prompt already shows are skipped, and each list keeps its size.
        let found = view.candidates(ds.pois(), &q, &CandidateConfig { transitions: 1, nearby: 1, ..cfg.clone() }, |p| p == 1);
        assert_eq!(found.iter().map(|c| (c.poi, c.source)).collect::<Vec<_>>(), vec![(0, Source::Transitions), (2, Source::Nearby)]);
        // u1 is u2's only other user; u1 visited a and b in train.
        let similar = view.similar_users_pois(q.history, 5);
        assert_eq!(similar.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 1]);
    }

    /// A bigger random dataset: 6 users, 12 POIs spread over a few km, 8 trajectories each.
    pub(crate) fn random_dataset(seed: u64) -> Dataset {
        let mut rows = Vec::new();
        let names: Vec<String> = (0..12).map(|i| format!("p{i}")).collect();
        let users: Vec<String> = (0..6).map(|u| format!("u{u}")).collect();
        let mut x = seed;
        for (u, user) in users.iter().enumerate() {
            for day in 0..8i64 {
                for step in 0..4i64 {
                    x = splitmix64(x);
                    // Each user prefers a few POIs: a skewed draw.
                    let poi = ((x % 12) * (x % 3) / 2 + u as u64) % 12;
                    // Two days apart: each day is a trajectory of its own.
                    let utc = day * 48 * H + (8 + 3 * step + u as i64 % 2) * H;
                    rows.push((user.as_str(), names[poi as usize].as_str(), utc));
                }
            }
        }
        let cfg = ProtocolConfig { min_user: 1, min_poi: 1, split: "0.6,0.2".parse().unwrap(), ..Default::default() };
        let ds = run(&raw(&rows), &cfg).unwrap().0;
        // Spread the POIs over about 3 km.
        let pois = ds
            .pois()
            .iter()
            .map(|p| crate::data::Poi { lat: 40.70 + 0.003 * f64::from(p.id), lon: -74.0 + 0.002 * f64::from(p.id % 4), ..p.clone() })
            .collect();
        rebuild(&ds, pois, |_, c| *c)
    }

    /// `ds` with new POIs and each check-in mapped by `f(user, check-in)`, train visits recounted.
    pub(crate) fn rebuild(ds: &Dataset, mut pois: Vec<crate::data::Poi>, f: impl Fn(u32, &Checkin) -> Checkin) -> Dataset {
        // Check-ins are grouped by user, in user order.
        let checkins: Vec<Checkin> =
            (0..ds.users().len() as u32).flat_map(|u| ds.user_checkins(u).iter().map(move |c| (u, c))).map(|(u, c)| f(u, c)).collect();
        for p in &mut pois {
            p.train_visits = 0;
        }
        for t in ds.trajectories().iter().filter(|t| t.split == Split::Train) {
            for c in &checkins[t.start..t.start + t.len] {
                pois[c.poi as usize].train_visits += 1;
            }
        }
        let instances = Split::ALL.map(|s| {
            let map = |i: &Instance| Instance {
                target: f(i.user, &i.target),
                prefix: i.prefix.iter().map(|c| f(i.user, c)).collect(),
                ..i.clone()
            };
            ds.instances(s).iter().map(map).collect()
        });
        Dataset::new(pois, ds.users().to_vec(), checkins, ds.trajectories().to_vec(), instances).unwrap()
    }

    /// `ds` with `inst`'s target and every later check-in of its user moved to the next POI id.
    pub(crate) fn future_changed(ds: &Dataset, inst: &Instance) -> Dataset {
        let n = ds.num_pois() as u32;
        rebuild(ds, ds.pois().to_vec(), |u, c| {
            if u == inst.user && c.utc >= inst.target.utc { Checkin { poi: (c.poi + 1) % n, ..*c } } else { *c }
        })
    }

    #[test]
    fn an_instances_own_target_and_later_checkins_never_change_its_candidates() {
        let ds = random_dataset(7);
        let stats = TrainStats::new(&ds);
        let cfg = CandidateConfig { transitions: 5, nearby: 5, similar: 5, radius_km: 5.0, hour_window_min: 90, similar_users: 3 };
        let mut train_changed_without_loo = 0;
        let picks: Vec<&Instance> = ds.instances(Split::Train).iter().step_by(7).chain(ds.instances(Split::Test)).collect();
        assert!(picks.len() > 10 && !ds.instances(Split::Test).is_empty());
        for inst in picks {
            let other = future_changed(&ds, inst);
            let other_stats = TrainStats::new(&other);
            let q = Query::from_instance(&ds, inst);
            let q2 = Query::from_instance(&other, &other.instances(inst.split)[inst.id as usize]);
            assert_eq!(q.history, q2.history);
            let a = stats.view(&q).candidates(ds.pois(), &q, &cfg, |_| false);
            let b = other_stats.view(&q2).candidates(other.pois(), &q2, &cfg, |_| false);
            assert_eq!(a, b, "{:?} instance {}", inst.split, inst.id);
            // Not vacuous: without leaving anything out, a train instance's candidates see its future.
            if inst.split == Split::Train {
                let (open, open2) = (Query { user: None, ..q }, Query { user: None, ..q2 });
                let a = stats.view(&open).candidates(ds.pois(), &open, &cfg, |_| false);
                let b = other_stats.view(&open2).candidates(other.pois(), &open2, &cfg, |_| false);
                train_changed_without_loo += usize::from(a != b);
            }
        }
        assert!(train_changed_without_loo > 0);
    }
}
