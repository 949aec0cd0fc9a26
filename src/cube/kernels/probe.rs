//! Capability probes: tiny kernels whose results tell the host what a device really does, where
//! what it reports is not enough.

use cubecl::prelude::*;

/// Lanes the forward kernel's plane loads hand each other a value from (its `chunk`).
pub const PLANE_LOAD_LANES: u32 = 8;

/// Every unit writes 1 when `plane_broadcast` from each of its plane's first
/// [`PLANE_LOAD_LANES`] lanes gave that lane's value (lane `e` holds `3e + 1`), else 0. cubecl
/// registers plane operations only for GPU adapters, while lavapipe (a CPU adapter) runs them:
/// the forward kernel's plane loads are launched where this probe passed.
#[cube(launch)]
pub fn plane_broadcast_probe(out: &mut [u32]) {
    let mine = UNIT_POS_PLANE * 3 + 1;
    let mut ok = 1u32;
    #[unroll]
    for e in 0..PLANE_LOAD_LANES {
        if plane_broadcast(mine, e) != e * 3 + 1 {
            ok = 0;
        }
    }
    out[UNIT_POS as usize] = ok;
}
