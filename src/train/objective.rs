//! The training objectives: SFT, Diffusion-DPO, Poly-DPO (the ViPO paper) and Diffusion-KTO.
//!
//! Every objective starts from per-sample denoising errors
//! `err(m, x) = mean over C, H, W of (target - m(x_t, t, c))^2` ([`per_sample_error`]), with the
//! target chosen by the scheduler config ([`Target`]). Preference batches are laid out as
//! diffusers' `train_diffusion_dpo.py` does: UNet batch = cat(winners, losers), winner i and
//! loser i sharing one timestep, one noise draw and one prompt ([`PreferenceBatch`]).
//!
//! Preference forms, per pair i (N pairs), with `s = beta / 2` when `half_factor` (default) or
//! `s = beta` without it:
//!
//! * `z_i = -s * [(err(θ, w_i) - err(ref, w_i)) - (err(θ, l_i) - err(ref, l_i))]`, `p_i = sigmoid(z_i)`;
//! * Diffusion-DPO: `L = mean_i -log p_i`, computed as `softplus(-z_i)` (finite for any z);
//! * Poly-DPO: `L = mean_i [-log p_i + alpha (1 - p_i)]`, `dL/dz_i = -(1 - p_i)(1 + alpha p_i) / N`.
//!   DPO *is* Poly-DPO with alpha = 0 here (one code path), so the two agree bit for bit.
//!
//! `half_factor`: the ViPO paper and Diffusion-DPO's original code write `-(beta/2)[...]`
//! (SD1.5: beta = 5000); diffusers' `train_diffusion_dpo.py` writes `-beta[...]` (its default
//! beta 2500 is the same objective). `half_factor: false` reproduces diffusers' example.
//!
//! Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility"; the
//! formula of its reference code, `train_kto_sd_v1.5.py`, `--loss kto --halo sigmoid`), per
//! sample j with label `y_j = +1` (desirable) or `-1` (undesirable):
//!
//! * `g_j = err(ref, x_j) - err(θ, x_j)` (the implicit log-likelihood ratio),
//! * reference point `Q = max(0, mean_j g_j)` over the batch, held constant (no gradient),
//! * `h_j = sigmoid(y_j * beta * (g_j - Q))`, `L = mean_j lambda_{y_j} (1 - h_j)`.
//!
//! KTO uses beta as its source does (no half factor). On a preference batch winners are the
//! desirable samples and losers the undesirable ones; [`ObjectiveConfig::loss_with_labels`]
//! takes any labels.
//!
//! SFT: `L = mean over winners of err(θ, w)`, diffusers' plain MSE diffusion loss.
//!
//! The loss head (from the per-sample errors to the scalar) is a few scalars: [`ObjectiveConfig::loss`]
//! runs it on the host in f64 with its exact derivative, as one autograd node over the policy's
//! errors. That keeps `softplus` stable and gives the true gradient at z = 0 (where a new LoRA
//! starts), and the statistics come from the same numbers. Every objective also has a head on
//! the errors' device ([`ObjectiveConfig::loss_on_device`], f32: `shaders/train_step.wgsl` for
//! the DPO forms and KTO, a mean for SFT): a GPU training step then reads nothing back until it
//! ends.

use crate::autograd::{no_grad, record};
use crate::error::{Error, Result};
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::rng::Rng;
use crate::schedulers::{NoiseSchedule, PredictionType, SchedulerConfig};
use crate::tensor::Tensor;
use crate::train::lora::lora_off;

/// What the model is trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The noise (`prediction_type = "epsilon"`: SD1.5, SDXL).
    Epsilon,
    /// `sqrt(a_t) noise - sqrt(1 - a_t) x0` (`"v_prediction"`: SD2.x 768).
    VPrediction,
    /// x0 itself (`"sample"`).
    Sample,
    /// Flow matching (SD3.5, FLUX, Wan): `noise - x0` at `x_t = (1 - s) x0 + s noise`.
    FlowVelocity,
}

impl Target {
    /// A `FlowMatch*` scheduler class (or `use_flow_sigmas`) means flow matching; otherwise
    /// `prediction_type` decides (default `epsilon`, as in diffusers).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Target> {
        let flow =
            cfg.class_name.as_deref().is_some_and(|c| c.starts_with("FlowMatch")) || cfg.use_flow_sigmas == Some(true);
        if flow {
            if let Some(p) = cfg.prediction_type.filter(|p| *p != PredictionType::Epsilon) {
                return Err(cfg.err(
                    "prediction_type",
                    format!(
                        "{p:?} with a flow-matching scheduler (vipo trains flow models on the velocity noise - x0)"
                    ),
                ));
            }
            return Ok(Target::FlowVelocity);
        }
        Ok(match cfg.prediction_type.unwrap_or(PredictionType::Epsilon) {
            PredictionType::Epsilon => Target::Epsilon,
            PredictionType::VPrediction => Target::VPrediction,
            PredictionType::Sample => Target::Sample,
        })
    }
}

