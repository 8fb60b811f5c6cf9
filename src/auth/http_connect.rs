//! The HTTP authentication backend's connector: plain TCP for `http://`, TLS (rustls on ring,
//! the server's certificate verified against the system's trust store or `ssl.cacertfile`)
//! for `https://`, under hyper's pooled client.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens connections for the pool.
#[derive(Clone)]
pub struct Connector {
    tcp: HttpConnector,
    /// For `https://` URLs.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Connector {
    /// `tls`: whether `https://` is used; its trust anchors are `cacertfile`, or the system's.
    pub fn new(
        mut tcp: HttpConnector,
        tls: bool,
        cacertfile: Option<&Path>,
    ) -> Result<Self, String> {
        tcp.enforce_http(false);
        let tls = match tls {
            false => None,
            true => Some(tokio_rustls::TlsConnector::from(Arc::new(client_config(
                cacertfile,
            )?))),
        };
        Ok(Self { tcp, tls })
    }
}

fn client_config(cacertfile: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match cacertfile {
        Some(path) => {
            let certs = crate::transport::certs::load_certs(path)
                .map_err(|e| format!("ssl.cacertfile: {e}"))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("ssl.cacertfile {}: {e}", path.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs()
                .map_err(|e| format!("the system's trust store: {e} (or set ssl.cacertfile)"))?;
            roots.add_parsable_certificates(native);
        }
    }
    if roots.is_empty() {
        return Err("https: no trust anchors (set ssl.cacertfile)".into());
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(crate::transport::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let host = uri
                .host()
                .ok_or("the URL has no host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let stream = tcp.call(uri).await?;
            if !https {
                return Ok(Stream::Plain(stream));
            }
            let tls = tls.ok_or("an https:// URL without TLS")?;
            let name = ServerName::try_from(host)?;
            let stream = tls.connect(name, stream.into_inner()).await?;
            Ok(Stream::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// A pooled connection.
pub enum Stream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
