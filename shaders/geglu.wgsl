// GEGLU (diffusers' feed-forward): x = [h, g] split on the last axis, y = h * gelu(g), erf form.
// `backward` writes dx = [dy * gelu(g), dy * h * gelu'(g)] into `y` (then shaped like x).

struct Params {
    n: u32,   // output elements (rows * C)
    c: u32,   // output channels; the input row holds 2C
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (rows, 2C)
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // (rows, C); backward: dx (rows, 2C)
@group(0) @binding(3) var<storage, read> dy: array<f32>;       // (rows, C), backward only

// Abramowitz & Stegun 7.1.26, as in unary.wgsl and the CPU twin.
fn erf_as(v: f32) -> f32 {
    let s = sign(v);
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-z * z));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    let r = i / p.c;
    let c = i % p.c;
    let h = x[r * 2u * p.c + c];
    let g = x[r * 2u * p.c + p.c + c];
    y[i] = h * 0.5 * g * (1.0 + erf_as(g * 0.70710678118654752));
}

@compute @workgroup_size(256)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    let r = i / p.c;
    let c = i % p.c;
    let hi = r * 2u * p.c + c;
    let gi = hi + p.c;
    let h = x[hi];
    let g = x[gi];
    let cdf = 0.5 * (1.0 + erf_as(g * 0.70710678118654752));
    let pdf = 0.39894228040143268 * exp(-0.5 * g * g);
    y[hi] = dy[i] * g * cdf;
    y[gi] = dy[i] * h * (cdf + g * pdf);
}
