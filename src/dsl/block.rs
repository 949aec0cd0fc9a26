//! Block masks: before a launch, each tile of the score matrix — (batch entry, KV head, query
//! tile, key tile), for *every* query head of the KV group at once — is classified as empty (no
//! pair visible), full (every pair visible) or partial, under the spec's band and the user
//! mask together. Executors skip empty tiles and run full ones without evaluating the mask
//! (FlexAttention's `BlockMask` with full blocks, but per KV group: one cube, one CPU tile
//! serves the whole group, so a tile is full only if full for every head of the group).
//!
//! Classification is analytic where it can be — the spec's band per row, a user
//! [`Classifier`] for the mask mod (the library's document mask has one) — and brute force
//! otherwise: every pair of the tile evaluated once (threads over tiles), which costs one
//! evaluation of the mask per score, as running it would, and is then reused by every call of
//! the same problem (the executors cache block masks by the mods' type and captures, the spec,
//! the shape and the tile sizes).

use std::ops::Range;

use super::{MaskMod, Position};
use crate::spec::{AttentionSpec, ProblemShape};

/// What a tile holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TileState {
    /// No visible pair: skipped.
    Empty = 0,
    /// Some visible pairs: the mask is evaluated per score.
    Partial = 1,
    /// Every pair visible: run without the mask.
    Full = 2,
}

/// A tile of the score matrix, as a classifier sees it: batch entry, the query heads of one KV
/// group, query and key ranges, and the problem's lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub b: usize,
    pub heads: Range<usize>,
    pub q: Range<usize>,
    pub k: Range<usize>,
    pub seq_q: usize,
    pub seq_k: usize,
}

/// Classifies tiles of a user mask analytically (`None`: "I do not know", and the tile is
/// classified by brute force). It must never claim more than the mask does: a tile it calls
/// full must have every pair visible, one it calls empty none (the suites check this by brute
/// force).
pub trait Classifier: Sync + Send + std::fmt::Debug {
    fn classify(&self, tile: &Tile) -> Option<TileState>;

    /// The keys the mask lets one query see — the same for every query head of `row.heads` —
    /// when they form one interval this classifier knows without evaluating the mask (`None`:
    /// not known, the default). It must be exact and inside `0..row.seq_k`: an executor that
    /// takes it (the CPU prefill) folds the mask into the row's band and evaluates it nowhere
    /// on that row. The suites check it against the mask by brute force.
    fn row_keys(&self, row: &Row) -> Option<Range<usize>> {
        let _ = row;
        None
    }
}

/// One query row, as [`Classifier::row_keys`] sees it: batch entry, the query heads of one KV
/// group, the query, and the problem's lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub b: usize,
    pub heads: Range<usize>,
    pub q: usize,
    pub seq_q: usize,
    pub seq_k: usize,
}

/// No analytic classification: every tile by brute force.
#[derive(Debug, Clone, Copy, Default)]
pub struct BruteForce;

impl Classifier for BruteForce {
    fn classify(&self, _: &Tile) -> Option<TileState> {
        None
    }
}

/// The analytic classifier of a band around the diagonal: query `q` (diagonal `d = q + seq_k −
/// seq_q`, bottom-right as everywhere) sees keys `d − left ..= d + right`, unbounded on a side
/// that is `None`. It describes `library::causal()` ([`Band::causal`]) and
/// `library::sliding_window(left, right)` ([`Band::window`]), and a mask written to mean the
/// same: a tile is empty when its keys lie outside every row's band, full when inside every
/// row's band, and each query's keys are its band ([`Classifier::row_keys`]), so that the CPU
/// prefill runs a band written with the DSL as it runs the built-in one. Executors trust it:
/// attach it only to a mask that is this band (the suites check the library's by brute force).
///
/// ```
/// use gqa::dsl::block::{Band, Classifier, Row};
/// let causal = Band::causal();
/// let row = Row { b: 0, heads: 0..4, q: 2, seq_q: 4, seq_k: 10 };
/// assert_eq!(causal.row_keys(&row), Some(0..9)); // diagonal 2 + 10 − 4 = 8
/// assert_eq!(Band::window(3, 0).row_keys(&row), Some(5..9));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Band {
    left: Option<i64>,
    right: Option<i64>,
}

impl Band {
    /// The classifier of `library::causal()`: every key up to the diagonal.
    pub fn causal() -> Band {
        Band {
            left: None,
            right: Some(0),
        }
    }

    /// The classifier of `library::sliding_window(left, right)`: `left` keys before the
    /// diagonal and `right` after it.
    pub fn window(left: i32, right: i32) -> Band {
        Band {
            left: Some(left.into()),
            right: Some(right.into()),
        }
    }
}

