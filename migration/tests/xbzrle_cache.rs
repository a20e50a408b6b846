//! The XBZRLE page cache: lookups, QEMU's age rule, set associativity,
//! resizing that keeps entries.

// Helpers outside #[test] functions unwrap too: these are tests.
#![allow(clippy::unwrap_used)]

use migration::xbzrle::cache::CACHED_PAGE_LIFETIME;
use migration::xbzrle::{CacheError, PageCache};

const PAGE: usize = 4096;
const P: u64 = PAGE as u64;

fn page(tag: u8) -> Vec<u8> {
    vec![tag; PAGE]
}

#[test]
fn insert_and_lookup_by_ram_offset() {
    let mut c = PageCache::new(8 * P, PAGE).unwrap();
    for i in 0..8u64 {
        assert!(c.insert(i * P, &page(i as u8), 1).unwrap());
    }
    assert_eq!(c.len(), 8);
    for i in 0..8u64 {
        assert_eq!(c.get(i * P), Some(&page(i as u8)[..]));
        assert_eq!(c.generation_of(i * P), Some(1));
    }
    assert!(c.get(8 * P).is_none());
    // lookup gives the copy to update in place.
    c.lookup(3 * P).unwrap().fill(0x33);
    assert_eq!(c.get(3 * P), Some(&page(0x33)[..]));
}

#[test]
fn hit_stamps_the_current_generation() {
    let mut c = PageCache::new(8 * P, PAGE).unwrap();
    c.insert(0, &page(1), 1).unwrap();
    assert!(c.is_cached(0, 5));
    assert_eq!(c.generation_of(0), Some(5));
    assert!(!c.is_cached(P, 5));
}

#[test]
fn direct_mapped_entry_is_not_evicted_while_fresh() {
    // One way, 4 slots: offsets 0 and 4 pages share a slot (QEMU's layout).
    let mut c = PageCache::with_ways(4 * P, PAGE, 1).unwrap();
    let (a, b) = (0, 4 * P);
    assert!(c.insert(a, &page(0xa), 10).unwrap());
    // Same generation and the next one: refused (10 + 2 > 10, 11).
    assert!(!c.insert(b, &page(0xb), 10).unwrap());
    assert!(!c
        .insert(b, &page(0xb), 10 + CACHED_PAGE_LIFETIME - 1)
        .unwrap());
    assert_eq!(c.get(a), Some(&page(0xa)[..]));
    // Two generations later the old entry may go.
    assert!(c.insert(b, &page(0xb), 10 + CACHED_PAGE_LIFETIME).unwrap());
    assert!(c.get(a).is_none());
    assert_eq!(c.get(b), Some(&page(0xb)[..]));
    assert_eq!(c.len(), 1);
}

#[test]
fn a_hit_keeps_an_entry_fresh() {
    let mut c = PageCache::with_ways(4 * P, PAGE, 1).unwrap();
    c.insert(0, &page(1), 1).unwrap();
    assert!(c.is_cached(0, 3));
    assert!(!c.insert(4 * P, &page(2), 4).unwrap(), "hit at 3 keeps it");
    assert!(c.insert(4 * P, &page(2), 5).unwrap());
}

#[test]
fn an_older_page_does_not_evict_a_newer_one() {
    let mut c = PageCache::with_ways(4 * P, PAGE, 1).unwrap();
    c.insert(0, &page(1), 20).unwrap();
    assert!(!c.insert(4 * P, &page(2), 3).unwrap());
    assert_eq!(c.get(0), Some(&page(1)[..]));
}

#[test]
fn the_same_page_is_always_overwritten() {
    let mut c = PageCache::with_ways(4 * P, PAGE, 1).unwrap();
    c.insert(0, &page(1), 7).unwrap();
    assert!(c.insert(0, &page(2), 7).unwrap());
    assert_eq!(c.get(0), Some(&page(2)[..]));
    assert_eq!(c.len(), 1);
}

#[test]
fn two_ways_hold_pages_that_direct_mapping_cannot() {
    // 8 slots, 2 ways: 4 sets; offsets 0, 4 and 8 pages share set 0.
    let mut c = PageCache::new(8 * P, PAGE).unwrap();
    assert_eq!(c.ways(), 2);
    assert!(c.insert(0, &page(1), 1).unwrap());
    assert!(c.insert(4 * P, &page(2), 1).unwrap());
    assert!(c.get(0).is_some() && c.get(4 * P).is_some());
    // Both fresh: a third page of the set is refused.
    assert!(!c.insert(8 * P, &page(3), 2).unwrap());
    // Page 4 is hit later than page 0, so page 0 is the one evicted.
    assert!(c.is_cached(4 * P, 2));
    assert!(c.insert(8 * P, &page(3), 3).unwrap());
    assert!(c.get(0).is_none());
    assert!(c.get(4 * P).is_some() && c.get(8 * P).is_some());
}

/// Hit rate of a cache over `rounds` dirty-sync rounds that each touch
/// every page of `pages` (offsets), as the encoder does: hit, else insert.
/// Round 1 only fills the cache; hits are counted from round 2.
fn hit_rate(cache: &mut PageCache, pages: &[u64], rounds: u64) -> f64 {
    let (mut hits, mut total) = (0u64, 0u64);
    for generation in 1..=rounds {
        for &addr in pages {
            let hit = cache.is_cached(addr, generation);
            if !hit {
                cache.insert(addr, &page(0), generation).unwrap();
            }
            if generation > 1 {
                total += 1;
                hits += u64::from(hit);
            }
        }
    }
    hits as f64 / total as f64
}

