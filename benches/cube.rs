//! The cubecl forward kernel on the default device (a GPU, or lavapipe on a machine without
//! one): `cargo bench --bench cube` (add `--features vulkan` for cubecl's SPIR-V compiler).
//!
//! 1. `cube_forward/<config>`: causal prefill, f32, batch 1, `GQA_BENCH_SEQ` tokens (default
//!    128), one benchmark per configuration of the shared list (`tests/common/configs.rs`).
//!    Throughput is in elements = FLOPs of the two products under the causal mask
//!    (`2 · B · HQ · L² · D`), so criterion's "elem/s" reads as FLOP/s.
//! 2. A table of MHA vs GQA vs MQA at 32 query heads and head dim 128, timed in the same run
//!    (median of `GQA_BENCH_RUNS` launches, default 5): the same FLOPs, `q_heads / kv_heads`
//!    times fewer K/V bytes.
//!
//! Inputs are uploaded and outputs allocated once, outside the timed region; a timed run is one
//! `try_forward_into` launch plus
//! `CubeDevice::try_sync`. The side-by-side with cubek-attention lives in `benches/peers`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use gqa::cube::{CubeDevice, DeviceTensor};
use gqa::{Attention, AttentionSpec};
use ndarray::Array4;

#[path = "../tests/common/configs.rs"]
#[macro_use]
mod configs;

const BATCH: usize = 1;

mod common;
use common::env_usize;

fn seq() -> usize {
    env_usize("GQA_BENCH_SEQ", 128)
}

/// Deterministic inputs in [-1, 1], uploaded once, and outputs allocated once (each launch
/// writes them again: `try_forward_into`).
struct Inputs {
    q: DeviceTensor<f32>,
    k: DeviceTensor<f32>,
    v: DeviceTensor<f32>,
    out: std::cell::RefCell<Option<gqa::cube::DeviceOutput<f32>>>,
}

impl Inputs {
    fn new(device: &CubeDevice, hq: usize, hkv: usize, d: usize, len: usize) -> Inputs {
        let fill = |heads: usize, phase: f32| {
            Array4::from_shape_fn((BATCH, heads, len, d), |(b, h, s, c)| {
                ((b * 7 + h * 13 + s * 3 + c) as f32 * 0.37 + phase).sin()
            })
        };
        let upload = |x: Array4<f32>| device.try_upload(x.view()).expect("upload");
        Inputs {
            q: upload(fill(hq, 0.0)),
            k: upload(fill(hkv, 1.0)),
            v: upload(fill(hkv, 2.0)),
            out: std::cell::RefCell::new(None),
        }
    }

    /// One launch, waited for (the first also allocates the outputs).
    fn run(&self, device: &CubeDevice, spec: &AttentionSpec) {
        let mut out = self.out.borrow_mut();
        let shape = self.q.shape();
        let out = out.get_or_insert_with(|| {
            device
                .try_forward_output(spec, shape[0], shape[2])
                .expect("outputs")
        });
        device
            .try_forward_into(spec, &self.q, &self.k, &self.v, out)
            .expect("forward");
        device.try_sync().expect("sync");
        black_box(&*out);
    }
}

fn causal_flops(hq: usize, d: usize, len: usize) -> u64 {
    (2 * BATCH * hq * len * len * d) as u64
}

macro_rules! cube_bench {
    ($name:ident, $hq:literal, $hkv:literal, $d:literal) => {
        paste::paste! {
            fn [<cube_forward_ $name>](c: &mut Criterion, device: &CubeDevice) {
                let len = seq();
                let attention = Attention::<$hq, $hkv, $d>::new().causal();
                let inputs = Inputs::new(device, $hq, $hkv, $d, len);
                inputs.run(device, attention.spec()); // compiles the kernel, outside the timing
                let mut group = c.benchmark_group("cube_forward");
                // Launches take milliseconds on a GPU, up to seconds on lavapipe: flat sampling,
                // ten samples.
                group.sample_size(10);
                group.sampling_mode(SamplingMode::Flat);
                group.warm_up_time(Duration::from_millis(500));
                group.measurement_time(Duration::from_secs(2));
                group.throughput(Throughput::Elements(causal_flops($hq, $d, len)));
                group.bench_function(BenchmarkId::new(stringify!($name), len), |b| {
                    b.iter(|| inputs.run(device, attention.spec()))
                });
                group.finish();
            }
        }
    };
}

