// One workgroup per row of the last axis: a reduction across it (reduce_sum, reduce_max: a tree in workgroup
// memory, or subgroup operations where the workgroup is one subgroup), then a pointwise pass.
${bindings}

const WG: u32 = ${wg}u;
${reductions}

@compute @workgroup_size(${wg})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= ${rows}) { return; }      // uniform per workgroup: barriers stay in uniform control flow
    let n = ${width}u;
    let base = row * n;
${body}
}
