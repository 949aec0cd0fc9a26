//! Attention layers: the MHA → GQA conversion's laws (identity, group means, exactness on
//! identical heads), Hugging Face checkpoints (bit-exact round trips in f32, f16 and bf16;
//! bad files as typed errors naming the tensor), `gqa::dispatch!`, and real models'
//! `config.json` files (`tests/fixtures/configs/`).

#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use common::runner;
use gqa::heads::{Rule, Supported};
use gqa::layer::checkpoint::{self, CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE};
use gqa::layer::{AttentionLayer, KvInit, Linear, MhaLayer};
use gqa::{Attention, DType, Error, ModelConfig};
use half::{bf16, f16};
use ndarray::{Array1, Array2, Array3, Axis, s};
use proptest::prelude::*;
use serde_json::json;

fn cases() -> u32 {
    runner::env_count("PROPTEST_CASES", 256).min(64)
}

/// A matrix of values in `±1`, reproducible from `rng`.
fn matrix(rng: &mut fastrand::Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || rng.f32() * 2.0 - 1.0)
}

/// A layer with every weight and bias drawn from `seed`; biases on the projections `biased`
/// names (`[q, k, v, o]`).
fn layer<const HQ: usize, const HKV: usize, const D: usize>(
    hidden: usize,
    seed: u64,
    biased: [bool; 4],
) -> AttentionLayer<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut map = |rows: usize, cols: usize, bias: bool| {
        let weight = matrix(&mut rng, rows, cols);
        let bias = bias.then(|| Array1::from_shape_simple_fn(rows, || rng.f32() - 0.5));
        Linear::try_new(weight, bias).unwrap()
    };
    let q = map(HQ * D, hidden, biased[0]);
    let k = map(HKV * D, hidden, biased[1]);
    let v = map(HKV * D, hidden, biased[2]);
    let o = map(hidden, HQ * D, biased[3]);
    AttentionLayer::try_new(q, k, v, o).unwrap()
}

/// Bitwise equality of two `f32` arrays, with the first difference in the message.
fn same_bits(what: &str, a: ndarray::ArrayViewD<f32>, b: ndarray::ArrayViewD<f32>) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes");
    if let Some((i, (x, y))) = a
        .iter()
        .zip(b.iter())
        .enumerate()
        .find(|(_, (x, y))| x.to_bits() != y.to_bits())
    {
        panic!("{what}: element {i} differs: {x} vs {y}");
    }
}

fn same_layer<const HQ: usize, const HKV: usize, const D: usize>(
    what: &str,
    a: &AttentionLayer<HQ, HKV, D>,
    b: &AttentionLayer<HQ, HKV, D>,
) where
    Rule: Supported<HQ, HKV, D>,
{
    for (name, x, y) in [
        ("q_proj", a.q_proj(), b.q_proj()),
        ("k_proj", a.k_proj(), b.k_proj()),
        ("v_proj", a.v_proj(), b.v_proj()),
        ("o_proj", a.o_proj(), b.o_proj()),
    ] {
        same_bits(
            &format!("{what}: {name}.weight"),
            x.weight().into_dyn(),
            y.weight().into_dyn(),
        );
        match (x.bias(), y.bias()) {
            (None, None) => {}
            (Some(p), Some(q)) => {
                same_bits(&format!("{what}: {name}.bias"), p.into_dyn(), q.into_dyn())
            }
            (p, q) => panic!(
                "{what}: {name}.bias present {} vs {}",
                p.is_some(),
                q.is_some()
            ),
        }
    }
}

/// Runs `$body` with `G` bound to each KV-head count dividing 8: the conversion's const
/// parameter, for `MhaLayer<8, D>`.
macro_rules! for_each_divisor_of_8 {
    (|$G:ident| $body:block) => {{
        {
            const $G: usize = 1;
            $body
        }
        {
            const $G: usize = 2;
            $body
        }
        {
            const $G: usize = 4;
            $body
        }
        {
            const $G: usize = 8;
            $body
        }
    }};
}

