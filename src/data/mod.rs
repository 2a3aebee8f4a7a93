//! Preference pairs for training, streamed: Pick-a-Pic v2 parquet shards and JSONL manifests
//! (`{prompt, chosen, rejected, category?, scores?}`, `scores` one pair of numbers or several
//! named ones, [`PairScores`]; [`agree`] measures how often named scorers agree), one record at a
//! time, with a cursor that restarts the stream at the same pair; images decoded and cropped into (3, H, W) pixels in
//! [-1, 1] ([`image`]), categories sampled by weight ([`CategorySampler`]), and a VAE latent
//! cache ([`cache`]).
//!
//! Layers, each an iterator over the one below:
//! `PairStream` (records -> pairs, counts ties / unlabeled rows / missing files)
//! -> optional `CategorySampler` (weighted, seeded, endless)
//! -> `PairLoader` (decode, resize, crop; undecodable pairs skipped and counted).

pub mod agree;
pub mod cache;
pub mod image;
pub mod jsonl;
pub mod pickapic;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;

pub use image::{Crop, DecodedPair, LoaderOptions, PairLoader, Resample};

/// The category name under which pairs without a category are counted and weighted.
pub const NO_CATEGORY: &str = "(none)";

/// Where an image's encoded bytes are.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// Encoded bytes held in memory (a parquet `jpg_0` / `jpg_1` cell).
    Bytes(Arc<[u8]>),
    /// A file (a JSONL manifest's path, resolved against the manifest's folder).
    File(PathBuf),
}

impl ImageSource {
    /// The encoded bytes (a file is read now).
    pub fn read(&self) -> Result<Cow<'_, [u8]>> {
        match self {
            ImageSource::Bytes(b) => Ok(Cow::Borrowed(b)),
            ImageSource::File(p) => std::fs::read(p).map(Cow::Owned).map_err(|e| Error::io(p, e)),
        }
    }

    /// For messages: the file, or the byte count.
    pub fn describe(&self) -> String {
        match self {
            ImageSource::Bytes(b) => format!("{} bytes in memory", b.len()),
            ImageSource::File(p) => p.display().to_string(),
        }
    }
}

/// Scores of the two images (e.g. from a reward model); a manifest writes them as
/// `{"chosen": x, "rejected": y}` or `[x, y]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    pub chosen: f64,
    pub rejected: f64,
}

impl<'de> Deserialize<'de> for Scores {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Map { chosen: f64, rejected: f64 },
            Pair([f64; 2]),
        }
        Ok(match Either::deserialize(d)? {
            Either::Map { chosen, rejected } => Scores { chosen, rejected },
            Either::Pair([chosen, rejected]) => Scores { chosen, rejected },
        })
    }
}

/// A manifest line's `scores`: one pair of scores, or several keyed by scorer name, e.g.
/// `{"count": [0.5, 0.25], "aesthetic": {"chosen": 0.3, "rejected": 0.7}}`.
///
/// An object with a `chosen` or `rejected` key is the single form (other keys ignored, as they
/// always were), so a scorer cannot be named `chosen` or `rejected`.
#[derive(Debug, Clone, PartialEq)]
pub enum PairScores {
    Single(Scores),
    Named(BTreeMap<String, Scores>),
}

impl PairScores {
    /// Reads a `scores` value (`null`: none). The error names the key (`scores` or
    /// `scores.NAME`) and shows the value; callers prefix the file and line.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Option<PairScores>, String> {
        use serde_json::Value;
        let one = |key: &str, v: &Value| {
            Scores::deserialize(v).map_err(|_| {
                format!(
                    "{key}: expected [chosen, rejected] or {{\"chosen\": x, \"rejected\": y}} with numbers, got {v}"
                )
            })
        };
        match v {
            Value::Null => Ok(None),
            Value::Array(_) => one("scores", v).map(|s| Some(PairScores::Single(s))),
            Value::Object(m) if m.contains_key("chosen") || m.contains_key("rejected") => {
                one("scores", v).map(|s| Some(PairScores::Single(s)))
            }
            Value::Object(m) => {
                let mut named = BTreeMap::new();
                for (k, v) in m {
                    named.insert(k.clone(), one(&format!("scores.{k}"), v)?);
                }
                Ok(Some(PairScores::Named(named)))
            }
            _ => Err(format!(
                "scores: expected [chosen, rejected], {{\"chosen\": x, \"rejected\": y}} or {{\"SCORER\": [chosen, rejected], ...}}, got {v}"
            )),
        }
    }

    /// The single form's scores (None for named ones: they keep no single meaning).
    pub fn single(&self) -> Option<Scores> {
        match self {
            PairScores::Single(s) => Some(*s),
            PairScores::Named(_) => None,
        }
    }

    /// The named scores (None for the single form).
    pub fn named(&self) -> Option<&BTreeMap<String, Scores>> {
        match self {
            PairScores::Single(_) => None,
            PairScores::Named(m) => Some(m),
        }
    }
}

