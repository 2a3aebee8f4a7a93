//! DPM-Solver++ 2M (diffusers' `DPMSolverMultistepScheduler` with `algorithm_type =
//! dpmsolver++`, `solver_order = 2`): data-prediction multistep solver in log-SNR time.

use super::euler::{interp_sigmas, refuse_sigma_options};
use super::{
    check_step, div_exact, np_arange, np_linspace, to_indices, AlgorithmType, FinalSigmasType, Noise, NoiseSchedule,
    NoiseScheduler, PredictionType, SchedulerConfig, SchedulerKind, SolverType, StepOutput, TimestepSpacing,
    VarianceType,
};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const WHO: &str = "dpmpp_2m";

/// `(alpha_t, sigma_t)` of the VP process at a VE sigma, with PyTorch's f32 ops.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha_t) - log(sigma_t)` (+inf at sigma 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

#[derive(Debug, Clone)]
pub struct DpmPp2m {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    order: usize,
    solver: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas: FinalSigmasType,
    lambda_min_clipped: f64,
    table: Vec<f32>,
    ts: Vec<usize>,
    ts_f32: Vec<f32>,
    sigmas: Vec<f32>,
    /// The last `order` data predictions, oldest first.
    history: Vec<Tensor>,
    lower_order_nums: usize,
    last_step: Option<usize>,
}

impl DpmPp2m {
    /// Defaults are DPMSolverMultistepScheduler's: solver_order 2, dpmsolver++, midpoint,
    /// lower_order_final true, final sigma zero, timestep_spacing linspace, steps_offset 0.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        refuse_sigma_options(cfg)?;
        cfg.refuse_true("use_lu_lambdas", cfg.use_lu_lambdas, "lu lambdas are not implemented")?;
        cfg.refuse_true("use_flow_sigmas", cfg.use_flow_sigmas, "flow sigmas are not implemented here")?;
        match cfg.algorithm_type.unwrap_or(AlgorithmType::DpmSolverPp) {
            AlgorithmType::DpmSolverPp | AlgorithmType::Deis => {}
            other => {
                return Err(cfg.err("algorithm_type", format!("{other:?} is not implemented (dpmsolver++ only)")));
            }
        }
        let order = cfg.solver_order.unwrap_or(2);
        if !(1..=2).contains(&order) {
            return Err(cfg.err("solver_order", format!("{order} is not implemented (1 or 2)")));
        }
        if matches!(cfg.variance_type, Some(VarianceType::Learned | VarianceType::LearnedRange)) {
            return Err(cfg.err("variance_type", "learned variances are not implemented"));
        }
        let solver = match cfg.solver_type.unwrap_or(SolverType::Midpoint) {
            SolverType::Logrho => SolverType::Midpoint,
            s => s,
        };
        let schedule = NoiseSchedule::new(cfg)?.with_terminal_floor();
        let table = schedule.sigma_table();
        Ok(DpmPp2m {
            schedule,
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            spacing: cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: cfg.steps_offset.unwrap_or(0),
            order,
            solver,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_sigmas: cfg.final_sigmas_type.unwrap_or(FinalSigmasType::Zero),
            lambda_min_clipped: cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            table,
            ts: Vec::new(),
            ts_f32: Vec::new(),
            sigmas: Vec::new(),
            history: Vec::new(),
            lower_order_nums: 0,
            last_step: None,
        })
    }

    /// The first training timestep past the `lambda_min_clipped` cut (all of them by default).
    fn last_timestep(&self) -> usize {
        let n = self.schedule.num_train_timesteps();
        if self.lambda_min_clipped == f64::NEG_INFINITY {
            return n;
        }
        // searchsorted(flip(lambda_t), clip): how many lambdas lie below the cut.
        let below = self
            .schedule
            .alphas_cumprod()
            .iter()
            .filter(|&&a| ((lambda(a.sqrt(), (1.0 - a).sqrt())) as f64) < self.lambda_min_clipped)
            .count();
        n - below
    }

    fn first_order(&self, i: usize, x0: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        sample.mul_scalar(sigma_t / sigma_s)?.sub(&x0.mul_scalar(alpha_t * ((-h).exp() - 1.0))?)
    }

    fn second_order(&self, i: usize, sample: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (lambda_t, lambda_s0) = (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0));
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (m0, m1) = (&self.history[self.history.len() - 1], &self.history[self.history.len() - 2]);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = m0.sub(m1)?.mul_scalar(1.0 / r0)?;
        let c = alpha_t * ((-h).exp() - 1.0);
        let x = sample.mul_scalar(sigma_t / sigma_s0)?.sub(&m0.mul_scalar(c)?)?;
        match self.solver {
            SolverType::Heun => x.add(&d1.mul_scalar(alpha_t * (((-h).exp() - 1.0) / h + 1.0))?),
            _ => x.sub(&d1.mul_scalar(0.5 * c)?),
        }
    }
}

