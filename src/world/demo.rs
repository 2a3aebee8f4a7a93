//! `vipo demo`: from the shipped base model, build a preference set from its own samples,
//! fine-tune with Poly-DPO through the ordinary trainer, and score held-out prompts before and
//! after (same prompts, same seeds), per scorer, with 95% intervals; write a sample grid, the
//! training curves and a report. `--sweep` runs the alpha ablation over the three regimes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::plot::{colour, compose, line_chart, smooth, Series, LIGHT_GREY};
use super::prefs::{build, candidates, sample_images, write, Candidate, Regime, SampleSettings};
use super::render::render;
use super::score::{score, Scores, SCORERS};
use super::Prompt;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::image_io::{write_png, RgbImage};
use crate::pipelines::stable_diffusion::StableDiffusion;
use crate::rng::Rng;
use crate::train::config::{write_atomic, DataFormat, FinetuneKind, ObjectiveKind, ScheduleKind, TrainConfig};
use crate::train::trainer::{StepMetrics, Trainer};

/// Everything `vipo demo` can be told.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub model: PathBuf,
    pub out: PathBuf,
    pub regime: Regime,
    pub alpha: f64,
    pub beta: f64,
    pub finetune: FinetuneKind,
    pub lora_rank: usize,
    pub lr: f32,
    pub steps: u64,
    /// Pairs per step.
    pub batch: usize,
    /// Training prompts sampled for the preference set, and samples per prompt.
    pub train_prompts: usize,
    pub per_prompt: usize,
    /// Seeds per held-out prompt for the before/after scores.
    pub eval_seeds: usize,
    /// Keep clean pairs whose widest task-scorer gap is at least this (see [`build`]).
    pub min_gap: f64,
    pub sample: SampleSettings,
    pub seed: u64,
    /// `auto`/`cpu`/`gpu`/`gpu:N` for the trainer's config (the device is passed separately).
    pub device_name: String,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            model: PathBuf::from("models/world"),
            out: PathBuf::from("vipo-demo"),
            regime: Regime::Clean,
            alpha: 0.0,
            beta: 5000.0,
            finetune: FinetuneKind::Lora,
            lora_rank: 8,
            lr: 3e-3,
            steps: 250,
            batch: 8,
            train_prompts: 96,
            per_prompt: 4,
            eval_seeds: 5,
            min_gap: 0.5,
            sample: SampleSettings::default(),
            seed: 0,
            device_name: "cpu".into(),
        }
    }
}

impl DemoOptions {
    /// A few steps and few images: every output file, in seconds (CI).
    pub fn quick(mut self) -> DemoOptions {
        self.steps = 4;
        self.batch = 2;
        self.train_prompts = 8;
        self.per_prompt = 4;
        self.eval_seeds = 1;
        self.sample.steps = 4;
        self
    }
}

/// Mean and the half-width of its 95% interval (normal approximation, 1.96 standard errors).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct Estimate {
    pub mean: f64,
    pub ci95: f64,
    pub n: usize,
}

pub fn estimate(v: &[f64]) -> Estimate {
    let n = v.len();
    if n == 0 {
        return Estimate { mean: f64::NAN, ci95: f64::NAN, n };
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = if n > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
    Estimate { mean, ci95: 1.96 * (var / n as f64).sqrt(), n }
}

/// One row of the before/after table.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Row {
    pub metric: String,
    pub before: Estimate,
    pub after: Estimate,
    /// after - before on the same (prompt, seed): the paired difference and its interval.
    pub change: Estimate,
}

impl Row {
    /// The interval of the paired change excludes zero.
    pub fn significant(&self) -> bool {
        self.change.mean.abs() > self.change.ci95 && self.change.n > 1
    }
}

/// Scores of held-out images.
#[derive(Debug, Clone)]
pub struct Eval {
    pub jobs: Vec<(Prompt, u64)>,
    pub images: Vec<RgbImage>,
    pub scores: Vec<Scores>,
}

