//! The XBZRLE encoder: byte-for-byte QEMU's `xbzrle_encode_buffer`.
//!
//! The page pair is scanned 64 bytes at a time with a difference kernel
//! (AVX2, SSE2 or scalar, chosen at run time), so long equal stretches are
//! skipped a block per step and run boundaries are found with
//! `trailing_zeros` on the block's mask. The output, and the decision to
//! give up ("overflow"), are the same as QEMU's for every input; only the
//! speed differs.
//!
//! QEMU checks for room at three points, and so does this encoder:
//! 1. at the top of each pair (also before finding that the rest of the page
//!    is unchanged): at least 2 bytes must be left;
//! 2. after the zero-run length: at least 2 bytes must be left;
//! 3. after the non-zero-run length: the run's bytes must fit.

use std::sync::OnceLock;

use super::kernel::{partial_diff, DiffMask, Scalar, BLOCK};
#[cfg(target_arch = "x86_64")]
use super::kernel::{Avx2, Sse2};
use super::uleb128;
use super::MAX_PAGE_SIZE;

/// A difference kernel the encoder can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Portable 64-bit word arithmetic.
    Scalar,
    /// SSE2, present on every x86-64.
    Sse2,
    /// AVX2, when the CPU has it.
    Avx2,
}

impl Kernel {
    /// Every kernel, slowest first.
    pub const ALL: [Kernel; 3] = [Kernel::Scalar, Kernel::Sse2, Kernel::Avx2];

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Sse2 => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Sse2 | Kernel::Avx2 => false,
        }
    }

    /// The fastest kernel this CPU can run (detected once per process).
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            Kernel::ALL
                .into_iter()
                .rev()
                .find(|k| k.is_available())
                .unwrap_or(Kernel::Scalar)
        })
    }

    /// Short lower-case name, for reports and benchmark labels.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Sse2 => "sse2",
            Kernel::Avx2 => "avx2",
        }
    }
}

/// Encodes `new` as a delta against `old` into `dst`, with the fastest
/// kernel.
///
/// Returns `Some(0)` when the pages are identical, `Some(n)` when the delta
/// is the first `n` bytes of `dst`, and `None` ("overflow") when the delta
/// would not fit in `dst` (QEMU's -1). Bytes of `dst` past the delta (all
/// of them on overflow) are unspecified.
///
/// # Panics
///
/// If `old` and `new` differ in length or are longer than
/// [`MAX_PAGE_SIZE`] (both are the caller's bugs).
pub fn encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    encode_with(Kernel::best(), old, new, dst)
}

/// [`encode`] under QEMU's name: the page size is `old.len()` (QEMU's
/// `slen`), the room is `dst.len()` (QEMU's `dlen`).
pub fn xbzrle_encode_buffer(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    encode(old, new, dst)
}

