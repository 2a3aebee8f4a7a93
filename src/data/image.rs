//! Training images: decode (JPEG, PNG) to 8-bit RGB, resize the shorter side to the training
//! size, crop a square, optionally flip, and scale to [-1, 1], as diffusers' DPO script does
//! with torchvision on PIL images: `Resize(size, BILINEAR)` (torchvision's default
//! interpolation), `CenterCrop` or `RandomCrop`, `RandomHorizontalFlip`, `ToTensor`,
//! `Normalize([0.5], [0.5])`.
//!
//! The resize is PIL's: a separable filter whose support widens with the downscale factor
//! (antialiased; triangle for bilinear, 3-lobe sinc for Lanczos), horizontal pass then vertical,
//! each rounded to 8 bits as PIL does, so values land within one 8-bit step of PIL's. Only the
//! crop window is computed.

use std::panic::{catch_unwind, AssertUnwindSafe};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ImageSource, PreferencePair};
use crate::error::{Error, Result};
use crate::image_io::RgbImage;
use crate::rng::Rng;

/// Decodes JPEG or PNG bytes (format from the magic bytes) to RGB: grey is replicated, alpha
/// dropped, 16-bit scaled to 8 (PIL's `.convert("RGB")`). A decoder panic on hostile bytes is
/// caught and reported as an error.
pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::Invalid("undecodable image: no bytes".into()));
    }
    let decoded = catch_unwind(AssertUnwindSafe(|| image::load_from_memory(bytes)))
        .map_err(|_| Error::Invalid("undecodable image: the decoder panicked".into()))?
        .map_err(|e| Error::Invalid(format!("undecodable image: {e}")))?;
    let rgb = decoded.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::Invalid(format!("undecodable image: {w}x{h} pixels")));
    }
    Ok(RgbImage { width: w, height: h, data: rgb.into_raw() })
}

/// Reads and decodes an image; the error names the file when there is one.
pub fn decode_source(src: &ImageSource) -> Result<RgbImage> {
    let bytes = src.read()?;
    decode(&bytes).map_err(|e| match src {
        ImageSource::File(p) => Error::File { path: p.clone(), msg: e.to_string() },
        ImageSource::Bytes(_) => e,
    })
}

/// The resize filter. `Bilinear` is torchvision's `Resize` default (and diffusers' DPO script's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    #[default]
    Bilinear,
    Lanczos,
}

impl Resample {
    fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Lanczos => 3.0,
        }
    }

    /// PIL's `bilinear_filter` and `lanczos_filter`.
    fn eval(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Resample::Bilinear => (1.0 - x.abs()).max(0.0),
            Resample::Lanczos if (-3.0..3.0).contains(&x) => sinc(x) * sinc(x / 3.0),
            Resample::Lanczos => 0.0,
        }
    }
}

impl std::str::FromStr for Resample {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bilinear" => Ok(Resample::Bilinear),
            "lanczos" => Ok(Resample::Lanczos),
            _ => Err(format!("unknown resample filter `{s}` (bilinear or lanczos)")),
        }
    }
}

/// Which square to keep after the resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Crop {
    /// torchvision's `CenterCrop`: offsets `round((len - size) / 2)`, ties to even.
    #[default]
    Center,
    /// torchvision's `RandomCrop`: offsets uniform in `0..=len - size`, from the seeded rng.
    Random,
}

/// The resized size (w, h) with the shorter side `size`: torchvision's
/// `int(size * long / short)` for the other side.
pub fn resized_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    if w <= h {
        (size, size * h / w)
    } else {
        (size * w / h, size)
    }
}

