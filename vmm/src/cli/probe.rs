//! `ferry probe [--json]`: what this host's kernel offers Ferry.

use clap::Args;
use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
};
use kvm_ioctls::{Cap, Kvm};
use migration::uffd::{self, RamArea, WriteTrackingReport};
use ram::{GuestRam, MemoryConfig};
use serde::Serialize;
use serde_json::json;

/// Arguments of `ferry probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What KVM offers.
#[derive(Debug, Serialize)]
pub struct KvmReport {
    /// /dev/kvm could be opened.
    pub available: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// KVM_GET_API_VERSION.
    pub api_version: Option<i32>,
    /// KVM_CAP_USER_MEMORY.
    pub user_memory: bool,
    /// Dirty logging (KVM_MEM_LOG_DIRTY_PAGES is part of the base API).
    pub dirty_log: bool,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags (0 = absent).
    pub manual_dirty_log_protect: i32,
    /// KVM_CAP_DIRTY_LOG_RING: maximum ring size in bytes (0 = absent).
    pub dirty_ring_max_bytes: i32,
    /// KVM_CAP_DIRTY_LOG_RING_ACQ_REL maximum ring size in bytes (0 = absent).
    pub dirty_ring_acq_rel_max_bytes: i32,
    /// KVM_CAP_IRQCHIP.
    pub irqchip: bool,
    /// Recommended vCPUs (KVM_CAP_NR_VCPUS).
    pub nr_vcpus: usize,
    /// Maximum vCPUs (KVM_CAP_MAX_VCPUS).
    pub max_vcpus: usize,
    /// KVM_CAP_TSC_CONTROL.
    pub tsc_control: bool,
    /// KVM_CAP_IMMEDIATE_EXIT.
    pub immediate_exit: bool,
}

