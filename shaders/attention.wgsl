// Fused scaled dot-product attention with online softmax (FlashAttention's recurrence):
// O[b, i] = softmax_j(scale * Q[b, i] . K[b, j]) V[b, j], never storing a score row.
// One thread owns one query row; a workgroup of 64 rows walks the keys in tiles of 8
// shared through workgroup memory. Head dims up to MAX_D; larger ones take the chunked path.

struct Params {
    bh: u32,     // batch * heads
    lq: u32,     // query length
    lk: u32,     // key/value length
    d: u32,      // query/key head dim
    dv: u32,     // value head dim
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;         // (BH, Lq, D)
@group(0) @binding(2) var<storage, read> k: array<f32>;         // (BH, Lk, D)
@group(0) @binding(3) var<storage, read> v: array<f32>;         // (BH, Lk, Dv)
@group(0) @binding(4) var<storage, read_write> o: array<f32>;   // (BH, Lq, Dv)

const MAX_D: u32 = 160u;
const ROWS: u32 = 64u;
const TK: u32 = 8u;

var<workgroup> k_tile: array<f32, 1280>;  // [TK][MAX_D]
var<workgroup> v_tile: array<f32, 1280>;  // [TK][MAX_D]

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.y;
    let row = wid.x * ROWS + lid;
    let in_range = row < p.lq;
    var qr: array<f32, MAX_D>;
    var acc: array<f32, MAX_D>;
    let q_off = (b * p.lq + min(row, p.lq - 1u)) * p.d;
    for (var c = 0u; c < p.d; c++) {
        qr[c] = q[q_off + c] * p.scale;
    }
    for (var c = 0u; c < p.dv; c++) {
        acc[c] = 0.0;
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var j0 = 0u; j0 < p.lk; j0 += TK) {
        let nk = min(TK, p.lk - j0);
        // Cooperative load of up to TK keys and values.
        for (var e = lid; e < TK * MAX_D; e += ROWS) {
            let jj = e / MAX_D;
            let c = e % MAX_D;
            var kv = 0.0;
            var vv = 0.0;
            if jj < nk {
                let j = b * p.lk + j0 + jj;
                if c < p.d {
                    kv = k[j * p.d + c];
                }
                if c < p.dv {
                    vv = v[j * p.dv + c];
                }
            }
            k_tile[e] = kv;
            v_tile[e] = vv;
        }
        workgroupBarrier();
        var s: array<f32, TK>;
        var tile_max = -3.0e38;
        for (var jj = 0u; jj < nk; jj++) {
            var dot = 0.0;
            for (var c = 0u; c < p.d; c++) {
                dot = fma(qr[c], k_tile[jj * MAX_D + c], dot);
            }
            s[jj] = dot;
            tile_max = max(tile_max, dot);
        }
        let m_new = max(m, tile_max);
        let corr = exp(m - m_new);
        l = l * corr;
        for (var c = 0u; c < p.dv; c++) {
            acc[c] = acc[c] * corr;
        }
        for (var jj = 0u; jj < nk; jj++) {
            let pj = exp(s[jj] - m_new);
            l += pj;
            for (var c = 0u; c < p.dv; c++) {
                acc[c] = fma(pj, v_tile[jj * MAX_D + c], acc[c]);
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    if in_range {
        let o_off = (b * p.lq + row) * p.dv;
        let inv = 1.0 / l;
        for (var c = 0u; c < p.dv; c++) {
            o[o_off + c] = acc[c] * inv;
        }
    }
}
