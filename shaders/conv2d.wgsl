// The two backward GEMMs of the 2D convolution (NCHW, zero padding, dilation 1, groups 1) as
// implicit GEMMs: a 64x64 output tile per workgroup of 16x16 threads, 4x4 outputs per thread,
// the reduction in steps of 16, and tiles built in workgroup memory straight from the tensors
// (no im2col matrix is ever stored). Workgroup storage: 2 * 16 * 64 * 4 = 8 KiB.
// (The forward: conv2d_fwd.wgsl, on register-blocked tiles.)
//
// grad_input:          dX[n] (Cin, H*W) = W^T x cols(dY[n]): the transposed convolution,
//                      gathering from dY. Pixels are split into stride phases (wid.z = image *
//                      SH*SW + phase) so each workgroup only walks the kernel taps that reach
//                      its phase: no multiplications by the zeros a strided conv leaves.
// grad_weight:         dW (Cout, K) = sum over images and pixels of dY (Cout, N*OH*OW) x
//                      im2col(X)^T; wid.z = split s sums reduction elements [s*chunk, ...)
//                      into its own (Cout, K) slice, which the host adds up when splits > 1.
//
// Buffers per entry point (binding 0 is Params):
//   grad_input:        in1 = dY (N, Cout, OH, OW), in2 = W, dst = dX (N, Cin, H, W)
//   grad_weight:       in1 = X, in2 = dY, dst = dW partials (splits, Cout, K)

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
    n: u32,      // images (grad_weight)
    chunk: u32,  // reduction elements per split (grad_weight)
    has_bias: u32,  // the forward's epilogue (conv2d_fwd.wgsl); unused here
    has_temb: u32,
    has_res: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in1: array<f32>;
@group(0) @binding(2) var<storage, read> in2: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> a_tile: array<f32, 1024>;  // [TK][TM]
var<workgroup> b_tile: array<f32, 1024>;  // [TK][TN]

// One reduction step of 16 on the loaded tiles; acc[i*4+j] is output
// (row0 + lid.y + 16i, col0 + lid.x + 16j).
fn tile_step(lid: vec3<u32>, acc: ptr<function, array<f32, 16>>) {
    for (var kk = 0u; kk < TK; kk++) {
        var ar: array<f32, 4>;
        var br: array<f32, 4>;
        for (var i = 0u; i < 4u; i++) {
            ar[i] = a_tile[kk * TM + lid.y + 16u * i];
            br[i] = b_tile[kk * TN + lid.x + 16u * i];
        }
        for (var i = 0u; i < 4u; i++) {
            for (var j = 0u; j < 4u; j++) {
                (*acc)[i * 4u + j] = fma(ar[i], br[j], (*acc)[i * 4u + j]);
            }
        }
    }
}

