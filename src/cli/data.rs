//! `vipo data ...`: look at preference data before training on it (`stats`), measure how often
//! several scorers agree with a manifest's labels and keep those pairs (`agree`), and encode it
//! once with the VAE (`cache-latents`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::data::agree::{self, DEFAULT_TIE_TOL};
use crate::data::cache::{self, BuildOptions};
use crate::data::image::{decode_source, Resample};
use crate::data::{DataSource, PairStream, StreamOptions, Verdict};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::models::autoencoder_kl::AutoencoderKL;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Count rows, usable pairs, ties, unlabeled rows, undecodable images, categories and
    /// image sizes of a Pick-a-Pic parquet folder or a JSONL manifest (decodes every image).
    Stats(StatsArgs),
    /// Encode every usable pair's images once with a VAE into a latent cache for training.
    CacheLatents(CacheArgs),
    /// How often a JSONL manifest's named scorers (`"scores": {"NAME": [chosen, rejected], ...}`)
    /// all agree with its labels; --out keeps the pairs on which they do.
    Agree(AgreeArgs),
}

/// Which data, and how records become pairs.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// A folder of Pick-a-Pic parquet shards, one .parquet shard, or a .jsonl manifest.
    pub path: PathBuf,
    /// In a folder of several splits, the shards whose names start with `SPLIT-` (e.g. train).
    #[arg(long)]
    pub split: Option<String>,
    /// Keep Pick-a-Pic's 0.5 / 0.5 ties as pairs (image 0 as `chosen`) instead of dropping them.
    #[arg(long)]
    pub keep_ties: bool,
}

impl SourceArgs {
    pub fn open(&self) -> Result<(DataSource, StreamOptions)> {
        let source = DataSource::detect(&self.path, self.split.as_deref())?;
        Ok((source, StreamOptions { keep_ties: self.keep_ties }))
    }
}

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub limit: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct AgreeArgs {
    /// A .jsonl manifest whose pairs carry several named scores.
    pub path: PathBuf,
    /// Write the agreed pairs to this new manifest (image paths rewritten to resolve from it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Score differences within this are ties (the scorer abstains).
    #[arg(long, default_value_t = DEFAULT_TIE_TOL)]
    pub tie_tol: f64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// The VAE: a diffusers `vae/` folder (config.json + weights).
    #[arg(long)]
    pub vae: PathBuf,
    /// Weights variant, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`.
    #[arg(long)]
    pub variant: Option<String>,
    /// Training size in pixels: shorter side resized to it, then a center crop (multiple of 8).
    #[arg(long)]
    pub size: usize,
    /// Resize filter: bilinear (torchvision's default) or lanczos.
    #[arg(long, default_value = "bilinear")]
    pub resample: Resample,
    /// Output folder (safetensors shards + manifest.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Pairs per VAE batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Pairs per shard file.
    #[arg(long, default_value_t = 256)]
    pub shard_pairs: usize,
    /// Replace a cache already in --out.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &Args, device_arg: &str) -> Result<()> {
    match &args.command {
        DataCommand::Stats(a) => {
            let s = stats(&a.source, a.limit)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s).map_err(|e| Error::Invalid(e.to_string()))?);
            } else {
                print!("{}", s.to_text());
            }
            Ok(())
        }
        DataCommand::CacheLatents(a) => cache_latents(a, device_arg),
        DataCommand::Agree(a) => {
            let r = match &a.out {
                Some(out) => agree::filter_agreed(&a.path, out, a.tie_tol)?,
                None => agree::agreement(&a.path, a.tie_tol)?,
            };
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r).map_err(|e| Error::Invalid(e.to_string()))?);
            } else {
                print!("{}", r.to_text());
            }
            Ok(())
        }
    }
}

/// Image sizes seen by `stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SizeStats {
    pub images: u64,
    pub min_width: usize,
    pub max_width: usize,
    pub min_height: usize,
    pub max_height: usize,
    /// (width, height, images): the most frequent size, the smallest of equally frequent ones.
    pub most_common: Option<(usize, usize, u64)>,
}

/// What `vipo data stats` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub source: String,
    /// Records read: parquet rows, or non-blank manifest lines.
    pub rows: u64,
    /// Pairs a training run gets (labeled, both images decodable; ties only with --keep-ties).
    pub usable_pairs: u64,
    pub ties: u64,
    pub ties_kept: bool,
    pub no_label: u64,
    pub bad_label: u64,
    pub missing_image: u64,
    pub undecodable_pairs: u64,
    pub undecodable_images: u64,
    /// Pick-a-Pic: usable pairs whose winner is `jpg_0` / `jpg_1`.
    pub chosen_image_0: u64,
    pub chosen_image_1: u64,
    /// Usable pairs per category (`(none)` for pairs without one).
    pub per_category: BTreeMap<String, u64>,
    /// Records per category, whatever their verdict.
    pub per_category_rows: BTreeMap<String, u64>,
    /// Sizes of every image that decoded.
    pub sizes: SizeStats,
    pub seconds: f64,
}

