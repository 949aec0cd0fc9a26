//! Which rows of the pool hold which tokens: pages, block tables, sequence lengths.
//!
//! The pool is `pages` pages of `page_size` token slots each. A sequence owns a block table —
//! the list of its pages, in token order — so token `t` of a sequence lives in page
//! `table[t / page_size]`, slot `t % page_size`. Paged caches take pages from the free list as
//! sequences grow and return them when a sequence is dropped; a contiguous cache is the special
//! case of one page of `capacity` slots per sequence, taken when the sequence is created.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// A sequence in a [`KvCache`](super::KvCache). Ids are never reused by a cache, so a stale id
/// is an error, never another sequence's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(pub(crate) u64);

impl SeqId {
    /// The id as a number (for messages and logs).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// How a cache lays out its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Each sequence owns one run of `capacity` token slots, reserved when it is created; at
    /// most `sequences` sequences at once.
    Contiguous { sequences: usize, capacity: usize },
    /// `pages` pages of `page_size` token slots (any size ≥ 1), taken as sequences grow.
    Paged { page_size: usize, pages: usize },
}

impl Layout {
    pub(crate) fn page_size(self) -> usize {
        match self {
            Layout::Contiguous { capacity, .. } => capacity,
            Layout::Paged { page_size, .. } => page_size,
        }
    }

