//! Noise schedulers for sampling and training, read from diffusers' `scheduler_config.json`.
//!
//! The coefficient math (betas, `alphas_cumprod`, timesteps, sigmas) is host code that
//! reproduces diffusers' float32 arithmetic operation by operation (PyTorch's CPU `linspace`
//! with its fused multiply-adds, `cumprod` accumulated in f64, numpy's `linspace`/`arange`/
//! `interp` and round-half-to-even): betas, `alphas_cumprod` and timesteps match diffusers bit
//! for bit; sigmas use a correctly rounded sqrt where PyTorch's `** 0.5` can be 1 ulp off.
//! Each step is a few tensor ops in diffusers' order, so it runs on the latents' device.
//!
//! Steps are addressed by index `i` into [`NoiseScheduler::timesteps`] (0 = noisiest), not by
//! timestep value. Randomness only enters through [`Noise`], so runs replay exactly.
//!
//! Options a config may set that vipo does not implement (karras sigmas, thresholding, learned
//! variances, ...) are refused with an error that names the key; unknown keys are ignored.

mod ddim;
mod ddpm;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;

pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpmpp_2m::DpmPp2m;
pub use euler::Euler;
pub use euler_ancestral::EulerAncestral;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The model predicts x0 directly (diffusers' `sample`).
    #[serde(rename = "sample")]
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    #[serde(rename = "leading")]
    Leading,
    #[serde(rename = "trailing")]
    Trailing,
    #[serde(rename = "linspace")]
    Linspace,
}

/// DDPM's `variance_type` (DPM-Solver reads the same key for learned variances).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VarianceType {
    #[serde(rename = "fixed_small")]
    FixedSmall,
    #[serde(rename = "fixed_small_log")]
    FixedSmallLog,
    #[serde(rename = "fixed_large")]
    FixedLarge,
    #[serde(rename = "fixed_large_log")]
    FixedLargeLog,
    #[serde(rename = "learned")]
    Learned,
    #[serde(rename = "learned_range")]
    LearnedRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum InterpolationType {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "log_linear")]
    LogLinear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepType {
    #[serde(rename = "discrete")]
    Discrete,
    #[serde(rename = "continuous")]
    Continuous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FinalSigmasType {
    #[serde(rename = "zero")]
    Zero,
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AlgorithmType {
    #[serde(rename = "dpmsolver++")]
    DpmSolverPp,
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPp,
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
    /// diffusers maps `deis` to `dpmsolver++` in this scheduler.
    #[serde(rename = "deis")]
    Deis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SolverType {
    #[serde(rename = "midpoint")]
    Midpoint,
    #[serde(rename = "heun")]
    Heun,
    /// UniPC/DEIS names that diffusers maps to `midpoint` here.
    #[serde(rename = "logrho", alias = "bh1", alias = "bh2")]
    Logrho,
}

/// A diffusers `scheduler_config.json`. Every key is optional: a missing (or `null`) key takes
/// the default of the scheduler class it is used with, as diffusers' `from_config` does (the
/// SD1.5 PNDM config gives DDIM `timestep_spacing = leading` but Euler `linspace`). Keys
/// listed in `_use_default_values` count as missing, also like diffusers. Unknown keys are
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    #[serde(deserialize_with = "de_f64")]
    pub beta_start: Option<f64>,
    #[serde(deserialize_with = "de_f64")]
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<usize>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    #[serde(deserialize_with = "de_f64")]
    pub clip_sample_range: Option<f64>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub thresholding: Option<bool>,
    pub variance_type: Option<VarianceType>,
    // Euler
    pub interpolation_type: Option<InterpolationType>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub timestep_type: Option<TimestepType>,
    pub final_sigmas_type: Option<FinalSigmasType>,
    // DPM-Solver multistep
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<AlgorithmType>,
    pub solver_type: Option<SolverType>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    #[serde(deserialize_with = "de_f64")]
    pub lambda_min_clipped: Option<f64>,
    /// The file this came from, named in every later error.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// A number, or the `Infinity`/`-Infinity`/`NaN` that Python's json writes (diffusers saves
/// `lambda_min_clipped = -inf` that way).
fn de_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    use serde::de::Error as _;
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| D::Error::custom("not a number")),
        Some(serde_json::Value::String(s)) => match s.as_str() {
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" => Ok(Some(f64::NAN)),
            _ => Err(D::Error::custom(format!("expected a number, got the string {s:?}"))),
        },
        Some(other) => Err(D::Error::custom(format!("expected a number, got {other}"))),
    }
}

