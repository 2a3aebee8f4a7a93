// Fused scaled dot-product attention with online softmax (FlashAttention's recurrence):
// O[b, i] = softmax_j(scale * Q[b, i] . K[b, j]) V[b, j], never storing a score row.
// One thread owns one query row; a workgroup of 64 rows walks the keys in tiles of 8
// shared through workgroup memory. Head dims up to MAX_D; larger ones take the chunked path.
//
// Variants (src/shaders.rs prepends `const MAX_D` and `const FIXED_D`): the generic one
// (MAX_D 160, FIXED_D 0) loops over the head dims in the uniforms; a fixed one (FIXED_D =
// MAX_D = 40, 64, 80, for D == Dv == FIXED_D) has them as constants, so the driver unrolls
// every loop over a head and keeps the per-row arrays in registers instead of local memory.
//
// Backward (FlashAttention-2): with the row log-sum-exp `lse` saved by `main_lse` and
// dsum[i] = sum_c dO[i, c] O[i, c], scores are recomputed: P = exp(scale q.k - lse),
// dS = P (dO . v - dsum); `backward_dq` gives dQ = scale dS K one query row per thread,
// `backward_dkdv` gives dV = P^T dO and dK = scale dS^T Q one key row per thread.
// Memory stays linear in the sequence length.

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
@group(0) @binding(1) var<storage, read> q: array<f32>;          // (BH, Lq, D)
@group(0) @binding(2) var<storage, read> k: array<f32>;          // (BH, Lk, D)
@group(0) @binding(3) var<storage, read> v: array<f32>;          // (BH, Lk, Dv)
@group(0) @binding(4) var<storage, read_write> o: array<f32>;    // forward: O (BH, Lq, Dv); backward: dQ or dK
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;  // (BH, Lq): written by main_lse, read by backward
@group(0) @binding(6) var<storage, read> dout: array<f32>;       // dO (BH, Lq, Dv)
@group(0) @binding(7) var<storage, read> dsum: array<f32>;       // (BH, Lq)
@group(0) @binding(8) var<storage, read_write> dvout: array<f32>; // dV (BH, Lk, Dv)

const ROWS: u32 = 64u;
const TK: u32 = 8u;

var<workgroup> tile_a: array<f32, TK * MAX_D>;  // [TK][MAX_D]: keys (forward, dq) or queries (dkdv)
var<workgroup> tile_b: array<f32, TK * MAX_D>;  // [TK][MAX_D]: values (forward, dq) or dO (dkdv)
var<workgroup> tile_l: array<f32, 8>;     // [TK] lse of the queries in the tile (dkdv)
var<workgroup> tile_s: array<f32, 8>;     // [TK] dsum of the queries in the tile (dkdv)

// The head dims: constants in a fixed variant.
fn hd() -> u32 {
    return select(p.d, FIXED_D, FIXED_D != 0u);
}
fn hdv() -> u32 {
    return select(p.dv, FIXED_D, FIXED_D != 0u);
}

// Up to TK key and value rows from `j0` of batch `b` into the tiles (zeros past `n`).
// Separate loaders per pair, so each entry point statically uses only its own bindings.
fn load_kv(b: u32, j0: u32, n: u32, lid: u32) {
    for (var e = lid; e < TK * MAX_D; e += ROWS) {
        let jj = e / MAX_D;
        let c = e % MAX_D;
        var va = 0.0;
        var vb = 0.0;
        if jj < n {
            let j = b * p.lk + j0 + jj;
            if c < hd() { va = k[j * hd() + c]; }
            if c < hdv() { vb = v[j * hdv() + c]; }
        }
        tile_a[e] = va;
        tile_b[e] = vb;
    }
}

// Up to TK query and dO rows from `i0`, with their lse and dsum.
fn load_qdo(b: u32, i0: u32, n: u32, lid: u32) {
    for (var e = lid; e < TK * MAX_D; e += ROWS) {
        let ii = e / MAX_D;
        let c = e % MAX_D;
        var va = 0.0;
        var vb = 0.0;
        if ii < n {
            let i = b * p.lq + i0 + ii;
            if c < hd() { va = q[i * hd() + c]; }
            if c < hdv() { vb = dout[i * hdv() + c]; }
        }
        tile_a[e] = va;
        tile_b[e] = vb;
    }
    if lid < TK {
        var l = 0.0;
        var s = 0.0;
        if lid < n {
            l = lse[b * p.lq + i0 + lid];
            s = dsum[b * p.lq + i0 + lid];
        }
        tile_l[lid] = l;
        tile_s[lid] = s;
    }
}

