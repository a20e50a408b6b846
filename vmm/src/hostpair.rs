//! Two "hosts" on one machine: network namespaces joined by a veth pair.
//!
//! ```text
//!   netns ferry-<pid>-<n>-a                 netns ferry-<pid>-<n>-b
//!   +-----------------------+   veth pair   +-----------------------+
//!   | lo up                 |               | lo up                 |
//!   | fv<pid>x<n>a          |<------------->| fv<pid>x<n>b          |
//!   | 198.18.0.1/24         |               | 198.18.0.2/24         |
//!   +-----------------------+               +-----------------------+
//! ```
//!
//! The addresses come from the benchmarking range (RFC 2544), so nothing can
//! leave the machine. [`HostPair::create`] builds the pair with `ip`
//! (iproute2) and removes it on drop; it first removes pairs left behind by
//! processes that no longer exist (names carry the creator's pid).
//! [`HostPair::create_or_loopback`] falls back to plain loopback (127.0.0.1
//! for both hosts) when namespaces cannot be created, and says why.
//! [`HostPair::link_down`] / [`HostPair::link_up`] cut and restore the
//! "cable" for fault tests.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;

/// The first host's address on the veth link.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The second host's address on the veth link.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The first host's MAC address (locally administered; each pair has its own namespaces).
const MAC_A: &str = "02:66:72:79:00:01";
/// The second host's MAC address.
const MAC_B: &str = "02:66:72:79:00:02";
/// Prefix of every namespace this module creates.
const NETNS_PREFIX: &str = "ferry-";
/// Prefix of every veth interface this module creates (interface names are at most 15 bytes).
const VETH_PREFIX: &str = "fv";

/// Why a host pair could not be built or changed.
#[derive(Debug, Error)]
pub enum HostPairError {
    /// `ip` could not be run at all.
    #[error("cannot run `ip {args}`: {source} (is iproute2 installed?)")]
    Spawn {
        /// The arguments.
        args: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `ip` ran and failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments.
        args: String,
        /// What `ip` printed.
        stderr: String,
    },
    /// The operation needs namespaces, but this pair is the loopback fallback.
    #[error("this host pair is plain loopback (no namespaces), so its link cannot be cut")]
    Loopback,
}

/// One of the two hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Its network namespace (None on the loopback fallback).
    pub netns: Option<String>,
    /// Its address, reachable from the other host.
    pub addr: Ipv4Addr,
    /// Its end of the veth pair (None on the loopback fallback).
    pub veth: Option<String>,
}

impl Host {
    /// A command that runs `program` on this host (`ip netns exec NS program`, or plainly).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

/// Two hosts joined by a link; removed on drop.
#[derive(Debug)]
pub struct HostPair {
    a: Host,
    b: Host,
    /// Why this is the loopback fallback, when it is.
    fallback: Option<String>,
}

/// Runs `ip ARGS`; Ok when it succeeded.
fn ip(args: &[&str]) -> Result<(), HostPairError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| HostPairError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HostPairError::Ip {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `ip ARGS` and returns what it printed (empty on failure).
fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether process `pid` exists.
fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The creator's pid in one of our namespace names (`ferry-<pid>-<n>-a`).
fn netns_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let mut parts = rest.split('-');
    let pid = parts.next()?.parse().ok()?;
    let _n: u32 = parts.next()?.parse().ok()?;
    match parts.next()? {
        "a" | "b" => {}
        _ => return None,
    }
    parts.next().is_none().then_some(pid)
}

/// The creator's pid in one of our veth names (`fv<pid>x<n>a`).
fn veth_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(VETH_PREFIX)?;
    let (pid, tail) = rest.split_once('x')?;
    let tail = tail.strip_suffix('a').or_else(|| tail.strip_suffix('b'))?;
    let _n: u32 = tail.parse().ok()?;
    pid.parse().ok()
}

