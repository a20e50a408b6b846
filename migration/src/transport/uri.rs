//! Migration URIs as QEMU spells them: `tcp:HOST:PORT`, `unix:PATH`, `file:PATH[,offset=N]`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::TransportError;

/// A parsed migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT` (IPv6 hosts in brackets: `tcp:[::1]:4444`).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `file:PATH[,offset=N]`.
    File {
        /// The file.
        path: PathBuf,
        /// Byte offset where the stream starts.
        offset: u64,
    },
}

impl MigrationUri {
    /// Whether this transport can carry replies (and so a confirmed switchover).
    pub fn is_socket(&self) -> bool {
        !matches!(self, MigrationUri::File { .. })
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUri::File { path, offset: 0 } => write!(f, "file:{}", path.display()),
            MigrationUri::File { path, offset } => {
                write!(f, "file:{},offset={offset}", path.display())
            }
        }
    }
}

fn bad(uri: &str, why: &str) -> TransportError {
    TransportError::BadUri {
        uri: uri.to_string(),
        why: why.to_string(),
    }
}

impl FromStr for MigrationUri {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = if let Some(r) = rest.strip_prefix('[') {
                let (h, p) = r
                    .split_once("]:")
                    .ok_or_else(|| bad(s, "expected tcp:[ADDR]:PORT"))?;
                (h.to_string(), p)
            } else {
                let (h, p) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad(s, "expected tcp:HOST:PORT"))?;
                (h.to_string(), p)
            };
            if host.is_empty() {
                return Err(bad(s, "empty host"));
            }
            let port: u16 = port
                .parse()
                .map_err(|_| bad(s, "the port must be a number 0-65535"))?;
            return Ok(MigrationUri::Tcp { host, port });
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad(s, "empty socket path"));
            }
            return Ok(MigrationUri::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("file:") {
            let (path, offset) = match rest.rsplit_once(",offset=") {
                Some((p, o)) => {
                    let off = ram::parse_size(o).map_err(|_| bad(s, "offset must be a size"))?;
                    (p, off)
                }
                None => (rest, 0),
            };
            if path.is_empty() {
                return Err(bad(s, "empty file path"));
            }
            return Ok(MigrationUri::File {
                path: PathBuf::from(path),
                offset,
            });
        }
        Err(TransportError::UnknownProtocol(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_uris() {
        assert_eq!(
            "tcp:198.18.0.2:4444".parse::<MigrationUri>().unwrap(),
            MigrationUri::Tcp {
                host: "198.18.0.2".into(),
                port: 4444
            }
        );
        assert_eq!(
            "tcp:[::1]:5".parse::<MigrationUri>().unwrap(),
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 5
            }
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationUri>().unwrap(),
            MigrationUri::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            "file:/tmp/x,offset=4096".parse::<MigrationUri>().unwrap(),
            MigrationUri::File {
                path: "/tmp/x".into(),
                offset: 4096
            }
        );
        for u in [
            "tcp:1.2.3.4:4444",
            "tcp:[::1]:5",
            "unix:/a",
            "file:/b",
            "file:/b,offset=12",
        ] {
            assert_eq!(u.parse::<MigrationUri>().unwrap().to_string(), u);
        }
    }

    #[test]
    fn rejects_bad_uris_with_qemus_message() {
        let e = "rdma:1.2.3.4:5".parse::<MigrationUri>().unwrap_err();
        assert_eq!(e.to_string(), "unknown migration protocol: rdma:1.2.3.4:5");
        for u in [
            "tcp:host",
            "tcp::5",
            "tcp:h:99999",
            "unix:",
            "file:",
            "file:/x,offset=zz",
        ] {
            assert!(
                matches!(
                    u.parse::<MigrationUri>(),
                    Err(TransportError::BadUri { .. })
                ),
                "{u}"
            );
        }
    }
}
