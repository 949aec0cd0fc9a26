//! The main job: a Llama-3-8B-like attention configuration through the typed API — what its KV
//! cache costs next to MHA and MQA, and one causal layer run by the cubecl kernel on the best
//! available device, checked against the f64 oracle.
//!
//! `cargo run --release --example demo [path/to/config.json]`
//!
//! With a Hugging Face `config.json` path, the model's own numbers are used for the cache table.

use std::time::Instant;

use gqa::cube::CubeDevice;
use gqa::{DType, DynAttention, Gqa, Mha, ModelConfig, Mqa, oracle};
use ndarray::Array4;

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
        Err(error) => println!("  no GPU device ({error}); the oracle alone ran"),
    }
    let kv_not_stored = Mha::<32, 128>::new()
        .kv_cache(DType::F32)
        .bytes(1, batch, seq)
        - llama.kv_cache(DType::F32).bytes(1, batch, seq);
    println!(
        "  KV bytes this layer did not store (f32, vs MHA): {}",
        human(kv_not_stored)
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