impl Classifier for Band {
    fn classify(&self, tile: &Tile) -> Option<TileState> {
        if tile.q.is_empty() || tile.k.is_empty() {
            return None;
        }
        let shift = tile.seq_k as i64 - tile.seq_q as i64;
        let (d_lo, d_hi) = (tile.q.start as i64 + shift, tile.q.end as i64 - 1 + shift);
        let (k_lo, k_hi) = (tile.k.start as i64, tile.k.end as i64 - 1);
        // Every key before the first row's band starts, or after the last row's ends: none.
        let before = self.left.is_some_and(|left| k_hi < d_lo - left);
        let after = self.right.is_some_and(|right| k_lo > d_hi + right);
        // Every key inside the last row's left bound and the first row's right bound: all.
        let inside = self.left.is_none_or(|left| k_lo >= d_hi - left)
            && self.right.is_none_or(|right| k_hi <= d_lo + right);
        Some(if before || after {
            TileState::Empty
        } else if inside {
            TileState::Full
        } else {
            TileState::Partial
        })
    }

    fn row_keys(&self, row: &Row) -> Option<Range<usize>> {
        let seq_k = row.seq_k as i64;
        let diag = row.q as i64 + seq_k - row.seq_q as i64;
        let start = self.left.map_or(0, |left| diag - left).clamp(0, seq_k);
        let end = self
            .right
            .map_or(seq_k, |right| diag + right + 1)
            .clamp(start, seq_k);
        Some(start as usize..end as usize)
    }
}

/// The document mask's classifier for *sorted* document ids (`doc[t] <= doc[t + 1]`, as
/// packing makes them): a tile is full when its queries' tokens and its keys lie in one
/// document, empty when their documents' ranges do not meet; a query's keys are its
/// document's tokens ([`Classifier::row_keys`]). (For unsorted ids it answers nothing, and
/// brute force decides.)
#[derive(Debug, Clone)]
pub struct SortedDocuments {
    doc: Vec<i32>,
    sorted: bool,
}

impl SortedDocuments {
    /// The classifier of `library::document(doc)`.
    pub fn new(doc: &[i32]) -> SortedDocuments {
        SortedDocuments {
            doc: doc.to_vec(),
            sorted: doc.windows(2).all(|w| w[0] <= w[1]),
        }
    }
}

impl Classifier for SortedDocuments {
    fn classify(&self, tile: &Tile) -> Option<TileState> {
        if !self.sorted || tile.q.is_empty() || tile.k.is_empty() {
            return None;
        }
        // The queries' tokens on the key axis (bottom-right): `q + seq_k − seq_q`, all >= 0.
        let shift = tile.seq_k as i64 - tile.seq_q as i64;
        let first = tile.q.start as i64 + shift;
        let last = tile.q.end as i64 - 1 + shift;
        if first < 0 || last as usize >= self.doc.len() || tile.k.end > self.doc.len() {
            return None;
        }
        let (q_lo, q_hi) = (self.doc[first as usize], self.doc[last as usize]);
        let (k_lo, k_hi) = (self.doc[tile.k.start], self.doc[tile.k.end - 1]);
        if q_hi < k_lo || k_hi < q_lo {
            Some(TileState::Empty)
        } else if q_lo == q_hi && k_lo == k_hi && q_lo == k_lo {
            Some(TileState::Full)
        } else {
            Some(TileState::Partial)
        }
    }

    fn row_keys(&self, row: &Row) -> Option<Range<usize>> {
        // Where the mask would read outside its table (it panics there), say nothing.
        if !self.sorted || row.q >= row.seq_q || row.seq_k > self.doc.len() {
            return None;
        }
        // The query's token on the key axis (bottom-right); before the keys it sees nothing.
        let Ok(t) = usize::try_from(row.q as i64 + row.seq_k as i64 - row.seq_q as i64) else {
            return Some(0..0);
        };
        let d = *self.doc.get(t)?;
        let start = self.doc.partition_point(|&x| x < d);
        let end = self.doc.partition_point(|&x| x <= d);
        Some(start.min(row.seq_k)..end.min(row.seq_k))
    }
}

/// The classification of every tile of one problem: states indexed `[b][kv_head][q tile][k
/// tile]`, tiles of `q_tile` queries and `k_tile` keys (the last ones shorter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMask {
    q_tile: usize,
    k_tile: usize,
    q_tiles: usize,
    k_tiles: usize,
    kv_heads: usize,
    states: Vec<TileState>,
}

