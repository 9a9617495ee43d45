//! Readers for the three raw check-in formats (`docs/datasets.md`, "What preprocess reads").
//!
//! Every reader produces the same [`RawData`]: user and venue ids interned to indices in input
//! order, one [`RawCheckin`] per valid row (in input order, which later breaks timestamp ties),
//! and a [`ReadReport`] of what was skipped and why. Input is gzip-decompressed transparently
//! when it starts with the gzip magic bytes (whatever its name), and bytes that are not UTF-8 are
//! decoded lossily (U+FFFD) instead of aborting.
//!
//! Bad rows are skipped and counted by reason with their first few line numbers; in strict mode
//! the first bad row is an error naming its line. Line numbers are 1-based physical lines of the
//! (decompressed) input; a CSV header is line 1.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, NaiveDateTime};
use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};

use super::MAX_TZ_OFFSET_MIN;

/// The raw formats `preprocess` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Foursquare TSMC2014: the raw file (tab-separated, no header, 8 fields), or its common
    /// CSV download (header `userId,venueId,...,utcTimestamp`), told apart by the first line.
    Foursquare,
    /// Gowalla SNAP `loc-gowalla_totalCheckins.txt`: tab-separated, no header, 5 fields.
    Gowalla,
    /// CSV with a header: user_id, venue_id, category, latitude, longitude, utc_time, tz_offset_min
    /// (or the TSMC2014 CSV header, read as with `foursquare`).
    Csv,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Foursquare => "foursquare",
            Format::Gowalla => "gowalla",
            Format::Csv => "csv",
        }
    }
}

/// An inclusive latitude/longitude box: rows outside it are filtered (not errors).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BBox {
    pub min_lat: f64,
    pub min_lon: f64,
    pub max_lat: f64,
    pub max_lon: f64,
}

impl BBox {
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        lat >= self.min_lat && lat <= self.max_lat && lon >= self.min_lon && lon <= self.max_lon
    }
}

impl std::str::FromStr for BBox {
    type Err = String;

    /// `min_lat,min_lon,max_lat,max_lon`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.len() != 4 {
            return Err(format!("expected min_lat,min_lon,max_lat,max_lon, got '{s}'"));
        }
        let mut v = [0f64; 4];
        for (slot, p) in v.iter_mut().zip(&parts) {
            *slot = p.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| format!("'{p}' is not a number"))?;
        }
        let b = BBox { min_lat: v[0], min_lon: v[1], max_lat: v[2], max_lon: v[3] };
        if b.min_lat > b.max_lat || b.min_lon > b.max_lon {
            return Err(format!("empty box '{s}': need min_lat <= max_lat and min_lon <= max_lon"));
        }
        Ok(b)
    }
}

/// How to read the input.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    pub format: Format,
    /// The first bad row is an error (naming its line) instead of being skipped.
    pub strict: bool,
    /// Keep only rows inside this box.
    pub bbox: Option<BBox>,
    /// Gowalla only: the local offset of every row; without it, estimated from the longitude.
    pub tz_offset_min: Option<i32>,
    /// Gowalla only: a `venue_id,category` CSV table (see [`read_category_table`]).
    pub categories: Option<PathBuf>,
}

impl ReadOptions {
    pub fn new(format: Format) -> Self {
        ReadOptions { format, strict: false, bbox: None, tz_offset_min: None, categories: None }
    }
}

/// One valid input row, with interned ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawCheckin {
    /// Index into [`RawData::users`].
    pub user: u32,
    /// Index into [`RawData::venues`].
    pub venue: u32,
    /// UTC unix seconds.
    pub utc: i64,
    pub tz_offset_min: i32,
}

/// A venue as first seen in the input (category and coordinates of its first valid row).
#[derive(Debug, Clone, PartialEq)]
pub struct Venue {
    pub id: String,
    /// Category name; empty when unknown (Gowalla without a category table).
    pub category: String,
    pub lat: f64,
    pub lon: f64,
}

/// Skipped rows of one reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SkipInfo {
    pub count: u64,
    /// The first [`FIRST_LINES`] line numbers.
    pub first_lines: Vec<u64>,
}

/// How many line numbers are kept per skip reason.
pub const FIRST_LINES: usize = 5;

/// What the reader saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReadReport {
    /// Data rows seen (excluding a header and blank lines).
    pub rows_read: u64,
    /// Rows that parsed and passed the bounding box.
    pub rows_valid: u64,
    /// Rows that parsed but lay outside `--bbox`.
    pub rows_outside_bbox: u64,
    /// Bad rows by reason.
    pub skipped: BTreeMap<String, SkipInfo>,
}

impl ReadReport {
    pub fn rows_skipped(&self) -> u64 {
        self.skipped.values().map(|s| s.count).sum()
    }

    fn skip(&mut self, reason: &str, line: u64) {
        let e = self.skipped.entry(reason.to_string()).or_default();
        e.count += 1;
        if e.first_lines.len() < FIRST_LINES {
            e.first_lines.push(line);
        }
    }

