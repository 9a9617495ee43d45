//! The dataset directory `preprocess` writes and everything else loads.
//!
//! ```text
//! DIR/pois.csv         poi_id,venue_id,category,latitude,longitude,train_visits
//! DIR/users.csv        user_id,source_id
//! DIR/checkins.csv     user_id,poi_id,unix_time,utc_time,tz_offset_min,trajectory_id,split
//!                      (every kept check-in, sorted by user then time: a user's history is a
//!                      contiguous, time-ordered block, found by binary search)
//! DIR/train.jsonl      one instance per line (also val.jsonl, test.jsonl):
//!                      {"id","user","trajectory","is_return","target":{...},"prefix":[{...}]}
//!                      with each check-in {"poi","unix_time","utc_time","local_time","tz_offset_min"}
//! DIR/stats.json       counts, parameters, skipped rows, dropped instances
//! ```
//!
//! Ids are dense from 0; `poi_id` and `user_id` are row numbers of their tables. Times are unix
//! seconds (UTC) plus ISO 8601 strings; `local_time` carries its offset (`…-04:00`).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::{Checkin, Instance, MAX_TZ_OFFSET_MIN, Split, format_local, format_utc};

/// Bumped when the directory layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// A POI (venue) of the dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Poi {
    /// Dense id, equal to the row in [`Dataset::pois`].
    pub id: u32,
    /// The source data's venue id.
    pub venue_id: String,
    /// Category name; empty when unknown.
    pub category: String,
    pub lat: f64,
    pub lon: f64,
    /// Check-ins at this POI in train trajectories (the popularity baseline's score).
    pub train_visits: u64,
}

/// A user of the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Dense id, equal to the row in [`Dataset::users`].
    pub id: u32,
    /// The source data's user id.
    pub source_id: String,
}

/// A kept trajectory: `len` (>= 2) consecutive entries of [`Dataset::checkins`] from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trajectory {
    pub id: u32,
    pub user: u32,
    pub split: Split,
    pub start: usize,
    pub len: usize,
}

/// A processed dataset in memory. Built by [`crate::data::protocol::run`] or loaded from a
/// directory with [`Dataset::load`]; read-only afterwards.
#[derive(Debug, Clone)]
pub struct Dataset {
    pois: Vec<Poi>,
    users: Vec<User>,
    /// Sorted by (user, utc); within equal times, input order.
    checkins: Vec<Checkin>,
    /// `checkins[user_start[u]..user_start[u + 1]]` are user u's.
    user_start: Vec<usize>,
    trajectories: Vec<Trajectory>,
    instances: [Vec<Instance>; 3],
    /// The semantic POI ids, when the directory has them (`codebook.json`).
    codebook: Option<super::codebook::Codebook>,
}

impl Dataset {
    /// Assembles a dataset from its parts, checking the invariants the accessors rely on and
    /// computing each instance's `is_return` from its history.
    pub fn new(
        pois: Vec<Poi>,
        users: Vec<User>,
        checkins: Vec<Checkin>,
        trajectories: Vec<Trajectory>,
        instances: [Vec<Instance>; 3],
    ) -> Result<Dataset> {
        ensure!(pois.iter().enumerate().all(|(i, p)| p.id as usize == i), "POI ids are not 0..n in order");
        ensure!(users.iter().enumerate().all(|(i, u)| u.id as usize == i), "user ids are not 0..n in order");
        let np = pois.len();
        ensure!(checkins.iter().all(|c| (c.poi as usize) < np), "a check-in names a POI id out of range");
        // Trajectories tile the check-ins, grouped by user, in time order.
        let mut user_start = vec![usize::MAX; users.len() + 1];
        let mut next = 0usize;
        let mut prev_user: Option<u32> = None;
        for (i, t) in trajectories.iter().enumerate() {
            ensure!(t.id as usize == i, "trajectory ids are not 0..n in order");
            ensure!((t.user as usize) < users.len(), "trajectory {i} names user {} out of range", t.user);
            ensure!(t.start == next && t.len >= 2, "trajectory {i} does not continue the check-in table");
            next = t.start + t.len;
            ensure!(next <= checkins.len(), "trajectory {i} runs past the check-in table");
            match prev_user {
                Some(p) if p == t.user => {
                    ensure!(checkins[t.start - 1].utc <= checkins[t.start].utc, "trajectories of user {} are not in time order", t.user);
                }
                Some(p) if p > t.user => bail!("trajectories are not grouped by user in order"),
                _ => user_start[t.user as usize] = t.start,
            }
            ensure!(checkins[t.start..next].windows(2).all(|w| w[0].utc <= w[1].utc), "trajectory {i} is not in time order");
            prev_user = Some(t.user);
        }
        ensure!(next == checkins.len(), "check-ins outside every trajectory");
        // Users without check-ins get empty ranges.
        user_start[users.len()] = checkins.len();
        for u in (0..users.len()).rev() {
            if user_start[u] == usize::MAX {
                user_start[u] = user_start[u + 1];
            }
        }
        let mut ds = Dataset { pois, users, checkins, user_start, trajectories, instances: Default::default(), codebook: None };
        for (s, mut list) in Split::ALL.into_iter().zip(instances) {
            for (i, inst) in list.iter_mut().enumerate() {
                ensure!(inst.split == s && inst.id as usize == i, "{s} instance {i} has a wrong id or split");
                ensure!((inst.user as usize) < ds.users.len(), "{s} instance {i}: user out of range");
                let t =
                    ds.trajectories.get(inst.trajectory as usize).with_context(|| format!("{s} instance {i}: trajectory out of range"))?;
                ensure!(t.user == inst.user && t.split == s, "{s} instance {i} does not match its trajectory");
                ensure!(!inst.prefix.is_empty(), "{s} instance {i} has an empty prefix");
                ensure!(
                    inst.prefix.iter().chain([&inst.target]).all(|c| (c.poi as usize) < np),
                    "{s} instance {i} names a POI id out of range"
                );
                inst.is_return = ds.compute_is_return(inst);
            }
            ds.instances[s.index()] = list;
        }
        Ok(ds)
    }

