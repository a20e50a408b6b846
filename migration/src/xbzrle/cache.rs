//! The XBZRLE page cache: the copy of each page as last sent, by RAM offset.
//!
//! Like QEMU's `migration/page_cache.c`:
//! - sized in bytes by `xbzrle-cache-size`; `size / page_size` slots, which
//!   must be a power of two;
//! - a page's place is chosen by the low bits of its page number (so a
//!   contiguous range of up to `slots` pages never collides);
//! - every entry is stamped with the dirty-sync generation at which it was
//!   inserted or last hit, and an entry for another page is not replaced
//!   while it is fresh: `entry generation + CACHED_PAGE_LIFETIME > current`
//!   (QEMU's `cache_insert` rule, lifetime 2);
//! - page buffers are allocated on first use, and an allocation failure is
//!   an error, not an abort.
//!
//! Better than QEMU:
//! - **set-associative** (2 ways by default, [`PageCache::with_ways`] picks
//!   1 for QEMU's direct mapping): two pages whose offsets differ by a
//!   multiple of the cache size no longer evict each other; the victim in a
//!   full set is its least recently used entry, still under the freshness
//!   rule. A set of two 32-byte entries is one cache line, so a lookup costs
//!   what QEMU's does;
//! - **resize keeps entries**: QEMU drops the whole cache when
//!   `xbzrle-cache-size` changes; [`PageCache::resize`] re-places every entry
//!   in the new table, newest generation first, and drops only those that no
//!   longer fit. Growing never drops an entry. Page buffers move, they are
//!   not copied.

/// Generations during which an entry may not be replaced by another page
/// (QEMU's `CACHED_PAGE_LIFETIME`).
pub const CACHED_PAGE_LIFETIME: u64 = 2;

/// Ways per set of [`PageCache::new`].
pub const DEFAULT_WAYS: usize = 2;

/// Errors creating, resizing or filling the page cache.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    /// Fewer bytes than one page (QEMU's text).
    #[error("cache size is smaller than target page size")]
    TooSmall {
        /// Requested size in bytes.
        size: u64,
        /// Page size in bytes.
        page_size: usize,
    },
    /// `size / page_size` is not a power of two (QEMU's text).
    #[error("number of pages is not a power of two")]
    NotPowerOfTwo {
        /// Requested size in bytes.
        size: u64,
        /// Number of pages it holds.
        pages: u64,
    },
    /// The page size is not a power of two up to
    /// [`MAX_PAGE_SIZE`](super::MAX_PAGE_SIZE).
    #[error(
        "page size {page_size} is not a power of two of at most {} bytes",
        super::MAX_PAGE_SIZE
    )]
    BadPageSize {
        /// The page size given.
        page_size: usize,
    },
    /// The number of ways is not a power of two.
    #[error("cache associativity {ways} is not a power of two")]
    BadWays {
        /// The number of ways given.
        ways: usize,
    },
    /// Memory for the cache could not be allocated (QEMU's text).
    #[error("Failed to allocate page cache")]
    Alloc,
    /// A page of the wrong size was offered.
    #[error("page of {len} bytes offered to a cache of {page_size}-byte pages")]
    PageSize {
        /// Size of the page offered.
        len: usize,
        /// The cache's page size.
        page_size: usize,
    },
}

/// One slot: which page it holds, since when, and its bytes.
#[derive(Debug, Default)]
struct Entry {
    addr: u64,
    generation: u64,
    data: Option<Box<[u8]>>,
}

impl Entry {
    #[inline]
    fn holds(&self, addr: u64) -> bool {
        self.data.is_some() && self.addr == addr
    }
}

/// XBZRLE page cache, keyed by RAM offset (see the module doc).
#[derive(Debug)]
pub struct PageCache {
    size: u64,
    page_size: usize,
    page_shift: u32,
    /// Ways asked for; the table uses `min(ways, slots)`.
    ways_wanted: usize,
    ways: usize,
    set_mask: u64,
    /// `sets * ways` entries; set `s` is `entries[s * ways..(s + 1) * ways]`.
    entries: Vec<Entry>,
    items: usize,
}