properties! {
    cases = cases(), no_persist;

    /// Converting MHA into MHA (G = H) keeps every weight, by mean-pooling and by first head.
    fn mha_to_mha_is_the_identity(hidden in 1..40usize, seed in any::<u64>(), biased in any::<[bool; 4]>()) {
        let mha = layer::<8, 8, 4>(hidden, seed, biased);
        same_layer("mean-pool", &mha.to_gqa::<8>(KvInit::MeanPool), &mha);
        same_layer("first head", &mha.to_gqa::<8>(KvInit::FirstHead), &mha);
    }

    /// Each pooled key/value head is its group's mean (weights and biases), "first head" its
    /// group's first head, and the query and output projections are untouched — restated here
    /// element by element, with query head `h` in group `h / (8 / G)`.
    fn pooled_heads_are_the_group_means(hidden in 1..24usize, seed in any::<u64>(), biased in any::<[bool; 4]>()) {
        const D: usize = 3;
        let mha = layer::<8, 8, D>(hidden, seed, biased);
        for_each_divisor_of_8!(|G| {
            let pooled = mha.to_gqa::<G>(KvInit::MeanPool);
            let first = mha.to_gqa::<G>(KvInit::FirstHead);
            let group = 8 / G;
            for (name, old, new, new_first) in [
                ("k_proj", mha.k_proj(), pooled.k_proj(), first.k_proj()),
                ("v_proj", mha.v_proj(), pooled.v_proj(), first.v_proj()),
            ] {
                prop_assert_eq!(new.weight().dim(), (G * D, hidden));
                for j in 0..G {
                    for d in 0..D {
                        let rows: Vec<usize> = (0..group).map(|m| (j * group + m) * D + d).collect();
                        for c in 0..hidden {
                            let mean = rows.iter().map(|&r| f64::from(old.weight()[[r, c]])).sum::<f64>() / group as f64;
                            prop_assert_eq!(new.weight()[[j * D + d, c]], mean as f32, "{} G={} ({}, {}, {})", name, G, j, d, c);
                            prop_assert_eq!(new_first.weight()[[j * D + d, c]], old.weight()[[rows[0], c]]);
                        }
                        if let (Some(ob), Some(nb), Some(fb)) = (old.bias(), new.bias(), new_first.bias()) {
                            let mean = rows.iter().map(|&r| f64::from(ob[r])).sum::<f64>() / group as f64;
                            prop_assert_eq!(nb[j * D + d], mean as f32);
                            prop_assert_eq!(fb[j * D + d], ob[rows[0]]);
                        } else {
                            prop_assert!(old.bias().is_none() && new.bias().is_none() && new_first.bias().is_none());
                        }
                    }
                }
            }
            for (x, y) in [(mha.q_proj(), pooled.q_proj()), (mha.o_proj(), pooled.o_proj())] {
                prop_assert_eq!(x, y);
            }
        });
    }

    /// An MHA layer whose key and value heads are identical within each group of G computes
    /// exactly (bit for bit, in the f64 oracle) what its mean-pooled GQA-G conversion computes,
    /// masks included; on the CPU backend the two agree to f32 rounding.
    fn identical_heads_within_groups_convert_exactly(
        hidden in 1..24usize,
        seed in any::<u64>(),
        biased in any::<[bool; 4]>(),
        (batch, seq) in (1..3usize, 1..12usize),
        causal in any::<bool>(),
    ) {
        const D: usize = 4;
        let base = layer::<8, 8, D>(hidden, seed, biased);
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
        let x = Array3::from_shape_simple_fn((batch, seq, hidden), || rng.f32() * 2.0 - 1.0);
        for_each_divisor_of_8!(|G| {
            let group = 8 / G;
            // Copy each group's first head over the others: rows [(j·group + m)·D ..][..D].
            let tie = |map: &Linear| {
                let mut weight = map.weight().to_owned();
                let mut bias = map.bias().map(|b| b.to_owned());
                for j in 0..G {
                    let first = weight.slice(s![j * group * D..(j * group + 1) * D, ..]).to_owned();
                    let first_bias = bias.as_ref().map(|b| b.slice(s![j * group * D..(j * group + 1) * D]).to_owned());
                    for m in 1..group {
                        let rows = (j * group + m) * D..(j * group + m + 1) * D;
                        weight.slice_mut(s![rows.clone(), ..]).assign(&first);
                        if let (Some(b), Some(fb)) = (bias.as_mut(), first_bias.as_ref()) {
                            b.slice_mut(s![rows]).assign(fb);
                        }
                    }
                }
                Linear::try_new(weight, bias).unwrap()
            };
            let [q, k, v, o] = base.clone().into_projections();
            let (k, v) = (tie(&k), tie(&v));
            let mha = MhaLayer::<8, D>::try_new(q, k, v, o).unwrap();
            let gqa = mha.to_gqa::<G>(KvInit::MeanPool);
            let (a_mha, a_gqa) = if causal {
                (Attention::<8, 8, D>::new().causal(), Attention::<8, G, D>::new().causal())
            } else {
                (Attention::<8, 8, D>::new(), Attention::<8, G, D>::new())
            };
            let exact_mha = mha.try_forward_oracle(&a_mha, x.view()).unwrap();
            let exact_gqa = gqa.try_forward_oracle(&a_gqa, x.view()).unwrap();
            if let Some(((at, p), q)) = exact_mha.indexed_iter().zip(exact_gqa.iter()).find(|((_, p), q)| p.to_bits() != q.to_bits()) {
                return Err(TestCaseError::fail(format!("G={G}: oracle outputs differ at {at:?}: {p} vs {q}")));
            }
            let cpu = gqa::cpu::Cpu::new();
            let y_mha = mha.try_forward(&a_mha, &cpu, x.view()).unwrap().y;
            let y_gqa = gqa.try_forward(&a_gqa, &cpu, x.view()).unwrap().y;
            for ((at, &p), &q) in y_mha.indexed_iter().zip(y_gqa.iter()) {
                let scale = exact_mha[at].abs().max(1.0);
                prop_assert!((p - q).abs() as f64 <= 1e-5 * scale, "G={}: CPU outputs at {:?}: {} vs {}", G, at, p, q);
            }
        });
    }

    /// Random initialisation: reproducible from its seed, fresh (not the pooled heads), in
    /// `±1/√hidden`, with a bias where the original had one; queries and outputs kept.
    fn random_init_is_reproducible_and_bounded(hidden in 1..24usize, seed in any::<u64>(), init_seed in any::<u64>(), biased in any::<[bool; 4]>()) {
        let mha = layer::<8, 8, 2>(hidden, seed, biased);
        let a = mha.to_gqa::<2>(KvInit::Random { seed: init_seed });
        let b = mha.to_gqa::<2>(KvInit::Random { seed: init_seed });
        prop_assert_eq!(&a, &b);
        let c = mha.to_gqa::<2>(KvInit::Random { seed: init_seed.wrapping_add(1) });
        prop_assert_ne!(a.k_proj(), c.k_proj());
        let pooled = mha.to_gqa::<2>(KvInit::MeanPool);
        prop_assert_ne!(a.k_proj(), pooled.k_proj());
        let bound = 1.0 / (hidden as f32).sqrt();
        for map in [a.k_proj(), a.v_proj()] {
            prop_assert!(map.weight().iter().chain(map.bias().into_iter().flatten()).all(|w| w.abs() <= bound));
        }
        prop_assert_eq!(a.k_proj().bias().is_some(), biased[1]);
        prop_assert_eq!(a.v_proj().bias().is_some(), biased[2]);
        prop_assert_eq!(a.q_proj(), mha.q_proj());
        prop_assert_eq!(a.o_proj(), mha.o_proj());
    }
}

/// `map + eps · dir`, weights and bias.
fn nudged(map: &Linear, dir: &Linear, eps: f32) -> Linear {
    Linear::try_new(
        &map.weight() + &(&dir.weight() * eps),
        map.bias().map(|b| &b + &(&dir.bias().unwrap() * eps)),
    )
    .unwrap()
}

/// `⟨a, b⟩` in f64.
fn dot(a: impl IntoIterator<Item = f32>, b: impl IntoIterator<Item = f32>) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| f64::from(x) * f64::from(y))
        .sum()
}

properties! {
    cases = cases().min(32), no_persist;

    /// The layer's gradients (CPU backward, projections by hand) against the central difference
    /// of `L = ⟨G, y⟩` computed by the f64 oracle, along a random direction in every parameter
    /// and the input: `⟨∇L, R⟩` within 1e-3 of the sum of the terms' magnitudes.
    fn layer_gradients_match_finite_differences(
        seed in any::<u64>(),
        biased in any::<[bool; 4]>(),
        (batch, seq, hidden) in (1..3usize, 1..7usize, 1..9usize),
        causal in any::<bool>(),
    ) {
        let dir = layer::<4, 2, 3>(hidden, seed ^ 0xd1, biased);
        let layer = layer::<4, 2, 3>(hidden, seed, biased);
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x9);
        let mut draw = |shape: (usize, usize, usize)| Array3::from_shape_simple_fn(shape, || rng.f32() * 2.0 - 1.0);
        let (x, dx_dir, g) = (draw((batch, seq, hidden)), draw((batch, seq, hidden)), draw((batch, seq, hidden)));
        let attention = if causal { Attention::<4, 2, 3>::new().causal() } else { Attention::<4, 2, 3>::new() };
        let cpu = gqa::cpu::Cpu::new();
        let out = layer.try_forward(&attention, &cpu, x.view()).unwrap();
        let grads = layer.try_backward(&attention, &cpu, x.view(), &out, g.view()).unwrap();
        let pairs = [
            (&grads.q_proj, dir.q_proj()),
            (&grads.k_proj, dir.k_proj()),
            (&grads.v_proj, dir.v_proj()),
            (&grads.o_proj, dir.o_proj()),
        ];
        let mut terms: Vec<f64> = pairs.iter().flat_map(|(grad, d)| {
            let w = dot(grad.weight.iter().copied(), d.weight().iter().copied());
            let b = match (&grad.bias, d.bias()) {
                (Some(gb), Some(db)) => dot(gb.iter().copied(), db.iter().copied()),
                (None, None) => 0.0,
                _ => panic!("a bias gradient exactly where the map has a bias"),
            };
            [w, b]
        }).collect();
        terms.push(dot(grads.x.iter().copied(), dx_dir.iter().copied()));
        let analytic: f64 = terms.iter().sum();
        let loss = |eps: f32| {
            let [q, k, v, o] = [
                (layer.q_proj(), dir.q_proj()),
                (layer.k_proj(), dir.k_proj()),
                (layer.v_proj(), dir.v_proj()),
                (layer.o_proj(), dir.o_proj()),
            ].map(|(m, d)| nudged(m, d, eps));
            let moved = AttentionLayer::<4, 2, 3>::try_new(q, k, v, o).unwrap();
            let x = &x + &(&dx_dir * eps);
            let y = moved.try_forward_oracle(&attention, x.view()).unwrap();
            y.iter().zip(g.iter()).map(|(a, &b)| a * f64::from(b)).sum::<f64>()
        };
        let eps = 1e-3;
        let numeric = (loss(eps) - loss(-eps)) / (2.0 * f64::from(eps));
        let scale: f64 = terms.iter().map(|t| t.abs()).sum();
        prop_assert!(
            (analytic - numeric).abs() <= 1e-3 * scale + 1e-6,
            "analytic {analytic} vs central difference {numeric} (terms {terms:?})"
        );
    }
}

