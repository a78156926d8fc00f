//! The accepted connections: at most `max_connections` open at once (further
//! clients wait in the kernel's accept queue rather than costing us memory),
//! TCP_NODELAY on each (gRPC messages are small; Nagle would add latency),
//! and, with TLS, the handshake done here, each connection with the TLS
//! configuration in force when it arrived (so a reload changes what new
//! connections see and never disturbs existing ones).
//!
//! Handshakes run in their own tasks with a deadline: a slow or silent
//! client delays only itself.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::tls::{HANDSHAKE_TIMEOUT, SharedTls};
use crate::auth::certs::ClientCertificates;

/// What the server knows about a connection: its addresses and, with mTLS,
/// the client's verified certificate chain (leaf first). Tonic puts it in
/// every request's extensions; [`PeerLayer`] turns it into the standard
/// `TcpConnectInfo` and a [`ClientCertificates`] extension.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    tcp: TcpConnectInfo,
    certificates: Option<ClientCertificates>,
}

#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A client connection (plain TCP or TLS) holding one of the connection
/// slots until it closes.
#[derive(Debug)]
pub struct LimitedStream {
    inner: Transport,
    info: PeerInfo,
    _slot: OwnedSemaphorePermit,
}

impl LimitedStream {
    /// The client's address, if the socket reported it.
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.info.tcp.remote_addr()
    }
}

macro_rules! dispatch {
    ($self:ident, $stream:ident => $call:expr) => {
        match &mut $self.get_mut().inner {
            Transport::Plain($stream) => {
                let $stream = Pin::new($stream);
                $call
            }
            Transport::Tls($stream) => {
                let $stream = Pin::new($stream.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        dispatch!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        dispatch!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        dispatch!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, s => s.poll_shutdown(cx))
    }
}

impl Connected for LimitedStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

fn tcp_info(stream: &TcpStream) -> TcpConnectInfo {
    TcpConnectInfo {
        local_addr: stream.local_addr().ok(),
        remote_addr: stream.peer_addr().ok(),
    }
}

/// Accepts connections on `listener` while fewer than `max_connections` are
/// open; with `tls`, each completes its handshake (with the configuration in
/// force when it was accepted) before the server sees it. The stream ends
/// (and the accept task stops) when the server drops it.
pub fn limited_incoming(
    listener: TcpListener,
    max_connections: usize,
    tls: Option<SharedTls>,
) -> ReceiverStream<io::Result<LimitedStream>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
                () = tx.closed() => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    let tcp = tcp_info(&stream);
                    match &tls {
                        None => {
                            let connection = LimitedStream {
                                inner: Transport::Plain(stream),
                                info: PeerInfo {
                                    tcp,
                                    certificates: None,
                                },
                                _slot: slot,
                            };
                            if tx.send(Ok(connection)).await.is_err() {
                                return;
                            }
                        }
                        Some(tls) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let handshake = tokio::time::timeout(
                                    HANDSHAKE_TIMEOUT,
                                    acceptor.accept(stream),
                                )
                                .await;
                                let stream = match handshake {
                                    Ok(Ok(stream)) => stream,
                                    Ok(Err(e)) => {
                                        tracing::info!(%peer, error = %e, "TLS handshake failed");
                                        return;
                                    }
                                    Err(_) => {
                                        tracing::info!(%peer, "TLS handshake timed out");
                                        return;
                                    }
                                };
                                let certificates = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .map(|chain| ClientCertificates(Arc::new(chain.to_vec())));
                                let connection = LimitedStream {
                                    inner: Transport::Tls(Box::new(stream)),
                                    info: PeerInfo { tcp, certificates },
                                    _slot: slot,
                                };
                                // The server may be shutting down: then the
                                // connection is simply closed.
                                let _ = tx.send(Ok(connection)).await;
                            });
                        }
                    }
                }
                Err(e) => {
                    // Typically EMFILE/ENFILE or a connection reset before
                    // accept: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    drop(slot);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Copies each request's [`PeerInfo`] into the extensions the rest of the
/// server reads: `TcpConnectInfo` (tonic's `Request::remote_addr`) and
/// [`ClientCertificates`] (authentication).
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerLayer;

impl<S> tower::Layer<S> for PeerLayer {
    type Service = PeerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PeerService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct PeerService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for PeerService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(info) = request.extensions_mut().remove::<PeerInfo>() {
            request.extensions_mut().insert(info.tcp);
            if let Some(certificates) = info.certificates {
                request.extensions_mut().insert(certificates);
            }
        }
        self.inner.call(request)
    }
}
