//! Elementwise unary ops and their scalar variants (`shaders/unary.wgsl`).

use crate::device::Device;
use crate::error::Result;
use crate::ops::{groups_for, par_fill, u32_of};
use crate::shaders::UNARY;
use crate::tensor::Tensor;

/// Codes shared with `shaders/unary.wgsl`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Silu,
    /// GELU with the exact erf form (`F.gelu(x)`).
    GeluErf,
    /// GELU with the tanh approximation (`F.gelu(x, approximate="tanh")`).
    GeluTanh,
    /// CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    Sigmoid,
    Tanh,
    Relu,
    Abs,
    Square,
    /// `x * a + b`: scalar add, sub and mul.
    Affine(f32, f32),
    MaxScalar(f32),
    MinScalar(f32),
    Clamp(f32, f32),
    /// `x^a`, for `x >= 0` (as WGSL's `pow`).
    PowScalar(f32),
    /// `a / x`.
    RDivScalar(f32),
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct UnaryParams {
    pub n: u32,
    pub op: u32,
    pub a: f32,
    pub b: f32,
}

impl UnaryOp {
    pub fn code(self) -> (u32, f32, f32) {
        use UnaryOp::*;
        match self {
            Neg => (0, 0.0, 0.0),
            Exp => (1, 0.0, 0.0),
            Log => (2, 0.0, 0.0),
            Sqrt => (3, 0.0, 0.0),
            Rsqrt => (4, 0.0, 0.0),
            Silu => (5, 0.0, 0.0),
            GeluErf => (6, 0.0, 0.0),
            GeluTanh => (7, 0.0, 0.0),
            QuickGelu => (8, 0.0, 0.0),
            Sigmoid => (9, 0.0, 0.0),
            Tanh => (10, 0.0, 0.0),
            Relu => (11, 0.0, 0.0),
            Abs => (12, 0.0, 0.0),
            Square => (13, 0.0, 0.0),
            Affine(a, b) => (20, a, b),
            MaxScalar(a) => (21, a, 0.0),
            MinScalar(a) => (22, a, 0.0),
            Clamp(a, b) => (23, a, b),
            PowScalar(a) => (24, a, 0.0),
            RDivScalar(a) => (25, a, 0.0),
        }
    }

    /// The CPU twin of `apply` in the shader (f64 inside, for a reference that is at least as exact).
    pub fn eval(self, x: f32) -> f32 {
        use UnaryOp::*;
        // The hot activations in f32 (`expf` is within 1 ulp; the f64 path cost a third of a
        // small UNet's CPU time); the rest in f64.
        match self {
            Silu => return x / (1.0 + (-x).exp()),
            Sigmoid => return 1.0 / (1.0 + (-x).exp()),
            QuickGelu => return x / (1.0 + (-1.702 * x).exp()),
            Exp => return x.exp(),
            _ => {}
        }
        let v = x as f64;
        let r = match self {
            Neg => -v,
            Exp => v.exp(),
            Log => v.ln(),
            Sqrt => v.sqrt(),
            Rsqrt => 1.0 / v.sqrt(),
            Silu => v * sigmoid(v),
            GeluErf => 0.5 * v * (1.0 + erf(v * std::f64::consts::FRAC_1_SQRT_2)),
            GeluTanh => 0.5 * v * (1.0 + (0.797_884_560_802_865_4 * (v + 0.044715 * v * v * v)).tanh()),
            QuickGelu => v * sigmoid(1.702 * v),
            Sigmoid => sigmoid(v),
            Tanh => v.tanh(),
            Relu => v.max(0.0),
            Abs => v.abs(),
            Square => v * v,
            Affine(a, b) => v * a as f64 + b as f64,
            MaxScalar(a) => v.max(a as f64),
            MinScalar(a) => v.min(a as f64),
            Clamp(a, b) => v.max(a as f64).min(b as f64),
            PowScalar(a) => v.powf(a as f64),
            RDivScalar(a) => a as f64 / v,
        };
        r as f32
    }

