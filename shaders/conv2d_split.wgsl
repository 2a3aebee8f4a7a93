// The split-K convolution's second pass: Y = sum over the splits' partial products, plus what
// the forward's epilogue adds (bias, per-image temb, residual) as the flags say. Split-K
// matmuls use it too: C (batch, M, N) as an "image" of ncol = 1, so bias[i % N] is per column. One thread
// per output element; the host binds `part` in the place of an absent term (never read).

struct Params {
    len: u32,     // N * Cout * OH * OW: elements of Y, and of each split's slice of `part`
    cout: u32,
    ncol: u32,    // OH * OW
    splits: u32,
    has_bias: u32,
    has_temb: u32,
    has_res: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;  // (splits, N, Cout, OH, OW)
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // (N, Cout, OH, OW)
@group(0) @binding(3) var<storage, read> res: array<f32>;   // (N, Cout, OH, OW)
@group(0) @binding(4) var<storage, read> bias: array<f32>;  // (Cout)
@group(0) @binding(5) var<storage, read> temb: array<f32>;  // (N, Cout)

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.len {
        return;
    }
    var v = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        v += part[s * p.len + i];
    }
    let nc = i / p.ncol;  // image * Cout + channel
    if p.has_bias == 1u {
        v += bias[nc % p.cout];
    }
    if p.has_temb == 1u {
        v += temb[nc];
    }
    if p.has_res == 1u {
        v += res[i];
    }
    y[i] = v;
}
