// A training step's scalars on the GPU, so that a step reads nothing back until it ends:
// the loss heads (Poly-DPO `head`, Diffusion-KTO `kto_head`), each gradient's sum of squares
// (`sumsq`) and the clipping and NaN guard that AdamW's `main_guarded` reads (`guard`).
// CPU twins: src/ops/train_step.rs (the head in the same order; the sums grouped alike, in f64).
// `Inputs`, `begin` and `block_sum` come from reduce_tree.wgsl, put before this file.

struct Params {
    n: u32,         // head: pairs; kto_head: samples; sumsq: elements; guard: partial sums
    offset: u32,    // sumsq: first output slot; guard: losses; kto_head: desirable samples (first)
    _pad0: u32,
    _pad1: u32,
    s: f32,         // head: logit scale (beta / 2, or beta); kto_head: beta
    alpha: f32,     // head: Poly-DPO's alpha (0: Diffusion-DPO); kto_head: lambda_D
    max_norm: f32,  // guard
    lam_u: f32,     // kto_head: lambda_U
}

// Shared by the entry points, so that each binds a prefix of the same layout.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> z: array<f32>;

// Sums of 16 x 256 elements per workgroup (the CPU twin groups the same way).
const CHUNK: u32 = 4096u;

fn finite(v: f32) -> bool {
    // By the bits: a compiler may assume floats are finite and fold `v == v`.
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

fn sigmoid(v: f32) -> f32 {
    if v >= 0.0 {
        return 1.0 / (1.0 + exp(-v));
    }
    let e = exp(v);
    return e / (1.0 + e);
}

// log(1 + u) for u in [0, 1]: a series where log(1 + u) would round u away.
fn log1p_unit(u: f32) -> f32 {
    if u < 0.05 {
        return u * (1.0 - u * (0.5 - u * (1.0 / 3.0 - u * (0.25 - u * 0.2))));
    }
    return log(1.0 + u);
}

fn softplus(v: f32) -> f32 {
    return max(v, 0.0) + log1p_unit(exp(-abs(v)));
}

// x: (2N) policy errors, cat(w, l); z: (2N) reference errors.
// y: (1 + 7N) [loss, z (N), p (N), model_diff (N), ref_diff (N), dL/derr (2N), term (N)].
// One thread: N is a batch's pair count, and a fixed order keeps the sum deterministic.
@compute @workgroup_size(1)
fn head() {
    let n = p.n;
    var total = 0.0;
    for (var i = 0u; i < n; i++) {
        let md = x[i] - x[n + i];
        let rd = z[i] - z[n + i];
        let zi = -p.s * (md - rd);
        let pi = sigmoid(zi);
        let qi = sigmoid(-zi);
        let term = softplus(-zi) + p.alpha * qi;
        total += term;
        let dz = -qi * (1.0 + p.alpha * pi) / f32(n);
        let dmd = -p.s * dz;
        y[1u + i] = zi;
        y[1u + n + i] = pi;
        y[1u + 2u * n + i] = md;
        y[1u + 3u * n + i] = rd;
        y[1u + 4u * n + i] = dmd;
        y[1u + 5u * n + i] = -dmd;
        y[1u + 6u * n + i] = term;
    }
    y[0] = total / f32(n);
}

// Diffusion-KTO. x: (B) policy errors, z: (B) reference errors, the first `offset` samples
// desirable. g_j = z_j - x_j, Q = max(mean g, 0), u_j = y_j beta (g_j - Q) (y = +1 desirable,
// -1 not), loss = mean lambda_j (1 - sigmoid(u_j)), dL/dx_j = lambda_j h (1 - h) y_j beta / B
// with Q held constant. y: (2 + 3B) [loss, Q, u (B), sigmoid(u) (B), dL/derr (B)].
@compute @workgroup_size(1)
fn kto_head() {
    let b = p.n;
    var gsum = 0.0;
    for (var j = 0u; j < b; j++) {
        gsum += z[j] - x[j];
    }
    let q = max(gsum / f32(b), 0.0);
    var total = 0.0;
    for (var j = 0u; j < b; j++) {
        let good = j < p.offset;
        let yj = select(-1.0, 1.0, good);
        let lam = select(p.lam_u, p.alpha, good);
        let u = yj * p.s * ((z[j] - x[j]) - q);
        let h = sigmoid(u);
        let h1 = sigmoid(-u);  // 1 - h, without cancellation
        total += lam * h1;
        y[2u + j] = u;
        y[2u + b + j] = h;
        y[2u + 2u * b + j] = lam * h * h1 * yj * p.s / f32(b);
    }
    y[0] = total / f32(b);
    y[1] = q;
}

// x: (n) one gradient; y[offset + g]: the sum of squares of its chunk g.
@compute @workgroup_size(256)
fn sumsq(inp: Inputs) {
    begin(inp);
    let g = inp.wid.y * inp.nwg.x + inp.wid.x;
    if g * CHUNK >= p.n {
        return;
    }
    let end = min((g + 1u) * CHUNK, p.n);
    var acc = 0.0;
    for (var i = g * CHUNK + inp.lid; i < end; i += 256u) {
        acc += x[i] * x[i];
    }
    let r = block_sum(inp.lid, acc);
    if inp.lid == 0u {
        y[p.offset + g] = r;
    }
}

// x: (n) partial sums of squares of every gradient; z: (offset) the micro-batches' losses.
// y: (4) [clip coefficient, 1 if the step may go on else 0, gradient norm, mean loss].
@compute @workgroup_size(256)
fn guard(inp: Inputs) {
    begin(inp);
    var acc = 0.0;
    for (var i = inp.lid; i < p.n; i += 256u) {
        acc += x[i];
    }
    let total = block_sum(inp.lid, acc);
    if inp.lid == 0u {
        var loss = 0.0;
        for (var i = 0u; i < p.offset; i++) {
            loss += z[i];
        }
        loss = loss / f32(max(p.offset, 1u));
        let norm = sqrt(total);
        let ok = finite(norm) && finite(loss);
        var coef = 1.0;
        if ok {
            coef = min(p.max_norm / (norm + 1e-6), 1.0);
        }
        y[0] = coef;
        y[1] = select(0.0, 1.0, ok);
        y[2] = norm;
        y[3] = loss;
    }
}
