//! Preference sets made from the base model's own samples, in the trainer's JSONL format,
//! in three regimes: *clean* (the four task scorers agree on the winner: none prefers the
//! rejected image, at least one the chosen, by at least a minimum gap), *noisy* (each pair
//! labelled by one scorer drawn at random, the contrarian included, so labels conflict as in
//! Pick-a-Pic) and *trivial* (a rendered ground truth against a badly corrupted sample).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::render::render;
use super::score::{score, Scores, SCORERS, TASK_SCORERS};
use super::{Prompt, SIZE};
use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::image_io::{images_from_decoded, write_png, RgbImage};
use crate::pipelines::stable_diffusion::{denoise, StableDiffusion};
use crate::rng::Rng;
use crate::schedulers::{NoiseScheduler, Scheduler};
use crate::tensor::Tensor;

/// Which preference regime (`--regime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Regime {
    Clean,
    Noisy,
    Trivial,
}

impl Regime {
    pub fn name(self) -> &'static str {
        match self {
            Regime::Clean => "clean",
            Regime::Noisy => "noisy",
            Regime::Trivial => "trivial",
        }
    }
}

/// How the world's images are sampled.
#[derive(Debug, Clone, Copy)]
pub struct SampleSettings {
    pub steps: usize,
    pub guidance: f32,
    /// Images per denoising batch.
    pub batch: usize,
}

impl Default for SampleSettings {
    fn default() -> Self {
        SampleSettings { steps: 10, guidance: 3.0, batch: 48 }
    }
}

/// Samples one image per (prompt, seed) with DDIM (eta 0: no noise after the start) and
/// classifier-free guidance, batching different prompts together. Each image's start noise
/// depends only on its seed, so a job gives the same image whatever else is in its batch, up to
/// float rounding (CPU kernels split batches differently: at most one level per channel).
pub fn sample_images(
    sd: &StableDiffusion,
    jobs: &[(Prompt, u64)],
    settings: &SampleSettings,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<RgbImage>> {
    let _g = no_grad();
    let dev = sd.device.clone();
    let channels = sd.unet.config.in_channels;
    let f = sd.vae_scale_factor();
    let (h, w) = (SIZE / f, SIZE / f);
    let (uncond_ids, _) = sd.tokenize("")?;
    let uncond = sd.encode_ids(&uncond_ids)?; // (1, L, C)
    let mut cache: BTreeMap<Prompt, Tensor> = BTreeMap::new();
    let mut out = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(settings.batch.max(1)) {
        let b = chunk.len();
        let mut conds = Vec::with_capacity(b);
        let mut inits = Vec::with_capacity(b);
        for (p, seed) in chunk {
            if !cache.contains_key(p) {
                let (ids, _) = sd.tokenize(&p.text())?;
                cache.insert(*p, sd.encode_ids(&ids)?);
            }
            conds.push(cache[p].clone());
            inits.push(Tensor::randn(&[1, channels, h, w], *seed, &dev)?);
        }
        let mut ctx: Vec<&Tensor> = std::iter::repeat_n(&uncond, b).collect();
        ctx.extend(conds.iter());
        let context = Tensor::concat(&ctx, 0)?; // (2B, L, C): unconditional first
        let init = Tensor::concat(&inits.iter().collect::<Vec<_>>(), 0)?; // (B, C, h, w)
        let mut sched = Scheduler::from_name("ddim", &sd.scheduler_config)?;
        sched.set_timesteps(settings.steps)?;
        let mut rng = Rng::new(chunk[0].1);
        let (latents, _) =
            denoise(&sd.unet, &mut sched, &context, &init, settings.guidance, &mut rng, false, &mut |_, _| {})?;
        out.extend(images_from_decoded(&sd.decode_latents(&latents)?)?);
        progress(out.len());
    }
    Ok(out)
}

/// A base-model sample with its scores.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub prompt: Prompt,
    pub seed: u64,
    pub image: RgbImage,
    pub scores: Scores,
}

/// `per_prompt` samples of every prompt, seeds derived from `seed`, scored.
pub fn candidates(
    sd: &StableDiffusion,
    prompts: &[Prompt],
    per_prompt: usize,
    seed: u64,
    settings: &SampleSettings,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Candidate>> {
    let jobs: Vec<(Prompt, u64)> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| (0..per_prompt).map(move |k| (*p, job_seed(seed, i, k))))
        .collect();
    let images = sample_images(sd, &jobs, settings, progress)?;
    Ok(jobs
        .into_iter()
        .zip(images)
        .map(|((prompt, seed), image)| {
            let scores = score(&image, &prompt);
            Candidate { prompt, seed, image, scores }
        })
        .collect())
}

/// A stable per-image seed.
pub fn job_seed(seed: u64, prompt_index: usize, k: usize) -> u64 {
    let mut r = Rng::new(seed ^ ((prompt_index as u64) << 20) ^ k as u64);
    r.next_u64()
}

/// One preference pair before it is written: images by index into `images`.
#[derive(Debug, Clone)]
pub struct PairRecord {
    pub prompt: Prompt,
    pub chosen: usize,
    pub rejected: usize,
    pub category: String,
    pub scores: BTreeMap<String, [f64; 2]>,
}

/// A preference set: its images and pairs.
#[derive(Debug, Clone, Default)]
pub struct PrefSet {
    pub images: Vec<RgbImage>,
    pub pairs: Vec<PairRecord>,
    /// Candidate pairs looked at (before a regime's filter).
    pub considered: usize,
}

fn named_scores(a: &Scores, b: &Scores) -> BTreeMap<String, [f64; 2]> {
    SCORERS.iter().filter_map(|n| Some((n.to_string(), [a.get(n)?, b.get(n)?]))).collect()
}

