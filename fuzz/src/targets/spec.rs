//! Spec builders with arbitrary numbers: every `try_*` agrees with the rule restated from its
//! definition, the typed-error results of `AttentionSpec` and `DynAttention` agree, masks give
//! in-bounds ranges, footprint arithmetic is exact or a documented panic.

use crate::Trace;
use arbitrary::{Result, Unstructured};
use gqa::{AttentionSpec, DType, DynAttention, Error};

use super::{count, float, mask};

pub fn run(u: &mut Unstructured, t: &mut Trace) -> Result<()> {
    let (hq, hkv, d) = (count(u)?, count(u)?, count(u)?);
    let rule =
        (1..=256).contains(&hq) && hkv >= 1 && hkv <= hq && hq % hkv == 0 && (1..=256).contains(&d);
    let spec = AttentionSpec::try_new(hq, hkv, d);
    let dynamic = DynAttention::try_new(hq, hkv, d);
    assert_eq!(
        spec.is_ok(),
        rule,
        "AttentionSpec::try_new({hq}, {hkv}, {d}): {spec:?}"
    );
    same(
        &dynamic.as_ref().map(|a| *a.spec()).map_err(Clone::clone),
        &spec,
        "DynAttention::try_new and AttentionSpec::try_new",
    );
    let (Ok(mut spec), Ok(mut dynamic)) = (spec, dynamic) else {
        t.mark("config error");
        return Ok(());
    };
    t.mark(format!("config g{}", (hq / hkv).min(9)));
    assert_eq!(spec.group_size() * spec.kv_heads(), spec.q_heads());
    assert_eq!(spec.scale(), 1.0 / (d as f64).sqrt());
    for _ in 0..u.int_in_range(0..=10)? {
        let op = u.int_in_range(0u8..=7)?;
        t.mark(format!("op {op}"));
        match op {
            0 => {
                let (left, right) = (u.arbitrary::<i64>()?, u.arbitrary::<i64>()?);
                let (left, right) = if u.arbitrary()? {
                    (left % 100, right % 100)
                } else {
                    (left, right)
                };
                let a = spec.try_with_window(left, right);
                assert_eq!(
                    a.is_ok(),
                    left >= 0 && right >= 0,
                    "window({left}, {right}): {a:?}"
                );
                same(
                    &a,
                    &dynamic.try_window(left, right).map(|x| *x.spec()),
                    "DynAttention and AttentionSpec",
                );
                if let Ok(s) = a {
                    let (l, r) = (s.mask().left().unwrap(), s.mask().right().unwrap());
                    assert!(
                        l <= left as usize && r <= right as usize,
                        "a window widened the mask"
                    );
                    spec = s;
                    dynamic = dynamic.window(left, right);
                }
            }
            1 => {
                let scale = float(u)?;
                let a = spec.try_with_scale(scale);
                let valid = scale.is_finite() && (scale as f32).is_finite();
                assert_eq!(a.is_ok(), valid, "scale({scale:e}): {a:?}");
                same(
                    &a,
                    &dynamic.try_scale(scale).map(|x| *x.spec()),
                    "DynAttention and AttentionSpec",
                );
                if let Ok(s) = a {
                    assert!(s.scale() == scale && s.scale_f32().is_finite());
                    spec = s;
                    dynamic = dynamic.scale(scale);
                }
            }
            2 => {
                let cap = float(u)? as f32;
                let a = spec.try_with_softcap(cap);
                assert_eq!(
                    a.is_ok(),
                    cap.is_finite() && cap > 0.0,
                    "softcap({cap:e}): {a:?}"
                );
                same(
                    &a,
                    &dynamic.try_softcap(cap).map(|x| *x.spec()),
                    "DynAttention and AttentionSpec",
                );
                if let Ok(s) = a {
                    assert_eq!(s.softcap(), Some(cap));
                    spec = s;
                    dynamic = dynamic.softcap(cap);
                }
            }
            3 => {
                spec = spec.with_alibi();
                dynamic = dynamic.alibi();
                let slopes = spec.alibi().unwrap().to_vec();
                assert_eq!(slopes.len(), hq);
                assert!(slopes.iter().all(|s| s.is_finite() && *s > 0.0));
            }
            4 => {
                let n = if u.arbitrary()? {
                    hq
                } else {
                    u.int_in_range(0..=300)?
                };
                let slopes: Vec<f32> = (0..n)
                    .map(|_| float(u).map(|x| x as f32))
                    .collect::<Result<_>>()?;
                let a = spec.try_with_alibi_slopes(&slopes);
                let valid = n == hq && slopes.iter().all(|s| s.is_finite());
                assert_eq!(a.is_ok(), valid, "{n} slopes for {hq} heads: {a:?}");
                same(
                    &a,
                    &dynamic.try_alibi_slopes(&slopes).map(|x| *x.spec()),
                    "DynAttention and AttentionSpec",
                );
                if let Err(e) = &a {
                    t.mark(crate::variant(e));
                }
                if let Ok(s) = a {
                    spec = s;
                    dynamic = dynamic.alibi_slopes(&slopes);
                }
            }
            5 => {
                let m = mask(u)?;
                spec = spec.with_mask(m);
                assert_eq!(spec.mask(), m);
                // The builder cannot express every band; the spec converts.
                dynamic = DynAttention::from(spec);
            }
            6 => {
                let kv = count(u)?;
                let a = spec.try_with_kv_heads(kv);
                let valid = kv >= 1 && kv <= hq && hq % kv == 0;
                assert_eq!(a.is_ok(), valid, "with_kv_heads({kv}) of {hq}: {a:?}");
                if let Err(e) = &a {
                    assert!(matches!(e, Error::Config(_)));
                }
            }
            _ => {
                spec = if u.arbitrary()? {
                    spec.without_softcap()
                } else {
                    spec.without_alibi()
                };
                dynamic = DynAttention::from(spec);
            }
        }
        assert_eq!(
            *dynamic.spec(),
            spec,
            "the front end and the spec drifted apart"
        );
    }
    // Masks: every range lies in 0..=seq_k, and agrees with the definition where it is cheap.
    for _ in 0..u.int_in_range(0..=4)? {
        let (i, seq_q, seq_k) = (count(u)?, count(u)?, count(u)?);
        let m = spec.mask();
        let range = m.visible_keys(i, seq_q, seq_k);
        assert!(
            range.start <= range.end && range.end <= seq_k,
            "{m:?} row {i} of {seq_q}x{seq_k}: {range:?}"
        );
        if seq_k <= 300 {
            let diag = match m.alignment() {
                gqa::Alignment::BottomRight => i as i128 + seq_k as i128 - seq_q as i128,
                gqa::Alignment::TopLeft => i as i128,
            };
            for j in 0..seq_k {
                let by_definition = m.left().is_none_or(|l| j as i128 >= diag - l as i128)
                    && m.right().is_none_or(|r| j as i128 <= diag + r as i128);
                assert_eq!(
                    range.contains(&j),
                    by_definition,
                    "{m:?} row {i} of {seq_q}x{seq_k}, key {j}"
                );
            }
        }
        t.mark(if range.is_empty() { "empty row" } else { "row" });
    }
    // Footprints: exact in u128, or the documented overflow panic.
    let dtype = *u.choose(&[DType::F64, DType::F32, DType::F16, DType::BF16])?;
    let footprint = spec.kv_cache(dtype);
    let (layers, batch, context) = (count(u)?, count(u)?, count(u)?);
    let exact = (2u128 * hkv as u128 * d as u128 * dtype.size_bytes() as u128)
        .checked_mul(layers as u128)
        .and_then(|x| x.checked_mul(context as u128))
        .and_then(|x| x.checked_mul(batch as u128));
    let got = crate::documented_panic("KV-cache size overflows u128", || {
        footprint.bytes(layers, batch, context)
    });
    assert_eq!(got, exact, "bytes({layers}, {batch}, {context})");
    t.mark(if got.is_some() {
        "bytes"
    } else {
        "bytes overflow"
    });
    Ok(())
}

/// Two results, equal as printed (errors carry the offending number, which may be NaN: `==`
/// would call two identical refusals different).
#[track_caller]
fn same<T: std::fmt::Debug>(a: &T, b: &T, what: &str) {
    assert_eq!(format!("{a:?}"), format!("{b:?}"), "{what} disagree");
}
