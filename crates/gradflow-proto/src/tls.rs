//! TLS and mutual TLS for the connections between a job's processes.
//!
//! The job file's `[tls]` section ([`TlsConfig`]) names PEM files: the servers' certificate
//! chain and key, the CA bundle clients check the servers against, and, for mutual TLS, the
//! CA bundle servers check clients against plus the certificate and key the job's clients
//! present. [`TlsConfig::server`] and [`TlsConfig::client`] split it into what each side
//! needs; [`ServerTls::load`] and [`ClientTls::load`] read and check the files and build
//! tonic's settings. Every error names the key, the file and what was expected.
//!
//! TLS comes on top of the job token ([`crate::auth`]), not instead of it: TLS decides who
//! may connect and keeps the traffic private, the token decides whether a call belongs to
//! the job. With both on, a client needs both.
//!
//! Clients started by a launcher get their side of the settings from the environment
//! ([`ClientTls::from_env`]: [`ENV_TLS_CA`] and the variables beside it), the way they get
//! the token, so a trainer of your own (`worker.command`) speaks TLS without code of its own.
//!
//! When a connection fails, [`diagnose`] tells a TLS problem (a certificate not trusted, a
//! client certificate refused, one side speaking TLS and the other not) from a server that
//! is not up yet, so that clients fail at once with a message instead of retrying.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// PEM file of the CA certificate(s) that sign the servers' certificates (`tls.ca`). Its
/// presence turns TLS on for a client that was not given TLS settings in code.
pub const ENV_TLS_CA: &str = "GRADFLOW_TLS_CA";
/// PEM file of the certificate chain a client presents for mutual TLS (`tls.client_cert`).
pub const ENV_TLS_CLIENT_CERT: &str = "GRADFLOW_TLS_CLIENT_CERT";
/// PEM file of the private key of [`ENV_TLS_CLIENT_CERT`] (`tls.client_key`).
pub const ENV_TLS_CLIENT_KEY: &str = "GRADFLOW_TLS_CLIENT_KEY";
/// The name checked against the servers' certificates (`tls.domain`).
pub const ENV_TLS_DOMAIN: &str = "GRADFLOW_TLS_DOMAIN";