/// Quotes the bare `Infinity`, `-Infinity` and `NaN` tokens Python's json emits, which strict
/// JSON (and serde_json) rejects, so `de_f64` can read them.
fn quote_nonfinite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"].iter().find(|t| rest.starts_with(**t)) {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json`; errors name the file and the key.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg = Self::parse(&text).map_err(|msg| Error::File { path: path.to_path_buf(), msg })?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses the text of a `scheduler_config.json`; errors name the key.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::parse(text).map_err(|msg| Error::Invalid(format!("scheduler config: {msg}")))
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(&quote_nonfinite(text)).map_err(|e| format!("not valid JSON: {e}"))?;
        let serde_json::Value::Object(mut map) = value else {
            return Err("expected a JSON object at the top level".into());
        };
        if let Some(defaults) = map.remove("_use_default_values") {
            let serde_json::Value::Array(keys) = defaults else {
                return Err("key \"_use_default_values\": expected a list of key names".into());
            };
            for k in keys.iter().filter_map(|k| k.as_str()) {
                map.remove(k);
            }
        }
        // Every field is optional, so a key that fails alone is the key to blame.
        for (k, v) in &map {
            let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
            if let Err(e) = serde_json::from_value::<SchedulerConfig>(one) {
                return Err(format!("key \"{k}\": {e}"));
            }
        }
        serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())
    }

    /// An error about `key`, naming the config's file when it came from one.
    pub(crate) fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        let msg = format!("key \"{key}\": {msg}");
        match &self.source {
            Some(path) => Error::File { path: path.clone(), msg },
            None => Error::Invalid(format!("scheduler config: {msg}")),
        }
    }

    /// Refuses `key = true`: an option vipo does not implement.
    fn refuse_true(&self, key: &str, value: Option<bool>, why: &str) -> Result<()> {
        if value == Some(true) {
            return Err(self.err(key, format!("true is not supported ({why})")));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

/// The schedulers vipo implements, by the short names the CLI and pipelines use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `ddim`: DDIMScheduler.
    Ddim,
    /// `ddpm`: DDPMScheduler.
    Ddpm,
    /// `euler`: EulerDiscreteScheduler.
    Euler,
    /// `euler_a`: EulerAncestralDiscreteScheduler.
    EulerAncestral,
    /// `dpmpp_2m`: DPMSolverMultistepScheduler (dpmsolver++, order 2).
    DpmPp2m,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
        }
    }

    /// diffusers' class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPp2m => "DPMSolverMultistepScheduler",
        }
    }

    /// `ddim`, `ddpm`, `euler`, `euler_a` or `dpmpp_2m` (case-insensitive).
    pub fn from_name(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        Self::ALL.into_iter().find(|k| k.name() == lower).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            Error::Invalid(format!("unknown scheduler {name:?}: expected one of {}", names.join(", ")))
        })
    }

    pub fn from_class_name(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == class)
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_name(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Betas and alphas_cumprod
// ---------------------------------------------------------------------------------------------

/// What the betas are made from, kept to rebuild them in float64.
#[derive(Debug, Clone, PartialEq)]
enum BetaSpec {
    Trained(Vec<f64>),
    Linear(f64, f64),
    ScaledLinear(f64, f64),
    SquaredcosCapV2,
}

/// The training noise schedule shared by all schedulers: `betas` and `alphas_cumprod` in
/// float32 exactly as diffusers computes them, plus the forward process (`add_noise`,
/// `get_velocity`) that training uses.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    spec: BetaSpec,
    rescale_zero_snr: bool,
    num_train_timesteps: usize,
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` on the CPU: an f32 step, the first
/// half counted up from `start` and the second half down from `end`, each value one fused
/// multiply-add (how PyTorch's kernel compiles; it matches diffusers' betas bit for bit).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { step.mul_add(i as f32, s) } else { (-step).mul_add((n - i - 1) as f32, e) }).collect()
}

/// `numpy.linspace(start, stop, num)` (endpoint included) in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = if div == 0 {
        vec![0.0]
    } else {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num).map(|i| i as f64 / div as f64 * delta).collect()
        } else {
            (0..num).map(|i| i as f64 * step).collect()
        }
    };
    for v in &mut y {
        *v += start;
    }
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `numpy.arange(start, stop, step)` for floats: numpy's length and its fill rule
/// (`start + i * ((start + step) - start)`).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else if i == 1 {
                start + step
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// `numpy.interp(x, arange(len(table)), table)` in float64.
pub(crate) fn np_interp_unit(x: f64, table: &[f32]) -> f64 {
    let n = table.len();
    if x.is_nan() || n == 0 {
        return f64::NAN;
    }
    if x < 0.0 {
        return table[0] as f64;
    }
    if x >= (n - 1) as f64 {
        return table[n - 1] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return table[j] as f64;
    }
    let slope = table[j + 1] as f64 - table[j] as f64;
    slope * (x - j as f64) + table[j] as f64
}

/// diffusers' `betas_for_alpha_bar` (cosine, max_beta 0.999) in float64.
fn squaredcos_betas_f64(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// `torch.cumprod` of f32 on the CPU: accumulated in f64, each partial product rounded.
fn cumprod_f32(alphas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` with PyTorch's f32 ops.
fn rescale_zero_terminal_snr_f32(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ab: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (a0, at) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    let k = a0 / (a0 - at);
    for v in &mut sqrt_ab {
        *v = (*v - at) * k;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    (0..ab.len()).map(|i| 1.0 - if i == 0 { ab[0] } else { ab[i] / ab[i - 1] }).collect()
}

fn rescale_zero_terminal_snr_f64(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let mut sqrt_ab: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let (a0, at) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    for v in &mut sqrt_ab {
        *v = (*v - at) * (a0 / (a0 - at));
    }
    let ab: Vec<f64> = sqrt_ab.iter().map(|v| v * v).collect();
    (0..ab.len()).map(|i| 1.0 - if i == 0 { ab[0] } else { ab[i] / ab[i - 1] }).collect()
}

impl NoiseSchedule {
    /// The schedule a config describes (defaults as in every diffusers scheduler: 1000 steps,
    /// linear betas from 1e-4 to 0.02).
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps.unwrap_or(1000);
        if n < 2 {
            return Err(cfg.err("num_train_timesteps", format!("{n} is too small (need at least 2)")));
        }
        let start = cfg.beta_start.unwrap_or(1e-4);
        let end = cfg.beta_end.unwrap_or(0.02);
        let spec = if let Some(tb) = &cfg.trained_betas {
            if tb.len() != n {
                return Err(cfg.err("trained_betas", format!("{} values, but num_train_timesteps is {n}", tb.len())));
            }
            BetaSpec::Trained(tb.clone())
        } else {
            let schedule = cfg.beta_schedule.unwrap_or(BetaSchedule::Linear);
            if schedule != BetaSchedule::SquaredcosCapV2 {
                for (key, v) in [("beta_start", start), ("beta_end", end)] {
                    if !(v > 0.0 && v < 1.0) {
                        return Err(cfg.err(key, format!("{v} must lie in (0, 1)")));
                    }
                }
            }
            match schedule {
                BetaSchedule::Linear => BetaSpec::Linear(start, end),
                BetaSchedule::ScaledLinear => BetaSpec::ScaledLinear(start, end),
                BetaSchedule::SquaredcosCapV2 => BetaSpec::SquaredcosCapV2,
            }
        };
        let mut betas: Vec<f32> = match &spec {
            BetaSpec::Trained(tb) => tb.iter().map(|&b| b as f32).collect(),
            BetaSpec::Linear(s, e) => torch_linspace_f32(*s, *e, n),
            BetaSpec::ScaledLinear(s, e) => torch_linspace_f32(s.sqrt(), e.sqrt(), n).iter().map(|b| b * b).collect(),
            BetaSpec::SquaredcosCapV2 => squaredcos_betas_f64(n).iter().map(|&b| b as f32).collect(),
        };
        if let Some(i) = betas.iter().position(|b| !(*b >= 0.0 && *b < 1.0)) {
            let key = if matches!(spec, BetaSpec::Trained(_)) { "trained_betas" } else { "beta_end" };
            return Err(cfg.err(key, format!("beta[{i}] = {} lies outside [0, 1)", betas[i])));
        }
        let rescale_zero_snr = cfg.rescale_betas_zero_snr.unwrap_or(false);
        if rescale_zero_snr {
            betas = rescale_zero_terminal_snr_f32(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod_f32(&alphas);
        Ok(NoiseSchedule { spec, rescale_zero_snr, num_train_timesteps: n, betas, alphas_cumprod })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }

    /// (num_train_timesteps,) float32, as diffusers' `scheduler.betas`.
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// (num_train_timesteps,) float32, as diffusers' `scheduler.alphas_cumprod`.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The betas in float64 (numpy's `linspace` for the linear schedules): a reference, and
    /// for host-side weighting (SNR) that wants more than f32.
    pub fn betas_f64(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let b = match &self.spec {
            BetaSpec::Trained(tb) => tb.clone(),
            BetaSpec::Linear(s, e) => np_linspace(*s, *e, n),
            BetaSpec::ScaledLinear(s, e) => np_linspace(s.sqrt(), e.sqrt(), n).iter().map(|b| b * b).collect(),
            BetaSpec::SquaredcosCapV2 => squaredcos_betas_f64(n),
        };
        if self.rescale_zero_snr {
            rescale_zero_terminal_snr_f64(&b)
        } else {
            b
        }
    }

    /// `alphas_cumprod` in float64 (from [`Self::betas_f64`]).
    pub fn alphas_cumprod_f64(&self) -> Vec<f64> {
        let mut acc = 1.0;
        self.betas_f64()
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect()
    }

    /// `(sqrt(a_t), sqrt(1 - a_t))` per batch element as (B, 1, ..., 1) tensors on `like`'s device.
    fn forward_coefs(&self, op: &'static str, like: &Tensor, timesteps: &[usize]) -> Result<(Tensor, Tensor)> {
        let b = like.shape().first().copied().unwrap_or(0);
        if like.rank() < 1 || timesteps.len() != b {
            return Err(Error::shape(
                op,
                format!(
                    "{} timesteps for a batch of shape {:?} (need one per element of axis 0)",
                    timesteps.len(),
                    like.shape()
                ),
            ));
        }
        if let Some(&t) = timesteps.iter().find(|&&t| t >= self.num_train_timesteps) {
            return Err(Error::Invalid(format!(
                "{op}: timestep {t} out of range (num_train_timesteps is {})",
                self.num_train_timesteps
            )));
        }
        let mut shape = vec![1; like.rank()];
        shape[0] = b;
        let a: Vec<f32> = timesteps.iter().map(|&t| self.alphas_cumprod[t].sqrt()).collect();
        let s: Vec<f32> = timesteps.iter().map(|&t| (1.0 - self.alphas_cumprod[t]).sqrt()).collect();
        let dev = like.device();
        Ok((Tensor::from_vec(a, &shape, &dev)?, Tensor::from_vec(s, &shape, &dev)?))
    }

    /// Forward diffusion: `sqrt(a_t) * x0 + sqrt(1 - a_t) * noise` with `t = timesteps[b]`
    /// for batch element b. `x0`, `noise`: (B, ...) alike; `timesteps`: B values.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        same_shape("add_noise", x0, noise)?;
        let (a, s) = self.forward_coefs("add_noise", x0, timesteps)?;
        a.mul(x0)?.add(&s.mul(noise)?)
    }

    /// The v-prediction target: `sqrt(a_t) * noise - sqrt(1 - a_t) * x0` per batch element.
    /// `x0`, `noise`: (B, ...) alike; `timesteps`: B values.
    pub fn get_velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        same_shape("get_velocity", x0, noise)?;
        let (a, s) = self.forward_coefs("get_velocity", x0, timesteps)?;
        a.mul(noise)?.sub(&s.mul(x0)?)
    }

    /// `sqrt((1 - a) / a)` for every training timestep, with f32 ops (the Euler/DPM sigmas).
    pub(crate) fn sigma_table(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
    }

    /// The sigma-based schedulers floor the last `alphas_cumprod` at 2^-24 after a zero-SNR
    /// rescale so the last sigma stays finite.
    pub(crate) fn with_terminal_floor(mut self) -> Self {
        if self.rescale_zero_snr {
            if let Some(last) = self.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Timesteps
// ---------------------------------------------------------------------------------------------

fn check_num_steps(who: &'static str, n: usize, n_train: usize) -> Result<()> {
    if n == 0 || n > n_train {
        return Err(Error::Invalid(format!(
            "{who}: num_inference_steps {n} must lie in 1..={n_train} (num_train_timesteps)"
        )));
    }
    Ok(())
}

/// DDIM/DDPM `set_timesteps`: integer timesteps, noisiest first.
pub(crate) fn discrete_timesteps(
    who: &'static str,
    spacing: TimestepSpacing,
    n: usize,
    n_train: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    check_num_steps(who, n, n_train)?;
    let ts: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (n_train - 1) as f64, n).iter().rev().map(|v| v.round_ties_even() as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            np_arange(n_train as f64, 0.0, -ratio).iter().map(|v| v.round_ties_even() as i64 - 1).collect()
        }
    };
    to_indices(who, &ts, n_train)
}

/// Euler / Euler ancestral `set_timesteps`: float32 timesteps, noisiest first.
pub(crate) fn float_timesteps(
    who: &'static str,
    spacing: TimestepSpacing,
    n: usize,
    n_train: usize,
    steps_offset: usize,
) -> Result<Vec<f32>> {
    check_num_steps(who, n, n_train)?;
    let ts: Vec<f32> = match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (n_train - 1) as f64, n).iter().rev().map(|&v| v as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n).rev().map(|i| (i * ratio) as f32 + steps_offset as f32).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            np_arange(n_train as f64, 0.0, -ratio).iter().map(|v| v.round_ties_even() as f32 - 1.0).collect()
        }
    };
    if let Some(t) = ts.iter().find(|&&t| !(t >= 0.0 && t <= (n_train - 1) as f32)) {
        return Err(Error::Invalid(format!(
            "{who}: timestep {t} falls outside 0..{n_train} (check steps_offset and timestep_spacing)"
        )));
    }
    Ok(ts)
}

