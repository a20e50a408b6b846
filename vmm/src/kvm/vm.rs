//! The VM: KVM's VM fd, guest memory slots, the in-kernel irqchip, dirty logging.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_enable_cap, kvm_irqchip, kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use ram::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use ram::GuestRam;

use super::state::VmState;
use super::{IoctlContext, KvmError, Result};

const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 2;

/// How the VM tracks dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyMode {
    /// KVM's per-slot dirty bitmap (with manual protect when offered).
    #[default]
    Bitmap,
    /// KVM's per-vCPU dirty ring with this many entries.
    Ring(u32),
}

/// VM creation options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOptions {
    /// Create the in-kernel irqchip when KVM offers it.
    pub irqchip: bool,
    /// Dirty tracking mode (the ring must be chosen before vCPUs exist).
    pub dirty: DirtyMode,
    /// Pages per dirty-log clear chunk, as a power of two (`x-clear-bitmap-shift`).
    pub clear_shift: u32,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            irqchip: true,
            dirty: DirtyMode::Bitmap,
            clear_shift: crate::dirty::kvm_log::DEFAULT_CLEAR_SHIFT,
        }
    }
}

/// One KVM memory slot (one RAM region).
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host address.
    pub host_addr: u64,
    /// RAM offset of the first byte.
    pub ram_offset: u64,
}

/// What dirty tracking this VM actually has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyCaps {
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled (with initially-all-set).
    pub manual_protect: bool,
    /// The dirty ring is enabled with this many entries per vCPU.
    pub ring_entries: Option<u32>,
    /// The ring uses acquire/release ordering (KVM_CAP_DIRTY_LOG_RING_ACQ_REL).
    pub ring_acq_rel: bool,
}

/// A KVM virtual machine with Ferry's guest memory.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    ram: Arc<GuestRam>,
    slots: Vec<Slot>,
    irqchip: bool,
    dirty_caps: DirtyCaps,
    logging: Mutex<bool>,
}

