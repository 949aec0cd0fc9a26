//! Procedural macros of the `gqa` crate.
//!
//! Thin by design: each macro parses its input and hands it to an `expand` function in its own
//! module, which returns `syn::Result`; errors are turned into spanned `compile_error!`s at the
//! user's tokens.

use proc_macro::TokenStream;

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
