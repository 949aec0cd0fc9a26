//! Kernel compile (JIT) time per specialisation: the first launch of each kernel against its
//! second, on the default device. Each distinct comptime configuration is one compile, which is
//! what the kernel suites' CI time is made of (lavapipe's LLVM compiles every shader).
//!
//! Run: `cargo bench --profile dev --bench jit` (the dev profile shares the test build).
//! `GQA_JIT_LEN` sets Lq = Lk (default 64); `GQA_JIT_ONLY=text` runs the specs whose label has it.
//! The device is `CubeDevice::untuned` (the suites' tile, `ForwardTile::untuned`).
//! Mesa caches compiled shaders (`~/.cache/mesa_shader_cache`): measure compile times with
//! `MESA_SHADER_CACHE_DISABLE=true`.

use std::time::Instant;

use gqa::cube::CubeDevice;
use gqa::{AttentionSpec, Gqa};
use ndarray::Array4;

mod common;
use common::env_usize;

fn time_forward(device: &CubeDevice, spec: &AttentionSpec, len: usize) -> (f64, f64) {
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
    let mut times = [0.0; 2];
    for time in &mut times {
        let start = Instant::now();
        let out = device
            .try_forward_device(spec, &q, &k, &k)
            .expect("forward");
        device.try_sync().expect("sync");
        drop(out);
        *time = start.elapsed().as_secs_f64();
    }
    (times[0], times[1])
}

fn main() {
    // Untuned: one compile per specialisation, as the kernel suites pay (autotune's first
    // launch of a key would compile and time every candidate tile).
    let device = CubeDevice::try_default().expect("a cubecl device").untuned();
    let len = env_usize("GQA_JIT_LEN", 64);
    println!("device: {}; Lq = Lk = {len}", device.name());
    println!("{:<34} {:>12} {:>12}", "spec", "first (s)", "second (s)");
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
        let (first, second) = time_forward(&device, &spec, len);
        println!("{label:<34} {first:>12.2} {second:>12.3}");
    }
}
