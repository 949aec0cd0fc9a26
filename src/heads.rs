//! The configuration rule — the one home of "which head splits and head dims are valid".
//!
//! A configuration `(q_heads, kv_heads, head_dim)` is valid when
//!
//! - `1 <= kv_heads <= q_heads <= MAX_Q_HEADS` (256) and `q_heads % kv_heads == 0`, so every KV
//!   head serves a whole group of `q_heads / kv_heads` query heads; and
//! - `1 <= head_dim <= MAX_HEAD_DIM` (256), any value in that range (80 and 96 included).
//!
//! The rule is enforced three ways, all from this file:
//!
//! 1. at run time by [`check_config`] (every `DynAttention` goes through it);
//! 2. under `cargo check` by the trait bounds [`ValidHeads`] and [`ValidHeadDim`] on [`Rule`],
//!    implemented only for valid values by a table that `gqa-macros` generates (a where-clause
//!    cannot compute `HQ % HKV`, but it can look an impl up), with a message naming the numbers;
//! 3. under `cargo build` by a `const` assertion that calls [`check_config`] — the backstop for
//!    generic code that never named the bounds, and for the table itself drifting from the rule.

use crate::error::Result;

/// The type the validity table is implemented for: `Rule: ValidHeads<32, 8>` holds, `Rule:
/// ValidHeads<32, 6>` does not. Outside crates cannot add impls (orphan rules), so the table is
/// sealed.
#[derive(Debug, Clone, Copy)]
pub struct Rule;

/// Holds for `Rule` exactly when `HQ` query heads can be shared evenly by `HKV` key/value heads.
#[diagnostic::on_unimplemented(
    message = "{HQ} query heads cannot be shared evenly by {HKV} key/value heads",
    label = "invalid head configuration: {HQ} query heads, {HKV} key/value heads",
    note = "gqa needs 1 <= kv_heads <= q_heads <= 256 with q_heads a whole multiple of kv_heads (MHA: kv_heads == q_heads, MQA: kv_heads == 1)"
)]
pub trait ValidHeads<const HQ: usize, const HKV: usize> {}

/// Holds for `Rule` exactly when `D` is a supported head dim (`1..=256`).
#[diagnostic::on_unimplemented(
    message = "head dim {D} is not supported",
    label = "invalid head dim {D}",
    note = "gqa supports head dims 1..=256"
)]
pub trait ValidHeadDim<const D: usize> {}

gqa_macros::head_table!(max_q_heads = 256, max_head_dim = 256);

/// Why a configuration is invalid. `Copy` and `const`-friendly so that the compile-time
/// backstop can use the same function as the run-time check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `q_heads` or `kv_heads` is 0.
    #[error("a configuration needs at least one query head and one key/value head, got {q_heads} query heads and {kv_heads} key/value heads")]
    ZeroHeads { q_heads: usize, kv_heads: usize },
    /// `q_heads` is not a whole multiple of `kv_heads` (this includes `kv_heads > q_heads`).
    #[error("{q_heads} query heads cannot be shared evenly by {kv_heads} key/value heads")]
    HeadsNotDivisible { q_heads: usize, kv_heads: usize },
    /// `q_heads` is above [`MAX_Q_HEADS`].
    #[error("{q_heads} query heads exceed the supported maximum of {max}")]
    TooManyQueryHeads { q_heads: usize, max: usize },
    /// `head_dim` is 0 or above [`MAX_HEAD_DIM`].
    #[error("head dim {head_dim} is outside the supported range 1..={max}")]
    HeadDimOutOfRange { head_dim: usize, max: usize },
}

/// The configuration rule (see the module docs). `const`, so the compile-time backstop and the
/// run-time check are the same code.
///
/// # Examples
/// ```
/// use gqa::heads::{check_config, ConfigError};
/// assert!(check_config(32, 8, 128).is_ok());
/// assert_eq!(
///     check_config(32, 6, 128),
///     Err(ConfigError::HeadsNotDivisible { q_heads: 32, kv_heads: 6 })
/// );
/// ```
pub const fn check_config(q_heads: usize, kv_heads: usize, head_dim: usize) -> Result<(), ConfigError> {
    if q_heads == 0 || kv_heads == 0 {
        return Err(ConfigError::ZeroHeads { q_heads, kv_heads });
    }
    if q_heads > MAX_Q_HEADS {
        return Err(ConfigError::TooManyQueryHeads { q_heads, max: MAX_Q_HEADS });
    }
    if q_heads % kv_heads != 0 {
        return Err(ConfigError::HeadsNotDivisible { q_heads, kv_heads });
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(ConfigError::HeadDimOutOfRange { head_dim, max: MAX_HEAD_DIM });
    }
    Ok(())
}

/// The compile-time face of [`check_config`]: panics during const evaluation with the reason.
/// rustc's report names the instantiation (`Attention::<32, 6, 128>::VALID`), hence the numbers.
pub(crate) const fn assert_config(q_heads: usize, kv_heads: usize, head_dim: usize) {
    match check_config(q_heads, kv_heads, head_dim) {
        Ok(()) => {}
        Err(ConfigError::ZeroHeads { .. }) => {
            panic!("gqa: a configuration needs at least one query head and one key/value head")
        }
        Err(ConfigError::HeadsNotDivisible { .. }) => {
            panic!("gqa: q_heads must be a whole multiple of kv_heads")
        }
        Err(ConfigError::TooManyQueryHeads { .. }) => {
            panic!("gqa: q_heads is above the supported maximum (256)")
        }
        Err(ConfigError::HeadDimOutOfRange { .. }) => {
            panic!("gqa: head_dim must be in 1..=256")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated table and the run-time rule must agree on every pair, or `cargo check` and
    /// `DynAttention` would accept different configurations.
    #[test]
    fn table_matches_rule_on_every_pair() {
        let table: std::collections::HashSet<_> = VALID_HEAD_PAIRS.iter().copied().collect();
        assert_eq!(table.len(), VALID_HEAD_PAIRS.len(), "duplicate pairs in the table");
        for q_heads in 0..=MAX_Q_HEADS + 1 {
            for kv_heads in 0..=MAX_Q_HEADS + 1 {
                assert_eq!(
                    table.contains(&(q_heads, kv_heads)),
                    check_config(q_heads, kv_heads, 64).is_ok(),
                    "table and rule disagree on {q_heads}/{kv_heads}"
                );
            }
        }
    }

    #[test]
    fn head_dim_range_is_one_to_max() {
        assert!(check_config(8, 8, 0).is_err());
        assert!(check_config(8, 8, 1).is_ok());
        assert!(check_config(8, 8, 80).is_ok());
        assert!(check_config(8, 8, MAX_HEAD_DIM).is_ok());
        assert_eq!(
            check_config(8, 8, MAX_HEAD_DIM + 1),
            Err(ConfigError::HeadDimOutOfRange { head_dim: 257, max: 256 })
        );
    }

    #[test]
    fn errors_name_the_numbers() {
        assert_eq!(
            check_config(32, 6, 128).unwrap_err().to_string(),
            "32 query heads cannot be shared evenly by 6 key/value heads"
        );
        assert_eq!(
            check_config(4, 8, 128).unwrap_err().to_string(),
            "4 query heads cannot be shared evenly by 8 key/value heads"
        );
        assert_eq!(
            check_config(512, 8, 128).unwrap_err().to_string(),
            "512 query heads exceed the supported maximum of 256"
        );
        assert!(matches!(check_config(0, 0, 64), Err(ConfigError::ZeroHeads { .. })));
    }
}
