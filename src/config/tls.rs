//! `[tls]`: TLS on the game port (rustls, on each worker's own reactor).
//!
//! Certificates and keys come from PEM files; several may be given, each
//! chosen by SNI from the DNS names in its certificate (the first is the
//! default). A reload re-reads the files: new handshakes use the new
//! certificates, live sessions keep theirs; a bad file rejects the reload
//! and the running certificates stay. TLS 1.2 and 1.3 with rustls' safe
//! defaults (modern AEAD suites only), ALPN from config (`http/1.1` for
//! WebSocket), session resumption with tickets whose keys rotate (one
//! ticketer per process, kept across reloads).

use rustls::crypto::ring;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Whether the game port speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    /// TLS and plaintext side by side (a ClientHello is recognised).
    Optional,
    /// TLS only: anything else is refused.
    Required,
}

impl TlsMode {
    pub(crate) fn parse(s: &str) -> Option<TlsMode> {
        match s {
            "off" => Some(TlsMode::Off),
            "optional" => Some(TlsMode::Optional),
            "required" => Some(TlsMode::Required),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::Optional => "optional",
            TlsMode::Required => "required",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One loaded certificate, for logs and the expiry metric.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Its first DNS name (or the file name when it has none).
    pub name: String,
    pub path: PathBuf,
    /// NotAfter, Unix seconds.
    pub not_after: i64,
}

/// The checked `[tls]` section.
#[derive(Clone)]
pub struct TlsConfig {
    pub mode: TlsMode,
    /// Set unless `mode` is off.
    pub server: Option<Arc<rustls::ServerConfig>>,
    pub certificates: Vec<CertInfo>,
    pub alpn: Vec<String>,
    /// Every certificate and key file (watched for live reload).
    pub files: Vec<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { mode: TlsMode::Off, server: None, certificates: Vec::new(), alpn: Vec::new(), files: Vec::new() }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mode", &self.mode)
            .field("certificates", &self.certificates)
            .field("alpn", &self.alpn)
            .finish()
    }
}

/// Picks a certificate by SNI, else the first.
#[derive(Debug)]
struct SniResolver {
    by_name: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else { return Some(self.default.clone()) };
        let sni = sni.to_ascii_lowercase();
        let hit = self.by_name.iter().find(|(name, _)| {
            *name == sni
                || name
                    .strip_prefix("*.")
                    .is_some_and(|suffix| sni.split_once('.').is_some_and(|(_, rest)| rest == suffix))
        });
        Some(hit.map_or_else(|| self.default.clone(), |(_, k)| k.clone()))
    }
}

/// One rotating ticketer per process: resumption survives reloads.
fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, String> {
    static T: OnceLock<Result<Arc<dyn rustls::server::ProducesTickets>, String>> = OnceLock::new();
    T.get_or_init(|| ring::Ticketer::new().map_err(|e| e.to_string())).clone()
}

/// Reads one certificate chain and key; returns the key and its facts.
fn load_pair(cert: &Path, key: &Path) -> Result<(Arc<CertifiedKey>, Vec<String>, i64), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let Some(leaf) = chain.first() else { return Err(format!("{}: no certificate in the file", cert.display())) };
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = ring::sign::any_supported_type(&key_der).map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain.clone(), signing);
    certified.keys_match().map_err(|e| format!("{} and {} do not match: {e}", cert.display(), key.display()))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| format!("{}: {e}", cert.display()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok((Arc::new(certified), names, parsed.validity().not_after.timestamp()))
}

/// Builds the server side of `[tls]` from its files; errors name the file.
pub(crate) fn build(mode: TlsMode, pairs: &[(PathBuf, PathBuf)], alpn: &[String]) -> Result<TlsConfig, String> {
    if mode == TlsMode::Off {
        return Ok(TlsConfig { mode, ..TlsConfig::default() });
    }
    if pairs.is_empty() {
        return Err("TLS is on but no certificates are configured ([[tls.certificates]] cert and key)".into());
    }
    let mut by_name = Vec::new();
    let mut certificates = Vec::new();
    let mut default = None;
    for (cert, key) in pairs {
        let (ck, names, not_after) = load_pair(cert, key)?;
        certificates.push(CertInfo {
            name: names.first().cloned().unwrap_or_else(|| cert.display().to_string()),
            path: cert.clone(),
            not_after,
        });
        for n in names {
            by_name.push((n, ck.clone()));
        }
        default.get_or_insert(ck);
    }
    let resolver = SniResolver { by_name, default: default.expect("at least one pair") };
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    server.ticketer = ticketer()?;
    let files = pairs.iter().flat_map(|(c, k)| [c.clone(), k.clone()]).collect();
    Ok(TlsConfig { mode, server: Some(Arc::new(server)), certificates, alpn: alpn.to_vec(), files })
}
