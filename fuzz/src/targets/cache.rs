//! `KvCache` operation sequences on every storage: add, append, append_batch (duplicates,
//! stale ids, wrong shapes, values the storage cannot hold), drop, read, and decode on the
//! oracle and the CPU. After an `Err` the cache holds exactly what it held before; what it holds
//! reads back within the storage's rounding; the CPU's decode agrees with the oracle's.

use crate::Trace;
use arbitrary::{Result, Unstructured};
use gqa::cache::{
    BFloat16, Float16, Float32, Int4, Int8, KvCache, KvStorage, Layout, SeqId, StorageKind,
};
use gqa::oracle::{compare_lse, compare_rows};
use gqa::{AttentionSpec, DType, Error};
use ndarray::{Array3, Array4, Axis, s};

use super::{data, float, mask};

/// The refusal law, shared with the cache suite.
#[path = "../../../tests/common/refusal.rs"]
mod refusal;
use refusal::must_refuse;

const HKV: usize = 2;
/// Odd: every packed storage ends its rows in a partial word.
const D: usize = 5;

pub fn run(u: &mut Unstructured, t: &mut Trace) -> Result<()> {
    match u.int_in_range(0u8..=4)? {
        0 => ops::<Float32>(u, t),
        1 => ops::<Float16>(u, t),
        2 => ops::<BFloat16>(u, t),
        3 => ops::<Int8>(u, t),
        _ => ops::<Int4>(u, t),
    }
}

/// The largest storage error of a row, by definition.
fn storage_error(kind: StorageKind, row: &[f64]) -> f64 {
    let amax = row
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max((*x as f32).abs() as f64));
    match kind {
        StorageKind::Float32 => 0.0,
        StorageKind::Float16 => amax * 2f64.powi(-11) + 2f64.powi(-25),
        StorageKind::BFloat16 => amax * 2f64.powi(-8) + 2f64.powi(-134),
        _ => 0.5 * amax / f64::from(kind.quant_max()) * (1.0 + 1e-5) + amax * 1e-7,
    }
}

/// Each live sequence and what it was given (keys, values per append).
type Model = Vec<(SeqId, Vec<(Array3<f64>, Array3<f64>)>)>;

