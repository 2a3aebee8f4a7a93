//! AdamW (`shaders/adamw.wgsl` with a CPU twin), gradient clipping, learning-rate schedules,
//! gradient accumulation and optimizer state checkpoints.
//!
//! Gradient accumulation: gradients add up in each param's slot over every `backward` until
//! `zero_grad`. For n micro-batches whose losses are means over their own samples, run the n
//! backwards, then `scale_grads(params, 1.0 / n)` (or divide each micro-batch loss by n) to get
//! the gradient of the mean over the whole batch; then clip, step, and zero the gradients.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::autograd::no_grad;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{groups_for, u32_of, PAR_MIN};
use crate::params::{key_report, metadata, parse, read_file, to_f32, write_safetensors, Param};
use crate::shaders::ADAMW;
use crate::tensor::{DType, Tensor};

/// Hyperparameters of `torch.optim.AdamW`; `Default` is PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Base learning rate (schedules scale from it; `step` takes the current one).
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = |v: f32| v.is_finite() && v >= 0.0;
        let bad = |what: &str, v: f32| Err(Error::Invalid(format!("adamw: {what} = {v} is out of range")));
        if !ok(self.lr) {
            return bad("lr", self.lr);
        }
        if !ok(self.beta1) || self.beta1 >= 1.0 {
            return bad("beta1 (needs 0 <= beta1 < 1)", self.beta1);
        }
        if !ok(self.beta2) || self.beta2 >= 1.0 {
            return bad("beta2 (needs 0 <= beta2 < 1)", self.beta2);
        }
        if !ok(self.eps) {
            return bad("eps", self.eps);
        }
        if !ok(self.weight_decay) {
            return bad("weight_decay", self.weight_decay);
        }
        Ok(())
    }
}

/// Mirror of `Params` in `shaders/adamw.wgsl`: one step's scalars, derived in f64 on the host.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamWParams {
    pub n: u32,
    pub _pad: [u32; 3],
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    pub beta1: f32,
    pub one_m_beta1: f32,
    pub beta2: f32,
    pub one_m_beta2: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamWParams {
    /// The scalars of step `t` (1-based, as PyTorch counts) at learning rate `lr`, for `n` elements.
    pub fn for_step(cfg: &AdamWConfig, lr: f32, t: u64, n: u32) -> AdamWParams {
        let (lr, b1, b2) = (lr as f64, cfg.beta1 as f64, cfg.beta2 as f64);
        let t = t as f64;
        AdamWParams {
            n,
            _pad: [0; 3],
            decay: (1.0 - lr * cfg.weight_decay as f64) as f32,
            beta1: cfg.beta1,
            one_m_beta1: (1.0 - b1) as f32,
            beta2: cfg.beta2,
            one_m_beta2: (1.0 - b2) as f32,
            step_size: (lr / (1.0 - b1.powf(t))) as f32,
            bc2_sqrt: (1.0 - b2.powf(t)).sqrt() as f32,
            eps: cfg.eps,
        }
    }
}

/// CPU twin of the shader, same order of operations: returns (w', m', v').
#[inline]
fn adamw_elem(h: &AdamWParams, w: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
    let wd = w * h.decay;
    let mi = h.beta1 * m + h.one_m_beta1 * g;
    let vi = h.beta2 * v + h.one_m_beta2 * (g * g);
    let denom = vi.sqrt() / h.bc2_sqrt + h.eps;
    (wd - h.step_size * (mi / denom), mi, vi)
}

/// One AdamW update as a functional op: new (param, m, v) in fresh tensors, all shaped like
/// `w`, on its device. `h.n` is set from `w`.
pub fn adamw_update(
    w: &Tensor, // (any shape) parameter
    g: &Tensor, // like w: gradient
    m: &Tensor, // like w: first moment
    v: &Tensor, // like w: second moment
    h: &AdamWParams,
) -> Result<(Tensor, Tensor, Tensor)> {
    adamw_impl(w, g, m, v, h, None)
}

