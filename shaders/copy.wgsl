// Layout copies. `gather`: out[i] = x[offset + sum_d coord_d(i) * strides[d]] over a contiguous
// output of `shape` (permute, slice, broadcast_to; broadcast axes have stride 0).
// `concat_part`: one input of a concat, viewed as (outer, seg), written at column `dst` of
// the output viewed as (outer, row).
// `pad`: x viewed as (outer, seg) placed at column `offset` of a zero output (outer, row):
// zero padding along one axis, the backward of a slice.

struct Params {
    n: u32,        // elements written (gather, pad: output; concat_part: this input)
    rank: u32,     // gather: dims used in the arrays below
    offset: u32,   // gather: element offset into x; pad: column of x's first element in a row
    seg: u32,      // concat_part, pad: the input's axis length * inner
    row: u32,      // concat_part, pad: the output's axis length * inner
    dst: u32,      // concat_part: the input's axis offset * inner
    _pad0: u32,
    _pad1: u32,
    shape: array<vec4<u32>, 2>,    // gather: output dims
    strides: array<vec4<u32>, 2>,  // gather: x strides per output dim
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    var rest = i;
    var src = p.offset;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let k = u32(d);
        let dim = p.shape[k / 4u][k % 4u];
        src += (rest % dim) * p.strides[k / 4u][k % 4u];
        rest = rest / dim;
    }
    y[i] = x[src];
}

@compute @workgroup_size(256)
fn concat_part(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    y[(i / p.seg) * p.row + p.dst + i % p.seg] = x[i];
}

@compute @workgroup_size(256)
fn pad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    let c = i % p.row;
    var v = 0.0;
    if c >= p.offset && c < p.offset + p.seg {
        v = x[(i / p.row) * p.seg + c - p.offset];
    }
    y[i] = v;
}
