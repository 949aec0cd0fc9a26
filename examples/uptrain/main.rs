//! Uptraining (Ainslie et al., 2023, arXiv:2305.13245): a multi-head attention block converted
//! into grouped-query attention for every divisor `G` of its 8 heads, by each of the paper's
//! three initialisations, then trained a little more with `gqa`'s backward.
//!
//! 1. **The MHA checkpoint.** No checkpoint can be downloaded here, so the example makes one: an
//!    MHA block trained from random weights to reproduce a fixed *teacher* — a random 8-head
//!    causal attention block whose heads differ (each has its own sharpened query and key
//!    maps) — on random inputs. It is written to and read back from a Hugging Face–layout
//!    checkpoint (`safetensors` + `config.json`), as a real one would come.
//! 2. **Conversion.** For each `G` in 1, 2, 4, 8: mean-pooling, the group's first head, and
//!    random initialisation of the key and value projections.
//! 3. **Uptraining.** Each converted block is trained against the MHA block's outputs (on fresh
//!    inputs) for `α` = 5% of the MHA block's own training steps.
//!
//! It prints, per `G` and initialisation, the relative output error against the MHA block on
//! held-out inputs before and after uptraining, the KV cache per token (bf16), and the measured
//! time of one decode step of the block (projections, cache append, attention) on the CPU
//! against a cache of `--context` tokens.
//!
//! `cargo run --release --example uptrain [-- --steps N --context L --save DIR]`
//!
//! `--save DIR` writes the trained MHA block there as a checkpoint, for the dial
//! (`cargo run --release --example dial -- DIR/config.json --checkpoint DIR`).

mod lab;

use gqa::Error;
use lab::*;

/// The value after `flag`, or `default`.
fn arg(flag: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == flag) {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{flag} takes a whole number")),
        None => default,
    }
}

/// Decode steps timed per block.
const DECODE_STEPS: usize = 256;

fn main() -> Result<(), Error> {
    let mha_steps = arg("--steps", MHA_STEPS);
    let context = arg("--context", 16384);
    let trained = train_mha(mha_steps)?;
    println!(
        "MHA block ({HEADS} heads x {HEAD_DIM}, width {HIDDEN}, causal), trained to reproduce a random \
         {HEADS}-head teacher with sharpened heads: {mha_steps} Adam steps on batches of {BATCH} x {SEQ} \
         in {:.1} s; loss {:.5} -> {:.5}; relative error against the teacher {:.4}",
        trained.seconds, trained.first_loss, trained.last_loss, trained.teacher_error,
    );
    let mha = trained.mha;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--save") {
        let dir = args.get(i + 1).expect("--save takes a directory");
        gqa::layer::checkpoint::try_write_layer(
            dir.as_ref(),
            PREFIX,
            &mha,
            gqa::DType::F32,
            &checkpoint_config(),
        )?;
        println!("the MHA checkpoint: {dir}");
    }
    let held_out = held_out(&mha)?;
    let steps = ((mha_steps as f64) * ALPHA).round() as usize;
    println!(
        "\nuptraining: {:.0}% of the MHA block's steps ({steps} Adam steps); error = ‖y − y_MHA‖ / ‖y_MHA‖ \
         on held-out inputs; decode = one token through the block against {context} cached tokens \
         (CPU, f32 cache, median of {DECODE_STEPS} steps, the four blocks in turn)\n",
        ALPHA * 100.0,
    );
    println!(
        "|  G | init       | error, before | error, after | KV bytes/token (bf16) | decode (µs) |"
    );
    println!(
        "|---:|------------|--------------:|-------------:|----------------------:|------------:|"
    );
    let mut blocks = [
        decoder::<1>(&mha, context, DECODE_STEPS)?,
        decoder::<2>(&mha, context, DECODE_STEPS)?,
        decoder::<4>(&mha, context, DECODE_STEPS)?,
        decoder::<8>(&mha, context, DECODE_STEPS)?,
    ];
    let decode = decode_seconds(&mut blocks, DECODE_STEPS)?;
    let rows = [
        uptrain::<1>(&mha, steps, &held_out)?,
        uptrain::<2>(&mha, steps, &held_out)?,
        uptrain::<4>(&mha, steps, &held_out)?,
        uptrain::<8>(&mha, steps, &held_out)?,
    ];
    for (rows, seconds) in rows.iter().zip(decode) {
        for row in rows {
            println!(
                "| {:>2} | {:<10} | {:>13.4} | {:>12.4} | {:>21} | {:>11.1} |",
                row.kv_heads,
                row.init,
                row.before,
                row.after,
                row.kv_bytes,
                seconds * 1e6
            );
        }
    }
    Ok(())
}