/// [`adamw_update`] under a step guard (`ops::train_step::step_guard`, (4,) on `w`'s device):
/// the gradient is multiplied by `guard[0]` (clipping), and where `guard[1]` is 0 the outputs
/// are copies of `w`, `m` and `v` (a skipped step). Decided on the device: nothing is read.
pub fn adamw_update_guarded(
    w: &Tensor, // (any shape) parameter
    g: &Tensor, // like w: gradient
    m: &Tensor, // like w: first moment
    v: &Tensor, // like w: second moment
    h: &AdamWParams,
    guard: &Tensor, // (4,)
) -> Result<(Tensor, Tensor, Tensor)> {
    adamw_impl(w, g, m, v, h, Some(guard))
}

fn adamw_impl(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: &AdamWParams,
    guard: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "adamw";
    if let Some(gd) = guard {
        gd.ensure_f32(OP)?;
        w.same_device(OP, gd)?;
        if gd.shape() != [crate::ops::train_step::GUARD_LEN] {
            return Err(Error::shape(OP, format!("guard {:?}: expected (4,)", gd.shape())));
        }
    }
    for (what, t) in [("grad", g), ("m", m), ("v", v)] {
        t.ensure_f32(OP)?;
        w.same_device(OP, t)?;
        if t.shape() != w.shape() {
            return Err(Error::shape(OP, format!("{what} {:?} for a param of shape {:?}", t.shape(), w.shape())));
        }
    }
    w.ensure_f32(OP)?;
    let n = w.numel();
    let h = AdamWParams { n: u32_of(OP, n)?, ..*h };
    match w.device() {
        Device::Cpu => {
            let (wi, gi, mi, vi) = (w.cpu_f32(OP)?, g.cpu_f32(OP)?, m.cpu_f32(OP)?, v.cpu_f32(OP)?);
            let (coef, skip) = match guard {
                Some(gd) => {
                    let gd = gd.cpu_f32(OP)?;
                    (Some(gd[0]), gd[1] == 0.0)
                }
                None => (None, false),
            };
            if skip {
                let s = w.shape();
                return Ok((Tensor::cpu(wi.to_vec(), s), Tensor::cpu(mi.to_vec(), s), Tensor::cpu(vi.to_vec(), s)));
            }
            let (mut wo, mut mo, mut vo) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            let run = |base: usize, wo: &mut [f32], mo: &mut [f32], vo: &mut [f32]| {
                for j in 0..wo.len() {
                    let i = base + j;
                    let gv = coef.map_or(gi[i], |c| gi[i] * c);
                    (wo[j], mo[j], vo[j]) = adamw_elem(&h, wi[i], gv, mi[i], vi[i]);
                }
            };
            if n < PAR_MIN {
                run(0, &mut wo, &mut mo, &mut vo);
            } else {
                use rayon::prelude::*;
                const CHUNK: usize = 4096;
                wo.par_chunks_mut(CHUNK)
                    .zip(mo.par_chunks_mut(CHUNK))
                    .zip(vo.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(c, ((a, b), d))| run(c * CHUNK, a, b, d));
            }
            let s = w.shape();
            Ok((Tensor::cpu(wo, s), Tensor::cpu(mo, s), Tensor::cpu(vo, s)))
        }
        Device::Gpu(ctx) => {
            let s = w.shape();
            let (wo, mo, vo) =
                (Tensor::gpu_empty(&ctx, OP, s)?, Tensor::gpu_empty(&ctx, OP, s)?, Tensor::gpu_empty(&ctx, OP, s)?);
            let mut bufs = vec![
                w.gpu_buf(OP)?,
                g.gpu_buf(OP)?,
                m.gpu_buf(OP)?,
                v.gpu_buf(OP)?,
                wo.gpu_buf(OP)?,
                mo.gpu_buf(OP)?,
                vo.gpu_buf(OP)?,
            ];
            let entry = match guard {
                Some(gd) => {
                    bufs.push(gd.gpu_buf(OP)?);
                    "main_guarded"
                }
                None => "main",
            };
            ctx.dispatch(&ADAMW, entry, &h, &bufs, groups_for(&ctx, n))?;
            Ok((wo, mo, vo))
        }
    }
}