pub(crate) fn to_indices(who: &'static str, ts: &[i64], n_train: usize) -> Result<Vec<usize>> {
    ts.iter()
        .map(|&t| {
            if t < 0 || t as usize >= n_train {
                Err(Error::Invalid(format!(
                    "{who}: timestep {t} falls outside 0..{n_train} (check steps_offset and timestep_spacing)"
                )))
            } else {
                Ok(t as usize)
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Steps
// ---------------------------------------------------------------------------------------------

/// Where a step's random noise comes from. Only the steps that need noise draw it (DDPM for
/// t > 0, DDIM with eta > 0, Euler ancestral always), once per step, shaped like the sample.
pub enum Noise<'a> {
    /// No noise: a step that needs some fails, naming the scheduler.
    None,
    /// This tensor (shaped like the sample, on its device): replays a recorded run.
    Given(&'a Tensor),
    /// Standard normal values from a seeded generator.
    Rng(&'a mut Rng),
    /// Any other source, called with the sample's shape and device.
    Fn(&'a mut dyn FnMut(&[usize], &Device) -> Result<Tensor>),
}

impl Noise<'_> {
    pub(crate) fn draw(&mut self, who: &'static str, like: &Tensor) -> Result<Tensor> {
        let t = match self {
            Noise::None => {
                return Err(Error::Invalid(format!(
                    "{who}: this step adds random noise; pass Noise::Given, Noise::Rng or Noise::Fn"
                )))
            }
            Noise::Given(t) => (*t).clone(),
            Noise::Rng(rng) => Tensor::from_vec(rng.normal_vec(like.numel()), like.shape(), &like.device())?,
            Noise::Fn(f) => f(like.shape(), &like.device())?,
        };
        if t.shape() != like.shape() {
            return Err(Error::shape(who, format!("noise {:?} for a sample {:?}", t.shape(), like.shape())));
        }
        Ok(t)
    }
}

/// What one step returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The sample at the next (less noisy) timestep. Shaped like the sample.
    pub prev_sample: Tensor,
    /// The model's estimate of the clean sample x0 at this step. Shaped like the sample.
    pub pred_original_sample: Tensor,
}

/// What every scheduler offers. `i` is a position in `timesteps()`; steps run i = 0, 1, ...
pub trait NoiseScheduler {
    fn kind(&self) -> SchedulerKind;
    /// The training schedule (betas, alphas_cumprod, add_noise, get_velocity).
    fn schedule(&self) -> &NoiseSchedule;
    fn prediction_type(&self) -> PredictionType;
    /// diffusers' `set_timesteps(num_inference_steps)`; resets any multistep history.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps to feed the model, noisiest first (empty before `set_timesteps`).
    fn timesteps(&self) -> &[f32];
    /// The sigmas of the sigma-based schedulers (`len = timesteps + 1`, last 0), else `None`.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// The factor the pipeline multiplies unit-variance initial latents by.
    /// 1 for the DDPM family; the Euler schedulers start from a larger sigma.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
    /// The model's input at step `i`: the sample itself except for the Euler schedulers.
    /// `sample`: (B, C, H, W) or any shape.
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One denoising step from `timesteps()[i]`. `model_output`, `sample`: alike.
    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, noise: Noise<'_>) -> Result<StepOutput>;

    /// The timestep to feed the model at step `i`.
    fn timestep(&self, i: usize) -> Result<f32> {
        self.timesteps().get(i).copied().ok_or_else(|| {
            Error::Invalid(format!(
                "{}: step {i} out of range ({} timesteps; call set_timesteps first)",
                self.kind(),
                self.timesteps().len()
            ))
        })
    }
    /// See [`NoiseSchedule::add_noise`].
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        self.schedule().add_noise(x0, noise, timesteps)
    }
    /// See [`NoiseSchedule::get_velocity`].
    fn get_velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        self.schedule().get_velocity(x0, noise, timesteps)
    }
}

/// Any of the schedulers, picked by name or by the config's `_class_name`.
#[derive(Debug, Clone)]
pub enum Scheduler {
    Ddim(Ddim),
    Ddpm(Ddpm),
    Euler(Euler),
    EulerAncestral(EulerAncestral),
    DpmPp2m(DpmPp2m),
}

impl Scheduler {
    /// The scheduler `kind` configured from `cfg` (whatever class `cfg` was saved for, as
    /// diffusers' `<Scheduler>.from_config`).
    pub fn new(kind: SchedulerKind, cfg: &SchedulerConfig) -> Result<Self> {
        Ok(match kind {
            SchedulerKind::Ddim => Scheduler::Ddim(Ddim::new(cfg)?),
            SchedulerKind::Ddpm => Scheduler::Ddpm(Ddpm::new(cfg)?),
            SchedulerKind::Euler => Scheduler::Euler(Euler::new(cfg)?),
            SchedulerKind::EulerAncestral => Scheduler::EulerAncestral(EulerAncestral::new(cfg)?),
            SchedulerKind::DpmPp2m => Scheduler::DpmPp2m(DpmPp2m::new(cfg)?),
        })
    }

    /// By short name: `ddim`, `ddpm`, `euler`, `euler_a`, `dpmpp_2m`.
    pub fn from_name(name: &str, cfg: &SchedulerConfig) -> Result<Self> {
        Self::new(SchedulerKind::from_name(name)?, cfg)
    }

    /// The class the config names in `_class_name`.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let class =
            cfg.class_name.as_deref().ok_or_else(|| cfg.err("_class_name", "missing; pick a scheduler by name"))?;
        let kind = SchedulerKind::from_class_name(class).ok_or_else(|| {
            let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
            cfg.err("_class_name", format!("{class} is not implemented; pick one of {} by name", names.join(", ")))
        })?;
        Self::new(kind, cfg)
    }

    /// DDIM's eta (0 = deterministic DDIM, 1 = DDPM-like noise). Other schedulers accept
    /// only 0.
    pub fn with_eta(self, eta: f32) -> Result<Self> {
        match self {
            Scheduler::Ddim(d) => Ok(Scheduler::Ddim(d.with_eta(eta)?)),
            other if eta == 0.0 => Ok(other),
            other => Err(Error::Invalid(format!("eta {eta}: only ddim takes eta, not {}", other.kind()))),
        }
    }

    fn inner(&self) -> &dyn NoiseScheduler {
        match self {
            Scheduler::Ddim(s) => s,
            Scheduler::Ddpm(s) => s,
            Scheduler::Euler(s) => s,
            Scheduler::EulerAncestral(s) => s,
            Scheduler::DpmPp2m(s) => s,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn NoiseScheduler {
        match self {
            Scheduler::Ddim(s) => s,
            Scheduler::Ddpm(s) => s,
            Scheduler::Euler(s) => s,
            Scheduler::EulerAncestral(s) => s,
            Scheduler::DpmPp2m(s) => s,
        }
    }
}

impl NoiseScheduler for Scheduler {
    fn kind(&self) -> SchedulerKind {
        self.inner().kind()
    }
    fn schedule(&self) -> &NoiseSchedule {
        self.inner().schedule()
    }
    fn prediction_type(&self) -> PredictionType {
        self.inner().prediction_type()
    }
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.inner_mut().set_timesteps(n)
    }
    fn timesteps(&self) -> &[f32] {
        self.inner().timesteps()
    }
    fn sigmas(&self) -> Option<&[f32]> {
        self.inner().sigmas()
    }
    fn init_noise_sigma(&self) -> f32 {
        self.inner().init_noise_sigma()
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        self.inner().scale_model_input(sample, i)
    }
    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, noise: Noise<'_>) -> Result<StepOutput> {
        self.inner_mut().step(i, model_output, sample, noise)
    }
}

// ---------------------------------------------------------------------------------------------
// Shared step helpers
// ---------------------------------------------------------------------------------------------

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(op, format!("{:?} and {:?} must have the same shape", a.shape(), b.shape())));
    }
    Ok(())
}