/// The held-out prompts x `seeds` seeds.
pub fn eval_jobs(seeds: usize, seed: u64) -> Vec<(Prompt, u64)> {
    let held: Vec<Prompt> = Prompt::all().into_iter().filter(Prompt::is_held_out).collect();
    held.iter()
        .enumerate()
        .flat_map(|(i, p)| (0..seeds).map(move |k| (*p, super::prefs::job_seed(seed ^ 0xe7a1, i, k))))
        .collect()
}

pub fn evaluate(
    sd: &StableDiffusion,
    jobs: &[(Prompt, u64)],
    settings: &SampleSettings,
    progress: &mut dyn FnMut(usize),
) -> Result<Eval> {
    let images = sample_images(sd, jobs, settings, progress)?;
    let scores = jobs.iter().zip(&images).map(|((p, _), img)| score(img, p)).collect();
    Ok(Eval { jobs: jobs.to_vec(), images, scores })
}

fn metric(s: &Scores, name: &str) -> Option<f64> {
    match name {
        "task" => Some(s.task()),
        "all_correct" => Some(s.all_correct() as u8 as f64),
        n => s.get(n),
    }
}

/// Metrics in report order: the task score, GenEval's all-correct rate, then each scorer.
pub fn metric_names() -> Vec<&'static str> {
    let mut v = vec!["task", "all_correct"];
    v.extend(SCORERS);
    v
}

/// The before/after table over the same jobs.
pub fn compare(before: &Eval, after: &Eval) -> Vec<Row> {
    metric_names()
        .into_iter()
        .map(|m| {
            let pairs: Vec<(f64, f64)> = before
                .scores
                .iter()
                .zip(&after.scores)
                .filter_map(|(b, a)| Some((metric(b, m)?, metric(a, m)?)))
                .collect();
            let b: Vec<f64> = pairs.iter().map(|p| p.0).collect();
            let a: Vec<f64> = pairs.iter().map(|p| p.1).collect();
            let d: Vec<f64> = pairs.iter().map(|p| p.1 - p.0).collect();
            Row { metric: m.to_string(), before: estimate(&b), after: estimate(&a), change: estimate(&d) }
        })
        .collect()
}

/// How a phase reports progress: a name, a total, then positions.
pub trait Progress {
    fn phase(&mut self, name: &str, total: u64);
    fn set(&mut self, pos: u64, msg: Option<String>);
    fn done(&mut self);
}

/// Progress bars on stderr.
pub struct Bars {
    bar: Option<indicatif::ProgressBar>,
    index: usize,
    phases: usize,
}

impl Bars {
    pub fn new(phases: usize) -> Bars {
        Bars { bar: None, index: 0, phases }
    }
}

