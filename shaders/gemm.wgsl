// out[m, col] = epilogue(sum_k a[m, k] * b(n, k)): 16x16 output tiles, both operands staged through
// workgroup memory. One op's variant is chosen by substitution: a prologue that RMS-normalises the rows
// of A (then folded into the A loads), a second B operand (the "up" rows of a gated linear, summed in
// acc_up) and an epilogue (bias, activation gate, softcap, residual) that turns acc into y.
${bindings}

const T: u32 = 16u;
var<workgroup> a_tile: array<array<f32, 16>, 16>;
var<workgroup> b_tile: array<array<f32, 16>, 16>;
var<workgroup> row_scale: array<f32, 16>;       // 1/rms of each tile row (norm prologue only)

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let M = ${m};
    let N = ${n}u;
    let K = ${k}u;
    let m = wg.y * T + lid.y;
    let n = wg.x * T + lid.x;
    let nb = wg.x * T + lid.y;          // the B row this thread stages
${prologue}
    var acc = 0.0;
    var acc_up = 0.0;
    for (var k0 = 0u; k0 < K; k0 = k0 + T) {
        let ka = k0 + lid.x;
        a_tile[lid.y][lid.x] = select(0.0, ${load_a}, m < M && ka < K);
        let kb = k0 + lid.x;
        b_tile[lid.y][lid.x] = select(0.0, ${load_b}, nb < N && kb < K);
${stage_up}
        workgroupBarrier();
        for (var kk = 0u; kk < T; kk = kk + 1u) {
            acc = acc + a_tile[lid.y][kk] * b_tile[lid.x][kk];
${accumulate_up}
        }
        workgroupBarrier();
    }
    if (m < M && n < N) {
        let col = ${col0}u + n;         // the output column's row of the whole weight
        var y = acc;
${epilogue}
        out[m * ${out_stride}u + col] = y;
    }
}
