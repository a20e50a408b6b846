//! Page ranges on the wire: `[first_page u64][count u64]` pairs, little-endian, in RAM-page
//! numbers (RAM offset / 4096). Postcopy's DISCARD frames and its page requests,
//! acknowledgements and "still needed" lists all carry them.

use ram::AtomicBitmap;

use super::{Result, StreamError};

/// Bytes of one encoded range.
pub const RANGE_LEN: usize = 16;

/// `count` pages from page `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// First RAM page number.
    pub first: u64,
    /// Number of pages (at least 1).
    pub count: u64,
}

impl PageRange {
    /// The range's pages.
    pub fn pages(&self) -> std::ops::Range<u64> {
        self.first..self.first.saturating_add(self.count)
    }

    /// Whether the range lies wholly within the first `pages` pages.
    pub fn within(&self, pages: u64) -> bool {
        self.first
            .checked_add(self.count)
            .is_some_and(|e| e <= pages)
    }
}

/// Appends the encoding of `ranges` to `out`.
pub fn encode_ranges(ranges: &[PageRange], out: &mut Vec<u8>) {
    out.reserve(ranges.len() * RANGE_LEN);
    for r in ranges {
        out.extend_from_slice(&r.first.to_le_bytes());
        out.extend_from_slice(&r.count.to_le_bytes());
    }
}

/// Decodes ranges, refusing empty ranges and ranges reaching past `pages` pages.
pub fn decode_ranges(b: &[u8], pages: u64) -> Result<Vec<PageRange>> {
    if !b.len().is_multiple_of(RANGE_LEN) {
        return Err(StreamError::Invalid(format!(
            "a page range list of {} bytes (not a multiple of {RANGE_LEN})",
            b.len()
        )));
    }
    let u = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    let mut out = Vec::with_capacity(b.len() / RANGE_LEN);
    for at in (0..b.len()).step_by(RANGE_LEN) {
        let r = PageRange {
            first: u(at),
            count: u(at + 8),
        };
        let end = r.first.checked_add(r.count);
        if r.count == 0 || end.is_none_or(|e| e > pages) {
            return Err(StreamError::Invalid(format!(
                "page range {}+{} outside guest RAM ({pages} pages)",
                r.first, r.count
            )));
        }
        out.push(r);
    }
    Ok(out)
}

/// Decodes ranges as [`decode_ranges`] does and also refuses ranges that overlap or are out
/// of order, so the list covers at most `pages` pages however long it is (a DATA_RANGES
/// frame, which the destination populates chunk by chunk).
pub fn decode_ascending_ranges(b: &[u8], pages: u64) -> Result<Vec<PageRange>> {
    let ranges = decode_ranges(b, pages)?;
    if let Some(w) = ranges
        .windows(2)
        .find(|w| w[1].first < w[0].first + w[0].count)
    {
        return Err(StreamError::Invalid(format!(
            "page range {}+{} overlaps or precedes {}+{}",
            w[1].first, w[1].count, w[0].first, w[0].count
        )));
    }
    Ok(ranges)
}

/// The encoding of `(first, count)` pairs (for tests that build frames by hand).
#[cfg(test)]
pub(crate) fn encoded_pairs(pairs: &[(u64, u64)]) -> Vec<u8> {
    let list: Vec<PageRange> = pairs
        .iter()
        .map(|&(first, count)| PageRange { first, count })
        .collect();
    let mut b = Vec::new();
    encode_ranges(&list, &mut b);
    b
}

/// The runs of set bits of `bitmap`, in order.
pub fn ranges_of(bitmap: &AtomicBitmap) -> Vec<PageRange> {
    runs(bitmap, false)
}

/// The runs of clear bits of `bitmap` (below its length), in order.
pub fn gaps_of(bitmap: &AtomicBitmap) -> Vec<PageRange> {
    runs(bitmap, true)
}