/// Decoding a sequence token by token against a paged f32 KV cache gives each token the output
/// the causal forward gives it, and the cache then holds the forward's keys and values.
#[test]
fn decode_steps_equal_the_causal_forward() {
    use gqa::cache::{Float32, Layout};
    let layer = layer::<4, 2, 3>(10, 77, [true, true, false, true]);
    let attention = Attention::<4, 2, 3>::new().causal();
    let cpu = gqa::cpu::Cpu::new();
    let mut rng = fastrand::Rng::with_seed(78);
    let x = Array3::from_shape_simple_fn((1, 9, 10), || rng.f32() * 2.0 - 1.0);
    let forward = layer.try_forward(&attention, &cpu, x.view()).unwrap();
    let mut cache = attention
        .try_new_cache::<Float32>(Layout::Paged {
            page_size: 4,
            pages: 3,
        })
        .unwrap();
    let seq = cache.try_add_sequence().unwrap();
    for t in 0..9 {
        let y = layer
            .try_decode_cpu(&attention, &cpu, &mut cache, seq, x.slice(s![0, t, ..]))
            .unwrap();
        let want = forward.y.slice(s![0, t, ..]);
        let worst = y
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "token {t}: decode and forward differ by {worst}"
        );
    }
    let (keys, values) = cache.read(seq).unwrap();
    for (name, cached, forward) in [("keys", keys, &forward.k), ("values", values, &forward.v)] {
        same_bits(
            name,
            cached.view().into_dyn(),
            forward.index_axis(Axis(0), 0).into_dyn(),
        );
    }
}

/// A tensor's shape and bytes.
type Raw = (Vec<usize>, Vec<u8>);

/// A two-layer Llama-like model in bf16 (embeddings, attention with q/k/v biases as Qwen has,
/// an MLP weight, norms, a head), sharded in two files so that layer 1's attention spans both,
/// with an index, a tokenizer file and a stale PyTorch weight file beside it.
fn write_model(dir: &Path, config: &serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = fastrand::Rng::with_seed(31);
    let mut tensor = |shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| bf16::from_f32(rng.f32() * 2.0 - 1.0).to_le_bytes())
            .collect();
        (shape, bytes)
    };
    let mut all: Vec<(String, Raw)> = vec![
        ("model.embed_tokens.weight".into(), tensor(vec![50, 32])),
        ("model.norm.weight".into(), tensor(vec![32])),
        ("lm_head.weight".into(), tensor(vec![50, 32])),
    ];
    for i in 0..2 {
        let p = format!("model.layers.{i}.");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![32, 32]),
            ("self_attn.q_proj.bias", vec![32]),
            ("self_attn.k_proj.weight", vec![32, 32]),
            ("self_attn.k_proj.bias", vec![32]),
            ("self_attn.v_proj.weight", vec![32, 32]),
            ("self_attn.v_proj.bias", vec![32]),
            ("self_attn.o_proj.weight", vec![32, 32]),
            ("mlp.up_proj.weight", vec![64, 32]),
            ("input_layernorm.weight", vec![32]),
        ] {
            all.push((format!("{p}{name}"), tensor(shape)));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    // Shard 1 holds everything up to layer 1's k_proj; shard 2 the rest (layer 1's q_proj among them).
    let split = all
        .iter()
        .position(|(n, _)| n == "model.layers.1.self_attn.k_proj.weight")
        .unwrap()
        + 1;
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [&all[..split], &all[split..]].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", shard + 1);
        let views: Vec<_> = part
            .iter()
            .map(|(n, (shape, bytes))| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::BF16,
                        shape.clone(),
                        bytes,
                    )
                    .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for (n, _) in part {
            weight_map.insert(n.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\"}").unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"stale").unwrap();
}

/// Every tensor of the checkpoint in `dir`: name → (dtype, shape, bytes).
fn all_tensors(
    dir: &Path,
) -> std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            for (name, view) in safetensors::SafeTensors::deserialize(&bytes)
                .unwrap()
                .tensors()
            {
                out.insert(
                    name,
                    (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
                );
            }
        }
    }
    out
}