/// Python's `round` (half to even) of `n / 2`.
fn half_round_even(n: usize) -> usize {
    let q = n / 2;
    if n % 2 == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

/// Per-output-pixel filter taps (PIL's `precompute_coeffs`) for outputs `first..first + n` of
/// a resize from `in_size` to `out_size`.
struct Taps {
    /// First input pixel and tap count of each output pixel (always inside the input).
    start: Vec<usize>,
    len: Vec<usize>,
    /// `n * kmax` weights, the first `len[o]` of each row used.
    w: Vec<f32>,
    kmax: usize,
}

impl Taps {
    fn of(&self, o: usize) -> (usize, &[f32]) {
        (self.start[o], &self.w[o * self.kmax..o * self.kmax + self.len[o]])
    }
}

fn taps(in_size: usize, out_size: usize, first: usize, n: usize, filter: Resample) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let kmax = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(n);
    let mut lens = Vec::with_capacity(n);
    let mut w = vec![0f32; n * kmax];
    let mut k = vec![0f64; kmax];
    for (o, xx) in (first..first + n).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero, then the range is clamped.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let len = xmax.saturating_sub(xmin).min(kmax);
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(len) {
            *kx = filter.eval((x as f64 + xmin as f64 - center + 0.5) / filterscale);
            total += *kx;
        }
        for x in 0..len {
            w[o * kmax + x] = if total != 0.0 { (k[x] / total) as f32 } else { 0.0 };
        }
        start.push(xmin);
        lens.push(len);
    }
    Taps { start, len: lens, w, kmax }
}

/// An 8-bit value from a filtered one, as PIL's `clip8` (round half up, clamp).
fn clip8(v: f32) -> f32 {
    (v + 0.5).floor().clamp(0.0, 255.0)
}

/// Resizes `img` so its shorter side is `size`, keeps the `size` x `size` square at
/// (`top`, `left`) of the resized image, mirrors it when `flip`, and returns (3, size, size)
/// values in [-1, 1].
pub fn resize_crop(img: &RgbImage, size: usize, resample: Resample, top: usize, left: usize, flip: bool) -> Vec<f32> {
    let (w, h) = (img.width, img.height);
    let (nw, nh) = resized_size(w, h, size);
    let tx = taps(w, nw, left, size, resample);
    let ty = taps(h, nh, top, size, resample);
    // Input rows the vertical pass reads.
    let y0 = ty.start.iter().copied().min().unwrap_or(0);
    let y1 = (0..size).map(|i| ty.start[i] + ty.len[i]).max().unwrap_or(0);
    // Horizontal pass: (y1 - y0, size, 3), rounded to 8 bits like PIL's intermediate image.
    let mut tmp = vec![0f32; (y1 - y0) * size * 3];
    tmp.par_chunks_mut(size * 3).enumerate().for_each(|(r, out)| {
        let src = &img.data[(y0 + r) * w * 3..(y0 + r + 1) * w * 3];
        for (j, o) in out.chunks_exact_mut(3).enumerate() {
            let (s, ws) = tx.of(j);
            let mut acc = [0f32; 3];
            for (&wk, p) in ws.iter().zip(src[s * 3..(s + ws.len()) * 3].chunks_exact(3)) {
                acc[0] += wk * p[0] as f32;
                acc[1] += wk * p[1] as f32;
                acc[2] += wk * p[2] as f32;
            }
            o[0] = clip8(acc[0]);
            o[1] = clip8(acc[1]);
            o[2] = clip8(acc[2]);
        }
    });
    // Vertical pass straight into (3, size, size), normalized as ToTensor + Normalize(0.5, 0.5).
    let mut out = vec![0f32; 3 * size * size];
    let plane = size * size;
    let (r_plane, rest) = out.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    r_plane
        .par_chunks_mut(size)
        .zip(g_plane.par_chunks_mut(size))
        .zip(b_plane.par_chunks_mut(size))
        .enumerate()
        .for_each(|(i, ((ro, go), bo))| {
            let (s, ws) = ty.of(i);
            // Row-wise accumulation: each tap adds one whole intermediate row (contiguous).
            let mut acc = vec![0f32; size * 3];
            for (k, &wk) in ws.iter().enumerate() {
                let row = &tmp[(s + k - y0) * size * 3..(s + k - y0 + 1) * size * 3];
                for (a, &t) in acc.iter_mut().zip(row) {
                    *a += wk * t;
                }
            }
            for (j, a) in acc.chunks_exact(3).enumerate() {
                let jj = if flip { size - 1 - j } else { j };
                ro[jj] = (clip8(a[0]) / 255.0 - 0.5) / 0.5;
                go[jj] = (clip8(a[1]) / 255.0 - 0.5) / 0.5;
                bo[jj] = (clip8(a[2]) / 255.0 - 0.5) / 0.5;
            }
        });
    out
}

