// f32 <-> f16 storage casts. f16 tensors are packed two per u32, element 2k in the low half of
// word k: the byte layout of `array<f16>`, so later `enable f16` kernels can bind the same
// buffers. Both directions work on raw bits in integer arithmetic: core `pack2x16float` leaves
// out-of-range inputs indeterminate and may round either way, while this rounds to nearest
// even, overflows to inf and keeps subnormals, inf and NaN, as PyTorch's `.half()` does.
// No f16 arithmetic, so no `enable f16`: it runs on every adapter.
// The CPU twin is the `half` crate (src/ops/cast.rs).

struct Params {
    n: u32,      // elements
    words: u32,  // packed words: ceil(n / 2)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;        // pack: f32 bits (n); unpack: packed (words)
@group(0) @binding(2) var<storage, read_write> y: array<u32>;  // pack: packed (words); unpack: f32 bits (n)

// f32 bits -> f16 bits, round to nearest even (the `half` crate's software path, bit for bit).
fn f32_to_f16(b: u32) -> u32 {
    let sign = (b >> 16u) & 0x8000u;
    let exp = (b >> 23u) & 0xffu;
    let man = b & 0x7fffffu;
    if exp == 0xffu {
        // inf, or NaN kept quiet with its top payload bits.
        return sign | 0x7c00u | select(0u, 0x200u | (man >> 13u), man != 0u);
    }
    let e = i32(exp) - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00u;
    }
    if e <= 0 {
        // f16 subnormal (or zero): shift the mantissa with its hidden bit into place.
        if 14 - e > 24 {
            return sign;
        }
        let m = man | 0x800000u;
        let shift = u32(14 - e);
        let round_bit = 1u << (shift - 1u);
        var h = m >> shift;
        // Round up when above half, or at half with an odd result.
        if (m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u {
            h += 1u;
        }
        return sign | h;
    }
    // A carry out of the mantissa bumps the exponent: 65520 and above become inf.
    var h = sign | (u32(e) << 10u) | (man >> 13u);
    if (man & 0x1000u) != 0u && (man & 0x2fffu) != 0u {
        h += 1u;
    }
    return h;
}

// f16 bits -> f32 bits, exact; subnormals are normalised in integers (no float flush).
fn f16_to_f32(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let exp = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if exp == 0x1fu {
        // inf, or a NaN made quiet (as the `half` crate does).
        return sign | 0x7f800000u | select(0u, 0x400000u | (man << 13u), man != 0u);
    }
    if exp == 0u {
        if man == 0u {
            return sign;
        }
        // man * 2^-24 with its leading bit at k: exponent k - 24, the rest moves up.
        let k = firstLeadingBit(man);
        return sign | ((k + 103u) << 23u) | ((man << (23u - k)) & 0x7fffffu);
    }
    return sign | ((exp + 112u) << 23u) | (man << 13u);
}

// One word per invocation: elements 2k and 2k+1 (the high half is 0 past an odd n).
@compute @workgroup_size(256)
fn pack(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let k = (wid.y * nwg.x + wid.x) * 256u + lid;
    if k >= p.words {
        return;
    }
    let lo = f32_to_f16(x[2u * k]);
    var hi = 0u;
    if 2u * k + 1u < p.n {
        hi = f32_to_f16(x[2u * k + 1u]);
    }
    y[k] = lo | (hi << 16u);
}

// One element per invocation.
@compute @workgroup_size(256)
fn unpack(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    let w = x[i >> 1u];
    y[i] = f16_to_f32((w >> ((i & 1u) * 16u)) & 0xffffu);
}
