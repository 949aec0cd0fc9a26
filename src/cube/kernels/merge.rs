//! Writing finished rows, and merging the partial states of key splits (Flash-Decoding's
//! algebra): shared by the forward and decode kernels.

use cubecl::prelude::*;

use super::math::{NEG_BIG, NEG_INFINITY_BITS, accurate_exp, accurate_ln};

/// Writes one finished row, held in `acc[acc_at..acc_at + dim]`: `acc / l` and its LSE `m + ln l` to the final `o`, `lse` at
/// `out_row`; or, for a split launch, `acc / l` and the pair `(m, l)` to the f32 partial state
/// at `partial_row` (see [`combine_splits`]). A row that saw no
/// key (`l = 0`, `acc = 0`) gets 0 and LSE −∞. The output is divided by `l` rather than
/// multiplied by `1/l`: one rounding instead of two.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn write_row<F: Float>(
    acc: &Array<f32>,
    acc_at: usize,
    m: f32,
    l: f32,
    out_row: usize,
    partial_row: usize,
    o: &mut [F],
    lse: &mut [f32],
    o_partial: &mut [f32],
    lse_partial: &mut [f32],
    #[comptime] dim: usize,
    #[comptime] split: bool,
) {
    let denom = if l > 0.0f32 { l } else { 1.0f32 };
    if split {
        // The state itself, not its LSE: (max score, Σ exp(s − max)) merges without rounding
        // `max + ln l` to f32 once per split.
        for d in 0..dim {
            o_partial[partial_row * dim + d] = acc[acc_at + d] / denom;
        }
        lse_partial[2 * partial_row] = m;
        lse_partial[2 * partial_row + 1] = l;
    } else {
        for d in 0..dim {
            o[out_row * dim + d] = F::cast_from(acc[acc_at + d] / denom);
        }
        lse[out_row] = if l > 0.0f32 {
            m + accurate_ln(l)
        } else {
            f32::reinterpret(NEG_INFINITY_BITS)
        };
    }
}

/// Merges the f32 partial states of `splits` key ranges: `state` holds per split and row the
/// pair (max score `m_s`, `l_s = Σ exp(s − m_s)`), `o_partial` the output normalised by `l_s`.
/// With `M = max m_s` and `L = Σ exp(m_s − M) · l_s`, the output is
/// `Σ exp(m_s − M) · l_s · o_s / L` and the LSE `M + ln L` — or, with `pair_out`, the pair
/// `(M, L)` itself (a partial for a later merge). One unit per row.
#[cube(launch)]
pub fn combine_splits<F: Float>(
    o_partial: &[f32],
    state: &[f32],
    o: &mut [F],
    lse: &mut [f32],
    rows: u32,
    splits: u32,
    #[comptime] head_dim: usize,
    #[comptime] pair_out: bool,
) {
    // A 2-D grid of 1-D cubes (one dimension of the grid may be too small for every row).
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    if row < rows {
        let mut m = NEG_BIG.runtime();
        for s in 0..splits {
            let at = ((s * rows + row) * 2) as usize;
            if state[at + 1] > 0.0f32 {
                m = max(m, state[at]);
            }
        }
        let mut total = 0.0f32;
        for s in 0..splits {
            let at = ((s * rows + row) * 2) as usize;
            if state[at + 1] > 0.0f32 {
                total += accurate_exp(state[at] - m) * state[at + 1];
            }
        }
        let mut inv = 0.0f32;
        if total > 0.0f32 {
            inv = 1.0f32 / total;
        }
        for d in 0..head_dim {
            let mut acc = 0.0f32;
            for s in 0..splits {
                let at = (s * rows + row) as usize;
                let l_s = state[2 * at + 1];
                if l_s > 0.0f32 {
                    acc += accurate_exp(state[2 * at] - m) * l_s * o_partial[at * head_dim + d];
                }
            }
            o[row as usize * head_dim + d] = F::cast_from(acc * inv);
        }
        if pair_out {
            lse[2 * row as usize] = m;
            lse[2 * row as usize + 1] = total;
        } else {
            lse[row as usize] = if total > 0.0f32 {
                m + accurate_ln(total)
            } else {
                f32::reinterpret(NEG_INFINITY_BITS)
            };
        }
    }
}
