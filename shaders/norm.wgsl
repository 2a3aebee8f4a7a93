// Layer norm and group norm: each normalised row is `row_len` contiguous elements, one
// workgroup per row. Group norm rows are (n, g) of an (N, C, S) input, `cpg` channels of `spatial`
// elements each; layer norm is the case groups = 1, spatial = 1, cpg = C.
// Mean first, then the variance as the mean of squared deviations (two passes, biased).
// `backward` recomputes the row's statistics from x and writes
//   dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)),  dxh = dy * w,  xh = (x - mean) * rstd,
// and, when `want_g` is set, g = dy * xh, which the host sums into the weight's gradient.
// With `act` (group norm + SiLU fused, as every UNet and VAE resnet uses them), the forward
// writes silu(z), z = xh * w + b, and the backward first turns dy into dz = dy * silu'(z)
// (z recomputed from x, w and `bias`), written to `dz` when `want_dz` (the bias's gradient).

struct Params {
    rows: u32,     // normalised rows: N * groups, or the product of all dims but the last
    row_len: u32,  // elements per row: cpg * spatial
    spatial: u32,  // elements per channel in a row (1 for layer norm)
    cpg: u32,      // channels per row
    groups: u32,   // rows per sample, for the channel of an element
    has_w: u32,    // 1: multiply by w[channel]
    has_b: u32,    // forward, 1: add b[channel]
    eps: f32,
    want_g: u32,   // backward, 1: write dy * xh to `g`
    act: u32,      // 1: SiLU after the affine
    want_dz: u32,  // backward with act, 1: write dz to `dz`
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (rows, row_len)
@group(0) @binding(2) var<storage, read> w: array<f32>;        // (C), or x when absent
// Forward: the bias (C), or x when absent. Backward: dy (rows, row_len). One binding serves
// both because the host binds buffers to consecutive slots.
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;  // (rows, row_len); backward: dx
@group(0) @binding(5) var<storage, read_write> g: array<f32>;  // backward: (rows, row_len), or 1 when !want_g
@group(0) @binding(6) var<storage, read> bias: array<f32>;     // backward: (C), or x when absent
@group(0) @binding(7) var<storage, read_write> dz: array<f32>; // backward: (rows, row_len), or 1 when !want_dz

// `Inputs`, `begin`, `block_sum` and `block_sum2` come from the reduction fragment put before
// this file (reduce_tree.wgsl, or reduce_subgroup.wgsl where the adapter has subgroups).

// Mean (relative to `pivot`) and rstd of row `start`. Working relative to the row's first
// element: x - pivot is exact for nearby values, so a large common offset (values around 1000)
// loses nothing in the mean or the deviations.
fn row_stats(lid: u32, start: u32, pivot: f32) -> vec2<f32> {
    let n = f32(p.row_len);
    var s = 0.0;
    for (var j = lid; j < p.row_len; j += 256u) {
        s += x[start + j] - pivot;
    }
    let mean = block_sum(lid, s) / n;
    var q = 0.0;
    for (var j = lid; j < p.row_len; j += 256u) {
        let d = (x[start + j] - pivot) - mean;
        q += d * d;
    }
    let rstd = inverseSqrt(block_sum(lid, q) / n + p.eps);
    return vec2<f32>(mean, rstd);
}

@compute @workgroup_size(256)
fn main(inp: Inputs) {
    begin(inp);
    let lid = inp.lid;
    let r = inp.wid.y * inp.nwg.x + inp.wid.x;
    if r >= p.rows {
        return;
    }
    let start = r * p.row_len;
    let pivot = x[start];
    let st = row_stats(lid, start, pivot);
    let c0 = (r % p.groups) * p.cpg;
    for (var j = lid; j < p.row_len; j += 256u) {
        var v = ((x[start + j] - pivot) - st.x) * st.y;
        let c = c0 + j / p.spatial;
        if p.has_w == 1u {
            v *= w[c];
        }
        if p.has_b == 1u {
            v += b[c];
        }
        if p.act == 1u {
            v = v / (1.0 + exp(-v));
        }
        y[start + j] = v;
    }
}

// dy, or with `act` dz = dy * silu'(z) for z = xh * w + bias, at element j of the row.
fn grad_in(start: u32, j: u32, c: u32, xh: f32) -> f32 {
    let d = b[start + j];
    if p.act == 0u {
        return d;
    }
    var z = xh;
    if p.has_w == 1u {
        z *= w[c];
    }
    if p.has_b == 1u {
        z += bias[c];
    }
    let s = 1.0 / (1.0 + exp(-z));
    return d * (s * (1.0 + z * (1.0 - s)));
}

@compute @workgroup_size(256)
fn backward(inp: Inputs) {
    begin(inp);
    let lid = inp.lid;
    let r = inp.wid.y * inp.nwg.x + inp.wid.x;
    if r >= p.rows {
        return;
    }
    let start = r * p.row_len;
    let pivot = x[start];
    let st = row_stats(lid, start, pivot);
    let c0 = (r % p.groups) * p.cpg;
    // sums of dxh and dxh * xh over the row
    var acc = vec2<f32>(0.0, 0.0);
    for (var j = lid; j < p.row_len; j += 256u) {
        let xh = ((x[start + j] - pivot) - st.x) * st.y;
        let c = c0 + j / p.spatial;
        var dxh = grad_in(start, j, c, xh);
        if p.has_w == 1u {
            dxh *= w[c];
        }
        acc += vec2<f32>(dxh, dxh * xh);
    }
    let m = block_sum2(lid, acc) / f32(p.row_len);
    for (var j = lid; j < p.row_len; j += 256u) {
        let xh = ((x[start + j] - pivot) - st.x) * st.y;
        let c = c0 + j / p.spatial;
        let d = grad_in(start, j, c, xh);
        var dxh = d;
        if p.has_w == 1u {
            dxh *= w[c];
        }
        y[start + j] = st.y * (dxh - m.x - xh * m.y);
        if p.want_g == 1u {
            g[start + j] = d * xh;
        }
        if p.want_dz == 1u {
            dz[start + j] = d;
        }
    }
}
