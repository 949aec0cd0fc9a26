//! The main job: a Llama-3-8B-like attention configuration through the typed API — what its KV
//! cache costs next to MHA and MQA, and one causal layer run by the cubecl kernel on the best
//! available device and by the CPU backend, each checked against the f64 oracle; then
//! generation — a prompt prefilled into a paged KV cache and tokens decoded one by one — for
//! MHA, GQA, MQA and an int8 cache, on the GPU backend and on the CPU backend.
//!
//! `cargo run --release --example demo [path/to/config.json]`
//!
//! With a Hugging Face `config.json` path, the model's own numbers are used for the cache table.

use std::time::Instant;

use gqa::cache::{Float32, Int8, KvStorage, Layout};
use gqa::cpu::Cpu;
use gqa::cube::CubeDevice;
use gqa::heads::{Rule, Supported};
use gqa::{Attention, DType, DynAttention, Gqa, Mha, ModelConfig, Mqa, oracle};
use ndarray::{Array4, Axis};

const LAYERS: usize = 32;
const CONTEXT: usize = 8192;
const DTYPE: DType = DType::BF16;

fn main() -> Result<(), gqa::Error> {
    println!("gqa demo: attention as a typed language\n");

    // The type is the configuration: Gqa<32, 6, 128> would not compile.
    let llama = Gqa::<32, 8, 128>::new().causal();
    println!(
        "Gqa<32, 8, 128> (Llama-3-8B): {} query heads per KV head, KV cache {}x smaller than MHA",
        Gqa::<32, 8, 128>::GROUP,
        Gqa::<32, 8, 128>::KV_CACHE_REDUCTION
    );

    // (label, cache) rows, plus the model's layers, context and dtype.
    let (rows, layers, context, dtype) = match std::env::args().nth(1) {
        Some(path) => {
            let config = ModelConfig::from_json_file(&path)?;
            let this = DynAttention::try_from_model_config(&config)?;
            let mqa = DynAttention::try_new(config.num_attention_heads, 1, config.head_dim)?;
            let dtype = config.dtype.unwrap_or(DTYPE);
            println!(
                "\n{path}: {} query heads, {} KV heads, head dim {}",
                config.num_attention_heads, config.num_key_value_heads, config.head_dim
            );
            let rows = vec![
                (
                    "MHA (same query heads)",
                    this.kv_cache(dtype).mha_equivalent(),
                ),
                ("this model", this.kv_cache(dtype)),
                ("MQA (same query heads)", mqa.kv_cache(dtype)),
            ];
            let layers = config.num_hidden_layers.unwrap_or(LAYERS);
            (
                rows,
                layers,
                config.max_position_embeddings.unwrap_or(CONTEXT),
                dtype,
            )
        }
        None => {
            let rows = vec![
                ("MHA  Mha<32, 128>", Mha::<32, 128>::new().kv_cache(DTYPE)),
                ("GQA  Gqa<32, 8, 128>", llama.kv_cache(DTYPE)),
                ("MQA  Mqa<32, 128>", Mqa::<32, 128>::new().kv_cache(DTYPE)),
            ];
            (rows, LAYERS, CONTEXT, DTYPE)
        }
    };

    let budget: u128 = 24 << 30;
    println!("\nKV cache: {layers} layers, {dtype}, sequences of {context} tokens");
    println!(
        "  {:<24} {:>12} {:>14} {:>20}",
        "", "per token", "per sequence", "sequences in 24 GiB"
    );
    for (name, cache) in &rows {
        let per_sequence = cache.bytes(layers, 1, context);
        println!(
            "  {name:<24} {:>12} {:>14} {:>20}",
            human(cache.bytes_per_token(layers)),
            human(per_sequence),
            budget
                .checked_div(per_sequence)
                .map_or("-".into(), |n| n.to_string())
        );
    }
    let saved = rows[0].1.bytes(layers, 1, context) - rows[1].1.bytes(layers, 1, context);
    println!(
        "  {} stores {} less per sequence than MHA",
        rows[1].0,
        human(saved)
    );

    // One layer through the kernel on the best device, checked against the oracle.
    let (batch, seq) = (1, 256);
    let q = pseudo_random([batch, 32, seq, 128], 1);
    let k = pseudo_random([batch, 8, seq, 128], 2);
    let v = pseudo_random([batch, 8, seq, 128], 3);
    let reference = oracle::try_forward(llama.spec(), q.view(), k.view(), v.view())?;
    println!("\nOne causal Gqa<32, 8, 128> layer, batch {batch}, {seq} tokens:");
    match CubeDevice::try_default() {
        Ok(device) => {
            // The first launch compiles the kernel for this spec; the second is the steady state.
            let start = Instant::now();
            llama.try_forward(&device, q.view(), k.view(), v.view())?;
            let first = start.elapsed();
            let start = Instant::now();
            let out = llama.try_forward(&device, q.view(), k.view(), v.view())?;
            let second = start.elapsed();
            let low = oracle::try_forward_rounded(
                llama.spec(),
                q.view(),
                k.view(),
                v.view(),
                DType::F32,
            )?;
            let o: Vec<f64> = out.o.iter().map(|&x| f64::from(x)).collect();
            let check = oracle::compare(&reference.o, &low.o, &o, DType::F32);
            println!("  device: {}", device.name());
            println!(
                "  kernel: {:.1} ms (first launch, with compilation {:.1} ms); vs the f64 oracle: {check}",
                second.as_secs_f64() * 1e3,
                first.as_secs_f64() * 1e3
            );
        }
        Err(error) => println!("  no GPU device ({error})"),
    }
    // The same layer on the CPU backend (rayon's threads, gemm tiles).
    let cpu = Cpu::new();
    let start = Instant::now();
    let out = llama.try_forward(&cpu, q.view(), k.view(), v.view())?;
    let time = start.elapsed();
    let low = oracle::try_forward_rounded(llama.spec(), q.view(), k.view(), v.view(), DType::F32)?;
    let o: Vec<f64> = out.o.iter().map(|&x| f64::from(x)).collect();
    let check = oracle::compare(&reference.o, &low.o, &o, DType::F32);
    println!(
        "  CPU backend ({} threads): {:.1} ms; vs the f64 oracle: {check}",
        cpu.threads(),
        time.as_secs_f64() * 1e3
    );
    let kv_not_stored = Mha::<32, 128>::new()
        .kv_cache(DType::F32)
        .bytes(1, batch, seq)
        - llama.kv_cache(DType::F32).bytes(1, batch, seq);
    println!(
        "  KV bytes this layer did not store (f32, vs MHA): {}",
        human(kv_not_stored)
    );

    // Generation: prefill a prompt into a paged KV cache, then decode token by token.
    let (prompt, steps) = (256, 16);
    println!(
        "\nGeneration, one layer: a {prompt}-token prompt, then {steps} tokens decoded against the cache"
    );
    let device = CubeDevice::try_default();
    if let Err(error) = &device {
        println!("  no GPU device ({error}): the CPU backend alone decodes");
    }
    let backends = device
        .as_ref()
        .ok()
        .map(Step::Gpu)
        .into_iter()
        .chain([Step::Cpu(&cpu)]);
    for backend in backends {
        println!("  on {}:", backend.name());
        generate::<32, Float32>(backend, "MHA 32/32, f32 cache", prompt, steps)?;
        generate::<8, Float32>(backend, "GQA 32/8,  f32 cache", prompt, steps)?;
        generate::<1, Float32>(backend, "MQA 32/1,  f32 cache", prompt, steps)?;
        generate::<8, Int8>(backend, "GQA 32/8, int8 cache", prompt, steps)?;
    }
    Ok(())
}