fn ops<S: KvStorage>(u: &mut Unstructured, t: &mut Trace) -> Result<()> {
    let layout = if u.arbitrary()? {
        Layout::Paged {
            page_size: u.int_in_range(0..=6)?,
            pages: u.int_in_range(0..=10)?,
        }
    } else {
        Layout::Contiguous {
            sequences: u.int_in_range(0..=4)?,
            capacity: u.int_in_range(0..=16)?,
        }
    };
    let mut cache = match KvCache::<HKV, D, S>::try_new(layout) {
        Ok(cache) => cache,
        Err(e) => {
            let empty = match layout {
                Layout::Paged { page_size, pages } => page_size == 0 || pages == 0,
                Layout::Contiguous {
                    sequences,
                    capacity,
                } => sequences == 0 || capacity == 0,
            };
            assert!(
                empty && matches!(e, Error::CacheLayout { .. }),
                "{layout:?}: {e}"
            );
            t.mark("layout error");
            return Ok(());
        }
    };
    // The model: what each live sequence was given (f64 values as appended).
    let mut model: Model = Vec::new();
    let mut dead: Vec<SeqId> = Vec::new();
    let cpu = gqa::cpu::Cpu::new();
    for _ in 0..u.int_in_range(0..=24)? {
        let before = cache.clone();
        let op = u.int_in_range(0u8..=6)?;
        t.mark(format!("{:?} op {op}", S::KIND));
        // A sequence to name: live, dropped, or (when none) nothing.
        let pick = |u: &mut Unstructured,
                    model: &[(SeqId, _)],
                    dead: &[SeqId]|
         -> Result<Option<(SeqId, Option<usize>)>> {
            if !dead.is_empty() && u.ratio(1, 6)? {
                return Ok(Some((*u.choose(dead)?, None)));
            }
            if model.is_empty() {
                return Ok(None);
            }
            let n = u.choose_index(model.len())?;
            Ok(Some((model[n].0, Some(n))))
        };
        match op {
            0 => match cache.try_add_sequence() {
                Ok(id) => model.push((id, Vec::new())),
                Err(e) => {
                    assert!(matches!(e, Error::CacheFull { .. }), "{e}");
                    assert!(cache.same_contents(&before));
                }
            },
            1 | 2 => {
                // A batch: one item (op 1) or several (op 2), duplicates allowed.
                let items = if op == 1 { 1 } else { u.int_in_range(0..=4)? };
                let mut batch = Vec::new();
                for _ in 0..items {
                    let Some(who) = pick(u, &model, &dead)? else {
                        break;
                    };
                    let tokens = u.int_in_range(0..=7)?;
                    let shape = if u.ratio(1, 10)? {
                        [u.int_in_range(0..=3)?, tokens, u.int_in_range(4..=6)?]
                    } else {
                        [HKV, tokens, D]
                    };
                    let rows = |u: &mut Unstructured| -> Result<Array3<f64>> {
                        let n = shape.iter().product();
                        let mut data = data(u, n, 1.0)?;
                        if n > 0 && u.ratio(1, 6)? {
                            let at = u.choose_index(n)?;
                            data[at] = float(u)?;
                        }
                        Ok(Array3::from_shape_vec(shape, data).unwrap())
                    };
                    batch.push((who, rows(u)?, rows(u)?));
                }
                let items: Vec<_> = batch
                    .iter()
                    .map(|((id, _), k, v)| (*id, k.view(), v.view()))
                    .collect();
                let result = cache.try_append_batch(&items);
                let bad_value = batch
                    .iter()
                    .any(|(_, k, v)| k.iter().chain(v.iter()).any(|&x| must_refuse(S::KIND, x)));
                let bad_shape = batch
                    .iter()
                    .any(|(_, k, v)| k.shape() != [HKV, k.shape()[1], D] || v.shape() != k.shape());
                let stale = batch.iter().any(|((_, n), _, _)| n.is_none());
                let twice = batch
                    .iter()
                    .enumerate()
                    .any(|(i, ((a, _), _, _))| batch[..i].iter().any(|((b, _), _, _)| a == b));
                match result {
                    Ok(()) => {
                        assert!(
                            !bad_value && !bad_shape && !stale && !twice,
                            "an append that must be refused was accepted ({bad_value} {bad_shape} {stale} {twice})"
                        );
                        for ((_, n), k, v) in batch {
                            model[n.unwrap()].1.push((k, v));
                        }
                    }
                    Err(e) => {
                        t.mark(crate::variant(&e));
                        assert!(
                            cache.same_contents(&before),
                            "a refused append changed the cache: {e}"
                        );
                        match e {
                            Error::Shape { .. } => assert!(bad_shape, "{e}"),
                            Error::NonFinite { .. } | Error::Unrepresentable { .. } => {
                                assert!(bad_value, "{e}")
                            }
                            Error::UnknownSequence { .. } => assert!(stale, "{e}"),
                            Error::CacheFull { .. } => {}
                            e => panic!("append: unexpected error {e}"),
                        }
                    }
                }
            }
            3 => {
                let Some((id, n)) = pick(u, &model, &dead)? else {
                    continue;
                };
                let result = cache.try_drop_sequence(id);
                match n {
                    Some(n) => {
                        result.unwrap();
                        model.remove(n);
                        dead.push(id);
                    }
                    None => {
                        assert!(matches!(result, Err(Error::UnknownSequence { .. })));
                        assert!(cache.same_contents(&before));
                    }
                }
            }
            4 => {
                let Some((id, n)) = pick(u, &model, &dead)? else {
                    continue;
                };
                let read = cache.read_exact(id);
                let Some(n) = n else {
                    assert!(matches!(read, Err(Error::UnknownSequence { .. })));
                    continue;
                };
                let (k, v) = read.unwrap();
                for (stored, value) in [(k, false), (v, true)] {
                    let chunks: Vec<_> = model[n]
                        .1
                        .iter()
                        .map(|(k, v)| if value { v.view() } else { k.view() })
                        .collect();
                    let appended = if chunks.is_empty() {
                        Array3::zeros((HKV, 0, D))
                    } else {
                        ndarray::concatenate(Axis(1), &chunks).unwrap()
                    };
                    assert_eq!(stored.shape(), appended.shape());
                    for h in 0..HKV {
                        for tok in 0..stored.shape()[1] {
                            // What the cache was given as every storage first rounds it: to f32
                            // (IEEE rounding: 1e-50 becomes 0, which is not a loss it reports).
                            let want: Vec<f64> = appended
                                .slice(s![h, tok, ..])
                                .iter()
                                .map(|&w| f64::from(w as f32))
                                .collect();
                            let bound = storage_error(S::KIND, &want);
                            for (c, (&got, &w)) in
                                stored.slice(s![h, tok, ..]).iter().zip(&want).enumerate()
                            {
                                let w32 = w;
                                let fine = if w32.is_nan() {
                                    got.is_nan()
                                } else if w32.is_infinite() {
                                    got == w32
                                } else {
                                    (got - w).abs() <= bound
                                };
                                assert!(
                                    fine,
                                    "{:?} row ({h}, {tok}) channel {c}: stored {got}, appended {w}, bound {bound}",
                                    S::KIND
                                );
                            }
                        }
                    }
                }
            }
            _ => decode::<S>(u, t, &cache, &model, &dead, &cpu)?,
        }
    }
    Ok(())
}

