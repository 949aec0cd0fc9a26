//! Capability probes: tiny kernels whose results tell the host what a device really does, where
//! what it reports is not enough.

use cubecl::prelude::*;

/// Lanes the forward kernel's plane loads hand each other a value from (its `chunk`).
pub const PLANE_LOAD_LANES: u32 = 8;

/// What each unit finds about its plane, three words per unit: 1 when `plane_broadcast` from
/// each of the plane's first [`PLANE_LOAD_LANES`] lanes gave that lane's value (lane `e` holds
/// `3e + 1`), else 0; the plane's `plane_sum` of `lane + 1` in f32; and its lane number
/// (`UNIT_POS_PLANE`). cubecl registers plane operations only for GPU adapters, while lavapipe
/// (a CPU adapter) runs them: the plane loads of the forward kernel and the plane decode
/// kernel are launched where this probe found them right.
#[cube(launch)]
pub fn plane_probe(out: &mut [u32]) {
    let lane = UNIT_POS_PLANE;
    let mine = lane * 3 + 1;
    let mut broadcast = 1u32;
    #[unroll]
    for e in 0..PLANE_LOAD_LANES {
        if plane_broadcast(mine, e) != e * 3 + 1 {
            broadcast = 0;
        }
    }
    let sum = plane_sum(f32::cast_from(lane + 1));
    let at = 3 * UNIT_POS as usize;
    out[at] = broadcast;
    out[at + 1] = u32::cast_from(sum);
    out[at + 2] = lane;
}
