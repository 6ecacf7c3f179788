// Causal (optionally sliding-window) softmax attention, one workgroup per (query, head). Keys are the
// step's own (position j in row j) or a ring-buffer cache (position j in slot j mod slots).
// Keys are visited in blocks of 64 with an online softmax, so any cache length fits in workgroup memory.
// Split over the keys (decode steps over a long cache): the grid's z runs split the query's keys and
// each writes its partial (max, sum, unnormalised values) for a combine pass (key_bounds, epilogue).
// Heads are read straight out of [tokens, row] tensors at a column offset, so one packed Q|K|V projection
// can serve all three. Specialised by substitution: q and k may be RMS-normed (q_elem/k_elem) and
// RoPE-rotated as they are loaded, v unit-normed (v_scale); without those the loads are plain.
${bindings}

const WG: u32 = 64u;
const D: u32 = ${head_dim}u;
const HALF: u32 = ${half}u;
const EPS: f32 = ${eps};
var<workgroup> scores: array<f32, 64>;
var<workgroup> v_scale: array<f32, 64>;        // 1/rms of each key's v head in the block (v norm only)
var<workgroup> acc: array<f32, ${head_dim}>;
var<workgroup> q_raw: array<f32, ${head_dim}>;
var<workgroup> q_ready: array<f32, ${head_dim}>;   // the query head after its norm and rope
${reductions}

// The row that holds key position j.
fn slot(j: u32) -> u32 { return ${slot}; }

// The rotate_half partner of element d: pairs (d, d + D/2) turn together.
fn partner(d: u32) -> u32 { return select(d - HALF, d + HALF, d < HALF); }

// Element d of the query head after its norm (r: the head's 1/rms).
fn q_elem(d: u32, r: f32) -> f32 { ${q_elem} }

// Element d of the key head at k_base after its norm (r: that head's 1/rms).
fn k_elem(k_base: u32, d: u32, r: f32) -> f32 { ${k_elem} }

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let S = ${queries};
    let Tk = ${keys};
    let i = wg.y;                        // query row
    let h = wg.x;                        // query head
    let g = h / ${group}u;               // its kv head
    let qi = Tk - S + i;                 // the query's index among the keys
    // The query sees keys lo .. hi - 1 (of its split's share, for a split pass).
${key_bounds}
    let q_base = i * ${q_row}u + ${q_at}u + h * D;
    for (var d = li; d < D; d = d + WG) { acc[d] = 0.0; q_raw[d] = load_q(q_base + d); }
    workgroupBarrier();
    ${q_rms}
    for (var d = li; d < D; d = d + WG) { q_ready[d] = ${q_value}; }
    var m_run = -3.0e38;
    var l_run = 0.0;
    workgroupBarrier();
    for (var j0 = lo; j0 < hi; j0 = j0 + WG) {
        let j = j0 + li;
        var s = -3.0e38;
        if (j < hi) {
            // This thread's key, normed and rotated on the fly (recomputed by every query's workgroup).
            let k_base = slot(j) * ${k_row}u + ${k_at}u + g * D;
            ${k_rms}
            var dot = 0.0;
            for (var d = 0u; d < D; d = d + 1u) {
                dot = dot + q_ready[d] * ${k_value};
            }
            s = dot * ${scale};
            ${softcap}
            ${v_rms}
        }
        let m_new = max(m_run, reduce_max(s, li));
        let p = select(0.0, exp(s - m_new), j < hi);
        scores[li] = p;
        let correction = exp(m_run - m_new);
        l_run = l_run * correction + reduce_sum(p, li);
        m_run = m_new;
        let count = min(WG, hi - j0);
        for (var d = li; d < D; d = d + WG) {
            var a = acc[d] * correction;
            for (var t = 0u; t < count; t = t + 1u) {
                let v_base = slot(j0 + t) * ${v_row}u + ${v_at}u + g * D;
                a = a + scores[t] * ${v_value};
            }
            acc[d] = a;
        }
        workgroupBarrier();
    }
${epilogue}
}