impl Stats {
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let mut line = |s: String| {
            t.push_str(&s);
            t.push('\n');
        };
        line(format!("source: {}", self.source));
        line(format!("rows: {}", self.rows));
        line(format!("usable pairs: {}", self.usable_pairs));
        line(format!(
            "ties: {} ({})",
            self.ties,
            if self.ties_kept { "kept as pairs" } else { "dropped; --keep-ties keeps them" }
        ));
        line(format!("rows without a label: {}", self.no_label));
        if self.bad_label > 0 {
            line(format!("rows with other labels (skipped): {}", self.bad_label));
        }
        line(format!("missing image files: {}", self.missing_image));
        line(format!("undecodable images: {} (in {} skipped pairs)", self.undecodable_images, self.undecodable_pairs));
        if self.chosen_image_0 + self.chosen_image_1 > 0 {
            line(format!("winner: image 0 in {}, image 1 in {}", self.chosen_image_0, self.chosen_image_1));
        }
        line("usable pairs per category:".into());
        for (k, v) in &self.per_category {
            line(format!("  {k}: {v}"));
        }
        let s = &self.sizes;
        match s.most_common {
            Some((w, h, n)) => line(format!(
                "image sizes: {} images, width {}..{}, height {}..{}, most common {w}x{h} ({n} images)",
                s.images, s.min_width, s.max_width, s.min_height, s.max_height
            )),
            None => line("image sizes: no image decoded".into()),
        }
        let rate =
            if self.seconds > 0.0 { (self.usable_pairs + self.undecodable_pairs) as f64 / self.seconds } else { 0.0 };
        line(format!("decoded in {:.2} s ({rate:.0} pairs/s)", self.seconds));
        t
    }
}

/// Reads every record of the source and decodes every image of the pairs a run would get.
pub fn stats(src: &SourceArgs, limit: Option<u64>) -> Result<Stats> {
    let (source, opts) = src.open()?;
    let t0 = Instant::now();
    let mut stream = PairStream::open(&source, &opts)?;
    let mut st = Stats { source: source.describe(), ties_kept: opts.keep_ties, ..Stats::default() };
    let mut sizes: BTreeMap<(usize, usize), u64> = BTreeMap::new();
    let limit = limit.unwrap_or(u64::MAX);
    let mut read = 0u64;
    loop {
        // Decode in parallel batches; records are read in order.
        let mut batch = Vec::new();
        while batch.len() < 64 && read < limit {
            let Some(rec) = stream.next_record() else { break };
            let rec = rec?;
            read += 1;
            let cat = rec.category.as_deref().unwrap_or(crate::data::NO_CATEGORY);
            *st.per_category_rows.entry(cat.to_string()).or_insert(0) += 1;
            let keep = rec.verdict == Verdict::Pair || (rec.verdict == Verdict::Tie && opts.keep_ties);
            if let (true, Some(p)) = (keep, rec.pair) {
                batch.push((p, rec.chosen_column));
            }
        }
        if batch.is_empty() {
            break;
        }
        let decoded: Vec<_> = batch
            .into_par_iter()
            .map(|(p, col)| {
                let dims = |r: Result<crate::image_io::RgbImage>| r.ok().map(|i| (i.width, i.height));
                (dims(decode_source(&p.chosen)), dims(decode_source(&p.rejected)), p, col)
            })
            .collect();
        for (c, r, p, col) in decoded {
            for wh in [c, r].into_iter().flatten() {
                *sizes.entry(wh).or_insert(0) += 1;
            }
            if c.is_none() || r.is_none() {
                st.undecodable_pairs += 1;
                st.undecodable_images += c.is_none() as u64 + r.is_none() as u64;
                continue;
            }
            st.usable_pairs += 1;
            *st.per_category.entry(p.category_name().to_string()).or_insert(0) += 1;
            match col {
                Some(0) => st.chosen_image_0 += 1,
                Some(1) => st.chosen_image_1 += 1,
                _ => {}
            }
        }
    }
    let c = stream.counts();
    st.rows = c.rows;
    st.ties = c.ties;
    st.no_label = c.no_label;
    st.bad_label = c.bad_label;
    st.missing_image = c.missing_image;
    st.sizes = SizeStats {
        images: sizes.values().sum(),
        min_width: sizes.keys().map(|k| k.0).min().unwrap_or(0),
        max_width: sizes.keys().map(|k| k.0).max().unwrap_or(0),
        min_height: sizes.keys().map(|k| k.1).min().unwrap_or(0),
        max_height: sizes.keys().map(|k| k.1).max().unwrap_or(0),
        // Ascending keys and a strict `>` keep the smallest size among equally frequent ones.
        most_common: sizes.iter().fold(None, |best: Option<(usize, usize, u64)>, (&(w, h), &n)| match best {
            Some((_, _, m)) if m >= n => best,
            _ => Some((w, h, n)),
        }),
    };
    st.seconds = t0.elapsed().as_secs_f64();
    Ok(st)
}

fn cache_latents(a: &CacheArgs, device_arg: &str) -> Result<()> {
    let sel = Device::from_arg(Some(device_arg))?;
    eprintln!("device: {}", sel.reason);
    let (source, opts) = a.source.open()?;
    let vae = AutoencoderKL::from_dir(&a.vae, &sel.device, a.variant.as_deref())?;
    vae.store().freeze_all();
    let bopts = BuildOptions {
        size: a.size,
        resample: a.resample,
        variant: a.variant.clone(),
        batch: a.batch,
        shard_pairs: a.shard_pairs,
        overwrite: a.overwrite,
    };
    let stream = PairStream::open(&source, &opts)?;
    let t0 = Instant::now();
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} pairs encoded ({per_sec}) {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let m = cache::build(stream, &source, &vae, &a.vae, &a.out, &bopts, &mut |n| pb.set_position(n))?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "cached {} pairs ({} shards, latents {:?}) in {:.1}s ({:.1} pairs/s) into {}; skipped: {} ties, {} unlabeled, {} missing, {} undecodable",
        m.pairs,
        m.shards.len(),
        m.latent_shape,
        secs,
        m.pairs as f64 / secs.max(1e-9),
        a.out.display(),
        if m.keep_ties { 0 } else { m.source_counts.ties },
        m.source_counts.no_label,
        m.source_counts.missing_image,
        m.undecodable_pairs
    );
    Ok(())
}
