//! Register-tiled microkernels of the CPU decode, on `pulp`'s portable SIMD types (AVX-512,
//! AVX2+FMA, NEON or scalar, chosen at run time by [`pulp::Arch`]). The callers run them inside
//! one `dispatch`, so that every inlined helper is compiled for the instruction set chosen.
//!
//! - [`dots`]: `out[r][j] = q_r · k_j` for a block of query rows against a block of key rows.
//!   A tile of `R` rows × `K` keys keeps its `R · K` accumulators in registers and loads each
//!   key chunk once for all `R` rows: the shared key row is read once per KV group, and the
//!   `R · K` independent multiply-add chains hide their latency. Each sum is reduced across
//!   lanes once, at the end.
//! - [`weighted_sum`]: `acc_r += Σ_j p[r][j] · v_j` for a block of value rows. A tile of `R`
//!   rows × `C` vector chunks of the output stays in registers over the whole block; each value
//!   chunk is loaded once for all `R` rows.
//!
//! Both use fused multiply-adds (one rounding each); the reductions and sums are in f32, as a
//! matrix product's would be.

use pulp::Simd;

/// Rows of a score tile, and its keys: 4 × 2 = 8 accumulators for groups of 4 or more rows.
const ROWS: usize = 4;
const KEYS_WIDE: usize = 2;
/// A single row (MHA, a group's last rows) takes 8 keys: 8 independent chains.
const KEYS_ONE_ROW: usize = 8;
/// Output chunks (vectors) of a weighted-sum tile: 4 rows × 4 chunks = 16 accumulators.
const CHUNKS: usize = 4;

/// The next block's rows in memory, asked for while this block is computed: while the tiles
/// work on key `j` of this block (their first row tile only), [`Ahead::touch`] asks for row
/// `j` of the next one. Spread like this, the requests keep the memory busy without stalling
/// the arithmetic behind a burst of them.
#[derive(Clone, Copy)]
pub struct Ahead<'a> {
    /// The next block's bytes (empty for none), `per_key` per row.
    pub bytes: &'a [u8],
    pub per_key: usize,
}

impl Ahead<'_> {
    pub const NONE: Ahead<'static> = Ahead {
        bytes: &[],
        per_key: 1,
    };

    /// Asks for the cache lines of row `j` (a hint, without effect on any result).
    #[inline(always)]
    fn touch(self, j: usize) {
        if let Some(row) = self.bytes.get(j * self.per_key..(j + 1) * self.per_key) {
            #[cfg(target_arch = "x86_64")]
            for line in row.chunks(64) {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                // SAFETY: SSE is part of the x86_64 baseline, and a prefetch never faults
                // (the address is in bounds anyway).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = row;
        }
    }
}

/// `out[r · stride + j] = scale · (q[r · dim ..][..dim] · k[j · dim ..][..dim])` for
/// `r < rows`, `j < keys` (the sum and the product in f64, one rounding to f32), asking for
/// the next block meanwhile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn dots<S: Simd>(
    simd: S,
    q: &[f32],
    k: &[f32],
    dim: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
    ahead: Ahead<'_>,
) {
    let rows = q.len() / dim;
    let keys = k.len() / dim;
    let q_row = |r: usize| &q[r * dim..][..dim];
    let k_row = |j: usize| &k[j * dim..][..dim];
    let mut r = 0;
    while r + ROWS <= rows {
        let mut q_tile: [&[f32]; ROWS] = [&[]; ROWS];
        for (i, row) in q_tile.iter_mut().enumerate() {
            *row = q_row(r + i);
        }
        let mut j = 0;
        while j + KEYS_WIDE <= keys {
            if r == 0 {
                ahead.touch(j);
                ahead.touch(j + 1);
            }
            let sums =
                dot_tile::<S, ROWS, KEYS_WIDE>(simd, q_tile, [k_row(j), k_row(j + 1)], scale);
            for (i, row) in sums.iter().enumerate() {
                out[(r + i) * stride + j..][..KEYS_WIDE].copy_from_slice(row);
            }
            j += KEYS_WIDE;
        }
        for j in j..keys {
            if r == 0 {
                ahead.touch(j);
            }
            let sums = dot_tile::<S, ROWS, 1>(simd, q_tile, [k_row(j)], scale);
            for (i, row) in sums.iter().enumerate() {
                out[(r + i) * stride + j] = row[0];
            }
        }
        r += ROWS;
    }
    let first = r;
    for r in r..rows {
        let out = &mut out[r * stride..][..keys];
        let mut j = 0;
        while j + KEYS_ONE_ROW <= keys {
            if r == first && first == 0 {
                for i in 0..KEYS_ONE_ROW {
                    ahead.touch(j + i);
                }
            }
            let mut k_tile: [&[f32]; KEYS_ONE_ROW] = [&[]; KEYS_ONE_ROW];
            for (i, row) in k_tile.iter_mut().enumerate() {
                *row = k_row(j + i);
            }
            let sums = dot_tile::<S, 1, KEYS_ONE_ROW>(simd, [q_row(r)], k_tile, scale);
            out[j..][..KEYS_ONE_ROW].copy_from_slice(&sums[0]);
            j += KEYS_ONE_ROW;
        }
        for (j, score) in out.iter_mut().enumerate().skip(j) {
            if r == first && first == 0 {
                ahead.touch(j);
            }
            *score = dot_tile::<S, 1, 1>(simd, [q_row(r)], [k_row(j)], scale)[0][0];
        }
    }
}