    /// CPU twin of `grad` in the shader: f'(x).
    pub fn derivative(self, x: f32) -> f32 {
        use UnaryOp::*;
        match self {
            Silu => {
                let s = 1.0 / (1.0 + (-x).exp());
                return s * (1.0 + x * (1.0 - s));
            }
            Sigmoid => {
                let s = 1.0 / (1.0 + (-x).exp());
                return s * (1.0 - s);
            }
            Exp => return x.exp(),
            _ => {}
        }
        let v = x as f64;
        let r = match self {
            Neg => -1.0,
            Exp => v.exp(),
            Log => 1.0 / v,
            Sqrt => 0.5 / v.sqrt(),
            Rsqrt => -0.5 / (v * v.sqrt()),
            Silu => {
                let s = sigmoid(v);
                s * (1.0 + v * (1.0 - s))
            }
            GeluErf => {
                0.5 * (1.0 + erf(v * std::f64::consts::FRAC_1_SQRT_2))
                    + v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt()
            }
            GeluTanh => {
                let k = 0.797_884_560_802_865_4;
                let t = (k * (v + 0.044715 * v * v * v)).tanh();
                0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * v * v)
            }
            QuickGelu => {
                let s = sigmoid(1.702 * v);
                s + 1.702 * v * s * (1.0 - s)
            }
            Sigmoid => {
                let s = sigmoid(v);
                s * (1.0 - s)
            }
            Tanh => 1.0 - v.tanh().powi(2),
            Relu => (v > 0.0) as u8 as f64,
            Abs => {
                if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
            Square => 2.0 * v,
            Affine(a, _) => a as f64,
            // Ties pass the gradient, as torch.clamp does.
            MaxScalar(a) => (v >= a as f64) as u8 as f64,
            MinScalar(a) => (v <= a as f64) as u8 as f64,
            Clamp(a, b) => (v >= a as f64 && v <= b as f64) as u8 as f64,
            PowScalar(a) => a as f64 * v.powf(a as f64 - 1.0),
            RDivScalar(a) => -(a as f64) / (v * v),
        };
        r as f32
    }
}

pub(crate) fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the same form the shaders use.
pub fn erf(v: f64) -> f64 {
    let z = v.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    (1.0 - poly * (-z * z).exp()).copysign(v)
}

impl Tensor {
    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        let out = self.unary_raw(op)?;
        let x = self.detach();
        Ok(crate::autograd::record("unary", out, &[self], move |g, _| Ok(vec![Some(x.unary_backward(op, g)?)])))
    }

    /// `dy * f'(x)` for `f = op`; `self` is x, `dy` shaped like it.
    pub fn unary_backward(&self, op: UnaryOp, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "unary backward";
        self.ensure_f32(OP)?;
        self.same_device(OP, dy)?;
        if dy.shape() != self.shape() {
            return Err(crate::Error::shape(OP, format!("dy {:?} for x {:?}", dy.shape(), self.shape())));
        }
        let n = self.numel();
        match self.device() {
            Device::Cpu => {
                let (x, d) = (self.cpu_f32(OP)?, dy.cpu_f32(OP)?);
                let mut y = vec![0.0; n];
                par_fill(&mut y, |i| d[i] * op.derivative(x[i]));
                Ok(Tensor::cpu(y, self.shape()))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, OP, self.shape())?;
                let (code, a, b) = op.code();
                let params = UnaryParams { n: u32_of(OP, n)?, op: code, a, b };
                let bufs = [self.gpu_buf(OP)?, out.gpu_buf(OP)?, dy.gpu_buf(OP)?];
                ctx.dispatch(&UNARY, "backward", &params, &bufs, groups_for(&ctx, n))?;
                Ok(out)
            }
        }
    }

    fn unary_raw(&self, op: UnaryOp) -> Result<Tensor> {
        self.ensure_f32("unary")?;
        let n = self.numel();
        match self.device() {
            Device::Cpu => {
                let x = self.cpu_f32("unary")?;
                let mut y = vec![0.0; n];
                par_fill(&mut y, |i| op.eval(x[i]));
                Ok(Tensor::cpu(y, self.shape()))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_empty(&ctx, "unary", self.shape())?;
                let (code, a, b) = op.code();
                let params = UnaryParams { n: u32_of("unary", n)?, op: code, a, b };
                ctx.dispatch(
                    &UNARY,
                    "main",
                    &params,
                    &[self.gpu_buf("unary")?, out.gpu_buf("unary")?],
                    groups_for(&ctx, n),
                )?;
                Ok(out)
            }
        }
    }

    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Neg)
    }
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Exp)
    }
    pub fn log(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Log)
    }
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqrt)
    }
    pub fn rsqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Rsqrt)
    }
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Silu)
    }
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::GeluErf)
    }
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::GeluTanh)
    }
    pub fn quick_gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::QuickGelu)
    }
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sigmoid)
    }
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Tanh)
    }
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Relu)
    }
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Abs)
    }
    pub fn square(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Square)
    }
    pub fn add_scalar(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine(1.0, s))
    }
    pub fn sub_scalar(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine(1.0, -s))
    }
    pub fn mul_scalar(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine(s, 0.0))
    }
    /// Multiplies by `1 / s` (as PyTorch does for a Python scalar divisor).
    pub fn div_scalar(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine(1.0 / s, 0.0))
    }
    /// `x * a + b` in one pass.
    pub fn affine(&self, a: f32, b: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine(a, b))
    }
    pub fn maximum_scalar(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::MaxScalar(s))
    }
    pub fn minimum_scalar(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::MinScalar(s))
    }
    pub fn clamp(&self, lo: f32, hi: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Clamp(lo, hi))
    }
    pub fn powf(&self, e: f32) -> Result<Tensor> {
        self.unary(UnaryOp::PowScalar(e))
    }
    pub fn rdiv_scalar(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::RDivScalar(s))
    }
}
