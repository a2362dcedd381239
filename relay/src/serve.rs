//! The HTTP/1.1 accept loop shared by the API and admin ports: a bound on
//! concurrent connections, on the size of a request's head, a header-read
//! timeout (which also ends idle keep-alive connections), and a graceful stop.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Sleep;

pub type Body = Full<Bytes>;

/// Largest request head (request line and headers). hyper refuses a head
/// that outgrows its read buffer of this size, but it reads in large pieces:
/// a head that arrived in one piece passed up to about 112 KiB. So each head
/// it lets through is measured again here, and the limit is the same however
/// the bytes arrive.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The size of a request's head as sent: the request line, and each header
/// as `name: value` and its line end.
fn head_bytes<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    req.headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
        + 2
}

/// What hyper answers to a head that is too large: `431`, no body, and the
/// connection closed.
fn head_too_large() -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// On stop, how long open connections get to finish their requests.
    pub drain: Duration,
}

/// The connections still open at the drain timeout: resolves once they
/// have all ended.
pub type Leftover = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves `handler` on `listener` until `stop` turns true, then lets the
/// requests under way finish (up to `limits.drain`) and returns. Connections
/// still open then are not cut: a request among them that waits for the
/// store's last sync is answered once it ends (see [`Leftover`]), and the
/// rest end with the process.
pub async fn serve<H, F>(
    listener: TcpListener,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    handler: H,
) -> Option<Leftover>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES);
    loop {
        // Past the connection limit, new connections wait in the kernel's backlog.
        let slot = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            slot = slots.clone().acquire_owned() => slot.expect("semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let stream = Lingering::new(stream);
        let unread = stream.unread.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            let unread = unread.clone();
            async move {
                let response = if head_bytes(&req) > MAX_HEAD_BYTES {
                    head_too_large()
                } else {
                    handler(req).await
                };
                // Answered before its body was read: the client may still be
                // sending it when the connection closes.
                if response.headers().get(http::header::CONNECTION)
                    == Some(&http::HeaderValue::from_static("close"))
                {
                    unread.store(true, Ordering::Relaxed);
                }
                Ok::<_, Infallible>(response)
            }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // Errors here are clients going away or timing out: not the relay's problem.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    let mut all_closed: Leftover = Box::pin(graceful.shutdown());
    match tokio::time::timeout(limits.drain, &mut all_closed).await {
        Ok(()) => None,
        Err(_) => {
            tracing::warn!(
                "connections still open at the drain timeout; those whose messages the store's last sync covers are answered after it, and the rest are closed"
            );
            Some(all_closed)
        }
    }
}

/// The longest a connection closed with a request's body unread goes on
/// reading (and dropping) what the client still sends.
pub const LINGER: Duration = Duration::from_secs(5);

/// A lingering connection from which nothing more arrives for this long is
/// taken to be done sending.
pub const LINGER_QUIET: Duration = Duration::from_secs(1);

/// A connection that, when the relay closes it while the client may still be
/// sending (a request's body left unread by a `413` answered at once, or
/// bytes still arriving, as behind a head too large to read), first
/// half-closes it and then reads and drops what arrives until the client
/// closes its side, goes quiet for [`LINGER_QUIET`], or [`LINGER`] has
/// passed. Closed at once, a socket with unread bytes is reset: the client,
/// still sending, gets a broken pipe and may never read the answer.
struct Lingering {
    stream: TcpStream,
    /// Set when an answer left its request's body unread.
    unread: Arc<AtomicBool>,
    /// Once lingering: when to stop at the latest, and when, if nothing more
    /// arrives.
    until: Option<(Timer, Timer)>,
}

type Timer = Pin<Box<Sleep>>;

impl Lingering {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            unread: Arc::default(),
            until: None,
        }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let mut scratch = [0u8; 8192];
        if this.until.is_none() {
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            if !this.unread.load(Ordering::Relaxed) {
                // Nothing left unread by an answer: lingers only if the
                // client is still sending right now.
                let mut buf = ReadBuf::new(&mut scratch);
                match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                    _ => return Poll::Ready(Ok(())),
                }
            }
            this.until = Some((
                Box::pin(tokio::time::sleep(LINGER)),
                Box::pin(tokio::time::sleep(LINGER_QUIET)),
            ));
        }
        let (until, quiet) = this.until.as_mut().expect("set above");
        loop {
            if until.as_mut().poll(cx).is_ready() || quiet.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.stream).poll_read(cx, &mut buf)) {
                // The client is done, or gone: closed now without a reset.
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => {
                    let again = tokio::time::Instant::now() + LINGER_QUIET;
                    quiet.as_mut().reset(again);
                }
                Err(_) => return Poll::Ready(Ok(())),
            }
        }
    }
}