/// The `R × K` dot products of a tile, each over the whole (equal) length of the rows.
#[inline(always)]
fn dot_tile<S: Simd, const R: usize, const K: usize>(
    simd: S,
    q: [&[f32]; R],
    k: [&[f32]; K],
    scale: f32,
) -> [[f32; K]; R] {
    // No closures or array adaptors here (`map`, `from_fn`): a helper that is not inlined is
    // compiled without the instruction set `pulp` enabled, and its intrinsics become calls.
    let dim = q[0].len();
    let chunks = dim / S::F32_LANES;
    let tail = chunks * S::F32_LANES;
    // Slices of exactly `chunks` vectors, so that the indexing below needs no checks.
    let mut qv: [&[S::f32s]; R] = [&[]; R];
    for i in 0..R {
        qv[i] = &S::as_simd_f32s(q[i]).0[..chunks];
    }
    let mut kv: [&[S::f32s]; K] = [&[]; K];
    for j in 0..K {
        kv[j] = &S::as_simd_f32s(k[j]).0[..chunks];
    }
    let mut acc = [[simd.splat_f32s(0.0); K]; R];
    for c in 0..chunks {
        let mut keys = [simd.splat_f32s(0.0); K];
        for j in 0..K {
            keys[j] = kv[j][c];
        }
        for i in 0..R {
            let x = qv[i][c];
            for j in 0..K {
                acc[i][j] = simd.mul_add_e_f32s(x, keys[j], acc[i][j]);
            }
        }
    }
    if tail < dim {
        // The last lanes, zero-filled past the end.
        let mut keys = [simd.splat_f32s(0.0); K];
        for j in 0..K {
            keys[j] = simd.partial_load_f32s(&k[j][tail..]);
        }
        for i in 0..R {
            let x = simd.partial_load_f32s(&q[i][tail..]);
            for j in 0..K {
                acc[i][j] = simd.mul_add_e_f32s(x, keys[j], acc[i][j]);
            }
        }
    }
    let mut sums = [[0.0f32; K]; R];
    for i in 0..R {
        for j in 0..K {
            sums[i][j] = (sum_in_f64(simd, acc[i][j]) * f64::from(scale)) as f32;
        }
    }
    sums
}

/// The sum of a vector's lanes, widened to f64 and added pairwise: the lanes' own partial sums
/// are a sixteenth of the total or less, so their roundings are small next to the one
/// rounding of the scaled score to f32 — an f32 reduction would add one at each level.
#[inline(always)]
fn sum_in_f64<S: Simd>(simd: S, x: S::f32s) -> f64 {
    const MOST: usize = 16; // AVX-512's f32 lanes
    let lanes: &[f32] = bytemuck::cast_slice(std::slice::from_ref(&x));
    let mut wide = [0.0f64; MOST];
    for (w, &l) in wide.iter_mut().zip(lanes) {
        *w = f64::from(l);
    }
    // Twice as many f32 lanes as f64 lanes: two f64 vectors (one for the scalar fallback).
    let (vectors, rest) = S::as_simd_f64s(&wide[..lanes.len()]);
    let mut sum = simd.splat_f64s(0.0);
    for &v in vectors {
        sum = simd.add_f64s(sum, v);
    }
    simd.reduce_sum_f64s(sum) + rest.iter().sum::<f64>()
}

/// `acc[r · dim ..][..dim] += Σ_j p[r · stride + j] · v[j · dim ..][..dim]` for every row `r`
/// of `acc` and `j < v.len() / dim`, asking for the next block meanwhile.
#[inline(always)]
pub fn weighted_sum<S: Simd>(
    simd: S,
    p: &[f32],
    stride: usize,
    v: &[f32],
    dim: usize,
    acc: &mut [f32],
    ahead: Ahead<'_>,
) {
    let rows = acc.len() / dim;
    let keys = v.len() / dim;
    let chunks = dim / S::F32_LANES;
    let mut r = 0;
    while r < rows {
        let tile_rows = if rows - r >= ROWS { ROWS } else { 1 };
        let mut c = 0;
        while c < chunks {
            let tile_chunks = (chunks - c).min(CHUNKS);
            // The first tile asks for the next block.
            let ahead = if r == 0 && c == 0 { ahead } else { Ahead::NONE };
            let at = (r, c, ahead);
            match (tile_rows, tile_chunks) {
                (ROWS, CHUNKS) => sum_tile::<S, ROWS, CHUNKS>(simd, p, stride, v, dim, acc, at),
                (ROWS, _) => sum_tile::<S, ROWS, 1>(simd, p, stride, v, dim, acc, at),
                (_, CHUNKS) => sum_tile::<S, 1, CHUNKS>(simd, p, stride, v, dim, acc, at),
                _ => sum_tile::<S, 1, 1>(simd, p, stride, v, dim, acc, at),
            }
            c += if tile_chunks == CHUNKS { CHUNKS } else { 1 };
        }
        // The lanes past the last whole vector, one element at a time.
        for i in r..r + tile_rows {
            let out = &mut acc[i * dim..][chunks * S::F32_LANES..dim];
            for j in 0..keys {
                let weight = p[i * stride + j];
                for (y, &x) in out
                    .iter_mut()
                    .zip(&v[j * dim + chunks * S::F32_LANES..][..])
                {
                    *y = weight.mul_add(x, *y);
                }
            }
        }
        r += tile_rows;
    }
}