impl PageCache {
    /// A cache of `size` bytes of `page_size`-byte pages, [`DEFAULT_WAYS`]
    /// ways per set.
    pub fn new(size: u64, page_size: usize) -> Result<Self, CacheError> {
        Self::with_ways(size, page_size, DEFAULT_WAYS)
    }

    /// A cache with `ways` entries per set (1 is QEMU's direct mapping).
    pub fn with_ways(size: u64, page_size: usize, ways: usize) -> Result<Self, CacheError> {
        if !page_size.is_power_of_two() || page_size > super::MAX_PAGE_SIZE {
            return Err(CacheError::BadPageSize { page_size });
        }
        if !ways.is_power_of_two() {
            return Err(CacheError::BadWays { ways });
        }
        if size < page_size as u64 {
            return Err(CacheError::TooSmall { size, page_size });
        }
        let slots = size / page_size as u64;
        if !slots.is_power_of_two() {
            return Err(CacheError::NotPowerOfTwo { size, pages: slots });
        }
        let slots = usize::try_from(slots).map_err(|_| CacheError::Alloc)?;
        let ways_used = ways.min(slots);
        let mut entries = Vec::new();
        entries
            .try_reserve_exact(slots)
            .map_err(|_| CacheError::Alloc)?;
        entries.resize_with(slots, Entry::default);
        Ok(PageCache {
            size,
            page_size,
            page_shift: page_size.trailing_zeros(),
            ways_wanted: ways,
            ways: ways_used,
            set_mask: (slots / ways_used) as u64 - 1,
            entries,
            items: 0,
        })
    }

    /// The size in bytes it was created or last resized with.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages it can hold.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Entries per set.
    pub fn ways(&self) -> usize {
        self.ways
    }