/// [`encode`] with a chosen kernel (falls back to the scalar kernel when
/// this CPU cannot run the one asked for). Every kernel gives the same
/// result; this exists for tests and benchmarks.
///
/// # Panics
///
/// As [`encode`].
pub fn encode_with(kernel: Kernel, old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    assert_eq!(old.len(), new.len(), "XBZRLE pages must have the same size");
    assert!(
        old.len() <= MAX_PAGE_SIZE,
        "XBZRLE page of {} bytes is larger than {MAX_PAGE_SIZE}",
        old.len()
    );
    if old.is_empty() {
        return Some(0);
    }
    let kernel = if kernel.is_available() {
        kernel
    } else {
        Kernel::Scalar
    };
    match kernel {
        // SAFETY: the scalar kernel needs no CPU feature.
        Kernel::Scalar => unsafe { encode_core::<Scalar>(old, new, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE2 is part of the x86-64 baseline.
        Kernel::Sse2 => unsafe { encode_core::<Sse2>(old, new, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `kernel.is_available()` detected AVX2 above.
        Kernel::Avx2 => unsafe { encode_avx2(old, new, dst) },
        #[cfg(not(target_arch = "x86_64"))]
        // SAFETY: the scalar kernel needs no CPU feature.
        Kernel::Sse2 | Kernel::Avx2 => unsafe { encode_core::<Scalar>(old, new, dst) },
    }
}

/// The encoder compiled with AVX2 enabled, so the kernel inlines.
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_avx2(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    // SAFETY: the caller guarantees AVX2.
    unsafe { encode_core::<Avx2>(old, new, dst) }
}

/// The encoding loop: one iteration per (zero run, non-zero run) pair.
///
/// # Safety
///
/// The CPU must support kernel `K`'s features.
#[inline(always)]
unsafe fn encode_core<K: DiffMask>(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    let slen = old.len();
    let dlen = dst.len();
    let mut scan = Scan::<K>::new(old, new);
    let mut pos = 0;
    let mut d = 0;
    loop {
        // SAFETY: forwarded from this function's contract.
        let changed = unsafe { scan.next_changed(pos) };
        if changed == slen {
            // Nothing changes from `pos` on: the trailing zero run is not
            // sent. QEMU asks for 2 free bytes before it finds that out
            // (also when the whole page is unchanged).
            return if d + 2 > dlen { None } else { Some(d) };
        }
        // SAFETY: as above.
        let same = unsafe { scan.next_same(changed) };
        let zrun = changed - pos;
        let nzrun = same - changed;
        // Both fit in u32: runs are at most MAX_PAGE_SIZE bytes.
        let zlen = uleb128::encoded_len(zrun as u32);
        let nzlen = uleb128::encoded_len(nzrun as u32);
        if d + zlen + 2 > dlen || d + zlen + nzlen + nzrun > dlen {
            return None;
        }
        d += uleb128::encode(zrun as u32, &mut dst[d..]);
        d += uleb128::encode(nzrun as u32, &mut dst[d..]);
        copy_run(&mut dst[d..], new, changed, nzrun);
        d += nzrun;
        if same == slen {
            return Some(d);
        }
        pos = same;
    }
}

/// Copies `new[at..at + len]` to the start of `out` (which has room for
/// `len` bytes). Short runs, the common case, are copied as one 16-byte
/// move when both sides have 16 bytes, rather than through `memcpy`; the
/// bytes past `len` written then are overwritten by what follows or lie
/// past the end of the delta.
#[inline(always)]
fn copy_run(out: &mut [u8], new: &[u8], at: usize, len: usize) {
    const SHORT: usize = 16;
    if len <= SHORT {
        if let (Some(o), Some(n)) = (out.get_mut(..SHORT), new.get(at..at + SHORT)) {
            o.copy_from_slice(n);
            return;
        }
    }
    out[..len].copy_from_slice(&new[at..at + len]);
}

/// Finds run boundaries in a page pair with kernel `K`, keeping the mask of
/// the block it is in.
struct Scan<'a, K> {
    old: &'a [u8],
    new: &'a [u8],
    /// Number of blocks, the last one possibly partial.
    blocks: usize,
    /// The block whose mask is in `mask` (`usize::MAX`: none yet).
    block: usize,
    /// Difference mask of `block`.
    mask: u64,
    kernel: std::marker::PhantomData<K>,
}

impl<'a, K: DiffMask> Scan<'a, K> {
    #[inline(always)]
    fn new(old: &'a [u8], new: &'a [u8]) -> Self {
        Scan {
            old,
            new,
            blocks: old.len().div_ceil(BLOCK),
            block: usize::MAX,
            mask: 0,
            kernel: std::marker::PhantomData,
        }
    }

    /// Makes `b` the current block and returns its mask; bits past the
    /// page's end are clear.
    ///
    /// # Safety
    ///
    /// The CPU must support kernel `K`'s features.
    #[inline(always)]
    unsafe fn load(&mut self, b: usize) -> u64 {
        if b != self.block {
            let start = b * BLOCK;
            let range = start..start + BLOCK;
            let whole = self
                .old
                .get(range.clone())
                .and_then(|o| <&[u8; BLOCK]>::try_from(o).ok())
                .zip(
                    self.new
                        .get(range)
                        .and_then(|n| <&[u8; BLOCK]>::try_from(n).ok()),
                );
            self.mask = match whole {
                // SAFETY: forwarded from this function's contract.
                Some((o, n)) => unsafe { K::diff(o, n) },
                None => partial_diff(
                    self.old.get(start..).unwrap_or_default(),
                    self.new.get(start..).unwrap_or_default(),
                ),
            };
            self.block = b;
        }
        self.mask
    }

    /// First offset at or after `pos` where the pages differ, or the page
    /// size.
    ///
    /// # Safety
    ///
    /// As [`Scan::load`].
    #[inline(always)]
    unsafe fn next_changed(&mut self, pos: usize) -> usize {
        let b = pos / BLOCK;
        if b >= self.blocks {
            return self.old.len();
        }
        // SAFETY: forwarded.
        let m = unsafe { self.load(b) } & (!0u64 << (pos % BLOCK));
        if m != 0 {
            return b * BLOCK + m.trailing_zeros() as usize;
        }
        // SAFETY: forwarded.
        let b = unsafe { K::skip_equal(self.old, self.new, (b + 1) * BLOCK) } / BLOCK;
        if b >= self.blocks {
            return self.old.len();
        }
        // SAFETY: forwarded.
        match unsafe { self.load(b) } {
            // Only a partial last block can be equal here.
            0 => self.old.len(),
            m => b * BLOCK + m.trailing_zeros() as usize,
        }
    }

    /// First offset at or after `pos` where the pages are equal, or the page
    /// size.
    ///
    /// # Safety
    ///
    /// As [`Scan::load`].
    #[inline(always)]
    unsafe fn next_same(&mut self, pos: usize) -> usize {
        let mut b = pos / BLOCK;
        if b >= self.blocks {
            return self.old.len();
        }
        // SAFETY: forwarded.
        let mut m = !unsafe { self.load(b) } & (!0u64 << (pos % BLOCK));
        while m == 0 {
            b += 1;
            if b >= self.blocks {
                return self.old.len();
            }
            // SAFETY: forwarded.
            m = !unsafe { self.load(b) };
        }
        // Bits past the end of a partial block read as "equal".
        (b * BLOCK + m.trailing_zeros() as usize).min(self.old.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn all_kernels(old: &[u8], new: &[u8], dlen: usize) -> Option<Vec<u8>> {
        let mut first: Option<Option<Vec<u8>>> = None;
        for k in Kernel::ALL {
            let mut dst = vec![0u8; dlen];
            let out = encode_with(k, old, new, &mut dst).map(|n| dst[..n].to_vec());
            match &first {
                None => first = Some(out),
                Some(f) => assert_eq!(f, &out, "kernel {} disagrees", k.name()),
            }
        }
        first.flatten()
    }

    #[test]
    fn identical_pages_encode_to_nothing() {
        let page = vec![0x5a; PAGE];
        assert_eq!(all_kernels(&page, &page, PAGE), Some(vec![]));
    }

    #[test]
    fn last_byte_changed_encodes_to_qemu_bytes() {
        let old = vec![0u8; PAGE];
        let mut new = old.clone();
        new[PAGE - 1] = 1;
        assert_eq!(
            all_kernels(&old, &new, PAGE),
            Some(vec![0xff, 0x1f, 0x01, 0x01])
        );
    }

    #[test]
    fn first_byte_changed_starts_with_an_empty_zero_run() {
        let old = vec![0u8; PAGE];
        let mut new = old.clone();
        new[0] = 7;
        assert_eq!(all_kernels(&old, &new, PAGE), Some(vec![0x00, 0x01, 0x07]));
    }

    #[test]
    fn every_byte_changed_overflows() {
        let old = vec![0u8; PAGE];
        let new = vec![1u8; PAGE];
        assert_eq!(all_kernels(&old, &new, PAGE), None);
    }

    #[test]
    fn page_of_odd_size_encodes_its_tail() {
        let old = vec![0u8; 100];
        let mut new = old.clone();
        new[99] = 9;
        new[70] = 8;
        assert_eq!(all_kernels(&old, &new, 100), Some(vec![70, 1, 8, 28, 1, 9]));
    }

    #[test]
    fn best_kernel_is_available() {
        assert!(Kernel::best().is_available());
    }
}
