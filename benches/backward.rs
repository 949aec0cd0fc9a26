//! The backward's costs, as ratios within one run: `cargo bench --bench backward`.
//!
//! Causal GQA 32/8/128 in f32, batch 1, at `GQA_BACKWARD_LENGTHS` tokens (default 1024,4096):
//!
//! 1. **Backward over forward.** The backward (from the forward's saved output, as training
//!    runs it) against the forward on the same inputs: FlashAttention-2's ratio is about 2.5.
//!    On the device, also the backward with the opt-in `dS` stage
//!    (`CubeDevice::with_backward_stage_bytes`, 256 MiB) against the default one.
//! 2. **GQA over MHA.** The same problem run as MHA on K/V repeated over each group (what a
//!    library without a native GQA backward computes), whose `dK`, `dV` are then summed over
//!    each group — against the native GQA backward; with the largest difference between the
//!    two results printed (they are the same gradients). The repeat and the group sum are not
//!    timed: the ratio is the backward alone. On the CPU, also both against a GEMM ceiling
//!    timed in turn with them: the backward's FLOPs (five products over the visible pairs)
//!    at the speed of the `gemm` crate's `[L, D] × [D, L]` per query head on the same
//!    threads. Both run the same FLOPs, so GQA over MHA cannot exceed MHA's time over the
//!    ceiling's: what is left for the K/V reuse to win.
//! 3. **Sparsity.** The backward under a causal document mask over 8 packed documents of
//!    `GQA_BACKWARD_DOC_TOKENS` tokens in all (default 2048; lengths in the ratio 1:2:…:8, the
//!    sorted documents' classifier, as `benches/dsl.rs` has them) against the causal backward
//!    over the same tokens, as visible pairs per second: the block mask's skipped tiles made
//!    visible (no target in the issue; the forward's is 0.8).
//!
//! Both rows run on the CPU and then on the GPU device `CubeDevice::try_default` finds (the
//! forward untuned, as in the kernel suites), at `GQA_BACKWARD_CUBE_LENGTHS` there (default the
//! same lengths; lavapipe is slow); `GQA_BACKWARD_ONLY=cpu|cube` runs one side. On the device
//! the calls are the device-tensor ones (`try_forward_into`, `try_backward_into_with`) followed
//! by a sync: inputs stay uploaded, outputs and gradients are allocated before the timed calls,
//! nothing is copied inside them.
//! Timings: median of `GQA_BENCH_RUNS` (default 3) after one untimed call, the compared calls
//! alternating. Inputs, forward outputs and repeated K/V are made before the timed calls.

use gqa::backend::Backward;
use gqa::cpu::Cpu;
use gqa::cube::{CubeDevice, DeviceGradients};
use gqa::dsl::block::SortedDocuments;
use gqa::dsl::{Aux, Mods, NoScore, library};
use gqa::{AttentionSpec, Gqa, Mha};
use ndarray::{Array4, Axis, s};

mod common;
use common::{alternate, alternate3, ceiling, documents, env_list, env_usize, visible_pairs};

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

fn tensor(shape: (usize, usize, usize, usize), salt: usize) -> Array4<f32> {
    Array4::from_shape_fn(shape, |(_, h, i, d)| {
        (((h * 31 + i * 17 + d * 7 + salt) % 23) as f32 - 11.0) / 23.0
    })
}

/// `x` with each head repeated `group` times: `[B, H, L, D] → [B, H·group, L, D]`.
fn repeat(x: &Array4<f32>, group: usize) -> Array4<f32> {
    let heads: Vec<_> = x
        .axis_iter(Axis(1))
        .flat_map(|h| std::iter::repeat_n(h, group))
        .collect();
    ndarray::stack(Axis(1), &heads).expect("equal heads")
}

/// `x` summed over consecutive groups of `group` heads.
fn sum_groups(x: &Array4<f32>, group: usize) -> Array4<f32> {
    let sh = x.shape();
    let mut out = Array4::zeros((sh[0], sh[1] / group, sh[2], sh[3]));
    for (h, head) in x.axis_iter(Axis(1)).enumerate() {
        let mut dst = out.slice_mut(s![.., h / group, .., ..]);
        dst += &head;
    }
    out
}

