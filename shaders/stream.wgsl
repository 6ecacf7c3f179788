// out[m, col] = epilogue(sum_k a[m, k] * w[col, k]) with every weight row streamed once per block of
// TOKENS token rows: the product of a decode step (few tokens, bound by reading the weight) and, on CPU
// devices, of every step. The weight and the activations are read in packs of 8 elements (one vec4<u32>
// of bf16 or f16, two vec4<f32> of f32), so a load moves 16 or 32 bytes.
// ROWS weight rows and TOKENS token rows form a register block: each weight pack is used TOKENS times and
// each activation pack ROWS times. LANES invocations share one block and split its packs:
//  - LANES = 1 on a CPU, where an invocation is a SIMD lane of a core: each lane streams its own rows
//    front to back, the pattern a core's prefetcher follows, and no reduction is needed;
//  - LANES = the workgroup on a GPU, where adjacent lanes read adjacent packs of a row (coalesced) and the
//    partial sums are reduced across the workgroup at the end (subgroupAdd where the device has subgroups).
// A norm prologue is folded in: the row's sum of squares accumulates with the dot products and
// 1/rms scales the sums (sum_k (x_k r) w_k = r sum_k x_k w_k).
${bindings}

// A pack's elements are (lo, hi) * s: a quantized weight's group scale multiplies the pack's dot products
// rather than its 8 elements (s is 1.0 for every other pack, a multiply the shader compiler drops).
struct Pack { lo: vec4<f32>, hi: vec4<f32>, s: f32 }

const WG: u32 = ${wg}u;
const LANES: u32 = ${lanes}u;
const PACKS: u32 = ${packs}u;             // packs per row (K / 8)
${reduce_decl}

@compute @workgroup_size(${wg})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32${subgroup_args}) {
    let M = ${m};
    let N = ${n}u;
    let K = PACKS * 8u;
    let block = ${block};
    let lane = ${lane};
    let n0 = block * ${rows}u;              // the block's first weight row in this window
    ${leave}
    for (var m0 = 0u; m0 < M; m0 = m0 + ${tokens}u) {
${declare_acc}
        for (var p = lane; p < PACKS; p = p + LANES) {
${body}
        }
${reduce}
        if (lane == 0u) {
${store}
        }
    }
}