/// Longest a server waits for a client to finish its TLS handshake, so that connections
/// that never finish one do not pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `[tls]` section of a job file. Paths are PEM files, relative to the job file.
///
/// ```toml
/// [tls]
/// cert = "certs/server.pem"        # the servers' certificate chain
/// key = "certs/server.key"         # its private key
/// ca = "certs/ca.pem"              # what clients check the servers' certificate against
/// # Mutual TLS: servers take only clients with a certificate signed by client_ca.
/// client_ca = "certs/ca.pem"
/// client_cert = "certs/client.pem"
/// client_key = "certs/client.key"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The servers' certificate chain (leaf first). Its names must include the name clients
    /// connect with: the host of each server address (an IP address or a DNS name), or
    /// `domain`. Required.
    pub cert: PathBuf,
    /// The private key of `cert` (PKCS#8, PKCS#1 or SEC1). Required.
    pub key: PathBuf,
    /// The CA certificate(s) clients check the servers' certificates against. Required.
    pub ca: PathBuf,
    /// The name clients check the servers' certificates for, instead of the host of each
    /// server address; for addresses that are IPs or change (pods). Default: the host.
    #[serde(default)]
    pub domain: Option<String>,
    /// Mutual TLS: servers take only clients that present a certificate signed by one of
    /// these CAs; any other connection is refused in the handshake. Default: off (any
    /// client that trusts the servers may connect, and the token decides).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// The certificate chain the job's clients (workers, `gradflow checkpoint now`) present.
    /// Required with `client_ca`. Default: none.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// The private key of `client_cert`. Required with `client_cert`. Default: none.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl TlsConfig {
    /// Makes relative paths relative to `base` (the job file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.cert);
        fix(&mut self.key);
        fix(&mut self.ca);
        for p in [&mut self.client_ca, &mut self.client_cert, &mut self.client_key].into_iter().flatten() {
            fix(p);
        }
    }

    /// Checks what can be checked without the files: keys that need each other.
    pub fn check_keys(&self) -> Result<(), TlsError> {
        let missing = |key: &str, because: &str| TlsError::Invalid {
            key: format!("tls.{key}"),
            message: format!("missing; expected a PEM file when tls.{because} is set"),
        };
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => return Err(missing("client_key", "client_cert")),
            (None, Some(_)) => return Err(missing("client_cert", "client_key")),
            _ => {}
        }
        if self.client_ca.is_some() && self.client_cert.is_none() {
            return Err(TlsError::Invalid {
                key: "tls.client_cert".into(),
                message: "missing; with tls.client_ca the servers refuse clients without a certificate, so the job's own workers need one (tls.client_cert and tls.client_key)".into(),
            });
        }
        if let Some(d) = &self.domain
            && (d.is_empty() || rustls::pki_types::ServerName::try_from(d.as_str()).is_err())
        {
            return Err(TlsError::Invalid {
                key: "tls.domain".into(),
                message: format!("`{d}` is not a DNS name or an IP address"),
            });
        }
        Ok(())
    }

    /// Checks the keys and reads every file: each must exist and hold what its key says,
    /// and each key must belong to its certificate.
    pub fn validate(&self) -> Result<(), TlsError> {
        self.check_keys()?;
        self.server().load()?;
        self.client().load()?;
        Ok(())
    }

    /// What a server needs.
    pub fn server(&self) -> ServerTls {
        ServerTls { cert: self.cert.clone(), key: self.key.clone(), client_ca: self.client_ca.clone() }
    }

    /// What a client of the job's servers needs.
    pub fn client(&self) -> ClientTls {
        ClientTls {
            ca: self.ca.clone(),
            identity: self.client_cert.clone().zip(self.client_key.clone()),
            domain: self.domain.clone(),
            names: Names::JOB_FILE,
        }
    }
}

/// A server's side of TLS: its certificate and key, and for mutual TLS the CAs its clients'
/// certificates must be signed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Reads and checks the files and builds tonic's server settings.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity = load_identity("tls.cert", &self.cert, "tls.key", &self.key)?;
        let mut config = ServerTlsConfig::new().identity(identity).timeout(HANDSHAKE_TIMEOUT);
        if let Some(path) = &self.client_ca {
            config = config.client_ca_root(load_ca("tls.client_ca", path)?);
        }
        Ok(config)
    }

    /// True when clients must present a certificate (mutual TLS).
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }
}

/// A client's side of TLS: the CAs it trusts the servers by, the name it checks their
/// certificates for, and the certificate it presents for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificate(s) the servers' certificates must be signed by.
    pub ca: PathBuf,
    /// Certificate chain and key this client presents (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name checked against the servers' certificates; default: the host of the address.
    pub domain: Option<String>,
    names: Names,
}

/// What errors call the settings: job-file keys or environment variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Names {
    ca: &'static str,
    cert: &'static str,
    key: &'static str,
}

impl Names {
    const JOB_FILE: Names = Names { ca: "tls.ca", cert: "tls.client_cert", key: "tls.client_key" };
    const ENV: Names = Names { ca: ENV_TLS_CA, cert: ENV_TLS_CLIENT_CERT, key: ENV_TLS_CLIENT_KEY };
}

impl ClientTls {
    /// Settings that trust the servers whose certificates `ca` signed, with no client
    /// certificate.
    pub fn new(ca: impl Into<PathBuf>) -> ClientTls {
        ClientTls { ca: ca.into(), identity: None, domain: None, names: Names::JOB_FILE }
    }