/// Moments of one param, on the param's device; `step` counts its own updates as PyTorch does
/// (a param without a gradient at some step is not advanced).
struct Moments {
    m: Tensor,
    v: Tensor,
    step: u64,
}

/// `torch.optim.AdamW`: decoupled weight decay, then Adam with bias correction.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Calls of `step` so far (what schedules index by).
    steps: u64,
    state: BTreeMap<String, Moments>,
}

/// What [`AdamW::undo`] needs to take back a guarded step: the counters before it.
#[derive(Debug)]
pub struct StepUndo {
    steps: u64,
    /// Each updated param's step count before the step (None: it had no state yet).
    prev: Vec<(String, Option<u64>)>,
    /// Params updated (or, where the guard skips, copied).
    pub updated: usize,
}

/// What `save_state` keeps in the file's metadata (one JSON entry, so the header is
/// deterministic).
#[derive(Serialize, Deserialize)]
struct StateMeta {
    version: u32,
    config: AdamWConfig,
    steps: u64,
    param_steps: BTreeMap<String, u64>,
}

const STATE_KEY: &str = "vipo.adamw";

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<AdamW> {
        config.validate()?;
        Ok(AdamW { config, steps: 0, state: BTreeMap::new() })
    }

    /// Number of `step` calls so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The learning rate `schedule` gives for the next step.
    pub fn lr_for(&self, schedule: &LrSchedule) -> f32 {
        schedule.lr_at(self.config.lr, self.steps)
    }

    /// Updates every trainable param of `params` that has a gradient, at learning rate `lr_now`.
    /// Returns how many were updated. Gradients are left in place (call `zero_grad`).
    pub fn step(&mut self, params: &[Arc<Param>], lr_now: f32) -> Result<usize> {
        Ok(self.step_impl(params, lr_now, None)?.updated)
    }

    /// [`Self::step`] under a step guard (`ops::train_step::step_guard`, (4,) on the params'
    /// device): gradients clipped by its coefficient, and no change at all where it says the
    /// step is skipped, without reading it. Read the guard afterwards; if it skipped the step,
    /// hand the returned record to [`Self::undo`] to take the step counters back.
    pub fn step_guarded(&mut self, params: &[Arc<Param>], lr_now: f32, guard: &Tensor) -> Result<StepUndo> {
        self.step_impl(params, lr_now, Some(guard))
    }

    /// Takes back the counters of a step its guard skipped (its kernels left every weight and
    /// moment as they were): the optimizer is then exactly as before that step.
    pub fn undo(&mut self, u: StepUndo) {
        self.steps = u.steps;
        for (name, prev) in u.prev {
            match prev {
                Some(t) => {
                    if let Some(s) = self.state.get_mut(&name) {
                        s.step = t;
                    }
                }
                None => {
                    self.state.remove(&name);
                }
            }
        }
    }

    fn step_impl(&mut self, params: &[Arc<Param>], lr_now: f32, guard: Option<&Tensor>) -> Result<StepUndo> {
        self.config.validate()?;
        if !(lr_now.is_finite() && lr_now >= 0.0) {
            return Err(Error::Invalid(format!("adamw: learning rate {lr_now} is out of range")));
        }
        let _g = no_grad();
        // Check everything first so a bad param leaves no param half-updated.
        let mut work = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in params {
            if !seen.insert(p.name()) {
                return Err(Error::Invalid(format!("adamw: param `{}` is listed twice", p.name())));
            }
            if !p.is_trainable() {
                continue;
            }
            let Some(g) = p.grad() else { continue };
            let w = p.frozen_value();
            if g.shape() != w.shape() {
                return Err(Error::shape("adamw", format!("param `{}` {w:?} has a gradient {g:?}", p.name())));
            }
            w.same_device("adamw", &g)?;
            work.push((p, w, g));
        }
        let mut undo = StepUndo { steps: self.steps, prev: Vec::with_capacity(work.len()), updated: 0 };
        for (p, w, g) in &work {
            let dev = w.device();
            let (m, v, t) = match self.state.get(p.name()) {
                Some(s) if s.m.shape() == w.shape() => (s.m.to(&dev)?, s.v.to(&dev)?, s.step + 1),
                Some(s) => {
                    return Err(Error::shape(
                        "adamw",
                        format!("state of `{}` has shape {:?}, the param {:?}", p.name(), s.m.shape(), w.shape()),
                    ))
                }
                None => (Tensor::zeros(w.shape(), &dev)?, Tensor::zeros(w.shape(), &dev)?, 1),
            };
            let h = AdamWParams::for_step(&self.config, lr_now, t, 0);
            let (w2, m2, v2) = adamw_impl(w, g, &m, &v, &h, guard)?;
            p.set_value(w2)?;
            let prev = self.state.insert(p.name().to_string(), Moments { m: m2, v: v2, step: t });
            undo.prev.push((p.name().to_string(), prev.map(|s| s.step)));
        }
        self.steps += 1;
        undo.updated = work.len();
        Ok(undo)
    }

    /// Writes the moments (`m.<name>`, `v.<name>`, f32) and, in the metadata, the step counts
    /// and hyperparameters; atomically (`path.tmp`, then rename).
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        let meta = StateMeta {
            version: 1,
            config: self.config,
            steps: self.steps,
            param_steps: self.state.iter().map(|(k, s)| (k.clone(), s.step)).collect(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| Error::Invalid(format!("adamw state: {e}")))?;
        let mut tensors = Vec::with_capacity(2 * self.state.len());
        for (k, s) in &self.state {
            tensors.push((format!("m.{k}"), s.m.clone()));
            tensors.push((format!("v.{k}"), s.v.clone()));
        }
        write_safetensors(path.as_ref(), tensors, DType::F32, BTreeMap::from([(STATE_KEY.to_string(), json)]))
    }

    /// Replaces this optimizer's state and hyperparameters (as `load_state_dict` does) with
    /// those saved in `path`, placing the moments on each param's device. Every state entry
    /// must match a param of `params` by name and shape; all mismatches are reported at once.
    pub fn load_state(&mut self, path: impl AsRef<Path>, params: &[Arc<Param>]) -> Result<()> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let st = parse(path, &bytes)?;
        let ferr = |msg: String| Error::File { path: path.to_path_buf(), msg };
        let meta: HashMap<String, String> = metadata(path, &bytes)?;
        let json = meta
            .get(STATE_KEY)
            .ok_or_else(|| ferr(format!("no `{STATE_KEY}` metadata: not an optimizer state written by vipo")))?;
        let meta: StateMeta =
            serde_json::from_str(json).map_err(|e| ferr(format!("bad `{STATE_KEY}` metadata: {e}")))?;
        if meta.version != 1 {
            return Err(ferr(format!("optimizer state version {} (this build reads 1)", meta.version)));
        }
        meta.config.validate().map_err(|e| ferr(e.to_string()))?;
        let by_name: BTreeMap<&str, &Arc<Param>> = params.iter().map(|p| (p.name(), p)).collect();
        // What the file holds against what the named params imply.
        let have: BTreeMap<String, Vec<usize>> = st.iter().map(|(k, v)| (k.to_string(), v.shape().to_vec())).collect();
        let mut want = BTreeMap::new();
        let mut problems = Vec::new();
        for name in meta.param_steps.keys() {
            match by_name.get(name.as_str()) {
                Some(p) => {
                    want.insert(format!("m.{name}"), p.shape().to_vec());
                    want.insert(format!("v.{name}"), p.shape().to_vec());
                }
                None => {
                    problems.push(format!("  state for `{name}`, which is not among the {} params given", params.len()))
                }
            }
        }
        let have: BTreeMap<String, Vec<usize>> = have
            .into_iter()
            .filter(|(k, _)| {
                let name = k.strip_prefix("m.").or_else(|| k.strip_prefix("v.")).unwrap_or(k);
                by_name.contains_key(name) || !meta.param_steps.contains_key(name)
            })
            .collect();
        problems.extend(key_report(&have, &want, "the state file", "the params"));
        if !problems.is_empty() {
            return Err(ferr(format!("optimizer state does not match the params given:\n{}", problems.join("\n"))));
        }
        let mut state = BTreeMap::new();
        for (name, &step) in &meta.param_steps {
            let p = by_name[name.as_str()];
            let dev = p.device();
            let load = |key: String| -> Result<Tensor> {
                let view = st.tensor(&key).map_err(|e| ferr(e.to_string()))?;
                Tensor::from_vec(to_f32(path, &key, &view)?, view.shape(), &dev)
            };
            state.insert(name.clone(), Moments { m: load(format!("m.{name}"))?, v: load(format!("v.{name}"))?, step });
        }
        self.config = meta.config;
        self.steps = meta.steps;
        self.state = state;
        Ok(())
    }
}

