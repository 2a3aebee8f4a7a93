// Batched C = A x B with either operand transposed, through strides:
// A[b, i, k] = a[b * a_bs + i * a_rs + k * a_cs], likewise B; C is contiguous (batch, M, N).
//
// The tile shape is prepended per variant (src/shaders.rs): `const BM`, `const BN` (64 or 128)
// and `const BK`, and `alias ELA`, `alias ELB`, the operands' element types: f32, or f16 (with
// `enable f16;`, on adapters with SHADER_F16) for both or for B alone (a linear layer's weight
// stored in f16): f16 storage halves the bytes read. `alias ELM` is the type the tiles are
// staged and multiplied in, with `const F16_MATH`: f32 (false) widens the values as they are
// staged, so products and sums stay f32 (a product of two f16 values is exact in f32); f16
// (true, opt-in) stages f16 tiles and sums each K step's BK products in f16 (packed f16
// arithmetic), adding those partial sums into f32 accumulators (f32 across K steps).
// 256 threads (16x16) per workgroup; each owns a register block of
// RM = BM/16 rows by RN = BN/16 columns, in groups of 4: rows g*64 + ty*4 + (0..3),
// columns h*64 + tx*4 + (0..3). So every workgroup-memory read is one vec4, the 16 threads
// of a row read 16 consecutive vec4s (no bank conflicts), and the next K step's global loads
// are in flight while this one multiplies.
//
// Split-K (`chunk` > 0; opt-in, `GpuContext::matmul_split_k`): for products with too few output
// tiles to fill the GPU (a LoRA adapter's gradient: 4 rows or columns, K = tokens), workgroup
// z = split * batch + b sums only K elements [split * chunk, min((split + 1) * chunk, K)) of
// batch b into c = partials (splits, batch, M, N), with no epilogue (the host clears the flags);
// conv2d_split.wgsl adds the partials, bias and residual. With chunk 0 it is the plain product:
// the loop is the same one, only its bounds are values.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    a_bs: u32,   // 0 when A is shared by every batch
    b_bs: u32,   // 0 when B is shared by every batch
    has_bias: u32,  // 1: C += bias[col] (a linear layer's bias)
    has_res: u32,   // 1: C += res (same layout as C: a residual)
    chunk: u32,     // split-K: K elements per split; 0: no split
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<ELA>;
@group(0) @binding(2) var<storage, read> b: array<ELB>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;   // (batch, M, N)
// Added in a second pass over C, as the flags say; the host binds `a` in the place of an absent one.
@group(0) @binding(4) var<storage, read> res: array<f32>;       // (batch, M, N)
@group(0) @binding(5) var<storage, read> bias: array<f32>;      // (N)

const RM: u32 = BM / 16u;
const RN: u32 = BN / 16u;
const GM: u32 = RM / 4u;        // vec4 groups of rows per thread
const GN: u32 = RN / 4u;
// vec4s per K row of a tile; the +1 spreads the transposing stores over the banks.
const SA: u32 = BM / 4u + 1u;
const SB: u32 = BN / 4u + 1u;
const LA: u32 = BM * BK / 256u;  // A elements each thread stages per K step
const LB: u32 = BN * BK / 256u;

var<workgroup> a_s: array<vec4<ELM>, BK * SA>;  // [BK][BM] (+ pad)
var<workgroup> b_s: array<vec4<ELM>, BK * SB>;  // [BK][BN] (+ pad)

// Where staged element e of this thread sits in the A tile: (row, kk). Threads walk the
// operand's contiguous dimension so a warp's global loads are coalesced.
fn a_slot(tid: u32, e: u32) -> vec2<u32> {
    let idx = tid + e * 256u;
    if p.a_cs == 1u {
        return vec2<u32>(idx / BK, idx % BK);
    }
    return vec2<u32>(idx % BM, idx / BM);
}

// (col, kk) of staged element e in the B tile.
fn b_slot(tid: u32, e: u32) -> vec2<u32> {
    let idx = tid + e * 256u;
    if p.b_cs == 1u {
        return vec2<u32>(idx % BN, idx / BN);
    }
    return vec2<u32>(idx / BK, idx % BK);
}