impl NoiseScheduler for DpmPp2m {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmPp2m
    }
    fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let n_train = self.schedule.num_train_timesteps();
        if n == 0 || n > n_train {
            return Err(Error::Invalid(format!("{WHO}: num_inference_steps {n} must lie in 1..={n_train}")));
        }
        let last = self.last_timestep();
        // n + 1 points from 0 to last - 1, the final 0 dropped.
        let mut ts: Vec<i64> = match self.spacing {
            TimestepSpacing::Linspace => {
                np_linspace(0.0, last as f64 - 1.0, n + 1).iter().rev().map(|v| v.round_ties_even() as i64).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = last / (n + 1);
                (0..=n).rev().map(|i| (i * ratio + self.steps_offset) as i64).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / n as f64;
                np_arange(last as f64, 0.0, -ratio).iter().map(|v| v.round_ties_even() as i64 - 1).collect()
            }
        };
        if self.spacing != TimestepSpacing::Trailing {
            ts.pop();
        }
        self.ts = to_indices(WHO, &ts, n_train)?;
        self.ts_f32 = self.ts.iter().map(|&t| t as f32).collect();
        self.sigmas = interp_sigmas(&self.table, &self.ts_f32);
        self.sigmas.push(match self.final_sigmas {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.table[0],
        });
        self.history.clear();
        self.lower_order_nums = 0;
        self.last_step = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.ts_f32
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    /// Steps must run in order; starting anywhere but right after the previous step (e.g.
    /// img2img from a later index) starts a fresh history, as diffusers' `begin_index`.
    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, _noise: Noise<'_>) -> Result<StepOutput> {
        check_step(WHO, i, self.ts.len(), model_output, sample)?;
        if i == 0 || self.last_step != Some(i - 1) {
            self.history.clear();
            self.lower_order_nums = 0;
        }
        let n = self.ts.len();
        let lower_final = i == n - 1
            && (self.euler_at_final
                || (self.lower_order_final && n < 15)
                || self.final_sigmas == FinalSigmasType::Zero);
        // diffusers' `lower_order_second` only demotes order 3, which is not offered here.

        let (alpha, sigma) = alpha_sigma(self.sigmas[i]);
        let x0 = match self.prediction {
            PredictionType::Epsilon => div_exact(&sample.sub(&model_output.mul_scalar(sigma)?)?, alpha)?,
            PredictionType::VPrediction => sample.mul_scalar(alpha)?.sub(&model_output.mul_scalar(sigma)?)?,
            PredictionType::Sample => model_output.clone(),
        };
        self.history.push(x0.clone());
        if self.history.len() > self.order {
            self.history.remove(0);
        }
        let prev_sample = if self.order == 1 || self.lower_order_nums < 1 || lower_final {
            self.first_order(i, &x0, sample)?
        } else {
            self.second_order(i, sample)?
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        self.last_step = Some(i);
        Ok(StepOutput { prev_sample, pred_original_sample: x0 })
    }
}