    /// One line per reason, e.g. `bad_time: 2 rows (lines 5, 9)`.
    pub fn summary_lines(&self) -> Vec<String> {
        self.skipped
            .iter()
            .map(|(reason, s)| {
                let lines: Vec<String> = s.first_lines.iter().map(u64::to_string).collect();
                let more = if s.count as usize > s.first_lines.len() { ", …" } else { "" };
                format!(
                    "{reason}: {} row{} (line{} {}{more})",
                    s.count,
                    if s.count == 1 { "" } else { "s" },
                    if s.first_lines.len() == 1 { "" } else { "s" },
                    lines.join(", ")
                )
            })
            .collect()
    }
}

/// Everything read from one input file.
#[derive(Debug, Clone, Default)]
pub struct RawData {
    /// Source user ids, in order of first appearance.
    pub users: Vec<String>,
    /// Venues, in order of first appearance.
    pub venues: Vec<Venue>,
    /// Valid rows in input order.
    pub rows: Vec<RawCheckin>,
    pub report: ReadReport,
}

/// A row that cannot be used: a reason key (for counting) and a human detail.
#[derive(Debug)]
struct BadRow {
    reason: &'static str,
    detail: String,
}

fn bad(reason: &'static str, detail: String) -> BadRow {
    BadRow { reason, detail }
}

/// One parsed row before interning.
struct Row<'a> {
    user: &'a str,
    venue: &'a str,
    category: Option<&'a str>,
    lat: f64,
    lon: f64,
    utc: i64,
    tz_offset_min: i32,
}

/// Interns ids and collects rows, applying strictness and the bounding box.
struct Builder<'p> {
    path: &'p Path,
    opts: ReadOptions,
    data: RawData,
    user_ix: HashMap<String, u32>,
    venue_ix: HashMap<String, u32>,
}

impl<'p> Builder<'p> {
    fn new(path: &'p Path, opts: &ReadOptions) -> Self {
        Builder { path, opts: opts.clone(), data: RawData::default(), user_ix: HashMap::new(), venue_ix: HashMap::new() }
    }

    fn accept(&mut self, line: u64, parsed: Result<Row<'_>, BadRow>) -> Result<()> {
        self.data.report.rows_read += 1;
        let row = match parsed {
            Ok(r) => r,
            Err(b) => {
                if self.opts.strict {
                    bail!("{} line {line}: {} ({})", self.path.display(), b.detail, b.reason);
                }
                self.data.report.skip(b.reason, line);
                return Ok(());
            }
        };
        if let Some(bbox) = &self.opts.bbox
            && !bbox.contains(row.lat, row.lon)
        {
            self.data.report.rows_outside_bbox += 1;
            return Ok(());
        }
        let user = intern(&mut self.user_ix, row.user, || {
            self.data.users.push(row.user.to_string());
        });
        let venue = intern(&mut self.venue_ix, row.venue, || {
            self.data.venues.push(Venue {
                id: row.venue.to_string(),
                category: row.category.unwrap_or("").to_string(),
                lat: row.lat,
                lon: row.lon,
            });
        });
        if self.data.rows.len() >= u32::MAX as usize {
            bail!("{}: more than {} rows are not supported", self.path.display(), u32::MAX);
        }
        self.data.rows.push(RawCheckin { user, venue, utc: row.utc, tz_offset_min: row.tz_offset_min });
        self.data.report.rows_valid += 1;
        Ok(())
    }
}

fn intern(map: &mut HashMap<String, u32>, key: &str, on_new: impl FnOnce()) -> u32 {
    if let Some(&i) = map.get(key) {
        return i;
    }
    let i = map.len() as u32;
    map.insert(key.to_string(), i);
    on_new();
    i
}

/// Opens a file for reading, decompressing gzip when the content starts with its magic bytes.
pub fn open_input(path: &Path) -> Result<Box<dyn BufRead>> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot open input file {}", path.display()))?;
    if meta.is_dir() {
        bail!("input {} is a directory, not a file", path.display());
    }
    let file = File::open(path).with_context(|| format!("cannot open input file {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let head = reader.fill_buf().with_context(|| format!("reading {}", path.display()))?;
    if head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b {
        Ok(Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(reader))))
    } else {
        Ok(Box::new(reader))
    }
}