impl BlockMask {
    /// Classifies every tile of `shape` under `spec`'s band and `mask`, asking `classifier`
    /// first. `q_tile`, `k_tile` >= 1.
    ///
    /// # Panics
    /// If a tile size is 0.
    #[track_caller]
    pub fn build<M: MaskMod, C: Classifier + ?Sized>(
        spec: &AttentionSpec,
        mask: &M,
        classifier: &C,
        shape: ProblemShape,
        (q_tile, k_tile): (usize, usize),
    ) -> BlockMask {
        assert!(q_tile >= 1 && k_tile >= 1, "tile sizes must be at least 1");
        let ProblemShape {
            batch,
            seq_q,
            seq_k,
        } = shape;
        let (q_tiles, k_tiles) = (seq_q.div_ceil(q_tile), seq_k.div_ceil(k_tile));
        let (kv_heads, group) = (spec.kv_heads(), spec.group_size());
        let count = batch * kv_heads * q_tiles * k_tiles;
        let classify = |index: usize| {
            let kt = index % k_tiles;
            let qt = (index / k_tiles) % q_tiles;
            let g = (index / (k_tiles * q_tiles)) % kv_heads;
            let b = index / (k_tiles * q_tiles * kv_heads);
            let tile = Tile {
                b,
                heads: g * group..(g + 1) * group,
                q: qt * q_tile..((qt + 1) * q_tile).min(seq_q),
                k: kt * k_tile..((kt + 1) * k_tile).min(seq_k),
                seq_q,
                seq_k,
            };
            classify_tile(spec, mask, classifier, &tile)
        };
        #[cfg(feature = "cpu")]
        let states = {
            use rayon::prelude::*;
            (0..count).into_par_iter().map(classify).collect()
        };
        #[cfg(not(feature = "cpu"))]
        let states = (0..count).map(classify).collect();
        BlockMask {
            q_tile,
            k_tile,
            q_tiles,
            k_tiles,
            kv_heads,
            states,
        }
    }

    /// Every tile partial: what a block mask that knows nothing says (for comparisons).
    pub fn all_partial(&self) -> BlockMask {
        BlockMask {
            states: vec![TileState::Partial; self.states.len()],
            ..self.clone()
        }
    }

    /// The state of tile `(qt, kt)` of KV head `g` in batch entry `b`.
    pub fn state(&self, b: usize, g: usize, qt: usize, kt: usize) -> TileState {
        self.states[((b * self.kv_heads + g) * self.q_tiles + qt) * self.k_tiles + kt]
    }

    /// `(q_tile, k_tile)`.
    pub fn tile_sizes(&self) -> (usize, usize) {
        (self.q_tile, self.k_tile)
    }

    /// `(q_tiles, k_tiles)` per (batch entry, KV head).
    pub fn tiles(&self) -> (usize, usize) {
        (self.q_tiles, self.k_tiles)
    }

    /// How many tiles are (empty, partial, full).
    pub fn counts(&self) -> (usize, usize, usize) {
        self.states.iter().fold((0, 0, 0), |(e, p, f), s| match s {
            TileState::Empty => (e + 1, p, f),
            TileState::Partial => (e, p + 1, f),
            TileState::Full => (e, p, f + 1),
        })
    }

    /// Per (batch entry, KV head, query tile), in `state` order without the key tile: the
    /// key tiles `first..end` outside which every tile is empty (`0..0` for a row of tiles
    /// that sees nothing), so that an executor need not even visit them.
    pub fn live_ranges(&self) -> Vec<Range<usize>> {
        self.states
            .chunks(self.k_tiles.max(1))
            .map(|row| {
                let first = row.iter().position(|&s| s != TileState::Empty);
                let last = row.iter().rposition(|&s| s != TileState::Empty);
                match (first, last) {
                    (Some(first), Some(last)) => first..last + 1,
                    _ => 0..0,
                }
            })
            .collect()
    }

    /// The transpose of [`BlockMask::live_ranges`]: per (batch entry, KV head, key tile), the
    /// query tiles `first..end` outside which every tile is empty (`0..0` for a column of tiles
    /// no query sees), for an executor that walks the queries of a key tile (the backward's
    /// `dK`, `dV`).
    pub fn live_query_ranges(&self) -> Vec<Range<usize>> {
        let (q_tiles, k_tiles) = (self.q_tiles, self.k_tiles);
        if q_tiles == 0 || k_tiles == 0 {
            return Vec::new(); // no tile at all (as `words` has no ranges then)
        }
        let mut ranges = Vec::with_capacity(self.states.len() / q_tiles);
        for column in self.states.chunks(q_tiles * k_tiles) {
            for kt in 0..k_tiles {
                let live = |qt: &usize| column[qt * k_tiles + kt] != TileState::Empty;
                let first = (0..q_tiles).find(live);
                let last = (0..q_tiles).rev().find(live);
                ranges.push(match (first, last) {
                    (Some(first), Some(last)) => first..last + 1,
                    _ => 0..0,
                });
            }
        }
        ranges
    }