impl Progress for Bars {
    fn phase(&mut self, name: &str, total: u64) {
        self.index += 1;
        let pb = indicatif::ProgressBar::new(total);
        let style = indicatif::ProgressStyle::with_template(&format!(
            "[{}/{}] {name:<28} {{bar:28}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}",
            self.index, self.phases
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        pb.set_style(style);
        self.bar = Some(pb);
    }
    fn set(&mut self, pos: u64, msg: Option<String>) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
            if let Some(m) = msg {
                b.set_message(m);
            }
        }
    }
    fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

/// No output (the sweep's inner runs).
pub struct Silent;
impl Progress for Silent {
    fn phase(&mut self, _: &str, _: u64) {}
    fn set(&mut self, _: u64, _: Option<String>) {}
    fn done(&mut self) {}
}

/// The train prompts the preference set is sampled from (never a held-out one).
pub fn train_prompts(n: usize, seed: u64) -> Vec<Prompt> {
    let mut all: Vec<Prompt> = Prompt::all().into_iter().filter(|p| !p.is_held_out()).collect();
    let mut rng = Rng::new(seed ^ 0x7a1e);
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    all.truncate(n.min(all.len()));
    all
}

/// The trainer's config for a demo run on `data`.
pub fn train_config(o: &DemoOptions, data: &Path, output: &Path, alpha: f64, seed: u64) -> TrainConfig {
    TrainConfig {
        model: o.model.clone(),
        data: data.to_path_buf(),
        data_format: DataFormat::Jsonl,
        objective: ObjectiveKind::PolyDpo,
        alpha,
        beta: o.beta,
        half_factor: true,
        finetune: o.finetune,
        lora_rank: o.lora_rank,
        lora_alpha: o.lora_rank as f32,
        lora_targets: ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        resolution: super::SIZE,
        batch: o.batch,
        grad_accum: 1,
        lr: o.lr,
        schedule: ScheduleKind::Constant,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        steps: o.steps,
        seed,
        checkpoint_every: 0,
        validate_every: 0,
        output: output.to_path_buf(),
        device: o.device_name.clone(),
        ..TrainConfig::default()
    }
}

#[allow(clippy::too_many_arguments)]
/// Trains on `data`, returning the trainer (its pipeline is the fine-tuned policy) and the
/// per-step metrics (also appended to `output/metrics.jsonl`).
pub fn train(
    o: &DemoOptions,
    device: &Device,
    data: &Path,
    output: &Path,
    alpha: f64,
    seed: u64,
    save: bool,
    progress: &mut dyn Progress,
) -> Result<(Trainer, Vec<StepMetrics>)> {
    let cfg = train_config(o, data, output, alpha, seed);
    let mut t = Trainer::new(cfg, device)?;
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    t.cfg.save(output.join("config.toml"))?;
    let mut metrics = Vec::new();
    let mut lines = String::new();
    progress.phase(&format!("Poly-DPO (alpha {alpha})"), o.steps);
    while t.step() < o.steps {
        let m = t.train_step()?;
        progress.set(m.step, Some(format!("loss {:.4} acc {:.2}", m.loss, m.implicit_acc.unwrap_or(f64::NAN))));
        lines.push_str(&serde_json::to_string(&m).map_err(|e| Error::Invalid(format!("metrics: {e}")))?);
        lines.push('\n');
        metrics.push(m);
    }
    progress.done();
    write_atomic(&output.join("metrics.jsonl"), lines.as_bytes())?;
    if save {
        t.save_checkpoint()?;
    }
    Ok((t, metrics))
}

/// What a demo run produced.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub model: PathBuf,
    pub regime: Regime,
    pub alpha: f64,
    pub beta: f64,
    pub finetune: FinetuneKind,
    pub lr: f32,
    pub min_gap: f64,
    pub steps: u64,
    pub candidates: usize,
    pub pairs_considered: usize,
    pub pairs: usize,
    /// Of the noisy labelling of the same candidates: pairs on which every scorer agrees.
    pub noisy_agreement: Option<f64>,
    pub eval_images: usize,
    pub rows: Vec<Row>,
    pub seconds: Vec<(String, f64)>,
    pub files: Vec<PathBuf>,
}

fn agreement_of_noisy(cands: &[Candidate], seed: u64) -> Option<f64> {
    // Every noisy pair (no minimum gap), as the paper counts its whole dataset.
    let noisy = build(cands, Regime::Noisy, seed, 0.0);
    if noisy.pairs.is_empty() {
        return None;
    }
    let agreed = noisy
        .pairs
        .iter()
        .filter(|p| {
            let v: Vec<f64> = p.scores.values().map(|s| s[0] - s[1]).collect();
            v.iter().all(|d| *d >= -1e-6) && v.iter().any(|d| *d > 1e-6)
        })
        .count();
    Some(agreed as f64 / noisy.pairs.len() as f64)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, text.as_bytes())
}