/// Rows `r0..r0 + R`, vector chunks `c0..c0 + C` of [`weighted_sum`].
#[inline(always)]
fn sum_tile<S: Simd, const R: usize, const C: usize>(
    simd: S,
    p: &[f32],
    stride: usize,
    v: &[f32],
    dim: usize,
    acc: &mut [f32],
    (r0, c0, ahead): (usize, usize, Ahead<'_>),
) {
    let lanes = S::F32_LANES;
    let keys = v.len() / dim;
    let mut weights: [&[f32]; R] = [&[]; R];
    for i in 0..R {
        weights[i] = &p[(r0 + i) * stride..][..keys];
    }
    let mut tile = [[simd.splat_f32s(0.0); C]; R];
    for i in 0..R {
        let (row, _) = S::as_simd_f32s(&acc[(r0 + i) * dim..][..dim]);
        tile[i].copy_from_slice(&row[c0..c0 + C]);
    }
    for j in 0..keys {
        ahead.touch(j);
        let (row, _) = S::as_simd_f32s(&v[j * dim..][(c0 * lanes)..][..C * lanes]);
        let mut values = [simd.splat_f32s(0.0); C];
        values.copy_from_slice(&row[..C]);
        for i in 0..R {
            let weight = simd.splat_f32s(weights[i][j]);
            for c in 0..C {
                tile[i][c] = simd.mul_add_e_f32s(weight, values[c], tile[i][c]);
            }
        }
    }
    for (i, sums) in tile.iter().enumerate() {
        let (row, _) = S::as_mut_simd_f32s(&mut acc[(r0 + i) * dim..][..dim]);
        row[c0..c0 + C].copy_from_slice(sums);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        rows: usize,
        keys: usize,
        dim: usize,
    }

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
    }

    impl pulp::WithSimd for &Case {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let &Case { rows, keys, dim } = self;
            let (q, k, v) = (
                data(rows * dim, 1.0),
                data(keys * dim, 2.0),
                data(keys * dim, 3.0),
            );
            // Dots into a strided output with a sentinel between rows.
            let stride = keys + 3;
            let mut out = vec![f32::NAN; rows * stride];
            dots(simd, &q, &k, dim, 1.0, &mut out, stride, Ahead::NONE);
            for r in 0..rows {
                for j in 0..stride {
                    let got = out[r * stride + j];
                    if j >= keys {
                        assert!(got.is_nan(), "wrote past the keys at ({r}, {j})");
                        continue;
                    }
                    let exact: f64 = (0..dim)
                        .map(|d| f64::from(q[r * dim + d]) * f64::from(k[j * dim + d]))
                        .sum();
                    assert!(
                        (f64::from(got) - exact).abs() <= 1e-5 * (dim as f64).sqrt(),
                        "dot ({r}, {j}) of {rows}x{keys}x{dim}: {got} vs {exact}"
                    );
                }
            }
            // Weighted sums on top of a non-zero accumulator.
            let p: Vec<f32> = data(rows * stride, 4.0).iter().map(|x| x.abs()).collect();
            let start = data(rows * dim, 5.0);
            let mut acc = start.clone();
            weighted_sum(simd, &p, stride, &v, dim, &mut acc, Ahead::NONE);
            for r in 0..rows {
                for d in 0..dim {
                    let exact = f64::from(start[r * dim + d])
                        + (0..keys)
                            .map(|j| f64::from(p[r * stride + j]) * f64::from(v[j * dim + d]))
                            .sum::<f64>();
                    let got = f64::from(acc[r * dim + d]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * (1.0 + keys as f64),
                        "sum ({r}, {d}) of {rows}x{keys}x{dim}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn tiles_match_their_definitions_on_every_shape_edge() {
        for rows in [1, 2, 3, 4, 5, 8, 9, 32] {
            for keys in [0, 1, 2, 3, 7, 8, 9, 17] {
                for dim in [1, 8, 15, 16, 17, 40, 64, 100, 128, 256] {
                    let case = &Case { rows, keys, dim };
                    // The instruction set chosen at run time, the scalar path (what a CPU
                    // without SIMD runs), and AVX2 where the CPU has more than that.
                    pulp::Arch::new().dispatch(case);
                    pulp::Simd::vectorize(pulp::Scalar, case);
                    #[cfg(target_arch = "x86_64")]
                    if let Some(avx2) = pulp::x86::V3::try_new() {
                        pulp::Simd::vectorize(avx2, case);
                    }
                }
            }
        }
    }
}
