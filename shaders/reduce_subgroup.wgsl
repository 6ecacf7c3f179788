// Sums and maxima across a workgroup that is one subgroup: no barriers (which a CPU device emulates by
// switching between the workgroup's SIMD vectors).
fn reduce_sum(v: f32, li: u32) -> f32 { return subgroupAdd(v); }
fn reduce_max(v: f32, li: u32) -> f32 { return subgroupMax(v); }