/// How the loader turns images into pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderOptions {
    /// Output side in pixels (square crops).
    pub size: usize,
    pub resample: Resample,
    pub crop: Crop,
    /// Mirror each image with probability 1/2 (torchvision's `RandomHorizontalFlip`).
    pub flip: bool,
    /// Seeds the random crops and flips; draw `d`'s choices depend only on (seed, d, side).
    pub seed: u64,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions { size: 512, resample: Resample::Bilinear, crop: Crop::Center, flip: false, seed: 0 }
    }
}

/// SplitMix64's finaliser: independent streams from (seed, draw, side).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One image through the options; `draw` and `side` (0 chosen, 1 rejected) pick its random
/// crop and flip. Returns (3, size, size) in [-1, 1].
pub fn preprocess(img: &RgbImage, opts: &LoaderOptions, draw: u64, side: u64) -> Vec<f32> {
    let (nw, nh) = resized_size(img.width, img.height, opts.size);
    let mut rng = Rng::new(mix(opts.seed ^ mix(draw.wrapping_mul(2).wrapping_add(side) ^ 0x5EED)));
    let (top, left) = match opts.crop {
        Crop::Center => (half_round_even(nh - opts.size), half_round_even(nw - opts.size)),
        Crop::Random => {
            let top = rng.below(nh - opts.size + 1);
            (top, rng.below(nw - opts.size + 1))
        }
    };
    let flip = opts.flip && rng.uniform() < 0.5;
    resize_crop(img, opts.size, opts.resample, top, left, flip)
}

/// A pair with both images as (3, size, size) pixels in [-1, 1].
#[derive(Debug, Clone)]
pub struct DecodedPair {
    pub pair: PreferencePair,
    /// (3, size, size)
    pub chosen: Vec<f32>,
    /// (3, size, size)
    pub rejected: Vec<f32>,
    /// The decoded images' (width, height) before resizing.
    pub chosen_wh: (usize, usize),
    pub rejected_wh: (usize, usize),
}

/// What the loader has decoded and skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderCounts {
    pub pairs: u64,
    /// Pairs skipped because an image did not decode, and the images that did not.
    pub undecodable_pairs: u64,
    pub undecodable_images: u64,
    /// The latest decode error, for logs.
    pub last_error: Option<String>,
}

/// Decodes the pairs of `source` (a [`super::PairStream`] or [`super::CategorySampler`]) into
/// pixels; pairs with an undecodable image are skipped and counted, never an error. To resume
/// exactly, save the source's cursor (or state) and [`PairLoader::draws`] together.
pub struct PairLoader<I> {
    source: I,
    opts: LoaderOptions,
    draws: u64,
    counts: LoaderCounts,
}

impl<I: Iterator<Item = Result<PreferencePair>>> PairLoader<I> {
    pub fn new(source: I, opts: LoaderOptions) -> Result<PairLoader<I>> {
        if opts.size == 0 {
            return Err(Error::Invalid("image size must be at least 1 pixel".into()));
        }
        Ok(PairLoader { source, opts, draws: 0, counts: LoaderCounts::default() })
    }

    /// Continues the random crops and flips of a saved run that had made `draws` draws.
    pub fn with_draws(mut self, draws: u64) -> Self {
        self.draws = draws;
        self
    }