fn runs(bitmap: &AtomicBitmap, inverted: bool) -> Vec<PageRange> {
    let len = bitmap.len();
    let mut out = Vec::new();
    let mut open: Option<u64> = None;
    for w in 0..bitmap.word_count() {
        let word = if inverted {
            !bitmap.word(w)
        } else {
            bitmap.word(w)
        };
        let base = w as u64 * 64;
        // Whole words of the same kind keep or close a run without a bit loop.
        if word == 0 || word == u64::MAX {
            match (word == u64::MAX, open) {
                (true, None) => open = Some(base),
                (false, Some(first)) => {
                    out.push(PageRange {
                        first,
                        count: base - first,
                    });
                    open = None;
                }
                _ => {}
            }
            continue;
        }
        for b in 0..64u64 {
            let set = word & (1 << b) != 0;
            match (set, open) {
                (true, None) => open = Some(base + b),
                (false, Some(first)) => {
                    out.push(PageRange {
                        first,
                        count: base + b - first,
                    });
                    open = None;
                }
                _ => {}
            }
        }
    }
    if let Some(first) = open {
        if first < len {
            out.push(PageRange {
                first,
                count: len - first,
            });
        }
    }
    // Bits past the end (inverted words) must not leak into the last range.
    if let Some(last) = out.last_mut() {
        let end = last.first + last.count;
        if end > len {
            last.count = len.saturating_sub(last.first);
            if last.count == 0 {
                out.pop();
            }
        }
    }
    out
}

/// Merges sorted page numbers into ranges.
pub fn ranges_of_pages(pages: impl IntoIterator<Item = u64>) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some(r) if r.first + r.count == p => r.count += 1,
            Some(r) if p >= r.first && p < r.first + r.count => {}
            _ => out.push(PageRange { first: p, count: 1 }),
        }
    }
    out
}

/// Total pages of `ranges`.
pub fn page_count(ranges: &[PageRange]) -> u64 {
    ranges.iter().map(|r| r.count).sum()
}

/// Data ranges closer than this many pages go as one in DATA_RANGES: the destination may
/// allocate up to 60 KiB of zero pages between two for a list (and madvise calls) up to 16
/// times shorter on scattered memory.
pub const DATA_RANGES_GAP: u64 = 16;

/// The payload of a DATA_RANGES frame for `ranges` (sorted `[start, end)` page numbers that
/// may hold data), coarsened to fit one frame.
pub fn data_ranges_payload(ranges: &[(u64, u64)]) -> Vec<u8> {
    let list = coarsened(
        ranges,
        DATA_RANGES_GAP,
        super::frame::MAX_FRAME_PAYLOAD / RANGE_LEN,
    );
    let mut payload = Vec::new();
    encode_ranges(&list, &mut payload);
    payload
}

