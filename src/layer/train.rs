//! Training an attention layer: its gradients (the projections' by hand, the attention's by
//! the backend's group-aware backward) and Adam — what uptraining a converted layer needs.

use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayView3, Axis, Zip};

use super::{AttentionLayer, LayerOutput, Linear, flatten, merge_heads, split_heads};
use crate::Attention;
use crate::backend::Backward;
use crate::error::{Error, Result};
use crate::heads::{Rule, Supported};

/// The gradient of a [`Linear`]'s parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGradients {
    /// `[out, in]`.
    pub weight: Array2<f32>,
    /// `[out]`, where the map has a bias.
    pub bias: Option<Array1<f32>>,
}

/// The gradients of a layer's loss: each projection's, and the input's.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGradients {
    pub q_proj: LinearGradients,
    pub k_proj: LinearGradients,
    pub v_proj: LinearGradients,
    pub o_proj: LinearGradients,
    /// `∂L/∂x`, `[batch, seq, hidden]`.
    pub x: Array3<f32>,
}

/// The gradients of `y = x·Wᵀ + b` given `dy` and `x`, and `dx` added into `dx`.
fn linear_backward(
    map: &Linear,
    x: ArrayView2<f32>,
    dy: ArrayView2<f32>,
    dx: &mut Array2<f32>,
) -> LinearGradients {
    let weight = dy.t().dot(&x);
    let bias = map.bias.as_ref().map(|_| dy.sum_axis(Axis(0)));
    ndarray::linalg::general_mat_mul(1.0, &dy, &map.weight, 1.0, dx);
    LinearGradients { weight, bias }
}

impl<const HQ: usize, const HKV: usize, const D: usize> AttentionLayer<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    /// The gradients of a loss `L` given `dy = ∂L/∂y` for the forward `forward` of this layer
    /// on `x` (from [`AttentionLayer::try_forward`] with the same `attention` and `backend`).
    /// The attention's gradients come from the backend's backward (group-aware: each KV head's
    /// summed over its query heads); the projections' are computed here in `f32`.
    pub fn try_backward<B: Backward<f32>>(
        &self,
        attention: &Attention<HQ, HKV, D>,
        backend: &B,
        x: ArrayView3<f32>,
        forward: &LayerOutput,
        dy: ArrayView3<f32>,
    ) -> Result<LayerGradients> {
        let op = "AttentionLayer::try_backward";
        self.check_input(op, x)?;
        if dy.dim() != forward.y.dim() || forward.y.dim() != x.dim() {
            return Err(Error::Shape {
                op,
                tensor: "dy",
                got: dy.shape().to_vec(),
                expected: format!("{:?} (the input's and the forward's y)", x.shape()),
            });
        }
        let (b, l, hidden) = x.dim();
        for (tensor, got, heads) in [
            ("forward.q", forward.q.shape(), HQ),
            ("forward.k", forward.k.shape(), HKV),
            ("forward.v", forward.v.shape(), HKV),
            ("forward.attention.o", forward.attention.o.shape(), HQ),
        ] {
            if got != [b, heads, l, D] {
                return Err(Error::Shape {
                    op,
                    tensor,
                    got: got.to_vec(),
                    expected: format!("[{b}, {heads}, {l}, {D}] (the input's batch and length)"),
                });
            }
        }
        let (x2, dy2) = (flatten(x), flatten(dy));
        let merged = merge_heads(forward.attention.o.view());
        let mut d_merged = Array2::<f32>::zeros((b * l, HQ * D));
        let o_proj = linear_backward(&self.o_proj, merged.view(), dy2.view(), &mut d_merged);
        let d_o = split_heads(d_merged, (b, l, HQ, D));
        let grads = attention.try_backward(
            backend,
            forward.q.view(),
            forward.k.view(),
            forward.v.view(),
            &forward.attention,
            d_o.view(),
        )?;
        let mut dx = Array2::<f32>::zeros((b * l, hidden));
        let q_proj = linear_backward(
            &self.q_proj,
            x2.view(),
            merge_heads(grads.dq.view()).view(),
            &mut dx,
        );
        let k_proj = linear_backward(
            &self.k_proj,
            x2.view(),
            merge_heads(grads.dk.view()).view(),
            &mut dx,
        );
        let v_proj = linear_backward(
            &self.v_proj,
            x2.view(),
            merge_heads(grads.dv.view()).view(),
            &mut dx,
        );
        Ok(LayerGradients {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            x: dx.into_shape_with_order((b, l, hidden)).expect("row-major"),
        })
    }

    /// The layer's parameters, mutably, in the order of [`LayerGradients`]' fields.
    fn maps_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ]
    }
}

