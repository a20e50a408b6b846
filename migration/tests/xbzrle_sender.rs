//! XbzrleEncoder as the migration thread uses it: a simulated guest that
//! keeps writing, a destination that applies what is sent, statistics.

// Helpers outside #[test] functions unwrap too: these are tests.
#![allow(clippy::unwrap_used)]

use migration::xbzrle::{apply_delta, Outcome, XbzrleEncoder};

const PAGE: usize = 4096;
const P: u64 = PAGE as u64;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Guest memory, its dirty set, and the destination's copy.
struct Sim {
    guest: Vec<Vec<u8>>,
    dirty: Vec<bool>,
    dest: Vec<Vec<u8>>,
}

impl Sim {
    fn new(pages: usize, rng: &mut Rng) -> Self {
        let guest: Vec<Vec<u8>> = (0..pages)
            .map(|_| (0..PAGE).map(|_| rng.next() as u8).collect())
            .collect();
        Sim {
            dirty: vec![true; pages],
            dest: vec![vec![0; PAGE]; pages],
            guest,
        }
    }

    /// A guest write of a few bytes into page `p`.
    fn write(&mut self, p: usize, rng: &mut Rng) {
        let len = 1 + rng.below(32);
        let at = rng.below(PAGE - len);
        for b in &mut self.guest[p][at..at + len] {
            *b = rng.next() as u8;
        }
        self.dirty[p] = true;
    }

    /// One round: every dirty page is copied once, encoded, and applied at
    /// the destination; the guest writes to some pages between the copy
    /// and the send (the race the single copy guards against).
    fn round(&mut self, enc: &mut XbzrleEncoder, generation: u64, rng: &mut Rng, racing: bool) {
        let dirty: Vec<usize> = (0..self.guest.len()).filter(|&p| self.dirty[p]).collect();
        let mut sent = 0;
        for p in dirty {
            self.dirty[p] = false;
            let copy = self.guest[p].clone();
            if racing && rng.below(4) == 0 {
                self.write(p, rng);
            }
            match enc.encode_page(p as u64 * P, &copy, generation) {
                Outcome::Unchanged => {}
                Outcome::Delta(delta) => {
                    apply_delta(&mut self.dest[p], delta).unwrap();
                }
                Outcome::Whole { .. } => self.dest[p].copy_from_slice(&copy),
            }
            sent += 1;
            // The invariant deltas rely on: a cached page equals the
            // destination's copy.
            if let Some(cached) = enc.cache().get(p as u64 * P) {
                assert_eq!(cached, &self.dest[p][..], "cache and destination differ");
            }
        }
        enc.update_rates(sent);
    }
}

#[test]
fn destination_converges_while_the_guest_races_the_sender() {
    let mut rng = Rng(0xdead_beef);
    let pages = 256;
    // A cache of half the pages, so misses, refusals and evictions happen.
    let mut enc = XbzrleEncoder::new(128 * P).unwrap();
    let mut sim = Sim::new(pages, &mut rng);
    for generation in 1..=20 {
        for _ in 0..64 {
            let p = rng.below(pages);
            sim.write(p, &mut rng);
        }
        sim.round(&mut enc, generation, &mut rng, true);
    }
    // The guest stops; the last round sends what is still dirty.
    sim.round(&mut enc, 21, &mut rng, false);
    assert!(sim.dirty.iter().all(|&d| !d));
    assert_eq!(sim.dest, sim.guest);
    let s = enc.stats();
    assert!(s.pages > 0 && s.cache_miss > 0, "{s:?}");
}

