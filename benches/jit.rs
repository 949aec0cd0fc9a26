//! Kernel compile (JIT) time per specialisation: the first launch of each kernel against its
//! second, on the default device. Each distinct comptime configuration is one compile, which is
//! what the kernel suites' CI time is made of (lavapipe's LLVM compiles every shader).
//!
//! Run: `cargo bench --profile dev --bench jit` (the dev profile shares the test build).
//! `GQA_JIT_LEN` sets Lq = Lk (default 64); `GQA_JIT_ONLY=text` runs the specs whose label has it.
//! The device is `CubeDevice::untuned` (the suites' tile, `ForwardTile::untuned`);
//! `GQA_JIT_TILES=4x8p,8x4u` compiles and runs each spec with each of these tiles instead
//! (rows x keys per block, then `p` for plane loads or `u` for uniform ones), and `GQA_JIT_RUNS` (default 1) launches after the first, the fastest
//! printed: a tile's compile cost beside its run time, in one run.
//! Mesa caches compiled shaders (`~/.cache/mesa_shader_cache`): measure compile times with
//! `MESA_SHADER_CACHE_DISABLE=true`.

use std::time::Instant;

use gqa::cube::{CubeDevice, ForwardTile, KvLoads};
use gqa::{AttentionSpec, Gqa};
use ndarray::Array4;

mod common;
use common::env_usize;

fn time_forward(device: &CubeDevice, spec: &AttentionSpec, len: usize, runs: usize) -> (f64, f64) {
    let (hq, hkv, d) = (spec.q_heads(), spec.kv_heads(), spec.head_dim());
    let q =
        Array4::<f32>::from_shape_fn((1, hq, len, d), |(_, h, s, c)| ((h + s + c) as f32).sin());
    let k = Array4::<f32>::from_shape_fn((1, hkv, len, d), |(_, h, s, c)| {
        ((h * 3 + s + c) as f32).cos()
    });
    let (q, k) = (
        device.try_upload(q.view()).unwrap(),
        device.try_upload(k.view()).unwrap(),
    );
    let mut times = vec![0.0; 1 + runs.max(1)];
    for time in &mut times {
        let start = Instant::now();
        let out = device
            .try_forward_device(spec, &q, &k, &k)
            .expect("forward");
        device.try_sync().expect("sync");
        drop(out);
        *time = start.elapsed().as_secs_f64();
    }
    let fastest = times[1..].iter().copied().fold(f64::INFINITY, f64::min);
    (times[0], fastest)
}

fn main() {
    // Untuned: one compile per specialisation, as the kernel suites pay (autotune's first
    // launch of a key would compile and time every candidate tile).
    let device = CubeDevice::try_default()
        .expect("a cubecl device")
        .untuned();
    let len = env_usize("GQA_JIT_LEN", 64);
    let runs = env_usize("GQA_JIT_RUNS", 1);
    let tiles: Vec<Option<ForwardTile>> = match std::env::var("GQA_JIT_TILES") {
        Ok(list) => list
            .split(',')
            .map(|tile| {
                let tile = tile.trim();
                let (sizes, loads) = match tile.as_bytes().last() {
                    Some(b'p') => (&tile[..tile.len() - 1], KvLoads::Plane),
                    Some(b'u') => (&tile[..tile.len() - 1], KvLoads::Uniform),
                    _ => panic!("GQA_JIT_TILES: {tile:?} does not end in p or u"),
                };
                let parsed = sizes
                    .split_once('x')
                    .and_then(|(r, n)| Some((r.parse().ok()?, n.parse().ok()?)));
                let (rows, block_n) = parsed
                    .unwrap_or_else(|| panic!("GQA_JIT_TILES: {tile:?} is not ROWSxKEYS[p|u]"));
                Some(ForwardTile {
                    rows,
                    block_n,
                    loads,
                })
            })
            .collect(),
        Err(_) => vec![None],
    };
    println!("device: {}; Lq = Lk = {len}", device.name());
    println!(
        "{:<34} {:>6} {:>12} {:>12}",
        "spec", "tile", "first (s)", "fastest (s)"
    );
    let specs: [(&str, AttentionSpec); 6] = [
        (
            "GQA 32/8/128 causal",
            *Gqa::<32, 8, 128>::new().causal().spec(),
        ),
        ("GQA 32/8/128 none", *Gqa::<32, 8, 128>::new().spec()),
        (
            "GQA 32/8/128 window",
            *Gqa::<32, 8, 128>::new().window(16, 0).spec(),
        ),
        (
            "GQA 8/2/64 causal softcap",
            *Gqa::<8, 2, 64>::new().causal().softcap(30.0).spec(),
        ),
        ("GQA 4/2/8 causal", *Gqa::<4, 2, 8>::new().causal().spec()),
        ("GQA 3/1/5 causal", *Gqa::<3, 1, 5>::new().causal().spec()),
    ];
    let only = std::env::var("GQA_JIT_ONLY").ok();
    for (label, spec) in specs {
        if only.as_deref().is_some_and(|o| !label.contains(o)) {
            continue;
        }
        for tile in &tiles {
            let fresh = CubeDevice::try_default()
                .expect("a cubecl device")
                .untuned();
            let device = match tile {
                Some(tile) => fresh.try_with_forward_tile(*tile).expect("tile"),
                None => fresh,
            };
            let (first, fastest) = time_forward(&device, &spec, len, runs);
            let tile = tile.map_or("untuned".to_string(), |t| t.to_string());
            println!("{label:<34} {tile:>6} {first:>12.2} {fastest:>12.3}");
        }
    }
}