/// Checks a step call: timesteps set, `i` in range, outputs shaped like the sample.
pub(crate) fn check_step(who: &'static str, i: usize, n: usize, model_output: &Tensor, sample: &Tensor) -> Result<()> {
    if n == 0 {
        return Err(Error::Invalid(format!("{who}: call set_timesteps before step")));
    }
    if i >= n {
        return Err(Error::Invalid(format!("{who}: step {i} out of range ({n} timesteps)")));
    }
    same_shape(who, model_output, sample)
}

/// `x / d` as a true f32 division (PyTorch divides by a 0-dim tensor, not by its reciprocal).
pub(crate) fn div_exact(x: &Tensor, d: f32) -> Result<Tensor> {
    x.div(&Tensor::from_vec(vec![d], &[1], &x.device())?)
}

/// x0 predicted by a variance-preserving model (DDIM, DDPM) at `alphas_cumprod = a_t`.
pub(crate) fn vp_pred_x0(pred: PredictionType, sample: &Tensor, m: &Tensor, a_t: f32) -> Result<Tensor> {
    let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
    match pred {
        PredictionType::Epsilon => div_exact(&sample.sub(&m.mul_scalar(sb)?)?, sa),
        PredictionType::VPrediction => sample.mul_scalar(sa)?.sub(&m.mul_scalar(sb)?),
        PredictionType::Sample => Ok(m.clone()),
    }
}

