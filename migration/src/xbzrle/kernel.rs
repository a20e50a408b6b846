//! Where two pages differ, 64 bytes at a time: the kernels behind the
//! encoder's fast skipping of equal stretches.
//!
//! Each kernel turns a 64-byte block of the old and the new page into a
//! 64-bit mask whose bit `i` is set when byte `i` differs. The scalar kernel
//! works everywhere; SSE2 is part of every x86-64; AVX2 is used when the CPU
//! has it (checked at run time).

/// Bytes covered by one mask.
pub(crate) const BLOCK: usize = 64;

/// One way of computing the difference mask of a block.
///
/// # Safety
///
/// Implementations may use CPU features that not every CPU has: callers of
/// [`DiffMask::diff`] must make sure the kernel's features are available.
pub(crate) trait DiffMask {
    /// Bit `i` of the result is set when `old[i] != new[i]`.
    ///
    /// # Safety
    ///
    /// The CPU must support the kernel's features.
    unsafe fn diff(old: &[u8; BLOCK], new: &[u8; BLOCK]) -> u64;

    /// The first offset `o >= from`, a multiple of [`BLOCK`] if `from` is,
    /// such that the block at `o` differs; or the end of the last whole
    /// block when every whole block from `from` on is equal. Skips equal
    /// stretches without building masks.
    ///
    /// # Safety
    ///
    /// The CPU must support the kernel's features.
    unsafe fn skip_equal(old: &[u8], new: &[u8], from: usize) -> usize;
}

/// The end of the last whole block of a page pair.
#[inline(always)]
fn whole_end(old: &[u8], new: &[u8]) -> usize {
    old.len().min(new.len()) / BLOCK * BLOCK
}

/// Portable kernel: eight 64-bit XORs, each folded to an 8-bit mask.
pub(crate) struct Scalar;

impl DiffMask for Scalar {
    #[inline(always)]
    unsafe fn diff(old: &[u8; BLOCK], new: &[u8; BLOCK]) -> u64 {
        scalar_diff(old, new)
    }

    #[inline(always)]
    unsafe fn skip_equal(old: &[u8], new: &[u8], from: usize) -> usize {
        let end = whole_end(old, new);
        let mut off = from;
        while off + BLOCK <= end {
            if old.get(off..off + BLOCK) != new.get(off..off + BLOCK) {
                return off;
            }
            off += BLOCK;
        }
        off.max(end)
    }
}

/// The scalar kernel as a safe function (it needs no CPU feature).
#[inline(always)]
pub(crate) fn scalar_diff(old: &[u8; BLOCK], new: &[u8; BLOCK]) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Moves the high bit of byte i (bit 8i+7, shifted to 8i) to bit 56+i.
    const GATHER: u64 = 0x0102_0408_1020_4080;
    let mut mask = 0u64;
    for (word, (o, n)) in old.chunks_exact(8).zip(new.chunks_exact(8)).enumerate() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(o);
        b.copy_from_slice(n);
        let x = u64::from_le_bytes(a) ^ u64::from_le_bytes(b);
        // High bit of each byte set iff that byte of x is non-zero.
        let nonzero = (((x & LOW7) + LOW7) | x) & HIGH;
        let bits = (nonzero >> 7).wrapping_mul(GATHER) >> 56;
        mask |= bits << (8 * word);
    }
    mask
}

/// Mask of a block shorter than [`BLOCK`] (the end of a page whose size is
/// not a multiple of 64); bits past the end are clear.
#[inline]
pub(crate) fn partial_diff(old: &[u8], new: &[u8]) -> u64 {
    old.iter()
        .zip(new)
        .take(BLOCK)
        .enumerate()
        .fold(0, |mask, (i, (o, n))| mask | (u64::from(o != n) << i))
}

/// SSE2 kernel: four 16-byte compares.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Sse2;

#[cfg(target_arch = "x86_64")]
impl DiffMask for Sse2 {
    #[inline(always)]
    unsafe fn diff(old: &[u8; BLOCK], new: &[u8; BLOCK]) -> u64 {
        use core::arch::x86_64::{_mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8};
        let mut equal = 0u64;
        for k in 0..BLOCK / 16 {
            // SAFETY: SSE2 is part of the x86-64 baseline; each unaligned
            // load reads bytes 16k..16k+16 of a 64-byte array.
            let bits = unsafe {
                let a = _mm_loadu_si128(old.as_ptr().add(16 * k).cast());
                let b = _mm_loadu_si128(new.as_ptr().add(16 * k).cast());
                _mm_movemask_epi8(_mm_cmpeq_epi8(a, b))
            };
            equal |= u64::from(bits as u16) << (16 * k);
        }
        !equal
    }

    #[inline(always)]
    unsafe fn skip_equal(old: &[u8], new: &[u8], from: usize) -> usize {
        use core::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
            _mm_xor_si128,
        };
        let end = whole_end(old, new);
        let mut off = from;
        while off + BLOCK <= end {
            // SAFETY: SSE2 is part of the x86-64 baseline; the loads read
            // bytes off..off+64 of both slices, and off + 64 <= end <= the
            // length of each.
            let same = unsafe {
                let o = old.as_ptr().add(off);
                let n = new.as_ptr().add(off);
                let mut any = _mm_setzero_si128();
                for k in 0..BLOCK / 16 {
                    any = _mm_or_si128(
                        any,
                        _mm_xor_si128(
                            _mm_loadu_si128(o.add(16 * k).cast()),
                            _mm_loadu_si128(n.add(16 * k).cast()),
                        ),
                    );
                }
                _mm_movemask_epi8(_mm_cmpeq_epi8(any, _mm_setzero_si128())) == 0xffff
            };
            if !same {
                return off;
            }
            off += BLOCK;
        }
        off.max(end)
    }
}

