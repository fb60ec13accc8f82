//! TLS for every gRPC server and client (rustls through tonic), with
//! certificates and keys read from files (Kubernetes mounts them from
//! Secrets).
//!
//! ```toml
//! [tls]
//! cert = "/etc/deadbolt/tls/tls.crt"       # this service's certificate chain (PEM)
//! key = "/etc/deadbolt/tls/tls.key"        # its private key (PEM)
//! ca = "/etc/deadbolt/tls/ca.crt"          # CA bundle that signs the peers' certificates
//! client_ca = "/etc/deadbolt/tls/ca.crt"   # stage services: require client certificates (mutual TLS)
//! client_cert = "/etc/deadbolt/tls/tls.crt" # the gateway's client certificate for mutual TLS
//! client_key = "/etc/deadbolt/tls/tls.key"
//! domain = "deadbolt-stages"               # name to verify instead of the peer URL's host
//! ```
//!
//! Without `[tls]` a process serves plaintext only when every listen
//! address is loopback or `plaintext = true` is set: an operator has to ask
//! for an unencrypted port that others can reach.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// `[tls]`: file paths (PEM). Environment: `DEADBOLT_TLS_CERT`,
/// `DEADBOLT_TLS_KEY`, `DEADBOLT_TLS_CA`, `DEADBOLT_TLS_CLIENT_CA`,
/// `DEADBOLT_TLS_CLIENT_CERT`, `DEADBOLT_TLS_CLIENT_KEY`,
/// `DEADBOLT_TLS_DOMAIN`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain.
    pub cert: Option<PathBuf>,
    /// The server private key.
    pub key: Option<PathBuf>,
    /// CA bundle the clients of this process (the gateway calling the
    /// stages) verify servers with; the system roots when unset.
    pub ca: Option<PathBuf>,
    /// Stage services require client certificates signed by this CA
    /// (mutual TLS, on top of the internal credential). The gateway, which
    /// serves users holding API keys, does not.
    pub client_ca: Option<PathBuf>,
    /// The client certificate the gateway presents to the stages.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The name clients verify in server certificates (default: the host
    /// of the peer URL).
    pub domain: Option<String>,
}

/// Selects rustls's ring provider for the process (other crates in the
/// build enable a second provider, and rustls then refuses to guess).
/// Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("tls.{what}: reading {}", path.display()))
}

/// A PEM file must hold at least one PEM block (a clear error at start-up,
/// not a handshake failure later).
fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = read(path, what)?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        bail!("tls.{what}: {} is not a PEM file", path.display());
    }
    Ok(bytes)
}

impl TlsConfig {
    /// Fills unset fields from `DEADBOLT_TLS_*`.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        let slots: [(&str, &mut Option<PathBuf>); 6] = [
            ("DEADBOLT_TLS_CERT", &mut self.cert),
            ("DEADBOLT_TLS_KEY", &mut self.key),
            ("DEADBOLT_TLS_CA", &mut self.ca),
            ("DEADBOLT_TLS_CLIENT_CA", &mut self.client_ca),
            ("DEADBOLT_TLS_CLIENT_CERT", &mut self.client_cert),
            ("DEADBOLT_TLS_CLIENT_KEY", &mut self.client_key),
        ];
        for (name, slot) in slots {
            if let Some(v) = env(name) {
                *slot = Some(v.into());
            }
        }
        if let Some(v) = env("DEADBOLT_TLS_DOMAIN") {
            self.domain = Some(v);
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == TlsConfig::default()
    }

    /// Checks that paths come in pairs.
    pub fn validate(&self) -> Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            bail!("tls: cert and key go together (one is set without the other)");
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            bail!("tls: client_cert and client_key go together");
        }
        Ok(())
    }

    /// The server side: this service's identity, and for stage services
    /// (`require_client_cert`) the client CA when one is configured.
    pub fn server(&self, require_client_cert: bool) -> Result<ServerTlsConfig> {
        install_crypto_provider();
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            bail!("tls: serving over TLS needs tls.cert and tls.key");
        };
        let identity = Identity::from_pem(read_pem(cert, "cert")?, read_pem(key, "key")?);
        let mut c = ServerTlsConfig::new().identity(identity);
        if require_client_cert {
            if let Some(ca) = &self.client_ca {
                c = c.client_ca_root(Certificate::from_pem(read_pem(ca, "client_ca")?));
            }
        }
        Ok(c)
    }

    /// The client side: the CA bundle (else the system roots), the client
    /// identity when configured, the domain override.
    pub fn client(&self) -> Result<ClientTlsConfig> {
        install_crypto_provider();
        let mut c = ClientTlsConfig::new();
        c = match &self.ca {
            Some(ca) => c.ca_certificate(Certificate::from_pem(read_pem(ca, "ca")?)),
            None => c.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            c = c.identity(Identity::from_pem(
                read_pem(cert, "client_cert")?,
                read_pem(key, "client_key")?,
            ));
        }
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        Ok(c)
    }
}

/// Whether serving plaintext on `addr` needs `plaintext = true`: anything
/// but a loopback address does.
pub fn needs_opt_in(addr: &str) -> bool {
    match addr.parse::<SocketAddr>() {
        Ok(a) => !a.ip().is_loopback(),
        // a host name: `localhost` is loopback, anything else may not be
        Err(_) => !addr.starts_with("localhost:"),
    }
}

/// The client TLS of a URL: `https://` gets TLS (`tls`, else the system
/// roots), `http://` none.
pub fn client_for(url: &str, tls: Option<&TlsConfig>) -> Result<Option<ClientTlsConfig>> {
    if url.starts_with("https://") {
        install_crypto_provider();
        Ok(Some(match tls {
            Some(t) => t.client()?,
            None => ClientTlsConfig::new().with_native_roots(),
        }))
    } else if url.starts_with("http://") {
        Ok(None)
    } else {
        bail!("{url:?}: a URL starts with https:// (or http:// for plaintext)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_opt_in_is_needed_off_loopback() {
        assert!(!needs_opt_in("127.0.0.1:0"));
        assert!(!needs_opt_in("[::1]:50060"));
        assert!(!needs_opt_in("localhost:50060"));
        assert!(needs_opt_in("0.0.0.0:50060"));
        assert!(needs_opt_in("10.0.0.7:50060"));
        assert!(needs_opt_in("gateway:50060"));
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let t = TlsConfig {
            cert: Some(junk.clone()),
            key: Some(dir.path().join("missing.key")),
            ..Default::default()
        };
        let e = format!("{:#}", t.server(false).unwrap_err());
        assert!(e.contains("tls.cert") && e.contains("junk.pem"), "{e}");
        let t = TlsConfig {
            cert: Some(junk),
            ..Default::default()
        };
        assert!(t.validate().unwrap_err().to_string().contains("key"));
        let e = format!("{:#}", client_for("ftp://x", None).unwrap_err());
        assert!(e.contains("https://"), "{e}");
    }
}
