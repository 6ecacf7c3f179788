// Sums and maxima across a workgroup of WG lanes: a tree in workgroup memory, a barrier a level.
var<workgroup> partial: array<f32, WG>;

fn reduce_sum(v: f32, li: u32) -> f32 {
    partial[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { partial[li] = partial[li] + partial[li + s]; }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

fn reduce_max(v: f32, li: u32) -> f32 {
    partial[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { partial[li] = max(partial[li], partial[li + s]); }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}
