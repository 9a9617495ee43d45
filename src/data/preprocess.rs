//! `[preprocess]`: the settings with which `refine-poi preprocess --config` turns raw
//! check-ins into a dataset directory (the same keys as the command's flags).

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::codebook::CodebookConfig;
use super::protocol::SplitFractions;
use super::readers::{BBox, Format};

/// `[preprocess]`: how `refine-poi preprocess --config` builds the dataset in `data.dir` from
/// raw check-ins (the keys of `preprocess`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessConfig {
    /// `foursquare` (TSMC2014 raw), `gowalla` (SNAP) or `csv`.
    pub format: Format,
    /// The raw check-in file (gzip is detected).
    pub input: PathBuf,
    /// k-core: minimum check-ins per user and per POI.
    pub min_user: usize,
    pub min_poi: usize,
    /// A gap longer than this many hours starts a new trajectory.
    pub gap_hours: f64,
    /// Train and validation fractions of the sorted check-in times, `"0.8,0.1"`.
    pub split: String,
    /// Keep only check-ins inside `"min_lat,min_lon,max_lat,max_lon"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox: Option<String>,
    /// Gowalla: a `venue_id,category` CSV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub categories: Option<PathBuf>,
    /// Gowalla: the local offset in minutes of every check-in (default: from the longitude).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz_offset_min: Option<i32>,
    /// Fail on the first bad row instead of skipping and counting it.
    pub strict: bool,
    /// `[preprocess.codebook]`: the semantic POI ids written beside the dataset.
    #[serde(default)]
    pub codebook: CodebookConfig,
}

impl PreprocessConfig {
    pub fn split_fractions(&self) -> Result<SplitFractions> {
        self.split.parse().map_err(|e| anyhow::anyhow!("preprocess.split: {e}"))
    }

    pub fn bbox(&self) -> Result<Option<BBox>> {
        self.bbox.as_deref().map(|b| b.parse().map_err(|e| anyhow::anyhow!("preprocess.bbox: {e}"))).transpose()
    }
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            format: Format::Csv,
            input: PathBuf::from("data/nyc/checkins.csv.gz"),
            min_user: 10,
            min_poi: 10,
            gap_hours: 24.0,
            split: "0.8,0.1".to_string(),
            bbox: None,
            categories: None,
            tz_offset_min: None,
            strict: false,
            codebook: CodebookConfig::default(),
        }
    }
}