/// Decode on the oracle and the CPU with drawn queries, sequences (duplicates and stale ids
/// included) and key ranges: the same errors, and where both succeed the CPU within the
/// tolerance rule of the oracle per row.
fn decode<S: KvStorage>(
    u: &mut Unstructured,
    t: &mut Trace,
    cache: &KvCache<HKV, D, S>,
    model: &Model,
    dead: &[SeqId],
    cpu: &gqa::cpu::Cpu,
) -> Result<()> {
    let hq = HKV * u.int_in_range(1..=3)?;
    let mut spec = AttentionSpec::try_new(hq, HKV, D)
        .unwrap()
        .with_mask(mask(u)?);
    if u.ratio(1, 4)? {
        spec = spec.try_with_softcap(20.0).unwrap();
    }
    let mut seqs = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        if !dead.is_empty() && u.ratio(1, 8)? {
            seqs.push(*u.choose(dead)?);
        } else if !model.is_empty() {
            seqs.push(model[u.choose_index(model.len())?].0);
        }
    }
    let seq_q = u.int_in_range(0..=4)?;
    let rows = if u.ratio(1, 10)? {
        u.int_in_range(0..=3)?
    } else {
        seqs.len()
    };
    let n = rows * hq * seq_q * D;
    let q = Array4::from_shape_vec((rows, hq, seq_q, D), data(u, n, 1.0)?).unwrap();
    let keys = if u.arbitrary()? {
        0..usize::MAX
    } else {
        u.int_in_range(0..=20)?..u.int_in_range(0..=20)?
    };
    let q32 = q.mapv(|x| x as f32);
    let (exact, cpu_out) = (
        decode_oracle(&spec, &q, cache, &seqs, keys.clone()),
        decode_cpu(cpu, &spec, &q32, cache, &seqs, keys.clone()),
    );
    let (o, lse) = match (&exact, cpu_out) {
        (Err(a), Err(b)) => {
            assert_eq!(
                crate::variant(a),
                crate::variant(&b),
                "the oracle and the CPU refuse differently: {a} / {b}"
            );
            t.mark(crate::variant(a));
            return Ok(());
        }
        (Ok(_), Ok(out)) => out,
        (a, b) => panic!(
            "the oracle and the CPU disagree on a decode: {:?} / {:?}",
            a.as_ref().err(),
            b.err()
        ),
    };
    let exact = exact.unwrap();
    assert_eq!(exact.0.shape(), o.shape());
    // The yardstick: the oracle in f32 over each sequence's stored rows (clipped as the front
    // end clips). Rows that see a non-finite stored value are left out: the definition gives
    // them NaN, the rule cannot compare them.
    let keys = if keys == (0..usize::MAX) {
        keys
    } else {
        keys.start
            ..keys.end.min(
                seqs.iter()
                    .map(|&s| cache.len(s).unwrap())
                    .max()
                    .unwrap_or(0),
            )
    };
    for (b, &seq) in seqs.iter().enumerate() {
        let (k, v) = cache.read_exact(seq).unwrap();
        let len = k.shape()[1];
        let (k, v) = (k.insert_axis(Axis(0)), v.insert_axis(Axis(0)));
        let q_b = q32.slice(s![b..b + 1, .., .., ..]).mapv(f64::from);
        let rounded = gqa::oracle::try_forward_rounded_keys(
            &spec,
            q_b.view(),
            k.view(),
            v.view(),
            DType::F32,
            keys.clone(),
        )
        .unwrap();
        let exact_b =
            gqa::oracle::try_forward_keys(&spec, q_b.view(), k.view(), v.view(), keys.clone())
                .unwrap();
        let row_terms =
            gqa::oracle::try_row_terms_keys(&spec, q_b.view(), k.view(), v.view(), keys.clone())
                .unwrap();
        let mut terms: Vec<f64> = row_terms.scores.iter().copied().collect();
        let mut value_terms: Vec<f64> = row_terms.outputs().iter().copied().collect();
        let mut o_b: Vec<f64> = o
            .slice(s![b, .., .., ..])
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let mut lse_b: Vec<f64> = lse.slice(s![b, .., ..]).iter().copied().collect();
        let (mut ref_o, mut ref_lse) = (
            exact_b.o.iter().copied().collect::<Vec<_>>(),
            exact_b.lse.iter().copied().collect::<Vec<_>>(),
        );
        let (mut low_o, mut low_lse) = (
            rounded.o.iter().copied().collect::<Vec<_>>(),
            rounded.lse.iter().copied().collect::<Vec<_>>(),
        );
        for h in 0..hq {
            for i in 0..seq_q {
                let visible = spec.mask().visible_keys(i, seq_q, len);
                let visible = visible.start.max(keys.start)
                    ..visible.end.min(keys.end).max(visible.start.max(keys.start));
                let sees_non_finite = visible.clone().any(|j| {
                    k.slice(s![0, h / (hq / HKV), j, ..])
                        .iter()
                        .chain(v.slice(s![0, h / (hq / HKV), j, ..]).iter())
                        .any(|x| !x.is_finite())
                });
                // A yardstick that overflowed (values near f32::MAX) cannot judge the row.
                let r = h * seq_q + i;
                // So can a row whose values come within a factor of its key count of f32::MAX:
                // every backend sums unnormalised weights (documented, README "Non-finite values").
                let near_max = visible.clone().any(|j| {
                    v.slice(s![0, h / (hq / HKV), j, ..])
                        .iter()
                        .any(|x| x.abs() * (visible.len() as f64) >= f64::from(f32::MAX))
                });
                let overflowed = near_max
                    || !low_o[r * D..(r + 1) * D]
                        .iter()
                        .chain([&low_lse[r]])
                        .all(|x| x.is_finite() || *x == f64::NEG_INFINITY)
                    || !ref_o[r * D..(r + 1) * D].iter().all(|x| x.is_finite());
                if sees_non_finite || overflowed {
                    t.mark(if sees_non_finite {
                        "sees a non-finite value"
                    } else {
                        "yardstick overflow"
                    });
                    for x in [&mut o_b, &mut ref_o, &mut low_o] {
                        x[r * D..(r + 1) * D].fill(0.0);
                    }
                    for x in [
                        &mut lse_b,
                        &mut ref_lse,
                        &mut low_lse,
                        &mut terms,
                        &mut value_terms,
                    ] {
                        x[r] = 0.0;
                    }
                }
            }
        }
        let o_check = compare_rows(&ref_o, &low_o, &o_b, DType::F32, D, &value_terms);
        let lse_check = compare_lse(&ref_lse, &low_lse, &lse_b, &terms);
        assert!(
            o_check.passed(),
            "decode o, sequence {b}: {o_check}\n{spec:?}, keys {keys:?}"
        );
        assert!(
            lse_check.passed(),
            "decode lse, sequence {b}: {lse_check}\n{spec:?}, keys {keys:?}"
        );
    }
    t.mark("decoded");
    Ok(())
}