/// How much noise each sample gets: discrete training timesteps (DDPM-style processes) or
/// flow-matching sigmas in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub enum NoiseLevel {
    Timesteps(Vec<usize>),
    Sigmas(Vec<f32>),
}

impl NoiseLevel {
    pub fn len(&self) -> usize {
        match self {
            NoiseLevel::Timesteps(t) => t.len(),
            NoiseLevel::Sigmas(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The same levels twice over (winners, then losers).
    pub fn repeat2(&self) -> NoiseLevel {
        match self {
            NoiseLevel::Timesteps(t) => NoiseLevel::Timesteps([t.as_slice(), t.as_slice()].concat()),
            NoiseLevel::Sigmas(s) => NoiseLevel::Sigmas([s.as_slice(), s.as_slice()].concat()),
        }
    }
}

/// The forward (noising) process and target of a scheduler config.
#[derive(Debug, Clone)]
pub enum ForwardProcess {
    /// `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise` (diffusers' `add_noise`); target Epsilon,
    /// VPrediction or Sample.
    Ddpm { schedule: NoiseSchedule, target: Target },
    /// `x_t = (1 - s) x0 + s noise`, target `noise - x0`; the model sees `t = s * num_train_timesteps`.
    Flow { num_train_timesteps: usize },
}

/// A noised batch: what the model gets and what it should output.
#[derive(Debug, Clone)]
pub struct Noised {
    /// (B, C, H, W)
    pub noisy: Tensor,
    /// (B, C, H, W)
    pub target: Tensor,
    /// (B,) f32, the model's timestep input.
    pub timesteps: Tensor,
}

impl ForwardProcess {
    pub fn from_config(cfg: &SchedulerConfig) -> Result<ForwardProcess> {
        Ok(match Target::from_config(cfg)? {
            Target::FlowVelocity => {
                let n = cfg.num_train_timesteps.unwrap_or(1000);
                if n == 0 {
                    return Err(cfg.err("num_train_timesteps", "0"));
                }
                ForwardProcess::Flow { num_train_timesteps: n }
            }
            target => ForwardProcess::Ddpm { schedule: NoiseSchedule::new(cfg)?, target },
        })
    }

    pub fn target(&self) -> Target {
        match self {
            ForwardProcess::Ddpm { target, .. } => *target,
            ForwardProcess::Flow { .. } => Target::FlowVelocity,
        }
    }

    pub fn num_train_timesteps(&self) -> usize {
        match self {
            ForwardProcess::Ddpm { schedule, .. } => schedule.num_train_timesteps(),
            ForwardProcess::Flow { num_train_timesteps } => *num_train_timesteps,
        }
    }

    /// `n` noise levels drawn uniformly: timesteps in [0, num_train_timesteps) (diffusers'
    /// `torch.randint`), or sigmas in [0, 1).
    pub fn sample_levels(&self, n: usize, rng: &mut Rng) -> NoiseLevel {
        match self {
            ForwardProcess::Ddpm { schedule, .. } => {
                NoiseLevel::Timesteps((0..n).map(|_| rng.below(schedule.num_train_timesteps())).collect())
            }
            ForwardProcess::Flow { .. } => NoiseLevel::Sigmas((0..n).map(|_| rng.uniform()).collect()),
        }
    }

    /// Noises `x0` (B, ...) with `noise` (B, ...) at one level per sample.
    pub fn noise(&self, x0: &Tensor, noise: &Tensor, level: &NoiseLevel) -> Result<Noised> {
        const OP: &str = "forward process";
        if x0.shape() != noise.shape() || x0.rank() < 1 || level.len() != x0.shape()[0] {
            return Err(Error::shape(
                OP,
                format!(
                    "x0 {:?}, noise {:?} and {} noise levels (need equal shapes, one level per sample)",
                    x0.shape(),
                    noise.shape(),
                    level.len()
                ),
            ));
        }
        let dev = x0.device();
        match (self, level) {
            (ForwardProcess::Ddpm { schedule, target }, NoiseLevel::Timesteps(t)) => {
                let noisy = schedule.add_noise(x0, noise, t)?;
                let target = match target {
                    Target::Epsilon => noise.clone(),
                    Target::VPrediction => schedule.get_velocity(x0, noise, t)?,
                    Target::Sample => x0.clone(),
                    Target::FlowVelocity => {
                        return Err(Error::Invalid(format!("{OP}: a DDPM process with a flow target")))
                    }
                };
                let ts = Tensor::from_vec(t.iter().map(|&v| v as f32).collect(), &[t.len()], &dev)?;
                Ok(Noised { noisy, target, timesteps: ts })
            }
            (ForwardProcess::Flow { num_train_timesteps }, NoiseLevel::Sigmas(s)) => {
                if let Some(bad) = s.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                    return Err(Error::Invalid(format!("{OP}: flow sigma {bad} outside [0, 1]")));
                }
                let mut shape = vec![1; x0.rank()];
                shape[0] = s.len();
                let sig = Tensor::from_vec(s.clone(), &shape, &dev)?; // (B, 1, ..., 1)
                let one_m = Tensor::from_vec(s.iter().map(|v| 1.0 - v).collect(), &shape, &dev)?;
                let noisy = one_m.mul(x0)?.add(&sig.mul(noise)?)?;
                let target = noise.sub(x0)?;
                let n = *num_train_timesteps as f32;
                let ts = Tensor::from_vec(s.iter().map(|v| v * n).collect(), &[s.len()], &dev)?;
                Ok(Noised { noisy, target, timesteps: ts })
            }
            (ForwardProcess::Ddpm { .. }, NoiseLevel::Sigmas(_)) => {
                Err(Error::Invalid(format!("{OP}: sigmas given to a DDPM-style process (it takes timesteps)")))
            }
            (ForwardProcess::Flow { .. }, NoiseLevel::Timesteps(_)) => {
                Err(Error::Invalid(format!("{OP}: timesteps given to a flow-matching process (it takes sigmas)")))
            }
        }
    }
}

/// pred, target (B, ...) -> (B,): mean over all but the batch axis of `(target - pred)^2`
/// (`F.mse_loss(..., reduction="none").mean(dim=[1, 2, 3])`). Differentiable.
pub fn per_sample_error(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.shape() != target.shape() || pred.rank() < 2 {
        return Err(Error::shape(
            "per_sample_error",
            format!("pred {:?} and target {:?} (need equal shapes (B, ...))", pred.shape(), target.shape()),
        ));
    }
    let b = pred.shape()[0];
    pred.sub(target)?.square()?.reshape_to(&[b, pred.numel() / b.max(1)])?.mean(1, false)
}

/// A batch of N preference pairs.
#[derive(Debug, Clone)]
pub struct PreferenceBatch {
    /// (N, C, H, W) latents of the preferred images.
    pub latents_w: Tensor,
    /// (N, C, H, W) latents of the rejected images.
    pub latents_l: Tensor,
    /// (N, C, H, W), shared by pair i's winner and loser.
    pub noise: Tensor,
    /// N levels, shared by pair i's winner and loser.
    pub level: NoiseLevel,
    /// (N, L, D) prompt embeddings, shared within a pair.
    pub encoder_hidden_states: Tensor,
}

/// UNet inputs for a whole batch.
#[derive(Debug, Clone)]
pub struct ModelInputs {
    pub noised: Noised,
    /// (B, L, D)
    pub encoder_hidden_states: Tensor,
}

impl PreferenceBatch {
    fn check(&self) -> Result<usize> {
        let n = self.latents_w.shape().first().copied().unwrap_or(0);
        let ok = self.latents_w.shape() == self.latents_l.shape()
            && self.latents_w.shape() == self.noise.shape()
            && self.level.len() == n
            && self.encoder_hidden_states.shape().first() == Some(&n)
            && n > 0;
        if !ok {
            return Err(Error::shape(
                "preference batch",
                format!(
                    "latents_w {:?}, latents_l {:?}, noise {:?}, {} levels, encoder_hidden_states {:?} (need N pairs \
                     throughout)",
                    self.latents_w.shape(),
                    self.latents_l.shape(),
                    self.noise.shape(),
                    self.level.len(),
                    self.encoder_hidden_states.shape()
                ),
            ));
        }
        Ok(n)
    }

    /// Inputs for cat(w, l): 2N samples, noise, levels and prompts repeated for the losers.
    pub fn inputs(&self, process: &ForwardProcess) -> Result<ModelInputs> {
        self.check()?;
        let x0 = Tensor::concat(&[&self.latents_w, &self.latents_l], 0)?;
        let noise = Tensor::concat(&[&self.noise, &self.noise], 0)?;
        let noised = process.noise(&x0, &noise, &self.level.repeat2())?;
        let ehs = Tensor::concat(&[&self.encoder_hidden_states, &self.encoder_hidden_states], 0)?;
        Ok(ModelInputs { noised, encoder_hidden_states: ehs })
    }

    /// Inputs for the winners alone (SFT).
    pub fn winner_inputs(&self, process: &ForwardProcess) -> Result<ModelInputs> {
        self.check()?;
        let noised = process.noise(&self.latents_w, &self.noise, &self.level)?;
        Ok(ModelInputs { noised, encoder_hidden_states: self.encoder_hidden_states.clone() })
    }
}

/// Which loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Plain diffusion loss on the winners (no reference model).
    Sft,
    /// Diffusion-DPO: `-log sigmoid(z)`.
    Dpo,
    /// The ViPO paper's Poly-DPO: `-log p + alpha (1 - p)`.
    PolyDpo { alpha: f64 },
    /// Diffusion-KTO (see the module docs).
    Kto,
}

/// An objective with its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectiveConfig {
    pub objective: Objective,
    /// KL strength beta (DPO/Poly-DPO/KTO).
    pub beta: f64,
    /// DPO/Poly-DPO only: `z = -(beta/2)[...]` when true (the paper's and Diffusion-DPO's
    /// convention, the default), `z = -beta[...]` when false (diffusers' example).
    pub half_factor: bool,
    /// KTO's weight on desirable samples (lambda_D).
    pub kto_lambda_desirable: f64,
    /// KTO's weight on undesirable samples (lambda_U).
    pub kto_lambda_undesirable: f64,
}

