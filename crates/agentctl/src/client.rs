//! Reaching agentd: the Unix socket, plain TCP to an `--insecure-listen` daemon, or TLS
//! (with a client certificate for mTLS), and a bearer token on every call.

use std::path::{Path, PathBuf};

use agentd_proto::settings;
use agentd_proto::v1 as pb;
use anyhow::{Context, bail};
use pb::agent_supervisor_client::AgentSupervisorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::Options;

pub type Client = AgentSupervisorClient<InterceptedService<Channel, Token>>;

/// Adds `authorization: Bearer TOKEN` to every call when a token is given.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// TLS to `address` (HOST:PORT), trusting the CA in `ca`, presenting `identity` (a
/// certificate and its key) when given.
async fn tls_channel(
    target: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Channel> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let authority = target
        .strip_prefix("https://")
        .unwrap_or(target)
        .trim_end_matches('/')
        .to_string();
    let host = match authority.rsplit_once(':') {
        Some((host, _)) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        None => bail!("`{target}`: give https://HOST:PORT"),
    };
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("--ca-cert `{}`", ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("--ca-cert `{}`", ca.display()))?)
            .with_context(|| format!("--ca-cert `{}`", ca.display()))?;
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|error| anyhow::anyhow!("--client-cert `{}`: {error}", cert.display()))?;
            if chain.is_empty() {
                bail!("--client-cert `{}` holds no certificate", cert.display());
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|error| {
                anyhow::anyhow!(
                    "--client-key `{}`: no private key read ({error})",
                    key.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .context("--client-cert and --client-key do not make a usable pair")?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from(host.clone())
        .with_context(|| format!("`{host}` is not a host name or address"))?;
    let channel = Endpoint::from_shared(format!("http://{authority}"))?
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, authority, name) = (connector.clone(), authority.clone(), name.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(authority).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .with_context(|| format!("connecting to agentd at {target} over TLS"))?;
    Ok(channel)
}

/// Whether agentd runs on this host: over its Unix socket, or at a loopback address.
pub fn is_local(options: &Options) -> bool {
    let Some(addr) = &options.addr else {
        return true;
    };
    addr.parse::<tonic::transport::Uri>()
        .ok()
        .and_then(|uri| {
            uri.host()
                .map(|host| host.trim_matches(['[', ']']).to_string())
        })
        .is_some_and(|host| {
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
}

pub async fn connect(options: &Options) -> anyhow::Result<Client> {
    let target = match (&options.addr, &options.socket) {
        (Some(addr), _) => addr.clone(),
        (None, Some(socket)) => format!("unix://{}", socket.display()),
        (None, None) => {
            let data_dir = std::env::var_os("AGENTD_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(settings::default_data_dir);
            format!("unix://{}", settings::socket_in(&data_dir).display())
        }
    };
    let channel = match (target.starts_with("https://"), &options.ca_cert) {
        (true, Some(ca)) => {
            let identity = options
                .client_cert
                .as_deref()
                .zip(options.client_key.as_deref());
            tls_channel(&target, ca, identity).await?
        }
        (true, None) => {
            bail!("--addr {target}: give --ca-cert CA.pem (the CA of agentd's certificate)")
        }
        (false, _) => Endpoint::from_shared(target.clone())
            .with_context(|| format!("`{target}` is not a usable address"))?
            .connect()
            .await
            .with_context(|| format!("connecting to agentd at {target} (is it running?)"))?,
    };
    let token = options
        .token
        .as_deref()
        .map(|token| {
            format!("Bearer {token}")
                .parse()
                .context("--token holds characters a header cannot")
        })
        .transpose()?;
    Ok(AgentSupervisorClient::with_interceptor(
        channel,
        Token(token),
    ))
}
