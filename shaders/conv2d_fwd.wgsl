// 2D convolution forward (NCHW, zero padding, dilation 1, groups 1) as an implicit GEMM on
// matmul.wgsl's register-blocked tiles: Y[n] (Cout, OH*OW) = W (Cout, K) x im2col(X[n]) (K, OH*OW),
// K = Cin*KH*KW, image n = wid.z. The im2col matrix is never stored: each B tile element is
// gathered from X as it is staged. (Backward GEMMs: conv2d.wgsl.)
//
// The tile shape is prepended per variant (src/shaders.rs): `const BM`, `const BN` (64 or 128)
// and `const BK`, chosen by `ops::matmul::tile`, and `alias ELA` (X, or dY for grad_input_s1)
// and `alias ELB` (W): f32, or f16 for both or for W alone; `alias ELM` and `const F16_MATH`:
// staged and multiplied in f32 (widened as staged), or, opt-in, in f16 with each K step's
// products summed in f16 and f32 across steps (see matmul.wgsl). 256 threads (16x16); each owns rows
// g*64 + ty*4 + (0..3) and columns h*64 + tx*4 + (0..3) of the tile (see matmul.wgsl).
//
// main: in1 = X (N, Cin, H, W), in2 = W (Cout, Cin, KH, KW), dst = Y (N, Cout, OH, OW), and
// what the epilogue adds as its flags say: res (N, Cout, OH, OW), bias (Cout), temb (N, Cout);
// the host binds in1 in the place of an absent one (never read). One pass instead of an
// elementwise add per term.
// grad_input_s1: the input gradient of a stride-1 convolution, which is itself a convolution:
// dX = conv(dY, W'), W'[ci, co, ky, kx] = W[co, ci, KH-1-ky, KW-1-kx], padding KH-1-PH and
// KW-1-PW. Params describe that convolution (cin = the forward's Cout, cout = its Cin, ...);
// in1 = dY, in2 = W as stored (read flipped and transposed), dst = dX.
// main_split, grad_input_s1_split: split-K, for layers with too few output tiles to fill the
// GPU (1280 channels at 8x8: 20 workgroups): workgroup z = split * N + image sums K elements
// [split * chunk, min((split + 1) * chunk, K)) into dst = partials (splits, N, Cout, OH, OW),
// no epilogue; conv2d_split.wgsl adds the partials and the epilogue's terms.

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
    n: u32,
    chunk: u32,  // the split entries: K elements per split
    has_bias: u32,  // main: 1 adds bias[co]
    has_temb: u32,  // main: 1 adds temb[n, co] (a per-image bias: the resnets' time embedding)
    has_res: u32,   // main: 1 adds res[n, co, oy, ox] (a residual)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in1: array<ELA>;
@group(0) @binding(2) var<storage, read> in2: array<ELB>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;
// grad_input_s1 and the split entries bind in1, in2 and dst only (they add nothing).
@group(0) @binding(4) var<storage, read> res: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read> temb: array<f32>;

const RM: u32 = BM / 16u;
const RN: u32 = BN / 16u;
const GM: u32 = RM / 4u;
const GN: u32 = RN / 4u;
const SA: u32 = BM / 4u + 1u;
const SB: u32 = BN / 4u + 1u;
const LA: u32 = BM * BK / 256u;
const LB: u32 = BN * BK / 256u;

var<workgroup> a_s: array<vec4<ELM>, BK * SA>;  // [BK][BM] (+ pad)
var<workgroup> b_s: array<vec4<ELM>, BK * SB>;  // [BK][BN] (+ pad)

// Set by grad_input_s1 and grad_input_s1_split before `tiles`: A is then W flipped and transposed.
var<private> flipped: bool;

// A (row, kidx): W (Cout, K) as stored, or W'[row, co, tap] = W[co, row, KH*KW-1-tap].
fn a_value(row: u32, kidx: u32) -> f32 {
    if flipped {
        let khw = p.kh * p.kw;
        return f32(in2[((kidx / khw) * p.cout + row) * khw + khw - 1u - kidx % khw]);
    }
    return f32(in2[row * p.k + kidx]);
}

