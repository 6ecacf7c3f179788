// The device's streaming-read ceiling: every invocation reads a contiguous run of vec4s and keeps one sum,
// so the kernel moves the whole buffer once with almost no arithmetic or writes.
@group(0) @binding(0) var<storage, read> data: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<f32>;

const PER: u32 = ${per_thread}u;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let threads = nwg.x * 256u;
    var acc = vec4<f32>(0.0);
    for (var r = 0u; r < PER; r = r + 1u) {
        acc = acc + data[r * threads + gid.x];      // consecutive threads read consecutive vec4s
    }
    sink[gid.x] = acc.x + acc.y + acc.z + acc.w;
}
