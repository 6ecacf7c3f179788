// The device's arithmetic ceiling: every invocation runs CHAINS independent chains of vec4 fma, so the
// next fma of a chain never waits for the last one (enough independent work to hide fma latency),
// ITERATIONS steps each, then writes one word (so no chain is dead code). FLOPs: 8 per vec4 fma.
@group(0) @binding(0) var<storage, read_write> sink: array<f32>;

@compute @workgroup_size(${wg})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m = vec4<f32>(0.9999);
    let c = vec4<f32>(0.0001);
    let seed = f32(gid.x);                     // unknown to the compiler: the chains cannot be folded
${declare}
    for (var i = 0u; i < ${iterations}u; i = i + 1u) {
${body}
    }
    sink[gid.x] = ${reduce};
}
