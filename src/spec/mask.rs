//! Masks: which keys a query may attend to.
//!
//! Every mask `gqa` knows — none, causal, sliding window, causal ∧ window — has the same shape:
//! query `i` sees the keys `j` with `diag(i) - left <= j <= diag(i) + right`, where a side may be
//! unbounded and `diag(i)` is the query's position on the key axis:
//!
//! - **bottom-right** alignment (the default, as in FlashAttention): `diag(i) = i + seq_k - seq_q`.
//!   The last query lines up with the last key — what decode and chunked prefill need. With
//!   `seq_q > seq_k` the first `seq_q - seq_k` causal rows see nothing (output 0, LSE −∞).
//! - **top-left** alignment: `diag(i) = i`, PyTorch's `is_causal=True` convention.
//!
//! So the visible keys of a row are always one contiguous range ([`Mask::visible_keys`]); causal
//! is `right = 0`, and composing masks intersects ranges (the smaller bound wins per side).

use std::ops::Range;

/// Where the mask's diagonal sits when `seq_q != seq_k` ([module docs](self)). ALiBi distances
/// are measured from the same diagonal, so the alignment matters even without a mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Alignment {
    /// `diag(i) = i + seq_k - seq_q` (FlashAttention; decode and chunked prefill).
    #[default]
    BottomRight,
    /// `diag(i) = i` (PyTorch's `is_causal=True`).
    TopLeft,
}

/// A band mask `diag(i) - left <= j <= diag(i) + right`; `None` is an unbounded side.
///
/// `Mask::default()` is no mask at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mask {
    left: Option<usize>,
    right: Option<usize>,
    alignment: Alignment,
}

impl Mask {
    /// No mask: every query sees every key.
    pub const NONE: Mask = Mask {
        left: None,
        right: None,
        alignment: Alignment::BottomRight,
    };

    /// Keys at most `left` before and `right` after the diagonal (unbounded when `None`).
    pub const fn band(left: Option<usize>, right: Option<usize>, alignment: Alignment) -> Mask {
        Mask {
            left,
            right,
            alignment,
        }
    }

    /// This mask further restricted to keys at or before the diagonal.
    pub const fn causal(self) -> Mask {
        self.intersect(None, Some(0))
    }

    /// This mask further restricted to a window of `left` keys before and `right` after the
    /// diagonal.
    pub const fn window(self, left: usize, right: usize) -> Mask {
        self.intersect(Some(left), Some(right))
    }

    /// The same band measured from another diagonal.
    pub const fn aligned(self, alignment: Alignment) -> Mask {
        Mask { alignment, ..self }
    }

    const fn intersect(self, left: Option<usize>, right: Option<usize>) -> Mask {
        const fn min(a: Option<usize>, b: Option<usize>) -> Option<usize> {
            match (a, b) {
                (Some(a), Some(b)) => Some(if a < b { a } else { b }),
                (Some(x), None) | (None, Some(x)) => Some(x),
                (None, None) => None,
            }
        }
        Mask {
            left: min(self.left, left),
            right: min(self.right, right),
            alignment: self.alignment,
        }
    }

    /// How many keys before the diagonal are visible (`None`: all of them).
    pub const fn left(&self) -> Option<usize> {
        self.left
    }

    /// How many keys after the diagonal are visible (`None`: all of them; `Some(0)`: causal).
    pub const fn right(&self) -> Option<usize> {
        self.right
    }

    /// The diagonal's reference corner.
    pub const fn alignment(&self) -> Alignment {
        self.alignment
    }

    /// True when no key is ever hidden (both sides unbounded).
    pub const fn is_none(&self) -> bool {
        self.left.is_none() && self.right.is_none()
    }

    /// True when no key after the diagonal is visible.
    pub const fn is_causal(&self) -> bool {
        matches!(self.right, Some(0))
    }

    /// The key position that query `i` lines up with (may be negative or `>= seq_k`).
    pub const fn diagonal(&self, i: usize, seq_q: usize, seq_k: usize) -> i128 {
        match self.alignment {
            Alignment::BottomRight => i as i128 + seq_k as i128 - seq_q as i128,
            Alignment::TopLeft => i as i128,
        }
    }