/// Reads `path` in the given format.
pub fn read(path: &Path, opts: &ReadOptions) -> Result<RawData> {
    if opts.format != Format::Gowalla {
        if opts.tz_offset_min.is_some() {
            bail!("--tz-offset-min applies only to --format gowalla (other formats carry the offset per row)");
        }
        if opts.categories.is_some() {
            bail!("--categories applies only to --format gowalla (other formats carry the category per row)");
        }
    }
    if let Some(tz) = opts.tz_offset_min
        && tz.abs() > MAX_TZ_OFFSET_MIN
    {
        bail!("--tz-offset-min {tz} is out of range (|offset| must be below 24 h)");
    }
    let mut input = open_input(path)?;
    let mut b = Builder::new(path, opts);
    match opts.format {
        Format::Foursquare if looks_like_tsmc_csv(&mut input, path)? => read_csv(path, input, &mut b)?,
        Format::Foursquare => read_lines(path, input, |line, text| b.accept(line, parse_tsmc(text)))?,
        Format::Gowalla => {
            let tz = opts.tz_offset_min;
            read_lines(path, input, |line, text| b.accept(line, parse_gowalla(text, tz)))?
        }
        Format::Csv => read_csv(path, input, &mut b)?,
    }
    let mut data = b.data;
    if let Some(table) = &opts.categories {
        let cats = read_category_table(table)?;
        for v in &mut data.venues {
            if let Some(c) = cats.get(&v.id) {
                v.category.clone_from(c);
            }
        }
    }
    if data.report.rows_read == 0 {
        bail!("input file {} has no check-in rows (it is empty)", path.display());
    }
    if data.rows.is_empty() {
        let mut msg = format!("no usable check-ins in {}: {} rows read", path.display(), data.report.rows_read);
        if data.report.rows_outside_bbox > 0 {
            msg.push_str(&format!(", {} outside --bbox", data.report.rows_outside_bbox));
        }
        for l in data.report.summary_lines() {
            msg.push_str("; skipped ");
            msg.push_str(&l);
        }
        bail!(msg);
    }
    Ok(data)
}

/// Calls `f(line_number, text)` for every non-blank line, decoding lossily, `\r\n` tolerated.
fn read_lines(path: &Path, mut input: Box<dyn BufRead>, mut f: impl FnMut(u64, &str) -> Result<()>) -> Result<()> {
    let mut buf = Vec::with_capacity(256);
    let mut line = 0u64;
    loop {
        buf.clear();
        let n = input.read_until(b'\n', &mut buf).with_context(|| format!("reading {} after line {line}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let text = String::from_utf8_lossy(&buf);
        if text.trim().is_empty() {
            continue;
        }
        f(line, &text)?;
    }
}

/// The `n` tab-separated fields of a raw row, or a `field_count` bad row.
fn tab_fields(text: &str, n: usize) -> Result<Vec<&str>, BadRow> {
    let f: Vec<&str> = text.split('\t').collect();
    if f.len() != n {
        return Err(bad("field_count", format!("expected {n} tab-separated fields, found {}", f.len())));
    }
    Ok(f)
}

/// `user \t venue \t category id \t category name \t lat \t lon \t tz offset min \t time`.
fn parse_tsmc(text: &str) -> Result<Row<'_>, BadRow> {
    let f = tab_fields(text, 8)?;
    let (lat, lon) = parse_coords(f[4], f[5])?;
    Ok(Row {
        user: nonempty(f[0], "user id")?,
        venue: nonempty(f[1], "venue id")?,
        category: Some(f[3].trim()),
        lat,
        lon,
        tz_offset_min: parse_tz(f[6])?,
        utc: parse_tsmc_time(f[7])?,
    })
}

/// `user \t 2010-10-19T23:55:27Z \t lat \t lon \t location id`.
fn parse_gowalla(text: &str, tz: Option<i32>) -> Result<Row<'_>, BadRow> {
    let f = tab_fields(text, 5)?;
    let (lat, lon) = parse_coords(f[2], f[3])?;
    Ok(Row {
        user: nonempty(f[0], "user id")?,
        venue: nonempty(f[4], "location id")?,
        category: None,
        lat,
        lon,
        utc: parse_iso_time(f[1])?,
        tz_offset_min: tz.unwrap_or_else(|| tz_from_longitude(lon)),
    })
}

/// The offset Gowalla rows get without `--tz-offset-min`: `round(lon / 15)` hours (half away
/// from zero), i.e. the nautical time zone of the longitude. No daylight saving.
pub fn tz_from_longitude(lon: f64) -> i32 {
    ((lon / 15.0).round() as i32).clamp(-12, 12) * 60
}

const CSV_COLUMNS: [&str; 7] = ["user_id", "venue_id", "category", "latitude", "longitude", "utc_time", "tz_offset_min"];

/// The same seven fields in the TSMC2014 CSV download, lowercased; its times are as in the raw
/// file (`Tue Apr 03 18:17:18 +0000 2012`).
const TSMC_CSV_COLUMNS: [&str; 7] = ["userid", "venueid", "venuecategory", "latitude", "longitude", "utctimestamp", "timezoneoffset"];

/// Whether the input starts with the TSMC2014 CSV header (looked at without consuming it).
fn looks_like_tsmc_csv(input: &mut Box<dyn BufRead>, path: &Path) -> Result<bool> {
    let head = input.fill_buf().with_context(|| format!("reading {}", path.display()))?;
    let first = String::from_utf8_lossy(&head[..head.len().min(256)]).to_ascii_lowercase();
    Ok(first.trim_start_matches('\u{feff}').starts_with("userid,venueid,"))
}