    /// Pairs taken from the source so far (decodable or not).
    pub fn draws(&self) -> u64 {
        self.draws
    }

    pub fn counts(&self) -> &LoaderCounts {
        &self.counts
    }

    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }

    pub fn source(&self) -> &I {
        &self.source
    }

    pub fn source_mut(&mut self) -> &mut I {
        &mut self.source
    }

    fn decode_pair(
        opts: &LoaderOptions,
        draw: u64,
        pair: PreferencePair,
    ) -> (std::result::Result<DecodedPair, String>, u64) {
        let c = decode_source(&pair.chosen);
        let r = decode_source(&pair.rejected);
        match (c, r) {
            (Ok(c), Ok(r)) => {
                let chosen = preprocess(&c, opts, draw, 0);
                let rejected = preprocess(&r, opts, draw, 1);
                let (chosen_wh, rejected_wh) = ((c.width, c.height), (r.width, r.height));
                (Ok(DecodedPair { pair, chosen, rejected, chosen_wh, rejected_wh }), 0)
            }
            (c, r) => {
                let bad = c.is_err() as u64 + r.is_err() as u64;
                let e = c.err().or(r.err()).map(|e| e.to_string()).unwrap_or_default();
                (Err(format!("pair {} ({:?}): {e}", pair.index, pair.prompt)), bad)
            }
        }
    }

    /// Up to `n` decoded pairs (fewer only when the source ends), decoded in parallel; takes
    /// from the source exactly the pairs it returns or skips, so the source's cursor stays exact.
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<DecodedPair>> {
        let mut out = Vec::with_capacity(n);
        let mut ended = false;
        while out.len() < n && !ended {
            let mut todo = Vec::with_capacity(n - out.len());
            while todo.len() < n - out.len() {
                match self.source.next() {
                    Some(p) => {
                        todo.push((self.draws, p?));
                        self.draws += 1;
                    }
                    None => {
                        ended = true;
                        break;
                    }
                }
            }
            let opts = self.opts;
            let results: Vec<_> = todo.into_par_iter().map(|(d, p)| Self::decode_pair(&opts, d, p)).collect();
            for (r, bad) in results {
                match r {
                    Ok(p) => {
                        self.counts.pairs += 1;
                        out.push(p);
                    }
                    Err(e) => {
                        self.counts.undecodable_pairs += 1;
                        self.counts.undecodable_images += bad;
                        self.counts.last_error = Some(e);
                    }
                }
            }
        }
        Ok(out)
    }
}

impl<I: Iterator<Item = Result<PreferencePair>>> Iterator for PairLoader<I> {
    type Item = Result<DecodedPair>;

    fn next(&mut self) -> Option<Result<DecodedPair>> {
        match self.next_batch(1) {
            Ok(mut v) => v.pop().map(Ok),
            Err(e) => Some(Err(e)),
        }
    }
}

/// Stacks pairs as diffusers' DPO batch: (2B, 3, S, S), all chosen images first, then all
/// rejected ones (`cat(w, l)`).
pub fn stack_pairs(pairs: &[DecodedPair], device: &crate::Device) -> Result<crate::Tensor> {
    let Some(first) = pairs.first() else {
        return Err(Error::Invalid("stack_pairs: no pairs".into()));
    };
    let n = first.chosen.len();
    let size = ((n / 3) as f64).sqrt().round() as usize;
    let mut data = Vec::with_capacity(2 * pairs.len() * n);
    for p in pairs {
        if p.chosen.len() != n || p.rejected.len() != n {
            return Err(Error::shape("stack_pairs", "pairs of different image sizes"));
        }
        data.extend_from_slice(&p.chosen);
    }
    for p in pairs {
        data.extend_from_slice(&p.rejected);
    }
    crate::Tensor::from_vec(data, &[2 * pairs.len(), 3, size, size], device)
}