    /// The keys query `i` may see, as a range of key positions (empty for a fully masked row).
    ///
    /// Computed in `i128`, where `usize` sides cannot overflow: `window(0, usize::MAX)` is a
    /// band that is unbounded on the right in practice, not a wrapped-around empty one.
    pub fn visible_keys(&self, i: usize, seq_q: usize, seq_k: usize) -> Range<usize> {
        let diag = self.diagonal(i, seq_q, seq_k);
        let seq_k_wide = seq_k as i128;
        let lo = self
            .left
            .map_or(0, |left| (diag - left as i128).clamp(0, seq_k_wide));
        let hi = self.right.map_or(seq_k_wide, |right| {
            (diag + right as i128 + 1).clamp(0, seq_k_wide)
        });
        // Both bounds lie in 0..=seq_k, so they fit in usize.
        lo as usize..hi.max(lo) as usize
    }

    /// Whether query `i` may see key `j`.
    pub fn is_visible(&self, i: usize, j: usize, seq_q: usize, seq_k: usize) -> bool {
        self.visible_keys(i, seq_q, seq_k).contains(&j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(mask: Mask, seq_q: usize, seq_k: usize) -> Vec<Range<usize>> {
        (0..seq_q)
            .map(|i| mask.visible_keys(i, seq_q, seq_k))
            .collect()
    }

    #[test]
    fn causal_bottom_right_with_more_queries_than_keys_masks_the_first_rows() {
        // seq_q 4, seq_k 2: diag(i) = i - 2, so rows 0 and 1 see nothing, row 2 sees key 0.
        assert_eq!(
            rows(Mask::NONE.causal(), 4, 2),
            vec![0..0, 0..0, 0..1, 0..2]
        );
    }

    #[test]
    fn causal_top_left_with_more_keys_than_queries() {
        let mask = Mask::NONE.causal().aligned(Alignment::TopLeft);
        assert_eq!(rows(mask, 2, 4), vec![0..1, 0..2]);
        assert_eq!(rows(Mask::NONE.causal(), 2, 4), vec![0..3, 0..4]);
    }

    #[test]
    fn window_composes_with_causal_by_intersection() {
        // left 1, right 2, then causal: right becomes 0.
        let mask = Mask::NONE.window(1, 2).causal();
        assert_eq!((mask.left(), mask.right()), (Some(1), Some(0)));
        assert_eq!(rows(mask, 4, 4), vec![0..1, 0..2, 1..3, 2..4]);
        assert_eq!(mask, Mask::NONE.causal().window(1, 2));
    }

    #[test]
    fn window_clips_at_both_ends() {
        assert_eq!(rows(Mask::NONE.window(1, 1), 3, 3), vec![0..2, 0..3, 1..3]);
    }

    #[test]
    fn huge_sides_do_not_overflow() {
        // A right side of usize::MAX is "everything to the right", not a wrapped-around bound:
        // with diag(i) = i - 2 and left 0, row i sees keys j >= i - 2.
        assert_eq!(
            rows(Mask::NONE.window(0, usize::MAX), 4, 2),
            vec![0..2, 0..2, 0..2, 1..2]
        );
        assert_eq!(
            rows(Mask::NONE.causal().window(usize::MAX, 0), 5, 2),
            vec![0..0, 0..0, 0..0, 0..1, 0..2]
        );
        assert_eq!(
            rows(
                Mask::band(Some(usize::MAX), Some(usize::MAX), Alignment::TopLeft),
                2,
                3
            ),
            vec![0..3, 0..3]
        );
    }

    #[test]
    fn no_mask_sees_everything_and_empty_keys_see_nothing() {
        assert_eq!(rows(Mask::NONE, 2, 3), vec![0..3, 0..3]);
        assert_eq!(rows(Mask::NONE.causal(), 2, 0), vec![0..0, 0..0]);
    }
}