impl Default for ObjectiveConfig {
    /// Diffusion-DPO with SD1.5's beta = 5000 and the paper's half factor.
    fn default() -> Self {
        ObjectiveConfig {
            objective: Objective::Dpo,
            beta: 5000.0,
            half_factor: true,
            kto_lambda_desirable: 1.0,
            kto_lambda_undesirable: 1.0,
        }
    }
}

/// What a loss evaluation reports besides the loss tensor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectiveStats {
    pub loss: f64,
    /// Per-sample errors of the policy (cat(w, l) order for preference objectives).
    pub policy_err: Vec<f64>,
    /// Per-sample errors of the reference (empty for SFT).
    pub ref_err: Vec<f64>,
    /// DPO forms: per pair `err(θ, w) - err(θ, l)` and the reference's.
    pub model_diff: Vec<f64>,
    pub ref_diff: Vec<f64>,
    /// DPO forms: the logit z per pair. KTO: `y_j * beta * (g_j - Q)` per sample.
    pub z: Vec<f64>,
    /// sigmoid(z).
    pub p: Vec<f64>,
    /// Fraction of z > 0 (DPO: the winner's implicit reward beats the loser's).
    pub implicit_acc: Option<f64>,
    pub mean_p: Option<f64>,
    /// DPO forms: mean(reward_w - reward_l) with `reward = -s (err(θ) - err(ref))`, i.e. mean z.
    pub reward_margin: Option<f64>,
    /// KTO: the reference point Q.
    pub kto_reference_point: Option<f64>,
    /// dL / d err(θ, x_j) per sample: the weights the backward sends into the model.
    pub dloss_derr: Vec<f64>,
    /// DPO forms: dL / d model_diff_i per pair.
    pub dloss_dmodel_diff: Vec<f64>,
}

