// Numerically stable softmax over the last axis: y = exp(x - max) / sum(exp(x - max)).
// `backward`: dx = y * (dy - sum(dy * y)) per row, with y at binding 1 and dx written to binding 2.
// One workgroup per row; rows beyond 65535 come through the 2-D grid.

struct Params {
    rows: u32,  // product of all dims but the last
    cols: u32,  // last dim (> 0)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (rows, cols)
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // (rows, cols); backward: dx
@group(0) @binding(3) var<storage, read> dy: array<f32>;       // (rows, cols), backward only

var<workgroup> red: array<f32, 256>;

// Tree reductions over the workgroup; the trailing barrier lets the next call reuse `red`.
fn block_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn block_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if row >= p.rows {
        return;
    }
    let start = row * p.cols;
    // Any element of the row is an identity for max.
    var m = x[start];
    for (var j = lid; j < p.cols; j += 256u) {
        m = max(m, x[start + j]);
    }
    m = block_max(lid, m);
    // Each thread rescales exactly the elements it wrote, so no barrier is needed between.
    var s = 0.0;
    for (var j = lid; j < p.cols; j += 256u) {
        let e = exp(x[start + j] - m);
        y[start + j] = e;
        s += e;
    }
    let inv = 1.0 / block_sum(lid, s);
    for (var j = lid; j < p.cols; j += 256u) {
        y[start + j] *= inv;
    }
}

// x holds the forward's output y here; `y` receives dx.
@compute @workgroup_size(256)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if row >= p.rows {
        return;
    }
    let start = row * p.cols;
    var s = 0.0;
    for (var j = lid; j < p.cols; j += 256u) {
        s += dy[start + j] * x[start + j];
    }
    let dot = block_sum(lid, s);
    for (var j = lid; j < p.cols; j += 256u) {
        y[start + j] = x[start + j] * (dy[start + j] - dot);
    }
}
