// WG invocations per row of the last axis: a reduction across it (reduce_sum, reduce_max: a tree in workgroup
// memory, or subgroup operations where the row's invocations are one subgroup), then a pointwise pass.
// A workgroup takes GROUP rows: one, or (subgroup reductions) GROUP subgroups of a row each.
${bindings}

const WG: u32 = ${wg}u;
const GROUP: u32 = ${group}u;
${reductions}

@compute @workgroup_size(${size})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) local: u32) {
    let row = (wg.y * nwg.x + wg.x) * GROUP + local / WG;
    let li = local % WG;
    if (row >= ${rows}) { return; }      // uniform per row: barriers and subgroup operations stay uniform
    let n = ${width}u;
    let base = row * n;
${body}
}