// This thread's share of the A and B tiles of one K step, held until the tiles are free.
var<private> pa: array<ELM, LA>;
var<private> pb: array<ELM, LB>;

// Loads K step `k0` of batch `bz` into `pa` / `pb` (zeros past the edges and from `ke` on).
fn load_step(tid: u32, row0: u32, col0: u32, bz: u32, k0: u32, ke: u32) {
    for (var e = 0u; e < LA; e++) {
        let s = a_slot(tid, e);
        var v = ELM(0.0);
        if row0 + s.x < p.m && k0 + s.y < ke {
            v = ELM(a[bz * p.a_bs + (row0 + s.x) * p.a_rs + (k0 + s.y) * p.a_cs]);
        }
        pa[e] = v;
    }
    for (var e = 0u; e < LB; e++) {
        let s = b_slot(tid, e);
        var v = ELM(0.0);
        if k0 + s.y < ke && col0 + s.x < p.n {
            v = ELM(b[bz * p.b_bs + (k0 + s.y) * p.b_rs + (col0 + s.x) * p.b_cs]);
        }
        pb[e] = v;
    }
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    // Split-K: z = split * batch + b, and C is the partials, so C's batch index stays z.
    let split = p.chunk != 0u;
    let bz = select(wid.z, wid.z % p.batch, split);
    let kb = select(0u, (wid.z / p.batch) * p.chunk, split);
    let ke = select(p.k, min(kb + p.chunk, p.k), split);
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;

    var acc: array<vec4<f32>, RM * GN>;
    for (var i = 0u; i < RM * GN; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    load_step(tid, row0, col0, bz, kb, ke);
    for (var k0 = kb; k0 < ke; k0 += BK) {
        for (var e = 0u; e < LA; e++) {
            let s = a_slot(tid, e);
            a_s[s.y * SA + s.x / 4u][s.x % 4u] = pa[e];
        }
        for (var e = 0u; e < LB; e++) {
            let s = b_slot(tid, e);
            b_s[s.y * SB + s.x / 4u][s.x % 4u] = pb[e];
        }
        workgroupBarrier();
        // Next step's loads, issued before the arithmetic that hides them.
        if k0 + BK < ke {
            load_step(tid, row0, col0, bz, k0 + BK, ke);
        }

        if F16_MATH {
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
        } else {
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
        }
        workgroupBarrier();
    }

    let c_base = wid.z * p.m * p.n;
    for (var g = 0u; g < GM; g++) {
        for (var i = 0u; i < 4u; i++) {
            let row = row0 + g * 64u + ty * 4u + i;
            if row >= p.m {
                continue;
            }
            for (var h = 0u; h < GN; h++) {
                let col = col0 + h * 64u + tx * 4u;
                let v = acc[(g * 4u + i) * GN + h];
                let o = c_base + row * p.n + col;
                for (var j = 0u; j < 4u; j++) {
                    if col + j < p.n {
                        c[o + j] = v[j];
                    }
                }
            }
        }
    }
    // Bias and residual in a second pass over what this thread just wrote, not in the loop
    // above: with them there, drivers stopped unrolling it, and an accumulator array indexed
    // by a loop variable lives in local memory (the 128-wide tiles ran 25x slower on an H100).
    if p.has_bias == 1u || p.has_res == 1u {
        for (var g = 0u; g < GM; g++) {
            for (var i = 0u; i < 4u; i++) {
                let row = row0 + g * 64u + ty * 4u + i;
                if row >= p.m {
                    continue;
                }
                for (var h = 0u; h < GN; h++) {
                    let col = col0 + h * 64u + tx * 4u;
                    let o = c_base + row * p.n + col;
                    for (var j = 0u; j < 4u; j++) {
                        if col + j < p.n {
                            var r = c[o + j];
                            if p.has_bias == 1u {
                                r += bias[col + j];
                            }
                            if p.has_res == 1u {
                                r += res[o + j];
                            }
                            c[o + j] = r;
                        }
                    }
                }
            }
        }
    }
}
