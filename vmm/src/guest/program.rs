//! The test guest's machine code, assembled at start-up with iced-x86.
//!
//! One program, run by every vCPU at CPL3 with RDI = its mailbox address.
//! Registers that hold state across the loop:
//!
//! ```text
//! r15 mailbox     r14 slice base VA   r13 index in slice   r12 generation
//! rbx slice pages rbp pacing deadline (TSC)               r11 first page number
//! ```
//!
//! ```text
//! entry:      load slice description from the mailbox; print the banner (vCPU 0);
//!             out CONTROL_PORT, Started; deadline = rdtsc
//! main_loop:  if VERIFY_REQ != VERIFY_ACK -> verify
//!             if no pages -> sleep, loop
//!             if TICKS_PER_PAGE != 0: pace against the deadline (sleep through the
//!               sleep port when far ahead; re-base when the TSC jumped: the deadline
//!               is more than a period plus MAX_SKEW ahead)
//!             write page[index] = f(first+index, generation) (sparse pattern: after the
//!               first generation only word 0 changes); PAGES_WRITTEN += 1
//!             index += 1; at the end of the slice: index = 0, generation += 1,
//!               out CONTROL_PORT, PassDone
//! verify:     check every page of the slice against its expected generation,
//!             store BAD/CHECKED/ACK, out CONTROL_PORT, VerifyDone; re-base the deadline
//! ```

use devices::guest_abi::{
    mailbox as mb, GuestEvent, CONTROL_PORT, SEED_GEN_MUL, SEED_PAGE_MUL, SERIAL_PORT_BASE,
    SLEEP_PORT, WORDS_PER_PAGE, WORD_STEP,
};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

fn m(base: AsmRegister64, off: u64) -> AsmMemoryOperand {
    qword_ptr(base + off as i32)
}