#[test]
fn set_associativity_beats_direct_mapping_on_aliasing_working_sets() {
    let slots = 1024u64;
    let size = slots * P;
    // Two buffers a cache size apart (think: two arrays at 64 MiB-aligned
    // offsets with a 64 MiB cache): every page has a twin in its slot.
    let aliasing: Vec<u64> = (0..slots / 2).flat_map(|i| [i * P, size + i * P]).collect();
    // A scattered working set of half the cache.
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let scattered: Vec<u64> = (0..slots / 2)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (1 << 20)) * P
        })
        .collect();
    // A contiguous working set exactly the cache's size.
    let contiguous: Vec<u64> = (0..slots).map(|i| i * P).collect();

    for (name, pages) in [
        ("aliasing", &aliasing),
        ("scattered", &scattered),
        ("contiguous", &contiguous),
    ] {
        let direct = hit_rate(&mut PageCache::with_ways(size, PAGE, 1).unwrap(), pages, 6);
        let two_way = hit_rate(&mut PageCache::with_ways(size, PAGE, 2).unwrap(), pages, 6);
        println!("{name}: direct-mapped hit rate {direct:.3}, 2-way {two_way:.3}");
        assert!(
            two_way >= direct,
            "{name}: 2-way {two_way} < direct {direct}"
        );
        match name {
            "aliasing" => {
                // The first of each pair keeps the slot (it stays fresh),
                // its twin always misses.
                assert_eq!(direct, 0.5);
                assert_eq!(two_way, 1.0);
            }
            "scattered" => assert!(two_way > direct + 0.05, "{two_way} vs {direct}"),
            _ => assert_eq!((direct, two_way), (1.0, 1.0)),
        }
    }
}

#[test]
fn growing_keeps_every_entry() {
    let mut c = PageCache::new(8 * P, PAGE).unwrap();
    for i in 0..8u64 {
        c.insert(i * P, &page(i as u8), i).unwrap();
    }
    c.resize(32 * P).unwrap();
    assert_eq!(c.size(), 32 * P);
    assert_eq!(c.capacity(), 32);
    assert_eq!(c.len(), 8);
    for i in 0..8u64 {
        assert_eq!(c.get(i * P), Some(&page(i as u8)[..]));
        assert_eq!(c.generation_of(i * P), Some(i));
    }
}

#[test]
fn growing_keeps_aliased_entries_too() {
    // 2 slots, 1 way: pages 0 and 2 cannot both be cached; 1 and 3 neither.
    let mut c = PageCache::with_ways(2 * P, PAGE, 1).unwrap();
    for i in 0..2u64 {
        c.insert(i * P, &page(i as u8), 1).unwrap();
    }
    c.resize(8 * P).unwrap();
    for i in 2..4u64 {
        c.insert(i * P, &page(i as u8), 1).unwrap();
    }
    // Shrink back: where two entries compete, the newest generation wins.
    assert_eq!(c.len(), 4);
    assert!(c.is_cached(2 * P, 9));
    c.resize(2 * P).unwrap();
    assert_eq!(c.len(), 2);
    assert!(
        c.get(2 * P).is_some(),
        "the entry hit at generation 9 stays"
    );
    assert!(c.get(0).is_none());
}

#[test]
fn shrinking_keeps_what_fits_newest_first() {
    // 8 slots direct-mapped, pages 0..8 with generation = page number.
    let mut c = PageCache::with_ways(8 * P, PAGE, 1).unwrap();
    for i in 0..8u64 {
        c.insert(i * P, &page(i as u8), i).unwrap();
    }
    c.resize(4 * P).unwrap();
    assert_eq!(c.len(), 4);
    // Page i and page i + 4 compete for slot i; the newer (i + 4) stays.
    for i in 0..4u64 {
        assert!(c.get(i * P).is_none(), "page {i}");
        assert_eq!(c.get((i + 4) * P), Some(&page(i as u8 + 4)[..]));
    }
}

#[test]
fn shrinking_two_way_cache_keeps_both_ways() {
    let mut c = PageCache::new(8 * P, PAGE).unwrap();
    for i in 0..8u64 {
        c.insert(i * P, &page(i as u8), 1).unwrap();
    }
    c.resize(4 * P).unwrap();
    assert_eq!(c.len(), 4);
    assert_eq!(c.capacity(), 4);
    // Every kept entry still holds its own page.
    for i in 0..8u64 {
        if let Some(data) = c.get(i * P) {
            assert_eq!(data, &page(i as u8)[..]);
        }
    }
}

#[test]
fn invalid_resize_is_an_error_and_changes_nothing() {
    let mut c = PageCache::new(8 * P, PAGE).unwrap();
    c.insert(0, &page(1), 1).unwrap();
    assert_eq!(
        c.resize(3 * P),
        Err(CacheError::NotPowerOfTwo {
            size: 3 * P,
            pages: 3
        })
    );
    assert_eq!(
        c.resize(100),
        Err(CacheError::TooSmall {
            size: 100,
            page_size: PAGE
        })
    );
    assert_eq!(c.size(), 8 * P);
    assert_eq!(c.get(0), Some(&page(1)[..]));
}

#[test]
fn resize_to_the_same_size_changes_nothing() {
    let mut c = PageCache::new(8 * P, PAGE).unwrap();
    c.insert(0, &page(1), 1).unwrap();
    c.resize(8 * P).unwrap();
    assert_eq!(c.get(0), Some(&page(1)[..]));
}

#[test]
fn one_page_cache_works() {
    let mut c = PageCache::new(P, PAGE).unwrap();
    assert_eq!((c.capacity(), c.ways()), (1, 1));
    c.insert(5 * P, &page(5), 1).unwrap();
    assert_eq!(c.get(5 * P), Some(&page(5)[..]));
    assert!(!c.insert(6 * P, &page(6), 2).unwrap());
    assert!(c.insert(6 * P, &page(6), 3).unwrap());
}
