// where(cond, a, b) with broadcasting of all three: y = cond != 0 ? a : b.

struct Params {
    n: u32,
    rank: u32,
    _pad0: u32,
    _pad1: u32,
    shape: array<vec4<u32>, 2>,  // output dims
    sc: array<vec4<u32>, 2>,     // strides of cond per output dim (0 = broadcast)
    sa: array<vec4<u32>, 2>,
    sb: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> cond: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    var rest = i;
    var ic = 0u;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let k = u32(d);
        let dim = p.shape[k / 4u][k % 4u];
        let c = rest % dim;
        rest = rest / dim;
        ic += c * p.sc[k / 4u][k % 4u];
        ia += c * p.sa[k / 4u][k % 4u];
        ib += c * p.sb[k / 4u][k % 4u];
    }
    y[i] = select(b[ib], a[ia], cond[ic] != 0.0);
}