/// A whole sharded MHA model converted to GQA-2: its config says 2 KV heads (other fields
/// kept), every tensor but the attention layers' keys and values is copied bit for bit into
/// the same shard, each layer reads back as the layer-level conversion of the original (means
/// rounded to bf16; first head exactly), the index and the other files follow, and stale
/// PyTorch weights are left out. Random initialisation is reproducible. A model that is not
/// MHA, or whose key projection disagrees with its config, is a typed error.
#[test]
fn whole_checkpoints_convert_shard_by_shard() {
    let dir = scratch("model");
    let config = llama_like_config(4, 4, 32, "bfloat16");
    let src = dir.join("mha");
    write_model(&src, &config);
    let convert = |name: &str, init| {
        checkpoint::try_convert_checkpoint::<4, 2, 8>(&src, &dir.join(name), init)
    };
    let report = convert("mean", KvInit::MeanPool).unwrap();
    let prefixes = ["model.layers.0.self_attn.", "model.layers.1.self_attn."];
    assert_eq!(report.layers, prefixes);
    assert_eq!(report.copied, 3 + 2 * 5);
    assert_eq!(
        report.weight_files,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    assert_eq!(report.other_files, ["tokenizer.json"]);
    assert_eq!(report.left_out, ["pytorch_model.bin"]);
    let out = dir.join("mean");
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(src.join("tokenizer.json")).unwrap()
    );
    assert!(!out.join("pytorch_model.bin").exists());

    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(CONFIG_FILE)).unwrap()).unwrap();
    let mut expected = config.clone();
    expected["num_key_value_heads"] = json!(2);
    expected["head_dim"] = json!(8);
    assert_eq!(written, expected);

    let (before, after) = (all_tensors(&src), all_tensors(&out));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (name, (dtype, shape, bytes)) in &before {
        let (d, s, b) = &after[name];
        let pooled = name.contains("k_proj") || name.contains("v_proj");
        assert_eq!(d, dtype, "{name}");
        if pooled {
            assert_eq!(s[0], 16, "{name}");
        } else {
            assert_eq!((s, b), (shape, bytes), "{name} changed");
        }
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(INDEX_FILE)).unwrap()).unwrap();
    let source_index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["weight_map"], source_index["weight_map"]);
    let total: usize = after.values().map(|(_, _, b)| b.len()).sum();
    assert_eq!(index["metadata"]["total_size"], json!(total));
    for name in after.keys() {
        let file = index["weight_map"][name].as_str().unwrap();
        let bytes = std::fs::read(out.join(file)).unwrap();
        assert!(
            safetensors::SafeTensors::deserialize(&bytes)
                .unwrap()
                .tensor(name)
                .is_ok(),
            "{name} not in {file}"
        );
    }

    let first = convert("first", KvInit::FirstHead).unwrap();
    assert_eq!(first.layers, prefixes);
    for prefix in prefixes {
        let mha = checkpoint::try_read_layer::<4, 4, 8>(&src, prefix).unwrap();
        assert_eq!(mha.dtype, DType::BF16);
        let mean = checkpoint::try_read_layer::<4, 2, 8>(&out, prefix).unwrap();
        same_layer(
            prefix,
            &mean.layer,
            &rounded_layer(&mha.layer.to_gqa::<2>(KvInit::MeanPool), DType::BF16),
        );
        let first = checkpoint::try_read_layer::<4, 2, 8>(&dir.join("first"), prefix).unwrap();
        same_layer(
            prefix,
            &first.layer,
            &mha.layer.to_gqa::<2>(KvInit::FirstHead),
        );
    }

    convert("random-a", KvInit::Random { seed: 5 }).unwrap();
    convert("random-b", KvInit::Random { seed: 5 }).unwrap();
    convert("random-c", KvInit::Random { seed: 6 }).unwrap();
    let (a, b, c) = (
        all_tensors(&dir.join("random-a")),
        all_tensors(&dir.join("random-b")),
        all_tensors(&dir.join("random-c")),
    );
    assert_eq!(a, b);
    let k = "model.layers.0.self_attn.k_proj.weight";
    assert_ne!(a[k], c[k]);
    assert_ne!(a[k], after[k]);
    assert_ne!(a[k], a["model.layers.1.self_attn.k_proj.weight"]);

    // Never over the source: the tokenizer survives.
    let error =
        checkpoint::try_convert_checkpoint::<4, 2, 8>(&src, &src, KvInit::MeanPool).unwrap_err();
    assert!(matches!(error, Error::Checkpoint { .. }), "{error}");
    assert_eq!(
        std::fs::read(src.join("tokenizer.json")).unwrap(),
        br#"{"version": "1.0"}"#
    );
    // A single layer is not written beside a sharded index (readers would take the index).
    let error = checkpoint::try_write_layer(
        &out,
        prefixes[0],
        &checkpoint::try_read_layer::<4, 2, 8>(&out, prefixes[0])
            .unwrap()
            .layer,
        DType::BF16,
        &written,
    )
    .unwrap_err();
    assert!(
        matches!(&error, Error::Checkpoint { file, .. } if file.ends_with(INDEX_FILE)),
        "{error}"
    );

    // Fused projections (Phi-3's qkv_proj): refused, nothing written.
    let fused = dir.join("fused");
    write_raw(
        &fused,
        vec![(
            "model.layers.0.self_attn.qkv_proj.weight".into(),
            safetensors::Dtype::F32,
            vec![96, 32],
            vec![0; 96 * 32 * 4],
        )],
        &llama_like_config(4, 4, 32, "float32"),
    );
    let error =
        checkpoint::try_convert_checkpoint::<4, 2, 8>(&fused, &dir.join("z"), KvInit::MeanPool)
            .unwrap_err();
    assert!(error.to_string().contains("fused projections"), "{error}");
    assert!(!dir.join("z").exists());

    // Not MHA: a GQA model is not the source of a conversion (from MHA).
    let gqa_src = dir.join("gqa");
    write_model(&gqa_src, &llama_like_config(4, 2, 32, "bfloat16"));
    assert_eq!(
        checkpoint::try_convert_checkpoint::<4, 2, 8>(&gqa_src, &dir.join("x"), KvInit::MeanPool)
            .unwrap_err(),
        Error::ConfigMismatch {
            field: "kv_heads",
            expected: 4,
            found: 2
        }
    );
    // A config whose head dim (4: 4 heads · 4 = 16 rows) disagrees with the tensors' 32 rows.
    let wrong = dir.join("wrong");
    let mut config = llama_like_config(4, 4, 32, "bfloat16");
    config["head_dim"] = json!(4);
    write_model(&wrong, &config);
    match checkpoint::try_convert_checkpoint::<4, 2, 4>(&wrong, &dir.join("y"), KvInit::MeanPool)
        .unwrap_err()
    {
        Error::CheckpointTensor { tensor, reason, .. } => {
            assert_eq!(tensor, "model.layers.0.self_attn.q_proj.weight");
            assert!(
                reason.contains("has shape [32, 32], expected [16, 32]"),
                "{reason}"
            );
        }
        other => panic!("expected a tensor error, got {other}"),
    }
    assert!(
        !dir.join("y").exists(),
        "a refused conversion writes nothing"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A fresh directory under the target's temp folder, named after the test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gqa-layer-{}-{test}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const PREFIX: &str = "model.layers.3.self_attn.";

fn llama_like_config(
    heads: usize,
    kv_heads: usize,
    hidden: usize,
    dtype: &str,
) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": 4,
        "rope_theta": 500000.0,
        "torch_dtype": dtype,
        "vocab_size": 1000
    })
}

/// `x` rounded to `dtype` and back, by `half`.
fn rounded(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn rounded_layer<const HQ: usize, const HKV: usize, const D: usize>(
    layer: &AttentionLayer<HQ, HKV, D>,
    dtype: DType,
) -> AttentionLayer<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    let round = |map: &Linear| {
        Linear::try_new(
            map.weight().mapv(|x| rounded(x, dtype)),
            map.bias().map(|b| b.mapv(|x| rounded(x, dtype))),
        )
        .unwrap()
    };
    AttentionLayer::try_new(
        round(layer.q_proj()),
        round(layer.k_proj()),
        round(layer.v_proj()),
        round(layer.o_proj()),
    )
    .unwrap()
}