/// Query-head counts of the typed front end here: `HKV` times 1, 2 or 3.
macro_rules! typed {
    ($spec:expr, |$attention:ident| $body:expr) => {
        match $spec.q_heads() {
            2 => {
                let $attention = gqa::Gqa::<2, HKV, D>::try_from(*$spec)?;
                $body
            }
            4 => {
                let $attention = gqa::Gqa::<4, HKV, D>::try_from(*$spec)?;
                $body
            }
            6 => {
                let $attention = gqa::Gqa::<6, HKV, D>::try_from(*$spec)?;
                $body
            }
            _ => unreachable!("q_heads is 2, 4 or 6"),
        }
    };
}

/// The oracle's decode over `keys` through the typed front end: o and the LSE (f64).
fn decode_oracle<S: KvStorage>(
    spec: &AttentionSpec,
    q: &Array4<f64>,
    cache: &KvCache<HKV, D, S>,
    seqs: &[SeqId],
    keys: std::ops::Range<usize>,
) -> gqa::Result<(Array4<f64>, ndarray::Array3<f64>)> {
    typed!(spec, |attention| if keys == (0..usize::MAX) {
        let out = attention.try_decode_oracle(q.view(), cache, seqs)?;
        Ok((out.o, out.lse))
    } else {
        Ok(attention
            .try_decode_partial_oracle(q.view(), cache, seqs, keys)?
            .into_parts())
    })
}

/// The CPU's decode over `keys` (the whole decode when all keys): o, and the LSE in f64.
fn decode_cpu<S: KvStorage>(
    cpu: &gqa::cpu::Cpu,
    spec: &AttentionSpec,
    q: &Array4<f32>,
    cache: &KvCache<HKV, D, S>,
    seqs: &[SeqId],
    keys: std::ops::Range<usize>,
) -> gqa::Result<(Array4<f32>, ndarray::Array3<f64>)> {
    typed!(spec, |attention| if keys == (0..usize::MAX) {
        let out = attention.try_decode_cpu(cpu, q.view(), cache, seqs)?;
        Ok((out.o, out.lse.mapv(f64::from)))
    } else {
        Ok(attention
            .try_decode_partial_cpu(cpu, q.view(), cache, seqs, keys)?
            .into_parts())
    })
}
