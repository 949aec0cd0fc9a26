//! An attention layer's weights, typed by their head counts, and the conversion of a multi-head
//! layer into grouped-query attention — the GQA paper's "uptraining" start (Ainslie et al.,
//! 2023, arXiv:2305.13245).
//!
//! [`AttentionLayer<HQ, HKV, D>`] holds the four projections of a Hugging Face–layout layer
//! (`q_proj`, `k_proj`, `v_proj`, `o_proj`, each `[out, in]` with an optional bias): queries
//! `[HQ·D, hidden]`, keys and values `[HKV·D, hidden]`, output `[hidden, HQ·D]`. Its head counts
//! obey the configuration rule ([`crate::heads`]) like [`Attention`]'s, so
//! [`MhaLayer::to_gqa`]`::<G>` names its target's KV heads in the type and a `G` that does not
//! divide the query heads does not compile:
//!
//! ```
//! use gqa::layer::{KvInit, MhaLayer};
//! let mha = MhaLayer::<8, 16>::random(128, 7);
//! let gqa = mha.to_gqa::<2>(KvInit::MeanPool); // GqaLayer<8, 2, 16>: k_proj [32, 128]
//! assert_eq!(gqa.k_proj().weight().dim(), (2 * 16, 128));
//! ```
//! ```compile_fail
//! let mha = gqa::layer::MhaLayer::<8, 16>::random(128, 7);
//! let broken = mha.to_gqa::<3>(gqa::layer::KvInit::MeanPool); // 8 query heads over 3 KV heads
//! ```
//!
//! Query head `h` reads KV head `h / (HQ / HKV)` (groups of consecutive heads, as in
//! transformers' `repeat_kv` and everywhere in `gqa`), so converting MHA into GQA-`G` pools
//! consecutive runs of `H / G` key and value heads.
//!
//! Checkpoints are read and written by [`checkpoint`].

pub mod checkpoint;
pub mod train;

use ndarray::{Array1, Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayView3, Axis, s};

use crate::Attention;
use crate::backend::{Backend, HostOutput};
use crate::error::{Error, Result};
use crate::heads::{Rule, Supported, assert_config};
use crate::oracle;

/// A linear map `y = x·Wᵀ + b` with `W: [out, in]` (PyTorch's `nn.Linear` layout).
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    weight: Array2<f32>,
    bias: Option<Array1<f32>>,
}

impl Linear {
    /// A map from its weight `[out, in]` (any memory order; kept row-major) and optional bias
    /// `[out]`; a bias of another length is an [`Error::Shape`].
    pub fn try_new(weight: Array2<f32>, bias: Option<Array1<f32>>) -> Result<Linear> {
        if let Some(b) = &bias
            && b.len() != weight.nrows()
        {
            return Err(Error::Shape {
                op: "Linear::try_new",
                tensor: "bias",
                got: vec![b.len()],
                expected: format!("[{}] (the weight's rows)", weight.nrows()),
            });
        }
        let bias = bias.map(|b| b.as_standard_layout().into_owned());
        Ok(Linear {
            weight: row_major(weight),
            bias,
        })
    }

    /// `[out, in]`.
    pub fn weight(&self) -> ArrayView2<'_, f32> {
        self.weight.view()
    }

    /// `[out]`, if the map has one.
    pub fn bias(&self) -> Option<ArrayView1<'_, f32>> {
        self.bias.as_ref().map(|b| b.view())
    }

    /// Output features.
    pub fn outputs(&self) -> usize {
        self.weight.nrows()
    }

    /// Input features.
    pub fn inputs(&self) -> usize {
        self.weight.ncols()
    }

    /// `x·Wᵀ + b` for `x: [n, in]`, in `f32`; row-major.
    pub fn apply(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let mut y = row_major(x.dot(&self.weight.t()));
        if let Some(b) = &self.bias {
            y += b;
        }
        y
    }

    /// `x·Wᵀ + b` in `f64` (the oracle's precision); row-major.
    pub fn apply_f64(&self, x: ArrayView2<f64>) -> Array2<f64> {
        let mut y = row_major(x.dot(&self.weight.mapv(f64::from).t()));
        if let Some(b) = &self.bias {
            y += &b.mapv(f64::from);
        }
        y
    }

    /// A map with entries uniform in `±1/√in` (PyTorch's `nn.Linear` default), bias included
    /// when `bias` is set; reproducible from `rng`.
    fn random(outputs: usize, inputs: usize, bias: bool, rng: &mut fastrand::Rng) -> Linear {
        let weight = uniform(outputs, inputs, inputs, rng);
        let bias = bias.then(|| uniform(outputs, 1, inputs, rng).index_axis_move(Axis(1), 0));
        Linear { weight, bias }
    }
}

