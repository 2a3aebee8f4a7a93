// Elementwise unary ops and scalar variants: y[i] = f(x[i]; a, b), and their backward
// y[i] = dy[i] * f'(x[i]). `y` is the output of both entry points.
// Op codes mirror `UnaryOp` in src/ops/unary.rs.

struct Params {
    n: u32,    // elements
    op: u32,   // UnaryOp code
    a: f32,    // first scalar (affine scale, max/min bound, clamp low, power)
    b: f32,    // second scalar (affine shift, clamp high)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (n)
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // (n)
@group(0) @binding(3) var<storage, read> dy: array<f32>;       // (n), backward only

// Abramowitz & Stegun 7.1.26 with odd symmetry; |error| < 1.5e-7. The CPU twin uses the same form.
fn erf_as(v: f32) -> f32 {
    let s = sign(v);
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-z * z));
}

fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// Clamped so no implementation computes inf/inf for large |v|.
fn tanh_safe(v: f32) -> f32 {
    return tanh(clamp(v, -15.0, 15.0));
}

fn apply(op: u32, v: f32) -> f32 {
    switch op {
        case 0u: { return -v; }
        case 1u: { return exp(v); }
        case 2u: { return log(v); }
        case 3u: { return sqrt(v); }
        case 4u: { return inverseSqrt(v); }
        case 5u: { return v * sigmoid(v); }
        case 6u: { return 0.5 * v * (1.0 + erf_as(v * 0.70710678118654752)); }
        case 7u: { return 0.5 * v * (1.0 + tanh_safe(0.79788456080286536 * (v + 0.044715 * v * v * v))); }
        case 8u: { return v * sigmoid(1.702 * v); }
        case 9u: { return sigmoid(v); }
        case 10u: { return tanh_safe(v); }
        case 11u: { return max(v, 0.0); }
        case 12u: { return abs(v); }
        case 13u: { return v * v; }
        case 20u: { return v * p.a + p.b; }
        case 21u: { return max(v, p.a); }
        case 22u: { return min(v, p.a); }
        case 23u: { return clamp(v, p.a, p.b); }
        case 24u: { return pow(v, p.a); }
        case 25u: { return p.a / v; }
        default: { return v; }
    }
}

fn grad(op: u32, v: f32) -> f32 {
    switch op {
        case 0u: { return -1.0; }
        case 1u: { return exp(v); }
        case 2u: { return 1.0 / v; }
        case 3u: { return 0.5 / sqrt(v); }
        case 4u: { return -0.5 * inverseSqrt(v) / v; }
        case 5u: { let s = sigmoid(v); return s * (1.0 + v * (1.0 - s)); }
        case 6u: {
            return 0.5 * (1.0 + erf_as(v * 0.70710678118654752)) + v * 0.39894228040143268 * exp(-0.5 * v * v);
        }
        case 7u: {
            let k = 0.79788456080286536;
            let t = tanh_safe(k * (v + 0.044715 * v * v * v));
            return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * k * (1.0 + 0.134145 * v * v);
        }
        case 8u: { let s = sigmoid(1.702 * v); return s + 1.702 * v * s * (1.0 - s); }
        case 9u: { let s = sigmoid(v); return s * (1.0 - s); }
        case 10u: { let t = tanh_safe(v); return 1.0 - t * t; }
        case 11u: { return select(0.0, 1.0, v > 0.0); }
        case 12u: { return sign(v); }
        case 13u: { return 2.0 * v; }
        case 20u: { return p.a; }
        case 21u: { return select(0.0, 1.0, v >= p.a); }
        case 22u: { return select(0.0, 1.0, v <= p.a); }
        case 23u: { return select(0.0, 1.0, v >= p.a && v <= p.b); }
        case 24u: { return p.a * pow(v, p.a - 1.0); }
        case 25u: { return -p.a / (v * v); }
        default: { return 0.0; }
    }
}

@compute @workgroup_size(256)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    y[i] = dy[i] * grad(p.op, x[i]);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    y[i] = apply(p.op, x[i]);
}