impl Vm {
    /// Creates a VM for `ram`.
    pub fn new(ram: Arc<GuestRam>, opts: VmOptions) -> Result<Self> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        if !kvm.check_extension(Cap::UserMemory) {
            return Err(KvmError::MissingCap("KVM_CAP_USER_MEMORY"));
        }
        let fd = kvm.create_vm().ctx("KVM_CREATE_VM")?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .ctx("KVM_SET_TSS_ADDR")?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .ctx("KVM_SET_IDENTITY_MAP_ADDR")?;
        let irqchip = opts.irqchip && kvm.check_extension(Cap::Irqchip);
        if irqchip {
            fd.create_irq_chip().ctx("KVM_CREATE_IRQCHIP")?;
        }
        let mut dirty_caps = DirtyCaps {
            manual_protect: false,
            ring_entries: None,
            ring_acq_rel: false,
        };
        match opts.dirty {
            DirtyMode::Bitmap => {
                let offered =
                    fd.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as _);
                let want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
                if offered > 0 && (offered as u64 & want) == want {
                    let cap = kvm_enable_cap {
                        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                        args: [want, 0, 0, 0],
                        ..Default::default()
                    };
                    dirty_caps.manual_protect = fd.enable_cap(&cap).is_ok();
                }
            }
            DirtyMode::Ring(entries) => {
                let acq_rel =
                    fd.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) as _);
                let plain = fd.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING) as _);
                let (cap_id, max) = if acq_rel > 0 {
                    (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, acq_rel)
                } else if plain > 0 {
                    (KVM_CAP_DIRTY_LOG_RING, plain)
                } else {
                    return Err(KvmError::MissingCap("KVM_CAP_DIRTY_LOG_RING"));
                };
                let entry_size = 16u64; // struct kvm_dirty_gfn
                let bytes = u64::from(entries.next_power_of_two()) * entry_size;
                if bytes > max as u64 {
                    return Err(KvmError::BadState(format!(
                        "dirty ring of {entries} entries exceeds KVM's maximum of {} entries",
                        max as u64 / entry_size
                    )));
                }
                let cap = kvm_enable_cap {
                    cap: cap_id,
                    args: [bytes, 0, 0, 0],
                    ..Default::default()
                };
                fd.enable_cap(&cap).ctx("KVM_ENABLE_CAP(DIRTY_LOG_RING)")?;
                dirty_caps.ring_entries = Some((bytes / entry_size) as u32);
                dirty_caps.ring_acq_rel = cap_id == KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
            }
        }
        let slots = ram
            .regions()
            .iter()
            .enumerate()
            .map(|(i, r)| Slot {
                slot: i as u32,
                gpa: r.gpa,
                size: r.size,
                host_addr: r.host_addr as u64,
                ram_offset: r.ram_offset,
            })
            .collect();
        let vm = Vm {
            kvm,
            fd,
            ram,
            slots,
            irqchip,
            dirty_caps,
            logging: Mutex::new(false),
        };
        vm.register_slots(false)?;
        Ok(vm)
    }

    fn register_slots(&self, log_dirty: bool) -> Result<()> {
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: s.gpa,
                memory_size: s.size,
                userspace_addr: s.host_addr,
            };
            // SAFETY: the host range belongs to `self.ram`, which this VM keeps alive for as
            // long as the VM fd exists; the slot does not overlap another.
            unsafe { self.fd.set_user_memory_region(region) }.ctx("KVM_SET_USER_MEMORY_REGION")?;
        }
        Ok(())
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Memory slots.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Whether the in-kernel irqchip exists.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Dirty tracking features in use.
    pub fn dirty_caps(&self) -> DirtyCaps {
        self.dirty_caps
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd> {
        self.fd.create_vcpu(id).ctx("KVM_CREATE_VCPU")
    }

    /// Turns KVM dirty logging on or off for every slot.
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        let mut logging = self
            .logging
            .lock()
            .map_err(|_| KvmError::BadState("poisoned".into()))?;
        if *logging != on {
            self.register_slots(on)?;
            *logging = on;
        }
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.logging.lock().map(|l| *l).unwrap_or(false)
    }

    /// KVM_GET_DIRTY_LOG for `slot` into `bitmap` (one bit per page of the slot).
    ///
    /// Without manual protect this also clears the log and write-protects the pages.
    pub fn get_dirty_log(&self, slot: &Slot, bitmap: &mut [u64]) -> Result<()> {
        let pages = slot.size / 4096;
        if (bitmap.len() as u64) < pages.div_ceil(64) {
            return Err(KvmError::BadState("dirty bitmap buffer too small".into()));
        }
        let mut log = kvm_bindings::kvm_dirty_log {
            slot: slot.slot,
            ..Default::default()
        };
        log.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: KVM_GET_DIRTY_LOG writes at most ceil(pages/64) u64s into `bitmap`, which
        // was checked to be large enough, and reads the struct we pass.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_GET_DIRTY_LOG, &log) };
        if r < 0 {
            return Err(KvmError::Ioctl {
                what: "KVM_GET_DIRTY_LOG",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// KVM_CLEAR_DIRTY_LOG: clears (and write-protects again) the pages whose bits are set in
    /// `bitmap`, which covers `bitmap.len() * 64` pages from `first_page` (a multiple of 64).
    pub fn clear_dirty_log(&self, slot: &Slot, first_page: u64, bitmap: &[u64]) -> Result<()> {
        let slot_pages = slot.size / 4096;
        if !first_page.is_multiple_of(64) || first_page >= slot_pages {
            return Err(KvmError::BadState(format!("bad clear start {first_page}")));
        }
        let num = (bitmap.len() as u64 * 64).min(slot_pages - first_page);
        let clear = kvm_bindings::kvm_clear_dirty_log {
            slot: slot.slot,
            num_pages: num as u32,
            first_page,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: KVM reads ceil(num/64) u64s from `bitmap` (num <= bitmap.len()*64).
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &clear) };
        if r < 0 {
            return Err(KvmError::Ioctl {
                what: "KVM_CLEAR_DIRTY_LOG",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// KVM_RESET_DIRTY_RINGS: lets vCPUs reuse harvested ring entries (and re-protects the pages).
    pub fn reset_dirty_rings(&self) -> Result<u64> {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_RESET_DIRTY_RINGS, 0) };
        if r < 0 {
            return Err(KvmError::Ioctl {
                what: "KVM_RESET_DIRTY_RINGS",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(r as u64)
    }

    /// Saves the irqchip state.
    pub fn save_state(&self) -> Result<VmState> {
        let mut irqchips = Vec::new();
        if self.irqchip {
            for id in [
                KVM_IRQCHIP_PIC_MASTER,
                KVM_IRQCHIP_PIC_SLAVE,
                KVM_IRQCHIP_IOAPIC,
            ] {
                let mut chip = kvm_irqchip {
                    chip_id: id,
                    ..Default::default()
                };
                self.fd.get_irqchip(&mut chip).ctx("KVM_GET_IRQCHIP")?;
                irqchips.push(chip);
            }
        }
        Ok(VmState { irqchips })
    }

    /// Restores state saved by [`Vm::save_state`].
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        if state.irqchips.is_empty() == self.irqchip {
            return Err(KvmError::BadState(
                "irqchip state does not match this VM (in-kernel irqchip on one side only)".into(),
            ));
        }
        for chip in &state.irqchips {
            self.fd.set_irqchip(chip).ctx("KVM_SET_IRQCHIP")?;
        }
        Ok(())
    }
}

const KVM_GET_DIRTY_LOG: libc::c_ulong = 0x4010_ae42;
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;
