// Sinusoidal timestep embedding (diffusers' get_timestep_embedding):
// y[i, j] = sin(t[i] * freq[j]) for j < half, cos(t[i] * freq[j - half]) for half <= j < 2 half
// (halves swapped when `flip`), 0 in the last column of an odd `dim`. `freq` (half) comes from
// the host, computed with PyTorch's f32 steps, so both devices use the same arguments.
// Arguments reach ~1000 rad and built-in sin/cos are only specified on [-pi, pi], so the
// reduction is explicit: Cody-Waite by pi/2 (pi/2 split into two 11-bit parts and an f32 rest,
// so q * C1 and q * C2 are exact for |q| < 2^13, |t * freq| < ~12800), then Cephes' sinf/cosf
// polynomials on [-pi/4, pi/4]. Error ~1e-7 absolute.

struct Params {
    n: u32,      // output elements, N * dim
    dim: u32,    // embedding width
    half: u32,   // dim / 2
    flip: u32,   // 1: cos first (flip_sin_to_cos)
    zero: u32,   // always 0; see `main`
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> t: array<f32>;        // (N)
@group(0) @binding(2) var<storage, read> freq: array<f32>;     // (half)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // (N, dim)

const TWO_OVER_PI: f32 = 0.63661977236758138;
const C1: f32 = 1.5703125;
const C2: f32 = 4.8375129699707031e-4;
const C3: f32 = 7.5497901264043321e-8;

// sin(a), or cos(a) = sin(a + pi/2) as one more quadrant.
fn sin_or_cos(a: f32, cosine: bool) -> f32 {
    let qf = floor(a * TWO_OVER_PI + 0.5);
    let r = ((a - qf * C1) - qf * C2) - qf * C3;
    var q = u32(i32(qf) & 3);
    if cosine {
        q = (q + 1u) & 3u;
    }
    let z = r * r;
    var v: f32;
    if (q & 1u) == 0u {
        v = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r;
    } else {
        v = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z
            - 0.5 * z + 1.0;
    }
    if q >= 2u {
        v = -v;
    }
    return v;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    let row = i / p.dim;
    let j = i % p.dim;
    if j >= 2u * p.half {
        y[i] = 0.0;
        return;
    }
    let second = j >= p.half;
    // The argument must be the f32-rounded product, as on the CPU (its rounding error is up to
    // 3e-5 rad at 1000 rad). XOR with a runtime zero keeps a compiler from contracting the
    // product into the reduction's first subtraction as an fma.
    let a = bitcast<f32>(bitcast<u32>(t[row] * freq[j % p.half]) ^ p.zero);
    y[i] = sin_or_cos(a, second != (p.flip == 1u));
}
