//! The uptraining experiment, without the printing: shared by `main.rs` and the test that
//! asserts its claims (`tests/uptrain.rs`), so both run the same procedure with the same seeds.

use std::time::Instant;

use gqa::cache::{Float32, KvCache, Layout, SeqId};
use gqa::cpu::Cpu;
use gqa::heads::{Rule, Supported};
use gqa::layer::train::{Adam, relative_error, try_distill};
use gqa::layer::{AttentionLayer, KvInit, Linear, MhaLayer, checkpoint};
use gqa::{Attention, DType, Error};
use ndarray::{Array1, Array3, ArrayView1, Axis};

pub const HEADS: usize = 8;
pub const HEAD_DIM: usize = 16;
pub const HIDDEN: usize = 64;
pub const BATCH: usize = 8;
pub const SEQ: usize = 32;
/// The uptraining budget, as a fraction of the MHA block's training steps (the paper's α).
pub const ALPHA: f64 = 0.05;
/// The MHA block's training steps, by default.
pub const MHA_STEPS: usize = 3000;

pub type Mha = MhaLayer<HEADS, HEAD_DIM>;

/// The initialisations, named.
pub const INITS: [(&str, KvInit); 3] = [
    ("mean-pool", KvInit::MeanPool),
    ("first head", KvInit::FirstHead),
    ("random", KvInit::Random { seed: 99 }),
];

/// Random inputs `[BATCH, SEQ, HIDDEN]`, reproducible from `seed`.
pub fn inputs(seed: u64) -> Array3<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    Array3::from_shape_simple_fn((BATCH, SEQ, HIDDEN), || rng.f32() * 2.0 - 1.0)
}

/// The task: a random 8-head causal attention block whose query and key maps are scaled up,
/// so that each head's attention is sharp and its own.
pub fn teacher() -> Mha {
    let [q, k, v, o] = Mha::random(HIDDEN, 2023).into_projections();
    let sharpen = |map: Linear| Linear::try_new(map.weight().to_owned() * 3.0, None).unwrap();
    Mha::try_new(sharpen(q), sharpen(k), v, o).unwrap()
}

/// The block's output on `x` (causal attention, CPU backend).
pub fn outputs<const G: usize>(
    layer: &AttentionLayer<HEADS, G, HEAD_DIM>,
    x: &Array3<f32>,
) -> Result<Array3<f32>, Error>
where
    Rule: Supported<HEADS, G, HEAD_DIM>,
{
    let attention = Attention::<HEADS, G, HEAD_DIM>::new().causal();
    Ok(layer.try_forward(&attention, &Cpu::new(), x.view())?.y)
}

/// The tensors' name prefix in the block's checkpoint (Llama's layout).
pub const PREFIX: &str = "model.layers.0.self_attn.";

/// The block's `config.json`.
pub fn checkpoint_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": 1,
        "torch_dtype": "float32",
    })
}

/// The MHA checkpoint and how its training went.
pub struct Trained {
    pub mha: Mha,
    pub seconds: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Relative output error against the teacher on held-out inputs.
    pub teacher_error: f64,
}

