// Elementwise binary ops with NumPy broadcasting: y[i] = f(a[ia], b[ib]).
// Broadcast axes have stride 0; `contig` marks both operands already of the output's shape.

struct Params {
    n: u32,        // output elements
    op: u32,       // BinaryOp code (src/ops/binary.rs)
    rank: u32,     // dims used in the arrays below
    contig: u32,   // 1: a, b and y share one contiguous shape
    shape: array<vec4<u32>, 2>,  // output dims
    sa: array<vec4<u32>, 2>,     // strides of a per output dim
    sb: array<vec4<u32>, 2>,     // strides of b per output dim
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

fn apply(op: u32, u: f32, v: f32) -> f32 {
    switch op {
        case 0u: { return u + v; }
        case 1u: { return u - v; }
        case 2u: { return u * v; }
        case 3u: { return u / v; }
        case 4u: { return max(u, v); }
        case 5u: { return min(u, v); }
        case 6u: { return select(0.0, 1.0, u >= v); }
        default: { return u; }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    if p.contig == 1u {
        y[i] = apply(p.op, a[i], b[i]);
        return;
    }
    var rest = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let k = u32(d);
        let dim = p.shape[k / 4u][k % 4u];
        let c = rest % dim;
        rest = rest / dim;
        ia += c * p.sa[k / 4u][k % 4u];
        ib += c * p.sb[k / 4u][k % 4u];
    }
    y[i] = apply(p.op, a[ia], b[ib]);
}