    /// Pages it holds.
    pub fn len(&self) -> usize {
        self.items
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    #[inline]
    fn set_range(&self, addr: u64) -> std::ops::Range<usize> {
        // The set index is masked to fewer than `entries.len() / ways` sets,
        // so it fits in usize.
        let set = ((addr >> self.page_shift) & self.set_mask) as usize;
        set * self.ways..(set + 1) * self.ways
    }

    #[inline]
    fn find(&self, addr: u64) -> Option<usize> {
        let range = self.set_range(addr);
        let start = range.start;
        self.entries
            .get(range)?
            .iter()
            .position(|e| e.holds(addr))
            .map(|w| start + w)
    }

    /// Whether the page at `addr` is cached; a hit stamps the entry with
    /// `generation` (QEMU's `cache_is_cached`).
    pub fn is_cached(&mut self, addr: u64, generation: u64) -> bool {
        self.touch(addr, generation).is_some()
    }

    /// The cached copy of the page at `addr`, stamped with `generation` on a
    /// hit (one lookup for `is_cached` followed by `lookup`).
    pub fn touch(&mut self, addr: u64, generation: u64) -> Option<&mut [u8]> {
        let i = self.find(addr)?;
        let entry = self.entries.get_mut(i)?;
        entry.generation = generation;
        entry.data.as_deref_mut()
    }

    /// The cached copy of the page at `addr`, to update it in place.
    pub fn lookup(&mut self, addr: u64) -> Option<&mut [u8]> {
        let i = self.find(addr)?;
        self.entries.get_mut(i)?.data.as_deref_mut()
    }

    /// The cached copy of the page at `addr`.
    pub fn get(&self, addr: u64) -> Option<&[u8]> {
        self.entries.get(self.find(addr)?)?.data.as_deref()
    }

    /// The generation the entry for `addr` was inserted or last hit at.
    pub fn generation_of(&self, addr: u64) -> Option<u64> {
        Some(self.entries.get(self.find(addr)?)?.generation)
    }

    /// Stores a copy of `page` as the page at `addr`, stamped `generation`
    /// (QEMU's `cache_insert`).
    ///
    /// Returns `Ok(true)` when stored, `Ok(false)` when refused because every
    /// place for it holds another page that is still fresh. A page already
    /// cached is always overwritten.
    pub fn insert(&mut self, addr: u64, page: &[u8], generation: u64) -> Result<bool, CacheError> {
        if page.len() != self.page_size {
            return Err(CacheError::PageSize {
                len: page.len(),
                page_size: self.page_size,
            });
        }
        let Some(slot) = self.place_for(addr, generation) else {
            return Ok(false);
        };
        let page_size = self.page_size;
        let Some(entry) = self.entries.get_mut(slot) else {
            return Ok(false);
        };
        match entry.data.as_deref_mut() {
            Some(data) => data.copy_from_slice(page),
            None => {
                let mut buf = Vec::new();
                buf.try_reserve_exact(page_size)
                    .map_err(|_| CacheError::Alloc)?;
                buf.extend_from_slice(page);
                entry.data = Some(buf.into_boxed_slice());
                self.items += 1;
            }
        }
        entry.addr = addr;
        entry.generation = generation;
        Ok(true)
    }

    /// The slot `addr` goes to: its own, a free one, or the least recently
    /// used one of its set if that is no longer fresh.
    fn place_for(&self, addr: u64, generation: u64) -> Option<usize> {
        let range = self.set_range(addr);
        let start = range.start;
        let set = self.entries.get(range)?;
        if let Some(w) = set.iter().position(|e| e.holds(addr)) {
            return Some(start + w);
        }
        if let Some(w) = set.iter().position(|e| e.data.is_none()) {
            return Some(start + w);
        }
        let (w, oldest) = set.iter().enumerate().min_by_key(|(_, e)| e.generation)?;
        if oldest.generation.saturating_add(CACHED_PAGE_LIFETIME) > generation {
            return None;
        }
        Some(start + w)
    }

    /// Changes the size to `new_size` bytes, keeping every entry that still
    /// has a place; where entries compete for places, the newest generations
    /// win. On error the cache is unchanged.
    pub fn resize(&mut self, new_size: u64) -> Result<(), CacheError> {
        if new_size == self.size {
            return Ok(());
        }
        let mut resized = PageCache::with_ways(new_size, self.page_size, self.ways_wanted)?;
        let mut old: Vec<Entry> = std::mem::take(&mut self.entries)
            .into_iter()
            .filter(|e| e.data.is_some())
            .collect();
        // Newest first; equal generations keep their table order.
        old.sort_by_key(|e| std::cmp::Reverse(e.generation));
        for entry in old {
            let range = resized.set_range(entry.addr);
            let start = range.start;
            let free = resized
                .entries
                .get(range)
                .and_then(|set| set.iter().position(|e| e.data.is_none()));
            if let Some(slot) = free.and_then(|w| resized.entries.get_mut(start + w)) {
                *slot = entry;
                resized.items += 1;
            }
        }
        *self = resized;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; PAGE]
    }

    #[test]
    fn sizes_are_checked_with_qemu_messages() {
        let err = PageCache::new(2048, PAGE).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cache size is smaller than target page size"
        );
        let err = PageCache::new(3 * 4096, PAGE).unwrap_err();
        assert_eq!(err.to_string(), "number of pages is not a power of two");
        assert!(PageCache::new(4096, PAGE).is_ok());
        assert_eq!(
            PageCache::new(1 << 22, 1 << 21).unwrap_err(),
            CacheError::BadPageSize { page_size: 1 << 21 }
        );
        assert_eq!(
            PageCache::new(1 << 22, 3000).unwrap_err(),
            CacheError::BadPageSize { page_size: 3000 }
        );
    }

    #[test]
    fn insert_then_lookup_returns_the_copy() {
        let mut c = PageCache::new(16 * 4096, PAGE).unwrap();
        assert!(c.insert(0x5000, &page(7), 1).unwrap());
        assert_eq!(c.get(0x5000), Some(&page(7)[..]));
        assert!(c.is_cached(0x5000, 1));
        assert!(!c.is_cached(0x6000, 1));
        assert_eq!(c.len(), 1);
        c.lookup(0x5000).unwrap()[0] = 9;
        assert_eq!(c.get(0x5000).unwrap()[0], 9);
    }

    #[test]
    fn wrong_page_size_is_an_error() {
        let mut c = PageCache::new(16 * 4096, PAGE).unwrap();
        assert_eq!(
            c.insert(0, &[0; 10], 0),
            Err(CacheError::PageSize {
                len: 10,
                page_size: PAGE
            })
        );
    }
}
