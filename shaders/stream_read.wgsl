// The device's streaming-read ceiling: a kernel that reads a large buffer once, with almost no arithmetic
// and one word written per invocation. The fastest access pattern differs by device (adjacent lanes on
// adjacent elements on a GPU; long runs per core on a CPU device such as lavapipe), so the pattern is a
// parameter: `index(r)` is the element an invocation reads in its r-th of PER reads. UNROLL reads per
// loop trip go to independent accumulators, so no add waits on the previous one. The data is a storage
// buffer or a texture of the same bytes (`load(i)`: element i), as the device's kernels may read either.
${data}
@group(0) @binding(1) var<storage, read_write> sink: array<${scalar}>;

const PER: u32 = ${per_thread}u;
const WG: u32 = ${wg}u;

fn index(r: u32, invocation: u32, lane: u32, group: u32, invocations: u32) -> u32 {
    return ${index};
}

@compute @workgroup_size(${wg})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) lane: u32,
        @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let invocations = nwg.x * WG;
${declare}
    for (var r = 0u; r < PER; r = r + ${unroll}u) {
${body}
    }
    sink[gid.x] = ${reduce};
}