/// Writing a layer, reading it back and writing it again: the values read are the layer's
/// rounded to the storage type (bit for bit), the storage type and every config field come
/// back, and the second files are byte-identical to the first — in f32, f16 and bf16.
#[test]
fn checkpoints_round_trip_bit_exactly() {
    let dir = scratch("round-trip");
    for (dtype, name) in [
        (DType::F32, "float32"),
        (DType::F16, "float16"),
        (DType::BF16, "bfloat16"),
    ] {
        let config = llama_like_config(8, 8, 48, name);
        let original = layer::<8, 8, 6>(48, 11, [true, true, true, false]);
        let first = dir.join(format!("{name}-1"));
        checkpoint::try_write_layer(&first, PREFIX, &original, dtype, &config).unwrap();
        let read = checkpoint::try_read_layer::<8, 8, 6>(&first, PREFIX).unwrap();
        assert_eq!(read.dtype, dtype);
        same_layer(name, &read.layer, &rounded_layer(&original, dtype));
        // Every field kept; the head numbers (and the head dim, now explicit) written.
        let mut expected = config.clone();
        expected["head_dim"] = json!(6);
        assert_eq!(read.config, expected, "{name}: config");
        let second = dir.join(format!("{name}-2"));
        checkpoint::try_write_layer(&second, PREFIX, &read.layer, read.dtype, &read.config)
            .unwrap();
        for file in [WEIGHTS_FILE, CONFIG_FILE] {
            assert_eq!(
                std::fs::read(first.join(file)).unwrap(),
                std::fs::read(second.join(file)).unwrap(),
                "{name}: {file} differs after a round trip"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// An MHA checkpoint converted to GQA-2 and written: its config says 2 KV heads (other fields
/// kept), its tensors have GQA's shapes, it reads back as `GqaLayer<8, 2, 6>` equal to the
/// converted layer, and it does not read as the MHA type.
#[test]
fn converted_checkpoints_agree_with_their_config() {
    let dir = scratch("converted");
    let config = llama_like_config(8, 8, 48, "bfloat16");
    let mha = layer::<8, 8, 6>(48, 5, [true, true, true, true]);
    checkpoint::try_write_layer(&dir.join("mha"), PREFIX, &mha, DType::BF16, &config).unwrap();
    let read = checkpoint::try_read_layer::<8, 8, 6>(&dir.join("mha"), PREFIX).unwrap();
    let gqa = read.layer.to_gqa::<2>(KvInit::MeanPool);
    checkpoint::try_write_layer(&dir.join("gqa"), PREFIX, &gqa, read.dtype, &read.config).unwrap();

    let text = std::fs::read_to_string(dir.join("gqa").join(CONFIG_FILE)).unwrap();
    let written: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(written["num_key_value_heads"], json!(2));
    assert_eq!(written["num_attention_heads"], json!(8));
    assert_eq!(written["rope_theta"], json!(500000.0));
    assert_eq!(written["architectures"], json!(["LlamaForCausalLM"]));
    let model = ModelConfig::from_json_str(&text).unwrap();
    assert_eq!(
        (
            model.num_attention_heads,
            model.num_key_value_heads,
            model.head_dim
        ),
        (8, 2, 6)
    );

    let bytes = std::fs::read(dir.join("gqa").join(WEIGHTS_FILE)).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, shape) in [
        ("q_proj.weight", vec![48, 48]),
        ("k_proj.weight", vec![12, 48]),
        ("v_proj.weight", vec![12, 48]),
        ("o_proj.weight", vec![48, 48]),
        ("k_proj.bias", vec![12]),
        ("v_proj.bias", vec![12]),
    ] {
        let view = tensors.tensor(&format!("{PREFIX}{name}")).unwrap();
        assert_eq!(view.shape(), &shape[..], "{name}");
        assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
    }
    let back = checkpoint::try_read_layer::<8, 2, 6>(&dir.join("gqa"), PREFIX).unwrap();
    same_layer("converted", &back.layer, &rounded_layer(&gqa, DType::BF16));
    // Configs in the older names (Falcon's `n_head`, `num_kv_heads`) are updated in those names.
    let falcon_like =
        json!({"n_head": 8, "num_kv_heads": 8, "hidden_size": 48, "multi_query": false});
    checkpoint::try_write_layer(
        &dir.join("falcon"),
        PREFIX,
        &gqa.to_owned(),
        DType::F32,
        &falcon_like,
    )
    .unwrap();
    let back = ModelConfig::from_json_file(dir.join("falcon").join(CONFIG_FILE)).unwrap();
    assert_eq!((back.num_attention_heads, back.num_key_value_heads), (8, 2));
    let mqa = mha.to_gqa::<1>(KvInit::MeanPool);
    checkpoint::try_write_layer(&dir.join("mqa"), PREFIX, &mqa, DType::F32, &falcon_like).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mqa").join(CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(
        (&written["multi_query"], &written["num_kv_heads"]),
        (&json!(true), &json!(1))
    );
    assert_eq!(
        checkpoint::try_read_layer::<8, 8, 6>(&dir.join("gqa"), PREFIX).unwrap_err(),
        Error::ConfigMismatch {
            field: "kv_heads",
            expected: 8,
            found: 2
        }
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A sharded checkpoint (an index and two files) reads as the one-file checkpoint does.
#[test]
fn sharded_checkpoints_read_through_their_index() {
    let dir = scratch("sharded");
    let config = llama_like_config(4, 2, 16, "float32");
    let layer = layer::<4, 2, 4>(16, 9, [false, true, true, false]);
    checkpoint::try_write_layer(&dir.join("one"), PREFIX, &layer, DType::F32, &config).unwrap();
    let bytes = std::fs::read(dir.join("one").join(WEIGHTS_FILE)).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let sharded = dir.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(dir.join("one").join(CONFIG_FILE), sharded.join(CONFIG_FILE)).unwrap();
    let mut weight_map = serde_json::Map::new();
    let names: Vec<String> = tensors.names().into_iter().map(String::from).collect();
    for (shard, part) in names.chunks(3).enumerate() {
        let file = format!(
            "model-{:05}-of-{:05}.safetensors",
            shard + 1,
            names.len().div_ceil(3)
        );
        let views: Vec<_> = part
            .iter()
            .map(|n| (n.clone(), tensors.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &sharded.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), json!(file));
        }
    }
    std::fs::write(
        sharded.join(INDEX_FILE),
        json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let read = checkpoint::try_read_layer::<4, 2, 4>(&sharded, PREFIX).unwrap();
    same_layer("sharded", &read.layer, &layer);
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes `tensors` (name → (dtype, shape, bytes)) and `config` as a checkpoint in `dir`.
fn write_raw(
    dir: &Path,
    tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    config: &serde_json::Value,
) {
    std::fs::create_dir_all(dir).unwrap();
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
}

/// The tensors of a valid f32 `4/2/4` layer of width 16, as raw entries.
fn raw_layer() -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    [
        ("q_proj", 16, 16),
        ("k_proj", 8, 16),
        ("v_proj", 8, 16),
        ("o_proj", 16, 16),
    ]
    .into_iter()
    .map(|(p, rows, cols)| {
        let bytes = (0..rows * cols)
            .flat_map(|i| (i as f32 / 100.0).to_le_bytes())
            .collect();
        (
            format!("{PREFIX}{p}.weight"),
            safetensors::Dtype::F32,
            vec![rows, cols],
            bytes,
        )
    })
    .collect()
}

/// Bad checkpoints are typed errors that name what is wrong: a missing tensor, a wrong shape,
/// a bias of the wrong length, an unreadable storage type, mixed storage types, a file that is
/// not safetensors, a config whose heads break the rule or disagree with the type, a weight
/// that the storage type cannot hold.
#[test]
fn bad_checkpoints_are_typed_errors_naming_the_tensor() {
    let dir = scratch("bad");
    let config = llama_like_config(4, 2, 16, "float32");
    let read = |case: &str| checkpoint::try_read_layer::<4, 2, 4>(&dir.join(case), PREFIX);
    let tensor_of = |e: Error| match e {
        Error::CheckpointTensor { tensor, reason, .. } => (tensor, reason),
        other => panic!("expected a tensor error, got {other:?}"),
    };

    write_raw(&dir.join("valid"), raw_layer(), &config);
    read("valid").unwrap();

    let mut tensors = raw_layer();
    tensors.remove(2);
    write_raw(&dir.join("missing"), tensors, &config);
    let (tensor, reason) = tensor_of(read("missing").unwrap_err());
    assert_eq!(
        (tensor.as_str(), reason.as_str()),
        (&*format!("{PREFIX}v_proj.weight"), "is missing")
    );

    let mut tensors = raw_layer();
    tensors[1].2 = vec![16, 8];
    write_raw(&dir.join("shape"), tensors, &config);
    let (tensor, reason) = tensor_of(read("shape").unwrap_err());
    assert_eq!(tensor, format!("{PREFIX}k_proj.weight"));
    assert!(reason.contains("[8, 16]"), "{reason}");

    let mut tensors = raw_layer();
    tensors.push((
        format!("{PREFIX}q_proj.bias"),
        safetensors::Dtype::F32,
        vec![3],
        vec![0; 12],
    ));
    write_raw(&dir.join("bias"), tensors, &config);
    assert_eq!(
        tensor_of(read("bias").unwrap_err()).0,
        format!("{PREFIX}q_proj.bias")
    );

    let mut tensors = raw_layer();
    tensors[3].1 = safetensors::Dtype::I32;
    write_raw(&dir.join("dtype"), tensors, &config);
    let (tensor, reason) = tensor_of(read("dtype").unwrap_err());
    assert_eq!(tensor, format!("{PREFIX}o_proj.weight"));
    assert!(reason.contains("I32"), "{reason}");

    let mut tensors = raw_layer();
    tensors[0].1 = safetensors::Dtype::BF16;
    tensors[0].3.truncate(16 * 16 * 2);
    write_raw(&dir.join("mixed"), tensors, &config);
    let (tensor, reason) = tensor_of(read("mixed").unwrap_err());
    assert_eq!(tensor, format!("{PREFIX}k_proj.weight"));
    assert!(reason.contains("one storage type"), "{reason}");

    std::fs::create_dir_all(dir.join("garbage")).unwrap();
    std::fs::write(
        dir.join("garbage").join(WEIGHTS_FILE),
        b"not a safetensors file",
    )
    .unwrap();
    std::fs::write(dir.join("garbage").join(CONFIG_FILE), config.to_string()).unwrap();
    assert!(
        matches!(read("garbage").unwrap_err(), Error::Checkpoint { file, .. } if file.ends_with(WEIGHTS_FILE))
    );

    write_raw(
        &dir.join("heads"),
        raw_layer(),
        &llama_like_config(4, 3, 16, "float32"),
    );
    assert_eq!(
        read("heads").unwrap_err(),
        Error::Config(gqa::heads::ConfigError::HeadsNotDivisible {
            q_heads: 4,
            kv_heads: 3
        })
    );
    write_raw(
        &dir.join("other"),
        raw_layer(),
        &llama_like_config(4, 1, 16, "float32"),
    );
    assert_eq!(
        read("other").unwrap_err(),
        Error::ConfigMismatch {
            field: "kv_heads",
            expected: 2,
            found: 1
        }
    );
    assert!(
        matches!(read("absent").unwrap_err(), Error::Checkpoint { file, .. } if file.ends_with(CONFIG_FILE))
    );

    // Writing: a weight beyond f16's range is refused, and nothing is written.
    let mut big = layer::<4, 2, 4>(16, 3, [false; 4]).into_projections();
    let mut weight = big[2].weight().to_owned();
    weight[[1, 2]] = 1.0e5;
    big[2] = Linear::try_new(weight, None).unwrap();
    let [q, k, v, o] = big;
    let big = AttentionLayer::<4, 2, 4>::try_new(q, k, v, o).unwrap();
    let error = checkpoint::try_write_layer(&dir.join("f16"), PREFIX, &big, DType::F16, &config)
        .unwrap_err();
    assert_eq!(tensor_of(error).0, format!("{PREFIX}v_proj.weight"));
    assert!(!dir.join("f16").join(WEIGHTS_FILE).exists());
    checkpoint::try_write_layer(&dir.join("bf16"), PREFIX, &big, DType::BF16, &config).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// Layers refuse projections of the wrong shape, naming them, and inputs of the wrong width.
#[test]
fn layers_check_their_shapes() {
    let [q, k, v, o] = layer::<4, 2, 4>(16, 1, [false; 4]).into_projections();
    let error =
        AttentionLayer::<4, 4, 4>::try_new(q.clone(), k.clone(), v.clone(), o.clone()).unwrap_err();
    assert!(
        matches!(
            error,
            Error::Shape {
                tensor: "k_proj.weight",
                ..
            }
        ),
        "{error}"
    );
    let error =
        AttentionLayer::<4, 2, 4>::try_new(q.clone(), k.clone(), v.clone(), k.clone()).unwrap_err();
    assert!(
        matches!(
            error,
            Error::Shape {
                tensor: "o_proj.weight",
                ..
            }
        ),
        "{error}"
    );
    let error = Linear::try_new(Array2::zeros((3, 2)), Some(Array1::zeros(2))).unwrap_err();
    assert!(
        matches!(error, Error::Shape { tensor: "bias", .. }),
        "{error}"
    );
    let layer = AttentionLayer::<4, 2, 4>::try_new(q, k, v, o).unwrap();
    let x = Array3::<f32>::zeros((1, 2, 15));
    let error = layer
        .try_forward(
            &Attention::<4, 2, 4>::new(),
            &gqa::cpu::Cpu::new(),
            x.view(),
        )
        .unwrap_err();
    assert!(matches!(error, Error::Shape { tensor: "x", .. }), "{error}");
}

/// Training's inputs are checked: a forward of another input, gradients of other shapes or
/// with a bias where the map has none, an optimiser reused on a layer of other shapes — each an
/// `Error::Shape` naming the tensor, with nothing changed.
#[test]
fn training_refuses_mismatched_inputs() {
    use gqa::layer::train::Adam;
    let attention = Attention::<4, 2, 4>::new().causal();
    let cpu = gqa::cpu::Cpu::new();
    let mut layer = layer::<4, 2, 4>(16, 1, [true, false, false, false]);
    let mut rng = fastrand::Rng::with_seed(2);
    let x = Array3::from_shape_simple_fn((2, 5, 16), || rng.f32() - 0.5);
    let out = layer.try_forward(&attention, &cpu, x.view()).unwrap();
    let grads = layer
        .try_backward(&attention, &cpu, x.view(), &out, out.y.view())
        .unwrap();

    let shorter = x.slice(s![.., ..4, ..]).to_owned();
    let mut other = layer.try_forward(&attention, &cpu, shorter.view()).unwrap();
    other.y = out.y.clone();
    let error = layer
        .try_backward(&attention, &cpu, x.view(), &other, out.y.view())
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Shape {
                tensor: "forward.q",
                ..
            }
        ),
        "{error}"
    );

    let before = layer.clone();
    let mut adam = Adam::new(1e-2);
    let mut bad = grads.clone();
    bad.k_proj.weight = Array2::zeros((3, 16));
    assert!(matches!(
        adam.try_step(&mut layer, &bad).unwrap_err(),
        Error::Shape {
            tensor: "k_proj.weight",
            ..
        }
    ));
    let mut bad = grads.clone();
    bad.v_proj.bias = Some(Array1::zeros(8));
    assert!(matches!(
        adam.try_step(&mut layer, &bad).unwrap_err(),
        Error::Shape {
            tensor: "v_proj.bias",
            ..
        }
    ));
    let mut bad = grads.clone();
    bad.q_proj.bias = None;
    assert!(matches!(
        adam.try_step(&mut layer, &bad).unwrap_err(),
        Error::Shape {
            tensor: "q_proj.bias",
            ..
        }
    ));
    assert_eq!(layer, before, "a refused step changes nothing");
    adam.try_step(&mut layer, &grads).unwrap();
    assert_ne!(layer, before);
    let mut wider = super_layer();
    let wide_x = Array3::from_elem((1, 3, 20), 0.1f32);
    let wide_out = wider.try_forward(&attention, &cpu, wide_x.view()).unwrap();
    let wide_grads = wider
        .try_backward(
            &attention,
            &cpu,
            wide_x.view(),
            &wide_out,
            wide_out.y.view(),
        )
        .unwrap();
    assert!(matches!(
        adam.try_step(&mut wider, &wide_grads).unwrap_err(),
        Error::Shape {
            tensor: "q_proj.weight",
            ..
        }
    ));

    // A column-major input is read as the same values.
    let f_order = x.t().as_standard_layout().t().to_owned();
    assert!(!f_order.is_standard_layout());
    assert_eq!(
        layer
            .try_forward_oracle(&attention, f_order.view())
            .unwrap(),
        layer.try_forward_oracle(&attention, x.view()).unwrap()
    );
}

/// A `4/2/4` layer of width 20 with a q bias (another shape than the 16-wide ones).
fn super_layer() -> AttentionLayer<4, 2, 4> {
    layer::<4, 2, 4>(20, 3, [true, false, false, false])
}

/// The real `config.json` files under `tests/fixtures/configs/` (see SOURCES.md there), with
/// the numbers each model publishes.
const FIXTURES: &[(&str, usize, usize, usize)] = &[
    ("llama-3-8b.json", 32, 8, 128),
    ("mistral-7b-v0.1.json", 32, 8, 128),
    ("qwen2.5-7b.json", 28, 4, 128),
    ("gemma-2-9b.json", 16, 8, 256),
    ("phi-3-mini-4k-instruct.json", 32, 32, 96),
    ("falcon-7b.json", 71, 1, 64),
    ("llama-2-7b.json", 32, 32, 128),
];

/// `gqa::dispatch!` over the fixtures' configurations.
macro_rules! fixture_dispatch {
    ($config:expr, |$hq:ident, $hkv:ident, $d:ident| $body:expr) => {
        gqa::dispatch!(
            $config,
            [
                (32, 8, 128),
                (28, 4, 128),
                (16, 8, 256),
                (32, 32, 96),
                (71, 1, 64),
                (32, 32, 128)
            ],
            |$hq, $hkv, $d| $body
        )
    };
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/configs")
        .join(name)
}

/// Every fixture reads to its published numbers, and `dispatch!` turns each into its typed
/// attention (the KV cache per token and layer, from the type); a configuration not listed is
/// `Error::NotDispatched`.
#[test]
fn real_configs_dispatch_to_their_types() {
    for &(name, heads, kv_heads, head_dim) in FIXTURES {
        let config =
            ModelConfig::from_json_file(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim
            ),
            (heads, kv_heads, head_dim),
            "{name}"
        );
        let (group, bytes) = fixture_dispatch!(&config, |HQ, HKV, D| (
            Attention::<HQ, HKV, D>::GROUP,
            Attention::<HQ, HKV, D>::new()
                .kv_cache(DType::BF16)
                .bytes(1, 1, 1)
        ))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(group, heads / kv_heads, "{name}");
        assert_eq!(bytes, (2 * kv_heads * head_dim * 2) as u128, "{name}");
    }
    let gemma = ModelConfig::from_json_file(fixture("gemma-2-9b.json")).unwrap();
    assert_eq!(gemma.attn_logit_softcapping, Some(50.0));
    let mistral = ModelConfig::from_json_file(fixture("mistral-7b-v0.1.json")).unwrap();
    assert_eq!(mistral.sliding_window, Some(4096));
    let error = gqa::dispatch!(&gemma, [(32, 8, 128)], |HQ, HKV, D| {
        Attention::<HQ, HKV, D>::GROUP
    })
    .unwrap_err();
    assert_eq!(
        error,
        Error::NotDispatched {
            q_heads: 16,
            kv_heads: 8,
            head_dim: 256,
            compiled: "(32, 8, 128)".into()
        }
    );
    assert!(
        error
            .to_string()
            .contains("16 query heads, 8 key/value heads and head dim 256"),
        "{error}"
    );
}

/// Pooling takes consecutive heads (query head `h` reads KV head `h / group`, as in
/// transformers' `repeat_kv`), shown on weights whose rows name their head.
#[test]
fn pooling_reads_consecutive_heads() {
    // Key head h's rows all hold h: pooled head j of GQA-2 over 4 heads is mean(2j, 2j+1).
    let weight = Array2::from_shape_fn((4 * 2, 3), |(r, _)| (r / 2) as f32);
    let k = Linear::try_new(weight.clone(), None).unwrap();
    let q = Linear::try_new(weight.clone(), None).unwrap();
    let o = Linear::try_new(Array2::zeros((3, 8)), None).unwrap();
    let mha = MhaLayer::<4, 2>::try_new(q, k.clone(), k, o).unwrap();
    let gqa = mha.to_gqa::<2>(KvInit::MeanPool);
    assert_eq!(
        gqa.k_proj().weight().index_axis(Axis(1), 0).to_vec(),
        vec![0.5, 0.5, 2.5, 2.5]
    );
    let first = mha.to_gqa::<2>(KvInit::FirstHead);
    assert_eq!(
        first.v_proj().weight().index_axis(Axis(1), 0).to_vec(),
        vec![0.0, 0.0, 2.0, 2.0]
    );
}

/// Every real config passes the checkpoint reader's own config check, through
/// `gqa::dispatch!` to the reader typed by its numbers: the read then fails on the missing
/// weights file (named), not on the config; read as another configuration, it is a
/// `ConfigMismatch` naming the field.
#[test]
fn real_configs_pass_the_checkpoint_readers_config_check() {
    let dir = scratch("real-configs");
    for &(name, ..) in FIXTURES {
        let model = dir.join(name.trim_end_matches(".json"));
        std::fs::create_dir_all(&model).unwrap();
        std::fs::copy(fixture(name), model.join(CONFIG_FILE)).unwrap();
        let config = ModelConfig::from_json_file(fixture(name)).unwrap();
        let error = fixture_dispatch!(&config, |HQ, HKV, D| {
            checkpoint::try_read_layer::<HQ, HKV, D>(&model, PREFIX).map(|_| ())
        })
        .unwrap()
        .unwrap_err();
        match &error {
            Error::Checkpoint { file, reason } => assert!(
                file.ends_with(WEIGHTS_FILE) && reason.contains("cannot read it"),
                "{name}: {error}"
            ),
            other => panic!("{name}: expected the missing weights file, got {other}"),
        }
    }
    assert_eq!(
        checkpoint::try_read_layer::<32, 32, 128>(&dir.join("llama-3-8b"), PREFIX).unwrap_err(),
        Error::ConfigMismatch {
            field: "kv_heads",
            expected: 32,
            found: 8
        }
    );
    assert_eq!(
        checkpoint::try_read_layer::<16, 8, 128>(&dir.join("gemma-2-9b"), PREFIX).unwrap_err(),
        Error::ConfigMismatch {
            field: "head_dim",
            expected: 128,
            found: 256
        }
    );
    // Falcon-7B is multi-query already: not the source of a conversion from MHA.
    assert_eq!(
        checkpoint::try_convert_checkpoint::<71, 71, 64>(
            &dir.join("falcon-7b"),
            &dir.join("falcon-out"),
            KvInit::MeanPool
        )
        .unwrap_err(),
        Error::ConfigMismatch {
            field: "kv_heads",
            expected: 71,
            found: 1
        }
    );
    // Phi-3-mini is MHA, but its projections are fused (`qkv_proj`): refused, nothing written.
    let phi = dir.join("phi-3-mini-4k-instruct");
    write_raw(
        &phi,
        vec![(
            "model.layers.0.self_attn.qkv_proj.weight".into(),
            safetensors::Dtype::BF16,
            vec![4, 2],
            vec![0; 16],
        )],
        &serde_json::from_str(
            &std::fs::read_to_string(fixture("phi-3-mini-4k-instruct.json")).unwrap(),
        )
        .unwrap(),
    );
    let error = checkpoint::try_convert_checkpoint::<32, 8, 96>(
        &phi,
        &dir.join("phi-out"),
        KvInit::MeanPool,
    )
    .unwrap_err();
    assert!(error.to_string().contains("fused projections"), "{error}");
    assert!(!dir.join("phi-out").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// A real MHA model's attention layer at its real size — Llama-2-7B's layer 0 (32 heads of 128,
/// width 4096, f16 as its config says), under its real `config.json` — converts to GQA-8: the result's config has
/// Llama-3-8B's attention numbers and every other field of the original, and its key and value
/// projections read back as the group means, exactly (the weights are chosen so that every
/// mean is an f16 number: head `h`'s row `d`, column `c` holds `h + ((d + c) mod 8) / 8`, and
/// minus that for values).
#[test]
fn a_real_size_mha_layer_converts_to_llama_3s_heads() {
    const H: usize = 32;
    const D: usize = 128;
    const HIDDEN: usize = 4096;
    let dir = scratch("llama-2");
    let src = dir.join("llama-2-7b");
    let key = |r: usize, c: usize| (r / D) as f32 + ((r % D + c) % 8) as f32 / 8.0;
    let bytes = |sign: f32| -> Vec<u8> {
        (0..H * D * HIDDEN)
            .flat_map(|i| f16::from_f32(sign * key(i / HIDDEN, i % HIDDEN)).to_le_bytes())
            .collect()
    };
    let tensor = |name: &str, shape: [usize; 2], data: Vec<u8>| {
        (
            format!("model.layers.0.self_attn.{name}.weight"),
            safetensors::Dtype::F16,
            shape.to_vec(),
            data,
        )
    };
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama-2-7b.json")).unwrap())
            .unwrap();
    write_raw(
        &src,
        vec![
            tensor("q_proj", [H * D, HIDDEN], bytes(0.5)),
            tensor("k_proj", [H * D, HIDDEN], bytes(1.0)),
            tensor("v_proj", [H * D, HIDDEN], bytes(-1.0)),
            tensor("o_proj", [HIDDEN, H * D], bytes(0.25)),
        ],
        &original,
    );
    let out = dir.join("gqa-8");
    let conversion =
        checkpoint::try_convert_checkpoint::<H, 8, D>(&src, &out, KvInit::MeanPool).unwrap();
    assert_eq!(
        conversion.layers,
        vec!["model.layers.0.self_attn.".to_string()]
    );

    let converted = ModelConfig::from_json_file(out.join(CONFIG_FILE)).unwrap();
    let llama_3 = ModelConfig::from_json_file(fixture("llama-3-8b.json")).unwrap();
    for (field, ours, theirs) in [
        (
            "num_attention_heads",
            converted.num_attention_heads,
            llama_3.num_attention_heads,
        ),
        (
            "num_key_value_heads",
            converted.num_key_value_heads,
            llama_3.num_key_value_heads,
        ),
        ("head_dim", converted.head_dim, llama_3.head_dim),
        (
            "hidden_size",
            converted.hidden_size.unwrap(),
            llama_3.hidden_size.unwrap(),
        ),
    ] {
        assert_eq!(ours, theirs, "{field}");
    }
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(CONFIG_FILE)).unwrap()).unwrap();
    for (field, value) in original.as_object().unwrap() {
        if field != "num_key_value_heads" {
            assert_eq!(&written[field], value, "{field} changed");
        }
    }

    let read = checkpoint::try_read_layer::<H, 8, D>(&out, "model.layers.0.self_attn.").unwrap();
    assert_eq!(read.dtype, DType::F16);
    assert_eq!(read.layer.hidden(), HIDDEN);
    for (sign, weight) in [
        (1.0, read.layer.k_proj().weight()),
        (-1.0, read.layer.v_proj().weight()),
    ] {
        assert_eq!(weight.dim(), (8 * D, HIDDEN));
        for ((r, c), &x) in weight.indexed_iter() {
            let (group, d) = (r / D, r % D);
            // Heads 4·group … 4·group + 3: mean head index 4·group + 1.5.
            let mean = (4 * group) as f32 + 1.5 + ((d + c) % 8) as f32 / 8.0;
            assert_eq!(x, sign * mean, "row {r}, column {c}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The converter checks each layer's shapes against the config before writing anything: a key
/// projection with the wrong width, and a query projection with the wrong width, are errors
/// naming them; and a layer written under a config of another width is a `ConfigMismatch`.
#[test]
fn conversions_and_writes_check_the_width() {
    let dir = scratch("widths");
    let raw = |name: &str, rows: usize, cols: usize| {
        (
            format!("model.layers.0.self_attn.{name}.weight"),
            safetensors::Dtype::F32,
            vec![rows, cols],
            vec![0u8; rows * cols * 4],
        )
    };
    let config = llama_like_config(4, 4, 16, "float32");
    for (case, q_cols, k_cols, culprit) in [
        ("narrow-key", 16, 12, "k_proj"),
        ("narrow-query", 12, 16, "q_proj"),
    ] {
        let src = dir.join(case);
        write_raw(
            &src,
            vec![
                raw("q_proj", 16, q_cols),
                raw("k_proj", 16, k_cols),
                raw("v_proj", 16, 16),
                raw("o_proj", 16, 16),
            ],
            &config,
        );
        let out = dir.join(format!("{case}-out"));
        match checkpoint::try_convert_checkpoint::<4, 2, 4>(&src, &out, KvInit::MeanPool)
            .unwrap_err()
        {
            Error::CheckpointTensor { tensor, reason, .. } => {
                assert_eq!(tensor, format!("model.layers.0.self_attn.{culprit}.weight"));
                assert!(reason.contains("hidden size 16"), "{reason}");
            }
            other => panic!("{case}: expected a tensor error, got {other}"),
        }
        assert!(!out.exists(), "{case}: a refused conversion writes nothing");
    }
    let layer = MhaLayer::<4, 4>::random(20, 1);
    assert_eq!(
        checkpoint::try_write_layer(&dir.join("w"), PREFIX, &layer, DType::F32, &config)
            .unwrap_err(),
        Error::ConfigMismatch {
            field: "hidden_size",
            expected: 20,
            found: 16
        }
    );
    assert!(!dir.join("w").exists());
    std::fs::remove_dir_all(&dir).ok();
}