#[test]
fn last_stage_still_delivers_every_page() {
    let mut rng = Rng(0x1234);
    let mut enc = XbzrleEncoder::new(64 * P).unwrap();
    let mut sim = Sim::new(64, &mut rng);
    sim.round(&mut enc, 1, &mut rng, false);
    for _ in 0..40 {
        let p = rng.below(64);
        sim.write(p, &mut rng);
    }
    enc.set_last_stage(true);
    let dirty: Vec<usize> = (0..64).filter(|&p| sim.dirty[p]).collect();
    for p in dirty {
        let copy = sim.guest[p].clone();
        match enc.encode_page(p as u64 * P, &copy, 2) {
            Outcome::Unchanged => {}
            Outcome::Delta(delta) => {
                apply_delta(&mut sim.dest[p], delta).unwrap();
            }
            Outcome::Whole { .. } => sim.dest[p].copy_from_slice(&copy),
        }
    }
    assert_eq!(sim.dest, sim.guest);
}

#[test]
fn counters_follow_qemu_and_rates_are_per_period() {
    let mut enc = XbzrleEncoder::new(16 * P).unwrap();
    let zero = vec![0u8; PAGE];
    // Period 1: 4 misses.
    for p in 0..4 {
        assert_eq!(
            enc.encode_page(p * P, &zero, 1),
            Outcome::Whole { cached: true }
        );
    }
    enc.update_rates(4);
    let s = enc.stats();
    assert_eq!((s.cache_miss, s.pages, s.bytes, s.overflow), (4, 0, 0, 0));
    assert_eq!(s.cache_miss_rate, 1.0);
    assert_eq!(s.encoding_rate, 0.0);

    // Period 2: one delta of 4 bytes, one unchanged, one overflow, and one
    // page sent without XBZRLE (counted only in the pages sent).
    let mut last = zero.clone();
    last[PAGE - 1] = 1;
    assert_eq!(
        enc.encode_page(0, &last, 2),
        Outcome::Delta(&[0xff, 0x1f, 0x01, 0x01][..])
    );
    assert_eq!(enc.encode_page(P, &zero, 2), Outcome::Unchanged);
    assert_eq!(
        enc.encode_page(2 * P, &vec![0x55u8; PAGE], 2),
        Outcome::Whole { cached: true }
    );
    enc.update_rates(4);
    let s = enc.stats();
    assert_eq!((s.cache_miss, s.pages, s.overflow), (4, 3, 1));
    assert_eq!(s.bytes, (4 + 3) + PAGE as u64);
    assert_eq!(s.cache_miss_rate, 0.0);
    assert_eq!(s.encoding_rate, (3 * PAGE) as f64 / (7 + PAGE) as f64);
    assert_eq!(s.cache_size, 16 * P);

    // The QMP form.
    let json = serde_json::to_value(s).unwrap();
    for key in [
        "cache-size",
        "bytes",
        "pages",
        "cache-miss",
        "cache-miss-rate",
        "encoding-rate",
        "overflow",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
}

#[test]
fn resizing_the_cache_mid_migration_keeps_hits() {
    let mut enc = XbzrleEncoder::new(16 * P).unwrap();
    let zero = vec![0u8; PAGE];
    for p in 0..16 {
        enc.encode_page(p * P, &zero, 1);
    }
    enc.resize_cache(64 * P).unwrap();
    assert_eq!(enc.stats().cache_size, 64 * P);
    let mut changed = zero.clone();
    changed[7] = 7;
    for p in 0..16 {
        assert!(
            matches!(enc.encode_page(p * P, &changed, 2), Outcome::Delta(_)),
            "page {p} lost by the resize"
        );
    }
    assert_eq!(enc.stats().cache_miss, 16);
    assert!(enc.resize_cache(3 * P).is_err());
}

#[test]
fn zero_page_then_small_write_goes_out_as_a_delta() {
    let mut enc = XbzrleEncoder::new(16 * P).unwrap();
    enc.cache_zero_page(5 * P, 1);
    let mut page = vec![0u8; PAGE];
    page[0] = 1;
    assert_eq!(
        enc.encode_page(5 * P, &page, 2),
        Outcome::Delta(&[0x00, 0x01, 0x01][..])
    );
}
