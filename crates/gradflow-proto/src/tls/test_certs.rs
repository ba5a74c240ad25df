//! Certificates made on the spot, for tests of TLS and mutual TLS (feature `test-certs`).
//!
//! ```
//! # use gradflow_proto::tls::test_certs::TestCa;
//! let dir = tempfile::tempdir().unwrap();
//! let ca = TestCa::new(dir.path(), "ca");
//! let server = ca.server(dir.path(), "server", &["127.0.0.1", "localhost"]);
//! let client = ca.client(dir.path(), "worker");
//! # let _ = (server, client);
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::TlsConfig;

/// A certificate and its key, written to PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority whose certificate is in the PEM file [`TestCa::cert`].
pub struct TestCa {
    /// The CA's certificate (the file `tls.ca` or `tls.client_ca` names).
    pub cert: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA; its certificate goes to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names is valid");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("gradflow test CA {name}"));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("generating a key");
        let cert = params.self_signed(&key).expect("self-signing the CA");
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).expect("writing the CA certificate");
        TestCa { cert: path, issuer: Issuer::new(params, key) }
    }

    fn issue(&self, dir: &Path, name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("valid names");
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("generating a key");
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        let issued = Issued { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
        std::fs::write(&issued.cert, cert.pem()).expect("writing a certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("writing a key");
        issued
    }

    /// A server certificate for these names (IP addresses or DNS names), signed by this CA.
    pub fn server(&self, dir: &Path, name: &str, sans: &[&str]) -> Issued {
        self.issue(dir, name, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate, signed by this CA.
    pub fn client(&self, dir: &Path, name: &str) -> Issued {
        self.issue(dir, name, &[name], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A `[tls]` section for servers on loopback (`127.0.0.1`, `localhost`): one CA signs the
/// server and, with `mutual`, the client certificate, which the servers then require.
pub fn loopback_config(dir: &Path, mutual: bool) -> TlsConfig {
    let ca = TestCa::new(dir, "ca");
    let server = ca.server(dir, "server", &["127.0.0.1", "localhost"]);
    let client = mutual.then(|| ca.client(dir, "client"));
    TlsConfig {
        cert: server.cert,
        key: server.key,
        ca: ca.cert.clone(),
        domain: None,
        client_ca: mutual.then(|| ca.cert.clone()),
        client_cert: client.as_ref().map(|c| c.cert.clone()),
        client_key: client.map(|c| c.key),
    }
}
