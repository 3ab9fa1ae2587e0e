//! TLS on the TCP listeners (rustls with ring): the certificate and key, and optionally the
//! CA that client certificates must chain to (mTLS). Each connection takes the configuration
//! current when it arrives, so a reload (SIGHUP) changes new connections and drops none.
//! `connection.rs` runs the handshake on each connection's own task, with a deadline.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context as _, bail};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// What a listener speaks, for ALPN: gRPC needs `h2`, the HTTP API is HTTP/1.1.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    Grpc,
    Http,
}

pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

pub struct Tls {
    files: TlsFiles,
    /// For gRPC listeners and for HTTP ones.
    configs: RwLock<(Arc<ServerConfig>, Arc<ServerConfig>)>,
}

impl Tls {
    pub fn load(files: TlsFiles) -> anyhow::Result<Tls> {
        let configs = RwLock::new(build(&files)?);
        Ok(Tls { files, configs })
    }

    /// Reads the files again; on an error the configuration in use stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let configs = build(&self.files)?;
        *self.configs.write().unwrap_or_else(|e| e.into_inner()) = configs;
        Ok(())
    }

    pub(crate) fn acceptor(&self, protocol: Protocol) -> TlsAcceptor {
        let configs = self.configs.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(match protocol {
            Protocol::Grpc => configs.0.clone(),
            Protocol::Http => configs.1.clone(),
        })
    }
}

fn build(files: &TlsFiles) -> anyhow::Result<(Arc<ServerConfig>, Arc<ServerConfig>)> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|error| {
        anyhow::anyhow!(
            "--tls-key `{}`: no private key read ({error})",
            files.key.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "--tls-client-ca")? {
                roots
                    .add(cert)
                    .with_context(|| format!("--tls-client-ca `{}`", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("--tls-client-ca `{}`", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .context("--tls-cert and --tls-key do not make a usable pair")?;
    let with_alpn = |alpn: &[u8]| {
        let mut config = config.clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    };
    Ok((with_alpn(b"h2"), with_alpn(b"http/1.1")))
}

fn read_certs(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| anyhow::anyhow!("{flag} `{}`: {error}", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} `{}` holds no certificate", path.display());
    }
    Ok(certs)
}