    /// All POIs; `pois()[id]` has that id.
    pub fn pois(&self) -> &[Poi] {
        &self.pois
    }

    pub fn num_pois(&self) -> usize {
        self.pois.len()
    }

    /// The semantic POI ids, when the dataset directory has them.
    pub fn codebook(&self) -> Option<&super::codebook::Codebook> {
        self.codebook.as_ref()
    }

    /// All users; `users()[id]` has that id.
    pub fn users(&self) -> &[User] {
        &self.users
    }

    /// Distinct non-empty category names, sorted.
    pub fn categories(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.pois.iter().map(|p| p.category.as_str()).filter(|c| !c.is_empty()).collect();
        set.into_iter().map(str::to_string).collect()
    }

    /// Every kept check-in, grouped by user and in time order within a user.
    pub fn checkins(&self) -> &[Checkin] {
        &self.checkins
    }

    /// One user's check-ins in time order (empty for an unknown id).
    pub fn user_checkins(&self, user: u32) -> &[Checkin] {
        let u = user as usize;
        if u >= self.users.len() {
            return &[];
        }
        &self.checkins[self.user_start[u]..self.user_start[u + 1]]
    }

    /// All trajectories, by user then time.
    pub fn trajectories(&self) -> &[Trajectory] {
        &self.trajectories
    }

    /// The check-ins of one trajectory.
    pub fn trajectory_checkins(&self, t: &Trajectory) -> &[Checkin] {
        self.checkins.get(t.start..t.start + t.len).unwrap_or(&[])
    }

    /// The instances of a split (empty when the split was not loaded, see [`Dataset::load_splits`]).
    pub fn instances(&self, split: Split) -> &[Instance] {
        &self.instances[split.index()]
    }

    /// Step 5 of the protocol: the user's kept check-ins strictly before the target's time,
    /// oldest first (all splits; a binary search in the user's block).
    pub fn history(&self, inst: &Instance) -> &[Checkin] {
        let all = self.user_checkins(inst.user);
        let end = all.partition_point(|c| c.utc < inst.target.utc);
        &all[..end]
    }

    fn compute_is_return(&self, inst: &Instance) -> bool {
        self.history(inst).iter().any(|c| c.poi == inst.target.poi)
    }

    /// Writes the directory (created if needed); `stats` is written as `stats.json`.
    pub fn save(&self, dir: &Path, stats: &serde_json::Value) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create output directory {}", dir.display()))?;
        let path = dir.join("pois.csv");
        let mut w = csv::Writer::from_writer(create(&path)?);
        w.write_record(["poi_id", "venue_id", "category", "latitude", "longitude", "train_visits"])?;
        for p in &self.pois {
            w.write_record([
                p.id.to_string(),
                p.venue_id.clone(),
                p.category.clone(),
                p.lat.to_string(),
                p.lon.to_string(),
                p.train_visits.to_string(),
            ])?;
        }
        finish_csv(w, &path)?;

