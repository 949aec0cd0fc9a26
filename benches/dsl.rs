//! The DSL's costs, as ratios within one run: `cargo bench --bench dsl`.
//!
//! 1. **Zero cost.** Causal written with the DSL (`library::causal()`, a user mask over an
//!    unmasked spec: its block mask skips the upper tiles, runs the lower ones without a test
//!    and tests only the diagonal ones) against the built-in `.causal()`, GQA 32/8/128, f32,
//!    `GQA_DSL_CAUSAL` tokens (default 2048), on the CPU and on the GPU device; classified by
//!    brute force, and with its analytic classifier (`Band::causal()`: the same tiles, and on
//!    the CPU each query's keys as one interval, so the mask folds into the rows' band).
//! 2. **Sparsity.** A causal document mask over 8 packed documents of `GQA_DSL_TOKENS` tokens
//!    in all (default 8192; lengths in the ratio 1:2:…:8, so not all alike), with the sorted
//!    documents' classifier (its tiles; on the CPU also its row keys, each query's document
//!    as one interval of keys), against the plain causal kernel over the same tokens: each as
//!    FLOP/s over its *visible* pairs (4·D FLOPs a pair), and their ratio.
//!    Then varlen prefill of the same 8 documents (`try_forward_varlen`, their offsets), the
//!    same way against plain causal (target ≥ 0.9).
//! 3. **Compile cost.** The first launch of a mod type the process has not run (a kernel
//!    compile, plus the launch) against its second launch, on the GPU device (run with
//!    `MESA_SHADER_CACHE_DISABLE=true` on Mesa for honest figures).
//!
//! Timings: median of `GQA_BENCH_RUNS` (default 3) after one untimed call; the compared calls
//! alternate, so that a shared machine's drift hits them alike. Inputs and block masks are
//! made before the timed calls (block masks are cached per problem: a steady state reuses
//! them); on the GPU device the inputs are uploaded and the output allocated before them too,
//! so a timed call is the kernels' work and the wait for it ([`Bench`]). The GPU device is `CubeDevice::untuned()` (one tile, the same for both sides).
//! `GQA_DSL_ONLY=cpu|cube` runs one backend.

use std::cell::RefCell;
use std::time::Instant;

use gqa::cpu::Cpu;
use gqa::cube::{CubeDevice, DeviceOutput, DeviceTensor};
use gqa::dsl::block::{Band, SortedDocuments};
use gqa::dsl::{Aux, MaskMod, Mods, NoScore, Position, ScoreMod, library};
use gqa::spec::Varlen;
use gqa::{AttentionSpec, Gqa};
use ndarray::Array4;

mod common;
use common::{alternate, alternate3, documents, env_usize, visible_pairs};

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

fn inputs(tokens: usize) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    let f = |h: usize, i: usize, d: usize, salt: usize| {
        (((h * 31 + i * 17 + d * 7 + salt) % 23) as f32 - 11.0) / 23.0
    };
    (
        Array4::from_shape_fn((1, HQ, tokens, D), |(_, h, i, d)| f(h, i, d, 1)),
        Array4::from_shape_fn((1, HKV, tokens, D), |(_, h, i, d)| f(h, i, d, 2)),
        Array4::from_shape_fn((1, HKV, tokens, D), |(_, h, i, d)| f(h, i, d, 3)),
    )
}

/// A backend's calls on inputs it prepared before the timed calls: the CPU takes host arrays;
/// the GPU device takes tensors uploaded beforehand and writes into an output allocated
/// beforehand, then waits for the kernels. The timed calls are the kernels' work, not
/// transfers (at L8192 the host-array calls moved 335 MB each way, a fixed cost that hid the
/// sparse problems' speed: 0.72 and 0.75 of causal's visible FLOP/s that way on lavapipe).
trait Bench {
    type Inputs;
    fn prepare(&self, q: &Array4<f32>, k: &Array4<f32>, v: &Array4<f32>) -> Self::Inputs;
    fn forward<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        x: &Self::Inputs,
    );
    fn varlen(&self, spec: &AttentionSpec, packing: &Varlen, x: &Self::Inputs);
}

impl Bench for Cpu {
    type Inputs = (Array4<f32>, Array4<f32>, Array4<f32>);

    fn prepare(&self, q: &Array4<f32>, k: &Array4<f32>, v: &Array4<f32>) -> Self::Inputs {
        (q.clone(), k.clone(), v.clone())
    }

    fn forward<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        (q, k, v): &Self::Inputs,
    ) {
        self.try_forward_with(spec, mods, q.view(), k.view(), v.view())
            .unwrap();
    }

    fn varlen(&self, spec: &AttentionSpec, packing: &Varlen, (q, k, v): &Self::Inputs) {
        self.try_forward_varlen(spec, packing, q.view(), k.view(), v.view())
            .unwrap();
    }
}

/// Device tensors and the output every call of one length writes into.
struct OnDevice {
    q: DeviceTensor<f32>,
    k: DeviceTensor<f32>,
    v: DeviceTensor<f32>,
    out: RefCell<DeviceOutput<f32>>,
}

impl Bench for CubeDevice {
    type Inputs = OnDevice;

    fn prepare(&self, q: &Array4<f32>, k: &Array4<f32>, v: &Array4<f32>) -> OnDevice {
        let spec = *Gqa::<HQ, HKV, D>::new().spec();
        let (batch, _, seq_q, _) = q.dim();
        OnDevice {
            q: self.try_upload(q.view()).unwrap(),
            k: self.try_upload(k.view()).unwrap(),
            v: self.try_upload(v.view()).unwrap(),
            out: RefCell::new(self.try_forward_output(&spec, batch, seq_q).unwrap()),
        }
    }

