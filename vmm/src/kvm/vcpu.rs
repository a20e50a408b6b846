//! A vCPU: creation, boot registers, and complete state save/restore.

use kvm_bindings::{kvm_mp_state, CpuId, Msrs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuFd};

use super::regs;
use super::state::VcpuState;
use super::{IoctlContext, KvmError, Result};

/// MSRs Ferry saves when KVM lists them: TSC, SYSENTER, syscall MSRs, PAT, misc-enable,
/// kernel GS base, TSC_AUX, TSC_ADJUST, TSC deadline, SPEC_CTRL.
const SAVED_MSRS: &[u32] = &[
    0x3b,        // IA32_TSC_ADJUST
    0x48,        // IA32_SPEC_CTRL
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x10,        // IA32_TSC: last, so restoring it is not undone by TSC_ADJUST
];

/// The MSRs of [`SAVED_MSRS`] that this host's KVM supports.
pub fn saved_msr_list(kvm: &Kvm) -> Result<Vec<u32>> {
    let supported = kvm.get_msr_index_list().ctx("KVM_GET_MSR_INDEX_LIST")?;
    let supported = supported.as_slice();
    Ok(SAVED_MSRS
        .iter()
        .copied()
        .filter(|m| supported.contains(m))
        .collect())
}

/// Sets vCPU `fd` up to enter the guest program at CPL3.
pub fn setup_boot(fd: &VcpuFd, cpuid: &CpuId, entry: u64, rsp: u64, rdi: u64) -> Result<()> {
    fd.set_cpuid2(cpuid).ctx("KVM_SET_CPUID2")?;
    let mut sregs = fd.get_sregs().ctx("KVM_GET_SREGS")?;
    regs::long_mode_cpl3(&mut sregs);
    fd.set_sregs(&sregs).ctx("KVM_SET_SREGS")?;
    fd.set_regs(&regs::entry_regs(entry, rsp, rdi))
        .ctx("KVM_SET_REGS")?;
    // With the in-kernel LAPIC, vCPUs other than 0 start waiting for a SIPI: make all runnable.
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .ctx("KVM_SET_MP_STATE")?;
    Ok(())
}

/// Reads everything KVM holds for a (stopped) vCPU.
pub fn save(fd: &VcpuFd, id: u32, msr_list: &[u32], irqchip: bool) -> Result<VcpuState> {
    let entries: Vec<kvm_bindings::kvm_msr_entry> = msr_list
        .iter()
        .map(|&index| kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|e| KvmError::BadState(format!("{e:?}")))?;
    let n = fd.get_msrs(&mut msrs).ctx("KVM_GET_MSRS")?;
    if n != entries.len() {
        return Err(KvmError::BadState(format!(
            "KVM_GET_MSRS read {n} of {} MSRs",
            entries.len()
        )));
    }
    Ok(VcpuState {
        id,
        regs: fd.get_regs().ctx("KVM_GET_REGS")?,
        sregs: fd.get_sregs().ctx("KVM_GET_SREGS")?,
        xsave: fd.get_xsave().ctx("KVM_GET_XSAVE")?,
        xcrs: fd.get_xcrs().ctx("KVM_GET_XCRS")?,
        debugregs: fd.get_debug_regs().ctx("KVM_GET_DEBUGREGS")?,
        msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
        mp_state: fd.get_mp_state().ctx("KVM_GET_MP_STATE")?,
        events: fd.get_vcpu_events().ctx("KVM_GET_VCPU_EVENTS")?,
        lapic: if irqchip {
            Some(fd.get_lapic().ctx("KVM_GET_LAPIC")?)
        } else {
            None
        },
    })
}

/// Restores state saved by [`save`] into a vCPU whose CPUID was set when it was created
/// (KVM refuses a different CPUID once a vCPU has run, so it is not set again here).
pub fn restore(fd: &VcpuFd, state: &VcpuState, irqchip: bool) -> Result<()> {
    if state.lapic.is_some() != irqchip {
        return Err(KvmError::BadState(
            "LAPIC state present on one side only (in-kernel irqchip differs)".into(),
        ));
    }
    fd.set_mp_state(state.mp_state).ctx("KVM_SET_MP_STATE")?;
    fd.set_regs(&state.regs).ctx("KVM_SET_REGS")?;
    fd.set_sregs(&state.sregs).ctx("KVM_SET_SREGS")?;
    // SAFETY: the xsave area comes from KVM_GET_XSAVE of the same layout (kvm_xsave, no
    // extended components beyond 4 KiB were requested), so KVM reads only that struct.
    unsafe { fd.set_xsave(&state.xsave) }.ctx("KVM_SET_XSAVE")?;
    fd.set_xcrs(&state.xcrs).ctx("KVM_SET_XCRS")?;
    fd.set_debug_regs(&state.debugregs)
        .ctx("KVM_SET_DEBUGREGS")?;
    if let Some(lapic) = &state.lapic {
        fd.set_lapic(lapic).ctx("KVM_SET_LAPIC")?;
    }
    let entries: Vec<kvm_bindings::kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::BadState(format!("{e:?}")))?;
    let n = fd.set_msrs(&msrs).ctx("KVM_SET_MSRS")?;
    if n != entries.len() {
        let failed = entries.get(n).map_or(0, |e| e.index);
        return Err(KvmError::BadState(format!(
            "KVM_SET_MSRS accepted {n} of {} MSRs (refused MSR {failed:#x})",
            entries.len()
        )));
    }
    fd.set_vcpu_events(&state.events)
        .ctx("KVM_SET_VCPU_EVENTS")?;
    Ok(())
}
