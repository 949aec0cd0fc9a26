//! [`dispatch!`]: from head counts read at run time to code generic over
//! `Attention<HQ, HKV, D>`.

/// Turns `(q_heads, kv_heads, head_dim)` known only at run time — read from a model's
/// `config.json`, say — into code monomorphised for `Attention<HQ, HKV, D>`, for each
/// configuration the call site lists. Any other configuration is
/// [`Error::NotDispatched`](crate::Error::NotDispatched), naming it and the list.
///
/// The body is an expression in which `HQ`, `HKV` and `D` (the names the call gives) are
/// `const` items, usable as const generic arguments. It is compiled once per listed
/// configuration and evaluated in place (it is not a closure: `?` and `return` act on the
/// enclosing function). Each listed configuration is checked against the configuration rule
/// under `cargo check`, so an invalid one does not compile.
///
/// The first argument is a parenthesised triple of `usize` expressions, `(q_heads, kv_heads,
/// head_dim)` written out (a variable holding a tuple is not one), or an expression of a type
/// that borrows as a [`ModelConfig`](crate::ModelConfig) (`config`, `&config`).
///
/// ```
/// use gqa::{Attention, DType, ModelConfig};
/// let config = ModelConfig::from_json_str(
///     r#"{"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}"#,
/// )?;
/// // KV-cache bytes per token and layer, in bf16, computed by the typed API.
/// let bytes = gqa::dispatch!(&config, [(32, 8, 128), (32, 32, 128), (71, 1, 64)], |HQ, HKV, D| {
///     Attention::<HQ, HKV, D>::new().kv_cache(DType::BF16).bytes(1, 1, 1)
/// })?;
/// assert_eq!(bytes, 2 * 8 * 128 * 2);
///
/// let unknown = gqa::dispatch!((40, 8, 128), [(32, 8, 128)], |HQ, HKV, D| Attention::<HQ, HKV, D>::GROUP);
/// assert!(matches!(unknown, Err(gqa::Error::NotDispatched { q_heads: 40, .. })));
/// # Ok::<(), gqa::Error>(())
/// ```
///
/// A listed configuration that breaks the rule does not compile:
/// ```compile_fail
/// let group = gqa::dispatch!((32, 6, 128), [(32, 6, 128)], |HQ, HKV, D| gqa::Attention::<HQ, HKV, D>::GROUP);
/// ```
#[macro_export]
macro_rules! dispatch {
    (
        ($q_heads:expr, $kv_heads:expr, $head_dim:expr $(,)?),
        [$(($hq:literal, $hkv:literal, $d:literal)),+ $(,)?],
        |$HQ:ident, $HKV:ident, $D:ident| $body:expr $(,)?
    ) => {{
        let (q_heads, kv_heads, head_dim): (usize, usize, usize) = ($q_heads, $kv_heads, $head_dim);
        match (q_heads, kv_heads, head_dim) {
            $(
                ($hq, $hkv, $d) => {
                    const $HQ: usize = $hq;
                    const $HKV: usize = $hkv;
                    const $D: usize = $d;
                    // Names the type, so the configuration rule checks the listed numbers
                    // even where the body does not use them.
                    let _ = <$crate::Attention<$HQ, $HKV, $D>>::GROUP;
                    ::core::result::Result::<_, $crate::Error>::Ok($body)
                }
            )+
            (q_heads, kv_heads, head_dim) => ::core::result::Result::Err($crate::Error::NotDispatched {
                q_heads,
                kv_heads,
                head_dim,
                compiled: ::std::string::String::from(::core::concat!(
                    $("(", ::core::stringify!($hq), ", ", ::core::stringify!($hkv), ", ", ::core::stringify!($d), ") "),+
                ))
                .trim_end()
                .to_string(),
            }),
        }
    }};
    (
        $config:expr,
        [$(($hq:literal, $hkv:literal, $d:literal)),+ $(,)?],
        |$HQ:ident, $HKV:ident, $D:ident| $body:expr $(,)?
    ) => {{
        let config = &$config;
        let config: &$crate::ModelConfig = ::core::borrow::Borrow::borrow(config);
        $crate::dispatch!(
            (config.num_attention_heads, config.num_key_value_heads, config.head_dim),
            [$(($hq, $hkv, $d)),+],
            |$HQ, $HKV, $D| $body
        )
    }};
}
