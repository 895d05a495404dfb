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
                    Ok(a) => {
                        no_delay(&a.0);
                        a
                    }
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

/// Turns off Nagle's algorithm on an API connection. With it on, a write that follows one the
/// client has not acknowledged yet waits for that acknowledgement, which a client holds back
/// for up to 40 ms while it waits for the rest of an answer: the first request on a TLS
/// connection took about 45 ms, since the session tickets sent after the handshake went
/// first. Answers are written whole, so this adds no small packets.
pub(crate) fn no_delay(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot turn off Nagle's algorithm on an API connection");
    }
}

/// The listener of an API that is served on loopback only, in plain HTTP.
pub(crate) fn plain(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = TcpStream, Addr = SocketAddr> {
    axum::serve::ListenerExt::tap_io(listener, |s: &mut TcpStream| no_delay(s))
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

#[cfg(test)]
mod tests {
    use blx_membership::NodeId;
    use blx_membership::tls::{ClusterCa, ServingCert, Validity};

    use super::*;

    /// Every accepted API connection has Nagle's algorithm off (see [`no_delay`]).
    #[tokio::test]
    async fn accepted_connections_send_without_waiting_for_acknowledgements() {
        let ca = ClusterCa::generate("t", [1; 32]).unwrap();
        let creds = ca
            .issue_node(
                NodeId([7; 8]),
                [2; 32],
                Validity::starting(1_700_000_000, Duration::from_secs(3600)),
            )
            .unwrap();
        let config = ServingCert::new(&creds).unwrap().server_config().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut api = ApiListener::new(listener, Arc::new(config)).unwrap();
        let addr = axum::serve::Listener::local_addr(&api).unwrap();

        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (stream, _) = axum::serve::Listener::accept(&mut api).await;
        let ApiStream::Plain(stream) = stream else {
            panic!("a plain request from loopback was not served as plain HTTP");
        };
        assert!(stream.nodelay().unwrap());
    }

    #[tokio::test]
    async fn connections_to_a_loopback_only_api_send_without_waiting_either() {
        let mut api = plain(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = axum::serve::Listener::local_addr(&api).unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = axum::serve::Listener::accept(&mut api).await;
        assert!(stream.nodelay().unwrap());
    }
}