for_each_config!(cube_bench);

/// Median wall time of `runs` launches after one untimed launch.
fn median_time(device: &CubeDevice, spec: &AttentionSpec, inputs: &Inputs, runs: usize) -> f64 {
    inputs.run(device, spec);
    let mut times: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            inputs.run(device, spec);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// MHA vs GQA vs MQA at 32 query heads, head dim 128, causal: the table.
fn heads_table(device: &CubeDevice) {
    const HQ: usize = 32;
    const D: usize = 128;
    let len = seq();
    let runs = env_usize("GQA_BENCH_RUNS", 5);
    let rows: [(&str, usize, AttentionSpec); 3] = [
        (
            "MHA 32/32",
            32,
            *Attention::<32, 32, 128>::new().causal().spec(),
        ),
        (
            "GQA 32/8",
            8,
            *Attention::<32, 8, 128>::new().causal().spec(),
        ),
        (
            "MQA 32/1",
            1,
            *Attention::<32, 1, 128>::new().causal().spec(),
        ),
    ];
    println!(
        "\nMHA vs GQA vs MQA: {HQ} query heads, D {D}, causal, f32, B {BATCH}, L {len}, median of {runs}"
    );
    println!(
        "{:<10} {:>10} {:>12} {:>14} {:>12} {:>12} {:>6}",
        "config", "ms", "GFLOP/s", "K/V MiB read", "vs MHA", "of f32 peak", "tile"
    );
    // The device's f32 peak in TFLOP/s, when given (scripts/gpu-check sets it for known GPUs).
    let peak = common::env_f64("GQA_PEAK_TFLOPS_F32");
    let mut mha_time = None;
    for (label, hkv, spec) in rows {
        let inputs = Inputs::new(device, HQ, hkv, D, len);
        let time = median_time(device, &spec, &inputs, runs);
        let mha = *mha_time.get_or_insert(time);
        // K and V once per KV head (the kernel loads each K/V tile once per group).
        let kv_bytes = 2 * BATCH * hkv * len * D * size_of::<f32>();
        let flops = causal_flops(HQ, D, len) as f64 / time;
        // The tile autotune settled on (the warm-up launch tuned it).
        let tile = device
            .tuned_forward_tile::<f32>(&spec, BATCH, len, len)
            .map_or("-".into(), |t| t.to_string());
        println!(
            "{label:<10} {:>10.2} {:>12.2} {:>14.2} {:>11.2}x {:>12} {tile:>6}",
            time * 1e3,
            flops / 1e9,
            kv_bytes as f64 / (1 << 20) as f64,
            mha / time,
            peak.map_or("-".into(), |p| format!(
                "{:.1}%",
                100.0 * flops / (p * 1e12)
            )),
        );
    }
}

fn main() {
    let device = match CubeDevice::try_default() {
        Ok(device) => device,
        Err(error) => {
            eprintln!("no device for the kernel benchmarks: {error}");
            return;
        }
    };
    eprintln!("device: {}", device.name());
    // GQA_BENCH_TABLE_ONLY=1: the table alone (scripts/gpu-check, at long sequences).
    if std::env::var_os("GQA_BENCH_TABLE_ONLY").is_none() {
        let mut criterion = Criterion::default().configure_from_args();
        macro_rules! run {
            ($name:ident, $($rest:tt)*) => {
                paste::paste! { [<cube_forward_ $name>](&mut criterion, &device); }
            };
        }
        for_each_config!(run);
        criterion.final_summary();
    }
    heads_table(&device);
}
