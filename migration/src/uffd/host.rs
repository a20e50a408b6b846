//! [`UffdHostReport`]: what this host's kernel offers for userfaultfd, for `ferry probe`.

use std::path::Path;

use serde::Serialize;

use super::features::UffdFeatures;
use super::open::{open_syscall, query_features, strerror, OpenMethod, DEV_USERFAULTFD};

/// The sysctl that lets unprivileged processes use the syscall.
pub const UNPRIVILEGED_USERFAULTFD: &str = "/proc/sys/vm/unprivileged_userfaultfd";

/// Everything `ferry probe` says about userfaultfd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UffdHostReport {
    /// Whether the `userfaultfd(2)` syscall opened an fd for this process.
    pub syscall: bool,
    /// Why the syscall failed, if it did (C `strerror` text).
    pub syscall_error: Option<String>,
    /// Whether `/dev/userfaultfd` exists.
    pub dev_userfaultfd: bool,
    /// `vm.unprivileged_userfaultfd` (None when unreadable).
    pub unprivileged_userfaultfd: Option<bool>,
    /// The way Ferry opens userfaultfds here (syscall first), if any works.
    pub open_method: Option<OpenMethod>,
    /// The features the kernel offers, if a userfaultfd could be opened.
    pub features: Option<UffdFeatures>,
    /// Names of those features.
    pub feature_names: Vec<String>,
    /// Why no userfaultfd could be used, if so.
    pub error: Option<String>,
}

/// Parses the sysctl's contents ("0\n" or "1\n").
pub fn parse_unprivileged(text: &str) -> Option<bool> {
    match text.trim() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Reads `vm.unprivileged_userfaultfd`.
pub fn unprivileged_userfaultfd() -> Option<bool> {
    std::fs::read_to_string(UNPRIVILEGED_USERFAULTFD)
        .ok()
        .and_then(|t| parse_unprivileged(&t))
}

/// Probes the host.
pub fn probe_host() -> UffdHostReport {
    let syscall = open_syscall();
    let (features, open_method, error) = match query_features() {
        Ok((f, m)) => (Some(f), Some(m), None),
        Err(e) => (None, None, Some(e.to_string())),
    };
    UffdHostReport {
        syscall: syscall.is_ok(),
        syscall_error: syscall.err().map(|e| strerror(&e)),
        dev_userfaultfd: Path::new(DEV_USERFAULTFD).exists(),
        unprivileged_userfaultfd: unprivileged_userfaultfd(),
        open_method,
        feature_names: features.map(|f| f.names()).unwrap_or_default(),
        features,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_text_parses() {
        assert_eq!(parse_unprivileged("0\n"), Some(false));
        assert_eq!(parse_unprivileged("1"), Some(true));
        assert_eq!(parse_unprivileged("x"), None);
    }

    #[test]
    fn report_is_consistent_and_serializable() {
        let r = probe_host();
        assert_eq!(r.dev_userfaultfd, Path::new(DEV_USERFAULTFD).exists());
        assert_eq!(r.syscall, r.syscall_error.is_none());
        assert_eq!(r.features.is_some(), r.error.is_none());
        if r.syscall {
            assert_eq!(r.open_method, Some(OpenMethod::Syscall));
        }
        if let Some(f) = r.features {
            assert_eq!(r.feature_names, f.names());
        } else {
            eprintln!("no userfaultfd here: {:?}", r.error);
        }
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("unprivileged_userfaultfd").is_some());
        eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    }
}
