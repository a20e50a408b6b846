//! Credentials for the TLS rows of the throughput section: a CA, a server certificate
//! for the destination and a client certificate for the source, generated at run time
//! (rcgen) in QEMU's `tls-creds-x509` directory layout. Both ends use them as a real
//! deployment would: the source checks the destination's certificate against the CA
//! and the name `tls-hostname`, the destination checks the source's (verify-peer=on).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{json, Value};

/// The id of the credentials object on both ends.
pub const CREDS_ID: &str = "tls0";
/// The server name the destination's certificate carries (and the source checks).
pub const SERVER_NAME: &str = "ferry-bench-destination";

/// Credential directories for both ends of a TLS migration.
#[derive(Debug, Clone)]
pub struct TlsCreds {
    /// The destination's directory (ca-cert.pem, server-cert.pem, server-key.pem).
    pub server_dir: PathBuf,
    /// The source's directory (ca-cert.pem, client-cert.pem, client-key.pem).
    pub client_dir: PathBuf,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "Ferry bench");
    d.push(DnType::CommonName, cn);
    d
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let p = dir.join(name);
    std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
}

impl TlsCreds {
    /// Generates a CA and both certificates under `dir` (`tls-server/`, `tls-client/`).
    pub fn generate(dir: &Path) -> Result<TlsCreds, String> {
        let err = |e: rcgen::Error| format!("cannot generate TLS credentials: {e}");
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params.distinguished_name = dn("Ferry bench CA");
        let ca_pem = ca_params.self_signed(&ca_key).map_err(err)?.pem();
        let issuer = Issuer::new(ca_params, &ca_key);
        let mut out = TlsCreds {
            server_dir: dir.join("tls-server"),
            client_dir: dir.join("tls-client"),
        };
        for (endpoint, names) in [
            ("server", vec![SERVER_NAME.to_string()]),
            ("client", vec![]),
        ] {
            let key = KeyPair::generate().map_err(err)?;
            let mut params = CertificateParams::new(names).map_err(err)?;
            params.distinguished_name = dn(&format!("ferry bench {endpoint}"));
            let cert = params.signed_by(&key, &issuer).map_err(err)?;
            let d = if endpoint == "server" {
                &mut out.server_dir
            } else {
                &mut out.client_dir
            };
            std::fs::create_dir_all(&*d).map_err(|e| format!("{}: {e}", d.display()))?;
            write(d, "ca-cert.pem", &ca_pem)?;
            write(d, &format!("{endpoint}-cert.pem"), &cert.pem())?;
            write(d, &format!("{endpoint}-key.pem"), &key.serialize_pem())?;
        }
        Ok(out)
    }

    /// `ferry run` arguments of the source (the client end).
    pub fn source_args(&self) -> Vec<String> {
        vec![
            "--object".into(),
            format!(
                "tls-creds-x509,id={CREDS_ID},dir={},endpoint=client",
                self.client_dir.display()
            ),
        ]
    }

    /// `ferry run` arguments of the destination (the server end, checking the client).
    pub fn dest_args(&self) -> Vec<String> {
        vec![
            "--object".into(),
            format!(
                "tls-creds-x509,id={CREDS_ID},dir={},endpoint=server,verify-peer=on",
                self.server_dir.display()
            ),
        ]
    }

    /// Adds the source's TLS parameters to `params` (an object).
    pub fn source_params(params: &mut Value) {
        params["tls-creds"] = json!(CREDS_ID);
        params["tls-hostname"] = json!(SERVER_NAME);
    }

    /// Adds the destination's TLS parameters to `params` (an object).
    pub fn dest_params(params: &mut Value) {
        params["tls-creds"] = json!(CREDS_ID);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_written_in_qemus_layout() {
        let dir = std::env::temp_dir().join(format!("ferry-bench-tls-{}", std::process::id()));
        let c = TlsCreds::generate(&dir).expect("generate");
        for (d, e) in [(&c.server_dir, "server"), (&c.client_dir, "client")] {
            for f in [
                "ca-cert.pem".to_string(),
                format!("{e}-cert.pem"),
                format!("{e}-key.pem"),
            ] {
                let text = std::fs::read_to_string(d.join(&f)).expect("read");
                assert!(text.starts_with("-----BEGIN"), "{f}: {text}");
            }
        }
        assert!(c.source_args()[1].contains("endpoint=client"));
        assert!(c.dest_args()[1].contains("endpoint=server,verify-peer=on"));
        let mut p = json!({});
        TlsCreds::source_params(&mut p);
        assert_eq!(p["tls-hostname"], SERVER_NAME);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
