// One workgroup per row of the last axis: a tree reduction in workgroup memory, then a pointwise pass.
${bindings}

const WG: u32 = ${wg}u;
var<workgroup> partial: array<f32, ${wg}>;

fn reduce_sum(v: f32, li: u32) -> f32 {
    partial[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { partial[li] = partial[li] + partial[li + s]; }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

fn reduce_max(v: f32, li: u32) -> f32 {
    partial[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { partial[li] = max(partial[li], partial[li + s]); }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(${wg})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= ${rows}) { return; }      // uniform per workgroup: barriers stay in uniform control flow
    let n = ${width}u;
    let base = row * n;
${body}
}
