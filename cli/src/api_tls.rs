//! The HTTP API beyond loopback: HTTPS with this node's cluster certificate. A connection from
//! this machine (a loopback peer address) may still speak plain HTTP, so the local CLI works
//! the same whatever `--api` is; plain HTTP from anywhere else gets a 400 that says to use
//! HTTPS, and nothing it asked for is served.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a client may take to send its first byte and finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

const PLAIN_REFUSED: &str = "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"error\":\"this blx API speaks HTTPS beyond loopback: use https:// and the cluster CA (blx --ca-cert, or the data dir's ca.crt)\"}";

/// One accepted API connection.
pub(crate) enum ApiStream {
    /// Plain HTTP from a loopback peer.
    Plain(TcpStream),
    /// HTTPS.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ApiStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ApiStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ApiStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ApiStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ApiStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ApiStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ApiStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ApiStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ApiStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ApiStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts TCP connections and hands over those that completed a handshake (or that speak
/// plain HTTP from loopback). Handshakes run on their own tasks, so a slow client delays no
/// other.
pub(crate) struct ApiListener {
    ready: mpsc::Receiver<(ApiStream, SocketAddr)>,
    local: SocketAddr,
}

impl ApiListener {
    /// Serves TLS with `config` on `listener`.
    pub(crate) fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = tx.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, open(stream, peer, acceptor))
                        .await
                    {
                        Ok(Ok(Some(s))) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API handshake failed"),
                        Err(_) => tracing::debug!(%peer, "API handshake timed out"),
                    }
                });
            }
        });
        Ok(ApiListener { ready, local })
    }
}

/// TLS if the client starts a TLS handshake; plain HTTP only from loopback.
async fn open(
    mut stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
) -> io::Result<Option<ApiStream>> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] == TLS_HANDSHAKE {
        return Ok(Some(ApiStream::Tls(Box::new(
            acceptor.accept(stream).await?,
        ))));
    }
    if peer.ip().is_loopback() {
        return Ok(Some(ApiStream::Plain(stream)));
    }
    tracing::warn!(%peer, "plain HTTP to the API from beyond loopback refused");
    // Read what the client sent before answering, and until it closes after: closing a socket
    // with unread bytes in it sends a reset, which can destroy the answer before it is read.
    let mut sink = vec![0u8; 16 * 1024];
    let _ = stream.read(&mut sink).await?;
    stream.write_all(PLAIN_REFUSED.as_bytes()).await?;
    stream.shutdown().await?;
    let drain = async { while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    Ok(None)
}

impl axum::serve::Listener for ApiListener {
    type Io = ApiStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