/// One preference: `chosen` was preferred to `rejected` for `prompt` (or neither, when `tie`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// The record's place in the source's own order (a parquet row counted over all shards, or
    /// the 0-based line of a manifest); it does not depend on options, so caches key by it.
    pub index: u64,
    pub prompt: String,
    pub chosen: ImageSource,
    pub rejected: ImageSource,
    pub category: Option<String>,
    /// A manifest's single-form scores; None for named ones, which [`agree`] reads from the
    /// manifest ([`jsonl::parse_line`]).
    pub scores: Option<Scores>,
    /// Pick-a-Pic's 0.5 / 0.5 rows (only with `keep_ties`): `chosen` is then image 0.
    pub tie: bool,
    /// Where this pair is: `PairStream::open_at(.., Some(&pair.cursor))` yields it again.
    pub cursor: Cursor,
}

impl PreferencePair {
    /// The category, or [`NO_CATEGORY`].
    pub fn category_name(&self) -> &str {
        self.category.as_deref().unwrap_or(NO_CATEGORY)
    }
}

/// A position in a source, saved with a checkpoint for an exact resume: the next record read
/// after `open_at` is the one at this position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum Cursor {
    /// Row `row` of shard `shard` (0-based, in the sorted shard list); `file` is the shard's
    /// file name, checked on resume so a changed folder is an error, not a silent shift.
    Parquet { shard: usize, file: String, row: u64 },
    /// `line` lines (blank ones included) already read, ending at byte `offset`.
    Jsonl { line: u64, offset: u64 },
}

impl Cursor {
    /// The cursor of a source's first record.
    pub fn start(source: &DataSource) -> Cursor {
        match source {
            DataSource::Parquet { shards } => {
                Cursor::Parquet { shard: 0, file: shards.first().map(|p| file_name(p)).unwrap_or_default(), row: 0 }
            }
            DataSource::Jsonl { .. } => Cursor::Jsonl { line: 0, offset: 0 },
        }
    }
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// What a record is, in Pick-a-Pic's rule order (no label, then tie, then bad label); the
/// image checks (undecodable) come later, in the loader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A pair with a winner.
    Pair,
    /// `label_0 == label_1 == 0.5`: dropped unless `keep_ties`.
    Tie,
    /// `has_label` false or a null label: skipped.
    NoLabel,
    /// Labels other than (1, 0), (0, 1) and (0.5, 0.5): skipped.
    BadLabel,
    /// A manifest line whose chosen or rejected file does not exist: skipped.
    MissingImage,
}

/// Every record of a source, with its verdict; `pair` is set for `Pair` and `Tie`.
#[derive(Debug, Clone)]
pub struct Record {
    pub index: u64,
    pub cursor: Cursor,
    pub verdict: Verdict,
    /// Pick-a-Pic: which column won (0: `jpg_0`, 1: `jpg_1`); None for ties and manifests.
    pub chosen_column: Option<u8>,
    /// The record's category (manifests), whatever its verdict.
    pub category: Option<String>,
    pub pair: Option<PreferencePair>,
}

/// What a stream has read so far (since it was opened: a resumed stream starts at zero).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCounts {
    /// Records read: parquet rows, or non-blank manifest lines.
    pub rows: u64,
    /// Pairs the stream yielded (ties included with `keep_ties`).
    pub pairs: u64,
    /// Tie records seen (yielded with `keep_ties`, dropped otherwise).
    pub ties: u64,
    pub no_label: u64,
    pub bad_label: u64,
    pub missing_image: u64,
    /// Yielded pairs per category ([`NO_CATEGORY`] for none).
    pub per_category: BTreeMap<String, u64>,
}

