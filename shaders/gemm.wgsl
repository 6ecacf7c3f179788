// out[m, n] = sum_k a[m, k] * b(n, k): 16x16 output tiles, both operands staged through workgroup memory.
${bindings}

const T: u32 = 16u;
var<workgroup> a_tile: array<array<f32, 16>, 16>;
var<workgroup> b_tile: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let M = ${m};
    let N = ${n}u;
    let K = ${k}u;
    let m = wg.y * T + lid.y;
    let n = wg.x * T + lid.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < K; k0 = k0 + T) {
        let ka = k0 + lid.x;
        a_tile[lid.y][lid.x] = select(0.0, ${load_a}, m < M && ka < K);
        let nb = wg.x * T + lid.y;
        let kb = k0 + lid.x;
        b_tile[lid.y][lid.x] = select(0.0, ${load_b}, nb < N && kb < K);
        workgroupBarrier();
        for (var kk = 0u; kk < T; kk = kk + 1u) {
            acc = acc + a_tile[lid.y][kk] * b_tile[lid.x][kk];
        }
        workgroupBarrier();
    }
    if (m < M && n < N) {
        out[m * ${out_stride}u + ${out_col} + n] = acc;
    }
}