/// Sign of a scorer's preference of `a` over `b`, as `vipo data agree` votes (ties abstain).
fn vote(a: f64, b: f64) -> i8 {
    crate::data::agree::vote(&crate::data::Scores { chosen: a, rejected: b }, crate::data::agree::DEFAULT_TIE_TOL)
}

/// Builds a regime's pairs from candidates (grouped by prompt, all pairs within a prompt).
/// `min_gap` (clean only): a pair is kept only when its widest task-scorer gap reaches it (and
/// no task scorer is against); 0 keeps every agreed pair. Small gaps are mostly the scorers'
/// own noise (an IoU of 0.71 against 0.69), and with a few hundred pairs they drown the rest.
/// Noisy labels are taken as the drawn scorer gives them: a gap there would silence the
/// contrarian, whose scores span less (1 of 173 noisy pairs at a gap of 0.5).
pub fn build(candidates: &[Candidate], regime: Regime, seed: u64, min_gap: f64) -> PrefSet {
    let mut set = PrefSet { images: candidates.iter().map(|c| c.image.clone()).collect(), ..Default::default() };
    let mut by_prompt: BTreeMap<Prompt, Vec<usize>> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        by_prompt.entry(c.prompt).or_default().push(i);
    }
    let mut rng = Rng::new(seed ^ 0x9a1b_5e75);
    for (prompt, idx) in &by_prompt {
        match regime {
            Regime::Trivial => {
                // Ground truth against the first sample of the prompt, corrupted.
                let Some(&i) = idx.first() else { continue };
                set.considered += 1;
                let truth = render(prompt, candidates[i].seed ^ 0x7407);
                let bad = corrupt(&candidates[i].image, candidates[i].seed);
                let (st, sb) = (score(&truth, prompt), score(&bad, prompt));
                set.images.push(truth);
                set.images.push(bad);
                let n = set.images.len();
                set.pairs.push(PairRecord {
                    prompt: *prompt,
                    chosen: n - 2,
                    rejected: n - 1,
                    category: "trivial".into(),
                    scores: named_scores(&st, &sb),
                });
            }
            Regime::Clean | Regime::Noisy => {
                for (x, &a) in idx.iter().enumerate() {
                    for &b in &idx[x + 1..] {
                        set.considered += 1;
                        let (sa, sb) = (&candidates[a].scores, &candidates[b].scores);
                        let names: Vec<&str> = SCORERS.iter().copied().filter(|n| sa.get(n).is_some()).collect();
                        let votes: Vec<i8> =
                            names.iter().map(|n| vote(sa.get(n).unwrap_or(0.0), sb.get(n).unwrap_or(0.0))).collect();
                        let gap = |n: &str| (sa.get(n).unwrap_or(0.0) - sb.get(n).unwrap_or(0.0)).abs();
                        let (win, category) = if regime == Regime::Clean {
                            // The task scorers decide; the contrarian is not asked (with it, the
                            // agreed pairs are mostly "bigger blob wins" and DPO learns that).
                            let task = names.iter().zip(&votes).filter(|(n, _)| TASK_SCORERS.contains(n));
                            let pos = task.clone().any(|(_, &v)| v > 0);
                            let neg = task.clone().any(|(_, &v)| v < 0);
                            let widest = task.clone().map(|(n, _)| gap(n)).fold(0.0, f64::max);
                            match (pos, neg, widest >= min_gap) {
                                (true, false, true) => (Some(true), "clean".to_string()),
                                (false, true, true) => (Some(false), "clean".to_string()),
                                _ => (None, String::new()),
                            }
                        } else {
                            let k = rng.below(names.len());
                            match votes[k] {
                                1 => (Some(true), names[k].to_string()),
                                -1 => (Some(false), names[k].to_string()),
                                _ => (None, String::new()),
                            }
                        };
                        let Some(a_wins) = win else { continue };
                        let (c, r) = if a_wins { (a, b) } else { (b, a) };
                        set.pairs.push(PairRecord {
                            prompt: *prompt,
                            chosen: c,
                            rejected: r,
                            category,
                            scores: named_scores(&candidates[c].scores, &candidates[r].scores),
                        });
                    }
                }
            }
        }
    }
    set
}

/// Heavy noise and rotated colour channels: unmistakably worse than any sample.
pub fn corrupt(img: &RgbImage, seed: u64) -> RgbImage {
    let mut rng = Rng::new(seed ^ 0x0c02_20f7);
    let mut data = img.data.clone();
    for px in data.chunks_exact_mut(3) {
        let rot = [px[1], px[2], px[0]];
        for (c, v) in px.iter_mut().zip(rot) {
            *c = (v as f32 + (rng.uniform() - 0.5) * 200.0).clamp(0.0, 255.0) as u8;
        }
    }
    RgbImage { width: img.width, height: img.height, data }
}

/// Writes the images (PNG) and `pairs.jsonl` (paths relative to it) under `dir`; returns the
/// manifest's path.
pub fn write(set: &PrefSet, dir: &Path) -> Result<PathBuf> {
    let img_dir = dir.join("images");
    std::fs::create_dir_all(&img_dir).map_err(|e| Error::io(&img_dir, e))?;
    let used: std::collections::BTreeSet<usize> = set.pairs.iter().flat_map(|p| [p.chosen, p.rejected]).collect();
    for &i in &used {
        write_png(&img_dir.join(format!("{i:05}.png")), &set.images[i], None)?;
    }
    let mut text = String::new();
    for p in &set.pairs {
        let line = serde_json::json!({
            "prompt": p.prompt.text(),
            "chosen": format!("images/{:05}.png", p.chosen),
            "rejected": format!("images/{:05}.png", p.rejected),
            "category": p.category,
            "scores": p.scores,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let path = dir.join("pairs.jsonl");
    crate::train::config::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}