/// A dataset on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// Pick-a-Pic-style parquet shards, read in this order.
    Parquet { shards: Vec<PathBuf> },
    /// A JSONL manifest; image paths are relative to its folder.
    Jsonl { path: PathBuf },
}

impl DataSource {
    /// A `.jsonl` file is a manifest; a `.parquet` file is one shard; a folder is every
    /// `*.parquet` in it, sorted by name. A folder that mixes splits (`train-*`, `test-*`, ...)
    /// needs `split`, so that test rows never leak into training.
    pub fn detect(path: &Path, split: Option<&str>) -> Result<DataSource> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if path.is_file() {
            return match ext.as_str() {
                "jsonl" | "json" => Ok(DataSource::Jsonl { path: path.to_path_buf() }),
                "parquet" => Ok(DataSource::Parquet { shards: vec![path.to_path_buf()] }),
                _ => Err(Error::File {
                    path: path.to_path_buf(),
                    msg: "not a dataset: expected a .jsonl manifest, a .parquet shard or a folder of shards".into(),
                }),
            };
        }
        if !path.is_dir() {
            return Err(Error::File { path: path.to_path_buf(), msg: "no such file or folder".into() });
        }
        let entries = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
        let mut shards = Vec::new();
        for e in entries {
            let p = e.map_err(|e| Error::io(path, e))?.path();
            if p.is_file() && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("parquet")) {
                shards.push(p);
            }
        }
        shards.sort();
        let split_of = |p: &PathBuf| file_name(p).split(['-', '.']).next().unwrap_or("").to_string();
        if let Some(s) = split {
            shards.retain(|p| split_of(p) == s);
        }
        if shards.is_empty() {
            let hint = match (split, path.join("data").is_dir(), path.join("pairs.jsonl").is_file()) {
                (Some(s), _, _) => format!("no `{s}-*.parquet` shards in this folder"),
                (None, true, _) => "no .parquet files here; Pick-a-Pic keeps its shards in data/".into(),
                (None, _, true) => "no .parquet files here; pass the manifest, e.g. pairs.jsonl".into(),
                _ => "no .parquet files here; pass a folder of shards, shard files or a .jsonl manifest".into(),
            };
            return Err(Error::File { path: path.to_path_buf(), msg: hint });
        }
        let splits: std::collections::BTreeSet<String> = shards.iter().map(split_of).collect();
        if split.is_none() && splits.len() > 1 {
            let list: Vec<&str> = splits.iter().map(|s| s.as_str()).collect();
            return Err(Error::Invalid(format!(
                "{}: shards of several splits ({}); choose one with --split",
                path.display(),
                list.join(", ")
            )));
        }
        Ok(DataSource::Parquet { shards })
    }

    /// For logs: the format and where.
    pub fn describe(&self) -> String {
        match self {
            DataSource::Parquet { shards } => match shards.first().and_then(|p| p.parent()) {
                Some(dir) => format!("parquet, {} shard(s) in {}", shards.len(), dir.display()),
                None => format!("parquet, {} shard(s)", shards.len()),
            },
            DataSource::Jsonl { path } => format!("jsonl manifest {}", path.display()),
        }
    }
}

/// How records become pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamOptions {
    /// Yield Pick-a-Pic's 0.5 / 0.5 ties (with `tie: true`) instead of dropping them.
    pub keep_ties: bool,
}

enum Reader {
    Parquet(pickapic::PickapicReader),
    Jsonl(jsonl::JsonlReader),
}

/// The pairs of a source in order, read lazily (one parquet row group's batch, or one manifest
/// line, at a time). Yields `Err` once on an I/O or format error, then ends.
pub struct PairStream {
    reader: Reader,
    opts: StreamOptions,
    counts: SourceCounts,
    failed: bool,
}

impl PairStream {
    pub fn open(source: &DataSource, opts: &StreamOptions) -> Result<PairStream> {
        PairStream::open_at(source, opts, None)
    }