/// The input of a CSV reader, noting where its lines end, so that a record's 1-based line is
/// exact whatever the line ends and blank lines (the csv crate's own count is one short after a
/// `\r\n`, and its record positions start at the blank lines before a record).
struct LineEnds<R> {
    inner: R,
    lines: std::rc::Rc<std::cell::RefCell<LineLedger>>,
    offset: u64,
}

/// The `\n`s read so far that no record has passed yet (offset, whether the line it ends is
/// blank), and how many lines lie before them.
#[derive(Default)]
struct LineLedger {
    ends: std::collections::VecDeque<(u64, bool)>,
    passed: u64,
    /// Whether the line being read has a byte other than `\r` yet.
    content: bool,
}

impl<R: std::io::Read> std::io::Read for LineEnds<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut l = self.lines.borrow_mut();
        for (i, &b) in buf[..n].iter().enumerate() {
            if b == b'\n' {
                let blank = !l.content;
                l.ends.push_back((self.offset + i as u64, blank));
                l.content = false;
            } else if b != b'\r' {
                l.content = true;
            }
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// A CSV reader that knows its input's line ends.
type LineCsv = csv::Reader<LineEnds<Box<dyn BufRead>>>;

/// How a CSV layout's time column is read.
type TimeParser = fn(&str) -> Result<i64, BadRow>;

/// A CSV reader over `input` and a function giving the 1-based line of a record from its start
/// byte (called with non-decreasing offsets): the lines ended before that byte (or at it: after
/// `\r\n` the csv crate may place a record at the `\n`), then the blank lines it skipped.
fn csv_with_lines(input: Box<dyn BufRead>) -> (LineCsv, impl FnMut(u64) -> u64) {
    let lines = std::rc::Rc::new(std::cell::RefCell::new(LineLedger::default()));
    let rdr = csv::ReaderBuilder::new().has_headers(true).flexible(true).trim(csv::Trim::All).from_reader(LineEnds {
        inner: input,
        lines: lines.clone(),
        offset: 0,
    });
    let line_of = move |byte: u64| {
        let mut l = lines.borrow_mut();
        while l.ends.front().is_some_and(|&(nl, blank)| nl <= byte || blank) {
            l.ends.pop_front();
            l.passed += 1;
        }
        l.passed + 1
    };
    (rdr, line_of)
}

/// Reads the generic CSV layout (or the TSMC2014 download's): columns found by header name (any
/// order, extra columns ignored); `category` and `tz_offset_min` may be absent (then empty and
/// 0), the others are required.
fn read_csv(path: &Path, input: Box<dyn BufRead>, b: &mut Builder<'_>) -> Result<()> {
    let (mut rdr, mut line_of) = csv_with_lines(input);
    let header = rdr.byte_headers().with_context(|| format!("reading the header of {}", path.display()))?.clone();
    if header.is_empty() || header.iter().all(|h| h.is_empty()) {
        bail!("input file {} is empty", path.display());
    }
    let names: Vec<String> = header
        .iter()
        .map(|h| {
            let s = String::from_utf8_lossy(h);
            s.trim_start_matches('\u{feff}').trim().to_ascii_lowercase()
        })
        .collect();
    let col = |name: &str| names.iter().position(|n| n == name);
    // The project's layout, or the TSMC2014 download's (whose times read as the raw file's).
    let tsmc = col("userid").is_some() && col("user_id").is_none();
    let (columns, parse_time): (&[&str; 7], TimeParser) =
        if tsmc { (&TSMC_CSV_COLUMNS, parse_tsmc_time) } else { (&CSV_COLUMNS, parse_iso_time) };
    let idx: Vec<Option<usize>> = columns.iter().map(|c| col(c)).collect();
    let optional = |i: usize| i == 2 || (i == 6 && !tsmc);
    let missing: Vec<&str> = columns.iter().enumerate().filter(|(i, _)| idx[*i].is_none() && !optional(*i)).map(|(_, c)| *c).collect();
    if !missing.is_empty() {
        bail!(
            "{} line 1: the CSV header lacks column{} {} (expected a header with {})",
            path.display(),
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            columns.join(",")
        );
    }
    let need = idx.iter().flatten().max().copied().unwrap_or(0) + 1;
    let mut rec = csv::ByteRecord::new();
    loop {
        let more = rdr.read_byte_record(&mut rec).with_context(|| format!("reading {}", path.display()))?;
        if !more {
            return Ok(());
        }
        let line = line_of(rec.position().map_or(0, |p| p.byte()));
        if rec.iter().all(|f| f.is_empty()) {
            continue;
        }
        let fields: Vec<std::borrow::Cow<'_, str>> = rec.iter().map(String::from_utf8_lossy).collect();
        let parsed = if fields.len() < need {
            Err(bad("field_count", format!("expected {} comma-separated fields, found {}", names.len(), fields.len())))
        } else {
            let get = |k: usize| idx[k].map(|i| fields[i].as_ref());
            parse_csv_row(&get, parse_time)
        };
        b.accept(line, parsed)?;
    }
}

fn parse_csv_row<'a>(get: &dyn Fn(usize) -> Option<&'a str>, parse_time: TimeParser) -> Result<Row<'a>, BadRow> {
    let (lat, lon) = parse_coords(get(3).unwrap_or(""), get(4).unwrap_or(""))?;
    Ok(Row {
        user: nonempty(get(0).unwrap_or(""), "user id")?,
        venue: nonempty(get(1).unwrap_or(""), "venue id")?,
        category: get(2),
        lat,
        lon,
        utc: parse_time(get(5).unwrap_or(""))?,
        tz_offset_min: match get(6) {
            Some(s) => parse_tz(s)?,
            None => 0,
        },
    })
}

