//! Euler (diffusers' `EulerDiscreteScheduler`, linear interpolation of sigmas, no churn).

use super::{
    check_step, div_exact, float_timesteps, np_interp_unit, refuse_common, ve_pred_x0, FinalSigmasType,
    InterpolationType, Noise, NoiseSchedule, NoiseScheduler, PredictionType, SchedulerConfig, SchedulerKind,
    StepOutput, TimestepSpacing, TimestepType,
};
use crate::error::Result;
use crate::tensor::Tensor;

const WHO: &str = "euler";

/// Sigmas at (fractional) timesteps: numpy's `interp` over the table in f64, then f32.
pub(super) fn interp_sigmas(table: &[f32], ts: &[f32]) -> Vec<f32> {
    ts.iter().map(|&t| np_interp_unit(t as f64, table) as f32).collect()
}

/// diffusers' `init_noise_sigma`: the largest sigma, or `sqrt(max^2 + 1)` for leading spacing.
pub(super) fn init_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// Refuses the sigma options vipo does not implement.
pub(super) fn refuse_sigma_options(cfg: &SchedulerConfig) -> Result<()> {
    refuse_common(cfg)?;
    cfg.refuse_true("use_karras_sigmas", cfg.use_karras_sigmas, "karras sigmas are not implemented")?;
    cfg.refuse_true("use_exponential_sigmas", cfg.use_exponential_sigmas, "exponential sigmas are not implemented")?;
    cfg.refuse_true("use_beta_sigmas", cfg.use_beta_sigmas, "beta sigmas are not implemented")
}

#[derive(Debug, Clone)]
pub struct Euler {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    final_sigmas: FinalSigmasType,
    /// `sqrt((1 - a) / a)` per training timestep.
    table: Vec<f32>,
    ts: Vec<f32>,
    sigmas: Vec<f32>,
}

impl Euler {
    /// Defaults are EulerDiscreteScheduler's: timestep_spacing linspace, interpolation linear,
    /// final sigma zero, steps_offset 0.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        refuse_sigma_options(cfg)?;
        if cfg.interpolation_type == Some(InterpolationType::LogLinear) {
            return Err(cfg.err("interpolation_type", "log_linear is not implemented (use linear)"));
        }
        let prediction = cfg.prediction_type.unwrap_or(PredictionType::Epsilon);
        if cfg.timestep_type == Some(TimestepType::Continuous) && prediction == PredictionType::VPrediction {
            return Err(cfg.err("timestep_type", "continuous timesteps with v_prediction are not implemented"));
        }
        let schedule = NoiseSchedule::new(cfg)?.with_terminal_floor();
        let table = schedule.sigma_table();
        Ok(Euler {
            schedule,
            prediction,
            spacing: cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: cfg.steps_offset.unwrap_or(0),
            final_sigmas: cfg.final_sigmas_type.unwrap_or(FinalSigmasType::Zero),
            table,
            ts: Vec::new(),
            sigmas: Vec::new(),
        })
    }
}

impl NoiseScheduler for Euler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
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
        sigmas.push(match self.final_sigmas {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.table[0],
        });
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

    /// Before `set_timesteps`, from the full training table (as diffusers).
    fn init_noise_sigma(&self) -> f32 {
        init_sigma(if self.sigmas.is_empty() { &self.table } else { &self.sigmas }, self.spacing)
    }

    /// `sample / sqrt(sigma_i^2 + 1)`.
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_step(WHO, i, self.ts.len(), sample, sample)?;
        let s = self.sigmas[i];
        div_exact(sample, (s * s + 1.0).sqrt())
    }

    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, _noise: Noise<'_>) -> Result<StepOutput> {
        check_step(WHO, i, self.ts.len(), model_output, sample)?;
        let sigma = self.sigmas[i];
        let x0 = ve_pred_x0(self.prediction, sample, model_output, sigma)?;
        let derivative = div_exact(&sample.sub(&x0)?, sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        let prev_sample = sample.add(&derivative.mul_scalar(dt)?)?;
        Ok(StepOutput { prev_sample, pred_original_sample: x0 })
    }
}