    /// Opens `source` so that the first record read is the one at `cursor` (None: the start).
    pub fn open_at(source: &DataSource, opts: &StreamOptions, cursor: Option<&Cursor>) -> Result<PairStream> {
        let reader = match (source, cursor) {
            (DataSource::Parquet { shards }, None) => Reader::Parquet(pickapic::PickapicReader::open(shards, 0, 0)?),
            (DataSource::Parquet { shards }, Some(Cursor::Parquet { shard, file, row })) => {
                match shards.get(*shard) {
                    Some(p) if file_name(p) == *file => {}
                    Some(p) => {
                        return Err(Error::Invalid(format!(
                            "data cursor: shard {shard} is {} here but was {file} when the cursor was saved; \
                             resume on the same shards",
                            file_name(p)
                        )))
                    }
                    None if *row == 0 && *shard == shards.len() => {}
                    None => {
                        return Err(Error::Invalid(format!(
                            "data cursor: shard {shard} ({file}) but the source has {} shard(s)",
                            shards.len()
                        )))
                    }
                }
                Reader::Parquet(pickapic::PickapicReader::open(shards, *shard, *row)?)
            }
            (DataSource::Jsonl { path }, None) => Reader::Jsonl(jsonl::JsonlReader::open(path, 0, 0)?),
            (DataSource::Jsonl { path }, Some(Cursor::Jsonl { line, offset })) => {
                Reader::Jsonl(jsonl::JsonlReader::open(path, *line, *offset)?)
            }
            (s, Some(c)) => {
                return Err(Error::Invalid(format!("data cursor {c:?} does not fit the source ({})", s.describe())))
            }
        };
        Ok(PairStream { reader, opts: opts.clone(), counts: SourceCounts::default(), failed: false })
    }

    /// The position of the next record: save it to resume after the last pair taken.
    pub fn cursor(&self) -> Cursor {
        match &self.reader {
            Reader::Parquet(r) => r.cursor(),
            Reader::Jsonl(r) => r.cursor(),
        }
    }

    pub fn counts(&self) -> &SourceCounts {
        &self.counts
    }

    pub fn options(&self) -> &StreamOptions {
        &self.opts
    }

    /// The next record whatever its verdict (counted); the pair iterator filters these.
    pub fn next_record(&mut self) -> Option<Result<Record>> {
        if self.failed {
            return None;
        }
        let rec = match &mut self.reader {
            Reader::Parquet(r) => r.next_record(),
            Reader::Jsonl(r) => r.next_record(),
        };
        match rec {
            Some(Ok(rec)) => {
                self.counts.rows += 1;
                match rec.verdict {
                    Verdict::Pair => {}
                    Verdict::Tie => self.counts.ties += 1,
                    Verdict::NoLabel => self.counts.no_label += 1,
                    Verdict::BadLabel => self.counts.bad_label += 1,
                    Verdict::MissingImage => self.counts.missing_image += 1,
                }
                Some(Ok(rec))
            }
            Some(Err(e)) => {
                self.failed = true;
                Some(Err(e))
            }
            None => None,
        }
    }
}

impl Iterator for PairStream {
    type Item = Result<PreferencePair>;

    fn next(&mut self) -> Option<Result<PreferencePair>> {
        loop {
            let rec = match self.next_record()? {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            };
            let keep = match rec.verdict {
                Verdict::Pair => true,
                Verdict::Tie => self.opts.keep_ties,
                _ => false,
            };
            if let (true, Some(pair)) = (keep, rec.pair) {
                self.counts.pairs += 1;
                *self.counts.per_category.entry(pair.category_name().to_string()).or_insert(0) += 1;
                return Some(Ok(pair));
            }
        }
    }
}

/// Parses `aesthetics=2,composition=1` (names may contain spaces; `(none)` weighs the pairs
/// without a category).
pub fn parse_category_weights(s: &str) -> Result<Vec<(String, f64)>> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, w)) = part.rsplit_once('=') else {
            return Err(Error::Invalid(format!("--category-weights: `{part}` is not NAME=WEIGHT")));
        };
        let name = name.trim().to_string();
        let w: f64 = w.trim().parse().map_err(|_| {
            Error::Invalid(format!("--category-weights: weight `{}` of `{name}` is not a number", w.trim()))
        })?;
        if !w.is_finite() || w < 0.0 {
            return Err(Error::Invalid(format!("--category-weights: weight of `{name}` must be >= 0, got {w}")));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(Error::Invalid(format!("--category-weights: `{name}` appears twice")));
        }
        out.push((name, w));
    }
    if !out.iter().any(|(_, w)| *w > 0.0) {
        return Err(Error::Invalid(format!("--category-weights `{s}`: at least one weight must be > 0")));
    }
    Ok(out)
}

