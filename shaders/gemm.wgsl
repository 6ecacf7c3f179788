// out[m, col] = epilogue(sum_k a[m, k] * b(n, k)), register-blocked: a workgroup computes a TM x TN tile of
// the output, each thread a 4 x 4 block of it held in registers (rows tm + 4 ty.., columns tn + 4 tx..).
// K advances TK at a time with both operand tiles staged in workgroup memory, k-major, so that a thread's
// 4 rows (or 4 columns) at one k are a single vec4 there: one step of k is two vec4 reads and 16 FMAs.
// One op's variant is chosen by substitution: an RMS norm of A's rows (the sum of squares gathered while
// staging A, the 1/rms applied to the finished sums), a second B operand (the "up" rows n + N of a gated
// linear, summed in up_sums) and an epilogue (bias, activation gate, softcap, residual) that turns the
// sum into y for each output element. With SPLITS > 1 a short step's few tiles are multiplied by
// SPLITS workgroups each (grid z), each over its own share of K, and store their raw sums for a pass that
// adds them up and applies the epilogue: a GPU has more cores than such a step has tiles.
${bindings}

const TM: u32 = ${tile_m}u;
const TN: u32 = ${tile_n}u;
const TK: u32 = ${tile_k}u;
const WG: u32 = (TM / 4u) * (TN / 4u);
const A_LOADS: u32 = TM * TK / WG;      // tile elements each thread stages per K step
const B_LOADS: u32 = TN * TK / WG;
const SPLITS: u32 = ${splits}u;
// Each k's row has a spare vec4: staging stores of consecutive k then fall in different memory banks.
var<workgroup> a_tile: array<array<vec4<f32>, TM / 4u + 1u>, TK>;
var<workgroup> b_tile: array<array<vec4<f32>, TN / 4u + 1u>, TK>;
${tile_decls}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let M = ${m};
    let N = ${n}u;
    let K = ${k}u;
    let tm = wg.y * TM;
    let tn = wg.x * TN;
    let tx = li % (TN / 4u);
    let ty = li / (TN / 4u);
    // This workgroup's share of K: whole K steps, the last share shorter.
    let share = (K + SPLITS * TK - 1u) / (SPLITS * TK) * TK;
    let k_begin = wg.z * share;
    let k_end = min(K, k_begin + share);
    var sums: array<vec4<f32>, 4>;      // sums[i][j]: row tm + 4 ty + i, column tn + 4 tx + j
    var up_sums: array<vec4<f32>, 4>;
    var ss: array<f32, A_LOADS>;        // sums of squares of the A elements this thread staged (norm)
    for (var k0 = k_begin; k0 < k_end; k0 = k0 + TK) {
        // Consecutive threads load consecutive k of one row of A: coalesced reads.
        for (var j = 0u; j < A_LOADS; j = j + 1u) {
            let e = j * WG + li;
            let r = e / TK;
            let kk = e % TK;
            let m = tm + r;
            let ka = k0 + kk;
            let v = select(0.0, load_a(m * K + ka), m < M && ka < k_end);
${norm_sum}
            a_tile[kk][r / 4u][r % 4u] = v${scale_a};
        }
        for (var j = 0u; j < B_LOADS; j = j + 1u) {
            let e = j * WG + li;
${b_coords}
            let n = tn + c;
            let kb = k0 + kk;
            let inside = n < N && kb < k_end;
            b_tile[kk][c / 4u][c % 4u] = select(0.0, ${load_b}, inside);
${stage_up}
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            let a = a_tile[kk][ty];
            let b = b_tile[kk][tx];
            sums[0] = sums[0] + a.x * b;
            sums[1] = sums[1] + a.y * b;
            sums[2] = sums[2] + a.z * b;
            sums[3] = sums[3] + a.w * b;
${accumulate_up}
        }
        workgroupBarrier();
    }
${norm_finish}
    for (var i = 0u; i < 4u; i = i + 1u) {
        let m = tm + 4u * ty + i;
        let r = ${row_scale};
        for (var j = 0u; j < 4u; j = j + 1u) {
            let n = tn + 4u * tx + j;
            if (m < M && n < N) {
                let col = ${col0}u + n;     // the output column's row of the whole weight
                var y = sums[i][j] * r;
                let acc_up = up_sums[i][j] * r;
${store}
            }
        }
    }
}