/// How [`MhaLayer::to_gqa`] initialises each new key and value head from its group of
/// `H / G` original heads: the GQA paper's three choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvInit {
    /// The mean of the group's heads (weights and biases): the paper's choice, which it found
    /// to start closest to the original and to uptrain best.
    MeanPool,
    /// The group's first head (a baseline).
    FirstHead,
    /// Fresh weights uniform in `±1/√hidden`, from this seed (the other baseline).
    Random { seed: u64 },
}

/// An attention layer's projections with `HQ` query heads sharing `HKV` key/value heads of
/// dimension `D` (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLayer<const HQ: usize, const HKV: usize, const D: usize>
where
    Rule: Supported<HQ, HKV, D>,
{
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

/// A multi-head layer: as many key/value heads as query heads.
pub type MhaLayer<const H: usize, const D: usize> = AttentionLayer<H, H, D>;
/// A grouped-query layer: `H / G` query heads share each of `G` key/value heads.
pub type GqaLayer<const H: usize, const G: usize, const D: usize> = AttentionLayer<H, G, D>;

/// A layer's forward result: its output and what the backward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerOutput {
    /// `[batch, seq, hidden]`.
    pub y: Array3<f32>,
    /// The attention's inputs, `[batch, heads, seq, D]`.
    pub q: Array4<f32>,
    pub k: Array4<f32>,
    pub v: Array4<f32>,
    /// The attention's output and LSE.
    pub attention: HostOutput<f32>,
}