/// Trains an MHA block from random weights to reproduce [`teacher`] (`steps` Adam steps), then
/// writes it as a Hugging Face checkpoint and reads it back, as a real checkpoint would come.
pub fn train_mha(steps: usize) -> Result<Trained, Error> {
    let teacher = teacher();
    let attention = Attention::<HEADS, HEADS, HEAD_DIM>::new().causal();
    let mut mha = Mha::random(HIDDEN, 1);
    let mut adam = Adam::new(3e-3);
    let start = Instant::now();
    let losses = try_distill(
        &mut mha,
        &attention,
        &Cpu::new(),
        &mut adam,
        steps,
        |step| {
            let x = inputs(step as u64);
            let target = outputs(&teacher, &x).expect("the teacher runs");
            (x, target)
        },
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let probe = inputs(u64::MAX);
    let teacher_error = relative_error(
        outputs(&mha, &probe)?.view(),
        outputs(&teacher, &probe)?.view(),
    );
    let dir = std::env::temp_dir().join(format!("gqa-uptrain-{}-{steps}", std::process::id()));
    let (config, prefix) = (checkpoint_config(), PREFIX);
    checkpoint::try_write_layer(&dir, prefix, &mha, DType::F32, &config)?;
    let read = checkpoint::try_read_layer::<HEADS, HEADS, HEAD_DIM>(&dir, prefix)?.layer;
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(read, mha, "an f32 checkpoint reads back exactly");
    Ok(Trained {
        mha: read,
        seconds,
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        last_loss: losses.last().copied().unwrap_or(f64::NAN),
        teacher_error,
    })
}

/// One row of the result: a `G` and an initialisation.
#[derive(Debug, Clone)]
pub struct Row {
    pub kv_heads: usize,
    pub init: &'static str,
    /// Relative output error against the MHA block on held-out inputs.
    pub before: f64,
    pub after: f64,
    /// KV-cache bytes per token of this layer, in bf16.
    pub kv_bytes: u128,
}

/// Held-out inputs and the MHA block's outputs on them.
pub fn held_out(mha: &Mha) -> Result<(Array3<f32>, Array3<f32>), Error> {
    let x = inputs(u64::MAX - 1);
    let y = outputs(mha, &x)?;
    Ok((x, y))
}

/// Converts `mha` to `G` KV heads by each initialisation and uptrains each for `steps` steps
/// against the MHA block's outputs on fresh inputs.
pub fn uptrain<const G: usize>(
    mha: &Mha,
    steps: usize,
    held_out: &(Array3<f32>, Array3<f32>),
) -> Result<Vec<Row>, Error>
where
    Rule: Supported<HEADS, G, HEAD_DIM>,
{
    let attention = Attention::<HEADS, G, HEAD_DIM>::new().causal();
    let kv_bytes = attention.kv_cache(DType::BF16).bytes_per_token(1);
    let mut rows = Vec::new();
    for (init_name, init) in INITS {
        let mut gqa = mha.to_gqa::<G>(init);
        let before = relative_error(outputs(&gqa, &held_out.0)?.view(), held_out.1.view());
        let mut adam = Adam::new(1e-3);
        try_distill(
            &mut gqa,
            &attention,
            &Cpu::new(),
            &mut adam,
            steps,
            |step| {
                let x = inputs(1_000_000 + step as u64);
                let target = outputs::<HEADS>(mha, &x).expect("the MHA block runs");
                (x, target)
            },
        )?;
        let after = relative_error(outputs(&gqa, &held_out.0)?.view(), held_out.1.view());
        rows.push(Row {
            kv_heads: G,
            init: init_name,
            before,
            after,
            kv_bytes,
        });
    }
    Ok(rows)
}

/// A block ready to decode: one step appends a token to its cache and attends to it all.
pub trait DecodeStep {
    fn step(&mut self, x: ArrayView1<f32>) -> Result<(), Error>;
}

struct Decoder<const G: usize>
where
    Rule: Supported<HEADS, G, HEAD_DIM> + Supported<G, G, HEAD_DIM>,
{
    layer: AttentionLayer<HEADS, G, HEAD_DIM>,
    attention: Attention<HEADS, G, HEAD_DIM>,
    cache: KvCache<G, HEAD_DIM, Float32>,
    seq: SeqId,
    cpu: Cpu,
}

impl<const G: usize> DecodeStep for Decoder<G>
where
    Rule: Supported<HEADS, G, HEAD_DIM> + Supported<G, G, HEAD_DIM>,
{
    fn step(&mut self, x: ArrayView1<f32>) -> Result<(), Error> {
        let y =
            self.layer
                .try_decode_cpu(&self.attention, &self.cpu, &mut self.cache, self.seq, x)?;
        std::hint::black_box(y);
        Ok(())
    }
}

/// The `G`-KV-head block (the mean-pooled conversion of `mha`) with a cache holding a
/// `context`-token prompt (room for `steps` more), on the CPU.
pub fn decoder<const G: usize>(
    mha: &Mha,
    context: usize,
    steps: usize,
) -> Result<Box<dyn DecodeStep>, Error>
where
    Rule: Supported<HEADS, G, HEAD_DIM> + Supported<G, G, HEAD_DIM>,
{
    let layer = mha.to_gqa::<G>(KvInit::MeanPool);
    let attention = Attention::<HEADS, G, HEAD_DIM>::new().causal();
    let cpu = Cpu::new();
    let mut cache = attention.try_new_cache::<Float32>(Layout::Contiguous {
        sequences: 1,
        capacity: context + steps,
    })?;
    let seq = cache.try_add_sequence()?;
    let mut rng = fastrand::Rng::with_seed(7);
    let prompt = Array3::from_shape_simple_fn((1, context, HIDDEN), || rng.f32() * 2.0 - 1.0);
    let out = layer.try_forward(&attention, &cpu, prompt.view())?;
    cache.try_append(
        seq,
        out.k.index_axis(Axis(0), 0),
        out.v.index_axis(Axis(0), 0),
    )?;
    Ok(Box::new(Decoder {
        layer,
        attention,
        cache,
        seq,
        cpu,
    }))
}

/// The median time of one decode step of each block, in seconds: `steps` rounds, each one
/// step of every block in turn, so that the machine's drifts fall on all of them alike.
pub fn decode_seconds(blocks: &mut [Box<dyn DecodeStep>], steps: usize) -> Result<Vec<f64>, Error> {
    let mut rng = fastrand::Rng::with_seed(8);
    let mut times = vec![Vec::with_capacity(steps); blocks.len()];
    for _ in 0..steps {
        for (block, times) in blocks.iter_mut().zip(&mut times) {
            let x = Array1::from_shape_simple_fn(HIDDEN, || rng.f32() * 2.0 - 1.0);
            let start = Instant::now();
            block.step(x.view())?;
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times
        .into_iter()
        .map(|mut times| {
            times.sort_by(f64::total_cmp);
            times[steps / 2]
        })
        .collect())
}
