//! One thread per vCPU: the run loop, pause/resume, throttling, state requests.
//!
//! The thread owns its `VcpuFd`. Other threads steer it through [`VcpuHandle`]:
//! they set the wanted state and kick the thread out of KVM_RUN (see
//! [`crate::kvm::kick`]); the thread notices at its next loop turn. While
//! paused, the thread services requests that need the vCPU fd (save and
//! restore of its state), so KVM state is only touched by its owner.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::guest_abi::SLEEP_PORT;
use devices::PortBus;
use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;

use crate::kvm::state::VcpuState;
use crate::kvm::{kick, vcpu, KvmError};

/// Longest single sleep a guest gets through the sleep port.
const SLEEP_CAP: Duration = Duration::from_millis(1);
/// QEMU's CPU_THROTTLE_TIMESLICE: a throttled vCPU runs this long between sleeps.
pub const THROTTLE_TIMESLICE: Duration = Duration::from_millis(10);

/// Why a vCPU thread stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VcpuStop {
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("vCPU {0}: the guest shut down (triple fault) at rip {1:#x}")]
    Shutdown(usize, u64),
    /// KVM_RUN failed.
    #[error("vCPU {0}: KVM_RUN failed: {1}")]
    RunError(usize, String),
    /// KVM reported an exit Ferry cannot continue from.
    #[error("vCPU {0}: unexpected exit {1}")]
    Unexpected(usize, String),
}