/// A loss tensor (shape [], differentiable w.r.t. the policy) and its statistics.
#[derive(Debug, Clone)]
pub struct ObjectiveOutput {
    pub loss: Tensor,
    pub stats: ObjectiveStats,
}

/// Which head a [`DeviceLoss`] ran, and so how its output is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceHead {
    /// DPO and Poly-DPO: `ops::train_step::HeadLayout`, errors cat(w, l).
    Dpo { pairs: usize },
    /// KTO: `ops::train_step::KtoLayout`, errors cat(w, l) (winners desirable).
    Kto { samples: usize },
    /// SFT: the loss alone, over the winners' errors.
    Sft { samples: usize },
}

impl DeviceHead {
    /// Elements of the head's output.
    pub fn size(&self) -> usize {
        match *self {
            DeviceHead::Dpo { pairs } => crate::ops::train_step::HeadLayout { pairs }.size(),
            DeviceHead::Kto { samples } => crate::ops::train_step::KtoLayout { samples }.size(),
            DeviceHead::Sft { .. } => 1,
        }
    }

    /// Per-sample errors of the policy (and as many of the reference, but for SFT).
    pub fn samples(&self) -> usize {
        match *self {
            DeviceHead::Dpo { pairs } => 2 * pairs,
            DeviceHead::Kto { samples } | DeviceHead::Sft { samples } => samples,
        }
    }

    /// Elements of a [`DeviceLoss::readout`]: the head, the policy's errors, the reference's.
    pub fn readout_len(&self) -> usize {
        let refs = if matches!(self, DeviceHead::Sft { .. }) { 0 } else { self.samples() };
        self.size() + self.samples() + refs
    }
}

/// A loss whose head ran where the errors are (`ops::train_step`'s heads, or a mean for SFT),
/// so nothing was read back: [`ObjectiveConfig::loss_on_device`]. Its statistics come out of
/// [`Self::readout`]'s tensors, read whenever the step is ready to wait.
#[derive(Debug, Clone)]
pub struct DeviceLoss {
    /// (), differentiable w.r.t. the policy's errors.
    pub loss: Tensor,
    /// The head's output, laid out as `kind` says.
    pub head: Tensor,
    /// (B,) each (DPO forms and KTO: cat(w, l)); no reference for SFT.
    pub err_policy: Tensor,
    pub err_ref: Option<Tensor>,
    pub kind: DeviceHead,
}