/// Adam (Kingma & Ba, 2015) over one layer's parameters, with bias correction and no weight
/// decay. Its moments take the layer's shapes on the first step.
#[derive(Debug, Clone)]
pub struct Adam {
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    steps: i32,
    /// First and second moments of each projection's weight and bias, in the layer's order.
    moments: Vec<[Moments; 2]>,
}

/// A parameter tensor's first and second moments (`None`: a bias the map does not have).
type Moments = Option<(ndarray::ArrayD<f32>, ndarray::ArrayD<f32>)>;

impl Adam {
    /// Adam with the usual `β₁ = 0.9`, `β₂ = 0.999`, `ε = 1e-8`.
    pub fn new(learning_rate: f32) -> Adam {
        Adam {
            learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            steps: 0,
            moments: Vec::new(),
        }
    }

    /// One step on `layer` along `grads` (from that layer's [`AttentionLayer::try_backward`]).
    /// A gradient whose shape is not its parameter's, a bias gradient where the map has none
    /// (or none where it has one), or a layer of other shapes than the first step's is an
    /// [`Error::Shape`], and nothing is changed.
    pub fn try_step<const HQ: usize, const HKV: usize, const D: usize>(
        &mut self,
        layer: &mut AttentionLayer<HQ, HKV, D>,
        grads: &LayerGradients,
    ) -> Result<()>
    where
        Rule: Supported<HQ, HKV, D>,
    {
        const NAMES: [[&str; 2]; 4] = [
            ["q_proj.weight", "q_proj.bias"],
            ["k_proj.weight", "k_proj.bias"],
            ["v_proj.weight", "v_proj.bias"],
            ["o_proj.weight", "o_proj.bias"],
        ];
        let gradients = [&grads.q_proj, &grads.k_proj, &grads.v_proj, &grads.o_proj];
        let maps = layer.maps_mut();
        let shape_error = |tensor: &'static str, got: &[usize], expected: String| Error::Shape {
            op: "Adam::try_step",
            tensor,
            got: got.to_vec(),
            expected,
        };
        for ((map, grad), [w, b]) in maps.iter().zip(gradients).zip(NAMES) {
            if grad.weight.dim() != map.weight.dim() {
                return Err(shape_error(
                    w,
                    grad.weight.shape(),
                    format!("{:?} (the weight's)", map.weight.shape()),
                ));
            }
            match (&map.bias, &grad.bias) {
                (None, None) => {}
                (Some(p), Some(g)) if p.len() == g.len() => {}
                (p, g) => {
                    return Err(shape_error(
                        b,
                        g.as_ref().map_or(&[][..], |g| g.shape()),
                        p.as_ref()
                            .map_or("no bias gradient (the map has no bias)".into(), |p| {
                                format!("[{}] (the bias's)", p.len())
                            }),
                    ));
                }
            }
        }
        if self.moments.is_empty() {
            self.moments = maps
                .iter()
                .map(|map| {
                    let zeros = |shape: &[usize]| {
                        Some((ndarray::ArrayD::zeros(shape), ndarray::ArrayD::zeros(shape)))
                    };
                    [
                        zeros(map.weight.shape()),
                        map.bias.as_ref().and_then(|b| zeros(b.shape())),
                    ]
                })
                .collect();
        }
        for ((map, moments), [w, b]) in maps.iter().zip(&self.moments).zip(NAMES) {
            let fits =
                |m: &Moments, shape: Option<&[usize]>| m.as_ref().map(|(m, _)| m.shape()) == shape;
            if !fits(&moments[0], Some(map.weight.shape())) {
                return Err(shape_error(
                    w,
                    map.weight.shape(),
                    "the shape of the first step's layer".into(),
                ));
            }
            if !fits(&moments[1], map.bias.as_ref().map(|b| b.shape())) {
                return Err(shape_error(
                    b,
                    map.bias.as_ref().map_or(&[][..], |b| b.shape()),
                    "the first step's layer's bias".into(),
                ));
            }
        }
        self.steps += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let correct1 = 1.0 - b1.powi(self.steps);
        let correct2 = 1.0 - b2.powi(self.steps);
        let (lr, eps) = (self.learning_rate, self.epsilon);
        for ((map, grad), moments) in maps.into_iter().zip(gradients).zip(&mut self.moments) {
            let [weight_moments, bias_moments] = moments;
            let params = [
                Some((
                    map.weight.view_mut().into_dyn(),
                    grad.weight.view().into_dyn(),
                    weight_moments,
                )),
                map.bias
                    .as_mut()
                    .zip(grad.bias.as_ref())
                    .map(|(p, g)| (p.view_mut().into_dyn(), g.view().into_dyn(), bias_moments)),
            ];
            for (p, g, moments) in params.into_iter().flatten() {
                let (m, v) = moments.as_mut().expect("moments checked above");
                Zip::from(p).and(&g).and(m).and(v).for_each(|p, &g, m, v| {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= lr * (*m / correct1) / ((*v / correct2).sqrt() + eps);
                });
            }
        }
        Ok(())
    }
}

