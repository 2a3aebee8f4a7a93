// Reductions over one axis of a tensor viewed as (outer, len, inner).
// `rows` (inner == 1): one workgroup per output, a strided pass then a shared-memory tree;
// a long axis is split into `nchunks` chunks per row whose partials a second `rows` pass reduces.
// `cols` (inner > 1): one thread per output and chunk of the axis, looping over the chunk; with
// several chunks (few outputs, long axis) their partials (outer, nchunks, inner) go through a
// second `cols` pass.
// Op codes mirror `ReduceOp::code` in src/ops/reduce.rs.

struct Params {
    outer: u32,    // product of the dims before the axis
    len: u32,      // axis length
    inner: u32,    // product of the dims after the axis
    op: u32,       // 0: sum times `scale`, 1: max
    chunk: u32,    // axis elements per workgroup (rows) or thread (cols); len in one pass
    nchunks: u32,  // chunks per output, ceil(len / chunk)
    scale: f32,    // applied to sums: 1, or 1 / len for a mean
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (outer, len, inner)
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // rows: (outer, nchunks); cols: (outer, nchunks, inner)

// `Inputs`, `begin`, `block_sum` and `block_max` (for `rows`) come from the reduction fragment
// put before this file (reduce_tree.wgsl, or reduce_subgroup.wgsl with subgroups).

fn combine(a: f32, b: f32) -> f32 {
    if p.op == 1u {
        return max(a, b);
    }
    return a + b;
}

@compute @workgroup_size(256)
fn rows(inp: Inputs) {
    begin(inp);
    let lid = inp.lid;
    let g = inp.wid.y * inp.nwg.x + inp.wid.x;
    if g >= p.outer * p.nchunks {
        return;
    }
    let o = g / p.nchunks;
    let c = g % p.nchunks;
    let start = o * p.len + c * p.chunk;
    let end = o * p.len + min((c + 1u) * p.chunk, p.len);
    var acc = 0.0;
    if p.op == 1u {
        // Any element of the row is an identity for max (the host rejects empty axes).
        acc = x[start];
    }
    for (var i = start + lid; i < end; i += 256u) {
        acc = combine(acc, x[i]);
    }
    // `p.op` is uniform: every thread takes the same branch.
    var r: f32;
    if p.op == 1u {
        r = block_max(lid, acc);
    } else {
        r = block_sum(lid, acc) * p.scale;
    }
    if lid == 0u {
        y[g] = r;
    }
}

@compute @workgroup_size(256)
fn cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let j = (wid.y * nwg.x + wid.x) * 256u + lid;
    if j >= p.outer * p.nchunks * p.inner {
        return;
    }
    let oc = j / p.inner;
    let base = (oc / p.nchunks) * p.len * p.inner + j % p.inner;
    let kb = (oc % p.nchunks) * p.chunk;
    let ke = min(kb + p.chunk, p.len);
    if p.op == 1u {
        var m = x[base + kb * p.inner];
        for (var k = kb + 1u; k < ke; k++) {
            m = max(m, x[base + k * p.inner]);
        }
        y[j] = m;
        return;
    }
    // Pairwise sum of blocks of 16 (a binary counter merges equal-sized partials), so the
    // rounding error grows with log(len) rather than len. stack[l] holds 2^l blocks.
    var stack: array<f32, 32>;
    var blocks = 0u;
    for (var k0 = kb; k0 < ke; k0 += 16u) {
        let k1 = min(k0 + 16u, ke);
        var s = 0.0;
        for (var k = k0; k < k1; k++) {
            s += x[base + k * p.inner];
        }
        var l = 0u;
        while ((blocks >> l) & 1u) == 1u {
            s = stack[l] + s;
            l++;
        }
        stack[l] = s;
        blocks++;
    }
    var total = 0.0;
    for (var l = 0u; l < 32u; l++) {
        if ((blocks >> l) & 1u) == 1u {
            total += stack[l];
        }
    }
    y[j] = total * p.scale;
}