    /// Presents this certificate chain and key to the servers (mutual TLS).
    pub fn with_identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> ClientTls {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Checks the servers' certificates for this name instead of the address's host.
    pub fn with_domain(mut self, domain: impl Into<String>) -> ClientTls {
        self.domain = Some(domain.into());
        self
    }

    /// The settings a launcher handed over in the environment: `None` when [`ENV_TLS_CA`] is
    /// not set.
    pub fn from_env() -> Result<Option<ClientTls>, TlsError> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let Some(ca) = var(ENV_TLS_CA) else {
            if let Some(name) = [ENV_TLS_CLIENT_CERT, ENV_TLS_CLIENT_KEY, ENV_TLS_DOMAIN]
                .into_iter()
                .find(|n| var(n).is_some())
            {
                return Err(TlsError::Invalid {
                    key: name.into(),
                    message: format!("is set but {ENV_TLS_CA} is not; expected both (or neither)"),
                });
            }
            return Ok(None);
        };
        let identity = match (var(ENV_TLS_CLIENT_CERT), var(ENV_TLS_CLIENT_KEY)) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(TlsError::Invalid {
                    key: format!("{ENV_TLS_CLIENT_CERT}/{ENV_TLS_CLIENT_KEY}"),
                    message: "only one is set; expected both (or neither)".into(),
                });
            }
        };
        let domain = match var(ENV_TLS_DOMAIN) {
            Some(d) => Some(d.into_string().map_err(|_| TlsError::Invalid {
                key: ENV_TLS_DOMAIN.into(),
                message: "is not valid UTF-8".into(),
            })?),
            None => None,
        };
        Ok(Some(ClientTls { ca: ca.into(), identity, domain, names: Names::ENV }))
    }

    /// The environment variables that hand these settings to a child process.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![(ENV_TLS_CA, self.ca.to_string_lossy().into_owned())];
        if let Some((cert, key)) = &self.identity {
            env.push((ENV_TLS_CLIENT_CERT, cert.to_string_lossy().into_owned()));
            env.push((ENV_TLS_CLIENT_KEY, key.to_string_lossy().into_owned()));
        }
        if let Some(d) = &self.domain {
            env.push((ENV_TLS_DOMAIN, d.clone()));
        }
        env
    }

    /// Reads and checks the files and builds tonic's client settings.
    pub fn load(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new().ca_certificate(load_ca(self.names.ca, &self.ca)?);
        if let Some((cert, key)) = &self.identity {
            config = config.identity(load_identity(self.names.cert, cert, self.names.key, key)?);
        }
        if let Some(d) = &self.domain {
            config = config.domain_name(d.clone());
        }
        Ok(config)
    }
}

/// A TLS setting that cannot work; the message names the setting and the file.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {} is not {expected}: {message}", path.display())]
    Pem { key: String, path: PathBuf, expected: &'static str, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl TlsError {
    /// The setting the error is about (`tls.cert`, `GRADFLOW_TLS_CA`, ...).
    pub fn key(&self) -> &str {
        match self {
            TlsError::Read { key, .. } | TlsError::Pem { key, .. } | TlsError::Invalid { key, .. } => key,
        }
    }
}

const CERTS: &str = "a PEM file with certificates (-----BEGIN CERTIFICATE-----)";
const KEY: &str =
    "a PEM file with a private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)";

fn read(key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { key: key.into(), path: path.into(), source })
}

/// The certificates in a PEM file: at least one, each well-formed.
fn parse_certs(key: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad =
        |message: String| TlsError::Pem { key: key.into(), path: path.into(), expected: CERTS, message };
    let certs =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate found".into()));
    }
    for (i, c) in certs.iter().enumerate() {
        rustls::server::ParsedCertificate::try_from(c)
            .map_err(|e| bad(format!("certificate {} of {} does not parse: {e}", i + 1, certs.len())))?;
    }
    Ok(certs)
}

/// A CA bundle: certificates that can serve as trust anchors.
fn load_ca(key: &str, path: &Path) -> Result<Certificate, TlsError> {
    let pem = read(key, path)?;
    let certs = parse_certs(key, path, &pem)?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        roots.add(c).map_err(|e| TlsError::Pem {
            key: key.into(),
            path: path.into(),
            expected: "a CA certificate bundle",
            message: format!("certificate {} cannot be a trust anchor: {e}", i + 1),
        })?;
    }
    Ok(Certificate::from_pem(pem))
}

