// AdamW (torch.optim.AdamW) update of one parameter, as a functional update: reads p, g, m, v
// and writes the new values into fresh buffers. Bias corrections come from the host (f64).
// CPU twin: `adamw_elem` in src/optim.rs, same order of operations.

struct Params {
    n: u32,          // elements
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    decay: f32,      // 1 - lr * weight_decay (decoupled decay)
    beta1: f32,
    one_m_beta1: f32, // 1 - beta1
    beta2: f32,
    one_m_beta2: f32, // 1 - beta2
    step_size: f32,  // lr / (1 - beta1^t)
    bc2_sqrt: f32,   // sqrt(1 - beta2^t)
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<f32>;            // (n) parameter
@group(0) @binding(2) var<storage, read> g: array<f32>;            // (n) gradient
@group(0) @binding(3) var<storage, read> m: array<f32>;            // (n) first moment
@group(0) @binding(4) var<storage, read> v: array<f32>;            // (n) second moment
@group(0) @binding(5) var<storage, read_write> w_out: array<f32>;  // (n)
@group(0) @binding(6) var<storage, read_write> m_out: array<f32>;  // (n)
@group(0) @binding(7) var<storage, read_write> v_out: array<f32>;  // (n)
@group(0) @binding(8) var<storage, read> guard: array<f32>;        // (4) from train_step.wgsl's `guard`

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    update(i, g[i]);
}

fn update(i: u32, gi: f32) {
    let wd = w[i] * p.decay;
    let mi = p.beta1 * m[i] + p.one_m_beta1 * gi;
    let vi = p.beta2 * v[i] + p.one_m_beta2 * (gi * gi);
    let denom = sqrt(vi) / p.bc2_sqrt + p.eps;
    w_out[i] = wd - p.step_size * (mi / denom);
    m_out[i] = mi;
    v_out[i] = vi;
}

// The step as `main` with the gradient times guard[0] (clipping), or nothing changed where
// guard[1] is 0 (a non-finite loss or norm): decided on the GPU, so the step needs no read.
@compute @workgroup_size(256)
fn main_guarded(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    if guard[1] == 0.0 {
        w_out[i] = w[i];
        m_out[i] = m[i];
        v_out[i] = v[i];
        return;
    }
    update(i, g[i] * guard[0]);
}
