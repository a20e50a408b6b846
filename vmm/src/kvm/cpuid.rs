//! CPUID for Ferry's vCPUs: KVM's supported list, with each vCPU's APIC ID filled in.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::{IoctlContext, Result};

/// KVM's supported CPUID, as a template for every vCPU.
pub fn supported(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .ctx("KVM_GET_SUPPORTED_CPUID")
}

/// The template with vCPU `id`'s APIC ID in leaves 0x1, 0xb and 0x1f.
pub fn for_vcpu(template: &CpuId, id: u32, vcpus: u32) -> CpuId {
    let mut cpuid = template.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (vcpus.min(255) << 16);
            }
            0xb | 0x1f => {
                e.edx = id;
            }
            _ => {}
        }
    }
    cpuid
}
