// Embedding rows: out[s, :] = table[ids[s] - row0, :] (times a scale) for the ids this table window holds.
${bindings}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = (wg.y * nwg.x + wg.x) * 256u + li;
    let H = ${width}u;
    if (i >= ${rows} * H) { return; }
    let s = i / H;
    let id = ids[s];
    if (id >= ${row0}u && id < ${row1}u) {
        out[i] = load_table((id - ${row0}u) * H + i % H)${scale};
    }
}
