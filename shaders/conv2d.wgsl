// 2D convolution (NCHW, zero padding, dilation 1, groups 1) as an implicit GEMM per image:
// Y[n] (Cout, OH*OW) = W (Cout, K) x im2col(X[n]) (K, OH*OW), K = Cin*KH*KW, image n = wid.z.
// Tiling as matmul.wgsl: 64x64 output tile per workgroup of 16x16 threads, 4x4 outputs per
// thread, K in steps of 16; the B tile loader computes the im2col element on the fly, so the
// im2col matrix is never stored. Workgroup storage: 2 * 16 * 64 * 4 = 8 KiB.
// Two entry points (with and without bias) because each must use exactly the buffers bound.

struct Params {
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    kh: u32,
    kw: u32,
    oh: u32,
    ow: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    k: u32,      // Cin * KH * KW
    ncol: u32,   // OH * OW
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (N, Cin, H, W)
@group(0) @binding(2) var<storage, read> wt: array<f32>;       // (Cout, Cin, KH, KW) = (Cout, K)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // (N, Cout, OH, OW)
@group(0) @binding(4) var<storage, read> bias: array<f32>;     // (Cout), `main` only

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> a_tile: array<f32, 1024>;  // [TK][TM]
var<workgroup> b_tile: array<f32, 1024>;  // [TK][TN]

// The 4x4 accumulators of this thread; output (row0 + lid.y + 16i, col0 + lid.x + 16j) at i*4+j.
fn conv_tile(wid: vec3<u32>, lid: vec3<u32>) -> array<f32, 16> {
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let tid = lid.y * 16u + lid.x;
    let x_base = wid.z * p.cin * p.h * p.w;
    let khw = p.kh * p.kw;
    // This thread loads B tile column tid % 64 at every step: its output pixel is fixed.
    let cc = tid % TN;
    let col = col0 + cc;
    let col_ok = col < p.ncol;
    let oy = col / max(p.ow, 1u);
    let ox = col % max(p.ow, 1u);
    let iy0 = i32(oy * p.sh) - i32(p.ph);
    let ix0 = i32(ox * p.sw) - i32(p.pw);
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = tid + e * 256u;
            let r = idx / TK;
            let kk = idx % TK;
            var va = 0.0;
            if row0 + r < p.cout && k0 + kk < p.k {
                va = wt[(row0 + r) * p.k + k0 + kk];
            }
            a_tile[kk * TM + r] = va;
            let kb = idx / TN;
            let kidx = k0 + kb;
            var vb = 0.0;
            if col_ok && kidx < p.k {
                let ci = kidx / khw;
                let rem = kidx % khw;
                let iy = iy0 + i32(rem / p.kw);
                let ix = ix0 + i32(rem % p.kw);
                if iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w) {
                    vb = x[x_base + (ci * p.h + u32(iy)) * p.w + u32(ix)];
                }
            }
            b_tile[kb * TN + cc] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var ar: array<f32, 4>;
            var br: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                ar[i] = a_tile[kk * TM + lid.y + 16u * i];
                br[i] = b_tile[kk * TN + lid.x + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(ar[i], br[j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }
    return acc;
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let acc = conv_tile(wid, lid);
    let y_base = wid.z * p.cout * p.ncol;
    for (var i = 0u; i < 4u; i++) {
        let row = wid.y * TM + lid.y + 16u * i;
        if row >= p.cout {
            continue;
        }
        let b = bias[row];
        for (var j = 0u; j < 4u; j++) {
            let col = wid.x * TN + lid.x + 16u * j;
            if col < p.ncol {
                y[y_base + row * p.ncol + col] = acc[i * 4u + j] + b;
            }
        }
    }
}

@compute @workgroup_size(16, 16)
fn main_nobias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let acc = conv_tile(wid, lid);
    let y_base = wid.z * p.cout * p.ncol;
    for (var i = 0u; i < 4u; i++) {
        let row = wid.y * TM + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let col = wid.x * TN + lid.x + 16u * j;
            if row < p.cout && col < p.ncol {
                y[y_base + row * p.ncol + col] = acc[i * 4u + j];
            }
        }
    }
}
