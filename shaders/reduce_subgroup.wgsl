// Workgroup sums for 256-thread kernels with subgroup operations (adapters with SUBGROUP):
// each subgroup adds its lanes in registers, one lane per subgroup writes the partial sum,
// and every thread adds the partials (num_subgroups of them: 8 at 32 lanes) - two barriers
// instead of the tree's nine. The same interface as reduce_tree.wgsl.

struct Inputs {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
}

var<private> sg_lane: u32;
var<private> sg_id: u32;
var<private> sg_count: u32;

fn begin(inp: Inputs) {
    sg_lane = inp.sg_lane;
    sg_id = inp.sg_id;
    sg_count = inp.sg_count;
}

// One slot per subgroup: 256 covers any subgroup size down to 1.
var<workgroup> partial2: array<vec2<f32>, 256>;

fn block_sum2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    let s = subgroupAdd(v);
    if sg_lane == 0u {
        partial2[sg_id] = s;
    }
    workgroupBarrier();
    var t = vec2<f32>(0.0, 0.0);
    for (var i = 0u; i < sg_count; i++) {
        t += partial2[i];
    }
    // The next call may overwrite `partial2` only after every thread has read it.
    workgroupBarrier();
    return t;
}

fn block_sum(lid: u32, v: f32) -> f32 {
    return block_sum2(lid, vec2<f32>(v, 0.0)).x;
}

fn block_max(lid: u32, v: f32) -> f32 {
    let s = subgroupMax(v);
    if sg_lane == 0u {
        partial2[sg_id].x = s;
    }
    workgroupBarrier();
    var t = partial2[0].x;
    for (var i = 1u; i < sg_count; i++) {
        t = max(t, partial2[i].x);
    }
    workgroupBarrier();
    return t;
}
