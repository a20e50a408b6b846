//! Opening a userfaultfd and its `UFFDIO_API` handshake.
//!
//! A userfaultfd comes from the `userfaultfd(2)` syscall or, when that is
//! refused (`vm.unprivileged_userfaultfd=0` without CAP_SYS_PTRACE), from
//! `/dev/userfaultfd` with `USERFAULTFD_IOC_NEW`. Either way it is opened
//! with `O_CLOEXEC | O_NONBLOCK` and *without* `UFFD_USER_MODE_ONLY`: KVM
//! touches guest memory from kernel mode on the guest's behalf, and those
//! faults must reach us too.
//!
//! A userfaultfd accepts exactly one `UFFDIO_API`. To learn what the kernel
//! offers, [`query_features`] asks with `features = 0` on a throwaway fd and
//! reads back the offered mask; [`open`] then opens the real fd asking for
//! what the caller needs.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use serde::Serialize;
use userfaultfd::Uffd;

use super::features::{UffdFeatures, UFFD_API};
use super::UffdError;

/// Path of the userfaultfd device (Linux 6.1+).
pub const DEV_USERFAULTFD: &str = "/dev/userfaultfd";

/// How a userfaultfd was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpenMethod {
    /// The `userfaultfd(2)` syscall.
    Syscall,
    /// `/dev/userfaultfd` and `USERFAULTFD_IOC_NEW`.
    DevUserfaultfd,
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

mod raw {
    use super::UffdioApi;

    nix::ioctl_readwrite!(
        /// `UFFDIO_API`: `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
        uffdio_api,
        0xAA,
        0x3F,
        UffdioApi
    );

    nix::ioctl_write_int_bad!(
        /// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)`, argument: the new fd's flags.
        userfaultfd_ioc_new,
        nix::request_code_none!(0xAA, 0x00)
    );
}

const OPEN_FLAGS: libc::c_int = libc::O_CLOEXEC | libc::O_NONBLOCK;

/// Opens a userfaultfd with the syscall (flags `O_CLOEXEC | O_NONBLOCK`).
pub fn open_syscall() -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes only a flags word and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, OPEN_FLAGS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the syscall just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a userfaultfd through `/dev/userfaultfd`.
pub fn open_dev() -> io::Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_USERFAULTFD)?;
    // SAFETY: `dev` is an open /dev/userfaultfd; the ioctl takes the new fd's flags by value.
    let fd = unsafe { raw::userfaultfd_ioc_new(dev.as_raw_fd(), OPEN_FLAGS) }
        .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    // SAFETY: the ioctl just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a userfaultfd: the syscall first, then the device.
pub fn open_fd() -> Result<(OwnedFd, OpenMethod), UffdError> {
    match open_syscall() {
        Ok(fd) => Ok((fd, OpenMethod::Syscall)),
        Err(syscall) => match open_dev() {
            Ok(fd) => Ok((fd, OpenMethod::DevUserfaultfd)),
            Err(dev) => Err(UffdError::Unavailable { syscall, dev }),
        },
    }
}

/// What a successful `UFFDIO_API` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ApiInfo {
    /// Every feature the kernel offers (not only the requested ones).
    pub features: UffdFeatures,
    /// The ioctls the fd supports (`REGISTER`, `UNREGISTER`, `API`).
    pub ioctls: u64,
}

/// The `UFFDIO_API` handshake on `fd`, enabling `features`.
pub fn api(fd: &OwnedFd, features: u64) -> Result<ApiInfo, UffdError> {
    let mut arg = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `fd` is an open userfaultfd and `arg` a live, writable uffdio_api.
    unsafe { raw::uffdio_api(fd.as_raw_fd(), &mut arg) }
        .map_err(|e| UffdError::Api(io::Error::from_raw_os_error(e as i32)))?;
    Ok(ApiInfo {
        features: UffdFeatures::from_bits(arg.features),
        ioctls: arg.ioctls,
    })
}

/// What the kernel offers, learned on a throwaway userfaultfd.
pub fn query_features() -> Result<(UffdFeatures, OpenMethod), UffdError> {
    let (fd, method) = open_fd()?;
    let info = api(&fd, 0)?;
    Ok((info.features, method))
}