/// rax = rdtsc as one 64-bit value (clobbers rdx).
fn rdtsc64(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// rax = seed(rsi = page number, gen register) + 2 * WORD_STEP; r8 = WORD_STEP. Clobbers rdx.
fn seed_word2(a: &mut CodeAssembler, gen: AsmRegister64) -> Result<(), IcedError> {
    a.lea(rax, qword_ptr(rsi + 1))?;
    a.mov(rdx, SEED_PAGE_MUL)?;
    a.imul_2(rax, rdx)?;
    a.mov(r8, SEED_GEN_MUL)?;
    a.imul_2(r8, gen)?;
    a.xor(rax, r8)?;
    a.mov(r8, WORD_STEP)?;
    a.lea(rdx, qword_ptr(r8 + r8))?;
    a.add(rax, rdx)
}

/// Assembles the guest program for loading at guest-virtual (= physical) address `base`.
pub fn assemble(base: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut main_loop = a.create_label();
    let mut no_banner = a.create_label();
    let mut do_verify = a.create_label();
    let mut idle = a.create_label();
    let mut write = a.create_label();
    let mut not_due = a.create_label();
    let mut advance = a.create_label();
    let mut wait = a.create_label();
    let mut spin = a.create_label();
    let mut fill = a.create_label();
    let mut full_write = a.create_label();
    let mut data_gen_ready = a.create_label();
    let mut written = a.create_label();
    let mut vdata_gen_ready = a.create_label();
    let mut vloop = a.create_label();
    let mut vgen_ok = a.create_label();
    let mut vnonzero = a.create_label();
    let mut vzero_loop = a.create_label();
    let mut vcheck_loop = a.create_label();
    let mut vok = a.create_label();
    let mut vbad = a.create_label();
    let mut vbad_counted = a.create_label();
    let mut vdone = a.create_label();

    // entry
    a.mov(r15, rdi)?;
    a.mov(r14, m(r15, mb::SLICE_VA))?;
    a.mov(rbx, m(r15, mb::SLICE_PAGES))?;
    a.mov(r11, m(r15, mb::FIRST_PAGE))?;
    a.mov(r12d, 1u32)?;
    a.xor(r13d, r13d)?;
    a.mov(rcx, m(r15, mb::BANNER_LEN))?;
    a.test(rcx, rcx)?;
    a.jz(no_banner)?;
    a.mov(rsi, m(r15, mb::BANNER_VA))?;
    a.mov(edx, u32::from(SERIAL_PORT_BASE))?;
    a.rep().outsb()?;
    a.set_label(&mut no_banner)?;
    a.mov(eax, GuestEvent::Started as u32)?;
    a.mov(edx, u32::from(CONTROL_PORT))?;
    a.out(dx, eax)?;
    rdtsc64(&mut a)?;
    a.mov(rbp, rax)?;

    // main loop
    a.set_label(&mut main_loop)?;
    a.mov(rax, m(r15, mb::VERIFY_REQ))?;
    a.cmp(rax, m(r15, mb::VERIFY_ACK))?;
    a.jne(do_verify)?;
    a.test(rbx, rbx)?;
    a.jz(idle)?;
    a.mov(rcx, m(r15, mb::TICKS_PER_PAGE))?;
    a.test(rcx, rcx)?;
    a.jz(write)?;
    rdtsc64(&mut a)?;
    a.mov(rdx, rax)?;
    a.sub(rdx, rbp)?; // rdx = now - deadline
    a.js(not_due)?;
    a.cmp(rdx, m(r15, mb::MAX_SKEW))?;
    a.jbe(advance)?;
    a.mov(rbp, rax)?; // far behind (paused, throttled): no burst to catch up
    a.set_label(&mut advance)?;
    a.add(rbp, rcx)?;
    a.jmp(write)?;
    a.set_label(&mut not_due)?;
    // A deadline up to one period plus the skew ahead is normal (slow rates have periods
    // longer than the skew); further ahead, the TSC jumped back.
    a.neg(rdx)?; // rdx = deadline - now > 0
    a.mov(rsi, rcx)?;
    a.add(rsi, m(r15, mb::MAX_SKEW))?;
    a.cmp(rdx, rsi)?;
    a.jbe(wait)?;
    // The deadline is implausibly far ahead: the TSC jumped back (a new host). Re-base.
    a.mov(rbp, rax)?;
    a.add(rbp, rcx)?;
    a.jmp(write)?;
    a.set_label(&mut wait)?;
    a.mov(rax, m(r15, mb::SLEEP_MIN_TICKS))?;
    a.test(rax, rax)?;
    a.jz(spin)?;
    a.cmp(rdx, rax)?;
    a.jb(spin)?;
    a.mov(eax, edx)?; // up to 4 G ticks; MAX_SKEW keeps rdx far below that
    a.mov(edx, u32::from(SLEEP_PORT))?;
    a.out(dx, eax)?;
    a.jmp(main_loop)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(main_loop)?;
    a.set_label(&mut idle)?;
    a.mov(eax, 0x0100_0000u32)?; // nothing to do: sleep (the host caps each sleep)
    a.mov(edx, u32::from(SLEEP_PORT))?;
    a.out(dx, eax)?;
    a.jmp(main_loop)?;

    // write page[r13] with generation r12
    a.set_label(&mut write)?;
    a.mov(rdi, r13)?;
    a.shl(rdi, 12)?;
    a.add(rdi, r14)?;
    a.lea(rsi, qword_ptr(r11 + r13))?;
    // Sparse pattern: after generation 1 only word 0 changes.
    a.mov(r10, r12)?; // generation mixed into the data words
    a.cmp(m(r15, mb::SPARSE), 0)?;
    a.je(full_write)?;
    a.cmp(r12, 1i32)?;
    a.ja(written)?;
    a.set_label(&mut full_write)?;
    a.cmp(m(r15, mb::SPARSE), 0)?;
    a.je(data_gen_ready)?;
    a.mov(r10d, 1u32)?;
    a.set_label(&mut data_gen_ready)?;
    seed_word2(&mut a, r10)?;
    a.lea(r9, qword_ptr(rdi + 16))?;
    a.mov(ecx, (WORDS_PER_PAGE - 2) as u32)?;
    a.set_label(&mut fill)?;
    a.mov(qword_ptr(r9), rax)?;
    a.add(rax, r8)?;
    a.add(r9, 8)?;
    a.dec(ecx)?;
    a.jnz(fill)?;
    a.mov(qword_ptr(rdi + 8), rsi)?;
    a.set_label(&mut written)?;
    a.mov(qword_ptr(rdi), r12)?;
    a.inc(m(r15, mb::PAGES_WRITTEN))?;
    a.inc(r13)?;
    a.mov(m(r15, mb::INDEX), r13)?;
    a.cmp(r13, rbx)?;
    a.jb(main_loop)?;
    a.xor(r13d, r13d)?;
    a.inc(r12)?;
    a.mov(m(r15, mb::INDEX), r13)?;
    a.mov(m(r15, mb::GEN), r12)?;
    a.inc(m(r15, mb::PASSES))?;
    a.cmp(m(r15, mb::REPORT_PASSES), 0)?;
    a.je(main_loop)?;
    a.mov(eax, GuestEvent::PassDone as u32)?;
    a.mov(edx, u32::from(CONTROL_PORT))?;
    a.out(dx, eax)?;
    a.jmp(main_loop)?;

    // verify every page of the slice; r9 = j, r10 = bad pages
    a.set_label(&mut do_verify)?;
    a.xor(r9d, r9d)?;
    a.xor(r10d, r10d)?;
    a.mov(rax, -1i64)?;
    a.mov(m(r15, mb::VERIFY_FIRST_BAD), rax)?;
    a.set_label(&mut vloop)?;
    a.cmp(r9, rbx)?;
    a.jae(vdone)?;
    a.mov(rcx, r12)?; // expected generation: current before the index, previous after it
    a.cmp(r9, r13)?;
    a.jb(vgen_ok)?;
    a.dec(rcx)?;
    a.set_label(&mut vgen_ok)?;
    a.mov(rdi, r9)?;
    a.shl(rdi, 12)?;
    a.add(rdi, r14)?;
    a.lea(rsi, qword_ptr(r11 + r9))?;
    a.test(rcx, rcx)?;
    a.jnz(vnonzero)?;
    a.xor(eax, eax)?; // generation 0: the page must be all zeros
    a.mov(edx, WORDS_PER_PAGE as u32)?;
    a.set_label(&mut vzero_loop)?;
    a.or(rax, qword_ptr(rdi))?;
    a.add(rdi, 8)?;
    a.dec(edx)?;
    a.jnz(vzero_loop)?;
    a.test(rax, rax)?;
    a.jz(vok)?;
    a.jmp(vbad)?;
    a.set_label(&mut vnonzero)?;
    a.cmp(qword_ptr(rdi), rcx)?;
    a.jne(vbad)?;
    a.cmp(qword_ptr(rdi + 8), rsi)?;
    a.jne(vbad)?;
    a.cmp(m(r15, mb::SPARSE), 0)?;
    a.je(vdata_gen_ready)?;
    a.mov(ecx, 1u32)?; // sparse: the data words carry generation 1
    a.set_label(&mut vdata_gen_ready)?;
    seed_word2(&mut a, rcx)?;
    a.add(rdi, 16)?;
    a.mov(edx, (WORDS_PER_PAGE - 2) as u32)?;
    a.set_label(&mut vcheck_loop)?;
    a.cmp(qword_ptr(rdi), rax)?;
    a.jne(vbad)?;
    a.add(rax, r8)?;
    a.add(rdi, 8)?;
    a.dec(edx)?;
    a.jnz(vcheck_loop)?;
    a.set_label(&mut vok)?;
    a.inc(r9)?;
    a.jmp(vloop)?;
    a.set_label(&mut vbad)?;
    a.test(r10, r10)?;
    a.jnz(vbad_counted)?;
    a.mov(m(r15, mb::VERIFY_FIRST_BAD), r9)?;
    a.set_label(&mut vbad_counted)?;
    a.inc(r10)?;
    a.inc(r9)?;
    a.jmp(vloop)?;
    a.set_label(&mut vdone)?;
    a.mov(m(r15, mb::VERIFY_BAD), r10)?;
    a.mov(m(r15, mb::VERIFY_CHECKED), rbx)?;
    a.mov(rax, m(r15, mb::VERIFY_REQ))?;
    a.mov(m(r15, mb::VERIFY_ACK), rax)?;
    a.mov(eax, GuestEvent::VerifyDone as u32)?;
    a.mov(edx, u32::from(CONTROL_PORT))?;
    a.out(dx, eax)?;
    rdtsc64(&mut a)?;
    a.mov(rbp, rax)?;
    a.jmp(main_loop)?;

    a.assemble(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::{CODE_GPA, CODE_MAX};

    #[test]
    fn assembles_and_fits() {
        let code = assemble(CODE_GPA).unwrap();
        assert!(!code.is_empty());
        assert!((code.len() as u64) < CODE_MAX);
        // Starts with `mov r15, rdi` (4c 8b ff or 49 89 ff).
        assert_eq!(code[0] & 0xf0, 0x40);
    }
}