/// Where a generation loop decodes.
#[derive(Clone, Copy)]
enum Step<'a> {
    Gpu(&'a CubeDevice),
    Cpu(&'a Cpu),
}

impl Step<'_> {
    fn name(&self) -> String {
        match self {
            Step::Gpu(device) => format!("the GPU backend, {}", device.name()),
            Step::Cpu(cpu) => format!("the CPU backend, {} threads", cpu.threads()),
        }
    }
}

/// Prefills `prompt` tokens of one sequence, then decodes `steps` tokens one at a time (append
/// the new key/value, decode the new query), and prints the time per token, the cache's memory
/// and the last step's error against the oracle on the cache's contents.
fn generate<const HKV: usize, S: KvStorage>(
    backend: Step<'_>,
    label: &str,
    prompt: usize,
    steps: usize,
) -> Result<(), gqa::Error>
where
    Rule: Supported<32, HKV, 128> + Supported<HKV, HKV, 128>,
{
    let attention = Attention::<32, HKV, 128>::new().causal();
    let page_size = 16;
    let layout = Layout::Paged {
        page_size,
        pages: (prompt + steps).div_ceil(page_size),
    };
    let mut cache = attention.try_new_cache::<S>(layout)?;
    let seq = cache.try_add_sequence()?;
    let kv = |tokens: usize, seed: u64| {
        pseudo_random([1, HKV, tokens, 128], seed).index_axis_move(Axis(0), 0)
    };
    cache.try_append(seq, kv(prompt, 10).view(), kv(prompt, 11).view())?;
    let mut copy = match backend {
        Step::Gpu(device) => Some(device.try_upload_cache(&cache)?),
        Step::Cpu(_) => None,
    };
    let mut times = Vec::with_capacity(steps);
    let mut last = None;
    for step in 0..steps {
        let seed = 100 + 3 * step as u64;
        cache.try_append(seq, kv(1, seed).view(), kv(1, seed + 1).view())?;
        let q = pseudo_random([1, 32, 1, 128], seed + 2);
        let (time, o) = match backend {
            Step::Gpu(device) => {
                let copy = copy.as_mut().expect("a GPU generation uploads its copy");
                let q_device = device.try_upload(q.view())?;
                let start = Instant::now();
                let out = attention.try_decode(device, &q_device, &cache, copy, &[seq])?;
                device.try_sync()?;
                let time = start.elapsed().as_secs_f64();
                (
                    time,
                    device.try_download(&out.o)?.into_raw_vec_and_offset().0,
                )
            }
            Step::Cpu(cpu) => {
                let start = Instant::now();
                let out = attention.try_decode_cpu(cpu, q.view(), &cache, &[seq])?;
                (
                    start.elapsed().as_secs_f64(),
                    out.o.into_raw_vec_and_offset().0,
                )
            }
        };
        times.push(time);
        last = Some((q, o));
    }
    let (q, o) = last.expect("at least one step");
    let o: Vec<f64> = o.iter().map(|&x| f64::from(x)).collect();
    let exact = attention.try_decode_oracle(q.view(), &cache, &[seq])?;
    let max_error = exact
        .o
        .iter()
        .zip(&o)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    // The first step compiles the kernel (GPU); the median of the rest is the steady state.
    let mut steady = times[1.min(times.len() - 1)..].to_vec();
    steady.sort_by(f64::total_cmp);
    println!(
        "  {label}: {:.2} ms/token (first {:.0} ms{}), cache {} for {} tokens, last-step max |error| vs the oracle {max_error:.1e}",
        steady[steady.len() / 2] * 1e3,
        times[0] * 1e3,
        if matches!(backend, Step::Gpu(_)) {
            " with compilation"
        } else {
            ""
        },
        human(cache.bytes() as u128),
        prompt + steps,
    );
    Ok(())
}

/// Deterministic data in [-1, 1) without a random-number dependency.
fn pseudo_random(shape: [usize; 4], seed: u64) -> Array4<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Array4::from_shape_simple_fn(shape, || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    })
}

fn human(bytes: u128) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", units[unit])
    }
}
