//! TLS 1.2 / 1.3 server side on rustls with the ring provider, optional client
//! certificates (mTLS), and the mapping of a verified client certificate to a username.
//!
//! The provider is passed explicitly to every builder, never taken from a process-wide
//! default, so the QUIC transport can share the same choice.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

use super::{certs, x509, TransportError};

/// Whether a TLS listener asks clients for a certificate (mTLS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientVerify {
    /// No client certificate is requested.
    #[default]
    None,
    /// A certificate is requested; clients without one are accepted, a bad one is refused.
    Optional,
    /// Clients must present a certificate signed by `client_ca`.
    Required,
}

/// Which part of a verified client certificate becomes the MQTT username.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerCertAsUsername {
    /// The CONNECT username stands.
    #[default]
    None,
    /// The subject's Common Name.
    Cn,
    /// The first DNS Subject Alternative Name.
    San,
}

/// TLS settings of a `tls` or `wss` listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain (PEM) and its private key; both `None` means the development
    /// certificate under `<data_dir>/certs/`, made on first use.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub verify: ClientVerify,
    /// CA certificates (PEM) that sign acceptable client certificates.
    pub client_ca: Option<PathBuf>,
    pub peer_cert_as_username: PeerCertAsUsername,
}

/// The one crypto provider of every rustls configuration in Petrel.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A configured TLS server: the handshake plus the client-certificate-to-username rule.
#[derive(Clone)]
pub struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    peer_cert_as_username: PeerCertAsUsername,
}

impl TlsAcceptor {
    /// Builds the server configuration. `settings.cert`/`key` must be set (the listener fills
    /// in the development certificate when the file configured none).
    pub fn new(settings: &TlsSettings) -> Result<Self, TransportError> {
        let (Some(cert), Some(key)) = (&settings.cert, &settings.key) else {
            return Err(TransportError::Config(
                "a TLS listener needs `cert` and `key`".into(),
            ));
        };
        let config = server_config(cert, key, settings.verify, settings.client_ca.as_deref())?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            peer_cert_as_username: settings.peer_cert_as_username,
        })
    }

    /// Runs the handshake; returns the stream and the username the client certificate maps
    /// to, if the listener maps one. The caller bounds the time this may take.
    pub async fn accept<S>(&self, stream: S) -> std::io::Result<(TlsStream<S>, Option<String>)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = self.acceptor.accept(stream).await?;
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first());
        let username = peer.and_then(|cert| peer_username(cert, self.peer_cert_as_username));
        Ok((stream, username))
    }
}

/// The username a verified client certificate maps to under `rule`.
pub fn peer_username(cert: &[u8], rule: PeerCertAsUsername) -> Option<String> {
    match rule {
        PeerCertAsUsername::None => None,
        PeerCertAsUsername::Cn => x509::common_name(cert),
        PeerCertAsUsername::San => x509::first_dns_name(cert),
    }
}

fn server_config(
    cert: &Path,
    key: &Path,
    verify: ClientVerify,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, TransportError> {
    let chain = certs::load_certs(cert)?;
    let key = certs::load_key(key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(tls_config)?;
    let builder = match client_verifier(verify, client_ca)? {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    builder.with_single_cert(chain, key).map_err(tls_config)
}

/// The client-certificate verifier for `verify` against `client_ca`: `None` when client
/// certificates are not asked for. Shared by the TLS, WSS and QUIC listeners.
pub fn client_verifier(
    verify: ClientVerify,
    client_ca: Option<&Path>,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, TransportError> {
    let ca = match (verify, client_ca) {
        (ClientVerify::None, _) => return Ok(None),
        (_, None) => {
            return Err(TransportError::Config(
                "`verify` other than \"none\" needs `client_ca`".into(),
            ))
        }
        (_, Some(ca)) => ca,
    };
    let mut roots = RootCertStore::empty();
    for cert in certs::load_certs(ca)? {
        roots.add(cert).map_err(|e| TransportError::Pem {
            path: ca.to_owned(),
            message: e.to_string(),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let verifier = if verify == ClientVerify::Optional {
        verifier.allow_unauthenticated()
    } else {
        verifier
    };
    Ok(Some(verifier.build().map_err(tls_config)?))
}

fn tls_config(err: impl std::fmt::Display) -> TransportError {
    TransportError::Config(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject as _;

    #[test]
    fn the_username_comes_from_the_cn_or_the_first_dns_san() {
        let ca = certs::Authority::generate("test CA").unwrap();
        let client = ca.client("meter-17").unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(client.cert.as_bytes()).unwrap();
        assert_eq!(
            peer_username(&der, PeerCertAsUsername::Cn).as_deref(),
            Some("meter-17")
        );
        assert_eq!(
            peer_username(&der, PeerCertAsUsername::San).as_deref(),
            Some("meter-17")
        );
        assert_eq!(peer_username(&der, PeerCertAsUsername::None), None);
    }
}
