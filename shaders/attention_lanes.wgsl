// Causal (optionally sliding-window) softmax attention with one invocation per (query, head, split of the
// keys), each walking its keys alone with an online softmax: the CPU layout's attention, and a GPU's
// decode attention with subgroups. On a CPU an invocation is a SIMD lane of a core, and attention.wgsl's
// workgroup barriers and shared reductions (emulated in software) cost far more than the arithmetic they
// share; on a GPU they serialise a decode step's few keys into round trips. A lane needs neither. A decode
// step's split either writes records for a merge pass, or, with subgroups, gives one query's keys to the
// lanes of a subgroup, which merge their softmaxes with subgroup operations in the same pass. A longer
// step with subgroups gives a subgroup's lanes consecutive queries of one head: they walk the same keys,
// each lane fetches a share of a key's texels and the subgroup broadcasts them (a texel fetch costs a
// CPU far more than a broadcast). The math,
// the ring-buffer cache, the split records and the substitutions follow attention.wgsl.
${bindings}

const D: u32 = ${head_dim}u;
const HALF: u32 = ${half}u;
const EPS: f32 = ${eps};
const HEADS: u32 = ${heads}u;
const SPLITS: u32 = ${splits}u;
const KEYS_PER_TRIP: u32 = ${keys_per_trip}u;

// The row that holds key position j.
fn slot(j: u32) -> u32 { return ${slot}; }

// The rotate_half partner of element d: pairs (d, d + D/2) turn together.
fn partner(d: u32) -> u32 { return select(d - HALF, d + HALF, d < HALF); }

// Element d of the query head at q_base after its norm (r: the head's 1/rms) and rotation.
fn q_elem(q_base: u32, d: u32, r: f32) -> f32 { ${q_elem} }
fn q_value(q_base: u32, d: u32, r: f32, i: u32) -> f32 { return ${q_value}; }

// Element d of the key head at k_base after its norm (r: that head's 1/rms) and rotation (key row j).
fn k_elem(k_base: u32, d: u32, r: f32) -> f32 { ${k_elem} }
fn k_value(k_base: u32, d: u32, r: f32, j: u32) -> f32 { return ${k_value}; }

// A lane's query (normed and rotated) and its online softmax so far: the running max, the sum of weights
// and the weighted sum of values.
var<private> query: array<vec4<f32>, ${quads}>;
var<private> acc: array<vec4<f32>, ${quads}>;
var<private> m_run: f32;
var<private> l_run: f32;

// Key position j into the lane's softmax (g: its kv head; lo .. hi - 1: the keys its query sees).
fn visit(j: u32, g: u32, lo: u32, hi: u32${subgroup_args}) {
    let k_base = slot(j) * ${k_row}u + ${k_at}u + g * D;
    var dot4 = vec4<f32>(0.0);
${score}
    var s = (dot4.x + dot4.y + dot4.z + dot4.w) * ${scale};
    ${softcap}
    let seen = ${seen};          // a key of this lane's query (lanes that share keys walk all of theirs)
    let m_new = select(m_run, max(m_run, s), seen);
    let correction = exp(m_run - m_new);
    var p = select(0.0, exp(s - m_new), seen);
    l_run = l_run * correction + p;
    m_run = m_new;
    let v_base = slot(j) * ${v_row}u + ${v_at}u + g * D;
    ${v_rms}
${accumulate}
}

// The work of attention lane `lane`; `writer`: whether it may store the step's key and value (where it
// makes them), which of several workgroups computing the same lanes one does.
fn attend(lane: u32, writer: bool${subgroup_args}) {
    let S = ${queries};
${lanes}
    let Tk = ${keys};
    let g = h / ${group}u;               // its kv head
    let qi = Tk - S + i;                 // the query's index among the keys
    // The query sees keys lo .. hi - 1 (of its split's share, for a split pass).
${key_bounds}
    let q_base = i * ${q_row}u + ${q_at}u + h * D;
    var rq = 1.0;
    ${q_rms}
${load_q}
    acc = array<vec4<f32>, ${quads}>();
    m_run = -3.0e38;
    l_run = 0.0;
    let keys_from = ${first_key};
    let keys_to = ${end_key};
    // KEYS_PER_TRIP keys a trip, so that a lane walking many keys stays below lavapipe's loop limiter (an
    // invocation's loops end after 65535 trips in all).
    for (var j = keys_from; j < keys_to; j = j + KEYS_PER_TRIP) {
${visits}
    }
${fresh}
${epilogue}
}
${main}
