// Nearest-neighbour upsampling by integer factors (F.interpolate(mode="nearest")):
// y[nc, oy, ox] = x[nc, oy / fh, ox / fw].

struct Params {
    n: u32,    // output elements
    h: u32,    // input height
    w: u32,    // input width
    fh: u32,   // height factor
    fw: u32,   // width factor
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (N*C, H, W)
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // (N*C, H*fh, W*fw)

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    let ow = p.w * p.fw;
    let oh = p.h * p.fh;
    let ox = i % ow;
    let oy = (i / ow) % oh;
    let nc = i / (ow * oh);
    y[i] = x[(nc * p.h + oy / p.fh) * p.w + ox / p.fw];
}
