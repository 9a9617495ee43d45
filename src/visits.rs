//! A user's visit counts per POI: the one definition behind the prompt's visit lists, the SFT
//! answer lists and the hour-aware counter baseline (the protocol's `counter` baseline keeps its
//! own dense f64 scores, as `docs/protocol.md` defines them).
//!
//! Two orders: by visits (the counter baseline's order: most visits first, ties by train
//! popularity, then id), and around an hour (visits whose local time of day lies within a
//! window of the target's, most first, ties by the visit order). People keep routines (the
//! office in the morning, the gym after work), so visits at this time of day say more about the
//! next check-in than visits at any time.

use std::collections::HashMap;

use chrono::{NaiveDateTime, Timelike};

use crate::data::{Checkin, Poi};

/// The around-the-hour window unless configured (`prompt.hour_window_min`).
pub const DEFAULT_WINDOW_MIN: u32 = 60;

/// One POI's visits in a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visits {
    pub poi: u32,
    /// Visits at any time.
    pub total: u64,
    /// Visits within the window around the target's time of day.
    pub near: u64,
}

/// Minutes between the times of day of `a` and `b`, the short way around midnight (0..=720).
pub fn clock_distance_min(a: NaiveDateTime, b: NaiveDateTime) -> u32 {
    let minute_of_day = |t: NaiveDateTime| t.hour() * 60 + t.minute();
    let d = minute_of_day(a).abs_diff(minute_of_day(b));
    d.min(24 * 60 - d)
}

/// Visit counts over `checkins`, in the counter's order. `near` counts the check-ins whose local
/// time of day is within `window_min` minutes of `at`'s (bounds included).
pub fn count_visits<'a>(checkins: impl IntoIterator<Item = &'a Checkin>, pois: &[Poi], at: NaiveDateTime, window_min: u32) -> Vec<Visits> {
    let mut counts: HashMap<u32, (u64, u64)> = HashMap::new();
    for c in checkins {
        let e = counts.entry(c.poi).or_default();
        e.0 += 1;
        e.1 += u64::from(clock_distance_min(c.local_time(), at) <= window_min);
    }
    let mut visits: Vec<Visits> = counts.into_iter().map(|(poi, (total, near))| Visits { poi, total, near }).collect();
    let popularity = |id: u32| pois.get(id as usize).map_or(0, |p| p.train_visits);
    visits.sort_by(|a, b| b.total.cmp(&a.total).then(popularity(b.poi).cmp(&popularity(a.poi))).then(a.poi.cmp(&b.poi)));
    visits
}

/// The POIs visited around the hour (`near > 0`), most such visits first; ties keep the order
/// of `visits` (which [`count_visits`] returns in the counter's order).
pub fn around_the_hour(visits: &[Visits]) -> Vec<Visits> {
    let mut near: Vec<Visits> = visits.iter().copied().filter(|v| v.near > 0).collect();
    near.sort_by_key(|v| std::cmp::Reverse(v.near)); // stable
    near
}

/// Every visited POI: the around-the-hour list ([`around_the_hour`]), then the remaining POIs in
/// the counter's order. Uncapped: the SFT answers and the `counter-hour` baseline read it
/// whatever `prompt.hour_visits` and `prompt.top_visited` show.
pub fn hour_first_order(visits: &[Visits]) -> Vec<u32> {
    let near = around_the_hour(visits);
    let rest = visits.iter().filter(|v| v.near == 0);
    near.iter().chain(rest).map(|v| v.poi).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3600;
    /// 2012-04-02 00:00 UTC, a Monday.
    const MONDAY: i64 = 1_333_324_800;

    fn poi(id: u32, train_visits: u64) -> Poi {
        Poi { id, venue_id: format!("v{id}"), category: String::new(), lat: 0.0, lon: 0.0, train_visits }
    }

    /// A check-in at `h:m` UTC on day `day` (tz offset 0).
    fn at(poi: u32, day: i64, h: i64, m: i64) -> Checkin {
        Checkin { poi, utc: MONDAY + day * 24 * HOUR + h * HOUR + m * 60, tz_offset_min: 0 }
    }

    #[test]
    fn clock_distance_wraps_around_midnight() {
        let t = |h, m| at(0, 0, h, m).local_time();
        assert_eq!(clock_distance_min(t(23, 30), t(0, 15)), 45);
        assert_eq!(clock_distance_min(t(8, 0), t(20, 0)), 720);
        assert_eq!(clock_distance_min(t(17, 6), t(16, 6)), 60);
        // The date does not matter, only the time of day.
        assert_eq!(clock_distance_min(at(0, 3, 9, 0).local_time(), t(9, 10)), 10);
    }

    #[test]
    fn counts_and_orders_by_hand() {
        // POI 1: 3 visits (08:00, 08:30, 18:00); POI 2: 2 visits (17:30, 18:30); POI 3: 1 visit
        // (17:00); POI 4: 2 visits (09:00, 10:00). Target 18:00 with a 60-minute window.
        let pois: Vec<Poi> = (0..5).map(|i| poi(i, [0, 1, 1, 9, 5][i as usize])).collect();
        let history = [
            at(1, 0, 8, 0),
            at(1, 1, 8, 30),
            at(1, 2, 18, 0),
            at(2, 0, 17, 30),
            at(2, 1, 18, 30),
            at(3, 2, 17, 0),
            at(4, 0, 9, 0),
            at(4, 3, 10, 0),
        ];
        let target = at(0, 5, 18, 0).local_time();
        let v = count_visits(&history, &pois, target, 60);
        // Totals: 1 → 3; 2 and 4 → 2, POI 4 first by popularity (5 > 1); 3 → 1.
        let expect = [(1, 3, 1), (4, 2, 0), (2, 2, 2), (3, 1, 1)];
        let got: Vec<(u32, u64, u64)> = v.iter().map(|v| (v.poi, v.total, v.near)).collect();
        assert_eq!(got, expect);
        // Around 18:00: POI 2 (2 visits), then 1 and 3 (1 each) in the counter's order.
        assert_eq!(around_the_hour(&v).iter().map(|v| v.poi).collect::<Vec<_>>(), [2, 1, 3]);
        assert_eq!(hour_first_order(&v), [2, 1, 3, 4]);
        // A 59-minute window leaves out POI 3 (17:00) and keeps both of POI 2's visits.
        let v = count_visits(&history, &pois, target, 59);
        assert_eq!(hour_first_order(&v), [2, 1, 4, 3]);
    }
}