/// A `venue_id,category` CSV with that header (extra columns ignored, gzip allowed). Venues
/// missing from the table keep an empty category. Any malformed row is an error with its line.
pub fn read_category_table(path: &Path) -> Result<HashMap<String, String>> {
    let input = open_input(path).context("--categories")?;
    let (mut rdr, mut line_of) = csv_with_lines(input);
    let header = rdr.byte_headers().with_context(|| format!("reading the header of {}", path.display()))?.clone();
    let names: Vec<String> =
        header.iter().map(|h| String::from_utf8_lossy(h).trim_start_matches('\u{feff}').trim().to_ascii_lowercase()).collect();
    let (Some(vi), Some(ci)) = (names.iter().position(|n| n == "venue_id"), names.iter().position(|n| n == "category")) else {
        bail!("{} line 1: a category table needs a header with venue_id,category", path.display());
    };
    let mut map = HashMap::new();
    let mut rec = csv::ByteRecord::new();
    while rdr.read_byte_record(&mut rec).with_context(|| format!("reading {}", path.display()))? {
        let line = line_of(rec.position().map_or(0, |p| p.byte()));
        if rec.iter().all(|f| f.is_empty()) {
            continue;
        }
        let (Some(v), Some(c)) = (rec.get(vi), rec.get(ci)) else {
            bail!("{} line {line}: expected venue_id,category", path.display());
        };
        let v = String::from_utf8_lossy(v).into_owned();
        if v.is_empty() {
            bail!("{} line {line}: empty venue_id", path.display());
        }
        map.entry(v).or_insert_with(|| String::from_utf8_lossy(c).into_owned());
    }
    Ok(map)
}

fn nonempty<'a>(s: &'a str, what: &str) -> Result<&'a str, BadRow> {
    let s = s.trim();
    if s.is_empty() { Err(bad("empty_id", format!("empty {what}"))) } else { Ok(s) }
}

fn parse_coords(lat: &str, lon: &str) -> Result<(f64, f64), BadRow> {
    let p = |s: &str, lim: f64, what: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && x.abs() <= lim)
            .ok_or_else(|| bad("bad_coordinates", format!("bad {what} '{}'", s.trim())))
    };
    Ok((p(lat, 90.0, "latitude")?, p(lon, 180.0, "longitude")?))
}

fn parse_tz(s: &str) -> Result<i32, BadRow> {
    let s = s.trim();
    // Accept "-240" and "-240.0"; the offset must be a whole number of minutes.
    let v = s
        .parse::<i32>()
        .ok()
        .or_else(|| s.parse::<f64>().ok().filter(|x| x.fract() == 0.0 && x.abs() <= f64::from(MAX_TZ_OFFSET_MIN)).map(|x| x as i32));
    match v {
        Some(v) if v.abs() <= MAX_TZ_OFFSET_MIN => Ok(v),
        _ => Err(bad("bad_tz_offset", format!("bad timezone offset '{s}' (whole minutes, |offset| < 24 h)"))),
    }
}

/// `Tue Apr 03 18:00:09 +0000 2012` (the offset is honoured; TSMC2014 always writes +0000).
pub fn parse_tsmc_time_str(s: &str) -> Option<i64> {
    DateTime::parse_from_str(s.trim(), "%a %b %d %H:%M:%S %z %Y").ok().map(|t| t.timestamp())
}

fn parse_tsmc_time(s: &str) -> Result<i64, BadRow> {
    parse_tsmc_time_str(s)
        .ok_or_else(|| bad("bad_time", format!("bad time '{}' (expected like 'Tue Apr 03 18:00:09 +0000 2012')", s.trim())))
}

/// ISO 8601 / RFC 3339 (`2012-04-03T18:00:09Z`, any offset, fractional seconds truncated);
/// a time without an offset (`2012-04-03T18:00:09` or with a space) is taken as UTC.
pub fn parse_iso_time_str(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp());
        }
    }
    None
}