        let path = dir.join("users.csv");
        let mut w = csv::Writer::from_writer(create(&path)?);
        w.write_record(["user_id", "source_id"])?;
        for u in &self.users {
            w.write_record([u.id.to_string(), u.source_id.clone()])?;
        }
        finish_csv(w, &path)?;

        let path = dir.join("checkins.csv");
        let mut w = csv::Writer::from_writer(create(&path)?);
        w.write_record(["user_id", "poi_id", "unix_time", "utc_time", "tz_offset_min", "trajectory_id", "split"])?;
        for t in &self.trajectories {
            for c in self.trajectory_checkins(t) {
                w.write_record([
                    t.user.to_string(),
                    c.poi.to_string(),
                    c.utc.to_string(),
                    format_utc(c.utc),
                    c.tz_offset_min.to_string(),
                    t.id.to_string(),
                    t.split.as_str().to_string(),
                ])?;
            }
        }
        finish_csv(w, &path)?;

        for s in Split::ALL {
            let path = dir.join(format!("{s}.jsonl"));
            let mut w = create(&path)?;
            for inst in self.instances(s) {
                serde_json::to_writer(&mut w, &InstanceJson::from(inst))?;
                w.write_all(b"\n")?;
            }
            w.flush().with_context(|| format!("writing {}", path.display()))?;
        }

        let path = dir.join("stats.json");
        let mut w = create(&path)?;
        serde_json::to_writer_pretty(&mut w, stats)?;
        w.write_all(b"\n")?;
        w.flush().with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Loads a dataset directory with the instances of every split.
    pub fn load(dir: &Path) -> Result<Dataset> {
        Self::load_splits(dir, &Split::ALL)
    }

    /// Loads a dataset directory with only the instances of the given splits (the others'
    /// `instances()` are empty). POIs, users, check-ins and trajectories are always loaded.
    pub fn load_splits(dir: &Path, splits: &[Split]) -> Result<Dataset> {
        if !dir.is_dir() {
            bail!("dataset directory {} does not exist (run `refine-poi preprocess` first)", dir.display());
        }
        let check_version = || -> Result<()> {
            let path = dir.join("stats.json");
            let Ok(text) = std::fs::read_to_string(&path) else {
                return Ok(());
            };
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
            if let Some(fv) = v.get("format_version").and_then(|x| x.as_u64())
                && fv != u64::from(FORMAT_VERSION)
            {
                bail!("{} has format_version {fv}; this build reads {FORMAT_VERSION}", path.display());
            }
            Ok(())
        };
        check_version()?;

        let pois = read_csv_table(&dir.join("pois.csv"), |line, r: PoiRow| {
            ensure!(r.latitude.is_finite() && r.longitude.is_finite(), "line {line}: bad coordinates");
            Ok(Poi {
                id: r.poi_id,
                venue_id: r.venue_id,
                category: r.category,
                lat: r.latitude,
                lon: r.longitude,
                train_visits: r.train_visits,
            })
        })?;
        let users = read_csv_table(&dir.join("users.csv"), |_, r: UserRow| Ok(User { id: r.user_id, source_id: r.source_id }))?;

        let path = dir.join("checkins.csv");
        let rows: Vec<CheckinRow> = read_csv_table(&path, |line, r: CheckinRow| {
            ensure!(r.tz_offset_min.abs() <= MAX_TZ_OFFSET_MIN, "line {line}: timezone offset out of range");
            Ok(r)
        })?;
        let mut checkins = Vec::with_capacity(rows.len());
        let mut trajectories: Vec<Trajectory> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            checkins.push(Checkin { poi: r.poi_id, utc: r.unix_time, tz_offset_min: r.tz_offset_min });
            match trajectories.last_mut() {
                Some(t) if t.id == r.trajectory_id => {
                    ensure!(
                        t.user == r.user_id && t.split == r.split,
                        "{} line {}: trajectory {} changes user or split",
                        path.display(),
                        i + 2,
                        t.id
                    );
                    t.len += 1;
                }
                _ => trajectories.push(Trajectory { id: r.trajectory_id, user: r.user_id, split: r.split, start: i, len: 1 }),
            }
        }

