//! Every configuration of the shared list (`tests/common/configs.rs`), through the typed front
//! end: the const parameters, the dynamic twin, the KV-cache claim, and the GQA law at the real
//! head counts. One test per configuration and law, named after both.

#[macro_use]
mod common;

use common::*;
use gqa::{Attention, DType, DynAttention, oracle};
use proptest::prelude::*;

macro_rules! config_tests {
    ($name:ident, $hq:literal, $hkv:literal, $d:literal) => {
        paste::paste! {
            #[test]
            fn [<$name _typed_equals_dynamic>]() {
                type A = Attention<$hq, $hkv, $d>;
                assert_eq!((A::Q_HEADS, A::KV_HEADS, A::HEAD_DIM, A::GROUP), ($hq, $hkv, $d, $hq / $hkv));
                let typed = A::new().causal().window(7, 0).softcap(30.0).alibi();
                let dynamic = DynAttention::try_new($hq, $hkv, $d).unwrap().causal().window(7, 0).softcap(30.0).alibi();
                assert_eq!(typed.spec(), dynamic.spec());
                assert_eq!(A::try_from(dynamic), Ok(typed));
            }

            #[test]
            fn [<$name _kv_cache_is_mha_cache_over_group>]() {
                type A = Attention<$hq, $hkv, $d>;
                for (dtype, bytes) in [(DType::F32, 4u128), (DType::F16, 2), (DType::BF16, 2)] {
                    let cache = A::new().kv_cache(dtype);
                    // K and V, per KV head, per channel: written out, not taken from the code.
                    assert_eq!(cache.bytes(32, 4, 8192), 32 * 4 * 8192 * 2 * $hkv * $d * bytes);
                    let mha = Attention::<$hq, $hq, $d>::new().kv_cache(dtype);
                    assert_eq!(mha.bytes(32, 4, 8192), ($hq / $hkv) * cache.bytes(32, 4, 8192));
                    assert_eq!(cache.mha_equivalent(), mha);
                }
            }

            properties! {
                cases = cases(8), persist;
                /// The GQA law at this configuration's real head counts.
                fn [<$name _gqa_equals_mha_on_repeated_kv>](
                    (spec, q, k, v) in (mask(), modifiers($hq), 1..=9usize, 1..=9usize).prop_flat_map(|(mask, mods, seq_q, seq_k)| {
                        let spec = build_spec($hq, $hkv, $d, mask, &mods);
                        (Just(spec), tensor([1, $hq, seq_q, $d]), tensor([1, $hkv, seq_k, $d]), tensor([1, $hkv, seq_k, $d]))
                    })
                ) {
                    let mha = spec.try_with_kv_heads($hq).unwrap();
                    let (k_rep, v_rep) = (repeat_kv(&k, $hq / $hkv), repeat_kv(&v, $hq / $hkv));
                    prop_assert_eq!(
                        oracle::forward(&spec, q.view(), k.view(), v.view()),
                        oracle::forward(&mha, q.view(), k_rep.view(), v_rep.view())
                    );
                }
            }
        }
    };
}

/// `PROPTEST_CASES` if set (for deeper local runs), else `default`.
fn cases(default: u32) -> u32 {
    runner::env_count("PROPTEST_CASES", default)
}

for_each_config!(config_tests);