fn probe_kvm() -> KvmReport {
    match Kvm::new() {
        Err(e) => KvmReport {
            available: false,
            error: Some(e.to_string()),
            api_version: None,
            user_memory: false,
            dirty_log: false,
            manual_dirty_log_protect: 0,
            dirty_ring_max_bytes: 0,
            dirty_ring_acq_rel_max_bytes: 0,
            irqchip: false,
            nr_vcpus: 0,
            max_vcpus: 0,
            tsc_control: false,
            immediate_exit: false,
        },
        Ok(kvm) => {
            let vm = kvm.create_vm().ok();
            let raw = |cap: u32| {
                vm.as_ref()
                    .map_or(0, |v| v.check_extension_raw(u64::from(cap) as _))
            };
            KvmReport {
                available: true,
                error: None,
                api_version: Some(kvm.get_api_version()),
                user_memory: kvm.check_extension(Cap::UserMemory),
                dirty_log: kvm.check_extension(Cap::UserMemory),
                manual_dirty_log_protect: raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
                dirty_ring_max_bytes: raw(KVM_CAP_DIRTY_LOG_RING),
                dirty_ring_acq_rel_max_bytes: raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
                irqchip: kvm.check_extension(Cap::Irqchip),
                nr_vcpus: kvm.get_nr_vcpus(),
                max_vcpus: kvm.get_max_vcpus(),
                tsc_control: kvm.check_extension(Cap::TscControl),
                immediate_exit: kvm.check_extension(Cap::ImmediateExit),
            }
        }
    }
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn write_tracking_for(spec: &str) -> (String, WriteTrackingReport) {
    let probe = || -> Result<WriteTrackingReport, String> {
        let cfg: MemoryConfig = spec.parse().map_err(|e| format!("{e}"))?;
        let ram = GuestRam::new(&cfg).map_err(|e| e.to_string())?;
        Ok(uffd::probe_write_tracking(&RamArea::from_guest_ram(&ram)))
    };
    let name = spec.split_once(',').map_or("memfd", |(_, b)| b).to_string();
    match probe() {
        Ok(r) => (name, r),
        Err(e) => (
            name,
            WriteTrackingReport {
                support: uffd::WriteTrackingSupport::Absent,
                reason: Some(e),
            },
        ),
    }
}

/// Runs `ferry probe`; exits 0 when everything live migration needs is present.
pub fn run(a: ProbeArgs) -> i32 {
    let kvm = probe_kvm();
    let uffd = uffd::probe_host();
    let thp = read_trim("/sys/kernel/mm/transparent_hugepage/enabled");
    let hugetlb_free = read_trim("/proc/sys/vm/nr_hugepages");
    let shm_file = format!("/dev/shm/ferry-probe-{}", std::process::id());
    let backends = [
        "2M".to_string(),
        "2M,backend=anon".to_string(),
        format!("2M,mem-path={shm_file},share=on"),
    ];
    let tracking: Vec<_> = backends.iter().map(|b| write_tracking_for(b)).collect();
    let _ = std::fs::remove_file(&shm_file);
    let ok = kvm.available && kvm.user_memory && kvm.dirty_log;
    if a.json {
        let report = json!({
            "kvm": kvm,
            "userfaultfd": uffd,
            "transparent-hugepages": thp,
            "nr-hugepages": hugetlb_free,
            "write-tracking": tracking.iter().map(|(n, r)| json!({
                "backend": n, "support": format!("{:?}", r.support).to_lowercase(), "reason": r.reason,
            })).collect::<Vec<_>>(),
            "live-migration-ready": ok,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!("KVM");
        println!(
            "  /dev/kvm                     {}",
            if kvm.available { "yes" } else { "NO" }
        );
        if let Some(e) = &kvm.error {
            println!("  error                        {e}");
        }
        println!(
            "  API version                  {}",
            kvm.api_version.map_or("-".into(), |v| v.to_string())
        );
        println!("  user memory                  {}", kvm.user_memory);
        println!("  dirty log                    {}", kvm.dirty_log);
        println!(
            "  manual dirty-log protect     {:#x}",
            kvm.manual_dirty_log_protect
        );
        println!(
            "  dirty ring (max bytes)       {}",
            kvm.dirty_ring_max_bytes
        );
        println!(
            "  dirty ring acq/rel (bytes)   {}",
            kvm.dirty_ring_acq_rel_max_bytes
        );
        println!("  in-kernel irqchip            {}", kvm.irqchip);
        println!(
            "  vCPUs recommended / max      {} / {}",
            kvm.nr_vcpus, kvm.max_vcpus
        );
        println!("  TSC control                  {}", kvm.tsc_control);
        println!("  immediate exit               {}", kvm.immediate_exit);
        println!("userfaultfd");
        println!(
            "  syscall                      {}",
            if uffd.syscall { "yes" } else { "no" }
        );
        println!("  /dev/userfaultfd             {}", uffd.dev_userfaultfd);
        println!(
            "  vm.unprivileged_userfaultfd  {}",
            uffd.unprivileged_userfaultfd
                .map_or("-".into(), |v| (v as u8).to_string())
        );
        println!(
            "  features                     {}",
            uffd.feature_names.join(" ")
        );
        if let Some(e) = &uffd.error {
            println!("  error                        {e}");
        }
        println!("memory");
        println!(
            "  transparent huge pages       {}",
            thp.as_deref().unwrap_or("-")
        );
        println!(
            "  hugetlb pages reserved       {}",
            hugetlb_free.as_deref().unwrap_or("-")
        );
        println!("write tracking (background-snapshot)");
        for (name, r) in &tracking {
            println!(
                "  {:<28} {:?}{}",
                name,
                r.support,
                r.reason
                    .as_ref()
                    .map(|x| format!(" ({x})"))
                    .unwrap_or_default()
            );
        }
        println!("live migration ready: {}", if ok { "yes" } else { "NO" });
    }
    if ok {
        0
    } else {
        1
    }
}
