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

// `Inputs`, `begin`, `block_max` and `block_sum` come from the reduction fragment put before
// this file (reduce_tree.wgsl, or reduce_subgroup.wgsl where the adapter has subgroups).

@compute @workgroup_size(256)
fn main(inp: Inputs) {
    begin(inp);
    let lid = inp.lid;
    let row = inp.wid.y * inp.nwg.x + inp.wid.x;
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
fn backward(inp: Inputs) {
    begin(inp);
    let lid = inp.lid;
    let row = inp.wid.y * inp.nwg.x + inp.wid.x;
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