/// The before/after grid: one row per held-out prompt (first seed), columns ground truth |
/// before | after, for up to `rows` prompts.
pub fn before_after_grid(before: &Eval, after: &Eval, rows: usize) -> RgbImage {
    let mut seen = std::collections::BTreeSet::new();
    let mut grid = Vec::new();
    for (i, (p, seed)) in before.jobs.iter().enumerate() {
        if grid.len() >= rows || !seen.insert(*p) {
            continue;
        }
        grid.push(vec![render(p, *seed), before.images[i].clone(), after.images[i].clone()]);
    }
    // Two columns of triples side by side, so the picture is not one long strip.
    let half = grid.len().div_ceil(2);
    let mut rows_out = Vec::new();
    for r in 0..half {
        let mut row = grid[r].clone();
        if let Some(other) = grid.get(r + half) {
            row.extend(other.iter().cloned());
        }
        rows_out.push(row);
    }
    compose(&rows_out, 3, 4, &[2])
}

fn curves_png(metrics: &[StepMetrics], title: &str) -> RgbImage {
    let loss: Vec<(f64, f64)> = metrics.iter().map(|m| (m.step as f64, m.loss)).collect();
    let acc: Vec<(f64, f64)> = metrics.iter().filter_map(|m| Some((m.step as f64, m.implicit_acc?))).collect();
    let w = (metrics.len() / 10).max(1) | 1;
    let top = line_chart(
        &format!("{title}: loss"),
        "step",
        "loss",
        &[
            Series { name: "per step".into(), points: loss.clone(), colour: LIGHT_GREY, markers: false },
            Series { name: format!("mean of {w}"), points: smooth(&loss, w), colour: colour(0), markers: false },
        ],
        None,
        (720, 300),
    );
    let bottom = line_chart(
        &format!("{title}: implicit accuracy (z > 0)"),
        "step",
        "accuracy",
        &[
            Series { name: "per step".into(), points: acc.clone(), colour: LIGHT_GREY, markers: false },
            Series { name: format!("mean of {w}"), points: smooth(&acc, w), colour: colour(1), markers: false },
        ],
        Some(0.5),
        (720, 300),
    );
    // One above the other, no gap (`compose` at scale 1).
    compose(&[vec![top], vec![bottom]], 1, 0, &[])
}

/// The table as markdown.
pub fn rows_markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| metric | before (95% CI) | after (95% CI) | change, paired (95% CI) | |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:+.3} ± {:.3} | {} |\n",
            r.metric,
            r.before.mean,
            r.before.ci95,
            r.after.mean,
            r.after.ci95,
            r.change.mean,
            r.change.ci95,
            if r.significant() {
                if r.change.mean > 0.0 {
                    "up"
                } else {
                    "down"
                }
            } else {
                "no clear change"
            }
        );
    }
    s
}

