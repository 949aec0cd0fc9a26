//! The gradient suites' shared half: upstream gradients for a problem, and the check of one
//! backend's backward against the oracle's under the tolerance rule for gradients
//! (`oracle::compare_gradients`). Used by `cpu_backward.rs` (and the kernels' suite to come).

use gqa::Element;
use gqa::backend::Backward;
use gqa::dsl::{MaskMod, Mods, ScoreMod};
use gqa::oracle::{self, Gradients, compare_gradients};
use ndarray::{Array3, Array4};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::{Problem, nan_padded, nan_padded_view, tensor};

/// The upstream gradients of a problem: `dO` (the shape of `q`) and, in half of the cases,
/// `dLSE`.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub d_o: Array4<f64>,
    pub d_lse: Option<Array3<f32>>,
}

pub fn upstream(p: &Problem) -> impl Strategy<Value = Upstream> + use<> {
    let s = p.q.shape();
    let q = [s[0], s[1], s[2], s[3]];
    let rows = q[0] * q[1] * q[2];
    (
        tensor(q),
        proptest::option::of(proptest::collection::vec(-2.0f32..2.0, rows)),
    )
        .prop_map(move |(d_o, d_lse)| Upstream {
            d_o,
            d_lse: d_lse.map(|d| Array3::from_shape_vec((q[0], q[1], q[2]), d).unwrap()),
        })
}

/// The worst `error / bound` of a check, per gradient (dq, dk, dv).
pub type Ratios = [f64; 3];

/// Runs `backend`'s forward then backward on `p` with `mods` (inputs narrowed to `T`, passed
/// as NaN-padded strided views so that a read out of bounds shows), and checks the gradients
/// against the oracle's on the same narrowed inputs with the rule for gradients. Returns the
/// ratios error / bound.
pub fn check_backward<T: Element, B: Backward<T>, M: MaskMod, S: ScoreMod>(
    backend: &B,
    p: &Problem,
    mods: &Mods<M, S>,
    up: &Upstream,
) -> Result<Ratios, TestCaseError> {
    let narrow = |x: &Array4<f64>| x.mapv(T::narrow);
    let (q, k, v, d_o) = (narrow(&p.q), narrow(&p.k), narrow(&p.v), narrow(&up.d_o));
    let padded = |x: &Array4<T>| nan_padded(&x.mapv(|e| e.widen())).mapv(T::narrow);
    let (q_big, k_big, v_big, d_o_big) = (padded(&q), padded(&k), padded(&v), padded(&d_o));
    let (qv, kv, vv, d_ov) = (
        nan_padded_view(&q_big, q.shape()),
        nan_padded_view(&k_big, k.shape()),
        nan_padded_view(&v_big, v.shape()),
        nan_padded_view(&d_o_big, d_o.shape()),
    );
    let d_lse = up.d_lse.as_ref().map(|d| d.view());
    let context = || {
        let (q, k) = (p.q.shape(), p.k.shape());
        format!(
            "spec {:?}, mods {mods:?}, q {q:?} k {k:?} ({})",
            p.spec,
            T::DTYPE
        )
    };
    let forward = backend
        .try_forward_with(&p.spec, mods, qv, kv, vv)
        .map_err(|e| TestCaseError::fail(format!("forward: {e}; {}", context())))?;
    let got = backend
        .try_backward_with(&p.spec, mods, [qv, kv, vv], &forward, d_ov, d_lse)
        .map_err(|e| TestCaseError::fail(format!("backward: {e}; {}", context())))?;
    let inputs = [q.view(), k.view(), v.view(), d_o.view()];
    let exact = oracle::try_backward_with(&p.spec, mods, inputs, d_lse).unwrap();
    let yardstick =
        oracle::try_backward_rounded_with(&p.spec, mods, inputs, d_lse, T::DTYPE).unwrap();
    let wide = |x: &Array4<T>| x.mapv(|e| e.widen());
    let candidate = Gradients {
        dq: wide(&got.dq),
        dk: wide(&got.dk),
        dv: wide(&got.dv),
    };
    prop_assert_eq!(
        candidate.dq.shape(),
        exact.dq.shape(),
        "dq's shape; {}",
        context()
    );
    prop_assert_eq!(
        candidate.dk.shape(),
        exact.dk.shape(),
        "dk's shape; {}",
        context()
    );
    prop_assert_eq!(
        candidate.dv.shape(),
        exact.dv.shape(),
        "dv's shape; {}",
        context()
    );
    let terms = oracle::try_gradient_terms_with(&p.spec, mods, inputs, d_lse).unwrap();
    let checks = compare_gradients(&exact, &yardstick, &candidate, &terms, T::DTYPE);
    for (name, check) in ["dq", "dk", "dv"].iter().zip(&checks) {
        prop_assert!(check.passed(), "{name}: {check}\n{}", context());
    }
    Ok(checks.map(|c| {
        if c.bound > 0.0 {
            c.max_error / c.bound
        } else {
            0.0
        }
    }))
}
