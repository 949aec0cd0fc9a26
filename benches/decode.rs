//! Decode against the KV cache on the default device: `cargo bench --bench decode`.
//!
//! One new query per sequence, 32 query heads, head dim 128, causal, f32 queries; caches of
//! MHA 32/32, GQA 32/8 and MQA 32/1, stored as f32, f16, int8 and 4-bit; batch 1 and 8
//! (`GQA_DECODE_BATCHES`);
//! `Lk` from `GQA_DECODE_LENGTHS` (comma-separated, default `1024,4096,16384`). Each row:
//! median of `GQA_BENCH_RUNS` decodes (default 5) after one untimed one, the K/V bytes a decode
//! step reads (every cached row of every KV head once, scales included), and for GQA and MQA
//! the speedup over MHA at the same storage and length next to its ideal `q_heads / kv_heads`;
//! then the median time of a kernel that only reads the same cache bytes once
//! (`CubeDevice::try_stream_cache`, alternating with the decodes) and decode's time over it (the
//! issue's target: within 2x). Measured in one run; the caches are built and uploaded, and the
//! outputs allocated, outside the timed region (`try_decode_into`). `first ms` is the first,
//! untimed decode of a row: on lavapipe mostly the kernel's compile, where the row is the first
//! of its specialisation (measure it with `MESA_SHADER_CACHE_DISABLE=true`).
//!
//! `GQA_DECODE_LAYOUTS` (default `plane,unit` where the device runs the plane decode kernel):
//! the decode layouts timed, each over every row — `plane`, lanes across the head dim, and
//! `unit`, rows per unit (`CubeDevice::with_unit_decode`). `GQA_DECODE_STORES` (default
//! `f32,f16,int8,int4`) the cache storages.
//!
//! A plain bench binary (no criterion): the figures are ratios within one run.

use std::time::Instant;

use gqa::cache::{Float16, Float32, Int4, Int8, KvCache, KvStorage, Layout, SeqId};
use gqa::cube::CubeDevice;
use gqa::heads::{Rule, Supported};
use gqa::{Attention, AttentionSpec};
use ndarray::{Array3, Array4};

const HQ: usize = 32;
const D: usize = 128;
const PAGE: usize = 16;

mod common;
use common::{env_list, env_usize};

fn lengths() -> Vec<usize> {
    env_list("GQA_DECODE_LENGTHS", &[1024, 4096, 16384])
}

/// Median seconds of one decode step over `batch` sequences of `len` tokens each.
fn time_decode<const HKV: usize, S: KvStorage>(
    device: &CubeDevice,
    batch: usize,
    len: usize,
    runs: usize,
) -> gqa::Result<Timed>
where
    Rule: Supported<HQ, HKV, D> + Supported<HKV, HKV, D>,
{
    let spec: AttentionSpec = *Attention::<HQ, HKV, D>::new().causal().spec();
    let pages = batch * len.div_ceil(PAGE);
    let mut cache = KvCache::<HKV, D, S>::new(Layout::Paged {
        page_size: PAGE,
        pages,
    });
    let seqs: Vec<SeqId> = (0..batch)
        .map(|_| cache.try_add_sequence().unwrap())
        .collect();
    // Appended in chunks, as a prefill would.
    let chunk = 512.min(len);
    for (n, &seq) in seqs.iter().enumerate() {
        let mut done = 0;
        while done < len {
            let count = chunk.min(len - done);
            let x = Array3::from_shape_fn((HKV, count, D), |(h, t, c)| {
                ((n * 7 + h * 13 + (done + t) * 3 + c) as f32 * 0.37).sin()
            });
            cache.try_append(seq, x.view(), x.view()).unwrap();
            done += count;
        }
    }
    let mut copy = device.try_upload_cache(&cache)?;
    let q = Array4::from_shape_fn((batch, HQ, 1, D), |(b, h, _, c)| {
        ((b * 5 + h * 11 + c) as f32 * 0.23).cos()
    });
    let q = device.try_upload(q.view())?;
    let mut out = device.try_forward_output::<f32>(&spec, batch, 1)?;
    let mut bytes = 0;
    // The decode step and the bytes-once read alternate, so that drift hits both alike.
    let mut step = |stream: bool| -> gqa::Result<f64> {
        let start = Instant::now();
        if stream {
            bytes = device.try_stream_cache(&cache, &mut copy, &seqs)?;
        } else {
            device.try_decode_into(&spec, &q, &cache, &mut copy, &seqs, &mut out)?;
        }
        device.try_sync()?;
        Ok(start.elapsed().as_secs_f64())
    };
    // Compiles both kernels.
    let first = step(false)?;
    step(true)?;
    let (mut decode, mut stream) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        decode.push(step(false)?);
        stream.push(step(true)?);
    }
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    Ok(Timed {
        first,
        decode: median(decode),
        stream: median(stream),
        bytes,
    })
}