impl<const HQ: usize, const HKV: usize, const D: usize> AttentionLayer<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    const VALID: () = assert_config(HQ, HKV, D);

    /// A layer from its four projections. Their shapes must be `q_proj [HQ·D, hidden]`,
    /// `k_proj`, `v_proj [HKV·D, hidden]`, `o_proj [hidden, HQ·D]` with `hidden ≥ 1`; any other
    /// is an [`Error::Shape`] naming the projection.
    pub fn try_new(q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear) -> Result<Self> {
        let () = Self::VALID;
        let hidden = q_proj.inputs();
        let expect = |tensor: &'static str, map: &Linear, rows: usize, cols: usize| {
            if map.weight.dim() == (rows, cols) && cols > 0 && rows > 0 {
                Ok(())
            } else {
                Err(Error::Shape {
                    op: "AttentionLayer::try_new",
                    tensor,
                    got: map.weight.shape().to_vec(),
                    expected: format!("[{rows}, {cols}]"),
                })
            }
        };
        expect("q_proj.weight", &q_proj, HQ * D, hidden.max(1))?;
        expect("k_proj.weight", &k_proj, HKV * D, hidden.max(1))?;
        expect("v_proj.weight", &v_proj, HKV * D, hidden.max(1))?;
        expect("o_proj.weight", &o_proj, hidden.max(1), HQ * D)?;
        Ok(AttentionLayer {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
        })
    }

    /// A layer of model width `hidden` with weights uniform in `±1/√in` and no biases,
    /// reproducible from `seed`.
    ///
    /// # Panics
    /// If `hidden` is 0.
    #[track_caller]
    pub fn random(hidden: usize, seed: u64) -> Self {
        assert!(hidden > 0, "an attention layer needs a model width > 0");
        let mut rng = fastrand::Rng::with_seed(seed);
        let q = Linear::random(HQ * D, hidden, false, &mut rng);
        let k = Linear::random(HKV * D, hidden, false, &mut rng);
        let v = Linear::random(HKV * D, hidden, false, &mut rng);
        let o = Linear::random(hidden, HQ * D, false, &mut rng);
        Self::try_new(q, k, v, o).expect("shapes made to fit")
    }

    /// The model width (`hidden_size`).
    pub fn hidden(&self) -> usize {
        self.q_proj.inputs()
    }

    pub fn q_proj(&self) -> &Linear {
        &self.q_proj
    }
    pub fn k_proj(&self) -> &Linear {
        &self.k_proj
    }
    pub fn v_proj(&self) -> &Linear {
        &self.v_proj
    }
    pub fn o_proj(&self) -> &Linear {
        &self.o_proj
    }

    /// The four projections, `[q, k, v, o]`.
    pub fn into_projections(self) -> [Linear; 4] {
        [self.q_proj, self.k_proj, self.v_proj, self.o_proj]
    }

    /// `x: [batch, seq, hidden]` projected to `[batch, heads, seq, D]` by `map`.
    fn heads_of(map: &Linear, heads: usize, x: ArrayView3<f32>) -> Array4<f32> {
        let (b, l, _) = x.dim();
        split_heads(map.apply(flatten(x).view()), (b, l, heads, D))
    }

    /// Runs the layer on `x: [batch, seq, hidden]` with `attention` (mask and score modifiers)
    /// on `backend`: projections in `f32`, attention on the backend.
    pub fn try_forward<B: Backend<f32>>(
        &self,
        attention: &Attention<HQ, HKV, D>,
        backend: &B,
        x: ArrayView3<f32>,
    ) -> Result<LayerOutput> {
        self.check_input("AttentionLayer::try_forward", x)?;
        let q = Self::heads_of(&self.q_proj, HQ, x);
        let k = Self::heads_of(&self.k_proj, HKV, x);
        let v = Self::heads_of(&self.v_proj, HKV, x);
        let out = attention.try_forward(backend, q.view(), k.view(), v.view())?;
        let (b, l, _) = x.dim();
        let merged = merge_heads(out.o.view());
        let y = self
            .o_proj
            .apply(merged.view())
            .into_shape_with_order((b, l, self.hidden()))
            .expect("row-major");
        Ok(LayerOutput {
            y,
            q,
            k,
            v,
            attention: out,
        })
    }

    /// The layer on `x` computed by the `f64` oracle: projections and attention in `f64`
    /// from the `f32` weights. `[batch, seq, hidden]`.
    pub fn try_forward_oracle(
        &self,
        attention: &Attention<HQ, HKV, D>,
        x: ArrayView3<f32>,
    ) -> Result<Array3<f64>> {
        self.check_input("AttentionLayer::try_forward_oracle", x)?;
        let (b, l, hidden) = x.dim();
        let flat = flatten(x).mapv(f64::from);
        let project =
            |map: &Linear, heads: usize| split_heads(map.apply_f64(flat.view()), (b, l, heads, D));
        let (q, k, v) = (
            project(&self.q_proj, HQ),
            project(&self.k_proj, HKV),
            project(&self.v_proj, HKV),
        );
        let out = oracle::try_forward(attention.spec(), q.view(), k.view(), v.view())?;
        let merged = merge_heads(out.o.view());
        Ok(self
            .o_proj
            .apply_f64(merged.view())
            .into_shape_with_order((b, l, hidden))
            .expect("row-major"))
    }

    /// One new token `x: [hidden]` of sequence `seq` through the layer against its KV cache,
    /// on the CPU: the token's key and value are appended to `cache`, its query attends to the
    /// sequence's cached keys (itself included) as `attention` says, and the layer's output
    /// `[hidden]` is returned. Errors: the append's (a full cache, an unknown sequence: then
    /// nothing is appended) and the decode's (after the append: the token then stays in the
    /// cache).
    #[cfg(feature = "cpu")]
    pub fn try_decode_cpu<S: crate::cache::KvStorage>(
        &self,
        attention: &Attention<HQ, HKV, D>,
        cpu: &crate::cpu::Cpu,
        cache: &mut crate::cache::KvCache<HKV, D, S>,
        seq: crate::cache::SeqId,
        x: ArrayView1<f32>,
    ) -> Result<Array1<f32>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let x = x.insert_axis(Axis(0)).insert_axis(Axis(0));
        self.check_input("AttentionLayer::try_decode_cpu", x)?;
        let q = Self::heads_of(&self.q_proj, HQ, x);
        let k = Self::heads_of(&self.k_proj, HKV, x);
        let v = Self::heads_of(&self.v_proj, HKV, x);
        cache.try_append(seq, k.index_axis(Axis(0), 0), v.index_axis(Axis(0), 0))?;
        let out = attention.try_decode_cpu(cpu, q.view(), cache, &[seq])?;
        let merged = out
            .o
            .into_shape_with_order((1, HQ * D))
            .expect("one token, row-major");
        Ok(self.o_proj.apply(merged.view()).index_axis_move(Axis(0), 0))
    }

    fn check_input(&self, op: &'static str, x: ArrayView3<f32>) -> Result<()> {
        if x.dim().2 == self.hidden() {
            Ok(())
        } else {
            Err(Error::Shape {
                op,
                tensor: "x",
                got: x.shape().to_vec(),
                expected: format!("[_, _, {}] ([batch, seq, hidden])", self.hidden()),
            })
        }
    }
}

