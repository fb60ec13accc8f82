//! A private CA and certificates for TLS tests, made with rcgen: a server
//! certificate for `localhost` and `127.0.0.1`, a client certificate for
//! mutual TLS, and a certificate from another CA (which no deadbolt
//! process trusts).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// PEM files in a folder.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate signed by another CA.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().expect("ca key")).expect("ca cert")
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    dir: &Path,
    stem: &str,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("leaf key");
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("leaf params");
    p.distinguished_name.push(DnType::CommonName, stem);
    let cert = p.signed_by(&key, issuer).expect("leaf cert");
    let (c, k) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

impl TestPki {
    /// Writes the CA, server, client and rogue certificates into `dir`.
    pub fn new(dir: &Path) -> TestPki {
        // one rustls provider for the test process (the build enables two)
        let _ = rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(dir).unwrap();
        let root = ca("deadbolt test CA");
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, root.pem()).unwrap();
        let (server_cert, server_key) = leaf(&root, &["localhost", "127.0.0.1"], dir, "server");
        let (client_cert, client_key) = leaf(&root, &["gateway"], dir, "client");
        let other = ca("someone else's CA");
        let (rogue_cert, rogue_key) = leaf(&other, &["gateway"], dir, "rogue");
        TestPki {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
            rogue_cert,
            rogue_key,
        }
    }

    /// The `[tls]` table of a service config: serve with the server
    /// certificate, require client certificates at the stages, present the
    /// client certificate as the gateway.
    pub fn config(&self) -> String {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nclient_ca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            self.server_cert.display(),
            self.server_key.display(),
            self.ca.display(),
            self.ca.display(),
            self.client_cert.display(),
            self.client_key.display()
        )
    }

    /// A client TLS config that trusts the CA, presenting `identity`
    /// (certificate and key files) when given.
    pub fn client(&self, identity: Option<(&Path, &Path)>) -> tonic::transport::ClientTlsConfig {
        let mut c = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(&self.ca).unwrap()),
        );
        if let Some((cert, key)) = identity {
            c = c.identity(tonic::transport::Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            ));
        }
        c
    }
}
