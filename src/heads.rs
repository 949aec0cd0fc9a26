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
//! 2. under `cargo check` by the bound `Rule: Supported<HQ, HKV, D>` on [`crate::Attention`]
//!    itself, so that an invalid configuration cannot even be named as a type. `Supported` holds
//!    when [`QueryHeadsInRange`], [`KvHeadsInRange`], [`ValidHeads`] and [`ValidHeadDim`] do; those
//!    are implemented only for valid values, by a table that `gqa-macros` generates (a
//!    where-clause cannot compute `HQ % HKV`, but it can look an impl up), and each names the
//!    numbers in its error message;
//! 3. under `cargo build` by a `const` assertion that calls [`check_config`]: the backstop,
//!    should the table and the rule ever drift apart.
//!
//! The limits (256 and 256) are written once, in the `head_table!` invocation below; the
//! constants and the messages come from there.

use crate::error::Result;

/// The type the validity table is implemented for: `Rule: ValidHeads<32, 8>` holds, `Rule:
/// ValidHeads<32, 6>` does not. Outside crates cannot add impls (orphan rules), so the table is
/// sealed.
#[derive(Debug, Clone, Copy)]
pub struct Rule;

gqa_macros::head_table!(max_q_heads = 256, max_head_dim = 256);

/// Why a configuration is invalid. `Copy` and `const`-friendly so that the compile-time
/// backstop can use the same function as the run-time check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `q_heads` or `kv_heads` is 0.
    #[error(
        "a configuration needs at least one query head and one key/value head, got {q_heads} query heads and {kv_heads} key/value heads"
    )]
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
pub const fn check_config(
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<(), ConfigError> {
    if q_heads == 0 || kv_heads == 0 {
        return Err(ConfigError::ZeroHeads { q_heads, kv_heads });
    }
    if q_heads > MAX_Q_HEADS {
        return Err(ConfigError::TooManyQueryHeads {
            q_heads,
            max: MAX_Q_HEADS,
        });
    }
    if !q_heads.is_multiple_of(kv_heads) {
        return Err(ConfigError::HeadsNotDivisible { q_heads, kv_heads });
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(ConfigError::HeadDimOutOfRange {
            head_dim,
            max: MAX_HEAD_DIM,
        });
    }
    Ok(())
}

/// The compile-time face of [`check_config`]: panics during const evaluation with the reason.
/// rustc's report names the instantiation (`Attention::<32, 6, 128>::VALID`), hence the numbers.
pub(crate) const fn assert_config(q_heads: usize, kv_heads: usize, head_dim: usize) {
    match check_config(q_heads, kv_heads, head_dim) {
        Ok(()) => {}
        Err(ConfigError::ZeroHeads { .. }) => panic!("{}", PANIC_ZERO_HEADS),
        Err(ConfigError::HeadsNotDivisible { .. }) => panic!("{}", PANIC_NOT_DIVISIBLE),
        Err(ConfigError::TooManyQueryHeads { .. }) => panic!("{}", PANIC_TOO_MANY_Q_HEADS),
        Err(ConfigError::HeadDimOutOfRange { .. }) => panic!("{}", PANIC_HEAD_DIM),
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
        assert_eq!(
            table.len(),
            VALID_HEAD_PAIRS.len(),
            "duplicate pairs in the table"
        );
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

    /// The build-time backstop is the run-time rule, panicking: same cases, its own messages.
    #[test]
    fn backstop_panics_on_exactly_the_invalid_configurations() {
        let panics = |hq, hkv, d| {
            std::panic::catch_unwind(|| assert_config(hq, hkv, d))
                .err()
                .map(|payload| {
                    payload
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_default()
                })
        };
        assert_eq!(panics(32, 8, 128), None);
        assert_eq!(
            panics(32, 6, 128).as_deref(),
            Some("gqa: q_heads must be a whole multiple of kv_heads")
        );
        assert_eq!(
            panics(0, 1, 64).as_deref(),
            Some("gqa: a configuration needs at least one query head and one key/value head")
        );
        assert_eq!(
            panics(512, 8, 64).as_deref(),
            Some("gqa: q_heads must be at most 256")
        );
        assert_eq!(
            panics(8, 8, 0).as_deref(),
            Some("gqa: head_dim must be in 1..=256")
        );
    }

    #[test]
    fn head_dim_range_is_one_to_max() {
        assert!(check_config(8, 8, 0).is_err());
        assert!(check_config(8, 8, 1).is_ok());
        assert!(check_config(8, 8, 80).is_ok());
        assert!(check_config(8, 8, MAX_HEAD_DIM).is_ok());
        assert_eq!(
            check_config(8, 8, MAX_HEAD_DIM + 1),
            Err(ConfigError::HeadDimOutOfRange {
                head_dim: 257,
                max: 256
            })
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
        assert!(matches!(
            check_config(0, 0, 64),
            Err(ConfigError::ZeroHeads { .. })
        ));
    }
}
