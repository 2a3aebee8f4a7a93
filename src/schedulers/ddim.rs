//! DDIM (diffusers' `DDIMScheduler`), with eta for the stochastic variant.

use super::{
    check_step, discrete_timesteps, refuse_common, vp_pred_eps, vp_pred_x0, Noise, NoiseSchedule, NoiseScheduler,
    PredictionType, SchedulerConfig, SchedulerKind, StepOutput, TimestepSpacing,
};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const WHO: &str = "ddim";

#[derive(Debug, Clone)]
pub struct Ddim {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    /// `alphas_cumprod` "before" t = 0: 1 with `set_alpha_to_one`, else `alphas_cumprod[0]`.
    final_alpha_cumprod: f32,
    clip: Option<f32>,
    eta: f32,
    num_inference_steps: usize,
    ts: Vec<usize>,
    ts_f32: Vec<f32>,
}

impl Ddim {
    /// Defaults are DDIMScheduler's: clip_sample and set_alpha_to_one true, steps_offset 0,
    /// timestep_spacing leading.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        refuse_common(cfg)?;
        let schedule = NoiseSchedule::new(cfg)?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { schedule.alphas_cumprod()[0] };
        let clip =
            if cfg.clip_sample.unwrap_or(true) { Some(cfg.clip_sample_range.unwrap_or(1.0) as f32) } else { None };
        Ok(Ddim {
            schedule,
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            spacing: cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: cfg.steps_offset.unwrap_or(0),
            final_alpha_cumprod,
            clip,
            eta: 0.0,
            num_inference_steps: 0,
            ts: Vec::new(),
            ts_f32: Vec::new(),
        })
    }

    /// eta >= 0: the weight of fresh noise in each step (0 = deterministic DDIM).
    pub fn with_eta(mut self, eta: f32) -> Result<Self> {
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(Error::Invalid(format!("{WHO}: eta {eta} must be finite and >= 0")));
        }
        self.eta = eta;
        Ok(self)
    }

    pub fn eta(&self) -> f32 {
        self.eta
    }
}

impl NoiseScheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }
    fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.ts = discrete_timesteps(WHO, self.spacing, n, self.schedule.num_train_timesteps(), self.steps_offset)?;
        self.ts_f32 = self.ts.iter().map(|&t| t as f32).collect();
        self.num_inference_steps = n;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.ts_f32
    }

    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, mut noise: Noise<'_>) -> Result<StepOutput> {
        check_step(WHO, i, self.ts.len(), model_output, sample)?;
        let ac = self.schedule.alphas_cumprod();
        let t = self.ts[i];
        // diffusers steps back by a fixed stride whatever the spacing.
        let prev = t as i64 - (self.schedule.num_train_timesteps() / self.num_inference_steps) as i64;
        let a_t = ac[t];
        let a_prev = if prev >= 0 { ac[prev as usize] } else { self.final_alpha_cumprod };
        let beta_t = 1.0 - a_t;

        let mut x0 = vp_pred_x0(self.prediction, sample, model_output, a_t)?;
        let eps = vp_pred_eps(self.prediction, sample, model_output, &x0, a_t)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let beta_prev = 1.0 - a_prev;
        let variance = (beta_prev / beta_t) * (1.0 - a_t / a_prev);
        let std = self.eta * variance.sqrt();
        let dir = eps.mul_scalar((1.0 - a_prev - std * std).sqrt())?;
        let mut prev_sample = x0.mul_scalar(a_prev.sqrt())?.add(&dir)?;
        if self.eta > 0.0 {
            let z = noise.draw(WHO, sample)?;
            prev_sample = prev_sample.add(&z.mul_scalar(std)?)?;
        }
        Ok(StepOutput { prev_sample, pred_original_sample: x0 })
    }
}