// A = W is row-major (Cout, K): threads walk K. Element e of this thread: (row, kk).
fn a_slot(tid: u32, e: u32) -> vec2<u32> {
    let idx = tid + e * 256u;
    return vec2<u32>(idx / BK, idx % BK);
}

// B: threads walk the pixels, so a thread's column is the same at every e (256 % BN == 0)
// and its pixel's input window is worked out once.
fn b_kk(tid: u32, e: u32) -> u32 {
    return (tid + e * 256u) / BN;
}

// This thread's register block of image `img`'s product over K elements [kb, ke).
fn tiles(wid: vec3<u32>, lid: vec3<u32>, img: u32, kb: u32, ke: u32) -> array<vec4<f32>, RM * GN> {
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let x_base = img * p.cin * p.h * p.w;
    let khw = p.kh * p.kw;
    let bc = tid % BN;
    let col = col0 + bc;
    let col_ok = col < p.ncol;
    let oy = col / max(p.ow, 1u);
    let ox = col % max(p.ow, 1u);
    let iy0 = i32(oy * p.sh) - i32(p.ph);
    let ix0 = i32(ox * p.sw) - i32(p.pw);

    var acc: array<vec4<f32>, RM * GN>;
    for (var i = 0u; i < RM * GN; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    var pa: array<ELM, LA>;
    var pb: array<ELM, LB>;
    for (var k0 = kb; k0 < ke + BK; k0 += BK) {
        // Stage step k0 - BK (loaded last time round) while loading step k0.
        if k0 > kb {
            for (var e = 0u; e < LA; e++) {
                let s = a_slot(tid, e);
                a_s[s.y * SA + s.x / 4u][s.x % 4u] = pa[e];
            }
            for (var e = 0u; e < LB; e++) {
                b_s[b_kk(tid, e) * SB + bc / 4u][bc % 4u] = pb[e];
            }
            workgroupBarrier();
        }
        if k0 < ke {
            for (var e = 0u; e < LA; e++) {
                let s = a_slot(tid, e);
                var v = ELM(0.0);
                if row0 + s.x < p.cout && k0 + s.y < ke {
                    v = ELM(a_value(row0 + s.x, k0 + s.y));
                }
                pa[e] = v;
            }
            for (var e = 0u; e < LB; e++) {
                let kidx = k0 + b_kk(tid, e);
                var v = ELM(0.0);
                if col_ok && kidx < ke {
                    let ci = kidx / khw;
                    let rem = kidx % khw;
                    let iy = iy0 + i32(rem / p.kw);
                    let ix = ix0 + i32(rem % p.kw);
                    if iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w) {
                        v = ELM(in1[x_base + (ci * p.h + u32(iy)) * p.w + u32(ix)]);
                    }
                }
                pb[e] = v;
            }
        }
        if k0 > kb && F16_MATH {
            // This K step's products summed in ELM, then added to the f32 accumulators.
            var part: array<vec4<ELM>, RM * GN>;
            for (var kk = 0u; kk < BK; kk++) {
                var av: array<vec4<ELM>, GM>;
                var bv: array<vec4<ELM>, GN>;
                for (var g = 0u; g < GM; g++) {
                    av[g] = a_s[kk * SA + g * 16u + ty];
                }
                for (var h = 0u; h < GN; h++) {
                    bv[h] = b_s[kk * SB + h * 16u + tx];
                }
                for (var g = 0u; g < GM; g++) {
                    for (var i = 0u; i < 4u; i++) {
                        let x = vec4<ELM>(av[g][i]);
                        for (var h = 0u; h < GN; h++) {
                            let o = (g * 4u + i) * GN + h;
                            part[o] = fma(x, bv[h], part[o]);
                        }
                    }
                }
            }
            for (var o = 0u; o < RM * GN; o++) {
                acc[o] += vec4<f32>(part[o]);
            }
            workgroupBarrier();
        } else if k0 > kb {
            for (var kk = 0u; kk < BK; kk++) {
                var av: array<vec4<f32>, GM>;
                var bv: array<vec4<f32>, GN>;
                for (var g = 0u; g < GM; g++) {
                    av[g] = vec4<f32>(a_s[kk * SA + g * 16u + ty]);
                }
                for (var h = 0u; h < GN; h++) {
                    bv[h] = vec4<f32>(b_s[kk * SB + h * 16u + tx]);
                }
                for (var g = 0u; g < GM; g++) {
                    for (var i = 0u; i < 4u; i++) {
                        let x = vec4<f32>(av[g][i]);
                        for (var h = 0u; h < GN; h++) {
                            let o = (g * 4u + i) * GN + h;
                            acc[o] = fma(x, bv[h], acc[o]);
                        }
                    }
                }
            }
            workgroupBarrier();
        }
    }
    return acc;
}