/// Runs the demo; writes its files under `o.out`.
pub fn run_demo(o: &DemoOptions, device: &Device, progress: &mut dyn Progress) -> Result<DemoReport> {
    let out = &o.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut seconds = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |name: &str, seconds: &mut Vec<(String, f64)>| {
        seconds.push((name.to_string(), clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };
    let sd = StableDiffusion::from_dir(&o.model, device, None)?;
    if !sd.is_pixel_space() || sd.unet.config.in_channels != 3 {
        return Err(Error::File {
            path: o.model.clone(),
            msg: "not a world pipeline (expected pixel space at 32x32; made by `vipo world pretrain`)".into(),
        });
    }
    let prompts = train_prompts(o.train_prompts, o.seed);
    let n_cand = prompts.len() * o.per_prompt;
    progress.phase("sampling preference data", n_cand as u64);
    let cands = candidates(&sd, &prompts, o.per_prompt, o.seed, &o.sample, &mut |n| progress.set(n as u64, None))?;
    progress.done();
    let set = build(&cands, o.regime, o.seed, o.min_gap);
    if set.pairs.is_empty() {
        return Err(Error::Invalid(format!(
            "demo: the {} regime kept no pair of {} candidate pairs (minimum gap {}); lower --min-gap or sample \
             more (--train-prompts, --per-prompt)",
            o.regime.name(),
            set.considered,
            o.min_gap
        )));
    }
    let data = write(&set, &out.join("data"))?;
    let noisy_agreement = agreement_of_noisy(&cands, o.seed);
    lap("sample preference data", &mut seconds);

    let jobs = eval_jobs(o.eval_seeds, o.seed);
    progress.phase("scoring the base model", jobs.len() as u64);
    let before = evaluate(&sd, &jobs, &o.sample, &mut |n| progress.set(n as u64, None))?;
    progress.done();
    drop(sd);
    lap("score base", &mut seconds);

    let (trainer, metrics) = train(o, device, &data, &out.join("train"), o.alpha, o.seed, true, progress)?;
    lap("train", &mut seconds);

    progress.phase("scoring the fine-tuned model", jobs.len() as u64);
    let after = evaluate(&trainer.sd, &jobs, &o.sample, &mut |n| progress.set(n as u64, None))?;
    progress.done();
    lap("score fine-tuned", &mut seconds);

    let rows = compare(&before, &after);
    let grid_path = out.join("samples.png");
    write_png(&grid_path, &before_after_grid(&before, &after, 24), None)?;
    let curves_path = out.join("curves.png");
    let title = format!("Poly-DPO alpha {} on {} pairs", o.alpha, o.regime.name());
    write_png(&curves_path, &curves_png(&metrics, &title), None)?;
    let report = DemoReport {
        model: o.model.clone(),
        regime: o.regime,
        alpha: o.alpha,
        beta: o.beta,
        finetune: o.finetune,
        lr: o.lr,
        min_gap: o.min_gap,
        steps: o.steps,
        candidates: cands.len(),
        pairs_considered: set.considered,
        pairs: set.pairs.len(),
        noisy_agreement,
        eval_images: jobs.len(),
        rows,
        seconds,
        files: vec![
            out.join("report.md"),
            out.join("report.json"),
            grid_path,
            curves_path,
            data,
            trainer.last_checkpoint().map(Path::to_path_buf).unwrap_or_default(),
        ],
    };
    write_text(
        &out.join("report.json"),
        &serde_json::to_string_pretty(&report).map_err(|e| Error::Invalid(format!("report: {e}")))?,
    )?;
    write_text(&out.join("report.md"), &report_markdown(&report))?;
    Ok(report)
}

/// ", deciding gap at least G" where the gap applies (the clean regime).
fn gap_phrase(regime: Regime, min_gap: f64) -> String {
    match regime {
        Regime::Clean => format!(", deciding gap at least {min_gap}"),
        _ => String::new(),
    }
}

fn finetune_name(f: FinetuneKind) -> &'static str {
    match f {
        FinetuneKind::Full => "full",
        FinetuneKind::Lora => "lora",
    }
}

pub fn report_markdown(r: &DemoReport) -> String {
    let mut s = format!(
        "# vipo demo\n\nBase model `{}`; {} preference pairs ({} regime{}, kept of {} candidate pairs from {} \
         samples), Poly-DPO alpha {} beta {}, {} fine-tuning at lr {} for {} steps. Held-out prompts: {} images (the \
         same prompts and seeds before and after).\n\n",
        r.model.display(),
        r.pairs,
        r.regime.name(),
        gap_phrase(r.regime, r.min_gap),
        r.pairs_considered,
        r.candidates,
        r.alpha,
        r.beta,
        finetune_name(r.finetune),
        r.lr,
        r.steps,
        r.eval_images
    );
    s += &rows_markdown(&r.rows);
    s += "\n`task` is the mean of the count, colour, shape and position scorers (position only where the prompt \
          names one); `all_correct` is GenEval's strict rate (every one of them at full marks); `aesthetic` is the \
          contrarian scorer (it likes one big centred blob), reported, never optimised for in the clean regime \
          unless it agrees. Intervals: 1.96 standard errors; the change is paired (same prompt and seed).\n";
    if let Some(a) = r.noisy_agreement {
        s += &format!(
            "\nOf the same candidates labelled the noisy way (one random scorer per pair), every scorer agrees on \
             {:.1}% of pairs (the paper reports 20.79% for Pick-a-Pic's reward models).\n",
            100.0 * a
        );
    }
    s += "\n`samples.png`: for each held-out prompt (first seed), ground truth | before | after; two such blocks per \
          row.\n`curves.png`: loss and implicit accuracy per step.\n\nTime per phase:\n\n";
    for (k, v) in &r.seconds {
        s += &format!("- {k}: {v:.1} s\n");
    }
    s
}

/// Where a finished sweep run keeps its result (`SweepRun` as JSON).
const RUN_FILE: &str = "run.json";

/// The result of a run an earlier sweep in the same folder finished, if any: same regime,
/// alpha and seed (the folder name says so; the file must agree).
fn finished_run(run_dir: &Path, regime: Regime, alpha: f64, seed: u64) -> Result<Option<SweepRun>> {
    let path = run_dir.join(RUN_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let run: SweepRun = serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.clone(),
        msg: format!("not a finished sweep run ({e}); delete it to train the run again"),
    })?;
    if run.regime != regime || run.alpha != alpha || run.seed != seed {
        return Err(Error::File {
            path,
            msg: format!(
                "holds {} alpha {} seed {}, not {} alpha {alpha} seed {seed}",
                run.regime.name(),
                run.alpha,
                run.seed,
                regime.name()
            ),
        });
    }
    Ok(Some(run))
}

