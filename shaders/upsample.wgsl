// Nearest-neighbour upsampling by integer factors (F.interpolate(mode="nearest")) and its
// backward.
// main:     dst[nc, oy, ox] = src[nc, oy / fh, ox / fw]; src = x (N*C, H, W), dst = y (N*C, H*fh, W*fw).
// backward: dst[nc, iy, ix] = sum of src over the fh x fw block it was copied to;
//           src = dy (N*C, H*fh, W*fw), dst = dx (N*C, H, W).

struct Params {
    n: u32,    // elements written
    h: u32,    // input height
    w: u32,    // input width
    fh: u32,   // height factor
    fw: u32,   // width factor
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

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
    dst[i] = src[(nc * p.h + oy / p.fh) * p.w + ox / p.fw];
}

@compute @workgroup_size(256)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    let ow = p.w * p.fw;
    let ix = i % p.w;
    let iy = (i / p.w) % p.h;
    let nc = i / (p.w * p.h);
    // Top-left of the block in dy.
    var at = ((nc * p.h + iy) * p.fh) * ow + ix * p.fw;
    var s = 0.0;
    for (var a = 0u; a < p.fh; a++) {
        for (var b = 0u; b < p.fw; b++) {
            s += src[at + b];
        }
        at += ow;
    }
    dst[i] = s;
}