// Forward for the row this thread owns; writes O and returns the row's log-sum-exp.
fn attend(b: u32, row: u32, lid: u32) -> f32 {
    let in_range = row < p.lq;
    var qr: array<f32, MAX_D>;
    var acc: array<f32, MAX_D>;
    let q_off = (b * p.lq + min(row, p.lq - 1u)) * hd();
    for (var c = 0u; c < hd(); c++) {
        qr[c] = q[q_off + c] * p.scale;
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var j0 = 0u; j0 < p.lk; j0 += TK) {
        let nk = min(TK, p.lk - j0);
        load_kv(b, j0, nk, lid);
        workgroupBarrier();
        // The whole tile, keys past the end masked: a fixed trip count keeps `s` in registers.
        var s: array<f32, TK>;
        var tile_max = -3.0e38;
        for (var jj = 0u; jj < TK; jj++) {
            var dot = 0.0;
            for (var c = 0u; c < hd(); c++) {
                dot = fma(qr[c], tile_a[jj * MAX_D + c], dot);
            }
            s[jj] = select(-3.0e38, dot, jj < nk);
            tile_max = max(tile_max, s[jj]);
        }
        let m_new = max(m, tile_max);
        let corr = exp(m - m_new);
        l = l * corr;
        for (var c = 0u; c < hdv(); c++) {
            acc[c] = acc[c] * corr;
        }
        for (var jj = 0u; jj < TK; jj++) {
            let pj = select(0.0, exp(s[jj] - m_new), jj < nk);
            l += pj;
            for (var c = 0u; c < hdv(); c++) {
                acc[c] = fma(pj, tile_b[jj * MAX_D + c], acc[c]);
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    if in_range {
        let o_off = (b * p.lq + row) * hdv();
        let inv = 1.0 / l;
        for (var c = 0u; c < hdv(); c++) {
            o[o_off + c] = acc[c] * inv;
        }
    }
    return m + log(l);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    _ = attend(wid.y, wid.x * ROWS + lid, lid);
}

@compute @workgroup_size(64)
fn main_lse(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x * ROWS + lid;
    let l = attend(wid.y, row, lid);
    if row < p.lq {
        lse[wid.y * p.lq + row] = l;
    }
}

// dQ for one query row per thread: bindings 1-7, output in `o`.
@compute @workgroup_size(64)
fn backward_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.y;
    let row = wid.x * ROWS + lid;
    let r = b * p.lq + min(row, p.lq - 1u);
    var qr: array<f32, MAX_D>;
    var dor: array<f32, MAX_D>;
    var acc: array<f32, MAX_D>;
    for (var c = 0u; c < hd(); c++) {
        qr[c] = q[r * hd() + c] * p.scale;
    }
    for (var c = 0u; c < hdv(); c++) {
        dor[c] = dout[r * hdv() + c];
    }
    let l = lse[r];
    let ds_row = dsum[r];
    for (var j0 = 0u; j0 < p.lk; j0 += TK) {
        let nk = min(TK, p.lk - j0);
        load_kv(b, j0, nk, lid);
        workgroupBarrier();
        for (var jj = 0u; jj < nk; jj++) {
            var s = 0.0;
            for (var c = 0u; c < hd(); c++) {
                s = fma(qr[c], tile_a[jj * MAX_D + c], s);
            }
            var dp = 0.0;
            for (var c = 0u; c < hdv(); c++) {
                dp = fma(dor[c], tile_b[jj * MAX_D + c], dp);
            }
            let ds = exp(s - l) * (dp - ds_row) * p.scale;
            for (var c = 0u; c < hd(); c++) {
                acc[c] = fma(ds, tile_a[jj * MAX_D + c], acc[c]);
            }
        }
        workgroupBarrier();
    }
    if row < p.lq {
        for (var c = 0u; c < hd(); c++) {
            o[r * hd() + c] = acc[c];
        }
    }
}

// dK (into `o`) and dV (into `dvout`) for one key row per thread: bindings 1-8.
@compute @workgroup_size(64)
fn backward_dkdv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.y;
    let row = wid.x * ROWS + lid;
    let r = b * p.lk + min(row, p.lk - 1u);
    var kr: array<f32, MAX_D>;
    var vr: array<f32, MAX_D>;
    var dk: array<f32, MAX_D>;
    var dvv: array<f32, MAX_D>;
    for (var c = 0u; c < hd(); c++) {
        kr[c] = k[r * hd() + c];
    }
    for (var c = 0u; c < hdv(); c++) {
        vr[c] = v[r * hdv() + c];
    }
    for (var i0 = 0u; i0 < p.lq; i0 += TK) {
        let nq = min(TK, p.lq - i0);
        load_qdo(b, i0, nq, lid);
        workgroupBarrier();
        for (var ii = 0u; ii < nq; ii++) {
            var s = 0.0;
            for (var c = 0u; c < hd(); c++) {
                s = fma(tile_a[ii * MAX_D + c], kr[c], s);
            }
            let pij = exp(s * p.scale - tile_l[ii]);
            var dp = 0.0;
            for (var c = 0u; c < hdv(); c++) {
                dp = fma(tile_b[ii * MAX_D + c], vr[c], dp);
                dvv[c] = fma(pij, tile_b[ii * MAX_D + c], dvv[c]);
            }
            let ds = pij * (dp - tile_s[ii]) * p.scale;
            for (var c = 0u; c < hd(); c++) {
                dk[c] = fma(ds, tile_a[ii * MAX_D + c], dk[c]);
            }
        }
        workgroupBarrier();
    }
    if row < p.lk {
        for (var c = 0u; c < hd(); c++) {
            o[r * hd() + c] = dk[c];
        }
        for (var c = 0u; c < hdv(); c++) {
            dvout[r * hdv() + c] = dvv[c];
        }
    }
}
