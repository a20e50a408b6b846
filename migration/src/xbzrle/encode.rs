//! The XBZRLE encoder: byte-for-byte QEMU's `xbzrle_encode_buffer`.
//!
//! The page pair is scanned 64 bytes at a time with a difference kernel
//! (AVX2, SSE2 or scalar, chosen at run time): equal stretches are skipped
//! 64 or 128 bytes per step, and the run boundaries inside a block are found
//! with `trailing_zeros` on the block's mask. The output, and the decision to
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

/// The encoding loop, one block of 64 bytes at a time.
///
/// A block's difference mask `m` is turned into its run boundaries,
/// `m ^ (m << 1 | previous bit)`, and those are walked with
/// `trailing_zeros`: the loop alternates strictly between "a zero run ends"
/// and "a non-zero run ends", so the only hard-to-predict branch is the
/// end of each block, not the end of each run. Equal blocks met inside a
/// zero run are skipped by [`DiffMask::skip_equal`] without building masks.
///
/// # Safety
///
/// The CPU must support kernel `K`'s features.
#[inline(always)]
unsafe fn encode_core<K: DiffMask>(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    let slen = old.len();
    let blocks = slen.div_ceil(BLOCK);
    let mut d = 0;
    // Start of the current zero run, and of the current non-zero run when
    // `in_zero` is false.
    let mut zero_start = 0;
    let mut changed_start = 0;
    let mut in_zero = true;
    let mut b = 0;
    while b < blocks {
        // SAFETY: forwarded from this function's contract.
        let m = unsafe { block_mask::<K>(old, new, b) };
        if in_zero && m == 0 {
            // SAFETY: as above.
            b = unsafe { K::skip_equal(old, new, (b + 1) * BLOCK) } / BLOCK;
            continue;
        }
        // Bit i set where byte i starts a run of the other kind. Bits past
        // the end of a partial block are clear, so a run that reaches the
        // end of the page ends there.
        let mut edges = m ^ ((m << 1) | u64::from(!in_zero));
        while edges != 0 {
            let pos = b * BLOCK + edges.trailing_zeros() as usize;
            edges &= edges - 1;
            if in_zero {
                changed_start = pos;
            } else {
                d = emit(dst, d, changed_start - zero_start, new, changed_start, pos)?;
                zero_start = pos;
            }
            in_zero = !in_zero;
        }
        b += 1;
    }
    if !in_zero {
        // The page ends inside a non-zero run: QEMU's loop ends with it.
        return emit(dst, d, changed_start - zero_start, new, changed_start, slen);
    }
    if zero_start == slen {
        // The last non-zero run ended exactly at the end of the page.
        return Some(d);
    }
    // The trailing zero run is not sent, but QEMU asks for 2 free bytes
    // before it finds out that it is the last run (also when the whole page
    // is unchanged).
    if d + 2 > dst.len() {
        None
    } else {
        Some(d)
    }
}

/// Difference mask of block `b`; bits past the page's end are clear.
///
/// # Safety
///
/// The CPU must support kernel `K`'s features.
#[inline(always)]
unsafe fn block_mask<K: DiffMask>(old: &[u8], new: &[u8], b: usize) -> u64 {
    let start = b * BLOCK;
    let range = start..start + BLOCK;
    let whole = old
        .get(range.clone())
        .and_then(|o| <&[u8; BLOCK]>::try_from(o).ok())
        .zip(
            new.get(range)
                .and_then(|n| <&[u8; BLOCK]>::try_from(n).ok()),
        );
    match whole {
        // SAFETY: forwarded from this function's contract.
        Some((o, n)) => unsafe { K::diff(o, n) },
        None => partial_diff(
            old.get(start..).unwrap_or_default(),
            new.get(start..).unwrap_or_default(),
        ),
    }
}

/// Appends one pair at `dst[d..]`: a zero run of `zrun` bytes and the
/// non-zero run `new[start..end]`. Applies QEMU's room checks 2 and 3
/// (see the module doc) and returns the new length, or `None` on overflow.
#[inline(always)]
fn emit(
    dst: &mut [u8],
    d: usize,
    zrun: usize,
    new: &[u8],
    start: usize,
    end: usize,
) -> Option<usize> {
    let nzrun = end - start;
    // Both fit in u32: runs are at most MAX_PAGE_SIZE bytes.
    let zlen = uleb128::encoded_len(zrun as u32);
    let nzlen = uleb128::encoded_len(nzrun as u32);
    if d + zlen + 2 > dst.len() || d + zlen + nzlen + nzrun > dst.len() {
        return None;
    }
    let mut d = d + uleb128::encode(zrun as u32, &mut dst[d..]);
    d += uleb128::encode(nzrun as u32, &mut dst[d..]);
    copy_run(&mut dst[d..], new, start, nzrun);
    Some(d + nzrun)
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
    copy_long(&mut out[..len], &new[at..at + len]);
}

/// The `memcpy` of a long run, kept out of line: merged with the short
/// path, the compiler turns the 16-byte move into a `memcpy` call too.
#[inline(never)]
fn copy_long(out: &mut [u8], src: &[u8]) {
    out.copy_from_slice(src);
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
