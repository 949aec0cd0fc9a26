//! `head_table!`: the compile-time table of valid (query heads, KV heads) pairs and head dims.
//!
//! A trait bound on a table is what makes `cargo check` (not only `cargo build`) reject an invalid
//! configuration: stable Rust cannot evaluate `HQ % HKV == 0` in a where-clause, but it can look an
//! impl up. The rule that decides which impls exist is the one in `gqa::heads::check_config`;
//! the crate's tests compare this table against it pair by pair.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::parse::{Parse, ParseStream};
use syn::{Ident, LitInt, Token};

/// Upper bound on either limit: the table grows as `n log n` impls and every one is type-checked
/// in each build of `gqa`; beyond this the compile-time cost stops being negligible.
const LARGEST_LIMIT: usize = 1024;

struct Limits {
    max_q_heads: usize,
    max_head_dim: usize,
}

impl Parse for Limits {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut max_q_heads = None;
        let mut max_head_dim = None;
        while !input.is_empty() {
            let key: Ident = input.parse()?;
            input.parse::<Token![=]>()?;
            let lit: LitInt = input.parse()?;
            let value: usize = lit.base10_parse()?;
            if value == 0 || value > LARGEST_LIMIT {
                return Err(syn::Error::new(
                    lit.span(),
                    format!("`{key}` must be in 1..={LARGEST_LIMIT}, got {value}"),
                ));
            }
            let slot = match key.to_string().as_str() {
                "max_q_heads" => &mut max_q_heads,
                "max_head_dim" => &mut max_head_dim,
                other => {
                    return Err(syn::Error::new(
                        key.span(),
                        format!("unknown key `{other}`: expected `max_q_heads` or `max_head_dim`"),
                    ));
                }
            };
            if slot.replace(value).is_some() {
                return Err(syn::Error::new(key.span(), format!("`{key}` given twice")));
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        let missing = |name: &str| {
            syn::Error::new(Span::call_site(), format!("missing `{name} = <integer>`"))
        };
        Ok(Limits {
            max_q_heads: max_q_heads.ok_or_else(|| missing("max_q_heads"))?,
            max_head_dim: max_head_dim.ok_or_else(|| missing("max_head_dim"))?,
        })
    }
}

/// Every `(q_heads, kv_heads)` with `1 <= kv_heads <= q_heads <= max_q_heads` and
/// `q_heads % kv_heads == 0`, in increasing order.
fn valid_head_pairs(max_q_heads: usize) -> Vec<(usize, usize)> {
    (1..=max_q_heads)
        .flat_map(|hq| {
            (1..=hq)
                .filter(move |hkv| hq % hkv == 0)
                .map(move |hkv| (hq, hkv))
        })
        .collect()
}

pub fn expand(input: TokenStream) -> syn::Result<TokenStream> {
    let Limits {
        max_q_heads,
        max_head_dim,
    } = syn::parse2(input)?;
    let pairs = valid_head_pairs(max_q_heads);

    // The limits appear in messages once, here, from the macro's input.
    let q_range_message =
        format!("{{HQ}} query heads are outside the supported range 1..={max_q_heads}");
    let kv_range_message =
        format!("{{HKV}} key/value heads are outside the supported range 1..={max_q_heads}");
    let split_note = format!(
        "gqa needs 1 <= kv_heads <= q_heads <= {max_q_heads} with q_heads a whole multiple of kv_heads \
         (MHA: kv_heads == q_heads, MQA: kv_heads == 1)"
    );
    let dim_note = format!("gqa supports head dims 1..={max_head_dim}");
    let dim_message = format!("head dim {{D}} is outside the supported range 1..={max_head_dim}");
    let zero_heads_panic =
        "gqa: a configuration needs at least one query head and one key/value head";
    let split_panic = "gqa: q_heads must be a whole multiple of kv_heads";
    let too_many_panic = format!("gqa: q_heads must be at most {max_q_heads}");
    let dim_panic = format!("gqa: head_dim must be in 1..={max_head_dim}");

    // Every impl below and the test list come from the same vectors. `do_not_recommend` keeps
    // rustc from listing a sample of the ~1,400 valid impls under every error: the messages say
    // what is valid.
    let head_impls = pairs.iter().map(|&(hq, hkv)| {
        quote! { #[diagnostic::do_not_recommend] impl ValidHeads<#hq, #hkv> for Rule {} }
    });
    let range_impls = (1..=max_q_heads).map(|h| {
        quote! {
            #[diagnostic::do_not_recommend] impl QueryHeadsInRange<#h> for Rule {}
            #[diagnostic::do_not_recommend] impl KvHeadsInRange<#h> for Rule {}
        }
    });
    let dim_impls = (1..=max_head_dim)
        .map(|d| quote! { #[diagnostic::do_not_recommend] impl ValidHeadDim<#d> for Rule {} });
    let pair_q: Vec<_> = pairs.iter().map(|p| p.0).collect();
    let pair_kv: Vec<_> = pairs.iter().map(|p| p.1).collect();

    Ok(quote! {
        /// The largest number of query (and key/value) heads a configuration may have.
        pub const MAX_Q_HEADS: usize = #max_q_heads;
        /// The largest head dimension a configuration may have.
        pub const MAX_HEAD_DIM: usize = #max_head_dim;

        /// The compile-time face of the rule: holds for [`Rule`] exactly when `HQ` query heads,
        /// `HKV` key/value heads and head dim `D` form a valid configuration. Name it to pass the
        /// rule on in generic code: `where Rule: Supported<HQ, HKV, D>`.
        #[diagnostic::on_unimplemented(
            message = "{HQ} query heads, {HKV} key/value heads and head dim {D} are not a supported configuration",
            label = "invalid configuration: {HQ} query heads, {HKV} key/value heads, head dim {D}",
            note = #split_note,
            note = #dim_note
        )]
        pub trait Supported<const HQ: usize, const HKV: usize, const D: usize> {}
        impl<const HQ: usize, const HKV: usize, const D: usize> Supported<HQ, HKV, D> for Rule where
            Rule: QueryHeadsInRange<HQ> + KvHeadsInRange<HKV> + ValidHeads<HQ, HKV> + ValidHeadDim<D>
        {
        }

        /// Holds for [`Rule`] when `1 <= HQ <= MAX_Q_HEADS`.
        #[diagnostic::on_unimplemented(message = #q_range_message, label = "invalid number of query heads", note = #split_note)]
        pub trait QueryHeadsInRange<const HQ: usize> {}

        /// Holds for [`Rule`] when `1 <= HKV <= MAX_Q_HEADS`.
        #[diagnostic::on_unimplemented(message = #kv_range_message, label = "invalid number of key/value heads", note = #split_note)]
        pub trait KvHeadsInRange<const HKV: usize> {}

        /// Holds for [`Rule`] when `HQ` query heads can be shared evenly by `HKV` key/value heads.
        #[diagnostic::on_unimplemented(
            message = "{HQ} query heads cannot be shared evenly by {HKV} key/value heads",
            label = "invalid head configuration: {HQ} query heads, {HKV} key/value heads",
            note = #split_note
        )]
        pub trait ValidHeads<const HQ: usize, const HKV: usize> {}

        /// Holds for [`Rule`] when `1 <= D <= MAX_HEAD_DIM`.
        #[diagnostic::on_unimplemented(message = #dim_message, label = "invalid head dim {D}")]
        pub trait ValidHeadDim<const D: usize> {}

        /// The messages of the build-time backstop ([`assert_config`]).
        const PANIC_ZERO_HEADS: &str = #zero_heads_panic;
        const PANIC_NOT_DIVISIBLE: &str = #split_panic;
        const PANIC_TOO_MANY_Q_HEADS: &str = #too_many_panic;
        const PANIC_HEAD_DIM: &str = #dim_panic;

        #(#head_impls)*
        #(#range_impls)*
        #(#dim_impls)*

        /// Every `(q_heads, kv_heads)` the table holds, for the crate's test against its rule.
        #[cfg(test)]
        const VALID_HEAD_PAIRS: &[(usize, usize)] = &[#((#pair_q, #pair_kv)),*];

        /// Compiles only if every pair of `VALID_HEAD_PAIRS` has its impl.
        #[cfg(test)]
        #[allow(dead_code)]
        fn every_listed_pair_has_its_impl() {
            fn has<const HQ: usize, const HKV: usize>() where Rule: ValidHeads<HQ, HKV> {}
            #(has::<#pair_q, #pair_kv>();)*
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_exactly_the_divisor_pairs() {
        let pairs = valid_head_pairs(12);
        assert_eq!(
            pairs
                .iter()
                .filter(|p| p.0 == 12)
                .map(|p| p.1)
                .collect::<Vec<_>>(),
            [1, 2, 3, 4, 6, 12]
        );
        assert_eq!(
            pairs
                .iter()
                .filter(|p| p.0 == 7)
                .map(|p| p.1)
                .collect::<Vec<_>>(),
            [1, 7]
        );
        assert!(!pairs.contains(&(12, 5)));
        // sum of the divisor counts of 1..=12
        assert_eq!(pairs.len(), 1 + 2 + 2 + 3 + 2 + 4 + 2 + 4 + 3 + 4 + 2 + 6);
    }

    #[test]
    fn expands_constants_and_impls() {
        let out = expand(quote!(max_q_heads = 4, max_head_dim = 2))
            .unwrap()
            .to_string();
        assert!(
            out.contains("pub const MAX_Q_HEADS : usize = 4usize"),
            "{out}"
        );
        assert!(
            out.contains("impl ValidHeads < 4usize , 2usize > for Rule"),
            "{out}"
        );
        assert!(!out.contains("ValidHeads < 4usize , 3usize >"), "{out}");
        assert!(
            out.contains("impl ValidHeadDim < 2usize > for Rule"),
            "{out}"
        );
        assert!(!out.contains("impl ValidHeadDim < 3usize >"), "{out}");
        assert!(
            out.contains("impl KvHeadsInRange < 4usize > for Rule"),
            "{out}"
        );
        assert!(!out.contains("impl QueryHeadsInRange < 5usize >"), "{out}");
        assert!(
            out.contains("\"{HQ} query heads are outside the supported range 1..=4\""),
            "{out}"
        );
        assert!(
            out.contains("\"head dim {D} is outside the supported range 1..=2\""),
            "{out}"
        );
    }

    #[test]
    fn rejects_bad_input_with_a_message() {
        let err = |ts| expand(ts).unwrap_err().to_string();
        assert_eq!(
            err(quote!(max_q_heads = 0, max_head_dim = 2)),
            "`max_q_heads` must be in 1..=1024, got 0"
        );
        assert_eq!(
            err(quote!(max_heads = 4, max_head_dim = 2)),
            "unknown key `max_heads`: expected `max_q_heads` or `max_head_dim`"
        );
        assert_eq!(
            err(quote!(max_q_heads = 4)),
            "missing `max_head_dim = <integer>`"
        );
        assert_eq!(
            err(quote!(max_q_heads = 4, max_q_heads = 8, max_head_dim = 2)),
            "`max_q_heads` given twice"
        );
    }
}