/// Global L2 norm of all gradients of `params` (summed on the device, one readback), and
/// when it exceeds `max_norm`, every gradient scaled by `max_norm / (norm + 1e-6)`, as
/// `torch.nn.utils.clip_grad_norm_`. Returns the norm before clipping (0 with no gradients).
/// A non-finite norm leaves the gradients as they are: the caller should skip the step.
pub fn clip_grad_norm(params: &[Arc<Param>], max_norm: f32) -> Result<f32> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::Invalid(format!("clip_grad_norm: max_norm {max_norm} must be positive and finite")));
    }
    let _g = no_grad();
    let mut total: Option<Tensor> = None;
    for p in params {
        let Some(g) = p.grad() else { continue };
        let s = g.square()?.sum_all()?;
        total = Some(match total {
            None => s,
            Some(t) => t.add(&s.to(&t.device())?)?,
        });
    }
    let Some(total) = total else { return Ok(0.0) };
    let norm = (total.scalar()? as f64).sqrt();
    let coef = max_norm as f64 / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        scale_grads(params, coef as f32)?;
    }
    Ok(norm as f32)
}

/// Multiplies every present gradient by `factor` (e.g. `1 / n` after n accumulated micro-batches).
pub fn scale_grads(params: &[Arc<Param>], factor: f32) -> Result<()> {
    let _g = no_grad();
    for p in params {
        if let Some(g) = p.grad() {
            p.set_grad(Some(g.mul_scalar(factor)?))?;
        }
    }
    Ok(())
}