/// AVX2 kernel: two 32-byte compares.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl DiffMask for Avx2 {
    #[inline(always)]
    unsafe fn diff(old: &[u8; BLOCK], new: &[u8; BLOCK]) -> u64 {
        // SAFETY: the caller guarantees AVX2 (this trait's contract).
        unsafe { avx2_diff(old, new) }
    }

    #[inline(always)]
    unsafe fn skip_equal(old: &[u8], new: &[u8], from: usize) -> usize {
        // SAFETY: the caller guarantees AVX2 (this trait's contract).
        unsafe { avx2_skip_equal(old, new, from) }
    }
}

/// [`DiffMask::skip_equal`] for AVX2: 128 bytes per step while equal.
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn avx2_skip_equal(old: &[u8], new: &[u8], from: usize) -> usize {
    use core::arch::x86_64::{
        _mm256_loadu_si256, _mm256_or_si256, _mm256_testz_si256, _mm256_xor_si256,
    };
    let end = whole_end(old, new);
    let mut off = from;
    while off + 2 * BLOCK <= end {
        // SAFETY: AVX2 is enabled here and the caller guarantees the CPU
        // has it; the loads read bytes off..off+128 of both slices, and
        // off + 128 <= end <= the length of each.
        let same = unsafe {
            let o = old.as_ptr().add(off);
            let n = new.as_ptr().add(off);
            let x0 = _mm256_xor_si256(_mm256_loadu_si256(o.cast()), _mm256_loadu_si256(n.cast()));
            let x1 = _mm256_xor_si256(
                _mm256_loadu_si256(o.add(32).cast()),
                _mm256_loadu_si256(n.add(32).cast()),
            );
            let x2 = _mm256_xor_si256(
                _mm256_loadu_si256(o.add(64).cast()),
                _mm256_loadu_si256(n.add(64).cast()),
            );
            let x3 = _mm256_xor_si256(
                _mm256_loadu_si256(o.add(96).cast()),
                _mm256_loadu_si256(n.add(96).cast()),
            );
            let any = _mm256_or_si256(_mm256_or_si256(x0, x1), _mm256_or_si256(x2, x3));
            _mm256_testz_si256(any, any) != 0
        };
        if !same {
            break;
        }
        off += 2 * BLOCK;
    }
    while off + BLOCK <= end {
        // SAFETY: as above, for bytes off..off+64.
        let same = unsafe {
            let o = old.as_ptr().add(off);
            let n = new.as_ptr().add(off);
            let x0 = _mm256_xor_si256(_mm256_loadu_si256(o.cast()), _mm256_loadu_si256(n.cast()));
            let x1 = _mm256_xor_si256(
                _mm256_loadu_si256(o.add(32).cast()),
                _mm256_loadu_si256(n.add(32).cast()),
            );
            let any = _mm256_or_si256(x0, x1);
            _mm256_testz_si256(any, any) != 0
        };
        if !same {
            return off;
        }
        off += BLOCK;
    }
    off.max(end)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn avx2_diff(old: &[u8; BLOCK], new: &[u8; BLOCK]) -> u64 {
    use core::arch::x86_64::{_mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8};
    // SAFETY: AVX2 is enabled for this function and the caller guarantees
    // the CPU has it; the unaligned loads read bytes 0..32 and 32..64 of
    // 64-byte arrays.
    let (low, high) = unsafe {
        let o = old.as_ptr();
        let n = new.as_ptr();
        let low = _mm256_cmpeq_epi8(_mm256_loadu_si256(o.cast()), _mm256_loadu_si256(n.cast()));
        let high = _mm256_cmpeq_epi8(
            _mm256_loadu_si256(o.add(32).cast()),
            _mm256_loadu_si256(n.add(32).cast()),
        );
        (_mm256_movemask_epi8(low), _mm256_movemask_epi8(high))
    };
    !(u64::from(low as u32) | (u64::from(high as u32) << 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(old: &[u8; BLOCK], new: &[u8; BLOCK]) -> u64 {
        (0..BLOCK).fold(0, |m, i| m | (u64::from(old[i] != new[i]) << i))
    }

    fn patterns() -> Vec<([u8; BLOCK], [u8; BLOCK])> {
        let mut out = Vec::new();
        let base: [u8; BLOCK] = std::array::from_fn(|i| (i * 37) as u8);
        out.push((base, base));
        for i in 0..BLOCK {
            let mut n = base;
            n[i] ^= 0x80;
            out.push((base, n));
            let mut n = base;
            n[i] ^= 0x01;
            out.push((base, n));
        }
        let mut seed = 0x1234_5678_9abc_def0_u64;
        for _ in 0..200 {
            let mut n = base;
            for b in n.iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if seed >> 62 == 0 {
                    *b = (seed >> 24) as u8;
                }
            }
            out.push((base, n));
        }
        out
    }

    #[test]
    fn scalar_kernel_matches_bytewise_comparison() {
        for (o, n) in patterns() {
            assert_eq!(scalar_diff(&o, &n), reference(&o, &n));
        }
    }

    #[test]
    fn partial_block_mask_has_no_bits_past_the_end() {
        let o = [0u8; 10];
        let n = [1u8; 10];
        assert_eq!(partial_diff(&o, &n), (1 << 10) - 1);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sse2_kernel_matches_bytewise_comparison() {
        for (o, n) in patterns() {
            // SAFETY: SSE2 is baseline on x86-64.
            assert_eq!(unsafe { Sse2::diff(&o, &n) }, reference(&o, &n));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_matches_bytewise_comparison() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        for (o, n) in patterns() {
            // SAFETY: AVX2 was detected above.
            assert_eq!(unsafe { Avx2::diff(&o, &n) }, reference(&o, &n));
        }
    }
}