impl DeviceLoss {
    /// Elements of [`Self::readout`].
    pub fn readout_len(&self) -> usize {
        self.kind.readout_len()
    }

    /// What [`ObjectiveConfig::stats_from_readout`] reads, in its order: the head, then the
    /// policy's and the reference's errors (concatenate them with whatever else the step
    /// reads, so that one read gets all).
    pub fn readout(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.head, &self.err_policy];
        v.extend(self.err_ref.as_ref());
        v
    }
}

/// `log(1 + e^x)` without overflow or cancellation.
pub fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `1 / (1 + e^-x)` without overflow.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl ObjectiveConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("objective: {msg}")));
        let beta_ok = self.beta.is_finite() && self.beta > 0.0;
        if self.needs_reference() && !beta_ok {
            return bad(format!("beta {} must be a positive number", self.beta));
        }
        if let Objective::PolyDpo { alpha } = self.objective {
            if !alpha.is_finite() {
                return bad(format!("Poly-DPO alpha {alpha} must be finite"));
            }
        }
        for (k, v) in [
            ("kto_lambda_desirable", self.kto_lambda_desirable),
            ("kto_lambda_undesirable", self.kto_lambda_undesirable),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{k} {v} must be a non-negative number"));
            }
        }
        Ok(())
    }

    /// Whether the objective compares against a reference model (all but SFT).
    pub fn needs_reference(&self) -> bool {
        !matches!(self.objective, Objective::Sft)
    }

    /// `s` in `z = -s [...]`: beta/2 with the half factor, beta without.
    pub fn logit_scale(&self) -> f64 {
        if self.half_factor {
            0.5 * self.beta
        } else {
            self.beta
        }
    }

    /// The loss on a preference batch's per-sample errors, cat(w, l) order: `err_policy`
    /// (2N,) from the policy (tracked), `err_ref` (2N,) from the reference (any tracking is
    /// ignored; None only for SFT).
    pub fn loss(&self, err_policy: &Tensor, err_ref: Option<&Tensor>) -> Result<ObjectiveOutput> {
        self.loss_impl(err_policy, err_ref, None)
    }

    /// KTO or SFT on unpaired samples, `labels[j]` true for desirable (SFT: the mean error over
    /// the desirable ones; a winners-only batch is all true). DPO forms need pairs.
    pub fn loss_with_labels(
        &self,
        err_policy: &Tensor,
        err_ref: Option<&Tensor>,
        labels: &[bool],
    ) -> Result<ObjectiveOutput> {
        if !matches!(self.objective, Objective::Kto | Objective::Sft) {
            return Err(Error::Invalid(format!("objective: labels are for KTO and SFT, not {:?}", self.objective)));
        }
        self.loss_impl(err_policy, err_ref, Some(labels))
    }

    fn loss_impl(
        &self,
        err_policy: &Tensor,
        err_ref: Option<&Tensor>,
        labels: Option<&[bool]>,
    ) -> Result<ObjectiveOutput> {
        self.validate()?;
        if err_policy.rank() != 1 {
            return Err(Error::shape("objective", format!("policy errors {:?}: expected (B,)", err_policy.shape())));
        }
        let (e, r): (Vec<f64>, Option<Vec<f64>>) = match err_ref {
            // Both in one readback: on a GPU each read waits for everything recorded so far.
            Some(t) if t.shape() == err_policy.shape() && t.device() == err_policy.device() => {
                let both = {
                    let _g = no_grad();
                    Tensor::concat(&[err_policy, t], 0)?.to_vec()?
                };
                let (e, r) = both.split_at(err_policy.numel());
                (e.iter().map(|&v| v as f64).collect(), Some(r.iter().map(|&v| v as f64).collect()))
            }
            Some(t) if t.shape() == err_policy.shape() => (
                err_policy.to_vec()?.iter().map(|&v| v as f64).collect(),
                Some(t.to_vec()?.iter().map(|&v| v as f64).collect()),
            ),
            Some(t) => {
                return Err(Error::shape(
                    "objective",
                    format!("policy errors {:?} and reference errors {:?} differ", err_policy.shape(), t.shape()),
                ))
            }
            None => (err_policy.to_vec()?.iter().map(|&v| v as f64).collect(), None),
        };
        let stats = self.head(&e, r.as_deref(), labels)?;
        let out = Tensor::from_vec(vec![stats.loss as f32], &[], &err_policy.device())?;
        let w: Vec<f32> = stats.dloss_derr.iter().map(|&v| v as f32).collect();
        let n = w.len();
        let loss = record("objective", out, &[err_policy], move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let w = Tensor::from_vec(w, &[n], &g.device())?; // (B,)
            Ok(vec![Some(w.mul(&g.reshape_to(&[1])?)?)])
        });
        Ok(ObjectiveOutput { loss, stats })
    }

    /// [`Self::loss`] with the head computed on the errors' device in f32 (a kernel on a GPU),
    /// so that the step reads nothing back. `err_policy` (B,) tracked; `err_ref` (B,) for every
    /// objective but SFT, which ignores it. The DPO forms and KTO take the cat(w, l) layout
    /// (KTO: winners desirable); SFT the winners' errors alone, all desirable (as the trainer
    /// and [`unet_step`] pass them; [`Self::loss`] given cat(w, l) for SFT would average the
    /// first half instead). A non-finite loss is not an error here: it shows in the read
    /// statistics and the step guard.
    pub fn loss_on_device(&self, err_policy: &Tensor, err_ref: Option<&Tensor>) -> Result<DeviceLoss> {
        use crate::ops::train_step::{kto_head, poly_dpo_head, HeadLayout, KtoLayout};
        self.validate()?;
        if err_policy.rank() != 1 || err_policy.numel() == 0 {
            return Err(Error::shape("objective", format!("policy errors {:?}: expected (B,)", err_policy.shape())));
        }
        let b = err_policy.numel();
        let err_ref = match (self.objective, err_ref) {
            (Objective::Sft, _) => None,
            (_, Some(r)) => Some(r.detach()),
            (other, None) => {
                return Err(Error::Invalid(format!("objective {other:?} needs the reference model's errors")))
            }
        };
        let pairs = || -> Result<usize> {
            if !b.is_multiple_of(2) {
                return Err(Error::shape("objective", format!("{b} per-sample errors: cat(w, l) is an even count")));
            }
            Ok(b / 2)
        };
        // The head's output (no gradient of its own), its loss slot, and dL/derr as a slice of it.
        let (head, kind, dl_at) = {
            let _g = no_grad();
            match (self.objective, &err_ref) {
                (Objective::Dpo | Objective::PolyDpo { .. }, Some(r)) => {
                    let alpha = match self.objective {
                        Objective::PolyDpo { alpha } => alpha,
                        _ => 0.0,
                    };
                    let n = pairs()?;
                    let h = poly_dpo_head(err_policy, r, self.logit_scale() as f32, alpha as f32)?;
                    (h, DeviceHead::Dpo { pairs: n }, Some(HeadLayout { pairs: n }.dloss_derr()))
                }
                (Objective::Kto, Some(r)) => {
                    let n = pairs()?;
                    let (ld, lu) = (self.kto_lambda_desirable as f32, self.kto_lambda_undesirable as f32);
                    let h = kto_head(err_policy, r, n, self.beta as f32, ld, lu)?;
                    (h, DeviceHead::Kto { samples: b }, Some(KtoLayout { samples: b }.dloss_derr()))
                }
                // SFT: the mean of the winners' errors; its gradient, 1/B each, needs no head.
                _ => (err_policy.mean_all()?.reshape_to(&[1])?, DeviceHead::Sft { samples: b }, None),
            }
        };
        let value = {
            let _g = no_grad();
            head.narrow(0, 0, 1)?.reshape_to(&[])?
        };
        let h = head.clone();
        let loss = record("objective", value, &[err_policy], move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let w = match dl_at {
                Some(at) => h.narrow(0, at, b)?, // (B,)
                None => Tensor::full(1.0 / b as f32, &[b], &g.device())?,
            };
            Ok(vec![Some(w.mul(&g.reshape_to(&[1])?)?)])
        });
        Ok(DeviceLoss { loss, head, err_policy: err_policy.detach(), err_ref, kind })
    }

    /// The statistics of a [`DeviceLoss`] whose head is `kind`, from its
    /// [`DeviceLoss::readout`], read.
    pub fn stats_from_readout(&self, v: &[f32], kind: DeviceHead) -> Result<ObjectiveStats> {
        use crate::ops::train_step::{HeadLayout, KtoLayout};
        let b = kind.samples();
        if v.len() != kind.readout_len() || b == 0 {
            return Err(Error::shape("objective", format!("{} read values for a {kind:?} head", v.len())));
        }
        let f = |a: usize, len: usize| -> Vec<f64> { v[a..a + len].iter().map(|&x| x as f64).collect() };
        let size = kind.size();
        let mut st = ObjectiveStats { loss: v[0] as f64, policy_err: f(size, b), ..Default::default() };
        match kind {
            DeviceHead::Dpo { pairs: n } => {
                let lay = HeadLayout { pairs: n };
                let dl = f(lay.dloss_derr(), 2 * n);
                st.ref_err = f(size + b, b);
                st.model_diff = f(lay.model_diff(), n);
                st.ref_diff = f(lay.ref_diff(), n);
                st.z = f(lay.z(), n);
                st.p = f(lay.p(), n);
                st.dloss_dmodel_diff = dl[..n].to_vec();
                st.dloss_derr = dl;
                st.reward_margin = Some(mean(&st.z));
            }
            DeviceHead::Kto { samples } => {
                let lay = KtoLayout { samples };
                st.ref_err = f(size + b, b);
                st.z = f(lay.u(), b);
                st.p = f(lay.h(), b);
                st.dloss_derr = f(lay.dloss_derr(), b);
                st.kto_reference_point = Some(v[lay.q()] as f64);
            }
            DeviceHead::Sft { samples } => st.dloss_derr = vec![1.0 / samples as f64; samples],
        }
        if !st.z.is_empty() {
            st.implicit_acc = Some(st.z.iter().filter(|&&z| z > 0.0).count() as f64 / st.z.len() as f64);
            st.mean_p = Some(mean(&st.p));
        }
        Ok(st)
    }

    /// Desirable flags: the given labels, or winners (first half) of a cat(w, l) batch.
    fn labels(&self, b: usize, labels: Option<&[bool]>, pairs: impl Fn() -> Result<usize>) -> Result<Vec<bool>> {
        match labels {
            Some(l) if l.len() == b && b > 0 => Ok(l.to_vec()),
            Some(l) => Err(Error::shape("objective", format!("{} labels for {b} samples", l.len()))),
            None => {
                let n = pairs()?;
                Ok((0..b).map(|i| i < n).collect())
            }
        }
    }

    /// The loss and its derivative w.r.t. each policy error, in f64 on the host: `e`, `r`
    /// the policy's and reference's per-sample errors, `labels` as in [`Self::loss_with_labels`]
    /// (None: the cat(w, l) layout).
    pub fn head(&self, e: &[f64], r: Option<&[f64]>, labels: Option<&[bool]>) -> Result<ObjectiveStats> {
        let b = e.len();
        let mut st = ObjectiveStats {
            policy_err: e.to_vec(),
            ref_err: r.map(|r| r.to_vec()).unwrap_or_default(),
            ..Default::default()
        };
        let need_ref = || {
            r.ok_or_else(|| {
                Error::Invalid(format!("objective {:?} needs the reference model's errors", self.objective))
            })
        };
        let pairs = || -> Result<usize> {
            if b == 0 || !b.is_multiple_of(2) {
                return Err(Error::shape(
                    "objective",
                    format!("{b} per-sample errors: a preference batch is cat(w, l), an even count"),
                ));
            }
            Ok(b / 2)
        };
        match self.objective {
            Objective::Sft => {
                let lab = self.labels(b, labels, pairs)?;
                let k = lab.iter().filter(|&&l| l).count();
                if k == 0 {
                    return Err(Error::Invalid("objective Sft: no desirable sample in the batch".into()));
                }
                st.loss = (0..b).filter(|&j| lab[j]).map(|j| e[j]).sum::<f64>() / k as f64;
                st.dloss_derr = lab.iter().map(|&l| if l { 1.0 / k as f64 } else { 0.0 }).collect();
            }
            Objective::Dpo | Objective::PolyDpo { .. } => {
                // DPO is Poly-DPO at alpha = 0: the same arithmetic, so the same bits.
                let alpha = match self.objective {
                    Objective::PolyDpo { alpha } => alpha,
                    _ => 0.0,
                };
                let r = need_ref()?;
                let n = pairs()?;
                let s = self.logit_scale();
                st.dloss_derr = vec![0.0; b];
                let mut total = 0.0;
                for i in 0..n {
                    let md = e[i] - e[n + i];
                    let rd = r[i] - r[n + i];
                    let z = -s * (md - rd);
                    let p = sigmoid(z);
                    let q = sigmoid(-z); // 1 - p, without cancellation
                    total += softplus(-z) + alpha * q;
                    let dz = -q * (1.0 + alpha * p) / n as f64; // dL/dz_i
                    let dmd = -s * dz; // dz/dmodel_diff = -s
                    st.dloss_derr[i] = dmd;
                    st.dloss_derr[n + i] = -dmd;
                    st.model_diff.push(md);
                    st.ref_diff.push(rd);
                    st.z.push(z);
                    st.p.push(p);
                    st.dloss_dmodel_diff.push(dmd);
                }
                st.loss = total / n as f64;
                st.reward_margin = Some(mean(&st.z));
            }
            Objective::Kto => {
                let r = need_ref()?;
                let lab = self.labels(b, labels, pairs)?;
                let g: Vec<f64> = (0..b).map(|j| r[j] - e[j]).collect();
                let q = mean(&g).max(0.0);
                st.dloss_derr = vec![0.0; b];
                let mut total = 0.0;
                for j in 0..b {
                    let (y, lam) =
                        if lab[j] { (1.0, self.kto_lambda_desirable) } else { (-1.0, self.kto_lambda_undesirable) };
                    let u = y * self.beta * (g[j] - q);
                    let h = sigmoid(u);
                    total += lam * (1.0 - h);
                    // dL/de_j = lam * h (1 - h) * y * beta / B (dg/de = -1, Q held constant).
                    st.dloss_derr[j] = lam * h * sigmoid(-u) * y * self.beta / b as f64;
                    st.z.push(u);
                    st.p.push(h);
                }
                st.loss = total / b as f64;
                st.kto_reference_point = Some(q);
            }
        }
        if !st.z.is_empty() {
            st.implicit_acc = Some(st.z.iter().filter(|&&z| z > 0.0).count() as f64 / st.z.len() as f64);
            st.mean_p = Some(mean(&st.p));
        }
        if !st.loss.is_finite() {
            return Err(Error::Invalid(format!(
                "objective {:?}: the loss is {} (policy errors {:?}, reference errors {:?})",
                self.objective, st.loss, st.policy_err, st.ref_err
            )));
        }
        Ok(st)
    }
}