fn parse_iso_time(s: &str) -> Result<i64, BadRow> {
    parse_iso_time_str(s).ok_or_else(|| bad("bad_time", format!("bad time '{}' (expected ISO 8601 like '2012-04-03T18:00:09Z')", s.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    fn write_tmp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn time_parsers() {
        assert_eq!(parse_tsmc_time_str("Tue Apr 03 18:00:09 +0000 2012"), Some(1_333_476_009));
        assert_eq!(parse_iso_time_str("2012-04-03T18:00:09Z"), Some(1_333_476_009));
        assert_eq!(parse_iso_time_str("2012-04-03T14:00:09-04:00"), Some(1_333_476_009));
        assert_eq!(parse_iso_time_str("2012-04-03 18:00:09"), Some(1_333_476_009));
        assert_eq!(parse_iso_time_str("2012-04-03T18:00:09.750Z"), Some(1_333_476_009));
        assert_eq!(parse_iso_time_str("yesterday"), None);
        assert_eq!(parse_tsmc_time_str("2012-04-03T18:00:09Z"), None);
    }

    #[test]
    fn gowalla_timezone_from_longitude() {
        // Austin: -6.52 h rounds to -7 h although its clock says -6/-5: an estimate only.
        assert_eq!(tz_from_longitude(-97.79), -420);
        assert_eq!(tz_from_longitude(-122.4), -480); // San Francisco: -8.16 h -> -8 h
        assert_eq!(tz_from_longitude(139.7), 540); // Tokyo: 9.31 h -> 9 h
        assert_eq!(tz_from_longitude(-7.5), -60); // half away from zero
        assert_eq!(tz_from_longitude(0.0), 0);
        assert_eq!(tz_from_longitude(180.0), 720);
    }

    #[test]
    fn bbox_parse() {
        let b: BBox = "32.5,-124.5,42.0,-114.0".parse().unwrap();
        assert!(b.contains(37.77, -122.42));
        assert!(!b.contains(40.7, -74.0));
        assert!("1,2,3".parse::<BBox>().is_err());
        assert!("3,0,1,1".parse::<BBox>().is_err());
        assert!("a,0,1,1".parse::<BBox>().is_err());
    }

    #[test]
    fn foursquare_fixture_with_non_utf8_row() {
        let d = read(&fixture("tsmc2014_sample.txt"), &ReadOptions::new(Format::Foursquare)).unwrap();
        assert_eq!(d.report.rows_read, 8);
        assert_eq!(d.rows.len(), 7);
        assert_eq!(d.report.skipped["bad_time"].first_lines, vec![6]);
        assert_eq!(d.users, vec!["470", "979", "69"]);
        assert_eq!(d.venues[0].id, "49bbd6c0f964a520f4531fe3");
        assert_eq!(d.venues[0].category, "Arts & Crafts Store");
        assert_eq!(d.rows[0].utc, 1_333_476_009);
        assert_eq!(d.rows[0].tz_offset_min, -240);
        // Row 4 has the byte 0xE9 in its category: decoded lossily, row kept.
        let cafe = d.venues.iter().find(|v| v.id == "4b5b981bf964a520a8f528e3").unwrap();
        assert_eq!(cafe.category, "Caf\u{fffd}");
        assert_eq!(d.rows.iter().filter(|r| r.tz_offset_min == 540).count(), 1);
    }

    #[test]
    fn foursquare_strict_names_the_line() {
        let mut o = ReadOptions::new(Format::Foursquare);
        o.strict = true;
        let err = read(&fixture("tsmc2014_sample.txt"), &o).unwrap_err().to_string();
        assert!(err.contains("line 6"), "{err}");
        assert!(err.contains("bad time"), "{err}");
    }

    #[test]
    fn gowalla_fixture_bbox_categories_and_tz() {
        let mut o = ReadOptions::new(Format::Gowalla);
        let d = read(&fixture("gowalla_sample.txt"), &o).unwrap();
        assert_eq!(d.report.rows_read, 7);
        assert_eq!(d.rows.len(), 6);
        assert_eq!(d.report.skipped["field_count"].first_lines, vec![5]);
        assert_eq!(d.rows[0].utc, 1_287_532_527); // 2010-10-19T23:55:27Z
        assert_eq!(d.rows[0].tz_offset_min, -420); // round(-97.795 / 15) = -7 h
        assert_eq!(d.venues[0].category, "");

        o.bbox = Some("32.5,-124.5,42.0,-114.0".parse().unwrap());
        o.categories = Some(fixture("gowalla_categories.csv"));
        o.tz_offset_min = Some(-480);
        let d = read(&fixture("gowalla_sample.txt"), &o).unwrap();
        assert_eq!(d.rows.len(), 3);
        assert_eq!(d.report.rows_outside_bbox, 3);
        assert!(d.rows.iter().all(|r| r.tz_offset_min == -480));
        let v = d.venues.iter().find(|v| v.id == "1058331").unwrap();
        assert_eq!(v.category, "Coffee Shop");
    }

    #[test]
    fn csv_fixture_plain_and_gzip() {
        let plain = read(&fixture("checkins_sample.csv"), &ReadOptions::new(Format::Csv)).unwrap();
        let gz = read(&fixture("checkins_sample.csv.gz"), &ReadOptions::new(Format::Csv)).unwrap();
        assert_eq!(plain.rows, gz.rows);
        assert_eq!(plain.venues, gz.venues);
        assert_eq!(plain.report.rows_read, 5);
        assert_eq!(plain.rows.len(), 4);
        // The bad row is line 4 (the header is line 1).
        assert_eq!(plain.report.skipped["bad_coordinates"].first_lines, vec![4]);
        assert_eq!(plain.venues[0].category, "Arts & Crafts Store");
        assert_eq!(plain.rows[0].utc, 1_333_476_009);
    }

    /// The same file with `\r\n` line ends reports the same line numbers as with `\n`.
    #[test]
    fn crlf_line_numbers_match_lf() {
        let dir = tempfile::tempdir().unwrap();
        // Line ends as `\n` only, and as `\r\n`.
        let ends = |bytes: &[u8], crlf: bool| -> Vec<u8> {
            let lf: Vec<u8> = bytes.iter().copied().filter(|&b| b != b'\r').collect();
            if !crlf {
                return lf;
            }
            lf.iter().flat_map(|&b| if b == b'\n' { vec![b'\r', b'\n'] } else { vec![b] }).collect()
        };
        for (format, name) in [(Format::Csv, "checkins_sample.csv"), (Format::Foursquare, "tsmc2014_sample.txt")] {
            let bytes = std::fs::read(fixture(name)).unwrap();
            let lf = write_tmp(&dir, name, &ends(&bytes, false));
            let crlf = write_tmp(&dir, &format!("crlf-{name}"), &ends(&bytes, true));
            let (a, b) = (read(&lf, &ReadOptions::new(format)).unwrap(), read(&crlf, &ReadOptions::new(format)).unwrap());
            assert_eq!(a.report, b.report, "{format:?}");
            let mut strict = ReadOptions::new(format);
            strict.strict = true;
            let (ea, eb) = (read(&lf, &strict).unwrap_err().to_string(), read(&crlf, &strict).unwrap_err().to_string());
            let line = |e: &str| e.split(" line ").nth(1).and_then(|r| r.split(':').next()).map(str::to_string);
            assert_eq!(line(&ea), line(&eb), "{ea} / {eb}");
        }
        // Blank lines before a bad row, LF or CRLF: still the file's own line.
        for ends in ["\n", "\r\n"] {
            let text = [
                "user_id,venue_id,category,latitude,longitude,utc_time,tz_offset_min",
                "1,v1,Bar,40.7,-74.0,2012-04-03T18:00:09Z,-240",
                "",
                "",
                "1,v2,Bar,north,-74.0,2012-04-03T18:01:09Z,-240",
                "",
                "1,v3,Bar,north,-74.0,2012-04-03T18:02:09Z,-240",
            ]
            .join(ends);
            let p = write_tmp(&dir, "blank.csv", text.as_bytes());
            assert_eq!(
                read(&p, &ReadOptions::new(Format::Csv)).unwrap().report.skipped["bad_coordinates"].first_lines,
                vec![5, 7],
                "{ends:?}"
            );
        }
        // A bad row on line 7 of a CRLF CSV is reported as line 7.
        let mut text = String::from("user_id,venue_id,category,latitude,longitude,utc_time,tz_offset_min\r\n");
        for i in 0..5 {
            text.push_str(&format!("1,v{i},Bar,40.7,-74.0,2012-04-03T18:0{i}:09Z,-240\r\n"));
        }
        text.push_str("1,v9,Bar,north,-74.0,2012-04-03T18:09:09Z,-240\r\n");
        let p = write_tmp(&dir, "seven.csv", text.as_bytes());
        let mut strict = ReadOptions::new(Format::Csv);
        strict.strict = true;
        let e = read(&p, &strict).unwrap_err().to_string();
        assert!(e.contains("line 7:"), "{e}");
        assert_eq!(read(&p, &ReadOptions::new(Format::Csv)).unwrap().report.skipped["bad_coordinates"].first_lines, vec![7]);
    }

    /// The TSMC2014 CSV download (the real TKY sample when it is at hand, else its first rows
    /// as a fixture) reads with every row kept, as `foursquare` and as `csv`.
    #[test]
    fn tsmc_csv_download_reads_without_skips() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tky-sample/dataset_TSMC2014_TKY.csv");
        let path = if shared.is_file() { shared } else { fixture("tsmc2014_tky_head.csv") };
        for format in [Format::Foursquare, Format::Csv] {
            let d = read(&path, &ReadOptions::new(format)).unwrap();
            assert_eq!(d.report.rows_skipped(), 0, "{:?}", d.report.skipped);
            assert_eq!(d.report.rows_read, d.rows.len() as u64);
            assert!(d.rows.len() >= 10);
            // Tue Apr 03 18:17:18 +0000 2012, Tokyo's +540 minutes, the category by name.
            assert_eq!(d.rows[0].utc, 1_333_477_038);
            assert_eq!(d.rows[0].tz_offset_min, 540);
            assert_eq!(d.venues[0].category, "Cosmetics Shop");
        }
        // The raw tab-separated form still reads as before.
        assert!(read(&fixture("tsmc2014_sample.txt"), &ReadOptions::new(Format::Foursquare)).is_ok());
    }

    /// A file cut off in the middle of its last row: that row is a counted skip.
    #[test]
    fn a_truncated_last_row_is_a_counted_skip() {
        let dir = tempfile::tempdir().unwrap();
        for (format, name) in
            [(Format::Csv, "checkins_sample.csv"), (Format::Foursquare, "tsmc2014_synthetic.txt"), (Format::Gowalla, "gowalla_sample.txt")]
        {
            let bytes = std::fs::read(fixture(name)).unwrap();
            let whole = read(&write_tmp(&dir, name, &bytes), &ReadOptions::new(format)).unwrap();
            let body = bytes.trim_ascii_end();
            let cut = body.iter().rposition(|&b| b == b'\t' || b == b',').unwrap() - 1;
            let part = read(&write_tmp(&dir, &format!("cut-{name}"), &body[..cut]), &ReadOptions::new(format)).unwrap();
            assert_eq!(part.report.rows_read, whole.report.rows_read, "{format:?}");
            assert_eq!(part.report.rows_skipped(), whole.report.rows_skipped() + 1, "{format:?}: {:?}", part.report.skipped);
            assert_eq!(part.rows.len() + 1, whole.rows.len(), "{format:?}");
        }
    }

    #[test]
    fn gzip_detected_by_magic_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"user_id,venue_id,utc_time,latitude,longitude\nu1,v1,2012-04-03T18:00:09Z,1,2\n").unwrap();
        let p = write_tmp(&dir, "looks_plain.csv", &enc.finish().unwrap());
        let d = read(&p, &ReadOptions::new(Format::Csv)).unwrap();
        assert_eq!(d.rows.len(), 1);
        assert_eq!(d.rows[0].tz_offset_min, 0);
        assert_eq!(d.venues[0].category, "");
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write_tmp(&dir, "empty.txt", b"");
        for f in [Format::Foursquare, Format::Gowalla, Format::Csv] {
            let e = read(&empty, &ReadOptions::new(f)).unwrap_err().to_string();
            assert!(e.contains("empty"), "{e}");
        }
        let e = read(&dir.path().join("nope.txt"), &ReadOptions::new(Format::Csv)).unwrap_err();
        assert!(format!("{e:#}").contains("cannot open input file"));
        let header_only = write_tmp(&dir, "h.csv", b"user_id,venue_id,category,latitude,longitude,utc_time,tz_offset_min\n");
        assert!(read(&header_only, &ReadOptions::new(Format::Csv)).unwrap_err().to_string().contains("empty"));
        let no_cols = write_tmp(&dir, "n.csv", b"a,b\n1,2\n");
        let e = read(&no_cols, &ReadOptions::new(Format::Csv)).unwrap_err().to_string();
        assert!(e.contains("lacks columns user_id, venue_id"), "{e}");
        let garbage = write_tmp(&dir, "g.txt", &[0xff, 0xfe, 0x00, b'\n', 0x1f, b'\t', b'\n']);
        let e = read(&garbage, &ReadOptions::new(Format::Foursquare)).unwrap_err().to_string();
        assert!(e.contains("no usable check-ins"), "{e}");
        // A truncated gzip stream is a read error, not a panic.
        let trunc = write_tmp(&dir, "t.gz", &[0x1f, 0x8b, 0x08, 0x00, 0x00]);
        assert!(read(&trunc, &ReadOptions::new(Format::Csv)).is_err());
        let mut o = ReadOptions::new(Format::Csv);
        o.tz_offset_min = Some(60);
        assert!(read(&header_only, &o).unwrap_err().to_string().contains("only to --format gowalla"));
    }

    #[test]
    fn field_parsers() {
        assert!(parse_coords("40.7", "-74.0").is_ok());
        assert_eq!(parse_coords("91", "0").unwrap_err().reason, "bad_coordinates");
        assert_eq!(parse_coords("NaN", "0").unwrap_err().reason, "bad_coordinates");
        assert_eq!(parse_tz("-240").unwrap(), -240);
        assert_eq!(parse_tz("-240.0").unwrap(), -240);
        assert!(parse_tz("99999").is_err());
        assert!(parse_tz("1.5").is_err());
        assert_eq!(nonempty("  ", "user id").unwrap_err().reason, "empty_id");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Arbitrary bytes (biased towards the formats' separators) never panic a reader.
            #[test]
            fn readers_never_panic(
                bytes in prop::collection::vec(
                    prop_oneof![Just(b'\t'), Just(b','), Just(b'\n'), Just(b'"'), Just(b'-'), Just(b'.'), b'0'..=b'9', any::<u8>()],
                    0..400,
                ),
                strict in any::<bool>(),
            ) {
                let dir = tempfile::tempdir().unwrap();
                let p = dir.path().join("in");
                std::fs::write(&p, &bytes).unwrap();
                for f in [Format::Foursquare, Format::Gowalla, Format::Csv] {
                    let mut o = ReadOptions::new(f);
                    o.strict = strict;
                    let _ = read(&p, &o);
                }
            }
        }
    }
}