    /// The states as device words, in `state` order, then [`BlockMask::live_ranges`] as
    /// `first, end` pairs.
    pub fn words(&self) -> Vec<u32> {
        let mut words: Vec<u32> = self.states.iter().map(|&s| s as u32).collect();
        if self.k_tiles > 0 {
            for range in self.live_ranges() {
                words.extend([range.start as u32, range.end as u32]);
            }
        }
        if words.is_empty() {
            words.push(0);
        }
        words
    }
}

/// One tile: the band per row (analytic), then the classifier, then brute force.
fn classify_tile<M: MaskMod, C: Classifier + ?Sized>(
    spec: &AttentionSpec,
    mask: &M,
    classifier: &C,
    tile: &Tile,
) -> TileState {
    let band = spec.mask();
    let (mut any_band, mut all_band) = (false, true);
    for i in tile.q.clone() {
        let r = band.visible_keys(i, tile.seq_q, tile.seq_k);
        let (lo, hi) = (r.start.max(tile.k.start), r.end.min(tile.k.end));
        any_band |= lo < hi;
        all_band &= r.start <= tile.k.start && r.end >= tile.k.end;
    }
    if !any_band || tile.k.is_empty() {
        return TileState::Empty;
    }
    if M::TRIVIAL {
        return if all_band {
            TileState::Full
        } else {
            TileState::Partial
        };
    }
    if let Some(user) = classifier.classify(tile) {
        match user {
            TileState::Empty => return TileState::Empty,
            TileState::Full if all_band => return TileState::Full,
            // The user mask is full but the band is not (or the user mask is partial): the
            // pairs the band shows decide, by brute force below.
            _ => {}
        }
    }
    let (mut any, mut all) = (false, true);
    for h in tile.heads.clone() {
        for i in tile.q.clone() {
            let r = band.visible_keys(i, tile.seq_q, tile.seq_k);
            for j in tile.k.clone() {
                let seen = r.contains(&j)
                    && mask.visible(Position {
                        b: tile.b as i64,
                        h: h as i64,
                        q: i as i64,
                        k: j as i64,
                        seq_q: tile.seq_q as i64,
                        seq_k: tile.seq_k as i64,
                    });
                any |= seen;
                all &= seen;
            }
        }
    }
    match (any, all) {
        (false, _) => TileState::Empty,
        (true, true) => TileState::Full,
        (true, false) => TileState::Partial,
    }
}

/// Block masks by problem: the mask's type and captures (which fix what it computes), the
/// spec, the shape, the tile sizes and which classifier helped (its address: the entry holds
/// the classifier, so no other one can take that address while the entry lives). Bounded:
/// past [`CACHED_BLOCK_MASKS`] entries the table starts afresh.
type Key = (
    &'static str,
    Vec<Vec<u32>>,
    AttentionSpec,
    (usize, usize, usize),
    (usize, usize),
    Option<usize>,
);

/// A cached block mask, and the classifier that helped build it (kept alive: see [`Key`]).
type Entry = (
    std::sync::Arc<BlockMask>,
    Option<std::sync::Arc<dyn Classifier>>,
);

/// How many block masks the cache keeps.
pub const CACHED_BLOCK_MASKS: usize = 64;

fn cache() -> &'static std::sync::Mutex<std::collections::HashMap<Key, Entry>> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<Key, Entry>>> =
        std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The block mask of `mask` (with `classifier`) for a problem, from the cache when the same
/// problem was classified before.
pub(crate) fn cached<M: MaskMod>(
    spec: &AttentionSpec,
    mask: &M,
    classifier: Option<&std::sync::Arc<dyn Classifier>>,
    shape: ProblemShape,
    tiles: (usize, usize),
) -> std::sync::Arc<BlockMask> {
    let mut words = Vec::new();
    mask.captured_words(&mut words);
    let key: Key = (
        std::any::type_name::<M>(),
        words,
        *spec,
        (shape.batch, shape.seq_q, shape.seq_k),
        tiles,
        classifier.map(|c| std::sync::Arc::as_ptr(c) as *const () as usize),
    );
    if let Some((found, _)) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return found.clone();
    }
    let built = std::sync::Arc::new(match classifier {
        Some(c) => BlockMask::build(spec, mask, c.as_ref(), shape, tiles),
        None => BlockMask::build(spec, mask, &BruteForce, shape, tiles),
    });
    let mut table = cache().lock().unwrap_or_else(|e| e.into_inner());
    if table.len() >= CACHED_BLOCK_MASKS {
        table.clear();
    }
    table.insert(key, (built.clone(), classifier.cloned()));
    built
}
