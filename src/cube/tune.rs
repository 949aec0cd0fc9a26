//! Autotune of the forward kernel's tile, on cubecl's `LocalTuner`: the first launch of a key
//! times every candidate tile on the call's own buffers and keeps the fastest for every later
//! launch with that key (and, where cubecl persists autotune results, for later processes).
//!
//! **Key.** Everything that changes the generated code (dtype, head dim, group, mask sides,
//! softcap, ALiBi, varlen) and the problem's size in powers of two: `seq_q`, `seq_k` (a varlen
//! launch's longest sequence's) and the number of (batch or sequence, KV head) cubes, each
//! rounded up to the next power of two. One device's results are
//! kept apart from another's (the tuner is per adapter name).
//!
//! **Candidates.** [`ForwardTile::candidates`]: the untuned tile with plane loads, one of twice
//! its rows, and the untuned tile with uniform loads (which a GPU that broadcasts uniform loads
//! may prefer). Each costs a compile on a key's first launch: on lavapipe about 6, 16 and 13 s
//! at head dim 128. A candidate the host refuses for a problem or device (a grid the device
//! cannot dispatch, plane loads where they do not run) is not timed; when none is left the
//! device's untuned tile's own error is returned.
//!
//! **Errors.** cubecl's tuner panics if the tile it chose then fails on the call it was timed
//! on. Host-side checks are deterministic, so that cannot happen here: every candidate is
//! first checked on the host ([`Device::check_forward_tile`]) and only those that pass are timed.

use cubecl::tune::{LocalTuner, Tunable, TunableSet, TuneGroup, TuneInputs, local_tuner};

use super::runtime::{Device, KernelElement};
use super::{ForwardCall, ForwardTile};
use crate::dsl::cube::{CubeMask, CubeScore};
use crate::dsl::{NoMask, NoScore};
use crate::error::Result;
use crate::spec::{AttentionSpec, ProblemShape};

/// The tuner's identity for a device and a pair of user mods: a set of tunables launches one
/// kernel type, so each mod type gets its own (the device name alone without mods).
fn tuner_id<M: CubeMask, S: CubeScore>(device: &Device) -> String {
    if std::any::TypeId::of::<(M, S)>() == std::any::TypeId::of::<(NoMask, NoScore)>() {
        device.name().to_string()
    } else {
        format!(
            "{} mods {} {}",
            device.name(),
            std::any::type_name::<M>(),
            std::any::type_name::<S>()
        )
    }
}

/// Results by device (its adapter name) and key.
static FORWARD: LocalTuner<String, String> = local_tuner!("forward-tile");

/// The tuner's view of a forward call: [`ForwardCall`] borrows its buffers.
struct ForwardInputs;

impl TuneInputs for ForwardInputs {
    type At<'a> = (&'a Device, ForwardCall<'a>);
}

type ForwardSet = TunableSet<String, ForwardInputs, (), ForwardTile>;

/// The autotune key of `call` (see the module docs).
fn key<T: KernelElement>(spec: &AttentionSpec, shape: ProblemShape, packed: bool) -> String {
    let mask = spec.mask();
    let bucket = |n: usize| n.max(1).next_power_of_two();
    format!(
        "{} d{} g{} left{} right{} softcap{} alibi{} q{} k{} cubes{}{}",
        std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?"),
        spec.head_dim(),
        spec.group_size(),
        mask.left().is_some(),
        mask.right().is_some(),
        spec.softcap().is_some(),
        spec.alibi().is_some(),
        bucket(shape.seq_q),
        bucket(shape.seq_k),
        bucket(shape.batch * spec.kv_heads()),
        if packed { " varlen" } else { "" },
    )
}

/// Every candidate tile any head dim can have, each a tunable that launches the call with it
/// (or fails, for a head dim it is not a candidate of: the tuner then does not time it).
fn forward_set<T: KernelElement, M: CubeMask, S: CubeScore>() -> ForwardSet {
    let group = TuneGroup::<String>::new("forward tiles", |_| 1);
    let mut all: Vec<ForwardTile> = Vec::new();
    for head_dim in [8, 64, 128, 256, 512] {
        for tile in ForwardTile::candidates(head_dim) {
            if !all.contains(&tile) {
                all.push(tile);
            }
        }
    }
    let mut set = ForwardSet::new_cloning_inputs(|(_, call): &(&Device, ForwardCall<'_>)| {
        key::<T>(call.spec, call.shape, call.packed.is_some())
    });
    for tile in all {
        set = set.with(
            Tunable::identified(tile, move |(device, call): (&Device, ForwardCall<'_>)| {
                if !ForwardTile::candidates(call.spec.head_dim()).contains(&tile) {
                    return Err(format!("{tile} is not a candidate at this head dim"));
                }
                device
                    .forward_tiled::<T, M, S>(&call, tile)
                    .map_err(|e| e.to_string())
            })
            .group(&group, |_| 1),
        );
    }
    set
}

/// The forward launch with the fastest candidate tile for its key, timing them all on the
/// first launch of a key.
pub(super) fn forward<T: KernelElement, M: CubeMask, S: CubeScore>(
    device: &Device,
    call: ForwardCall<'_>,
) -> Result<()> {
    let id = tuner_id::<M, S>(device);
    let set = FORWARD.init(&id, forward_set::<T, M, S>);
    let key = key::<T>(call.spec, call.shape, call.packed.is_some());
    if let Some(tile) = FORWARD.fastest_identity(&id, &set, &key) {
        return device.forward_tiled::<T, M, S>(&call, tile);
    }
    let head_dim = call.spec.head_dim();
    let untuned = device.untuned_forward_tile(head_dim);
    let fit: Vec<ForwardTile> = ForwardTile::candidates(head_dim)
        .into_iter()
        .filter(|&tile| device.check_forward_tile(&call, tile).is_ok())
        .collect();
    match fit.as_slice() {
        // The untuned tile's own error (it is always a candidate).
        [] => device.check_forward_tile(&call, untuned),
        [only] => device.forward_tiled::<T, M, S>(&call, *only),
        _ => {
            FORWARD.execute(&id, device.client(), set, (device, call));
            Ok(())
        }
    }
}

/// The tile autotune settled on for the key of `spec` and `shape` on `device`, if it has.
pub(super) fn tuned_tile<T: KernelElement>(
    device: &Device,
    spec: &AttentionSpec,
    shape: ProblemShape,
) -> Option<ForwardTile> {
    let id = tuner_id::<NoMask, NoScore>(device);
    let set = FORWARD.init(&id, forward_set::<T, NoMask, NoScore>);
    FORWARD.fastest_identity(&id, &set, &key::<T>(spec, shape, false))
}
