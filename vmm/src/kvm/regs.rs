//! Initial register state: 64-bit long mode at CPL3, set by the VMM (no guest code at CPL0).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::guest::layout::{
    GDT_GPA, PML4_GPA, SEL_TSS, SEL_USER_CODE, SEL_USER_DATA, TSS_GPA, TSS_LIMIT,
};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn user_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` in 64-bit mode at CPL3 with Ferry's GDT, TSS and page tables.
pub fn long_mode_cpl3(sregs: &mut kvm_sregs) {
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = user_segment(SEL_USER_CODE, 0xb, true);
    let data = user_segment(SEL_USER_DATA, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_GPA,
        limit: TSS_LIMIT,
        selector: SEL_TSS,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General registers for a vCPU entering the guest program.
pub fn entry_regs(rip: u64, rsp: u64, rdi: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rdi,
        rflags: 0x2, // IF=0, IOPL=0: port access is governed by the TSS bitmap
        ..Default::default()
    }
}