    pub(crate) fn pages(self) -> usize {
        match self {
            Layout::Contiguous { sequences, .. } => sequences,
            Layout::Paged { pages, .. } => pages,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Sequence {
    pages: Vec<u32>,
    len: usize,
}

/// Page allocation and block tables, without the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PageTable {
    layout: Layout,
    /// Free pages, popped from the end (lowest index first).
    free: Vec<u32>,
    sequences: BTreeMap<SeqId, Sequence>,
    next_id: u64,
}

impl PageTable {
    pub(crate) fn try_new(op: &'static str, layout: Layout) -> Result<PageTable> {
        let (page_size, pages) = (layout.page_size(), layout.pages());
        let invalid = |reason: String| Err(Error::CacheLayout { op, reason });
        if page_size == 0 {
            return invalid(format!("{layout:?}: pages need at least one token slot"));
        }
        if pages == 0 {
            return invalid(format!("{layout:?}: the pool needs at least one page"));
        }
        if pages > u32::MAX as usize
            || pages
                .checked_mul(page_size)
                .is_none_or(|n| n > u32::MAX as usize)
        {
            return invalid(format!("{layout:?}: more than 2^32 token slots"));
        }
        Ok(PageTable {
            layout,
            free: (0..pages as u32).rev().collect(),
            sequences: BTreeMap::new(),
            next_id: 0,
        })
    }

    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }

    pub(crate) fn page_size(&self) -> usize {
        self.layout.page_size()
    }

    /// Starts an empty sequence (a contiguous cache reserves its run now).
    pub(crate) fn add(&mut self, op: &'static str) -> Result<SeqId> {
        let mut sequence = Sequence::default();
        if let Layout::Contiguous { sequences, .. } = self.layout {
            let Some(page) = self.free.pop() else {
                return Err(Error::CacheFull {
                    op,
                    reason: format!(
                        "all {sequences} sequence slots of the contiguous cache are in use"
                    ),
                });
            };
            sequence.pages.push(page);
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(id, sequence);
        Ok(id)
    }

    pub(crate) fn len(&self, op: &'static str, id: SeqId) -> Result<usize> {
        Ok(self.get(op, id)?.len)
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.sequences.keys().copied()
    }

    pub(crate) fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// The block table of a sequence.
    pub(crate) fn pages_of(&self, op: &'static str, id: SeqId) -> Result<&[u32]> {
        Ok(&self.get(op, id)?.pages)
    }

    /// Token slots (page · page_size + slot) for growing each listed sequence by its count,
    /// all checked before any page is taken: on error nothing changed. A sequence may appear
    /// once.
    pub(crate) fn grow(
        &mut self,
        op: &'static str,
        requests: &[(SeqId, usize)],
    ) -> Result<Vec<Vec<u32>>> {
        let page_size = self.page_size();
        let mut pages_needed = 0usize;
        for (n, &(id, extra)) in requests.iter().enumerate() {
            if requests[..n].iter().any(|&(other, _)| other == id) {
                return Err(Error::CacheFull {
                    op,
                    reason: format!("sequence {} is listed twice in one append", id.0),
                });
            }
            let sequence = self.get(op, id)?;
            let new_len = sequence.len + extra;
            match self.layout {
                Layout::Contiguous { capacity, .. } if new_len > capacity => {
                    return Err(Error::CacheFull {
                        op,
                        reason: format!(
                            "sequence {} holds {} of {capacity} tokens and cannot take {extra} more",
                            id.0, sequence.len
                        ),
                    });
                }
                _ => {
                    pages_needed += new_len
                        .div_ceil(page_size)
                        .saturating_sub(sequence.pages.len())
                }
            }
        }
        if pages_needed > self.free.len() {
            return Err(Error::CacheFull {
                op,
                reason: format!(
                    "the append needs {pages_needed} more pages of {page_size} tokens; {} are free",
                    self.free.len()
                ),
            });
        }
        let mut slots = Vec::with_capacity(requests.len());
        for &(id, extra) in requests {
            let sequence = self.sequences.get_mut(&id).expect("checked above");
            let new_len = sequence.len + extra;
            while sequence.pages.len() < new_len.div_ceil(page_size) {
                sequence.pages.push(self.free.pop().expect("counted above"));
            }
            slots.push(
                (sequence.len..new_len)
                    .map(|t| {
                        sequence.pages[t / page_size] * page_size as u32 + (t % page_size) as u32
                    })
                    .collect(),
            );
            sequence.len = new_len;
        }
        Ok(slots)
    }

    /// Drops a sequence and returns its pages to the pool.
    pub(crate) fn remove(&mut self, op: &'static str, id: SeqId) -> Result<()> {
        let sequence = self
            .sequences
            .remove(&id)
            .ok_or(Error::UnknownSequence { op, sequence: id.0 })?;
        // Lowest pages are handed out first again.
        self.free.extend(sequence.pages);
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        Ok(())
    }

    /// The token slot of token `t` of a sequence.
    pub(crate) fn slot(&self, op: &'static str, id: SeqId, t: usize) -> Result<u32> {
        let sequence = self.get(op, id)?;
        debug_assert!(t < sequence.len);
        let page_size = self.page_size();
        Ok(sequence.pages[t / page_size] * page_size as u32 + (t % page_size) as u32)
    }

    fn get(&self, op: &'static str, id: SeqId) -> Result<&Sequence> {
        self.sequences
            .get(&id)
            .ok_or(Error::UnknownSequence { op, sequence: id.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_growth_takes_pages_on_demand_and_returns_them() {
        let mut table = PageTable::try_new(
            "t",
            Layout::Paged {
                page_size: 3,
                pages: 4,
            },
        )
        .unwrap();
        let a = table.add("t").unwrap();
        let b = table.add("t").unwrap();
        let slots = table.grow("t", &[(a, 4), (b, 2)]).unwrap();
        assert_eq!(slots, vec![vec![0, 1, 2, 3], vec![6, 7]]);
        assert_eq!(table.free_pages(), 1);
        // 6 more tokens for `a` need two pages: refused, and nothing changed.
        assert!(matches!(
            table.grow("t", &[(a, 6)]),
            Err(Error::CacheFull { .. })
        ));
        assert_eq!(table.len("t", a).unwrap(), 4);
        assert_eq!(table.free_pages(), 1);
        table.remove("t", b).unwrap();
        assert_eq!(table.free_pages(), 2);
        assert!(matches!(
            table.len("t", b),
            Err(Error::UnknownSequence { .. })
        ));
        assert_eq!(
            table.grow("t", &[(a, 5)]).unwrap(),
            vec![vec![4, 5, 6, 7, 8]]
        );
    }

    #[test]
    fn contiguous_sequences_own_one_run() {
        let layout = Layout::Contiguous {
            sequences: 2,
            capacity: 5,
        };
        let mut table = PageTable::try_new("t", layout).unwrap();
        let a = table.add("t").unwrap();
        let b = table.add("t").unwrap();
        assert!(matches!(table.add("t"), Err(Error::CacheFull { .. })));
        assert_eq!(
            table.grow("t", &[(b, 5)]).unwrap(),
            vec![vec![5, 6, 7, 8, 9]]
        );
        assert!(matches!(
            table.grow("t", &[(a, 1), (b, 1)]),
            Err(Error::CacheFull { .. })
        ));
        assert_eq!(
            table.len("t", a).unwrap(),
            0,
            "a refused batch appends nothing"
        );
    }

    #[test]
    fn bad_layouts_and_duplicate_requests_are_errors() {
        for layout in [
            Layout::Paged {
                page_size: 0,
                pages: 1,
            },
            Layout::Paged {
                page_size: 1,
                pages: 0,
            },
            Layout::Contiguous {
                sequences: 0,
                capacity: 8,
            },
        ] {
            assert!(matches!(
                PageTable::try_new("t", layout),
                Err(Error::CacheLayout { .. })
            ));
        }
        let mut table = PageTable::try_new(
            "t",
            Layout::Paged {
                page_size: 1,
                pages: 8,
            },
        )
        .unwrap();
        let a = table.add("t").unwrap();
        assert!(table.grow("t", &[(a, 1), (a, 1)]).is_err());
    }
}
