// One token's product on a CPU device: out[col] = epilogue(sum_k a[k] * w[col, k]). There an invocation is a
// SIMD lane and a subgroup one vector of lanes; the L lanes of a subgroup split every weight row's packs
// (lane l takes packs l, l + L, ..., or texels of 2 or 4 quantized packs), so together they read a row as
// one contiguous run. Each lane loads its share of the token's packs once, into registers, before the
// rows: the activation is read once per subgroup, not once per weight row (stream.wgsl), so it comes
// straight from its storage buffer and the reads left are the weight's. A subgroup walks a range of rows;
// each row's partial sums are added across it (subgroupAdd) and lane 0 stores the row; a gated product
// walks its gate and up rows together, and others with short rows walk rows n and n + N together (N then
// half the outputs), for more loads in flight. Subgroups are consecutive runs of L local invocations.
// A step of one token may still hold several rows (x [S, 2, K]): they take turns.
// A norm prologue is folded in as in stream.wgsl: 1/rms from the token's sum of squares scales the sums.
// So may the add_norm the token comes from (Gemma's residual stream): the token is h + rms_norm(y) * w,
// made in registers from h and y, and the first subgroup stores it for the add_norm's later readers.
// Or the token is the output of the attention before the product: each workgroup first runs that
// attention's lanes (`attend`, attention_lanes.wgsl; a decode step's attention is a subgroup's work) into
// workgroup memory (`att`), and one of them stores the step's key and value.
${bindings}

struct Pack { lo: vec4<f32>, hi: vec4<f32>, s: f32 }

const WG: u32 = ${wg}u;
const L: u32 = ${lanes}u;
const PACKS: u32 = ${packs}u;             // packs per row (K / 8)
const STEPS: u32 = ${steps}u;             // a lane's steps along a row: packs, or texels of several packs
const ROWS: u32 = ${rows}u;               // rows per subgroup

// The pack, or zeros past the row's end (a lane with no pack there).
fn masked(pack: Pack, inside: bool) -> Pack {
    return Pack(select(vec4<f32>(0.0), pack.lo, inside), select(vec4<f32>(0.0), pack.hi, inside), pack.s);
}

@compute @workgroup_size(${wg})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let M = ${m};
    let N = ${n}u;
    let K = PACKS * 8u;
    let first = ((wg.y * nwg.x + wg.x) * (WG / L) + li / L) * ROWS;
${before}
    if (first >= N) { return; }             // the whole subgroup leaves: its subgroupAdds stay uniform
    let last = min(N, first + ROWS);
    for (var m = 0u; m < M; m = m + 1u) {      // the token's rows (one, but for a [S, ...] x of several)
        var ss = 0.0;
${load_x}
        let r = ${row_scale};
        for (var n = first; n < last; n = n + 1u) {
            var acc = 0.0;
            var up = 0.0;
${body}
            let total = subgroupAdd(acc);
            let total_up = ${total_up};          // the second row's: a gated product's up row, or row n + N
            if (lane == 0u) {
${store}
            }
        }
    }
}