/// Runs `f` as the reference model: no autograd and LoRA adapters off on this thread.
pub fn as_reference<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _g = no_grad();
    let _off = lora_off();
    f()
}

/// The reference model of a step.
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    /// The policy's own base weights with its LoRA adapters off (LoRA training).
    AdaptersOff,
    /// A separate frozen model (full fine-tuning).
    Model(&'a UNet2DConditionModel),
}

/// One objective evaluation on a preference batch with a UNet: the policy forward (recorded),
/// the reference forward (under [`as_reference`]; skipped for SFT, which also skips the
/// losers), the per-sample errors and the loss. Call `backward` on `out.loss`.
pub fn unet_step(
    cfg: &ObjectiveConfig,
    process: &ForwardProcess,
    batch: &PreferenceBatch,
    policy: &UNet2DConditionModel,
    reference: Reference<'_>,
) -> Result<ObjectiveOutput> {
    if !cfg.needs_reference() {
        let inp = batch.winner_inputs(process)?;
        let pred = policy.forward(&inp.noised.noisy, &inp.noised.timesteps, &inp.encoder_hidden_states)?;
        let err = per_sample_error(&pred, &inp.noised.target)?;
        return cfg.loss_with_labels(&err, None, &vec![true; err.shape()[0]]);
    }
    check_reference(policy, reference)?;
    let (err, err_ref) = preference_errors(process, batch, policy, reference)?;
    cfg.loss(&err, Some(&err_ref))
}