impl<const H: usize, const D: usize> AttentionLayer<H, H, D>
where
    Rule: Supported<H, H, D>,
{
    /// This multi-head layer as grouped-query attention with `G` key/value heads: each new
    /// head starts from its group of `H / G` consecutive original heads as `init` says
    /// (weights and biases alike); the query and output projections are kept. `G = H` with
    /// [`KvInit::MeanPool`] or [`KvInit::FirstHead`] returns the layer unchanged.
    ///
    /// Means are taken in `f64` and rounded once to `f32`, so a group of identical heads pools
    /// to exactly that head.
    pub fn to_gqa<const G: usize>(&self, init: KvInit) -> AttentionLayer<H, G, D>
    where
        Rule: Supported<H, G, D>,
    {
        let () = AttentionLayer::<H, G, D>::VALID;
        let mut rng = match init {
            KvInit::Random { seed } => Some(fastrand::Rng::with_seed(seed)),
            _ => None,
        };
        let mut convert = |map: &Linear| match &mut rng {
            Some(rng) => Linear::random(G * D, map.inputs(), map.bias.is_some(), rng),
            None => pool_heads(map, H / G, D, init),
        };
        let (k_proj, v_proj) = (convert(&self.k_proj), convert(&self.v_proj));
        AttentionLayer {
            q_proj: self.q_proj.clone(),
            k_proj,
            v_proj,
            o_proj: self.o_proj.clone(),
        }
    }
}

/// `[batch, seq, hidden]` as `[batch·seq, hidden]`, row-major.
pub(crate) fn flatten<A: Clone>(x: ArrayView3<A>) -> Array2<A> {
    let (b, l, h) = x.dim();
    x.as_standard_layout()
        .into_owned()
        .into_shape_with_order((b * l, h))
        .expect("row-major")
}

/// `[batch, heads, seq, D]` as `[batch·seq, heads·D]` (each token's heads side by side).
pub(crate) fn merge_heads<A: Clone>(x: ndarray::ArrayView4<A>) -> Array2<A> {
    let (b, h, l, d) = x.dim();
    x.permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((b * l, h * d))
        .expect("row-major")
}

/// [`merge_heads`] undone: `[batch·seq, heads·D]` as `[batch, heads, seq, D]`, row-major.
pub(crate) fn split_heads<A: Clone>(
    x: Array2<A>,
    (b, l, h, d): (usize, usize, usize, usize),
) -> Array4<A> {
    x.into_shape_with_order((b, l, h, d))
        .expect("[batch·seq, heads·D]")
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned()
}

/// `a` in row-major order (a product may come out column-major).
fn row_major<A: Clone>(a: Array2<A>) -> Array2<A> {
    if a.is_standard_layout() {
        a
    } else {
        a.as_standard_layout().into_owned()
    }
}

/// Pools the rows of a key or value projection's weight (`[heads·dim, cols]`, or a bias as
/// `[heads·dim, 1]`) in consecutive groups of `group` heads: each group's mean (in `f64`) or,
/// with `first_head`, its first head. `[heads/group·dim, cols]`, not yet rounded.
pub(crate) fn pool_rows_f64(
    x: ArrayView2<f32>,
    group: usize,
    dim: usize,
    first_head: bool,
) -> Array2<f64> {
    // [heads·dim, cols] → [heads/group, group, dim, cols] → pooled over axis 1.
    let (rows, cols) = x.dim();
    let grouped = x
        .to_shape((rows / (group * dim), group, dim, cols))
        .expect("whole groups");
    let pooled = if first_head {
        grouped.slice(s![.., 0, .., ..]).mapv(f64::from)
    } else {
        grouped.mapv(f64::from).sum_axis(Axis(1)) / group as f64
    };
    pooled
        .into_shape_with_order((rows / group, cols))
        .expect("row-major")
}

/// [`pool_rows_f64`] rounded once to `f32`.
pub(crate) fn pool_rows(
    x: ArrayView2<f32>,
    group: usize,
    dim: usize,
    first_head: bool,
) -> Array2<f32> {
    pool_rows_f64(x, group, dim, first_head).mapv(|m| m as f32)
}

/// `rows × cols` values uniform in `±1/√fan_in` (PyTorch's `nn.Linear` default), from `rng`.
pub(crate) fn uniform(
    rows: usize,
    cols: usize,
    fan_in: usize,
    rng: &mut fastrand::Rng,
) -> Array2<f32> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    Array2::from_shape_simple_fn((rows, cols), || (rng.f32() * 2.0 - 1.0) * bound)
}

/// Pools the heads of a key or value projection (rows `[heads·dim, in]`) in consecutive groups
/// of `group`: each group's mean, or its first head.
fn pool_heads(map: &Linear, group: usize, dim: usize, init: KvInit) -> Linear {
    let first = init == KvInit::FirstHead;
    let weight = pool_rows(map.weight.view(), group, dim, first);
    let bias = map.bias.as_ref().map(|b| {
        pool_rows(b.view().insert_axis(Axis(1)), group, dim, first).index_axis_move(Axis(1), 0)
    });
    Linear { weight, bias }
}