fn max_diff(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// The causal document mask of benches/dsl.rs over `n` tokens.
fn document_mods(n: usize) -> (Vec<i32>, Mods<gqa::dsl::library::Document, NoScore>) {
    let doc = documents(n);
    let mods = Mods::new(library::document(Aux::new(doc.clone())), NoScore)
        .with_classifier(SortedDocuments::new(&doc));
    (doc, mods)
}

fn print_documents(label: &str, n: usize, doc: &[i32], t_causal: f64, t_doc: f64) {
    let causal_pairs = (n * (n + 1) / 2) as f64;
    let doc_pairs = visible_pairs(doc);
    println!(
        "{label:5} L{n}, 8 documents: causal backward {:8.1} ms, document-masked backward {:8.1} ms ({:.1}% of causal's pairs); visible pairs per second, documents / causal {:.3}",
        t_causal * 1e3,
        t_doc * 1e3,
        100.0 * doc_pairs / causal_pairs,
        (doc_pairs / t_doc) / (causal_pairs / t_causal)
    );
}

fn cpu_rows(runs: usize) {
    let cpu = Cpu::new();
    println!(
        "backward, causal {HQ}/{HKV}/{D} f32, batch 1, {} CPU threads",
        cpu.threads()
    );
    for n in env_list("GQA_BACKWARD_LENGTHS", &[1024, 4096]) {
        let gqa: AttentionSpec = *Gqa::<HQ, HKV, D>::new().causal().spec();
        let mha: AttentionSpec = *Mha::<HQ, D>::new().causal().spec();
        let group = HQ / HKV;
        let (q, k, v) = (
            tensor((1, HQ, n, D), 1),
            tensor((1, HKV, n, D), 2),
            tensor((1, HKV, n, D), 3),
        );
        let d_o = tensor((1, HQ, n, D), 4);
        let forward = cpu.try_forward(&gqa, q.view(), k.view(), v.view()).unwrap();
        let backward = || {
            cpu.try_backward(&gqa, [q.view(), k.view(), v.view()], &forward, d_o.view())
                .unwrap()
        };
        let (t_forward, t_backward) = alternate(
            runs,
            || {
                cpu.try_forward(&gqa, q.view(), k.view(), v.view()).unwrap();
            },
            || {
                backward();
            },
        );
        println!(
            "cpu   L{n}: forward {:8.1} ms, backward {:8.1} ms, backward / forward {:.2} (target <= 2.5)",
            t_forward * 1e3,
            t_backward * 1e3,
            t_backward / t_forward
        );

        let (k_rep, v_rep) = (repeat(&k, group), repeat(&v, group));
        let forward_mha = cpu
            .try_forward(&mha, q.view(), k_rep.view(), v_rep.view())
            .unwrap();
        let backward_mha = || {
            let inputs = [q.view(), k_rep.view(), v_rep.view()];
            cpu.try_backward(&mha, inputs, &forward_mha, d_o.view())
                .unwrap()
        };
        // The ceiling: the causal backward's five products over the visible pairs,
        // 5 · 2·HQ·D·L(L+1)/2 FLOPs, at the speed of HQ GEMMs [L, D] × [D, L] (2·HQ·L²·D).
        let mut out: Vec<Vec<f32>> = (0..cpu.threads()).map(|_| vec![0.0f32; n * n]).collect();
        let (t_mha, t_gqa, t_gemm) = alternate3(
            runs,
            || {
                backward_mha();
            },
            || {
                backward();
            },
            || ceiling::qk_products(&q, &k, &mut out),
        );
        let t_ceiling = t_gemm * 5.0 * (n + 1) as f64 / (2 * n) as f64;
        let (ours, theirs) = (backward(), backward_mha());
        let diff = [
            max_diff(&ours.dq, &theirs.dq),
            max_diff(&ours.dk, &sum_groups(&theirs.dk, group)),
            max_diff(&ours.dv, &sum_groups(&theirs.dv, group)),
        ];
        let scale = ours
            .dk
            .iter()
            .chain(&ours.dv)
            .fold(0.0f32, |m, x| m.max(x.abs()));
        println!(
            "cpu   L{n}: MHA backward on repeated K/V {:8.1} ms, GQA backward {:8.1} ms, speedup {:.2} (target >= 1.3); \
             largest difference dq {:.1e} dk {:.1e} dv {:.1e} (of gradients up to {:.1e})",
            t_mha * 1e3,
            t_gqa * 1e3,
            t_mha / t_gqa,
            diff[0],
            diff[1],
            diff[2],
            scale
        );
        println!(
            "cpu   L{n}: the backward's FLOPs at GEMM speed {:8.1} ms; GQA backward at {:.2} of it, MHA at {:.2}: \
             GQA over MHA can reach at most {:.2} while the FLOPs are the same",
            t_ceiling * 1e3,
            t_ceiling / t_gqa,
            t_ceiling / t_mha,
            t_mha / t_ceiling
        );
    }

    // 3. The document mask's backward against the causal one.
    let n = env_usize("GQA_BACKWARD_DOC_TOKENS", 2048);
    let spec: AttentionSpec = *Gqa::<HQ, HKV, D>::new().causal().spec();
    let (q, k, v, d_o) = (
        tensor((1, HQ, n, D), 1),
        tensor((1, HKV, n, D), 2),
        tensor((1, HKV, n, D), 3),
        tensor((1, HQ, n, D), 4),
    );
    let (doc, mods) = document_mods(n);
    let inputs = [q.view(), k.view(), v.view()];
    let causal = cpu
        .try_forward(&spec, q.view(), k.view(), v.view())
        .unwrap();
    let masked = cpu
        .try_forward_with(&spec, &mods, q.view(), k.view(), v.view())
        .unwrap();
    let (t_causal, t_doc) = alternate(
        runs,
        || {
            cpu.try_backward(&spec, inputs, &causal, d_o.view())
                .unwrap();
        },
        || {
            cpu.try_backward_with(&spec, &mods, inputs, &masked, d_o.view(), None)
                .unwrap();
        },
    );
    print_documents("cpu", n, &doc, t_causal, t_doc);
}

/// The two rows on the device, from device tensors.
fn cube_rows(device: &CubeDevice, staged: &CubeDevice, runs: usize) {
    println!(
        "backward, causal {HQ}/{HKV}/{D} f32, batch 1, on {}",
        device.name()
    );
    let lengths = env_list(
        "GQA_BACKWARD_CUBE_LENGTHS",
        &env_list("GQA_BACKWARD_LENGTHS", &[1024, 4096]),
    );
    for n in lengths {
        let gqa: AttentionSpec = *Gqa::<HQ, HKV, D>::new().causal().spec();
        let mha: AttentionSpec = *Mha::<HQ, D>::new().causal().spec();
        let group = HQ / HKV;
        let (k, v) = (tensor((1, HKV, n, D), 2), tensor((1, HKV, n, D), 3));
        let up = |x: &Array4<f32>| device.try_upload(x.view()).unwrap();
        let (q, d_o) = (up(&tensor((1, HQ, n, D), 1)), up(&tensor((1, HQ, n, D), 4)));
        let (kd, vd) = (up(&k), up(&v));
        let (k_rep, v_rep) = (up(&repeat(&k, group)), up(&repeat(&v, group)));
        let forward_of = |spec: &AttentionSpec, k, v| {
            let mut out = device.try_forward_output::<f32>(spec, 1, n).unwrap();
            device.try_forward_into(spec, &q, k, v, &mut out).unwrap();
            out
        };
        let (saved, saved_mha) = (forward_of(&gqa, &kd, &vd), forward_of(&mha, &k_rep, &v_rep));
        let mut out = device.try_forward_output::<f32>(&gqa, 1, n).unwrap();
        let gradients = |spec: &AttentionSpec| device.try_gradients::<f32>(spec, 1, n, n).unwrap();
        let (mut g_gqa, mut g_mha) = (gradients(&gqa), gradients(&mha));
        let backward = |spec: &AttentionSpec, k, v, saved, grads: &mut DeviceGradients<f32>| {
            device
                .try_backward_into_with(spec, &Mods::none(), [&q, k, v], saved, &d_o, None, grads)
                .unwrap();
            device.try_sync().unwrap();
        };
        let (t_forward, t_backward) = alternate(
            runs,
            || {
                device
                    .try_forward_into(&gqa, &q, &kd, &vd, &mut out)
                    .unwrap();
                device.try_sync().unwrap();
            },
            || backward(&gqa, &kd, &vd, &saved, &mut g_gqa),
        );
        println!(
            "cube  L{n}: forward {:8.1} ms, backward {:8.1} ms, backward / forward {:.2} (target <= 2.5)",
            t_forward * 1e3,
            t_backward * 1e3,
            t_backward / t_forward
        );
        // The staged device's own copies (a device's tensors are its own).
        let put = |x: &Array4<f32>| staged.try_upload(x.view()).unwrap();
        let (q_s, d_o_s) = (
            put(&tensor((1, HQ, n, D), 1)),
            put(&tensor((1, HQ, n, D), 4)),
        );
        let (k_s, v_s) = (put(&k), put(&v));
        let mut saved_s = staged.try_forward_output::<f32>(&gqa, 1, n).unwrap();
        staged
            .try_forward_into(&gqa, &q_s, &k_s, &v_s, &mut saved_s)
            .unwrap();
        let mut g_staged = staged.try_gradients::<f32>(&gqa, 1, n, n).unwrap();
        let (t_default, t_staged) = alternate(
            runs,
            || backward(&gqa, &kd, &vd, &saved, &mut g_gqa),
            || {
                let inputs = [&q_s, &k_s, &v_s];
                staged
                    .try_backward_into_with(
                        &gqa,
                        &Mods::none(),
                        inputs,
                        &saved_s,
                        &d_o_s,
                        None,
                        &mut g_staged,
                    )
                    .unwrap();
                staged.try_sync().unwrap();
            },
        );
        println!(
            "cube  L{n}: backward {:8.1} ms, with the dS stage ({} MiB) {:8.1} ms, staged / default {:.2}, staged backward / forward {:.2}",
            t_default * 1e3,
            staged.backward_stage_bytes() >> 20,
            t_staged * 1e3,
            t_staged / t_default,
            t_staged / t_forward
        );
        let (t_mha, t_gqa) = alternate(
            runs,
            || backward(&mha, &k_rep, &v_rep, &saved_mha, &mut g_mha),
            || backward(&gqa, &kd, &vd, &saved, &mut g_gqa),
        );
        let down = |x: &gqa::cube::DeviceTensor<f32>| -> Array4<f32> {
            device
                .try_download(x)
                .unwrap()
                .into_dimensionality()
                .unwrap()
        };
        let (ours, theirs) = (&g_gqa, &g_mha);
        let diff = [
            max_diff(&down(&ours.dq), &down(&theirs.dq)),
            max_diff(&down(&ours.dk), &sum_groups(&down(&theirs.dk), group)),
            max_diff(&down(&ours.dv), &sum_groups(&down(&theirs.dv), group)),
        ];
        println!(
            "cube  L{n}: MHA backward on repeated K/V {:8.1} ms, GQA backward {:8.1} ms, speedup {:.2} (target >= 1.3); \
             largest difference dq {:.1e} dk {:.1e} dv {:.1e}",
            t_mha * 1e3,
            t_gqa * 1e3,
            t_mha / t_gqa,
            diff[0],
            diff[1],
            diff[2],
        );
    }

    // 3. The document mask's backward against the causal one.
    let n = env_usize("GQA_BACKWARD_DOC_TOKENS", 2048);
    let spec: AttentionSpec = *Gqa::<HQ, HKV, D>::new().causal().spec();
    let up = |x: &Array4<f32>| device.try_upload(x.view()).unwrap();
    let (q, k, v, d_o) = (
        up(&tensor((1, HQ, n, D), 1)),
        up(&tensor((1, HKV, n, D), 2)),
        up(&tensor((1, HKV, n, D), 3)),
        up(&tensor((1, HQ, n, D), 4)),
    );
    let (doc, mods) = document_mods(n);
    let causal = device.try_forward_device(&spec, &q, &k, &v).unwrap();
    let masked = device
        .try_forward_device_with(&spec, &mods, &q, &k, &v)
        .unwrap();
    let (mut g_causal, mut g_doc) = (
        device.try_gradients::<f32>(&spec, 1, n, n).unwrap(),
        device.try_gradients::<f32>(&spec, 1, n, n).unwrap(),
    );
    let (t_causal, t_doc) = alternate(
        runs,
        || {
            device
                .try_backward_into_with(
                    &spec,
                    &Mods::none(),
                    [&q, &k, &v],
                    &causal,
                    &d_o,
                    None,
                    &mut g_causal,
                )
                .unwrap();
            device.try_sync().unwrap();
        },
        || {
            device
                .try_backward_into_with(&spec, &mods, [&q, &k, &v], &masked, &d_o, None, &mut g_doc)
                .unwrap();
            device.try_sync().unwrap();
        },
    );
    print_documents("cube", n, &doc, t_causal, t_doc);
}

fn main() {
    let runs = env_usize("GQA_BENCH_RUNS", 3);
    let only = std::env::var("GQA_BACKWARD_ONLY").ok();
    if only.as_deref() != Some("cube") {
        cpu_rows(runs);
    }
    if only.as_deref() == Some("cpu") {
        return;
    }
    match CubeDevice::try_default() {
        Ok(device) => {
            // The same device with the opt-in `dS` stage, at 256 MiB (the 32-head problem at
            // 4096 tokens in 8 chunks of query rows).
            let staged = CubeDevice::try_default()
                .expect("the device opened twice")
                .untuned()
                .with_backward_stage_bytes(256 << 20);
            cube_rows(&device.untuned(), &staged, runs)
        }
        Err(error) => println!("no GPU device: {error}"),
    }
}
