//! Small cases whose expected values are worked out by hand (in the comments), not computed by
//! the code under test.

use gqa::{DynAttention, Error, Gqa, Mha, Mqa, oracle};
use ndarray::{Array4, array};

fn tensor(shape: [usize; 4], data: Vec<f64>) -> Array4<f64> {
    Array4::from_shape_vec(shape, data).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + b.abs())
}

/// One query, two keys with scores 0 and ln 3: weights 1/4 and 3/4, so with values 2 and 6 the
/// output is 2/4 + 18/4 = 5 and the LSE is ln(1 + 3) = ln 4.
#[test]
fn two_keys_weighted_one_to_three() {
    let attention = Mha::<1, 1>::new().scale(1.0);
    let q = tensor([1, 1, 1, 1], vec![1.0]);
    let k = tensor([1, 1, 2, 1], vec![0.0, 3f64.ln()]);
    let v = tensor([1, 1, 2, 1], vec![2.0, 6.0]);
    let out = oracle::forward(attention.spec(), q.view(), k.view(), v.view());
    assert!(close(out.o[[0, 0, 0, 0]], 5.0), "{}", out.o);
    assert!(close(out.lse[[0, 0, 0]], 4f64.ln()), "{}", out.lse);
}

/// The default scale is 1/√D: with D = 4, q = k = (1, 1, 1, 1) the score is 4/2 = 2; against a
/// zero key (score 0) the weights are e²/(e² + 1) and 1/(e² + 1).
#[test]
fn default_scale_is_inverse_sqrt_head_dim() {
    let attention = Mha::<1, 4>::new();
    let q = Array4::ones((1, 1, 1, 4));
    let k = tensor([1, 1, 2, 4], vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    let v = tensor([1, 1, 2, 4], vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    let out = oracle::forward(attention.spec(), q.view(), k.view(), v.view());
    let e2 = 2f64.exp();
    assert!(close(out.o[[0, 0, 0, 0]], e2 / (e2 + 1.0)));
    assert!(close(out.o[[0, 0, 0, 1]], 1.0 / (e2 + 1.0)));
    assert!(close(out.lse[[0, 0, 0]], (e2 + 1.0).ln()));
}

/// Bottom-right causal with 3 queries and 2 keys: diag(i) = i − 1, so row 0 sees nothing (0, −∞),
/// row 1 sees key 0 (output v0), row 2 sees both (equal scores: the mean).
#[test]
fn bottom_right_causal_masks_the_leading_rows_when_queries_outnumber_keys() {
    let attention = Mha::<1, 1>::new().causal();
    let q = Array4::zeros((1, 1, 3, 1));
    let k = Array4::zeros((1, 1, 2, 1));
    let v = tensor([1, 1, 2, 1], vec![10.0, 20.0]);
    let out = oracle::forward(attention.spec(), q.view(), k.view(), v.view());
    assert_eq!(
        out.o.iter().copied().collect::<Vec<_>>(),
        vec![0.0, 10.0, 15.0]
    );
    assert_eq!(out.lse[[0, 0, 0]], f64::NEG_INFINITY);
    assert_eq!(out.lse[[0, 0, 1]], 0.0);
    assert!(close(out.lse[[0, 0, 2]], 2f64.ln()));
}

/// Top-left causal with 2 queries and 3 keys: row 0 sees key 0, row 1 sees keys 0 and 1.
/// Bottom-right would let row 0 see keys 0 and 1 and row 1 all three.
#[test]
fn top_left_and_bottom_right_causal_differ_by_the_length_difference() {
    let q = Array4::zeros((1, 1, 2, 1));
    let k = Array4::zeros((1, 1, 3, 1));
    let v = tensor([1, 1, 3, 1], vec![3.0, 6.0, 12.0]);
    let top_left = oracle::forward(
        Mha::<1, 1>::new().causal_top_left().spec(),
        q.view(),
        k.view(),
        v.view(),
    );
    assert_eq!(
        top_left.o.iter().copied().collect::<Vec<_>>(),
        vec![3.0, 4.5]
    );
    let bottom_right = oracle::forward(
        Mha::<1, 1>::new().causal().spec(),
        q.view(),
        k.view(),
        v.view(),
    );
    assert_eq!(
        bottom_right.o.iter().copied().collect::<Vec<_>>(),
        vec![4.5, 7.0]
    );
}

/// A window (1, 0) without causal over 4 keys: query i sees keys i−1 and i only.
#[test]
fn window_sees_left_neighbours_only() {
    let attention = Mha::<1, 1>::new().window(1, 0);
    let q = Array4::zeros((1, 1, 4, 1));
    let k = Array4::zeros((1, 1, 4, 1));
    let v = tensor([1, 1, 4, 1], vec![2.0, 4.0, 8.0, 16.0]);
    let out = oracle::forward(attention.spec(), q.view(), k.view(), v.view());
    assert_eq!(
        out.o.iter().copied().collect::<Vec<_>>(),
        vec![2.0, 3.0, 6.0, 12.0]
    );
}

/// With 4 query heads over 2 KV heads, heads 0 and 1 read KV head 0 and heads 2 and 3 read KV
/// head 1. One key each, so every output is its KV head's value.
#[test]
fn query_heads_read_their_groups_kv_head() {
    let attention = Gqa::<4, 2, 2>::new();
    let q = Array4::ones((1, 4, 1, 2));
    let k = Array4::ones((1, 2, 1, 2));
    let v = tensor([1, 2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
    let out = oracle::forward(attention.spec(), q.view(), k.view(), v.view());
    assert_eq!(
        out.o,
        tensor([1, 4, 1, 2], vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0])
    );
}

/// Softcap 1 turns scores 100 and 0 into tanh(100) ≈ 1 and 0: weights e^t/(e^t + 1) and
/// 1/(e^t + 1) with t = tanh(100).
#[test]
fn softcap_bounds_a_large_score() {
    let attention = Mha::<1, 1>::new().scale(1.0).softcap(1.0);
    let q = tensor([1, 1, 1, 1], vec![10.0]);
    let k = tensor([1, 1, 2, 1], vec![10.0, 0.0]);
    let v = tensor([1, 1, 2, 1], vec![1.0, 0.0]);
    let out = oracle::forward(attention.spec(), q.view(), k.view(), v.view());
    let t = 100f64.tanh().exp();
    assert!(close(out.o[[0, 0, 0, 0]], t / (t + 1.0)));
}

/// ALiBi with 2 heads has slopes 2^-4 and 2^-8. A query at the last position (bottom-right, one
/// query, 3 keys) is 2, 1, 0 keys away from keys 0, 1, 2; with zero dot products the scores are
/// −2m, −m, 0, so with values 1, 0, 0 the output is e^{−2m} / (e^{−2m} + e^{−m} + 1).
#[test]
fn alibi_penalises_distance_per_head() {
    let attention = Mha::<2, 1>::new().alibi();
    assert_eq!(
        attention.spec().alibi().unwrap().to_vec(),
        vec![1.0 / 16.0, 1.0 / 256.0]
    );
    let q = Array4::zeros((1, 2, 1, 1));
    let k = Array4::zeros((1, 2, 3, 1));
    let v = tensor([1, 2, 3, 1], vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    let out = oracle::forward(attention.spec(), q.view(), k.view(), v.view());
    for (head, m) in [(0, 1.0f64 / 16.0), (1, 1.0 / 256.0)] {
        let expected = (-2.0 * m).exp() / ((-2.0 * m).exp() + (-m).exp() + 1.0);
        assert!(close(out.o[[0, head, 0, 0]], expected), "head {head}");
    }
}

/// User slopes replace the geometric ones.
#[test]
fn user_alibi_slopes_are_used_as_given() {
    let attention = Mqa::<2, 1>::new().alibi_slopes(&[0.0, 1.0]);
    let q = Array4::zeros((1, 2, 1, 1));
    let k = Array4::zeros((1, 1, 2, 1));
    let v = tensor([1, 1, 2, 1], vec![1.0, 0.0]);
    let out = oracle::forward(attention.spec(), q.view(), k.view(), v.view());
    // Head 0: slope 0, equal weights: 0.5. Head 1: scores −1, 0: e^{-1}/(e^{-1} + 1).
    assert!(close(out.o[[0, 0, 0, 0]], 0.5));
    assert!(close(
        out.o[[0, 1, 0, 0]],
        (-1f64).exp() / ((-1f64).exp() + 1.0)
    ));
}

/// No keys at all: every row is fully masked.
#[test]
fn empty_keys_give_zero_output_and_minus_infinity_lse() {
    let attention = Gqa::<4, 2, 3>::new();
    let q = Array4::<f32>::ones((2, 4, 3, 3));
    let kv = Array4::<f32>::zeros((2, 2, 0, 3));
    let out = oracle::forward(attention.spec(), q.view(), kv.view(), kv.view());
    assert!(out.o.iter().all(|&x| x == 0.0));
    assert!(out.lse.iter().all(|&x| x == f64::NEG_INFINITY));
    let none = Array4::<f32>::zeros((2, 4, 0, 3));
    assert_eq!(
        oracle::forward(attention.spec(), none.view(), kv.view(), kv.view())
            .o
            .shape(),
        &[2, 4, 0, 3]
    );
}

/// Shapes that do not fit are typed errors that name the tensor and both shapes.
#[test]
fn shape_mismatches_are_typed_errors() {
    let attention = DynAttention::new(8, 2, 4);
    let q = Array4::<f32>::zeros((1, 8, 2, 4));
    let k = Array4::<f32>::zeros((1, 4, 2, 4));
    let err = oracle::try_forward(attention.spec(), q.view(), k.view(), k.view()).unwrap_err();
    assert_eq!(
        err,
        Error::Shape {
            op: "oracle::forward",
            tensor: "k",
            got: vec![1, 4, 2, 4],
            expected: "[1, 2, _, 4] ([batch, kv_heads, seq_k, head_dim])".into()
        }
    );
}

#[test]
#[should_panic(expected = "oracle::forward: `q` has shape [1, 8, 2, 3], expected [_, 8, _, 4]")]
fn forward_panics_with_the_shape_error() {
    let q = Array4::<f32>::zeros((1, 8, 2, 3));
    let k = Array4::<f32>::zeros((1, 2, 2, 4));
    oracle::forward(Gqa::<8, 2, 4>::new().spec(), q.view(), k.view(), k.view());
}

/// bf16 inputs are accepted and widened exactly: 1.5 and 0.25 are bf16 values.
#[test]
fn bf16_inputs_are_widened_exactly() {
    use half::bf16;
    let one = |x: f32| Array4::from_elem((1, 1, 1, 1), bf16::from_f32(x));
    let out = oracle::forward(
        Mha::<1, 1>::new().spec(),
        one(1.5).view(),
        one(0.25).view(),
        one(1.5).view(),
    );
    assert_eq!(out.o, array![[[[1.5]]]]);
    assert_eq!(out.lse[[0, 0, 0]], 1.5 * 0.25);
}

/// Softcap comes before ALiBi. One query at the last position (bottom-right) over keys with raw
/// scores 100 and 0 and ALiBi slope 1: capping first gives tanh(100) − 1·1 = 0 (tanh(100) is 1
/// in f64) and 0 − 1·0 = 0, equal weights, output 0.5. ALiBi first would give tanh(99) = 1 and
/// tanh(0) = 0: weights e/(e + 1), output ≈ 0.73.
#[test]
fn softcap_applies_before_alibi() {
    let attention = Mha::<1, 1>::new()
        .scale(1.0)
        .softcap(1.0)
        .alibi_slopes(&[1.0]);
    let q = tensor([1, 1, 1, 1], vec![10.0]);
    let k = tensor([1, 1, 2, 1], vec![10.0, 0.0]);
    let v = tensor([1, 1, 2, 1], vec![1.0, 0.0]);
    let out = oracle::forward(attention.spec(), q.view(), k.view(), v.view());
    assert_eq!(out.o[[0, 0, 0, 0]], 0.5);
}
