// Mixture of experts in two passes over each token's chosen experts (the non-zero routing weights):
// up:   hidden[s, slot, j] = act(x[s]·gate_e[j]) * (x[s]·up_e[j])
// down: out[s, n] = sum_slot route[s, e] * hidden[s, slot, :]·down_e[n]
// Expert weights larger than one binding come in windows of whole experts [E0, E1); each window is its
// own dispatch, and the down pass accumulates across the windows after the first.
${bindings}

const E: u32 = ${experts}u;
const H: u32 = ${hidden}u;
const IM: u32 = ${inter}u;
const KSLOTS: u32 = ${slots}u;

// The expert in the given slot of a token's row, or E when the token routes to fewer experts.
fn expert_of(s: u32, slot: u32) -> u32 {
    var seen = 0u;
    for (var e = 0u; e < E; e = e + 1u) {
        if (route[s * E + e] != 0.0) {
            if (seen == slot) { return e; }
            seen = seen + 1u;
        }
    }
    return E;
}

@compute @workgroup_size(64)
fn expert_up(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let slot = gid.y;
    let s = gid.z;
    if (j >= IM) { return; }
    let e = expert_of(s, slot);
    if (e < ${e0}u || e >= ${e1}u) { return; }     // another window's expert (or none: never read)
    let local = e - ${e0}u;
    var g = 0.0;
    var u = 0.0;
    let gate_row = (local * 2u * IM + j) * H;
    let up_row = (local * 2u * IM + IM + j) * H;
    for (var k = 0u; k < H; k = k + 1u) {
        let xv = x[s * H + k];
        g = g + xv * load_gate_up(gate_row + k);
        u = u + xv * load_gate_up(up_row + k);
    }
    hidden[(s * KSLOTS + slot) * IM + j] = act(g) * u;
}

@compute @workgroup_size(64)
fn expert_down(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    let s = gid.y + gid.z * 65535u;
    if (n >= H || s >= ${tokens}) { return; }
    var total = 0.0;
    for (var slot = 0u; slot < KSLOTS; slot = slot + 1u) {
        let e = expert_of(s, slot);
        if (e >= ${e0}u && e < ${e1}u) {
            var y = 0.0;
            let row = ((e - ${e0}u) * H + n) * IM;
            for (var j = 0u; j < IM; j = j + 1u) {
                y = y + hidden[(s * KSLOTS + slot) * IM + j] * load_down(row + j);
            }
            total = total + route[s * E + e] * y;
        }
    }
    out[s * H + n] = ${accumulate};
}
