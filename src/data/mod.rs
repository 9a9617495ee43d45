//! Check-in data: the raw-format readers, the evaluation protocol (`docs/protocol.md`), and the on-disk dataset directory that every later stage loads.
//!
//! - [`readers`]: Foursquare TSMC2014, Gowalla SNAP and generic CSV into interned raw rows.
//! - [`protocol`]: k-core, trajectories, time split, instances and history, exactly as specified.
//! - [`dataset`]: the [`Dataset`] type, writing it to a directory and loading it back.
//!
//! The types a consumer (a prompt builder, a recommender) needs are re-exported here:
//! [`Dataset`], [`Instance`], [`Checkin`], [`Poi`], [`User`], [`Trajectory`], [`Split`].

pub mod codebook;
pub mod dataset;
pub mod preprocess;
pub mod protocol;
pub mod readers;

use chrono::{DateTime, FixedOffset, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

pub use dataset::{Dataset, Poi, Trajectory, User};

/// One of the three splits of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// Index 0, 1, 2 for train, val, test (for per-split arrays).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One kept check-in: a dense POI id, the UTC time in unix seconds and the local offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkin {
    /// Dense POI id (row of [`Dataset::pois`]).
    pub poi: u32,
    /// UTC time, unix seconds.
    pub utc: i64,
    /// Local time offset from UTC in minutes (e.g. -240 for New York in summer).
    pub tz_offset_min: i32,
}

impl Checkin {
    /// Local wall-clock time (UTC shifted by the offset), for "Tuesday 14:00"-style features.
    pub fn local_time(&self) -> NaiveDateTime {
        let secs = self.utc.saturating_add(i64::from(self.tz_offset_min) * 60);
        DateTime::from_timestamp(secs, 0).unwrap_or_default().naive_utc()
    }

    /// UTC time as a chrono value.
    pub fn utc_time(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.utc, 0).unwrap_or_default()
    }

    /// UTC time as ISO 8601, e.g. `2012-04-03T18:00:09Z`.
    pub fn utc_iso(&self) -> String {
        format_utc(self.utc)
    }

    /// Local time as ISO 8601 with its offset, e.g. `2012-04-03T14:00:09-04:00`.
    pub fn local_iso(&self) -> String {
        format_local(self.utc, self.tz_offset_min)
    }
}

/// A prediction task: a user, the target check-in, and the earlier check-ins of its trajectory.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Position of the instance in its split's file (0-based), stable across runs.
    pub id: u32,
    pub split: Split,
    /// Dense user id (row of [`Dataset::users`]).
    pub user: u32,
    /// Trajectory id (index into [`Dataset::trajectories`]).
    pub trajectory: u32,
    /// The check-in to predict.
    pub target: Checkin,
    /// The trajectory's check-ins before the target, in time order (never empty).
    pub prefix: Vec<Checkin>,
    /// Whether the target POI occurs in the user's history (see [`Dataset::history`]).
    pub is_return: bool,
}

/// `2012-04-03T18:00:09Z`.
pub fn format_utc(utc: i64) -> String {
    DateTime::from_timestamp(utc, 0).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `2012-04-03T14:00:09-04:00` (or `…Z` when the offset is zero).
pub fn format_local(utc: i64, tz_offset_min: i32) -> String {
    let t = DateTime::from_timestamp(utc, 0).unwrap_or_default();
    match FixedOffset::east_opt(tz_offset_min.saturating_mul(60)) {
        Some(off) => t.with_timezone(&off).to_rfc3339_opts(SecondsFormat::Secs, true),
        None => t.to_rfc3339_opts(SecondsFormat::Secs, true),
    }
}

/// Largest accepted |timezone offset| in minutes (chrono's fixed offsets stay below 24 h).
pub const MAX_TZ_OFFSET_MIN: i32 = 24 * 60 - 1;

/// Mean Earth radius in km (the IUGG mean radius, rounded as usual for haversine).
pub const EARTH_RADIUS_KM: f64 = 6371.0;

/// Great-circle distance in km between two (latitude, longitude) points in degrees.
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    // Rounding can push `a` a hair past 1 for antipodal points.
    2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkin_times() {
        // 2012-04-03T18:00:09Z
        let c = Checkin { poi: 0, utc: 1_333_476_009, tz_offset_min: -240 };
        assert_eq!(c.utc_iso(), "2012-04-03T18:00:09Z");
        assert_eq!(c.local_iso(), "2012-04-03T14:00:09-04:00");
        assert_eq!(c.local_time().to_string(), "2012-04-03 14:00:09");
        let tokyo = Checkin { tz_offset_min: 540, ..c };
        assert_eq!(tokyo.local_iso(), "2012-04-04T03:00:09+09:00");
        assert_eq!(format_local(0, 0), "1970-01-01T00:00:00Z");
    }
}