pub fn zero_grad(params: &[Arc<Param>]) {
    params.iter().for_each(|p| p.zero_grad());
}

/// Learning rate as a function of the 0-based step about to be taken.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    /// `base * min(1, (step + 1) / warmup_steps)`.
    LinearWarmup {
        warmup_steps: u64,
    },
    /// The linear warm-up, then `min_lr + (base - min_lr) * (1 + cos(pi * p)) / 2` with
    /// `p = (step - warmup_steps) / (total_steps - warmup_steps)`, held at `min_lr` from
    /// `total_steps` on.
    Cosine {
        warmup_steps: u64,
        total_steps: u64,
        min_lr: f32,
    },
}

impl LrSchedule {
    pub fn lr_at(&self, base_lr: f32, step: u64) -> f32 {
        let base = base_lr as f64;
        let warm = |w: u64| if w == 0 { 1.0 } else { ((step + 1) as f64 / w as f64).min(1.0) };
        let lr = match *self {
            LrSchedule::Constant => base,
            LrSchedule::LinearWarmup { warmup_steps } => base * warm(warmup_steps),
            LrSchedule::Cosine { warmup_steps, total_steps, min_lr } => {
                if step < warmup_steps {
                    base * warm(warmup_steps)
                } else {
                    let span = total_steps.saturating_sub(warmup_steps);
                    let p = if span == 0 { 1.0 } else { ((step - warmup_steps) as f64 / span as f64).min(1.0) };
                    let lo = min_lr as f64;
                    lo + (base - lo) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
                }
            }
        };
        lr as f32
    }
}
