//! Kicking a vCPU out of KVM_RUN: a real-time signal whose handler sets `immediate_exit`.
//!
//! Each vCPU thread registers its `kvm_run` page in a thread-local; the
//! handler sets `immediate_exit = 1` there. If the signal lands while the
//! thread is inside KVM_RUN, the ioctl returns EINTR; if it lands just before,
//! immediate_exit makes the next KVM_RUN return at once. Either way the vCPU
//! loop sees "interrupted" and looks at its control state.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks (SIGRTMIN + 2, clear of libc's internal ones).
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_sig: libc::c_int) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer was registered by this thread for its own vCPU's kvm_run page,
        // which stays mapped while the thread runs; a single byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; the
        // handler only touches a thread-local pointer and one byte.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Registers the calling vCPU thread's kvm_run page for the kick handler.
pub fn register_current(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

/// Forgets the calling thread's registration (before its kvm_run page goes away).
pub fn unregister_current() {
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

/// Sends the kick signal to thread `thread`.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill with a valid thread id and a signal whose handler is installed;
    // a thread that already exited yields ESRCH, which is harmless.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}
