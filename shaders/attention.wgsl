// Causal (optionally sliding-window) softmax attention, one workgroup per (query, head).
// Keys are visited in blocks of 64 with an online softmax, so any cache length fits in workgroup memory.
${bindings}

const WG: u32 = 64u;
const D: u32 = ${head_dim}u;
var<workgroup> scores: array<f32, 64>;
var<workgroup> acc: array<f32, ${head_dim}>;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let S = ${queries};
    let Tk = ${keys};
    let i = wg.y;                        // query row
    let h = wg.x;                        // query head
    let g = h / ${group}u;               // its kv head
    let qi = Tk - S + i;                 // the query's index among the keys
    var lo = 0u;
    ${window_lo}
    for (var d = li; d < D; d = d + WG) { acc[d] = 0.0; }
    var m_run = -3.0e38;
    var l_run = 0.0;
    workgroupBarrier();
    for (var j0 = lo; j0 <= qi; j0 = j0 + WG) {
        let j = j0 + li;
        var s = -3.0e38;
        if (j <= qi) {
            var dot = 0.0;
            for (var d = 0u; d < D; d = d + 1u) {
                dot = dot + q[(i * ${q_heads}u + h) * D + d] * k[(j * ${kv_heads}u + g) * D + d];
            }
            s = dot * ${scale};
            ${softcap}
        }
        red[li] = s;
        workgroupBarrier();
        for (var w = WG / 2u; w > 0u; w = w >> 1u) {
            if (li < w) { red[li] = max(red[li], red[li + w]); }
            workgroupBarrier();
        }
        let m_new = max(m_run, red[0]);
        workgroupBarrier();
        let p = select(0.0, exp(s - m_new), j <= qi);
        scores[li] = p;
        red[li] = p;
        workgroupBarrier();
        for (var w = WG / 2u; w > 0u; w = w >> 1u) {
            if (li < w) { red[li] = red[li] + red[li + w]; }
            workgroupBarrier();
        }
        let correction = exp(m_run - m_new);
        l_run = l_run * correction + red[0];
        m_run = m_new;
        let count = min(WG, qi + 1u - j0);
        for (var d = li; d < D; d = d + WG) {
            var a = acc[d] * correction;
            for (var t = 0u; t < count; t = t + 1u) {
                a = a + scores[t] * v[((j0 + t) * ${kv_heads}u + g) * D + d];
            }
            acc[d] = a;
        }
        workgroupBarrier();
    }
    for (var d = li; d < D; d = d + WG) {
        out[(i * ${q_heads}u + h) * D + d] = acc[d] / l_run;
    }
}