/// `‖a − b‖ / ‖b‖` over all elements, in `f64` (0 when both are 0).
///
/// # Panics
/// If the shapes differ.
#[track_caller]
pub fn relative_error(a: ArrayView3<f32>, b: ArrayView3<f32>) -> f64 {
    assert_eq!(
        a.shape(),
        b.shape(),
        "relative_error of arrays of different shapes"
    );
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b.iter()) {
        diff += (f64::from(x) - f64::from(y)).powi(2);
        norm += f64::from(y).powi(2);
    }
    if diff == 0.0 {
        0.0
    } else {
        (diff / norm).sqrt()
    }
}

/// Trains `student` for `steps` Adam steps to reproduce targets: step `i` draws `(x, target)`
/// from `batch(i)` and minimises the mean squared error `mean((y − target)²)` of the
/// student's output `y` on `x`. Returns each step's loss (before its update).
#[allow(clippy::too_many_arguments)]
pub fn try_distill<const HQ: usize, const HKV: usize, const D: usize, B: Backward<f32>>(
    student: &mut AttentionLayer<HQ, HKV, D>,
    attention: &Attention<HQ, HKV, D>,
    backend: &B,
    optimizer: &mut Adam,
    steps: usize,
    mut batch: impl FnMut(usize) -> (Array3<f32>, Array3<f32>),
) -> Result<Vec<f64>>
where
    Rule: Supported<HQ, HKV, D>,
{
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let (x, target) = batch(step);
        if target.dim() != x.dim() {
            return Err(Error::Shape {
                op: "train::try_distill",
                tensor: "target",
                got: target.shape().to_vec(),
                expected: format!("{:?} (the input's)", x.shape()),
            });
        }
        let out = student.try_forward(attention, backend, x.view())?;
        let n = out.y.len().max(1) as f32;
        let residual = &out.y - &target;
        losses.push(
            residual
                .iter()
                .map(|&r| f64::from(r) * f64::from(r))
                .sum::<f64>()
                / f64::from(n),
        );
        let dy = residual * (2.0 / n);
        let grads = student.try_backward(attention, backend, x.view(), &out, dy.view())?;
        optimizer.try_step(student, &grads)?;
    }
    Ok(losses)
}