        let mut instances: [Vec<Instance>; 3] = Default::default();
        // The files' is_return values, checked against the history once the dataset is built.
        let mut stored: [Vec<Option<bool>>; 3] = Default::default();
        for &s in splits {
            let path = dir.join(format!("{s}.jsonl"));
            let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            for (n, line) in BufReader::new(file).lines().enumerate() {
                let line = line.with_context(|| format!("reading {}", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let j: InstanceJson =
                    serde_json::from_str(&line).with_context(|| format!("{} line {}: not a valid instance", path.display(), n + 1))?;
                stored[s.index()].push(j.is_return);
                instances[s.index()].push(j.into_instance(s));
            }
        }
        let mut ds = Dataset::new(pois, users, checkins, trajectories, instances)
            .with_context(|| format!("dataset {} is inconsistent", dir.display()))?;
        if dir.join(super::codebook::FILE).exists() {
            ds.codebook = Some(super::codebook::Codebook::load(dir, ds.num_pois())?);
        }
        for s in Split::ALL {
            for (inst, st) in ds.instances(s).iter().zip(&stored[s.index()]) {
                if let Some(st) = *st
                    && st != inst.is_return
                {
                    bail!(
                        "dataset {} is inconsistent: {s} instance {} says is_return={st} but its history says {}",
                        dir.display(),
                        inst.id,
                        inst.is_return
                    );
                }
            }
        }
        Ok(ds)
    }

    /// The directory's `stats.json`, if present.
    pub fn read_stats(dir: &Path) -> Result<serde_json::Value> {
        let path = dir.join("stats.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    }
}

fn create(path: &PathBuf) -> Result<BufWriter<File>> {
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 16, f))
}

fn finish_csv(w: csv::Writer<BufWriter<File>>, path: &Path) -> Result<()> {
    let mut inner = w.into_inner().map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error()))?;
    inner.flush().with_context(|| format!("writing {}", path.display()))
}

/// Reads a headed CSV file into rows, naming the file and line of any error.
fn read_csv_table<R: serde::de::DeserializeOwned, T>(path: &Path, mut f: impl FnMut(u64, R) -> Result<T>) -> Result<Vec<T>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut rdr = csv::Reader::from_reader(BufReader::with_capacity(1 << 16, file));
    let mut out = Vec::new();
    for rec in rdr.deserialize::<R>() {
        let line = out.len() as u64 + 2;
        let r = rec.with_context(|| format!("{}: bad row", path.display()))?;
        out.push(f(line, r).with_context(|| format!("{}", path.display()))?);
    }
    Ok(out)
}

#[derive(Deserialize)]
struct PoiRow {
    poi_id: u32,
    venue_id: String,
    category: String,
    latitude: f64,
    longitude: f64,
    train_visits: u64,
}

#[derive(Deserialize)]
struct UserRow {
    user_id: u32,
    source_id: String,
}

#[derive(Deserialize)]
struct CheckinRow {
    user_id: u32,
    poi_id: u32,
    unix_time: i64,
    tz_offset_min: i32,
    trajectory_id: u32,
    split: Split,
}

/// One check-in as written in the instance files.
#[derive(Serialize, Deserialize)]
pub struct CheckinJson {
    pub poi: u32,
    pub unix_time: i64,
    #[serde(default)]
    pub utc_time: String,
    #[serde(default)]
    pub local_time: String,
    pub tz_offset_min: i32,
}

impl From<&Checkin> for CheckinJson {
    fn from(c: &Checkin) -> Self {
        CheckinJson {
            poi: c.poi,
            unix_time: c.utc,
            utc_time: format_utc(c.utc),
            local_time: format_local(c.utc, c.tz_offset_min),
            tz_offset_min: c.tz_offset_min,
        }
    }
}

impl CheckinJson {
    fn to_checkin(&self) -> Checkin {
        Checkin { poi: self.poi, utc: self.unix_time, tz_offset_min: self.tz_offset_min }
    }
}

/// One line of `train.jsonl` / `val.jsonl` / `test.jsonl`.
#[derive(Serialize, Deserialize)]
pub struct InstanceJson {
    pub id: u32,
    pub user: u32,
    pub trajectory: u32,
    #[serde(default)]
    pub is_return: Option<bool>,
    pub target: CheckinJson,
    pub prefix: Vec<CheckinJson>,
}

impl From<&Instance> for InstanceJson {
    fn from(i: &Instance) -> Self {
        InstanceJson {
            id: i.id,
            user: i.user,
            trajectory: i.trajectory,
            is_return: Some(i.is_return),
            target: CheckinJson::from(&i.target),
            prefix: i.prefix.iter().map(CheckinJson::from).collect(),
        }
    }
}

impl InstanceJson {
    fn into_instance(self, split: Split) -> Instance {
        Instance {
            id: self.id,
            split,
            user: self.user,
            trajectory: self.trajectory,
            target: self.target.to_checkin(),
            prefix: self.prefix.iter().map(CheckinJson::to_checkin).collect(),
            is_return: false,
        }
    }
}