/// [`unet_step`] with the loss head on the UNet's device ([`ObjectiveConfig::loss_on_device`]):
/// a GPU step then records everything and reads nothing.
pub fn unet_step_on_device(
    cfg: &ObjectiveConfig,
    process: &ForwardProcess,
    batch: &PreferenceBatch,
    policy: &UNet2DConditionModel,
    reference: Reference<'_>,
) -> Result<DeviceLoss> {
    if !cfg.needs_reference() {
        let inp = batch.winner_inputs(process)?;
        let pred = policy.forward(&inp.noised.noisy, &inp.noised.timesteps, &inp.encoder_hidden_states)?;
        return cfg.loss_on_device(&per_sample_error(&pred, &inp.noised.target)?, None);
    }
    check_reference(policy, reference)?;
    let (err, err_ref) = preference_errors(process, batch, policy, reference)?;
    cfg.loss_on_device(&err, Some(&err_ref))
}

fn check_reference(policy: &UNet2DConditionModel, reference: Reference<'_>) -> Result<()> {
    if matches!(reference, Reference::AdaptersOff)
        && !crate::train::lora::unet_linears(policy).iter().any(|(_, l)| l.active_lora().is_some())
    {
        // Without an active adapter the "reference" would be the policy itself (z = 0 forever).
        return Err(Error::Invalid(
            "objective: Reference::AdaptersOff needs a LoRA attached to the policy and enabled".into(),
        ));
    }
    Ok(())
}

/// The policy's (tracked) and the reference's per-sample errors on a preference batch: (2N,)
/// each, cat(w, l).
fn preference_errors(
    process: &ForwardProcess,
    batch: &PreferenceBatch,
    policy: &UNet2DConditionModel,
    reference: Reference<'_>,
) -> Result<(Tensor, Tensor)> {
    let inp = batch.inputs(process)?;
    let (x, t, c) = (&inp.noised.noisy, &inp.noised.timesteps, &inp.encoder_hidden_states);
    let err_ref = as_reference(|| {
        let pred = match reference {
            Reference::AdaptersOff => policy.forward(x, t, c)?,
            Reference::Model(m) => m.forward(x, t, c)?,
        };
        per_sample_error(&pred, &inp.noised.target)
    })?;
    let pred = policy.forward(x, t, c)?;
    let err = per_sample_error(&pred, &inp.noised.target)?;
    Ok((err, err_ref))
}