/// The noise implied by a VP model's output (with `x0` as returned by `vp_pred_x0`).
pub(crate) fn vp_pred_eps(pred: PredictionType, sample: &Tensor, m: &Tensor, x0: &Tensor, a_t: f32) -> Result<Tensor> {
    let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
    match pred {
        PredictionType::Epsilon => Ok(m.clone()),
        PredictionType::VPrediction => m.mul_scalar(sa)?.add(&sample.mul_scalar(sb)?),
        PredictionType::Sample => div_exact(&sample.sub(&x0.mul_scalar(sa)?)?, sb),
    }
}

/// x0 predicted by a model fed `sample / sqrt(sigma^2 + 1)` (Euler schedulers).
pub(crate) fn ve_pred_x0(pred: PredictionType, sample: &Tensor, m: &Tensor, sigma: f32) -> Result<Tensor> {
    match pred {
        PredictionType::Epsilon => sample.sub(&m.mul_scalar(sigma)?),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            m.mul_scalar(-sigma / s2.sqrt())?.add(&div_exact(sample, s2)?)
        }
        PredictionType::Sample => Ok(m.clone()),
    }
}

/// Shared config checks: options no scheduler here implements.
pub(crate) fn refuse_common(cfg: &SchedulerConfig) -> Result<()> {
    cfg.refuse_true("thresholding", cfg.thresholding, "dynamic thresholding is for pixel-space models")
}