/// A certificate chain and its private key, checked to belong together.
fn load_identity(cert_key: &str, cert: &Path, key_key: &str, key: &Path) -> Result<Identity, TlsError> {
    let cert_pem = read(cert_key, cert)?;
    let certs = parse_certs(cert_key, cert, &cert_pem)?;
    let key_pem = read(key_key, key)?;
    let bad_key =
        |message: String| TlsError::Pem { key: key_key.into(), path: key.into(), expected: KEY, message };
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad_key(e.to_string()))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&private)
        .map_err(|e| bad_key(format!("not a usable key: {e}")))?;
    match rustls::sign::CertifiedKey::new(certs, signing).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(TlsError::Invalid {
                key: key_key.into(),
                message: format!(
                    "{} is not the key of the certificate in {} ({cert_key}): {e}",
                    key.display(),
                    cert.display()
                ),
            });
        }
    }
    Ok(Identity::from_pem(cert_pem, key_pem))
}

/// What kind of TLS problem made a connection fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// This client speaks TLS; the server answered in plaintext.
    ServerIsPlaintext,
    /// This client speaks plaintext; the server (probably) expects TLS.
    ServerExpectsTls,
    /// The server's certificate is not trusted, expired, or not for the name connected to.
    ServerCertificate,
    /// The server refused this client in the handshake (mutual TLS: no certificate, or one
    /// its `client_ca` did not sign).
    RefusedByServer,
    /// Another TLS failure.
    Other,
}

