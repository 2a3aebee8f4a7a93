// Batched C = A x B with either operand transposed, through strides:
// A[b, i, k] = a[b * a_bs + i * a_rs + k * a_cs], likewise B; C is contiguous (batch, M, N).
// 64x64 output tile per workgroup of 16x16 threads, 4x4 outputs per thread, K in steps of 16.
// Workgroup storage: 2 * 16 * 64 * 4 = 8 KiB (within WebGPU's 16 KiB default).

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
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;   // (batch, M, N)

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> a_tile: array<f32, 1024>;  // [TK][TM]
var<workgroup> b_tile: array<f32, 1024>;  // [TK][TN]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let bz = wid.z;
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let tid = lid.y * 16u + lid.x;
    let a_base = bz * p.a_bs;
    let b_base = bz * p.b_bs;
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
            if row0 + r < p.m && k0 + kk < p.k {
                va = a[a_base + (row0 + r) * p.a_rs + (k0 + kk) * p.a_cs];
            }
            a_tile[kk * TM + r] = va;
            let kb = idx / TN;
            let cc = idx % TN;
            var vb = 0.0;
            if k0 + kb < p.k && col0 + cc < p.n {
                vb = b[b_base + (k0 + kb) * p.b_rs + (col0 + cc) * p.b_cs];
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
    let c_base = bz * p.m * p.n;
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x + 16u * j;
            if row < p.m && col < p.n {
                c[c_base + row * p.n + col] = acc[i * 4u + j];
            }
        }
    }
}
