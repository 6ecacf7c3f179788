// One invocation per output element; the element's expression is generated from the fused op.
${bindings}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    // 2-D grid: more than 65535 workgroups of elements spill into y.
    let i = (wg.y * nwg.x + wg.x) * 256u + li;
    if (i >= ${total}) { return; }
${body}
}