/// One training run of the sweep.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SweepRun {
    pub regime: Regime,
    pub alpha: f64,
    pub seed: u64,
    pub pairs: usize,
    pub final_implicit_acc: Option<f64>,
    pub rows: Vec<Row>,
}

/// The sweep's result: every run, and per (regime, alpha) the paired change of the task
/// score pooled over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub base: Vec<Row>,
    pub runs: Vec<SweepRun>,
    pub cells: Vec<SweepCell>,
    pub pairs: Vec<(Regime, usize)>,
    /// Of the noisy pairs: the fraction on which every scorer agrees with the label.
    pub noisy_agreement: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepCell {
    pub regime: Regime,
    pub alpha: f64,
    /// Paired change of the task score (after - before), all seeds' images pooled.
    pub task_change: Estimate,
    pub all_correct_change: Estimate,
    pub aesthetic_change: Estimate,
}

/// The alpha ablation: one candidate pool and one base evaluation, then for each regime its
/// preference set and a run per alpha and seed, each scored on the held-out prompts.
pub fn run_sweep(
    o: &DemoOptions,
    regimes: &[Regime],
    alphas: &[f64],
    seeds: &[u64],
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<SweepReport> {
    let t0 = Instant::now();
    let out = &o.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let sd = StableDiffusion::from_dir(&o.model, device, None)?;
    let prompts = train_prompts(o.train_prompts, o.seed);
    progress.phase("sampling preference data", (prompts.len() * o.per_prompt) as u64);
    let cands = candidates(&sd, &prompts, o.per_prompt, o.seed, &o.sample, &mut |n| progress.set(n as u64, None))?;
    progress.done();
    let jobs = eval_jobs(o.eval_seeds, o.seed);
    progress.phase("scoring the base model", jobs.len() as u64);
    let before = evaluate(&sd, &jobs, &o.sample, &mut |n| progress.set(n as u64, None))?;
    progress.done();
    drop(sd);
    let mut runs = Vec::new();
    let mut pairs = Vec::new();
    let total = (regimes.len() * alphas.len() * seeds.len()) as u64;
    progress.phase("training and scoring runs", total);
    let mut done = 0;
    for &regime in regimes {
        let set = build(&cands, regime, o.seed, o.min_gap);
        if set.pairs.is_empty() {
            return Err(Error::Invalid(format!(
                "sweep: the {} regime kept no pair of {} candidate pairs (minimum gap {}); lower --min-gap or \
                 sample more (--train-prompts, --per-prompt)",
                regime.name(),
                set.considered,
                o.min_gap
            )));
        }
        let data = write(&set, &out.join(format!("data-{}", regime.name())))?;
        pairs.push((regime, set.pairs.len()));
        for &alpha in alphas {
            for &seed in seeds {
                let run_dir = out.join("runs").join(format!("{}-alpha{alpha:+}-seed{seed}", regime.name()));
                // A run an interrupted sweep finished is read back, not trained again.
                if let Some(run) = finished_run(&run_dir, regime, alpha, seed)? {
                    done += 1;
                    progress.set(done, Some(format!("{} alpha {alpha} seed {seed}: done before", regime.name())));
                    runs.push(run);
                    continue;
                }
                let (trainer, metrics) = train(o, device, &data, &run_dir, alpha, seed, false, &mut Silent)?;
                let after = evaluate(&trainer.sd, &jobs, &o.sample, &mut |_| {})?;
                let rows = compare(&before, &after);
                let task = rows.iter().find(|r| r.metric == "task").map(|r| r.change.mean).unwrap_or(f64::NAN);
                done += 1;
                progress.set(done, Some(format!("{} alpha {alpha} seed {seed}: task {task:+.3}", regime.name())));
                let k = metrics.len().saturating_sub(10);
                let accs: Vec<f64> = metrics[k..].iter().filter_map(|m| m.implicit_acc).collect();
                let run = SweepRun {
                    regime,
                    alpha,
                    seed,
                    pairs: set.pairs.len(),
                    final_implicit_acc: (!accs.is_empty()).then(|| accs.iter().sum::<f64>() / accs.len() as f64),
                    rows,
                };
                // Keep what a finished run gives, so an interrupted sweep is not lost.
                write_text(
                    &run_dir.join(RUN_FILE),
                    &serde_json::to_string_pretty(&run).map_err(|e| Error::Invalid(format!("sweep: {e}")))?,
                )?;
                runs.push(run);
            }
        }
    }
    progress.done();
    // Pooled paired changes: every (image, seed) of the regime and alpha.
    let base = compare(&before, &before);
    let mut cells = Vec::new();
    for &regime in regimes {
        for &alpha in alphas {
            let of = |metric: &str| {
                let rs: Vec<&SweepRun> = runs.iter().filter(|r| r.regime == regime && r.alpha == alpha).collect();
                // Each run's paired change is a mean over the same n images; pool their means
                // with the per-run CI combined as independent samples.
                let ests: Vec<Estimate> =
                    rs.iter().filter_map(|r| r.rows.iter().find(|x| x.metric == metric).map(|x| x.change)).collect();
                let k = ests.len().max(1) as f64;
                let mean = ests.iter().map(|e| e.mean).sum::<f64>() / k;
                let ci = (ests.iter().map(|e| e.ci95 * e.ci95).sum::<f64>()).sqrt() / k;
                Estimate { mean, ci95: ci, n: ests.iter().map(|e| e.n).sum() }
            };
            cells.push(SweepCell {
                regime,
                alpha,
                task_change: of("task"),
                all_correct_change: of("all_correct"),
                aesthetic_change: of("aesthetic"),
            });
        }
    }
    let noisy_agreement = agreement_of_noisy(&cands, o.seed);
    let report = SweepReport { base, runs, cells, pairs, noisy_agreement, seconds: t0.elapsed().as_secs_f64() };
    write_text(
        &out.join("sweep.json"),
        &serde_json::to_string_pretty(&report).map_err(|e| Error::Invalid(format!("sweep: {e}")))?,
    )?;
    write_text(&out.join("sweep.md"), &sweep_markdown(o, &report, regimes, alphas, seeds))?;
    write_png(&out.join("sweep.png"), &sweep_png(&report, regimes), None)?;
    Ok(report)
}

fn sweep_png(r: &SweepReport, regimes: &[Regime]) -> RgbImage {
    let series: Vec<Series> = regimes
        .iter()
        .enumerate()
        .map(|(i, reg)| Series {
            name: reg.name().to_string(),
            points: r.cells.iter().filter(|c| c.regime == *reg).map(|c| (c.alpha, c.task_change.mean)).collect(),
            colour: colour(i),
            markers: true,
        })
        .collect();
    line_chart(
        "Poly-DPO: held-out task score change vs alpha",
        "alpha",
        "task score change (after - before)",
        &series,
        Some(0.0),
        (720, 400),
    )
}

fn sweep_markdown(o: &DemoOptions, r: &SweepReport, regimes: &[Regime], alphas: &[f64], seeds: &[u64]) -> String {
    let mut s = format!(
        "# Poly-DPO alpha sweep on the built-in world\n\nBase `{}`; {} training prompts x {} samples; {} steps of \
         batch {} ({} fine-tuning, lr {}, beta {}; clean pairs: deciding gap at least {}); seeds {:?}; held-out task score over {} images per run \
         (same prompts and seeds as the base). Cells: paired change of the task score (after - before), mean over \
         seeds ± 95% CI; **bold**: the best alpha of the regime.\n\n",
        o.model.display(),
        o.train_prompts,
        o.per_prompt,
        o.steps,
        o.batch,
        finetune_name(o.finetune),
        o.lr,
        o.beta,
        o.min_gap,
        seeds,
        r.base.first().map(|b| b.before.n).unwrap_or(0)
    );
    s += "| regime | pairs |";
    for a in alphas {
        s += &format!(" alpha {a} |");
    }
    s += "\n|---|---|";
    s += &"---|".repeat(alphas.len());
    s += "\n";
    for reg in regimes {
        let cells: Vec<&SweepCell> = r.cells.iter().filter(|c| c.regime == *reg).collect();
        let best = cells.iter().map(|c| c.task_change.mean).fold(f64::MIN, f64::max);
        let n = r.pairs.iter().find(|p| p.0 == *reg).map(|p| p.1).unwrap_or(0);
        s += &format!("| {} | {n} |", reg.name());
        for c in cells {
            let cell = format!("{:+.3} ± {:.3}", c.task_change.mean, c.task_change.ci95);
            s += &if c.task_change.mean == best { format!(" **{cell}** |") } else { format!(" {cell} |") };
        }
        s += "\n";
    }
    s += "\nGenEval-style all-correct rate, change:\n\n| regime |";
    for a in alphas {
        s += &format!(" alpha {a} |");
    }
    s += "\n|---|";
    s += &"---|".repeat(alphas.len());
    s += "\n";
    for reg in regimes {
        s += &format!("| {} |", reg.name());
        for c in r.cells.iter().filter(|c| c.regime == *reg) {
            s += &format!(" {:+.3} ± {:.3} |", c.all_correct_change.mean, c.all_correct_change.ci95);
        }
        s += "\n";
    }
    if let Some(b) = r.base.iter().find(|x| x.metric == "task") {
        s += &format!("\nBase model task score: {:.3} ± {:.3}.\n", b.before.mean, b.before.ci95);
    }
    if let Some(a) = r.noisy_agreement {
        s += &format!(
            "\nNoisy pairs on which every scorer agrees with the label: {:.1}% (ViPO reports 20.79% for \
             Pick-a-Pic).\n",
            100.0 * a
        );
    }
    s += &format!("\nWall time: {:.0} s. Plot: `sweep.png`; every run: `sweep.json`.\n", r.seconds);
    s
}