/// A userfaultfd ready for use, with what its handshake reported.
#[derive(Debug)]
pub struct OpenedUffd {
    /// The fd, for register / write-protect / copy / zeropage / wake / read_events.
    pub uffd: Uffd,
    /// Features enabled on this fd.
    pub enabled: u64,
    /// Every feature the kernel offers.
    pub offered: UffdFeatures,
    /// fd-level ioctls.
    pub ioctls: u64,
    /// How it was opened.
    pub method: OpenMethod,
}

/// Opens a userfaultfd with `features` enabled, refusing features the kernel does not offer.
pub fn open(features: u64) -> Result<OpenedUffd, UffdError> {
    let (offered, _) = query_features()?;
    let missing = features & !offered.bits;
    if missing != 0 {
        return Err(UffdError::MissingFeatures { missing });
    }
    let (fd, method) = open_fd()?;
    let info = api(&fd, features)?;
    // SAFETY: `into_raw_fd` hands over sole ownership of an open userfaultfd to `Uffd`.
    let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
    Ok(OpenedUffd {
        uffd,
        enabled: features,
        offered: info.features,
        ioctls: info.ioctls,
        method,
    })
}

/// QEMU's `strerror()` text for an OS error (`Operation not permitted`, not Rust's `(os error 1)`).
pub fn strerror(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::features::*;
    use super::*;

    /// Skips (with a printed reason) only when neither the syscall nor the device works.
    fn uffd_or_skip() -> Option<()> {
        match open_fd() {
            Ok(_) => Some(()),
            Err(e) => {
                eprintln!("skipping: {e}");
                None
            }
        }
    }

    #[test]
    fn syscall_or_device_opens_a_userfaultfd() {
        if uffd_or_skip().is_none() {
            return;
        }
        let (fd, method) = open_fd().unwrap();
        assert!(fd.as_raw_fd() >= 0);
        // The fd is close-on-exec and non-blocking.
        // SAFETY: F_GETFD / F_GETFL on an fd we own.
        let (fdflags, flflags) = unsafe {
            (
                libc::fcntl(fd.as_raw_fd(), libc::F_GETFD),
                libc::fcntl(fd.as_raw_fd(), libc::F_GETFL),
            )
        };
        assert_ne!(fdflags & libc::FD_CLOEXEC, 0);
        assert_ne!(flflags & libc::O_NONBLOCK, 0);
        eprintln!("opened with {method:?}");
    }

    #[test]
    fn device_path_works_when_present() {
        if !std::path::Path::new(DEV_USERFAULTFD).exists() {
            eprintln!("skipping: {DEV_USERFAULTFD} absent");
            return;
        }
        match open_dev() {
            Ok(fd) => {
                let info = api(&fd, 0).unwrap();
                assert_ne!(info.ioctls & IOCTL_API, 0);
            }
            Err(e) => eprintln!("skipping: {DEV_USERFAULTFD} not usable: {e}"),
        }
    }

    #[test]
    fn query_reports_features_and_a_second_api_is_refused() {
        if uffd_or_skip().is_none() {
            return;
        }
        let (fd, _) = open_fd().unwrap();
        let info = api(&fd, 0).unwrap();
        assert_eq!(
            info.ioctls & (IOCTL_REGISTER | IOCTL_UNREGISTER | IOCTL_API),
            IOCTL_REGISTER | IOCTL_UNREGISTER | IOCTL_API
        );
        // One UFFDIO_API per fd.
        assert!(matches!(api(&fd, 0), Err(UffdError::Api(_))));
        let (q, _) = query_features().unwrap();
        assert_eq!(q, info.features);
        eprintln!("offered: {:?}", q.names());
    }

    #[test]
    fn open_enables_offered_features_and_refuses_others() {
        if uffd_or_skip().is_none() {
            return;
        }
        let (offered, _) = query_features().unwrap();
        let want = offered.bits & (FEATURE_PAGEFAULT_FLAG_WP | FEATURE_THREAD_ID);
        let opened = open(want).unwrap();
        assert_eq!(opened.enabled, want);
        assert_eq!(opened.offered, offered);
        let bogus = 1u64 << 50;
        assert!(
            matches!(open(bogus), Err(UffdError::MissingFeatures { missing }) if missing == bogus)
        );
    }

    #[test]
    fn strerror_is_the_c_text() {
        assert_eq!(
            strerror(&io::Error::from_raw_os_error(libc::EPERM)),
            "Operation not permitted"
        );
        assert_eq!(strerror(&io::Error::other("x")), "x");
    }
}