/// Names of the namespaces that exist now.
fn netns_names() -> Vec<String> {
    ip_output(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Names of the links in the current namespace.
fn link_names() -> Vec<String> {
    ip_output(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Removes namespaces and veth ends left behind by processes that no longer exist.
///
/// Returns the names removed.
pub fn remove_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for ns in netns_names() {
        if netns_owner(&ns).is_some_and(|pid| !pid_alive(pid)) && ip(&["netns", "del", &ns]).is_ok()
        {
            removed.push(ns);
        }
    }
    for link in link_names() {
        if veth_owner(&link).is_some_and(|pid| !pid_alive(pid))
            && ip(&["link", "del", &link]).is_ok()
        {
            removed.push(link);
        }
    }
    removed
}

impl HostPair {
    /// Builds two namespaces joined by a veth pair (after removing stale ones).
    pub fn create() -> Result<HostPair, HostPairError> {
        static N: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let host = |side: &str, addr| Host {
            netns: Some(format!("{NETNS_PREFIX}{pid}-{n}-{side}")),
            addr,
            veth: Some(format!("{VETH_PREFIX}{pid}x{n}{side}")),
        };
        let pair = HostPair {
            a: host("a", ADDR_A),
            b: host("b", ADDR_B),
            fallback: None,
        };
        // On any failure, Drop removes whatever was created.
        pair.build()?;
        Ok(pair)
    }

    fn build(&self) -> Result<(), HostPairError> {
        let (ns_a, ns_b) = (self.netns_a(), self.netns_b());
        let (va, vb) = (self.veth_a(), self.veth_b());
        ip(&["netns", "add", ns_a])?;
        ip(&["netns", "add", ns_b])?;
        ip(&[
            "link", "add", va, "address", MAC_A, "type", "veth", "peer", "name", vb, "address",
            MAC_B,
        ])?;
        ip(&["link", "set", va, "netns", ns_a])?;
        ip(&["link", "set", vb, "netns", ns_b])?;
        let sides = [
            (ns_a, va, ADDR_A, ADDR_B, MAC_B),
            (ns_b, vb, ADDR_B, ADDR_A, MAC_A),
        ];
        for (ns, veth, addr, peer, peer_mac) in sides {
            let cidr = format!("{addr}/24");
            let peer = peer.to_string();
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &cidr, "dev", veth])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
            // A permanent neighbour entry, as a cable would give: when the link is cut,
            // packets are lost (TCP retransmits) rather than refused after ARP gives up.
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &peer,
                "lladdr",
                peer_mac,
                "dev",
                veth,
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    /// Plain loopback for both hosts; `why` says why namespaces are not used.
    pub fn loopback(why: impl Into<String>) -> HostPair {
        let host = Host {
            netns: None,
            addr: Ipv4Addr::LOCALHOST,
            veth: None,
        };
        HostPair {
            a: host.clone(),
            b: host,
            fallback: Some(why.into()),
        }
    }

    /// Namespaces when possible, otherwise loopback (see [`HostPair::fallback`]).
    pub fn create_or_loopback() -> HostPair {
        match HostPair::create() {
            Ok(p) => p,
            Err(e) => HostPair::loopback(format!("network namespaces unavailable: {e}")),
        }
    }

    /// The first host (the migration source, by convention).
    pub fn a(&self) -> &Host {
        &self.a
    }

    /// The second host (the migration destination, by convention).
    pub fn b(&self) -> &Host {
        &self.b
    }

    /// Why this pair is plain loopback, or None when it is two namespaces.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Whether the hosts are real namespaces.
    pub fn is_netns(&self) -> bool {
        self.fallback.is_none()
    }

    fn netns_a(&self) -> &str {
        self.a.netns.as_deref().unwrap_or("")
    }

    fn netns_b(&self) -> &str {
        self.b.netns.as_deref().unwrap_or("")
    }

    fn veth_a(&self) -> &str {
        self.a.veth.as_deref().unwrap_or("")
    }

    fn veth_b(&self) -> &str {
        self.b.veth.as_deref().unwrap_or("")
    }

    /// Cuts the cable: the second host's end goes down, so the first host's end loses its
    /// carrier but keeps its address and route. Sockets stay open; packets stop; a new
    /// connection from the first host hangs (its SYNs go nowhere) instead of failing at once.
    pub fn link_down(&self) -> Result<(), HostPairError> {
        self.set_link("down")
    }

    /// Restores the link cut by [`HostPair::link_down`].
    pub fn link_up(&self) -> Result<(), HostPairError> {
        self.set_link("up")
    }

    fn set_link(&self, state: &str) -> Result<(), HostPairError> {
        if !self.is_netns() {
            return Err(HostPairError::Loopback);
        }
        ip(&["-n", self.netns_b(), "link", "set", self.veth_b(), state])
    }

    /// Whether the namespaces of this pair still exist.
    pub fn exists(&self) -> bool {
        if !self.is_netns() {
            return true;
        }
        let names = netns_names();
        [self.netns_a(), self.netns_b()]
            .iter()
            .all(|n| names.iter().any(|x| x == n))
    }

    /// Removes the namespaces (and with them the veth pair); called on drop.
    pub fn remove(&mut self) {
        if !self.is_netns() {
            return;
        }
        let _ = ip(&["netns", "del", self.netns_a()]);
        let _ = ip(&["netns", "del", self.netns_b()]);
        // If building failed before the veth moved into a namespace, it is still here.
        let _ = ip(&["link", "del", self.veth_a()]);
    }
}

impl Drop for HostPair {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_creators_pid() {
        assert_eq!(netns_owner("ferry-1234-0-a"), Some(1234));
        assert_eq!(netns_owner("ferry-1234-17-b"), Some(1234));
        assert_eq!(netns_owner("ferry-1234-0-c"), None);
        assert_eq!(netns_owner("ferry-probe-99"), None);
        assert_eq!(netns_owner("ferry-1234-0-a-x"), None);
        assert_eq!(netns_owner("other-1234-0-a"), None);
        assert_eq!(veth_owner("fv1234x0a"), Some(1234));
        assert_eq!(veth_owner("fv1234x12b"), Some(1234));
        assert_eq!(veth_owner("fv1234x12"), None);
        assert_eq!(veth_owner("eth0"), None);
    }

    #[test]
    fn veth_names_fit_in_an_interface_name() {
        // Linux allows 15 bytes; pids go up to 4194304 (7 digits).
        let longest = format!("{VETH_PREFIX}{}x{}a", 4_194_304, 9999);
        assert!(longest.len() <= 15, "{longest}");
    }

    #[test]
    fn loopback_pair_reports_why_and_refuses_link_changes() {
        let p = HostPair::loopback("testing");
        assert_eq!(p.fallback(), Some("testing"));
        assert_eq!(p.a().addr, Ipv4Addr::LOCALHOST);
        assert_eq!(p.b().addr, Ipv4Addr::LOCALHOST);
        assert!(matches!(p.link_down(), Err(HostPairError::Loopback)));
    }

    #[test]
    fn namespaces_are_created_joined_and_removed() {
        let Ok(p) = HostPair::create() else {
            eprintln!("SKIP: cannot create network namespaces here");
            return;
        };
        assert!(p.exists());
        let addrs = p
            .a()
            .command("ip")
            .args(["-o", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        assert!(addrs.contains("198.18.0.1/24"), "{addrs}");
        let (na, nb) = (p.netns_a().to_string(), p.netns_b().to_string());
        drop(p);
        let names = netns_names();
        assert!(!names.contains(&na) && !names.contains(&nb), "{names:?}");
    }
}
