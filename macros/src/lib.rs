//! Procedural macros of the `gqa` crate.
//!
//! Thin by design: each macro parses its input and hands it to an `expand` function in its own
//! module, which returns `syn::Result`; errors are turned into spanned `compile_error!`s at the
//! user's tokens.

use proc_macro::TokenStream;

mod dsl;
mod head_table;

/// Generates the sealed table of valid head configurations of `gqa` (see `gqa::heads`).
///
/// ```text
/// gqa_macros::head_table!(max_q_heads = 256, max_head_dim = 256);
/// ```
///
/// Emits, in the calling module:
/// - `pub const MAX_Q_HEADS: usize` and `pub const MAX_HEAD_DIM: usize`;
/// - `impl ValidHeads<HQ, HKV> for Rule {}` for every `1 <= HKV <= HQ <= max_q_heads` with
///   `HQ % HKV == 0`;
/// - `impl ValidHeadDim<D> for Rule {}` for every `1 <= D <= max_head_dim`;
/// - `#[cfg(test)] const VALID_HEAD_PAIRS: &[(usize, usize)]`, so the crate can test the table
///   against its runtime rule.
///
/// The traits `ValidHeads`, `ValidHeadDim` and the type `Rule` must be in scope.
#[proc_macro]
pub fn head_table(input: TokenStream) -> TokenStream {
    head_table::expand(input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Turns one restricted function `fn name(captures…, at: Position) -> bool` into a mask mod
/// (`gqa::dsl::MaskMod`): a constructor `name(captures…)` of a type `Name` with a host and a
/// kernel implementation. The language and what it generates: `gqa::dsl`.
#[proc_macro_attribute]
pub fn mask_mod(attr: TokenStream, item: TokenStream) -> TokenStream {
    dsl::expand(dsl::Kind::Mask, attr.into(), item.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Turns one restricted function `fn name(captures…, s: f32, at: Position) -> f32` into a
/// score mod (`gqa::dsl::ScoreMod`): a constructor `name(captures…)` of a type `Name` with a
/// host implementation generic over the number type, a kernel implementation and a derivative.
/// The language and what it generates: `gqa::dsl`.
#[proc_macro_attribute]
pub fn score_mod(attr: TokenStream, item: TokenStream) -> TokenStream {
    dsl::expand(dsl::Kind::Score, attr.into(), item.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
