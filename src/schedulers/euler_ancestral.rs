//! Euler ancestral (diffusers' `EulerAncestralDiscreteScheduler`).

use super::euler::{init_sigma, interp_sigmas, refuse_sigma_options};
use super::{
    check_step, div_exact, float_timesteps, ve_pred_x0, Noise, NoiseSchedule, NoiseScheduler, PredictionType,
    SchedulerConfig, SchedulerKind, StepOutput, TimestepSpacing,
};
use crate::error::Result;
use crate::tensor::Tensor;

const WHO: &str = "euler_a";

#[derive(Debug, Clone)]
pub struct EulerAncestral {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    table: Vec<f32>,
    ts: Vec<f32>,
    sigmas: Vec<f32>,
}

impl EulerAncestral {
    /// Defaults are EulerAncestralDiscreteScheduler's: timestep_spacing linspace, steps_offset 0.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        refuse_sigma_options(cfg)?;
        let schedule = NoiseSchedule::new(cfg)?.with_terminal_floor();
        let table = schedule.sigma_table();
        Ok(EulerAncestral {
            schedule,
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            spacing: cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: cfg.steps_offset.unwrap_or(0),
            table,
            ts: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    /// `(sigma_up, sigma_down)` of step `i`, with PyTorch's f32 op order.
    pub fn ancestral_sigmas(&self, i: usize) -> Option<(f32, f32)> {
        let (from, to) = (*self.sigmas.get(i)?, *self.sigmas.get(i + 1)?);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        // Rounding must not turn a zero into a NaN.
        let down = (to * to - up * up).max(0.0).sqrt();
        Some((up, down))
    }
}

impl NoiseScheduler for EulerAncestral {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }
    fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let ts = float_timesteps(WHO, self.spacing, n, self.schedule.num_train_timesteps(), self.steps_offset)?;
        let mut sigmas = interp_sigmas(&self.table, &ts);
        sigmas.push(0.0);
        self.ts = ts;
        self.sigmas = sigmas;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.ts
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        init_sigma(if self.sigmas.is_empty() { &self.table } else { &self.sigmas }, self.spacing)
    }

    /// `sample / sqrt(sigma_i^2 + 1)`.
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_step(WHO, i, self.ts.len(), sample, sample)?;
        let s = self.sigmas[i];
        div_exact(sample, (s * s + 1.0).sqrt())
    }

    /// Draws noise every step (also the last, where it is scaled by sigma_up = 0), as diffusers.
    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, mut noise: Noise<'_>) -> Result<StepOutput> {
        check_step(WHO, i, self.ts.len(), model_output, sample)?;
        let sigma = self.sigmas[i];
        let x0 = ve_pred_x0(self.prediction, sample, model_output, sigma)?;
        let (up, down) = self.ancestral_sigmas(i).unwrap_or((0.0, 0.0));
        let derivative = div_exact(&sample.sub(&x0)?, sigma)?;
        let prev = sample.add(&derivative.mul_scalar(down - sigma)?)?;
        let z = noise.draw(WHO, sample)?;
        let prev_sample = prev.add(&z.mul_scalar(up)?)?;
        Ok(StepOutput { prev_sample, pred_original_sample: x0 })
    }
}