/// Errors from steering a vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// The thread is gone.
    #[error("vCPU {0} is not running: {1}")]
    Gone(usize, String),
    /// It did not pause in time.
    #[error("vCPU {0} did not pause within {1:?}")]
    PauseTimeout(usize, Duration),
    /// KVM refused a state operation.
    #[error(transparent)]
    Kvm(#[from] KvmError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

enum Request {
    Save(mpsc::Sender<Result<VcpuState, KvmError>>),
    Restore(Box<VcpuState>, mpsc::Sender<Result<(), KvmError>>),
}

struct Ctl {
    want: Want,
    paused: bool,
    stopped: Option<VcpuStop>,
    requests: VecDeque<Request>,
}

/// Harvests the dirty ring of vCPU `n` when it reports full.
pub type RingFullHandler = Box<dyn Fn(usize) -> Result<(), String> + Send + Sync>;

/// What the vCPU thread needs from the machine.
pub struct VcpuContext {
    /// Port I/O routing.
    pub bus: Arc<PortBus>,
    /// MSRs to save.
    pub msr_list: Vec<u32>,
    /// Whether the in-kernel irqchip exists.
    pub irqchip: bool,
    /// Guest TSC frequency (for the sleep port).
    pub tsc_khz: u64,
    /// Called on KVM_EXIT_DIRTY_RING_FULL (dirty ring mode): harvest so the vCPU can run.
    pub on_ring_full: Option<RingFullHandler>,
    /// Called once when the vCPU stops on its own (guest crash, KVM error).
    pub on_stop: Box<dyn Fn(&VcpuStop) + Send + Sync>,
}

struct Shared {
    id: usize,
    ctl: Mutex<Ctl>,
    cond: Condvar,
    throttle_pct: AtomicU8,
    throttle_due: AtomicBool,
    pthread: AtomicU64,
    run_exits: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        // A poisoned lock means a vCPU thread panicked; keep going with its data.
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Steering handle of one vCPU thread.
pub struct VcpuHandle {
    shared: Arc<Shared>,
    join: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread for vCPU `id`; it begins paused when `start_paused`.
    pub fn spawn(
        id: usize,
        fd: VcpuFd,
        ctx: Arc<VcpuContext>,
        start_paused: bool,
    ) -> std::io::Result<Self> {
        kick::install_handler();
        let shared = Arc::new(Shared {
            id,
            ctl: Mutex::new(Ctl {
                want: if start_paused { Want::Pause } else { Want::Run },
                paused: false,
                stopped: None,
                requests: VecDeque::new(),
            }),
            cond: Condvar::new(),
            throttle_pct: AtomicU8::new(0),
            throttle_due: AtomicBool::new(false),
            pthread: AtomicU64::new(0),
            run_exits: AtomicU64::new(0),
        });
        let s = shared.clone();
        let join = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_main(fd, s, ctx))?;
        // Wait until the thread has published its pthread id (needed for kicks).
        while shared.pthread.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        Ok(VcpuHandle {
            shared,
            join: Some(join),
        })
    }

    /// vCPU index.
    pub fn id(&self) -> usize {
        self.shared.id
    }

    fn kick(&self) {
        kick::kick(self.shared.pthread.load(Ordering::Acquire) as libc::pthread_t);
        self.shared.cond.notify_all();
    }

    /// Asks the vCPU to pause (returns at once; see [`VcpuHandle::wait_paused`]).
    pub fn request_pause(&self) {
        let mut c = self.shared.lock();
        if c.want == Want::Run {
            c.want = Want::Pause;
        }
        drop(c);
        self.kick();
    }

    /// Waits until the vCPU is paused (or has stopped on its own).
    pub fn wait_paused(&self, timeout: Duration) -> Result<(), VcpuError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        while !c.paused && c.stopped.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::PauseTimeout(self.shared.id, timeout));
            }
            c = self
                .shared
                .cond
                .wait_timeout(c, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Ok(())
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut c = self.shared.lock();
        if c.want == Want::Pause {
            c.want = Want::Run;
        }
        drop(c);
        self.shared.cond.notify_all();
    }

    /// Whether the vCPU is paused right now.
    pub fn is_paused(&self) -> bool {
        self.shared.lock().paused
    }

    /// Why the vCPU stopped on its own, if it did.
    pub fn stopped(&self) -> Option<VcpuStop> {
        self.shared.lock().stopped.clone()
    }

    fn request<T>(&self, make: impl FnOnce(mpsc::Sender<T>) -> Request) -> Result<T, VcpuError> {
        let (tx, rx) = mpsc::channel();
        {
            let mut c = self.shared.lock();
            if let Some(s) = &c.stopped {
                return Err(VcpuError::Gone(self.shared.id, s.to_string()));
            }
            c.requests.push_back(make(tx));
        }
        self.shared.cond.notify_all();
        rx.recv()
            .map_err(|_| VcpuError::Gone(self.shared.id, "thread exited".into()))
    }

    /// Saves the vCPU's state; the vCPU must be paused.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        Ok(self.request(Request::Save)??)
    }

    /// Restores the vCPU's state; the vCPU must be paused.
    pub fn restore_state(&self, state: VcpuState) -> Result<(), VcpuError> {
        Ok(self.request(|tx| Request::Restore(Box::new(state), tx))??)
    }

    /// Sets the throttle percentage (0 = off, else 1..=99).
    pub fn set_throttle(&self, pct: u8) {
        self.shared
            .throttle_pct
            .store(pct.min(99), Ordering::Release);
    }

    /// A handle the throttle timer uses to make this vCPU sleep its share.
    pub fn ticker(&self) -> VcpuTicker {
        VcpuTicker(self.shared.clone())
    }

    /// Number of KVM_RUN exits handled so far.
    pub fn exits(&self) -> u64 {
        self.shared.run_exits.load(Ordering::Relaxed)
    }

    /// Stops and joins the thread.
    pub fn stop(&mut self) {
        self.shared.lock().want = Want::Stop;
        self.kick();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Lets the throttle timer make a vCPU sleep its throttle share.
pub struct VcpuTicker(Arc<Shared>);

impl VcpuTicker {
    /// Makes the vCPU sleep its throttle share once (called every throttle period).
    pub fn throttle_tick(&self) {
        if self.0.throttle_pct.load(Ordering::Acquire) > 0 {
            self.0.throttle_due.store(true, Ordering::Release);
            kick::kick(self.0.pthread.load(Ordering::Acquire) as libc::pthread_t);
        }
    }
}

/// Sleeps up to `dur`, waking early when the vCPU is asked to pause or stop.
fn interruptible_sleep(s: &Shared, dur: Duration) {
    let deadline = Instant::now() + dur;
    let mut c = s.lock();
    while c.want == Want::Run && c.requests.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        c = s
            .cond
            .wait_timeout(c, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

fn service(fd: &mut VcpuFd, s: &Shared, ctx: &VcpuContext) -> bool {
    let mut c = s.lock();
    loop {
        while let Some(req) = c.requests.pop_front() {
            match req {
                Request::Save(tx) => {
                    let _ = tx.send(vcpu::save(fd, s.id as u32, &ctx.msr_list, ctx.irqchip));
                }
                Request::Restore(state, tx) => {
                    let _ = tx.send(vcpu::restore(fd, &state, ctx.irqchip));
                }
            }
        }
        match c.want {
            Want::Run => {
                if c.paused {
                    c.paused = false;
                    s.cond.notify_all();
                }
                return true;
            }
            Want::Stop => return false,
            Want::Pause => {
                if !c.paused {
                    c.paused = true;
                    s.cond.notify_all();
                }
                c = s.cond.wait(c).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

fn vcpu_main(mut fd: VcpuFd, s: Arc<Shared>, ctx: Arc<VcpuContext>) {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    kick::register_current(fd.get_kvm_run() as *mut _);
    s.pthread.store(me as u64, Ordering::Release);
    let stop = run_loop(&mut fd, &s, &ctx);
    kick::unregister_current();
    let mut c = s.lock();
    c.paused = false;
    if let Some(reason) = stop {
        (ctx.on_stop)(&reason);
        c.stopped = Some(reason);
    }
    // Fail pending requests instead of leaving their senders waiting.
    c.requests.clear();
    s.cond.notify_all();
}

fn run_loop(fd: &mut VcpuFd, s: &Shared, ctx: &VcpuContext) -> Option<VcpuStop> {
    let id = s.id;
    loop {
        if !service(fd, s, ctx) {
            return None;
        }
        if s.throttle_due.swap(false, Ordering::AcqRel) {
            let pct = u32::from(s.throttle_pct.load(Ordering::Acquire).min(99));
            if pct > 0 {
                interruptible_sleep(s, THROTTLE_TIMESLICE * pct / (100 - pct));
                continue;
            }
        }
        let exit = fd.run();
        s.run_exits.fetch_add(1, Ordering::Relaxed);
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == SLEEP_PORT {
                    let mut b = [0u8; 4];
                    let n = data.len().min(4);
                    b[..n].copy_from_slice(&data[..n]);
                    let ticks = u64::from(u32::from_le_bytes(b));
                    let nanos = ticks.saturating_mul(1_000_000) / ctx.tsc_khz.max(1);
                    interruptible_sleep(s, Duration::from_nanos(nanos).min(SLEEP_CAP));
                } else {
                    ctx.bus.write(id, port, data);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.bus.read(port, data);
            }
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Hlt) => {
                // Only reachable without the in-kernel irqchip; the test guest never halts.
                interruptible_sleep(s, SLEEP_CAP);
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                return Some(VcpuStop::Shutdown(id, rip));
            }
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match &ctx.on_ring_full {
                Some(harvest) => {
                    if let Err(e) = harvest(id) {
                        return Some(VcpuStop::Unexpected(id, e));
                    }
                }
                None => {
                    return Some(VcpuStop::Unexpected(
                        id,
                        "dirty ring full without a ring".into(),
                    ))
                }
            },
            Ok(other) => {
                return Some(VcpuStop::Unexpected(id, format!("{other:?}")));
            }
            Err(e) if e.errno() == libc::EINTR => {
                fd.set_kvm_immediate_exit(0);
            }
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(VcpuStop::RunError(id, e.to_string())),
        }
    }
}