    fn forward<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        x: &OnDevice,
    ) {
        self.try_forward_into_with(spec, mods, &x.q, &x.k, &x.v, &mut x.out.borrow_mut())
            .unwrap();
        self.try_sync().unwrap();
    }

    fn varlen(&self, spec: &AttentionSpec, packing: &Varlen, x: &OnDevice) {
        self.try_forward_varlen_into(spec, packing, &x.q, &x.k, &x.v, &mut x.out.borrow_mut())
            .unwrap();
        self.try_sync().unwrap();
    }
}

fn rows<B: Bench>(label: &str, backend: &B, runs: usize) {
    let spec = *Gqa::<HQ, HKV, D>::new().spec();
    let causal_spec = spec.with_mask(gqa::Mask::NONE.causal());
    let none = Mods::none();

    // 1. Zero cost.
    let n = env_usize("GQA_DSL_CAUSAL", 2048);
    let (q, k, v) = inputs(n);
    let x = backend.prepare(&q, &k, &v);
    let dsl = Mods::new(library::causal(), NoScore);
    let banded = Mods::new(library::causal(), NoScore).with_classifier(Band::causal());
    let (built_in, written, classified) = alternate3(
        runs,
        || backend.forward(&causal_spec, &none, &x),
        || backend.forward(&spec, &dsl, &x),
        || backend.forward(&spec, &banded, &x),
    );
    drop(x);
    println!(
        "{label:5} causal L{n}: built-in {:8.1} ms, DSL {:8.1} ms, DSL / built-in {:.3}; with its classifier (Band::causal) {:8.1} ms, {:.3} (target <= 1.03)",
        built_in * 1e3,
        written * 1e3,
        written / built_in,
        classified * 1e3,
        classified / built_in
    );

    // 2. Sparsity.
    let n = env_usize("GQA_DSL_TOKENS", 8192);
    let (q, k, v) = inputs(n);
    let x = backend.prepare(&q, &k, &v);
    drop((q, k, v));
    let doc = documents(n);
    let mods = Mods::new(library::document(Aux::new(doc.clone())), NoScore)
        .with_classifier(SortedDocuments::new(&doc));
    let (t_causal, t_doc) = alternate(
        runs,
        || backend.forward(&causal_spec, &none, &x),
        || backend.forward(&causal_spec, &mods, &x),
    );
    let flops = |pairs: f64| pairs * (HQ * 4 * D) as f64;
    let causal_pairs = (n * (n + 1) / 2) as f64;
    let doc_pairs = visible_pairs(&doc);
    let (rate_causal, rate_doc) = (flops(causal_pairs) / t_causal, flops(doc_pairs) / t_doc);
    println!(
        "{label:5} 8 documents in L{n}: causal {:8.1} ms ({:.1} GFLOP/s visible), documents {:8.1} ms ({:.1} GFLOP/s visible, {:.1}% of causal's pairs), ratio {:.3} (target >= 0.8)",
        t_causal * 1e3,
        rate_causal / 1e9,
        t_doc * 1e3,
        rate_doc / 1e9,
        100.0 * doc_pairs / causal_pairs,
        rate_doc / rate_causal
    );

    // 2b. Varlen prefill of the same documents, packed with their offsets.
    let mut lengths = vec![0usize; 8];
    doc.iter().for_each(|&d| lengths[d as usize] += 1);
    let packing = Varlen::from_lengths(&lengths);
    let (t_causal, t_varlen) = alternate(
        runs,
        || backend.forward(&causal_spec, &none, &x),
        || backend.varlen(&causal_spec, &packing, &x),
    );
    let (rate_causal, rate_varlen) = (flops(causal_pairs) / t_causal, flops(doc_pairs) / t_varlen);
    println!(
        "{label:5} varlen, the same 8 documents: causal {:8.1} ms ({:.1} GFLOP/s visible), varlen {:8.1} ms ({:.1} GFLOP/s visible), ratio {:.3} (target >= 0.9)",
        t_causal * 1e3,
        rate_causal / 1e9,
        t_varlen * 1e3,
        rate_varlen / 1e9,
        rate_varlen / rate_causal
    );
}

/// A mod this process has never launched: its first launch compiles it.
#[gqa::mask_mod]
fn fresh_mask(period: i32, at: Position) -> bool {
    (at.q - at.k) % period != 1 && at.k <= at.q + at.seq_k - at.seq_q
}

fn main() {
    let runs = env_usize("GQA_BENCH_RUNS", 3);
    let only = std::env::var("GQA_DSL_ONLY").ok();
    if only.as_deref() != Some("cube") {
        rows("cpu", &Cpu::new(), runs);
    }
    if only.as_deref() == Some("cpu") {
        return;
    }
    let device = match CubeDevice::try_default() {
        Ok(device) => device.untuned(),
        Err(error) => {
            println!("no GPU device: {error}");
            return;
        }
    };
    println!("cube device: {}", device.name());
    rows("cube", &device, runs);

    // 3. Compile cost.
    let spec: AttentionSpec = *Gqa::<HQ, HKV, D>::new().spec();
    let (q, k, v) = inputs(256);
    let mods = Mods::new(fresh_mask(3), NoScore);
    let t = Instant::now();
    device
        .try_forward_with(&spec, &mods, q.view(), k.view(), v.view())
        .unwrap();
    let first = t.elapsed().as_secs_f64();
    let t = Instant::now();
    device
        .try_forward_with(&spec, &mods, q.view(), k.view(), v.view())
        .unwrap();
    let second = t.elapsed().as_secs_f64();
    println!(
        "cube  first launch of a new mod (32/8/128, L256): {:.2} s, second {:.3} s: compile ≈ {:.2} s",
        first,
        second,
        first - second
    );
}