/// One row's figures: median seconds of a decode step and of the bytes-once read of the same
/// cache rows ([`CubeDevice::try_stream_cache`]), and those bytes.
struct Timed {
    first: f64,
    decode: f64,
    stream: f64,
    bytes: usize,
}

fn main() {
    let open = || match CubeDevice::try_default() {
        Ok(device) => Some(device),
        Err(error) => {
            eprintln!("no device for the decode benchmark: {error}");
            None
        }
    };
    let Some(device) = open() else { return };
    let default_layouts = if device.plane_decode_lanes().is_some() {
        "plane,unit"
    } else {
        "unit"
    };
    let layouts = std::env::var("GQA_DECODE_LAYOUTS").unwrap_or(default_layouts.into());
    let stores = std::env::var("GQA_DECODE_STORES").unwrap_or("f32,f16,int8,int4".into());
    let stores: Vec<&str> = stores.split(',').map(str::trim).collect();
    let mut devices = Vec::new();
    for layout in layouts.split(',').map(str::trim) {
        match layout {
            "plane" if device.plane_decode_lanes().is_some() => {
                devices.push(("plane", open().expect("the device again")))
            }
            "plane" => println!("plane decode does not run on {}", device.name()),
            "unit" => devices.push(("unit", open().expect("the device again").with_unit_decode())),
            other => panic!("GQA_DECODE_LAYOUTS: {other:?} is neither plane nor unit"),
        }
    }
    let runs = env_usize("GQA_BENCH_RUNS", 5);
    println!(
        "decode on {}: {HQ} query heads, D {D}, 1 query per sequence, causal, median of {runs}",
        device.name()
    );
    println!(
        "{:<6} {:<6} {:>6} {:>3} {:<9} {:>10} {:>10} {:>12} {:>9} {:>14} {:>10} {:>9}",
        "layout",
        "store",
        "Lk",
        "B",
        "heads",
        "first ms",
        "ms",
        "K/V MiB",
        "GB/s",
        "vs MHA (ideal)",
        "read ms",
        "vs read"
    );
    // The device's memory bandwidth in GB/s, when given (scripts/gpu-check sets it for known
    // GPUs): decode's GB/s as a fraction of it follows each row.
    let peak = common::env_f64("GQA_PEAK_GBS");
    macro_rules! storage_rows {
        ($layout:expr, $device:expr, $storage:ty, $batch:expr, $len:expr) => {{
            let (layout, device) = ($layout, $device);
            let name = <$storage as KvStorage>::KIND.name();
            let rows = [
                ("MHA 32/32", time_decode::<32, $storage>(device, $batch, $len, runs), 1),
                ("GQA 32/8", time_decode::<8, $storage>(device, $batch, $len, runs), 4),
                ("MQA 32/1", time_decode::<1, $storage>(device, $batch, $len, runs), 32),
            ];
            let mha = rows[0].1.as_ref().ok().map(|r| r.decode);
            for (label, result, ideal) in rows {
                match result {
                    Ok(t) => println!(
                        "{layout:<6} {name:<6} {:>6} {:>3} {label:<9} {:>10.1} {:>10.3} {:>12.2} {:>9.2} {:>8} ({ideal}x) {:>10.3} {:>8.2}x{}",
                        $len,
                        $batch,
                        t.first * 1e3,
                        t.decode * 1e3,
                        t.bytes as f64 / (1 << 20) as f64,
                        t.bytes as f64 / t.decode / 1e9,
                        mha.map_or("-".to_string(), |m| format!("{:.2}x", m / t.decode)),
                        t.stream * 1e3,
                        t.decode / t.stream,
                        peak.map_or(String::new(), |p| format!(
                            " {:.1}% of {p} GB/s",
                            100.0 * t.bytes as f64 / t.decode / 1e9 / p
                        )),
                    ),
                    Err(error) => println!("{layout:<6} {name:<6} {:>6} {:>3} {label:<9} not run: {error}", $len, $batch),
                }
            }
        }};
    }
    for len in lengths() {
        for batch in env_list("GQA_DECODE_BATCHES", &[1, 8]) {
            for (layout, device) in &devices {
                for &store in &stores {
                    match store {
                        "f32" => storage_rows!(layout, device, Float32, batch, len),
                        "f16" => storage_rows!(layout, device, Float16, batch, len),
                        "int8" => storage_rows!(layout, device, Int8, batch, len),
                        "int4" => storage_rows!(layout, device, Int4, batch, len),
                        other => {
                            panic!("GQA_DECODE_STORES: {other:?} is not f32, f16, int8 or int4")
                        }
                    }
                }
            }
        }
    }
}