/// Tells a connection failure caused by TLS from any other (a server not up yet, say): the
/// kind of problem and a message that says what to check. `client_tls` says whether the
/// client that failed speaks TLS. `None`: not recognizably a TLS problem, worth retrying.
///
/// A plaintext client of a TLS server only sees its connection closed, which a server that
/// is going away also causes: [`could_be_tls_server`] says when to ask the server with
/// [`answers_plaintext_http2`].
pub fn diagnose(error: &(dyn std::error::Error + 'static), client_tls: bool) -> Option<(Problem, String)> {
    let (found, text) = walk(error);
    if let Some(e) = found {
        use rustls::Error as E;
        let problem = match e {
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
                if client_tls =>
            {
                Problem::ServerIsPlaintext
            }
            E::InvalidCertificate(_) => Problem::ServerCertificate,
            E::AlertReceived(_) | E::NoCertificatesPresented => Problem::RefusedByServer,
            _ => Problem::Other,
        };
        return Some((problem, explain(problem, e.to_string())));
    }
    // hyper and h2 pass some rustls errors on as text only.
    let problem = if !client_tls {
        return None;
    } else if text.contains("corrupt message") || text.contains("InvalidContentType") {
        Problem::ServerIsPlaintext
    } else if text.contains("invalid peer certificate") {
        Problem::ServerCertificate
    } else if text.contains("received fatal alert") || text.contains("peer sent no certificates") {
        Problem::RefusedByServer
    } else {
        return None;
    };
    Some((problem, explain(problem, text)))
}

/// For a plaintext client: whether the failure is what a TLS server causes (it closes the
/// connection at the first bytes of HTTP/2, or answers with a TLS record).
pub fn could_be_tls_server(error: &(dyn std::error::Error + 'static)) -> bool {
    let (_, text) = walk(error);
    let text = text.to_lowercase();
    ["broken pipe", "connection reset", "connection closed", "frame with invalid size", "frame_size_error"]
        .iter()
        .any(|p| text.contains(p))
}

/// Asks the server at `addr` (`host:port`) whether it speaks plaintext HTTP/2: sends the
/// HTTP/2 connection preface and reads the first frame header of the reply. `Some(true)`: it
/// answered with a SETTINGS frame. `Some(false)`: it answered with something else (a TLS
/// server answers with an alert, or closes the connection). `None`: it could not be reached
/// or did not answer within `timeout`.
pub async fn answers_plaintext_http2(addr: &str, timeout: Duration) -> Option<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let exchange = async {
        let host_port = addr.rsplit("://").next().unwrap_or(addr);
        let mut stream = tokio::net::TcpStream::connect(host_port).await.ok()?;
        if stream.write_all(PREFACE).await.is_err() {
            return Some(false);
        }
        let mut header = [0u8; 9];
        Some(match stream.read_exact(&mut header).await {
            Ok(_) => header[3] == 0x04,
            Err(_) => false,
        })
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// The message for a plaintext client whose server expects TLS.
pub fn expects_tls(error: &(dyn std::error::Error + 'static)) -> String {
    explain(Problem::ServerExpectsTls, walk(error).1)
}

/// The rustls error in an error's chain, if there is one, and the chain as text.
fn walk<'a>(error: &'a (dyn std::error::Error + 'static)) -> (Option<&'a rustls::Error>, String) {
    let mut parts: Vec<String> = Vec::new();
    let mut found = None;
    let mut next = Some(error);
    while let Some(e) = next {
        // A Status prints its source too; its message is enough.
        let text = match e.downcast_ref::<tonic::Status>() {
            Some(status) => status.message().to_string(),
            None => e.to_string(),
        };
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        if found.is_none() {
            found = e.downcast_ref::<rustls::Error>().or_else(|| {
                e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref())
            });
        }
        next = e.source();
    }
    (found, parts.join(": "))
}

fn explain(problem: Problem, detail: String) -> String {
    let hint = match problem {
        Problem::ServerIsPlaintext => {
            "the server does not speak TLS but this client does: give the servers the same [tls] section (tls.cert, tls.key), or remove it from the client"
        }
        Problem::ServerExpectsTls => {
            "the server seems to expect TLS but this client speaks plaintext: give the client the job's [tls] section (or GRADFLOW_TLS_CA), or remove [tls] from the servers"
        }
        Problem::ServerCertificate => {
            "the server's certificate is not trusted: it must be signed by a CA in tls.ca and name the host connected to (or tls.domain)"
        }
        Problem::RefusedByServer => {
            "the server refused this client in the TLS handshake: with mutual TLS (tls.client_ca) a client needs tls.client_cert and tls.client_key signed by one of the servers' tls.client_ca"
        }
        Problem::Other => "TLS handshake failed",
    };
    format!("{hint} ({detail})")
}

/// The server address as a URL: `https://` with TLS, `http://` without. An address that
/// already has a scheme must agree.
pub fn url(addr: &str, tls: bool) -> Result<String, AddressError> {
    let addr_owned = || addr.to_string();
    match addr.split_once("://") {
        None => Ok(format!("{}://{addr}", if tls { "https" } else { "http" })),
        Some(("https", _)) if tls => Ok(addr.to_string()),
        Some(("http", _)) if !tls => Ok(addr.to_string()),
        Some(("http", _)) => Err(AddressError::HttpWithTls { addr: addr_owned() }),
        Some(("https", _)) => Err(AddressError::HttpsWithoutTls { addr: addr_owned() }),
        Some((scheme, _)) => {
            Err(AddressError::UnknownScheme { addr: addr_owned(), scheme: scheme.to_string() })
        }
    }
}

/// A server address whose scheme disagrees with the TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    #[error("server address `{addr}` says http://, but TLS is configured; write it without a scheme")]
    HttpWithTls { addr: String },
    #[error(
        "server address `{addr}` says https://, but no TLS is configured (set tls.ca, or GRADFLOW_TLS_CA)"
    )]
    HttpsWithoutTls { addr: String },
    #[error("server address `{addr}`: unknown scheme {scheme}://, expected host:port")]
    UnknownScheme { addr: String, scheme: String },
}

#[cfg(feature = "test-certs")]
pub mod test_certs;