// Rows of the tile are input channels ci, columns the pixels of one stride phase: input
// pixels (iy, ix) with (iy + PH) % SH = ry and (ix + PW) % SW = rx. Exactly the taps
// ky = ry + SH*jy, kx = rx + SW*jx reach them, from output pixel
// ((iy + PH - ry) / SH - jy, (ix + PW - rx) / SW - jx). Reduction index = (tap, co).
@compute @workgroup_size(16, 16)
fn grad_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let phases = p.sh * p.sw;
    let img = wid.z / phases;
    let ry = (wid.z % phases) / p.sw;
    let rx = wid.z % p.sw;
    // First input row/column of the phase, and how many it has.
    let iy_first = (ry + p.sh - p.ph % p.sh) % p.sh;
    let ix_first = (rx + p.sw - p.pw % p.sw) % p.sw;
    let ny = select(0u, (p.h - iy_first + p.sh - 1u) / p.sh, iy_first < p.h);
    let nx = select(0u, (p.w - ix_first + p.sw - 1u) / p.sw, ix_first < p.w);
    let ncols = ny * nx;
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    // The grid covers the largest phase; workgroups past this one's pixels have nothing to do.
    if col0 >= ncols {
        return;
    }
    let nky = select(0u, (p.kh - ry + p.sh - 1u) / p.sh, ry < p.kh);
    let nkx = select(0u, (p.kw - rx + p.sw - 1u) / p.sw, rx < p.kw);
    let csteps = (p.cout + TK - 1u) / TK;
    let steps = nky * nkx * csteps;
    let khw = p.kh * p.kw;
    let tid = lid.y * 16u + lid.x;
    // B tile column tid % 64 is this thread's at every step.
    let cc = tid % TN;
    let col = col0 + cc;
    let col_ok = col < ncols;
    let iy = iy_first + (col / max(nx, 1u)) * p.sh;
    let ix = ix_first + (col % max(nx, 1u)) * p.sw;
    let oy_base = i32((iy + p.ph - ry) / p.sh);
    let ox_base = i32((ix + p.pw - rx) / p.sw);
    let dy_base = img * p.cout * p.ncol;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var s = 0u; s < steps; s++) {
        let tap = s / csteps;
        let c0 = (s % csteps) * TK;
        let jy = tap / nkx;
        let jx = tap % nkx;
        let kyx = (ry + jy * p.sh) * p.kw + rx + jx * p.sw;
        let oy = oy_base - i32(jy);
        let ox = ox_base - i32(jx);
        let pix_ok = col_ok && oy >= 0 && oy < i32(p.oh) && ox >= 0 && ox < i32(p.ow);
        for (var e = 0u; e < 4u; e++) {
            let idx = tid + e * 256u;
            // A[ci, co] = W[co, ci, ky, kx]
            let r = idx % TM;
            let kk = idx / TM;
            var va = 0.0;
            if row0 + r < p.cin && c0 + kk < p.cout {
                va = in2[((c0 + kk) * p.cin + row0 + r) * khw + kyx];
            }
            a_tile[kk * TM + r] = va;
            // B[co, pixel] = dY[img, co, oy, ox]
            let kb = idx / TN;
            var vb = 0.0;
            if pix_ok && c0 + kb < p.cout {
                vb = in1[dy_base + (c0 + kb) * p.ncol + u32(oy) * p.ow + u32(ox)];
            }
            b_tile[kb * TN + cc] = vb;
        }
        workgroupBarrier();
        tile_step(lid, &acc);
        workgroupBarrier();
    }
    let x_base = img * p.cin * p.h * p.w;
    for (var j = 0u; j < 4u; j++) {
        let c = col0 + lid.x + 16u * j;
        if c >= ncols {
            continue;
        }
        let py = iy_first + (c / nx) * p.sh;
        let px = ix_first + (c % nx) * p.sw;
        for (var i = 0u; i < 4u; i++) {
            let row = row0 + lid.y + 16u * i;
            if row < p.cin {
                dst[x_base + (row * p.h + py) * p.w + px] = acc[i * 4u + j];
            }
        }
    }
}

// Rows of the tile are output channels co, columns the K index (ci, ky, kx), the reduction
// runs over (image, output pixel). Loads are laid out so that 16 neighbouring threads read
// 16 neighbouring pixels of dY and of X.
@compute @workgroup_size(16, 16)
fn grad_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let tid = lid.y * 16u + lid.x;
    let khw = p.kh * p.kw;
    let total = p.n * p.ncol;
    let r_begin = wid.z * p.chunk;
    let r_end = min(r_begin + p.chunk, total);
    // The 4 K columns this thread loads (one per e), decoded once.
    var kci: array<u32, 4>;
    var kky: array<u32, 4>;
    var kkx: array<u32, 4>;
    for (var e = 0u; e < 4u; e++) {
        let kc = col0 + (tid + e * 256u) / TK;
        kci[e] = kc / khw;
        kky[e] = (kc % khw) / p.kw;
        kkx[e] = kc % p.kw;
    }
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var r0 = r_begin; r0 < r_end; r0 += TK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = tid + e * 256u;
            let kk = idx % TK;
            let c = idx / TK;
            let r = r0 + kk;
            let img = r / max(p.ncol, 1u);
            let pix = r % max(p.ncol, 1u);
            // A[co, r] = dY[img, co, pix]
            var va = 0.0;
            if r < r_end && row0 + c < p.cout {
                va = in2[(img * p.cout + row0 + c) * p.ncol + pix];
            }
            a_tile[kk * TM + c] = va;
            // B[r, k] = X[img, ci, oy*SH + ky - PH, ox*SW + kx - PW], 0 in the padding
            var vb = 0.0;
            if r < r_end && col0 + c < p.k {
                let iy = i32((pix / p.ow) * p.sh + kky[e]) - i32(p.ph);
                let ix = i32((pix % p.ow) * p.sw + kkx[e]) - i32(p.pw);
                if iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w) {
                    vb = in1[((img * p.cin + kci[e]) * p.h + u32(iy)) * p.w + u32(ix)];
                }
            }
            b_tile[kk * TN + c] = vb;
        }
        workgroupBarrier();
        tile_step(lid, &acc);
        workgroupBarrier();
    }
    let base = wid.z * p.cout * p.k;
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x + 16u * j;
            if row < p.cout && col < p.k {
                dst[base + row * p.k + col] = acc[i * 4u + j];
            }
        }
    }
}
