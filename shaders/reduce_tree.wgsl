// Workgroup sums for 256-thread kernels, without subgroups: a tree in workgroup memory.
// A prelude fragment (src/shaders.rs puts it before a kernel's file); its twin with subgroup
// operations is reduce_subgroup.wgsl. Both define `Inputs` (the entry points' builtins),
// `begin` (called first by each entry point), `block_sum`, `block_sum2` and `block_max`;
// every thread of the workgroup must call them (uniform control flow).

struct Inputs {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

fn begin(inp: Inputs) {}

var<workgroup> red2: array<vec2<f32>, 256>;

// Two sums at once over the workgroup; the trailing barrier lets the next call reuse `red2`.
fn block_sum2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    red2[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if lid < s {
            red2[lid] += red2[lid + s];
        }
        workgroupBarrier();
    }
    let r = red2[0];
    workgroupBarrier();
    return r;
}

fn block_sum(lid: u32, v: f32) -> f32 {
    return block_sum2(lid, vec2<f32>(v, 0.0)).x;
}

fn block_max(lid: u32, v: f32) -> f32 {
    red2[lid].x = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if lid < s {
            red2[lid].x = max(red2[lid].x, red2[lid + s].x);
        }
        workgroupBarrier();
    }
    let r = red2[0].x;
    workgroupBarrier();
    return r;
}
