//! X.509 credentials for TLS tests, generated at run time (rcgen) in QEMU's directory layout:
//! `ca-cert.pem`, `server-cert.pem`/`server-key.pem`, `client-cert.pem`/`client-key.pem`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority that can issue test certificates.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, org);
    d.push(DnType::CommonName, cn);
    d
}

impl TestCa {
    /// A new self-signed CA named `cn`.
    pub fn new(cn: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = dn(cn, "Ferry Tests");
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa {
            pem: cert.pem(),
            params,
            key,
        }
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) with subject CN=`cn`,
    /// O=Ferry Tests; `expired` makes it valid only in the past.
    pub fn issue(&self, cn: &str, names: &[&str], expired: bool) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name = dn(cn, "Ferry Tests");
        if expired {
            params.not_before =
                time::OffsetDateTime::from_unix_timestamp(1_000_000_000).expect("t");
            params.not_after = time::OffsetDateTime::from_unix_timestamp(1_100_000_000).expect("t");
        }
        let issuer = Issuer::new(self.params.clone(), &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// Writes a credentials directory for QEMU's tls-creds-x509 `endpoint` ("server"/"client").
pub fn write_dir(
    dir: &Path,
    ca: &TestCa,
    endpoint: &str,
    cert: Option<(String, String)>,
) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).expect("write ca");
    if let Some((c, k)) = cert {
        std::fs::write(dir.join(format!("{endpoint}-cert.pem")), c).expect("write cert");
        std::fs::write(dir.join(format!("{endpoint}-key.pem")), k).expect("write key");
    }
    dir.to_path_buf()
}