// Output row of register row r = g * 4 + i of this thread.
fn out_row(wid: vec3<u32>, lid: vec3<u32>, r: u32) -> u32 {
    return wid.y * BM + (r / 4u) * 64u + lid.y * 4u + r % 4u;
}

// `bv`: what each register row adds (main: bias + temb; zeros elsewhere).
fn store(wid: vec3<u32>, lid: vec3<u32>, acc: array<vec4<f32>, RM * GN>, bv: array<f32, RM>) {
    let y_base = wid.z * p.cout * p.ncol;
    for (var g = 0u; g < GM; g++) {
        for (var i = 0u; i < 4u; i++) {
            let row = out_row(wid, lid, g * 4u + i);
            if row >= p.cout {
                continue;
            }
            let b = bv[g * 4u + i];
            for (var h = 0u; h < GN; h++) {
                let col = wid.x * BN + h * 64u + lid.x * 4u;
                let v = acc[(g * 4u + i) * GN + h] + b;
                let o = y_base + row * p.ncol + col;
                for (var j = 0u; j < 4u; j++) {
                    if col + j < p.ncol {
                        dst[o + j] = v[j];
                    }
                }
            }
        }
    }
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    var bv: array<f32, RM>;
    for (var r = 0u; r < RM; r++) {
        let row = min(out_row(wid, lid, r), p.cout - 1u);
        var v = 0.0;
        if p.has_bias == 1u {
            v = bias[row];
        }
        if p.has_temb == 1u {
            v += temb[wid.z * p.cout + row];
        }
        bv[r] = v;
    }
    store(wid, lid, tiles(wid, lid, wid.z, 0u, p.k), bv);
    if p.has_res == 1u {
        add_res(wid, lid);
    }
}

// dst += res over this thread's outputs, after `store`: a second pass rather than a branch in
// the store loop, which keeps that loop small enough for drivers to unroll (an accumulator
// array indexed by a loop variable lives in local memory; see matmul.wgsl).
fn add_res(wid: vec3<u32>, lid: vec3<u32>) {
    let y_base = wid.z * p.cout * p.ncol;
    for (var r = 0u; r < RM; r++) {
        let row = out_row(wid, lid, r);
        if row >= p.cout {
            continue;
        }
        for (var h = 0u; h < GN; h++) {
            let col = wid.x * BN + h * 64u + lid.x * 4u;
            let o = y_base + row * p.ncol + col;
            for (var j = 0u; j < 4u; j++) {
                if col + j < p.ncol {
                    dst[o + j] += res[o + j];
                }
            }
        }
    }
}

@compute @workgroup_size(16, 16)
fn grad_input_s1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    flipped = true;
    var bv: array<f32, RM>;
    for (var r = 0u; r < RM; r++) {
        bv[r] = 0.0;
    }
    store(wid, lid, tiles(wid, lid, wid.z, 0u, p.k), bv);
}

// Split `wid.z / N`'s partial product of image `wid.z % N` (its slice of dst is z's).
fn split_partial(wid: vec3<u32>, lid: vec3<u32>) {
    let kb = (wid.z / p.n) * p.chunk;
    var bv: array<f32, RM>;
    for (var r = 0u; r < RM; r++) {
        bv[r] = 0.0;
    }
    store(wid, lid, tiles(wid, lid, wid.z % p.n, kb, min(kb + p.chunk, p.k)), bv);
}

@compute @workgroup_size(16, 16)
fn main_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    split_partial(wid, lid);
}

@compute @workgroup_size(16, 16)
fn grad_input_s1_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    flipped = true;
    split_partial(wid, lid);
}