/// `ranges` (sorted, disjoint `[start, end)` page numbers) as at most `max_ranges` page
/// ranges covering them: neighbours less than `min_gap` pages apart are merged (a few pages
/// in between are covered for far fewer ranges), and the gap doubles until the list fits.
pub fn coarsened(ranges: &[(u64, u64)], min_gap: u64, max_ranges: usize) -> Vec<PageRange> {
    let mut gap = min_gap.max(1);
    loop {
        let mut out: Vec<PageRange> = Vec::new();
        for &(start, end) in ranges.iter().filter(|(s, e)| e > s) {
            match out.last_mut() {
                Some(r) if start < r.first + r.count + gap => {
                    r.count = r.count.max(end - r.first);
                }
                _ => out.push(PageRange {
                    first: start,
                    count: end - start,
                }),
            }
        }
        if out.len() <= max_ranges.max(1) || gap > u64::MAX / 4 {
            return out;
        }
        gap *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_counts_the_end_and_survives_overflow() {
        let r = |first, count| PageRange { first, count };
        assert!(r(0, 16).within(16));
        assert!(r(15, 1).within(16));
        assert!(!r(15, 2).within(16));
        assert!(!r(16, 1).within(16));
        assert!(!r(1, u64::MAX).within(u64::MAX));
    }

    #[test]
    fn ascending_ranges_refuse_overlap_and_disorder_but_allow_neighbours() {
        let enc = encoded_pairs;
        assert_eq!(
            decode_ascending_ranges(&enc(&[(0, 4), (4, 2), (9, 1)]), 10)
                .unwrap()
                .len(),
            3
        );
        for bad in [&[(0, 4), (3, 2)][..], &[(5, 1), (5, 1)], &[(5, 1), (0, 1)]] {
            let e = decode_ascending_ranges(&enc(bad), 10).unwrap_err();
            assert!(
                e.to_string().contains("overlaps or precedes"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn coarsened_merges_close_neighbours_and_fits_the_limit() {
        let r = |first, count| PageRange { first, count };
        let ranges = [(0, 4), (6, 8), (100, 101), (1000, 1010)];
        assert_eq!(
            coarsened(&ranges, 1, 10),
            vec![r(0, 4), r(6, 2), r(100, 1), r(1000, 10)]
        );
        assert_eq!(
            coarsened(&ranges, 16, 10),
            vec![r(0, 8), r(100, 1), r(1000, 10)]
        );
        // Two ranges at most: the gap grows until 0..8 and 100..101 merge.
        assert_eq!(coarsened(&ranges, 16, 2), vec![r(0, 101), r(1000, 10)]);
        assert_eq!(coarsened(&ranges, 16, 1), vec![r(0, 1010)]);
        assert_eq!(coarsened(&[], 16, 1), vec![]);
        assert_eq!(coarsened(&[(5, 5), (7, 9)], 1, 4), vec![r(7, 2)]);
        // Every page asked for stays covered.
        for max in 1..5 {
            let c = coarsened(&ranges, 1, max);
            assert!(c.len() <= max);
            for &(s, e) in &ranges {
                assert!((s..e).all(|p| c.iter().any(|r| r.pages().contains(&p))));
            }
        }
    }

    #[test]
    fn round_trip_and_bounds() {
        let rs = [
            PageRange { first: 0, count: 3 },
            PageRange {
                first: 10,
                count: 1,
            },
        ];
        let mut b = Vec::new();
        encode_ranges(&rs, &mut b);
        assert_eq!(b.len(), 2 * RANGE_LEN);
        assert_eq!(decode_ranges(&b, 11).unwrap(), rs);
        assert!(decode_ranges(&b, 10).is_err(), "past the end");
        assert!(decode_ranges(&b[..20], 100).is_err(), "ragged");
        let mut z = Vec::new();
        encode_ranges(&[PageRange { first: 1, count: 0 }], &mut z);
        assert!(decode_ranges(&z, 100).is_err(), "empty range");
        let mut o = Vec::new();
        encode_ranges(
            &[PageRange {
                first: u64::MAX,
                count: 2,
            }],
            &mut o,
        );
        assert!(decode_ranges(&o, u64::MAX).is_err(), "overflow");
    }

    #[test]
    fn runs_of_set_and_clear_bits() {
        let bm = AtomicBitmap::new(200);
        bm.set_range(3, 2);
        bm.set_range(63, 70); // across words, with a whole word inside
        bm.set(199);
        assert_eq!(
            ranges_of(&bm),
            vec![
                PageRange { first: 3, count: 2 },
                PageRange {
                    first: 63,
                    count: 70
                },
                PageRange {
                    first: 199,
                    count: 1
                },
            ]
        );
        assert_eq!(
            gaps_of(&bm),
            vec![
                PageRange { first: 0, count: 3 },
                PageRange {
                    first: 5,
                    count: 58
                },
                PageRange {
                    first: 133,
                    count: 66
                },
            ]
        );
        let empty = AtomicBitmap::new(130);
        assert!(ranges_of(&empty).is_empty());
        assert_eq!(
            gaps_of(&empty),
            vec![PageRange {
                first: 0,
                count: 130
            }]
        );
        empty.set_all();
        assert!(gaps_of(&empty).is_empty());
        assert_eq!(
            ranges_of(&empty),
            vec![PageRange {
                first: 0,
                count: 130
            }]
        );
    }

    #[test]
    fn pages_merge_into_ranges() {
        assert_eq!(
            ranges_of_pages([1, 2, 3, 3, 7, 8, 20]),
            vec![
                PageRange { first: 1, count: 3 },
                PageRange { first: 7, count: 2 },
                PageRange {
                    first: 20,
                    count: 1
                },
            ]
        );
        assert_eq!(page_count(&ranges_of_pages([5, 6, 9])), 3);
    }
}
