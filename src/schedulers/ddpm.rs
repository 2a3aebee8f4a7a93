//! DDPM ancestral sampling (diffusers' `DDPMScheduler`), variance fixed_small or fixed_large.

use super::{
    check_step, discrete_timesteps, refuse_common, vp_pred_x0, Noise, NoiseSchedule, NoiseScheduler, PredictionType,
    SchedulerConfig, SchedulerKind, StepOutput, TimestepSpacing, VarianceType,
};
use crate::error::Result;
use crate::tensor::Tensor;

const WHO: &str = "ddpm";

#[derive(Debug, Clone)]
pub struct Ddpm {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    clip: Option<f32>,
    variance: VarianceType,
    ts: Vec<usize>,
    ts_f32: Vec<f32>,
}

impl Ddpm {
    /// Defaults are DDPMScheduler's: clip_sample true, variance_type fixed_small, steps_offset
    /// 0, timestep_spacing leading.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        refuse_common(cfg)?;
        let variance = cfg.variance_type.unwrap_or(VarianceType::FixedSmall);
        if !matches!(variance, VarianceType::FixedSmall | VarianceType::FixedLarge) {
            return Err(cfg.err("variance_type", format!("{variance:?} is not supported (fixed_small, fixed_large)")));
        }
        let clip =
            if cfg.clip_sample.unwrap_or(true) { Some(cfg.clip_sample_range.unwrap_or(1.0) as f32) } else { None };
        Ok(Ddpm {
            schedule: NoiseSchedule::new(cfg)?,
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            spacing: cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: cfg.steps_offset.unwrap_or(0),
            clip,
            variance,
            ts: Vec::new(),
            ts_f32: Vec::new(),
        })
    }
}

impl NoiseScheduler for Ddpm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
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
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.ts_f32
    }

    /// Draws noise only for t > 0, as diffusers.
    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, mut noise: Noise<'_>) -> Result<StepOutput> {
        check_step(WHO, i, self.ts.len(), model_output, sample)?;
        let ac = self.schedule.alphas_cumprod();
        let t = self.ts[i];
        // The previous timestep is the next one in the list; past the end, alpha is 1.
        let a_t = ac[t];
        let a_prev = self.ts.get(i + 1).map_or(1.0, |&p| ac[p]);
        let beta_t = 1.0 - a_t;
        let beta_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;

        let mut x0 = vp_pred_x0(self.prediction, sample, model_output, a_t)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let c_x0 = (a_prev.sqrt() * cur_beta) / beta_t;
        let c_xt = cur_alpha.sqrt() * beta_prev / beta_t;
        let mut prev_sample = x0.mul_scalar(c_x0)?.add(&sample.mul_scalar(c_xt)?)?;
        if t > 0 {
            let z = noise.draw(WHO, sample)?;
            let var = match self.variance {
                VarianceType::FixedLarge => cur_beta,
                _ => ((1.0 - a_prev) / (1.0 - a_t) * cur_beta).max(1e-20),
            };
            prev_sample = prev_sample.add(&z.mul_scalar(var.sqrt())?)?;
        }
        Ok(StepOutput { prev_sample, pred_original_sample: x0 })
    }
}