/// Where a [`CategorySampler`] is: saved with a checkpoint, it resumes the same sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    /// Categories drawn so far.
    pub draws: u64,
    pub categories: Vec<CategoryState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryState {
    pub name: String,
    pub weight: f64,
    pub cursor: Cursor,
    /// Completed passes over the source, and pairs found in the current one.
    pub passes: u64,
    pub found: u64,
}

struct CategoryStream {
    state: CategoryState,
    stream: PairStream,
}

/// Draws pairs by category: each draw picks a category with probability proportional to its
/// weight (seeded), then takes that category's next pair in source order, starting a new pass
/// over the source when it runs out. Endless; memory stays one reader per category (each
/// reads the whole source and keeps its own category). Categories with weight 0 are never drawn.
pub struct CategorySampler {
    source: DataSource,
    opts: StreamOptions,
    seed: u64,
    rng: Rng,
    draws: u64,
    cats: Vec<CategoryStream>,
    failed: bool,
}

impl CategorySampler {
    pub fn new(source: &DataSource, opts: &StreamOptions, weights: &[(String, f64)], seed: u64) -> Result<Self> {
        let state = SamplerState {
            seed,
            draws: 0,
            categories: weights
                .iter()
                .filter(|(_, w)| *w > 0.0)
                .map(|(name, weight)| CategoryState {
                    name: name.clone(),
                    weight: *weight,
                    cursor: Cursor::start(source),
                    passes: 0,
                    found: 0,
                })
                .collect(),
        };
        CategorySampler::resume(source, opts, &state)
    }

    /// Continues from a saved [`SamplerState`] (its weights and seed included).
    pub fn resume(source: &DataSource, opts: &StreamOptions, state: &SamplerState) -> Result<Self> {
        if !state.categories.iter().any(|c| c.weight > 0.0 && c.weight.is_finite()) {
            return Err(Error::Invalid("category sampler: no category with a weight > 0".into()));
        }
        let mut cats = Vec::new();
        for c in &state.categories {
            let stream = PairStream::open_at(source, opts, Some(&c.cursor))?;
            cats.push(CategoryStream { state: c.clone(), stream });
        }
        let mut rng = Rng::new(state.seed);
        for _ in 0..state.draws {
            rng.next_u64();
        }
        Ok(CategorySampler {
            source: source.clone(),
            opts: opts.clone(),
            seed: state.seed,
            rng,
            draws: state.draws,
            cats,
            failed: false,
        })
    }

    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            draws: self.draws,
            categories: self
                .cats
                .iter()
                .map(|c| CategoryState { cursor: c.stream.cursor(), ..c.state.clone() })
                .collect(),
        }
    }

    fn pick(&mut self) -> usize {
        let total: f64 = self.cats.iter().map(|c| c.state.weight).sum();
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        self.draws += 1;
        let mut acc = 0.0;
        for (i, c) in self.cats.iter().enumerate() {
            acc += c.state.weight;
            if u < acc {
                return i;
            }
        }
        self.cats.len() - 1
    }

    fn next_of(&mut self, i: usize) -> Result<PreferencePair> {
        loop {
            let c = &mut self.cats[i];
            match c.stream.next() {
                Some(Ok(p)) if p.category_name() == c.state.name => {
                    c.state.found += 1;
                    return Ok(p);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None if c.state.found == 0 => {
                    return Err(Error::Invalid(format!(
                        "--category-weights: category `{}` has no pairs in {}",
                        c.state.name,
                        self.source.describe()
                    )))
                }
                None => {
                    c.stream = PairStream::open(&self.source, &self.opts)?;
                    c.state.passes += 1;
                    c.state.found = 0;
                }
            }
        }
    }
}

impl Iterator for CategorySampler {
    type Item = Result<PreferencePair>;

    fn next(&mut self) -> Option<Result<PreferencePair>> {
        if self.failed || self.cats.is_empty() {
            return None;
        }
        let i = self.pick();
        let r = self.next_of(i);
        self.failed = r.is_err();
        Some(r)
    }
}
